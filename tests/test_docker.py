"""No Docker engine runs here: parse the Dockerfile and compose file and check that the commands
they run exist in the package and that the config they mount is valid."""

from __future__ import annotations

import argparse
import shlex

import pytest
import yaml

from ptst.commands import cli
from ptst.proxy.config import load_settings
from tests.servers import ROOT


def parse_cli(args: list[str]) -> argparse.Namespace:
    assert args[0] in cli.COMMANDS, f"{args[0]} is not a ptst subcommand"
    module = __import__(cli.COMMANDS[args[0]][0], fromlist=["add_arguments"])
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(args[1:])


def dockerfile_instructions() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line and not line.startswith("#") and line.split()[0].isupper():
            key, _, rest = line.partition(" ")
            out.setdefault(key, []).append(rest)
    return out


def test_dockerfile_runs_ptst() -> None:
    ins = dockerfile_instructions()
    assert ins["FROM"][0].startswith("vllm/vllm-openai:")
    assert yaml.safe_load(ins["ENTRYPOINT"][0]) == ["ptst"]
    parse_cli(yaml.safe_load(ins["CMD"][0]))
    for copied in ("proxy", "bench", "templates"):
        assert any(c.split()[0] == copied for c in ins["COPY"])


@pytest.mark.parametrize(
    "example", ["up --model /model --proxy-host 0.0.0.0", "serve --config /config/ptst.yaml"]
)
def test_dockerfile_usage_examples_parse(example: str) -> None:
    assert example in (ROOT / "Dockerfile").read_text()
    parse_cli(shlex.split(example))


def test_compose_services() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert set(compose["services"]) == {"vllm", "proxy"}
    vllm = compose["services"]["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai:")
    served = vllm["command"][vllm["command"].index("--served-model-name") + 1]
    proxy = compose["services"]["proxy"]
    args = parse_cli(proxy["command"])
    config_host_dir = proxy["volumes"][0].split(":")[0]
    settings = load_settings(ROOT / config_host_dir / args.config.name)
    assert settings.routes[0].upstream == ["http://vllm:8000/v1"]
    assert settings.routes[0].upstream_name == served
