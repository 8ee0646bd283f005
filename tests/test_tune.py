"""ptst tune and ptst merge: data, rendering, batches, the manifest, MergeKit merges of tiny
models (linear = (1-λ)·a + λ·b tensor by tensor), and a short real LoRA run on SmolLM2.

The training data here is benign arithmetic only (GSM8K-style question/answer pairs).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("peft")
pytest.importorskip("mergekit")

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from ptst.commands.cli import main
from ptst.engine.demo_model import ensure_model
from ptst.proxy.rewrite import Policy
from ptst.proxy.templates import builtin_templates_dir, load_templates
from ptst.tune.batches import batch_indices, learning_rate, total_steps
from ptst.tune.data import DataError, load_dataset
from ptst.tune.manifest import MANIFEST_NAME, read_manifest
from ptst.tune.merge import MergeError, merge, merge_config
from ptst.tune.render import IGNORE, render_example
from ptst.tune.train import backward

TEMPLATES = load_templates(builtin_templates_dir())
QA = [
    {
        "question": f"What is {a} + {b}?",
        "answer": f"{a} + {b} = <<{a}+{b}={a + b}>>{a + b}\n#### {a + b}",
    }
    for a, b in [(2, 3), (4, 5), (7, 1), (6, 6), (9, 2), (3, 8), (5, 5), (1, 1)]
]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return ensure_model()


@pytest.fixture(scope="module")
def tokenizer(smollm2: Path) -> Any:
    return AutoTokenizer.from_pretrained(smollm2)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


# --- data -------------------------------------------------------------------------------------


def test_qa_and_chat_lines(tmp_path: Path) -> None:
    chat = {
        "messages": [
            {"role": "user", "content": "What is 1 + 1?"},
            {"role": "assistant", "content": "2"},
        ]
    }
    data = load_dataset(write_jsonl(tmp_path / "d.jsonl", [QA[0], chat]))
    assert data.rows == 2 and len(data.sha256) == 64
    assert data.examples[0].messages == ({"role": "user", "content": "What is 2 + 3?"},)
    assert data.examples[0].answer.endswith("#### 5")
    assert data.examples[1].answer == "2"


def test_limit_is_a_fixed_seeded_subset(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", QA)
    first, again = load_dataset(path, limit=3, seed=1), load_dataset(path, limit=3, seed=1)
    assert first.examples == again.examples and len(first.examples) == 3
    assert load_dataset(path, limit=3, seed=2).examples != first.examples


def test_bad_lines_name_the_line(tmp_path: Path) -> None:
    bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "x"}]}
    with pytest.raises(DataError, match=r"d.jsonl:2: the last message must be the assistant"):
        load_dataset(write_jsonl(tmp_path / "d.jsonl", [QA[0], bad]))


# --- rendering (the vLLM comparison is in test_tune_vllm.py) ----------------------------------


@pytest.mark.parametrize(
    ("name", "mode"),
    [("chat:llama", "messages"), ("chat:vanilla", "messages"), ("chatml:llama", "prompt")],
)
def test_loss_only_on_the_answer_and_its_end_of_turn(tokenizer: Any, name: str, mode: str) -> None:
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = render_example(question, "2 + 3 = 5\n#### 5", TEMPLATES[name], tokenizer, mode=mode)  # type: ignore[arg-type]
    assert all(label == IGNORE for label in rendered.labels[: rendered.prompt_len])
    assert list(rendered.labels[rendered.prompt_len :]) == list(rendered.answer_ids)
    assert tokenizer.decode(rendered.answer_ids) == "2 + 3 = 5\n#### 5<|im_end|>"


def test_messages_mode_is_the_chat_template_of_the_enforced_messages(tokenizer: Any) -> None:
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = render_example(question, "5", TEMPLATES["chat:llama"], tokenizer)
    system = TEMPLATES["chat:llama"].system_prompt
    expected = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, *question],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert tokenizer.decode(rendered.prompt_ids) == expected
    # the full sequence is the chat template's rendering of the conversation with the answer
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": system}, *question, {"role": "assistant", "content": "5"}],
        tokenize=False,
    )
    assert full.startswith(tokenizer.decode(rendered.input_ids))


def test_prompt_mode_without_an_end_token_ends_with_eos(tokenizer: Any) -> None:
    question = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = render_example(question, "5", TEMPLATES["text:vanilla"], tokenizer)
    assert tokenizer.decode(rendered.prompt_ids) == "Question: What is 2 + 3?\nAnswer:"
    assert tokenizer.decode(rendered.answer_ids) == " 5" + tokenizer.eos_token


# --- batches ----------------------------------------------------------------------------------


def test_batches_are_a_function_of_seed_and_step() -> None:
    assert total_steps(10, 4, 1.0, None) == 3 and total_steps(10, 4, 2.0, None) == 6
    assert total_steps(10, 4, 1.0, 7) == 7
    epoch = [i for step in range(3) for i in batch_indices(step, 10, 4, seed=0)]
    assert sorted(epoch) == list(range(10))
    assert batch_indices(4, 10, 4, seed=0) == batch_indices(4, 10, 4, seed=0)
    assert learning_rate(0, 1.0, 2, 10, "linear") == 0.5
    assert learning_rate(2, 1.0, 2, 10, "linear") == 1.0
    assert learning_rate(9, 1.0, 0, 10, "constant") == 1.0


def test_micro_batches_give_the_gradients_of_one_pass(
    tiny_pair: tuple[Path, Path], tokenizer: Any
) -> None:
    """--micro-batch-size accumulates per-token losses over the whole step's count: the same
    gradients as one padded pass over the batch (dropout off, so both see the same model)."""
    from peft import LoraConfig, get_peft_model

    template = TEMPLATES["chat:llama"]
    batch = [
        render_example(
            ({"role": "user", "content": row["question"]},),
            row["answer"] * (1 + i % 3),
            template,
            tokenizer,
            Policy(),
            "messages",
        )
        for i, row in enumerate(QA[:4])
    ]
    assert len({len(e.input_ids) for e in batch}) > 1  # padding matters in the single pass
    torch.manual_seed(0)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_pair[0]), lora)
    for layer in model.modules():  # a LoRA B of zeros has no gradient on A: make both live
        if hasattr(layer, "lora_B"):
            torch.nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    model.eval()
    grads = []
    for micro in (4, 1, 3):
        loss, tokens = backward(model, batch, micro, tokenizer.pad_token_id or 0, "cpu")
        grads.append(
            (loss, tokens, [p.grad.clone() for p in model.parameters() if p.requires_grad])
        )
        model.zero_grad(set_to_none=True)
    (loss, tokens, whole), *parts = grads
    assert tokens == sum(len(e.input_ids) for e in batch)
    for part_loss, part_tokens, part in parts:
        assert part_loss == pytest.approx(loss, rel=1e-5) and part_tokens == tokens
        for a, b in zip(whole, part, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# --- merges on tiny models --------------------------------------------------------------------


def tiny_model(folder: Path, smollm2: Path, seed: int, hidden: int = 32) -> Path:
    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(smollm2)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(smollm2 / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return tiny_model(root / "a", smollm2, 0), tiny_model(root / "b", smollm2, 1)


@pytest.mark.parametrize("weight", [0.0, 0.5, 1.0])
def test_linear_merge_is_the_weighted_sum(
    tiny_pair: tuple[Path, Path], tmp_path: Path, weight: float
) -> None:
    a_dir, b_dir = tiny_pair
    out = tmp_path / "merged"
    code = main(
        [
            *("merge", "--base", str(a_dir), "--finetuned", str(b_dir)),
            *("--method", "linear", "--weight", str(weight), "--out", str(out)),
        ]
    )
    assert code == 0
    a, b, merged = (load_file(d / "model.safetensors") for d in (a_dir, b_dir, out))
    assert set(merged) == set(a)
    for name, tensor in merged.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, (1 - weight) * a[name] + weight * b[name])
        if weight == 0.0:
            assert torch.equal(tensor, a[name])
        if weight == 1.0:
            assert torch.equal(tensor, b[name])
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).is_file(), name
    assert (out / "chat_template.jinja").read_bytes() == (
        a_dir / "chat_template.jinja"
    ).read_bytes()
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def test_slerp_ends_are_the_inputs(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    a_dir, b_dir = tiny_pair
    a = load_file(a_dir / "model.safetensors")
    out = merge(a_dir, [b_dir], tmp_path / "s0", method="slerp", weight=0.0)
    for name, tensor in load_file(out / "model.safetensors").items():
        torch.testing.assert_close(tensor, a[name])


def test_mismatched_shapes_fail_before_writing(
    tiny_pair: tuple[Path, Path], tmp_path: Path, smollm2: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a_dir, _ = tiny_pair
    wide = tiny_model(tmp_path / "wide", smollm2, 2, hidden=64)
    out = tmp_path / "merged"
    code = main(
        [
            *("merge", "--base", str(a_dir), "--finetuned", str(wide)),
            *("--weight", "0.5", "--out", str(out)),
        ]
    )
    assert code == 2
    assert "different sizes" in capsys.readouterr().err
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["wide"]  # no temporary folder left either


def test_method_arguments_are_checked() -> None:
    with pytest.raises(MergeError, match="two or more"):
        merge(Path("a"), [Path("b")], Path("o"), method="model_stock")
    with pytest.raises(MergeError, match="--weight is required"):
        merge(Path("a"), [Path("b")], Path("o"), method="linear")
    config = merge_config("ties", Path("/a"), [Path("/b")], 0.4, density=0.3)
    assert config["models"] == [
        {"model": {"model": {"path": "/b"}}, "parameters": {"weight": 0.4, "density": 0.3}}
    ]
    assert config["parameters"] == {"normalize": False}


def test_lora_is_merged_into_the_base_first(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    import peft

    a_dir, _ = tiny_pair
    torch.manual_seed(3)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(a_dir),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    model.save_pretrained(tmp_path / "adapter")
    full = model.merge_and_unload().state_dict()
    base = load_file(a_dir / "model.safetensors")
    out = merge(
        a_dir, [], tmp_path / "merged", method="linear", weight=0.5, lora=tmp_path / "adapter"
    )
    merged = load_file(out / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(full[name], base[name])
    for key, tensor in merged.items():
        torch.testing.assert_close(tensor, 0.5 * base[key] + 0.5 * full[key], atol=1e-6, rtol=1e-5)


def test_an_adapter_for_another_model_fails_before_writing(
    tiny_pair: tuple[Path, Path], tmp_path: Path, smollm2: Path
) -> None:
    import peft

    a_dir, _ = tiny_pair
    wide = tiny_model(tmp_path / "wide", smollm2, 2, hidden=64)
    peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(wide),
        peft.LoraConfig(r=4, target_modules=["q_proj"]),
    ).save_pretrained(tmp_path / "adapter")
    with pytest.raises(MergeError, match="made for another model"):
        merge(a_dir, [], tmp_path / "merged", weight=0.5, lora=tmp_path / "adapter")
    assert not (tmp_path / "merged").exists()


# --- a short real LoRA run on SmolLM2 -----------------------------------------------------------


def test_tune_resume_and_merge_into(smollm2: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out, merged = tmp_path / "adapter", tmp_path / "merged"
    common = [
        *("tune", "--model", str(smollm2), "--data", str(data), "--template", "chat:vanilla"),
        *("--out", str(out), "--limit", "6", "--batch-size", "2", "--lora-r", "4"),
        *("--targets", "attention", "--quiet"),
    ]
    assert main([*common, "--max-steps", "2"]) == 0
    for name in ("adapter_config.json", "adapter_model.safetensors", MANIFEST_NAME):
        assert (out / name).is_file(), name
    first = read_manifest(out)
    assert first is not None and first.status == "complete" and first.steps == 2
    assert first.template == "chat:vanilla" and first.mode == "messages"
    assert first.data.rows == 8 and first.data.used == 6 and first.seed == 0
    assert [step for step, _ in first.loss_curve] == [1, 2] and first.tokens_seen > 0
    assert len(first.step_seconds) == 2 and sum(first.step_tokens) == first.tokens_seen
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert sorted(adapter_config["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert_vllm_loads_adapter(out)

    assert main([*common, "--max-steps", "2"]) == 2  # refuses to overwrite without --resume
    assert main([*common, "--max-steps", "3", "--resume", "--merge-into", str(merged)]) == 0
    resumed = read_manifest(out)
    assert resumed is not None and resumed.steps == 3 and resumed.status == "complete"
    assert resumed.loss_curve[:2] == first.loss_curve and resumed.started == first.started

    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (merged / name).is_file(), name
    assert (merged / "chat_template.jinja").read_bytes() == (
        smollm2 / "chat_template.jinja"
    ).read_bytes()
    merged_manifest = read_manifest(merged)
    assert merged_manifest is not None and merged_manifest.template == "chat:vanilla"
    model = AutoModelForCausalLM.from_pretrained(merged)
    assert model.config.model_type == "llama"


def assert_vllm_loads_adapter(adapter: Path) -> None:
    """vLLM's own adapter loader (what `ptst backend --lora` runs) accepts the folder as is."""
    pytest.importorskip("vllm")
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(adapter), None)
    assert helper._validate_features() == []
    modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    lora = LoRAModel.from_local_checkpoint(
        str(adapter), modules, helper, device="cpu", dtype=torch.float32
    )
    assert "model.layers.0.self_attn.q_proj" in lora.loras


def test_ctrl_c_leaves_a_usable_checkpoint(tiny_pair: tuple[Path, Path], tmp_path: Path) -> None:
    """SIGINT: the running step finishes, a checkpoint is written, exit 130; --resume goes on."""
    import signal
    import subprocess
    import sys
    import time

    data = write_jsonl(tmp_path / "qa.jsonl", QA)
    out = tmp_path / "adapter"
    argv = [
        *(sys.executable, "-m", "ptst", "tune", "--model", str(tiny_pair[0])),
        *("--data", str(data), "--template", "chat:vanilla", "--out", str(out)),
        *("--batch-size", "2", "--lora-r", "2", "--save-every", "1", "--quiet"),
        "--gradient-checkpointing",
    ]
    child = subprocess.Popen([*argv, "--max-steps", "100000"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while read_manifest(out) is None and time.monotonic() < deadline:
            time.sleep(0.2)
        child.send_signal(signal.SIGINT)
        code = child.wait(timeout=60)
    finally:
        child.kill()
    assert code == 130
    stopped = read_manifest(out)
    assert stopped is not None and stopped.status == "interrupted" and stopped.steps >= 1
    assert (out / "adapter_model.safetensors").is_file()
    assert not [p for p in out.iterdir() if p.name.startswith(".checkpoint.")]
    more = stopped.steps + 1
    done = subprocess.run([*argv, "--max-steps", str(more), "--resume"], check=False, timeout=120)
    assert done.returncode == 0
    resumed = read_manifest(out)
    assert resumed is not None and resumed.status == "complete" and resumed.steps == more
