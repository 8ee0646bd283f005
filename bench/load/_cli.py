"""`ptst bench load` arguments and run: prompts, targets and levels in; report out."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ptst.bench import report
from ptst.bench.load._prompts import CHARS_PER_TOKEN, Tokens, load_tokenizer, make_prompts
from ptst.bench.load._report import make_plots, summary_markdown
from ptst.bench.load._requests import Options, Target
from ptst.bench.load._run import Level, run_bench


def _floats(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers, got {text!r}"
        ) from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError("values must be positive")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", required=True, help="model name (or proxy route) to request")
    parser.add_argument(
        "--api-key",
        default=os.environ.get("OPENAI_API_KEY"),
        help="bearer token (default: $OPENAI_API_KEY)",
    )
    parser.add_argument(
        "--endpoint",
        choices=["chat", "completions"],
        default="chat",
        help="API to load (default: chat)",
    )
    levels = parser.add_mutually_exclusive_group()
    levels.add_argument("--concurrency", type=_floats, help="closed-loop levels, e.g. 1,4,16")
    levels.add_argument("--rate", type=_floats, help="open-loop Poisson rates (req/s), e.g. 2,4,8")
    parser.add_argument("--num-prompts", type=int, default=64, help="requests per level and target")
    parser.add_argument("--input-len", type=int, default=64, help="synthetic prompt tokens")
    parser.add_argument("--output-len", type=int, default=64, help="max_tokens per request")
    parser.add_argument("--tokenizer", help="model folder for AutoTokenizer (else ~4 chars/token)")
    parser.add_argument("--prompts", type=Path, help="prompt file (.txt lines, .jsonl, .json)")
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests per target")
    parser.add_argument(
        "--no-stream", action="store_true", help="whole answers (no TTFT, ITL or TPOT then)"
    )
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos (vLLM)")
    parser.add_argument("--compare", help="a second base URL measured in the same run")
    parser.add_argument("--compare-model", help="model name at --compare (default: --model)")
    parser.add_argument("--compare-api-key", help="API key for --compare (default: --api-key)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds with --compare")
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="results root (default: results/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default: 0)")
    parser.add_argument("--label", help="name of the base target in the report (default: base)")
    parser.add_argument(
        "--compare-label", default="compare", help="name of the --compare target in the report"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    if args.num_prompts < 1 or args.output_len < 1 or args.input_len < 1:
        print("error: --num-prompts, --input-len and --output-len must be >= 1", file=sys.stderr)
        return 2
    tokens = load_tokenizer(args.tokenizer)
    if args.prompts is None and not tokens.exact:
        print(
            f"note: no tokenizer; prompt length approximated as {CHARS_PER_TOKEN} chars/token",
            file=sys.stderr,
        )
    prompts = make_prompts(args.num_prompts, args.input_len, tokens, args.seed, args.prompts)
    warm = make_prompts(args.warmup, args.input_len, tokens, args.seed + 1, args.prompts)
    targets = [Target(args.label or "base", args.base_url, args.model, args.api_key)]
    if args.compare:
        targets.append(
            Target(
                args.compare_label,
                args.compare,
                args.compare_model or args.model,
                args.compare_api_key or args.api_key,
            )
        )
    if len({t.name for t in targets}) != len(targets):
        print("error: --label and --compare-label must differ", file=sys.stderr)
        return 2
    if args.rate:
        levels = [Level("rate", v) for v in args.rate]
    else:
        levels = [Level("concurrency", float(int(v))) for v in (args.concurrency or [1.0])]
    opts = Options(args.endpoint, not args.no_stream, args.output_len, args.ignore_eos)
    results = asyncio.run(
        run_bench(
            targets,
            prompts,
            opts,
            levels,
            tokens,
            warm,
            args.rounds,
            args.seed,
            progress=not args.no_progress,
        )
    )
    names = [t.name for t in targets]
    table = summary_markdown(results, names)
    print(table)
    folder = report.run_dir(
        args.out, "load", targets[-1].base_url if args.compare else args.base_url
    )
    data = {
        "bench": "load",
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "targets": [{"name": t.name, "url": t.v1, "model": t.model} for t in targets],
        "options": vars(opts)
        | {
            "num_prompts": args.num_prompts,
            "input_len": args.input_len,
            "warmup": args.warmup,
            "seed": args.seed,
            "rounds": args.rounds if args.compare else 1,
            "tokenizer": args.tokenizer if tokens.exact else None,
            "prompt_length": "tokenizer" if tokens.exact else f"~{CHARS_PER_TOKEN} chars/token",
            "prompts_file": args.prompts,
        },
        "levels": results,
    }
    md = _header(targets, opts, args, tokens) + "\n\n" + table
    html = report.write_report(folder, "Load bench", data, md, make_plots(folder, results, names))
    print(f"\nreport: {html}")
    completed = sum(e["targets"][n]["summary"]["completed"] for e in results for n in names)
    return 0 if completed else 1  # 1: not a single request succeeded


def _header(
    targets: Sequence[Target], opts: Options, args: argparse.Namespace, tokens: Tokens
) -> str:
    lines = ["# Load bench", ""]
    for t in targets:
        lines.append(f"- **{t.name}**: `{t.v1}` model `{t.model}`")
    plen = "counted with the tokenizer" if tokens.exact else f"~{CHARS_PER_TOKEN} chars/token"
    source = (
        f"from `{args.prompts}`" if args.prompts else f"synthetic, {args.input_len} tokens ({plen})"
    )
    lines.append(
        f"- endpoint `{opts.endpoint}`, {'streaming' if opts.stream else 'not streaming'}, "
        f"max_tokens {opts.output_len}{', ignore_eos' if opts.ignore_eos else ''}; prompts {source}; "
        f"{args.num_prompts} requests per level and target, {args.warmup} warm-up"
    )
    if len(targets) > 1:
        lines.append(f"- interleaved in {args.rounds} rounds per target (ABBA order)")
    return "\n".join(lines)
