"""Shipped templates render byte-exact (goldens typed from DESIGN.md's table); the loader
rejects bad files and names them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ptst.proxy.rewrite import Policy, enforce_chat, enforce_prompt
from ptst.proxy.templates import (
    Template,
    TemplateError,
    builtin_templates_dir,
    load_template_file,
    load_templates,
)

# The paper's texts, typed from DESIGN.md (never read from our YAML files).
LLAMA = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe. Your answers should not include any harmful, unethical, "
    "racist, sexist, toxic, dangerous, or illegal content. Please ensure that your responses "
    "are socially unbiased and positive in nature. If a question does not make any sense, or "
    "is not factually coherent, explain why instead of answering something not correct. If you "
    "don't know the answer to a question, please don't share false information."
)
LLAMA_SHORT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as "
    "possible, while being safe."
)
MPT = (
    "A conversation between a user and an LLM-based AI assistant. The assistant gives helpful "
    "and honest answers."
)
ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request."
)
Q = "Natalia sold clips to 48 of her friends. How many clips did she sell?"

# DESIGN.md's table, `{q}` = Q.
PAPER_SINGLE_TURN = {
    "text:vanilla": f"Question: {Q}\nAnswer:",
    "text:alpaca": f"{ALPACA}\n\n### Instruction:\n{Q}\n\n### Response:\n",
    "chat:vanilla": f"[INST] Question: {Q} [/INST]",
    "chat:alpaca": (
        f"[INST] <<SYS>>\n{ALPACA}\n<</SYS>>\n\n### Instruction:\n{Q}\n\n### Response:\n [/INST]"
    ),
    "chat:llama": f"[INST] <<SYS>>\n{LLAMA}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
    "chat:llama-short": f"[INST] <<SYS>>\n{LLAMA_SHORT}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
    "chat:mpt": f"[INST] <<SYS>>\n{MPT}\n<</SYS>>\n\nQuestion: {Q} [/INST]",
}

SAFE_FORMATS_SINGLE_TURN = {
    "chatml:llama": (
        f"<|im_start|>system\n{LLAMA}<|im_end|>\n<|im_start|>user\n{Q}<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3:llama": (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{Q}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral:llama": f"[INST] {LLAMA}\n\n{Q}[/INST]",
}

MULTI = [
    {"role": "user", "content": "q1"},
    {"role": "assistant", "content": "a1"},
    {"role": "user", "content": "q2"},
]
PAPER_MULTI_TURN = {
    "text:vanilla": "Question: q1\nAnswer: a1\n\nQuestion: q2\nAnswer:",
    "text:alpaca": (
        f"{ALPACA}\n\n### Instruction:\nq1\n\n### Response:\na1\n\n"
        "### Instruction:\nq2\n\n### Response:\n"
    ),
    "chat:vanilla": "[INST] Question: q1 [/INST] a1 </s><s>[INST] Question: q2 [/INST]",
    "chat:alpaca": (
        f"[INST] <<SYS>>\n{ALPACA}\n<</SYS>>\n\n### Instruction:\nq1\n\n### Response:\n [/INST]"
        " a1 </s><s>[INST] ### Instruction:\nq2\n\n### Response:\n [/INST]"
    ),
    "chat:llama": (
        f"[INST] <<SYS>>\n{LLAMA}\n<</SYS>>\n\nQuestion: q1 [/INST] a1 </s>"
        "<s>[INST] Question: q2 [/INST]"
    ),
    "chat:llama-short": (
        f"[INST] <<SYS>>\n{LLAMA_SHORT}\n<</SYS>>\n\nQuestion: q1 [/INST] a1 </s>"
        "<s>[INST] Question: q2 [/INST]"
    ),
    "chat:mpt": (
        f"[INST] <<SYS>>\n{MPT}\n<</SYS>>\n\nQuestion: q1 [/INST] a1 </s>"
        "<s>[INST] Question: q2 [/INST]"
    ),
    "chatml:llama": (
        f"<|im_start|>system\n{LLAMA}<|im_end|>\n<|im_start|>user\nq1<|im_end|>\n"
        "<|im_start|>assistant\na1<|im_end|>\n<|im_start|>user\nq2<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "llama3:llama": (
        f"<|start_header_id|>system<|end_header_id|>\n\n{LLAMA}<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq1<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\na1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nq2<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "mistral:llama": f"[INST] q1[/INST] a1</s>[INST] {LLAMA}\n\nq2[/INST]",
}

# Messages mode: (system message or None, user wrapper applied to "x").
MESSAGES_MODE = {
    "text:vanilla": (None, "x"),
    "text:alpaca": (ALPACA, "### Instruction:\nx\n\n### Response:\n"),
    "chat:vanilla": (None, "x"),
    "chat:alpaca": (ALPACA, "### Instruction:\nx\n\n### Response:\n"),
    "chat:llama": (LLAMA, "x"),
    "chat:llama-short": (LLAMA_SHORT, "x"),
    "chat:mpt": (MPT, "x"),
    "chatml:llama": (LLAMA, "x"),
    "llama3:llama": (LLAMA, "x"),
    "mistral:llama": (LLAMA, "x"),
}


@pytest.fixture(scope="module")
def templates() -> dict[str, Template]:
    return load_templates(builtin_templates_dir())


def _prompt(template: Template, messages: list[dict[str, Any]]) -> str:
    body = enforce_prompt({"model": "m", "messages": messages}, template, Policy())
    prompt: str = body["prompt"]
    return prompt


def test_ships_the_papers_seven_and_the_served_formats(templates: dict[str, Template]) -> None:
    assert set(templates) == set(PAPER_MULTI_TURN) == set(MESSAGES_MODE)
    for name, template in templates.items():
        assert template.source is not None
        assert template.source.name == name.replace(":", "-") + ".yaml"


@pytest.mark.parametrize("name", sorted(PAPER_SINGLE_TURN))
def test_paper_templates_single_turn_byte_exact(templates: dict[str, Template], name: str) -> None:
    assert _prompt(templates[name], [{"role": "user", "content": Q}]) == PAPER_SINGLE_TURN[name]


@pytest.mark.parametrize("name", sorted(SAFE_FORMATS_SINGLE_TURN))
def test_served_formats_single_turn(templates: dict[str, Template], name: str) -> None:
    got = _prompt(templates[name], [{"role": "user", "content": Q}])
    assert got == SAFE_FORMATS_SINGLE_TURN[name]


@pytest.mark.parametrize("name", sorted(PAPER_MULTI_TURN))
def test_multi_turn(templates: dict[str, Template], name: str) -> None:
    assert _prompt(templates[name], MULTI) == PAPER_MULTI_TURN[name]


@pytest.mark.parametrize("name", sorted(MESSAGES_MODE))
def test_messages_mode(templates: dict[str, Template], name: str) -> None:
    system, wrapped = MESSAGES_MODE[name]
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    out = enforce_chat(body, templates[name], Policy())
    expected = [{"role": "user", "content": wrapped}]
    if system is not None:
        expected.insert(0, {"role": "system", "content": system})
    assert out == {"model": "m", "messages": expected, "temperature": 0}


def test_client_system_with_vanilla_becomes_a_llama2_sys_block(
    templates: dict[str, Template],
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"}]
    assert _prompt(templates["chat:vanilla"], messages) == (
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nQuestion: q [/INST]"
    )
    assert _prompt(templates["text:vanilla"], messages) == "Be brief.\n\nQuestion: q\nAnswer:"


def test_stop_strings_and_modes(templates: dict[str, Template]) -> None:
    assert templates["chat:llama"].stop == ("[INST]",)
    assert templates["text:vanilla"].stop == ("\nQuestion:",)
    assert templates["chat:llama"].mode == "messages"
    assert templates["text:alpaca"].mode == "prompt"


def test_user_text_is_data_not_template_code(templates: dict[str, Template]) -> None:
    text = "{{ 7*7 }} {% for x in [1] %}loop{% endfor %} {content} {0} {{ system }} {#c#}"
    prompt = _prompt(templates["chat:llama"], [{"role": "user", "content": text}])
    assert prompt.endswith(f"Question: {text} [/INST]")
    body = {"messages": [{"role": "user", "content": text}]}
    assert enforce_chat(body, templates["chat:alpaca"], Policy())["messages"][1]["content"] == (
        f"### Instruction:\n{text}\n\n### Response:\n"
    )


def test_builtin_dir_is_the_repo_templates() -> None:
    assert builtin_templates_dir() == Path(__file__).resolve().parent.parent / "templates"


# ---- loader errors -------------------------------------------------------------------------

GOOD = """\
name: "t:ok"
description: test
mode: prompt
system_prompt: "Be safe."
user_wrapper: "Q: {content}"
stop: ["</s>"]
prompt: "{{ system }}{% for m in messages %}|{{ m.role }}:{{ m.content }}{% endfor %}|A:"
"""


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def test_load_good_file(tmp_path: Path) -> None:
    template = load_template_file(_write(tmp_path, "ok.yaml", GOOD))
    assert template.name == "t:ok"
    assert template.wrapper_parts == ("Q: ", "")
    turns = [{"role": "user", "content": "hi"}]
    assert template.render_prompt("S", turns) == "S|user:hi|A:"
    assert load_templates(tmp_path) == {"t:ok": template}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("name: [unclosed\n", "not valid YAML"),
        ("- a list\n", "must be a mapping"),
        (GOOD.replace('name: "t:ok"\n', ""), "name: Field required"),
        (GOOD.replace("mode: prompt", "mode: chat"), "mode:"),
        (GOOD + "colour: blue\n", "colour: Extra inputs are not permitted"),
        (GOOD.replace("{% endfor %}", ""), "Jinja syntax error"),
        (GOOD.replace("Q: {content}", "Q: {text}"), "user_wrapper must contain {content}"),
        (GOOD.replace("Q: {content}", "{content} {content}"), "exactly once"),
        (GOOD.replace("{{ system }}", ""), "does not render the system prompt"),
        (GOOD.replace("{{ m.content }}", ""), "does not render every turn"),
        (GOOD.replace("{{ system }}", "{{ system }}{{ nope }}"), "fails to render"),
        (GOOD.replace("{{ system }}", "{{ system }}{{ ''.__class__.__mro__ }}"), "fails to render"),
        (GOOD.replace("\nprompt: ", "\nnotes: "), "notes: Extra inputs"),
        (GOOD.replace("\nprompt: ", "\n# prompt: "), "no prompt"),
        (GOOD + 'markers: ["x"]\n', "marker 'x'"),
    ],
)
def test_loader_errors_name_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _write(tmp_path, "bad.yaml", text)
    with pytest.raises(TemplateError) as err:
        load_template_file(path)
    assert str(err.value).startswith(f"{path}: ")
    assert expected in str(err.value)
    with pytest.raises(TemplateError, match=r"bad\.yaml"):
        load_templates(tmp_path)


def test_sandbox_blocks_mutation_of_data(tmp_path: Path) -> None:
    text = GOOD.replace("{{ system }}", "{{ system }}{{ messages.append(1) }}")
    with pytest.raises(TemplateError, match="fails to render"):
        load_template_file(_write(tmp_path, "mut.yaml", text))


def test_duplicate_names_name_both_files(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD)
    _write(tmp_path, "b.yml", GOOD)
    with pytest.raises(TemplateError) as err:
        load_templates(tmp_path)
    assert "b.yml" in str(err.value) and "a.yaml" in str(err.value)
    assert "t:ok" in str(err.value)


def test_one_bad_file_fails_the_whole_set(tmp_path: Path) -> None:
    _write(tmp_path, "a.yaml", GOOD)
    _write(tmp_path, "z.yaml", "name: 1: 2\n")
    with pytest.raises(TemplateError, match=r"z\.yaml"):
        load_templates(tmp_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        load_templates(tmp_path / "nope")


def test_messages_only_template_cannot_render_prompts(tmp_path: Path) -> None:
    text = 'name: "m:only"\nmode: messages\nsystem_prompt: "Be safe."\n'
    template = load_template_file(_write(tmp_path, "m.yaml", text))
    assert not template.supports_prompt_mode
    with pytest.raises(TemplateError, match="no prompt"):
        template.render_prompt("x", [{"role": "user", "content": "q"}])


# ---- ptst templates ------------------------------------------------------------------------


def _ptst(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from ptst.commands.cli import main

    code = main(["templates", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_list_and_show(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _ptst(capsys, "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == sorted(MESSAGES_MODE)
    code, out, _ = _ptst(capsys, "show", "chat:llama")
    assert code == 0 and "name: chat:llama" in out and LLAMA in out
    assert "prompt: |-\n" in out


def test_cli_render(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('[{"role": "user", "content": "' + Q + '"}]', encoding="utf-8")
    code, out, _ = _ptst(
        capsys, "render", "chat:llama", "--messages", str(path), "--mode", "prompt"
    )
    assert (code, out) == (0, PAPER_SINGLE_TURN["chat:llama"] + "\n")
    code, out, _ = _ptst(capsys, "render", "chat:llama", "--messages", str(path))
    assert code == 0
    assert json.loads(out) == [{"role": "system", "content": LLAMA}, {"role": "user", "content": Q}]
    code, out, _ = _ptst(capsys, "render", "text:vanilla", "--messages", str(path), "--body")
    assert json.loads(out)["path"] == "/completions"
    assert json.loads(out)["body"]["prompt"] == PAPER_SINGLE_TURN["text:vanilla"]


def test_cli_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text('[{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]')
    code, _, err = _ptst(
        capsys, "render", "chat:llama", "--messages", str(path), "--system-policy", "reject"
    )
    assert code == 1 and "messages[0].role" in err
    code, _, err = _ptst(capsys, "render", "chat:nope", "--messages", str(path))
    assert code == 2 and "chat:nope" in err
    path.write_text("{not json")
    code, _, err = _ptst(capsys, "render", "chat:llama", "--messages", str(path))
    assert code == 2 and "not valid JSON" in err
    code, _, err = _ptst(capsys, "list", "--dir", str(tmp_path / "missing"))
    assert code == 2 and "does not exist" in err
