"""Write a full model folder that vLLM serves as is: a base with a LoRA adapter merged in.

Used by `ptst tune --merge-into` (serving merged weights avoids vLLM's slow CPU LoRA path).
The merge runs in float32 and the result is saved in the base's own dtype; the tokenizer, chat
template and generation config are copied byte for byte from the base, so the merged model
renders prompts exactly as the base did (the premise of the template experiments).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from ptst.extras import require
from ptst.tune.manifest import MANIFEST_NAME

# Files next to the weights that a server needs to render and stop like the base model.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)


def base_dtype(base: Path) -> str:
    """The dtype the base's config.json declares (`dtype` or `torch_dtype`), else float32."""
    try:
        config = json.loads((base / "config.json").read_text())
    except (OSError, ValueError):
        return "float32"
    value = config.get("dtype") or config.get("torch_dtype") or "float32"
    return str(value)


def copy_side_files(source: Path, target: Path) -> list[str]:
    """Copy the tokenizer, chat template and generation config files `source` has."""
    copied = []
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, target / name)
            copied.append(name)
    return copied


def merge_adapter(base: Path, adapter: Path, out: Path, dtype: str | None = None) -> Path:
    """Merge the PEFT adapter folder `adapter` into `base` and write the full model to `out`.

    Written into a temporary sibling folder first and renamed at the end: `out` either does not
    change or is complete. `out` must not exist or be empty.
    """
    torch = require("torch")
    transformers = require("transformers")
    peft = require("peft", "tune")
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    out.parent.mkdir(parents=True, exist_ok=True)
    target_dtype = getattr(torch, dtype or base_dtype(base))
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
        model = model.to(target_dtype)
        model.save_pretrained(work, safe_serialization=True)
        copy_side_files(base, work)
        if (adapter / MANIFEST_NAME).is_file():
            shutil.copyfile(adapter / MANIFEST_NAME, work / MANIFEST_NAME)
        if out.exists():
            out.rmdir()
        work.rename(out)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return out
