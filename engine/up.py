"""`ptst up`: vLLM with a model, and the proxy in front of it with an enforced route per model.

With no arguments it serves the demo model (SmolLM2-135M-Instruct) as route `demo` with the
`chat:llama` template; `--model DIR` serves your own checkpoint instead. Each `--lora NAME=PATH`
(a PEFT adapter, e.g. from `ptst tune`) gets a route of its own, named NAME, with the template of
`--route-template NAME=TEMPLATE` (default `--template`) and `trained_with` read from the
adapter's `ptst-tune.json`, so the PTST guard applies to each route: an adapter trained with the
template it would be served with is refused before vLLM starts, unless `--allow-same-template`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from ptst.engine.backend import (
    Backend,
    BackendError,
    add_backend_arguments,
    config_from_args,
)
from ptst.engine.demo_model import DemoModelError, ensure_model
from ptst.engine.process import Child, ChildError, terminate_on_signals
from ptst.proxy.config import (
    ConfigError,
    build_config,
    load_settings,
    parse_settings,
    write_config,
)
from ptst.tune.manifest import ManifestError, read_manifest

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
        "--trained-with",
        default=None,
        help="the template --model was fine-tuned with (default: its ptst-tune.json, if any)",
    )
    parser.add_argument(
        "--route-template",
        action="append",
        default=[],
        metavar="NAME=TEMPLATE",
        help="the template of the route of adapter NAME (repeatable; default: --template)",
    )
    parser.add_argument(
        "--allow-same-template",
        action="store_true",
        help="serve a checkpoint with the template it was trained with (what PTST warns against)",
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


def pairs(items: list[str], option: str) -> dict[str, str]:
    """`["a=x", "b=y"]` -> `{"a": "x", "b": "y"}`; a malformed item raises ConfigError."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or not value:
            raise ConfigError(f"{option} {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


def up_routes(
    args: argparse.Namespace, backend_url: str, upstream_model: str, model_dir: Path
) -> list[dict[str, Any]]:
    """The base model's route, then one route per `--lora NAME=PATH` adapter."""
    templates = pairs(args.route_template, "--route-template")
    adapters = pairs(args.lora, "--lora")
    if unknown := sorted(set(templates) - set(adapters) - {args.route}):
        raise ConfigError(f"--route-template names no route: {', '.join(unknown)}")

    def route(name: str, served: str, folder: Path, trained_with: str | None) -> dict[str, Any]:
        manifest = read_manifest(folder) if folder.is_dir() else None
        out: dict[str, Any] = {
            "model": name,
            "upstream": backend_url,
            "upstream_model": served,
            "template": templates.get(name, args.template),
        }
        if trained_with or manifest is not None:
            out["trained_with"] = trained_with or (manifest.template if manifest else None)
        if args.allow_same_template:
            out["allow_same_template"] = True
        if model_dir.is_dir():  # the model's own special tokens too (adapters share them)
            out["tokenizer"] = str(model_dir.resolve())
        return out

    routes = [route(args.route, upstream_model, model_dir, args.trained_with)]
    routes += [route(name, name, Path(path), None) for name, path in adapters.items()]
    return routes


def write_up_config(
    args: argparse.Namespace, backend_url: str, upstream_model: str, model_dir: Path
) -> Path:
    """Build, check (the PTST guard included) and write the proxy's config; ConfigError if bad."""
    config = build_config(
        up_routes(args, backend_url, upstream_model, model_dir),
        host=args.proxy_host,
        port=args.proxy_port,
        log_dir=args.state_dir,
        templates_dir=args.templates_dir,
    )
    parse_settings(config)
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
    try:  # before vLLM's minutes of start-up: a refused route fails now
        config = write_up_config(args, backend.cfg.base_url, served, Path(model))
    except (ConfigError, ManifestError) as exc:
        print(f"ptst up: {exc}", file=sys.stderr)
        return 2
    proxy: Child | None = None
    with terminate_on_signals():
        try:
            print(
                f"[ptst] starting vLLM on {backend.cfg.base_url} with {model} (this takes a minute or two)",
                file=sys.stderr,
            )
            backend.start()
            backend.wait_ready()
            cmd = [sys.executable, "-m", "ptst", "serve", "--config", str(config)]
            proxy = Child("proxy", cmd, echo_prefix="")
            base = f"http://{args.proxy_host}:{args.proxy_port}/v1"
            proxy.wait_http(f"{base}/models", timeout=60)
            key = (os.environ.get("PTST_API_KEYS") or "none").split(",")[0]
            routes = "; ".join(
                f"{r.model!r} with {r.template!r}" for r in load_settings(config).routes
            )
            print(f"\nptst-proxy is up: {base}  (routes {routes}; config {config})\n", flush=True)
            print(
                EXAMPLE.format(base=base, key=key, model=args.route, template=args.template),
                flush=True,
            )
            print("\nCtrl-C stops both.", flush=True)
            return proxy.proc.wait()
        except BackendError as exc:
            exc.report("ptst up")
            return 1
        except ChildError as exc:
            print(f"ptst up: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            if proxy is not None:  # its drain deadline, then time to flush the log
                proxy.stop(timeout=load_settings(config).server.shutdown_timeout_s + 10)
            backend.stop()
