"""Command-line conventions: `ptst --version`, help text on every option, one-line errors for
missing optional dependencies, JSON logs from `ptst serve`."""

from __future__ import annotations

import argparse
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ptst import __version__
from ptst.commands.bench import BENCHES
from ptst.commands.cli import COMMANDS
from ptst.extras import MissingExtra, require
from ptst.proxy.config import build_config, write_config
from tests.servers import PTST, ROOT, free_port, start_server

PARSERS = {f"ptst {name}": module for name, (module, _) in COMMANDS.items() if name != "bench"}
PARSERS |= {f"ptst bench {name}": module for name, (module, _) in BENCHES.items()}


def all_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    actions = list(parser._actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                actions += all_actions(sub)
    return actions


def test_version() -> None:
    out = subprocess.run([*PTST, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert out.stdout.strip() == f"ptst-proxy {__version__}"
    assert __version__ != "0+unknown"


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_option_has_help(prog: str) -> None:
    parser = argparse.ArgumentParser(prog=prog)
    importlib.import_module(PARSERS[prog]).add_arguments(parser)
    missing = [
        "/".join(a.option_strings) or a.dest
        for a in all_actions(parser)
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert not missing, f"{prog}: options without help text: {missing}"


def test_a_missing_extra_is_one_line_naming_it() -> None:
    # numpy (the `bench` extra) made unimportable, as on a base install
    code = (
        "import sys; sys.modules['numpy'] = None; from ptst.commands.cli import main; "
        "sys.exit(main(['bench', 'load', '--help']))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "ptst bench: this needs numpy, which comes with the 'bench' extra: "
        "pip install 'ptst-proxy[bench]'"
    ]


def test_require_names_the_extra() -> None:
    assert require("json").dumps([]) == "[]"
    with pytest.raises(MissingExtra, match=r"ptst-proxy\[tune\]"):
        require("ptst_no_such_module_for_test", "tune")
    with pytest.raises(ModuleNotFoundError):  # not optional: a plain error, not a hint
        require("ptst_no_such_module_for_test")


def test_serve_logs_json(tmp_path: Path, log_dir: Path) -> None:
    folder = tmp_path
    port = free_port()
    route = {"model": "m", "upstream": "http://127.0.0.1:9/v1", "template": "chat:llama"}
    config = build_config([route], port=port, log_dir=folder)
    path = write_config(folder / "ptst.yaml", config)
    cmd = [*PTST, "serve", "--config", str(path), "--log-format", "json"]
    with start_server("serve-json", cmd, log_dir) as server:
        server.wait_http(f"http://127.0.0.1:{port}/v1/models", timeout=60)
        server.stop()
        lines = [line for line in server.lines if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    assert records, server.tail()
    assert all({"time", "logger", "level", "message"} <= set(r) for r in records)
    assert any(r["logger"].startswith("uvicorn") for r in records)
    assert not [line for line in server.lines if line.strip() and not line.startswith("{")]
