"""The `ptst` command.

Each subcommand lives in its own module, which exposes two functions:

    add_arguments(parser: argparse.ArgumentParser) -> None
    run(args: argparse.Namespace) -> int

Modules are imported only when their subcommand runs, so `ptst detect` never pays for
importing vLLM or FastAPI, and a command whose optional dependency is missing says in one line
which extra installs it (`ptst.extras`).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from ptst import __version__
from ptst.extras import MissingExtra, missing_extra

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "up": (
        "ptst.engine.up",
        "start vLLM with a model and the proxy in front of it (the demo by default)",
    ),
    "serve": ("ptst.commands.serve", "run the proxy from a YAML config"),
    "backend": (
        "ptst.engine.backend",
        "start vLLM's OpenAI-compatible server and wait until it is healthy",
    ),
    "demo-model": (
        "ptst.engine.demo_model",
        "fetch and convert a demo model into a folder vLLM serves",
    ),
    "templates": ("ptst.commands.templates", "list, show and render the safe-testing templates"),
    "detect": ("ptst.commands.detect", "refusal detection over JSONL on stdin"),
    "logs": ("ptst.commands.logs", "query the refusal log"),
    "tune": ("ptst.tune.train", "LoRA fine-tuning on examples rendered as the proxy serves them"),
    "merge": ("ptst.tune.merge", "merge a fine-tune (or a LoRA adapter) with its base on MergeKit"),
    "experiment": (
        "ptst.commands.experiment",
        "the PTST experiment end to end: tune, serve, measure, merge, report (resumable)",
    ),
    "bench": ("ptst.commands.bench", "load and safety benchmarks"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ptst", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"ptst-proxy {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # prints usage, the version or an error, and exits
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = argparse.ArgumentParser(prog=f"ptst {name}", description=help_text)
        module.add_arguments(parser)
        args = parser.parse_args(rest)
        return int(module.run(args))
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as exc:
        missing = exc if isinstance(exc, MissingExtra) else missing_extra(exc)
        if missing is None:
            raise
        print(f"ptst {name}: {missing}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
