"""`ptst up`: vLLM with a model, and the proxy in front of it with one enforced route.

With no arguments it serves the demo model (SmolLM2-135M-Instruct) as route `demo` with the
`chat:llama` template; `--model DIR` serves your own checkpoint instead.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ptst.engine.backend import (
    Backend,
    BackendError,
    add_backend_arguments,
    config_from_args,
)
from ptst.engine.demo_model import DemoModelError, ensure_model
from ptst.engine.process import terminate_on_signals
from ptst.proxy.config import build_config, write_config
from ptst.proxy.templates import builtin_templates_dir

EXAMPLE = """\
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key="{key}")
reply = client.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "Hi!"}}])
print(reply.choices[0].message.content)
# every request is served with the {template!r} template enforced"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_backend_arguments(parser, model_required=False)
    parser.set_defaults(port=8000)
    parser.add_argument(
        "--proxy-host", default="127.0.0.1", help="the proxy's address (default: loopback)"
    )
    parser.add_argument(
        "--proxy-port", type=int, default=8080, help="the proxy's port (default: 8080)"
    )
    parser.add_argument("--route", default="demo", help="the model name clients send")
    parser.add_argument(
        "--template",
        default="chat:llama",
        help="the template the route enforces (default: chat:llama)",
    )
    parser.add_argument(
        "--trained-with", default=None, help="the template the checkpoint was fine-tuned with"
    )
    parser.add_argument(
        "--templates-dir",
        type=Path,
        default=None,
        help="templates folder (default: the shipped ones)",
    )
    parser.add_argument(
        "--state-dir", type=Path, default=Path("ptst-logs"), help="config and refusal log"
    )


def write_up_config(
    args: argparse.Namespace, backend_url: str, upstream_model: str, model_dir: Path | None = None
) -> Path:
    route: dict[str, object] = {
        "model": args.route,
        "upstream": backend_url,
        "upstream_model": upstream_model,
        "template": args.template,
    }
    if args.trained_with:
        route["trained_with"] = args.trained_with
    if model_dir is not None and model_dir.is_dir():  # the model's own special tokens too
        route["tokenizer"] = str(model_dir.resolve())
    config = build_config(
        [route],
        host=args.proxy_host,
        port=args.proxy_port,
        log_dir=args.state_dir,
        templates_dir=args.templates_dir or builtin_templates_dir(),
    )
    return write_config(args.state_dir / "ptst-up.yaml", config)


def run(args: argparse.Namespace) -> int:
    try:
        model = args.model or ensure_model()
    except DemoModelError as exc:
        print(f"ptst up: cannot prepare the demo model: {exc}", file=sys.stderr)
        return 1
    served = args.served_model_name or (model.name if args.model else "smollm2")
    args.served_model_name = served
    backend = Backend(config_from_args(args, model))
    proxy: subprocess.Popen[bytes] | None = None
    with terminate_on_signals():
        try:
            print(
                f"[ptst] starting vLLM on {backend.cfg.base_url} with {model} (this takes a minute or two)",
                file=sys.stderr,
            )
            backend.start()
            backend.wait_ready()
            config = write_up_config(args, backend.cfg.base_url, served, Path(model))
            proxy = subprocess.Popen(
                [sys.executable, "-m", "ptst", "serve", "--config", str(config)]
            )
            base = f"http://{args.proxy_host}:{args.proxy_port}/v1"
            wait_for_proxy(base, proxy)
            key = (os.environ.get("PTST_API_KEYS") or "none").split(",")[0]
            print(
                f"\nptst-proxy is up: {base}  (model {args.route!r}, template {args.template!r}; "
                f"config {config})\n",
                flush=True,
            )
            print(
                EXAMPLE.format(base=base, key=key, model=args.route, template=args.template),
                flush=True,
            )
            print("\nCtrl-C stops both.", flush=True)
            return proxy.wait()
        except BackendError as exc:
            exc.report("ptst up")
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            if proxy is not None and proxy.poll() is None:
                proxy.terminate()
                proxy.wait(timeout=30)
            backend.stop()


def wait_for_proxy(base: str, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BackendError(f"the proxy exited with code {proc.returncode} (see its log above)")
        try:
            httpx.get(f"{base}/models", timeout=1.0)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise BackendError(f"the proxy did not answer on {base} within {timeout:.0f} s")
