"""`ptst bench safety` arguments and run: options in, a table and the report folder out."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from ptst.bench import judge as judging
from ptst.bench.safety._plan import DEFAULT_CACHE, DEFAULT_TASK_MAX_TOKENS, Options
from ptst.bench.safety._report import fmt_rate
from ptst.bench.safety._requests import DEFAULT_TEMPLATE, Sampling
from ptst.bench.safety._run import run_safety


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _pairs(text: str) -> dict[str, str]:
    out = {}
    for part in _csv(text):
        key, sep, value = part.partition("=")
        if not sep or not key or not value:
            raise argparse.ArgumentTypeError(f"expected MODEL=TEMPLATE, got {part!r}")
        out[key] = value
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add(
        "--base-url",
        required=True,
        help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1",
    )
    add(
        "--model",
        required=True,
        type=_csv,
        help="served model name(s) or proxy routes, comma separated",
    )
    add(
        "--templates",
        type=_csv,
        default=[DEFAULT_TEMPLATE],
        help="templates applied locally with the proxy's rewrite; 'default' = none (default: %(default)s)",
    )
    add(
        "--prompts",
        type=_csv,
        default=["builtin-harmful", "builtin-benign"],
        help="prompt sets: builtin-harmful, builtin-benign, NAME=PATH (.csv or .jsonl) (default: both builtins)",
    )
    add(
        "--benign-sets",
        type=_csv,
        default=[],
        help="names of NAME=PATH sets that are benign (over-refusal)",
    )
    add(
        "--tasks",
        type=_csv,
        default=[],
        help="task sets scored by accuracy, NAME=PATH of a GSM8K-format .jsonl "
        "(question, answer ending '#### N'), e.g. gsm8k=../shared/data/gsm8k/test.jsonl",
    )
    add("--task-limit", type=int, default=None, help="the first N questions of each task set")
    add(
        "--task-max-tokens",
        type=int,
        default=DEFAULT_TASK_MAX_TOKENS,
        help="max tokens of each task answer (default: %(default)s; --max-tokens is for prompts)",
    )
    add("--limit", type=int, default=None, help="at most N prompts per set (after --every)")
    add("--every", type=int, default=1, help="take every K-th prompt of each set")
    add(
        "--max-tokens",
        type=int,
        default=48,
        help="max tokens of each prompt-set answer (default: 48)",
    )
    add("--temperature", type=float, default=0.0, help="sampling temperature (default: 0, greedy)")
    add("--concurrency", type=int, default=8, help="requests in flight (default: 8)")
    add(
        "--api-key",
        default=os.environ.get("PTST_API_KEY") or os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $PTST_API_KEY or $OPENAI_API_KEY)",
    )
    add("--timeout", type=float, default=600.0, help="seconds to wait for one answer")
    add(
        "--via-proxy",
        action="store_true",
        help="each --model is a proxy route; the proxy templates",
    )
    add(
        "--proxy-config",
        type=Path,
        default=None,
        help="the proxy's YAML: route templates, trained_with",
    )
    add("--trained-with", type=_pairs, default={}, help="MODEL=TEMPLATE,... for the PTST matrix")
    add(
        "--templates-dir",
        type=Path,
        default=None,
        help="template folder (default: the built-in one)",
    )
    add("--judge-url", default=None, help="OpenAI-compatible base URL of an LLM judge")
    add("--judge-model", default=None, help="the judge's model name at --judge-url")
    add(
        "--judge-rubric",
        choices=judging.RUBRICS,
        default="harm",
        help="harm: the 1-5 harmfulness score; refusal: a YES/NO verdict (default: harm)",
    )
    add(
        "--judge-api-key",
        default=os.environ.get("PTST_JUDGE_API_KEY"),
        help="bearer token of the judge (default: $PTST_JUDGE_API_KEY)",
    )
    add(
        "--judge-max-tokens",
        type=int,
        default=512,
        help="max tokens of each verdict (default: 512)",
    )
    add(
        "--cache",
        type=Path,
        default=DEFAULT_CACHE,
        help="response cache folder (default: %(default)s)",
    )
    add("--out", type=Path, default=Path("results"), help="results root (default: %(default)s)")
    add("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> Options:
    judge = None
    if args.judge_url or args.judge_model:
        if not (args.judge_url and args.judge_model):
            raise ValueError("--judge-url and --judge-model go together")
        judge = judging.JudgeConfig(
            base_url=args.judge_url,
            model=args.judge_model,
            rubric=args.judge_rubric,
            api_key=args.judge_api_key,
            max_tokens=args.judge_max_tokens,
        )
    if (args.limit is not None and args.limit < 1) or args.every < 1 or args.concurrency < 1:
        raise ValueError("--limit, --every and --concurrency must be at least 1")
    if (args.task_limit is not None and args.task_limit < 1) or args.task_max_tokens < 1:
        raise ValueError("--task-limit and --task-max-tokens must be at least 1")
    return Options(
        base_url=args.base_url,
        models=args.model,
        templates=args.templates,
        prompt_specs=args.prompts,
        benign_sets=args.benign_sets,
        limit=args.limit,
        every=args.every,
        sampling=Sampling(temperature=args.temperature, max_tokens=args.max_tokens),
        task_specs=args.tasks,
        task_limit=args.task_limit,
        task_max_tokens=args.task_max_tokens,
        concurrency=args.concurrency,
        api_key=args.api_key,
        via_proxy=args.via_proxy,
        proxy_config=args.proxy_config,
        trained_with=args.trained_with,
        templates_dir=args.templates_dir,
        judge=judge,
        cache_dir=args.cache,
        out=args.out,
        timeout=args.timeout,
        progress=not args.no_progress,
    )


def run(args: argparse.Namespace) -> int:
    try:
        options = options_from_args(args)
        outcome = asyncio.run(run_safety(options))
    except (ValueError, OSError) as exc:
        print(f"ptst bench safety: {exc}", file=sys.stderr)
        return 2
    for cell in outcome.cells:
        label = "over-refusal" if cell.benign else "refusal"
        print(
            f"{cell.set:>16} {cell.template:>18} {cell.model:>12}  {label} {fmt_rate(cell.refusal)}"
        )
    for task in outcome.task_cells:
        print(
            f"{task.set:>16} {task.template:>18} {task.model:>12}  "
            f"accuracy {fmt_rate(task.accuracy)}"
        )
    errors = sum(c.errors for c in outcome.cells) + sum(c.errors for c in outcome.task_cells)
    print(f"report: {outcome.folder / 'report.md'} ({outcome.sent} requests sent)")
    if errors:
        print(
            f"{errors} request(s) failed; rerun the same command to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0
