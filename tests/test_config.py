"""Config validation: errors name the file and the key; the PTST guard; env secrets."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ptst.proxy.config import ConfigError, builtin_templates_dir, load_settings
from ptst.proxy.state import SnapshotError, build_snapshot
from tests.servers import PTST, ROOT

ROUTE = {"model": "m", "upstream": "http://127.0.0.1:9/v1", "template": "chat:llama"}


def write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "ptst.yaml"
    path.write_text(yaml.safe_dump({"templates_dir": str(ROOT / "templates"), **data}))
    return path


def test_valid_config_resolves_paths(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"routes": [ROUTE], "log": {"jsonl": "logs/r.jsonl"}}))
    assert settings.routes[0].upstream == ["http://127.0.0.1:9/v1"]
    assert settings.routes[0].upstream_name == "m"
    assert settings.log.jsonl == tmp_path / "logs/r.jsonl"
    assert build_snapshot(settings).resolve("m")[2] == "messages"


def test_ptst_guard_refuses_serving_with_the_training_template(tmp_path: Path) -> None:
    route = {**ROUTE, "trained_with": "chat:llama"}
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, {"routes": [route]}))
    message = str(info.value)
    assert "ptst.yaml" in message and "routes.0" in message and "PTST" in message
    assert load_settings(write(tmp_path, {"routes": [{**route, "allow_same_template": True}]}))


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"routes": [{**ROUTE, "upstrem": "x"}]}, "routes.0.upstrem"),
        ({"routes": [{**ROUTE, "upstream": "127.0.0.1:8000"}]}, "routes.0.upstream"),
        ({"routes": [{**ROUTE, "system_policy": "ignore"}]}, "routes.0.system_policy"),
        ({"server": {"port": 99999}}, "server.port"),
        ({"routes": [ROUTE, ROUTE]}, "two routes are named 'm'"),
    ],
)
def test_errors_name_file_and_key(tmp_path: Path, data: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, data))
    assert str(info.value).startswith(str(tmp_path / "ptst.yaml"))
    assert names in str(info.value)


def test_unknown_template_is_a_snapshot_error(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, {"routes": [{**ROUTE, "template": "chat:nope"}]}))
    with pytest.raises(SnapshotError, match=r"routes\.0\.template: unknown template 'chat:nope'"):
        build_snapshot(settings)


def test_prompt_mode_needs_a_prompt_template(tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "t.yaml").write_text(
        yaml.safe_dump({"name": "sys-only", "system_prompt": "Be safe."})
    )
    route = {**ROUTE, "template": "sys-only", "mode": "prompt"}
    settings = load_settings(write(tmp_path, {"routes": [route], "templates_dir": str(templates)}))
    with pytest.raises(SnapshotError, match="cannot serve in prompt mode"):
        build_snapshot(settings)


def test_api_keys_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PTST_API_KEYS", "a, b")
    assert load_settings(write(tmp_path, {"routes": [ROUTE]})).api_keys == ["a", "b"]


def test_serve_exits_with_a_clear_error(tmp_path: Path) -> None:
    path = write(tmp_path, {"routes": [{**ROUTE, "template": "chat:nope"}]})
    proc = subprocess.run(
        [*PTST, "serve", "--config", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "unknown template 'chat:nope'" in proc.stderr
    missing = subprocess.run(
        [*PTST, "serve", "--config", str(tmp_path / "nope.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


def test_templates_default_to_the_shipped_ones(tmp_path: Path) -> None:
    path = tmp_path / "ptst.yaml"
    path.write_text(yaml.safe_dump({"routes": [{"model": "m", "upstream": "http://x/v1"}]}))
    assert load_settings(path).templates_dir == builtin_templates_dir()
    assert (builtin_templates_dir() / "chat-llama.yaml").is_file()
