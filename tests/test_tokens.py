"""Special tokens read from a tokenizer folder, and the route option that uses them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ptst.proxy.config import parse_settings
from ptst.proxy.state import SnapshotError, build_snapshot
from ptst.proxy.templates import builtin_templates_dir
from ptst.proxy.tokens import special_tokens


def write(folder: Path, name: str, data: object) -> None:
    (folder / name).write_text(json.dumps(data), encoding="utf-8")


def test_reads_all_three_files(tmp_path: Path) -> None:
    write(
        tmp_path,
        "tokenizer.json",
        {
            "added_tokens": [
                {"content": "<|im_start|>", "special": True},
                {"content": "<repo_name>", "special": True},
                {"content": "plain", "special": False},
            ]
        },
    )
    write(
        tmp_path,
        "tokenizer_config.json",
        {
            "added_tokens_decoder": {"5": {"content": "<fim>", "special": True}},
            "bos_token": "<s>",
            "eos_token": {"content": "</s>", "special": True},
            "pad_token": None,
            "additional_special_tokens": ["<tool>", {"content": "<repo_name>"}],
        },
    )
    write(tmp_path, "special_tokens_map.json", {"unk_token": "<unk>", "mask_token": "x"})
    assert special_tokens(tmp_path) == (
        "<|im_start|>",
        "<repo_name>",
        "<fim>",
        "<s>",
        "</s>",
        "<tool>",
        "<unk>",
    )  # "plain" is not special, "x" is too short to tell from text, duplicates appear once


def test_a_folder_without_tokenizer_files_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no tokenizer files"):
        special_tokens(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer\.json: cannot read"):
        special_tokens(tmp_path)


def test_route_option_extends_the_policy_and_names_bad_folders(tmp_path: Path) -> None:
    write(tmp_path, "tokenizer.json", {"added_tokens": [{"content": "<sep>", "special": True}]})
    (tmp_path / "ptst.yaml").write_text("")
    route = {"model": "m", "upstream": "http://127.0.0.1:9/v1", "template": "chat:llama"}
    data = {"templates_dir": str(builtin_templates_dir()), "routes": [route]}
    tok = {**route, "tokenizer": ".", "extra_markers": ["<own>"]}
    settings = parse_settings({**data, "routes": [tok]}, source=tmp_path / "ptst.yaml")
    assert settings.routes[0].tokenizer == tmp_path / "."  # relative to the config file
    policy = build_snapshot(settings).policies["m"]
    assert policy.extra_markers == ("<own>", "<sep>")

    missing = {**route, "tokenizer": str(tmp_path / "nope")}
    with pytest.raises(SnapshotError, match=r"routes\.0\.tokenizer: .*no tokenizer files"):
        build_snapshot(parse_settings({**data, "routes": [missing]}))
