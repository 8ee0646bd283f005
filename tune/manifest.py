"""The manifest of a fine-tune: `ptst-tune.json` inside the adapter folder (and copied into a
merged model folder), saying what the weights were trained on and how.

Why: PTST's guard needs to know the template a checkpoint was trained with (`trained_with` in
a route), and a bench result is only meaningful next to its run's settings. The proxy config
builder and the bench call `read_manifest(folder)` and use `manifest.template`.

Plain JSON through pydantic; no torch or transformers import, so the proxy can read it.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MANIFEST_NAME = "ptst-tune.json"


class ManifestError(ValueError):
    """A manifest file that exists but cannot be read; the message names the file."""


class DataInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    path: str
    sha256: str
    rows: int = Field(description="lines in the file")
    used: int = Field(description="examples trained on (the seeded --limit subset or all)")
    limit: int | None = None


class LoraInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    r: int
    alpha: int
    dropout: float
    targets: list[str]


class Manifest(BaseModel):
    """What `ptst tune` trained. `status` is "running" while checkpoints are written,
    "interrupted" after Ctrl-C, "complete" at the end."""

    model_config = ConfigDict(extra="allow")

    base: str = Field(description="the base model folder, absolute")
    base_name: str = Field(description="the base model's name (demo-model name or folder name)")
    template: str = Field(description="the ptst template the examples were rendered with")
    mode: str = Field(description="messages or prompt: how the template was applied")
    data: DataInfo
    steps: int = Field(description="optimizer steps completed")
    max_steps: int = Field(description="steps the run was asked for (from epochs or max_steps)")
    epochs: float | None = None
    batch_size: int
    micro_batch_size: int | None = Field(
        default=None, description="examples per forward pass (gradients accumulated per step)"
    )
    lr: float
    warmup_steps: int = 0
    max_length: int
    lora: LoraInfo
    seed: int
    dtype: str
    device: str
    loss_curve: list[tuple[int, float]] = Field(default_factory=list, description="[step, loss]")
    step_seconds: list[float] = Field(default_factory=list, description="wall time per step")
    step_tokens: list[int] = Field(default_factory=list, description="non-pad tokens per step")
    tokens_seen: int = 0
    seconds: float = 0.0
    started: str
    finished: str | None = None
    status: str = "running"
    ptst_version: str


def now() -> str:
    """The current time as ISO 8601 UTC, to the second."""
    return datetime.now(UTC).replace(microsecond=0).isoformat()


def manifest_path(path: Path) -> Path:
    """`path` itself if it is a file, else the manifest inside the folder `path`."""
    return path if path.suffix == ".json" else path / MANIFEST_NAME


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """Write `folder/ptst-tune.json` atomically (a reader never sees half a file)."""
    path = folder / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(path: Path) -> Manifest | None:
    """The manifest of an adapter or merged-model folder (or of the file itself); None when
    there is none. Raises ManifestError when the file exists but is not a valid manifest."""
    file = manifest_path(Path(path).expanduser())
    if not file.is_file():
        return None
    try:
        return Manifest.model_validate_json(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{file}: cannot read: {exc}") from None
    except ValidationError as exc:
        raise ManifestError(f"{file}: not a ptst-tune manifest: {exc}") from None
