"""`ptst bench ...`: each benchmark lives in its own module with add_arguments() and run()."""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, tuple[str, str]] = {
    "load": (
        "ptst.bench.load",
        "throughput and latency against an OpenAI-compatible URL (--compare for side by side)",
    ),
    "overhead": (
        "ptst.bench.overhead",
        "the proxy's own cost: direct upstream vs through the proxy, interleaved",
    ),
    "safety": (
        "ptst.bench.safety",
        "refusal and attack-success rates per prompt set, template and model",
    ),
    "detect": ("ptst.bench.detect_speed", "speed of the refusal detector's rule path"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "benches:\n" + "\n".join(
        f"  {name:<10} {text}" for name, (_, text) in BENCHES.items()
    )
    parser.add_argument(
        "bench", choices=BENCHES, metavar="BENCH", help="one of: " + ", ".join(BENCHES)
    )
    parser.add_argument(
        "rest", nargs=argparse.REMAINDER, help="the bench's own arguments (BENCH --help)"
    )


def run(args: argparse.Namespace) -> int:
    module_name, help_text = BENCHES[args.bench]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ptst bench {args.bench}", description=help_text)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.rest)))
