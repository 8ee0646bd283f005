#!/usr/bin/env bash
# Answers for the refusal corpus from the models this machine serves (vLLM CPU).
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p results/corpus
P=.venv/bin/ptst
M=$HOME/.cache/ptst/models
SETS="harmful=bench/prompts/harmful.jsonl,borderline=bench/refusal_corpus/prompts/borderline.jsonl,benign=bench/prompts/benign.jsonl"
gen() {  # name model-folder templates max-tokens
  local name=$1 folder=$2 templates=$3 tokens=$4 port=8${RANDOM:0:3}
  $P backend --model "$folder" --served-model-name "$name" --port "$port" --max-model-len 2048 \
    > results/corpus/$name-vllm.log 2>&1 &
  local pid=$!
  for _ in $(seq 600); do curl -sf "http://127.0.0.1:$port/health" >/dev/null && break; sleep 2; done
  $P bench safety --base-url "http://127.0.0.1:$port/v1" --model "$name" --templates "$templates" \
    --prompts "$SETS" --benign-sets borderline,benign --max-tokens "$tokens" --temperature 0 \
    --concurrency 32 --no-progress --cache results/corpus/$name-cache --out results/corpus/$name
  kill -TERM $pid; wait $pid || true  # SIGINT is ignored by background jobs of a script
}
gen smollm2-135m $M/smollm2-135m default,chat:vanilla,chat:llama 96
gen qwen2.5-coder-0.5b $M/qwen2.5-coder-0.5b chat:llama 64
echo GENERATED
