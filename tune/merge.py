"""`ptst merge`: merge a fine-tune (or a LoRA adapter) with its aligned base on MergeKit.

    ptst merge --base DIR --finetuned DIR --weight 0.5 --method linear --out DIR
    ptst merge --base DIR --lora ADAPTER --weight 0.5 --method slerp --out DIR

Why: pre/post-tuning merging (Farn et al. 2024) keeps most of a fine-tune's task gain while
restoring much of the base's safety; λ (`--weight`) is the fine-tune's share. The tensor work is
MergeKit's (its library API, `mergekit.merge.run_merge`); this module only builds its config,
checks the inputs first and writes the result atomically.

    linear       (1-λ)·base + λ·finetuned (λ/n each for n fine-tunes)
    slerp        spherical interpolation from base (λ=0) to finetuned (λ=1)
    ties         base + λ·TIES(finetuned - base) (trimmed to --density, sign consensus)
    dare_linear  base + λ·DARE(finetuned - base) (random drop to --density, rescaled; --seed)
    model_stock  Model Stock (needs two or more --finetuned; computes its own ratio, no λ)

Mismatched architectures or tensor shapes (and an adapter that does not fit the base) fail
with one clear line before anything is written. The output folder has the merged safetensors,
config.json, and the base's tokenizer, chat template and generation config: vLLM serves it as is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ptst import __version__
from ptst.extras import require
from ptst.tune.export import base_dtype, copy_side_files
from ptst.tune.manifest import MANIFEST_NAME

METHODS = ("linear", "slerp", "ties", "dare_linear", "model_stock")
DTYPES = ("auto", "float32", "bfloat16", "float16")
MERGE_RECORD = "ptst-merge.json"


class MergeError(Exception):
    """Inputs that cannot be merged; the message is one line."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base", type=Path, required=True, help="the aligned base model folder")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--finetuned",
        type=Path,
        action="append",
        help="a fine-tuned model folder of the same architecture (repeat for model_stock)",
    )
    source.add_argument(
        "--lora", type=Path, help="a PEFT adapter folder: merged into --base first, then merged"
    )
    parser.add_argument(
        "--weight",
        type=float,
        default=None,
        help="λ, the fine-tune's share: 0 gives the base, 1 the fine-tune (not for model_stock)",
    )
    parser.add_argument("--method", choices=METHODS, default="linear", help="MergeKit method")
    parser.add_argument(
        "--density",
        type=float,
        default=0.5,
        help="ties and dare_linear: the share of each task vector kept",
    )
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the written weights (auto: the base's); the math runs in float32",
    )
    parser.add_argument("--seed", type=int, default=0, help="dare_linear's random drop")
    parser.add_argument("--out", type=Path, required=True, help="the merged model folder to write")


def run(args: argparse.Namespace) -> int:
    try:
        out = merge(
            args.base,
            args.finetuned or [],
            args.out,
            method=args.method,
            weight=args.weight,
            lora=args.lora,
            density=args.density,
            dtype=None if args.dtype == "auto" else args.dtype,
            seed=args.seed,
        )
    except MergeError as exc:
        print(f"ptst merge: {exc}", file=sys.stderr)
        return 2
    print(f"merged model: {out}")
    return 0


def merge(
    base: Path,
    finetuned: Sequence[Path],
    out: Path,
    *,
    method: str = "linear",
    weight: float | None = None,
    lora: Path | None = None,
    density: float = 0.5,
    dtype: str | None = None,
    seed: int = 0,
) -> Path:
    """Check the inputs, merge with MergeKit into a temporary folder, then move it to `out`."""
    base, out = base.expanduser().resolve(), out.expanduser().resolve()
    finetuned = [f.expanduser().resolve() for f in finetuned]
    lora = lora.expanduser().resolve() if lora is not None else None
    _check_arguments(method, weight, density, len(finetuned) + (lora is not None))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not an empty folder")
    check_compatible(base, finetuned)
    if lora is not None:
        check_adapter(base, lora)
    config = merge_config(
        method, base, finetuned, weight, lora=lora, density=density, dtype=dtype or base_dtype(base)
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _run_mergekit(config, work / "model", work / "lora-cache", seed)
        result = work / "model"
        copy_side_files(base, result)  # byte for byte: the served prompt format is the base's
        source = lora if lora is not None else finetuned[0]
        if (source / MANIFEST_NAME).is_file():
            shutil.copyfile(source / MANIFEST_NAME, result / MANIFEST_NAME)
        record = {"ptst_version": __version__, "mergekit_config": config}
        (result / MERGE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        if out.exists():
            out.rmdir()
        result.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def merge_config(
    method: str,
    base: Path,
    finetuned: Sequence[Path],
    weight: float | None,
    *,
    lora: Path | None = None,
    density: float = 0.5,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The MergeKit configuration (its YAML schema, as a dict) for one of METHODS. Pure."""
    base_ref = {"model": {"path": str(base)}}
    tuned = [{"model": {"path": str(f)}} for f in finetuned]
    if lora is not None:
        tuned = [{"model": {"path": str(base)}, "lora": {"path": str(lora)}}]
    config: dict[str, Any] = {"merge_method": method, "dtype": "float32", "out_dtype": dtype}
    lam = 0.0 if weight is None else float(weight)
    if method == "linear":
        share = lam / len(tuned)
        config["models"] = [
            {"model": base_ref, "parameters": {"weight": 1.0 - lam}},
            *({"model": ref, "parameters": {"weight": share}} for ref in tuned),
        ]
        config["parameters"] = {"normalize": False}
    elif method == "slerp":
        config["base_model"] = base_ref
        config["models"] = [{"model": base_ref}, {"model": tuned[0]}]
        config["parameters"] = {"t": lam}
    elif method in ("ties", "dare_linear"):
        config["base_model"] = base_ref
        config["models"] = [
            {"model": ref, "parameters": {"weight": lam, "density": density}} for ref in tuned
        ]
        config["parameters"] = {"normalize": False}
    elif method == "model_stock":
        config["base_model"] = base_ref
        config["models"] = [{"model": ref} for ref in tuned]
    else:
        raise MergeError(f"unknown method {method!r} (one of {', '.join(METHODS)})")
    return config


def check_compatible(base: Path, finetuned: Sequence[Path]) -> None:
    """Same architecture and the same tensor names and shapes, or MergeError naming the first
    difference (read from config.json and the safetensors headers; no weights loaded)."""
    base_arch, base_shapes = _architecture(base), tensor_shapes(base)
    for other in finetuned:
        arch = _architecture(other)
        if arch != base_arch:
            raise MergeError(f"architectures differ: {base} is {base_arch}, {other} is {arch}")
        shapes = tensor_shapes(other)
        missing = sorted(set(base_shapes) ^ set(shapes))
        if missing:
            raise MergeError(
                f"{other} and {base} hold different tensors (e.g. {missing[0]}): "
                "not the same architecture"
            )
        for name, shape in base_shapes.items():
            if shapes[name] != shape:
                raise MergeError(
                    f"tensor {name} is {list(shape)} in {base} but {list(shapes[name])} in "
                    f"{other}: the models have different sizes"
                )


def check_adapter(base: Path, adapter: Path) -> None:
    """Every LoRA pair in `adapter` must fit a weight of `base`, or MergeError."""
    if not (adapter / "adapter_config.json").is_file():
        raise MergeError(f"{adapter} has no adapter_config.json (not a PEFT adapter folder)")
    base_shapes = tensor_shapes(base)
    for name, shape in tensor_shapes(adapter).items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        module = name.removeprefix("base_model.model.").split(".lora_")[0]
        target = base_shapes.get(f"{module}.weight")
        if target is None or len(target) != 2 or len(shape) != 2:
            raise MergeError(f"adapter tensor {name} has no matching weight in {base}")
        size, expected = (shape[1], target[1]) if ".lora_A." in name else (shape[0], target[0])
        if size != expected:
            raise MergeError(
                f"adapter tensor {name} is {list(shape)} but {module}.weight in {base} is "
                f"{list(target)}: the adapter was made for another model"
            )


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from every *.safetensors file in `folder` (headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise MergeError(f"{folder} has no .safetensors weights")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        for name, info in header.items():
            if name != "__metadata__":
                shapes[name] = tuple(info["shape"])
    return shapes


def _architecture(folder: Path) -> tuple[str, tuple[str, ...]]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise MergeError(f"{folder}: no readable config.json ({exc})") from None
    return str(config.get("model_type")), tuple(config.get("architectures") or ())


def _check_arguments(method: str, weight: float | None, density: float, sources: int) -> None:
    if method == "model_stock":
        if weight is not None:
            raise MergeError("--weight: model_stock computes its own ratio; leave it out")
        if sources < 2:
            raise MergeError("model_stock needs two or more --finetuned models")
        return
    if weight is None:
        raise MergeError(f"--weight is required for {method}")
    if not 0.0 <= weight <= 1.0:
        raise MergeError(f"--weight must be within [0, 1], got {weight}")
    if method == "slerp" and sources != 1:
        raise MergeError("slerp merges the base with exactly one fine-tune")
    if method in ("ties", "dare_linear") and not 0.0 < density <= 1.0:
        raise MergeError(f"--density must be within (0, 1], got {density}")


def _run_mergekit(config: dict[str, Any], out: Path, lora_cache: Path, seed: int) -> None:
    require("mergekit", "tune")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    options = MergeOptions(
        copy_tokenizer=True,
        lora_merge_cache=str(lora_cache),
        lora_merge_dtype="float32",
        random_seed=seed,
        write_model_card=False,
        quiet=True,
    )
    run_merge(MergeConfiguration.model_validate(config), str(out), options)
