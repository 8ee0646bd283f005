"""`ptst bench load`: throughput and latency of any OpenAI-compatible server, vLLM-comparable.

    ptst bench load --base-url http://127.0.0.1:8080/v1 --model demo --concurrency 1,4,16
    ptst bench load --base-url http://127.0.0.1:18000/v1 --model smollm2 \\
        --compare http://127.0.0.1:8080/v1 --compare-model demo --concurrency 16

Metrics follow `vllm bench serve` (vllm/benchmarks/serve.py, lib/endpoint_request_func.py):
  - TTFT: request sent -> first SSE message that has `choices` (the chat role chunk counts);
  - ITL: gaps between successive `choices` messages; E2E: request sent -> last `choices` message
    (the trailing usage chunk and `[DONE]` do not extend it);
  - output tokens: `usage.completion_tokens` (we send `stream_options.include_usage`), else
    the number of chunks that carried text;
  - TPOT = (E2E - TTFT) / (tokens - 1), only for requests with more than one token;
  - duration: first request of a level sent -> last one finished (warm-up excluded);
    request throughput = completed / duration, output throughput = output tokens / duration.
With `--no-stream` TTFT equals E2E and there is no ITL/TPOT.

`--compare URL` runs a second target in the same run, in alternating rounds (ABBA order) so both
see the same machine noise, and reports ratios (compare / base) and added latency.
"""

from ptst.bench.load._cli import add_arguments, run
from ptst.bench.load._prompts import (
    CHARS_PER_TOKEN,
    Tokens,
    load_tokenizer,
    make_prompts,
    read_prompts,
)
from ptst.bench.load._report import make_plots, summary_markdown
from ptst.bench.load._requests import (
    Options,
    Result,
    Target,
    build_payload,
    send_request,
)
from ptst.bench.load._run import (
    Level,
    compare_summaries,
    poisson_offsets,
    round_plan,
    run_batch,
    run_bench,
    summarize_level,
)

__all__ = [
    "CHARS_PER_TOKEN",
    "Level",
    "Options",
    "Result",
    "Target",
    "Tokens",
    "add_arguments",
    "build_payload",
    "compare_summaries",
    "load_tokenizer",
    "make_plots",
    "make_prompts",
    "poisson_offsets",
    "read_prompts",
    "round_plan",
    "run",
    "run_batch",
    "run_bench",
    "send_request",
    "summarize_level",
    "summary_markdown",
]
