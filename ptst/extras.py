"""Optional dependencies and the extras that bring them, so a missing one is named in one line
(`pip install 'ptst-proxy[bench]'`) instead of a traceback. The `ptst` command turns any
`ModuleNotFoundError` for a module listed here into that line."""

from __future__ import annotations

import importlib
from types import ModuleType

# top-level module -> the extra that installs it
EXTRAS: dict[str, str] = {
    "numpy": "bench",
    "matplotlib": "bench",
    "vllm": "cpu",  # or `gpu` on a CUDA host
    "torch": "cpu",
    "transformers": "demo",
    "gguf": "demo",
    "accelerate": "demo",
    "safetensors": "demo",
    "openai": "dev",
    "peft": "tune",
    "mergekit": "tune",
    "sentence_transformers": "detect",
    "sklearn": "detect",
    "scipy": "detect",
}


class MissingExtra(ModuleNotFoundError):
    """An optional dependency is not installed; the message is one line naming the extra."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(
            f"this needs {module}, which comes with the {extra!r} extra: "
            f"pip install 'ptst-proxy[{extra}]'"
        )
        self.module = module
        self.extra = extra


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The `MissingExtra` for an import that failed on an optional dependency, else None."""
    top = (exc.name or "").partition(".")[0]
    extra = EXTRAS.get(top)
    return MissingExtra(top, extra) if extra is not None else None


def require(module: str, extra: str | None = None) -> ModuleType:
    """Import `module`, or raise `MissingExtra` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        found = missing_extra(exc)
        if found is None and extra is not None:
            found = MissingExtra(module.partition(".")[0], extra)
        if found is None:
            raise
        raise found from exc
