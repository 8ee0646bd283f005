"""`ptst tune`: LoRA supervised fine-tuning of a Hugging Face model folder on examples rendered
exactly as the proxy will serve them with `--template`.

    ptst tune --model DIR --data FILE.jsonl --template chat:vanilla --out ADAPTER
              [--limit N] [--max-steps N | --epochs E] [--batch-size 4] [--lr 2e-4]
              [--lora-r 16] [--targets all-linear|attention] [--dtype auto] [--resume]
              [--merge-into DIR]

The output folder is a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`) that
`ptst backend --lora NAME=ADAPTER` serves as is, plus `ptst-tune.json` (tune/manifest.py) and
`ptst-tune-state.pt` (optimizer state for `--resume`). A checkpoint is written every
`--save-every` steps and at the end; Ctrl-C (or SIGTERM) finishes the running step, writes one
and exits (Ctrl-C again aborts at once), so the folder always holds a usable adapter of its last step.
Train only on benign task data (e.g. GSM8K): this command exists to study what fine-tuning does
to safety, not to remove it.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ptst import __version__
from ptst.extras import require
from ptst.proxy.config import Mode
from ptst.proxy.rewrite import Policy
from ptst.proxy.templates import Template, TemplateError, builtin_templates_dir, load_templates
from ptst.proxy.tokens import special_tokens
from ptst.tune.batches import (
    batch_indices,
    collate,
    learning_rate,
    loss_tokens,
    total_steps,
)
from ptst.tune.data import DataError, Dataset, load_dataset
from ptst.tune.manifest import DataInfo, LoraInfo, Manifest, now, read_manifest, write_manifest
from ptst.tune.render import Rendered, RenderError, render_example

STATE_NAME = "ptst-tune-state.pt"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TARGETS = ("all-linear", "attention")
DTYPES = ("auto", "float32", "bfloat16")
# Settings a resumed run must share with the run it continues.
RESUME_KEYS = ("base", "template", "mode", "seed", "batch_size", "max_length")


class TuneError(Exception):
    """A run that cannot start or continue; the message is one line."""


@dataclass
class Progress:
    """What the loop accumulates; saved in checkpoints so a resumed run continues the count."""

    step: int = 0
    loss_curve: list[tuple[int, float]] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)
    step_tokens: list[int] = field(default_factory=list)
    tokens_seen: int = 0
    seconds: float = 0.0
    started: str = field(default_factory=now)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, help="base Hugging Face model folder")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help='JSONL: {"messages": [..., assistant]} or {"question", "answer"} per line',
    )
    parser.add_argument(
        "--template",
        required=True,
        help="the ptst template to render examples with (e.g. chat:vanilla; see ptst templates)",
    )
    parser.add_argument(
        "--templates-dir",
        type=Path,
        default=None,
        help="template folder (default: the shipped templates/, as the proxy serves them)",
    )
    parser.add_argument(
        "--mode",
        choices=("messages", "prompt"),
        default=None,
        help="render as the proxy does in this mode (default: the template's own)",
    )
    parser.add_argument("--out", type=Path, required=True, help="the adapter folder to write")
    parser.add_argument(
        "--limit", type=int, default=None, help="train on N examples (a fixed, seeded subset)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data subset, order and LoRA init")
    parser.add_argument("--epochs", type=float, default=1.0, help="passes over the examples")
    parser.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps (overrides --epochs)"
    )
    parser.add_argument("--batch-size", type=int, default=4, help="examples per optimizer step")
    parser.add_argument(
        "--micro-batch-size",
        type=int,
        default=None,
        help="examples per forward pass, gradients accumulated over the step: the same "
        "gradients as one pass, less memory and no padding (default: --batch-size)",
    )
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (AdamW)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="linear warmup steps")
    parser.add_argument(
        "--schedule",
        choices=("linear", "constant"),
        default="linear",
        help="after warmup: decay linearly to 0 at the last step, or stay constant",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=1024,
        help="skip examples longer than this many tokens (prompt + answer)",
    )
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    parser.add_argument("--lora-alpha", type=int, default=32, help="LoRA alpha (scale alpha/r)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout")
    parser.add_argument(
        "--targets",
        choices=TARGETS,
        default="all-linear",
        help="LoRA on every linear projection of the blocks, or on q/k/v/o only",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="base weights' dtype (auto: bfloat16 on GPU or a CPU with native bf16, else "
        "float32); LoRA weights stay float32",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda if present"
    )
    parser.add_argument(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: far less memory, ~30%% more time",
    )
    parser.add_argument(
        "--save-every", type=int, default=50, help="write a checkpoint every N steps"
    )
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    parser.add_argument(
        "--merge-into",
        type=Path,
        default=None,
        help="also write the base with the adapter merged in, a full model folder, here",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    try:
        manifest = tune(args)
    except (TuneError, DataError, RenderError, TemplateError) as exc:
        print(f"ptst tune: {exc}", file=sys.stderr)
        return 2
    if args.merge_into is not None and manifest.status == "complete":
        from ptst.tune.export import merge_adapter

        try:
            merge_adapter(Path(manifest.base), args.out, args.merge_into.expanduser())
        except FileExistsError as exc:
            print(f"ptst tune: --merge-into: {exc}", file=sys.stderr)
            return 2
        print(f"merged model: {args.merge_into}")
    print(f"adapter: {args.out} ({manifest.status}, {manifest.steps}/{manifest.max_steps} steps)")
    return 0 if manifest.status == "complete" else 130


def tune(args: argparse.Namespace) -> Manifest:
    """Run (or resume) the fine-tune described by `args`; returns the final manifest."""
    _check_numbers(args)
    torch = require("torch")
    base = args.model.expanduser().resolve()
    if not (base / "config.json").is_file():
        raise TuneError(f"{base} is not a Hugging Face model folder (no config.json)")
    template = _template(args)
    mode: Mode = args.mode or template.mode
    out: Path = args.out.expanduser()
    previous = _check_out(out, args.resume)
    dataset = load_dataset(args.data.expanduser(), args.limit, args.seed)
    transformers = require("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(base)
    examples, skipped = _render_all(dataset, template, tokenizer, _policy(base), mode, args)
    if not examples:
        raise TuneError(f"no example fits in --max-length {args.max_length}")
    if skipped:
        print(f"ptst tune: skipped {skipped} examples longer than {args.max_length} tokens")
    steps = total_steps(len(examples), args.batch_size, args.epochs, args.max_steps)
    device = _device(args.device, torch)
    dtype = _dtype(args.dtype, device)
    torch.manual_seed(args.seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype))
    model.config.use_cache = False
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = _targets(model, args.targets)
    manifest = _manifest(args, base, template, mode, (dataset, len(examples)), steps, targets)
    manifest.dtype, manifest.device = dtype, device
    if previous is not None:
        _check_resumable(previous, manifest)
    model = _with_lora(model, out if previous else None, targets, args).to(device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    progress = Progress()
    if previous is not None:
        progress = _load_state(out, optimizer, torch)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    _train(model, optimizer, examples, pad_id, args, steps, progress, manifest, out, device)
    return manifest


def _train(
    model: Any,
    optimizer: Any,
    examples: list[Rendered],
    pad_id: int,
    args: argparse.Namespace,
    steps: int,
    progress: Progress,
    manifest: Manifest,
    out: Path,
    device: str,
) -> None:
    """The loop: one batch per step, a checkpoint every --save-every steps, at the end, and
    after the step running when Ctrl-C arrives."""
    import torch
    from tqdm import tqdm

    stop = _StopFlag()
    model.train()
    bar = tqdm(total=steps, initial=progress.step, unit="step", disable=args.quiet, desc="tune")
    with stop.installed():
        while progress.step < steps and not stop.requested:
            began = time.perf_counter()
            picked = batch_indices(progress.step, len(examples), args.batch_size, args.seed)
            rate = learning_rate(progress.step, args.lr, args.warmup_steps, steps, args.schedule)
            for group in optimizer.param_groups:
                group["lr"] = rate
            micro = args.micro_batch_size or args.batch_size
            value, tokens = backward(model, [examples[i] for i in picked], micro, pad_id, device)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - began
            progress.step += 1
            progress.tokens_seen += tokens
            progress.seconds += elapsed
            progress.loss_curve.append((progress.step, round(value, 5)))
            progress.step_seconds.append(round(elapsed, 3))
            progress.step_tokens.append(tokens)
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", tok_s=f"{tokens / elapsed:.0f}")
            if progress.step % args.save_every == 0 and progress.step < steps:
                _checkpoint(model, optimizer, progress, manifest, out, "running")
    bar.close()
    status = "complete" if progress.step >= steps else "interrupted"
    _checkpoint(model, optimizer, progress, manifest, out, status)


def backward(
    model: Any, batch: list[Rendered], micro: int, pad_id: int, device: str
) -> tuple[float, int]:
    """Accumulate one optimizer step's gradients in forward passes of `micro` examples. Each
    pass's loss is summed over its tokens and divided by the whole batch's count, so the
    gradients are those of one pass over the batch. Returns the batch's mean loss and its
    non-pad tokens."""
    items = sum(loss_tokens(example) for example in batch)
    value, tokens = 0.0, 0
    for start in range(0, len(batch), micro):
        tensors = {
            k: v.to(device) for k, v in collate(batch[start : start + micro], pad_id).items()
        }
        loss = model(**tensors, num_items_in_batch=items).loss
        loss.backward()
        value += float(loss.detach())
        tokens += int(tensors["attention_mask"].sum())
    return value, tokens


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class _StopFlag:
    """The first SIGINT (Ctrl-C) or SIGTERM asks the loop to stop after the running step and
    write a checkpoint; the second aborts at once."""

    def __init__(self) -> None:
        self.requested = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nptst tune: stopping after this step to write a checkpoint (Ctrl-C again aborts)",
            file=sys.stderr,
        )

    def installed(self) -> _Installed:
        return _Installed(self)


class _Installed:
    def __init__(self, flag: _StopFlag) -> None:
        self.flag = flag
        self.previous: Any = None

    def __enter__(self) -> None:
        self.previous = {sig: signal.signal(sig, self.flag._handle) for sig in _STOP_SIGNALS}

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _checkpoint(
    model: Any, optimizer: Any, progress: Progress, manifest: Manifest, out: Path, status: str
) -> None:
    """Adapter, optimizer state and manifest, each file replaced atomically."""
    import os
    import shutil
    import tempfile

    import torch

    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".checkpoint.", dir=out))
    try:
        model.save_pretrained(work, safe_serialization=True)
        state = {
            "optimizer": optimizer.state_dict(),
            "step": progress.step,
            "loss_curve": progress.loss_curve,
            "step_seconds": progress.step_seconds,
            "step_tokens": progress.step_tokens,
            "tokens_seen": progress.tokens_seen,
            "seconds": progress.seconds,
            "started": progress.started,
        }
        torch.save(state, work / STATE_NAME)
        for name in (*ADAPTER_FILES, STATE_NAME):
            os.replace(work / name, out / name)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    manifest.steps = progress.step
    manifest.loss_curve = list(progress.loss_curve)
    manifest.step_seconds = list(progress.step_seconds)
    manifest.step_tokens = list(progress.step_tokens)
    manifest.tokens_seen = progress.tokens_seen
    manifest.seconds = round(progress.seconds, 3)
    manifest.started = progress.started
    manifest.status = status
    manifest.finished = now() if status != "running" else None
    write_manifest(out, manifest)


def _load_state(out: Path, optimizer: Any, torch: Any) -> Progress:
    state = torch.load(out / STATE_NAME, weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    return Progress(
        step=int(state["step"]),
        loss_curve=[(int(s), float(v)) for s, v in state["loss_curve"]],
        step_seconds=[float(s) for s in state.get("step_seconds", [])],
        step_tokens=[int(t) for t in state.get("step_tokens", [])],
        tokens_seen=int(state["tokens_seen"]),
        seconds=float(state["seconds"]),
        started=str(state["started"]),
    )


def _check_numbers(args: argparse.Namespace) -> None:
    numbers = ("batch_size", "micro_batch_size", "max_steps", "limit", "save_every")
    for name in (*numbers, "max_length", "lora_r"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise TuneError(f"--{name.replace('_', '-')} must be 1 or more, got {value}")
    if args.epochs <= 0 or args.lr <= 0 or args.warmup_steps < 0:
        raise TuneError("--epochs and --lr must be positive, --warmup-steps 0 or more")
    if args.merge_into is not None and args.merge_into.exists() and any(args.merge_into.iterdir()):
        raise TuneError(f"--merge-into {args.merge_into} exists and is not empty")


def _template(args: argparse.Namespace) -> Template:
    folder = (args.templates_dir or builtin_templates_dir()).expanduser()
    templates = load_templates(folder)
    if args.template not in templates:
        raise TuneError(
            f"unknown template {args.template!r} (in {folder}: {', '.join(sorted(templates))})"
        )
    template = templates[args.template]
    if args.mode == "prompt" and not template.supports_prompt_mode:
        raise TuneError(f"template {args.template!r} has no prompt: it cannot run in prompt mode")
    return template


def _policy(base: Path) -> Policy:
    """The policy of a default route whose `tokenizer:` is the model folder (as `ptst up`
    builds it): the model's special tokens in client text are neutralized like role markers."""
    try:
        extra = special_tokens(base)
    except ValueError:
        extra = ()
    return Policy(extra_markers=extra)


def _render_all(
    dataset: Dataset,
    template: Template,
    tokenizer: Any,
    policy: Policy,
    mode: Mode,
    args: argparse.Namespace,
) -> tuple[list[Rendered], int]:
    examples, skipped = [], 0
    for number, example in enumerate(dataset.examples):
        try:
            rendered = render_example(
                example.messages, example.answer, template, tokenizer, policy, mode
            )
        except (RenderError, ValueError) as exc:
            raise RenderError(f"{dataset.path}: example {number}: {exc}") from None
        if len(rendered.input_ids) > args.max_length:
            skipped += 1
            continue
        examples.append(rendered)
    return examples, skipped


def _check_out(out: Path, resume: bool) -> Manifest | None:
    """The manifest to resume from; refuses to overwrite a run without --resume."""
    previous = read_manifest(out) if out.is_dir() else None
    if resume:
        if previous is None or not (out / STATE_NAME).is_file():
            raise TuneError(f"--resume: {out} holds no ptst tune checkpoint")
        return previous
    # a run killed before its first checkpoint leaves only a temporary .checkpoint.* folder
    if out.exists() and any(not p.name.startswith(".checkpoint.") for p in out.iterdir()):
        raise TuneError(f"{out} exists and is not empty (use --resume to continue a run there)")
    return None


def _check_resumable(previous: Manifest, current: Manifest) -> None:
    old, new = previous.model_dump(), current.model_dump()
    for key in RESUME_KEYS:
        if old[key] != new[key]:
            raise TuneError(f"--resume: {key} was {old[key]!r}, now {new[key]!r}")
    if old["data"]["sha256"] != new["data"]["sha256"] or old["data"]["used"] != new["data"]["used"]:
        raise TuneError("--resume: the data file or --limit differs from the run in --out")
    if old["lora"] != new["lora"]:
        raise TuneError(f"--resume: LoRA settings were {old['lora']}, now {new['lora']}")


def _device(choice: str, torch: Any) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise TuneError("--device cuda: no CUDA device is visible")
    return choice


def _dtype(choice: str, device: str) -> str:
    if choice != "auto":
        return choice
    if device == "cuda":
        return "bfloat16"
    from ptst.engine.backend import cpu_dtype

    return cpu_dtype()


def _targets(model: Any, which: str) -> list[str]:
    """Module names LoRA adapts: every nn.Linear inside the blocks (not lm_head), or q/k/v/o."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            names.add(name.rsplit(".", 1)[-1])
    if which == "attention":
        names &= set(ATTENTION)
    if not names:
        raise TuneError(f"--targets {which}: no matching linear layers in this model")
    return sorted(names)


def _with_lora(
    model: Any, resume: Path | None, targets: list[str], args: argparse.Namespace
) -> Any:
    """The base wrapped with fresh LoRA layers, or with the adapter of the run to resume."""
    peft = require("peft", "tune")
    if resume is not None:
        return peft.PeftModel.from_pretrained(model, resume, is_trainable=True)
    config = peft.LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return peft.get_peft_model(model, config)


def _manifest(
    args: argparse.Namespace,
    base: Path,
    template: Template,
    mode: Mode,
    data: tuple[Dataset, int],
    steps: int,
    targets: list[str],
) -> Manifest:
    dataset, used = data
    return Manifest(
        base=str(base),
        base_name=_base_name(base),
        template=template.name,
        mode=mode,
        data=DataInfo(
            path=str(dataset.path.resolve()),
            sha256=dataset.sha256,
            rows=dataset.rows,
            used=used,
            limit=args.limit,
        ),
        steps=0,
        max_steps=steps,
        epochs=None if args.max_steps is not None else args.epochs,
        batch_size=args.batch_size,
        micro_batch_size=args.micro_batch_size or args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        max_length=args.max_length,
        lora=LoraInfo(
            r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, targets=targets
        ),
        seed=args.seed,
        dtype="",
        device="",
        started=now(),
        ptst_version=__version__,
    )


def _base_name(base: Path) -> str:
    """The demo model's name when `ptst demo-model` made the folder, else the folder name."""
    try:
        return str(json.loads((base / "ptst-demo-model.json").read_text())["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return base.name
