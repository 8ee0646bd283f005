"""`ptst templates`: list, show and render the safe-testing templates.

    ptst templates list [--dir D]
    ptst templates show NAME [--dir D]
    ptst templates render NAME --messages FILE|- [--mode messages|prompt] [--body]
        [--system-policy prepend|replace|reject] [--markers neutralize|reject] [--dir D]

`render` takes a JSON list of chat messages (or a whole chat request with "messages") and
prints what the proxy would send upstream: the rendered prompt in prompt mode, the rewritten
messages as JSON in messages mode, or with --body the whole upstream request body as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, TextIO

import yaml

from ptst.proxy.errors import BadRequest
from ptst.proxy.rewrite import Policy, enforce
from ptst.proxy.templates import Template, TemplateError, builtin_templates_dir, load_templates


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir", type=Path, default=None, help="templates folder (default: the built-in templates)"
    )
    sub = parser.add_subparsers(
        dest="action", metavar="ACTION", required=True, help="list, show or render"
    )
    sub.add_parser("list", parents=[common], help="one line per template")
    show = sub.add_parser("show", parents=[common], help="print one template's file content")
    show.add_argument("name", help="template name, e.g. chat:llama")
    render = sub.add_parser("render", parents=[common], help="what the proxy sends upstream")
    render.add_argument("name", help="template name, e.g. chat:llama")
    render.add_argument(
        "--messages",
        required=True,
        help="JSON file: a list of messages or a chat request; - = stdin",
    )
    render.add_argument(
        "--mode", choices=["messages", "prompt"], default=None, help="default: the template's own"
    )
    render.add_argument(
        "--system-policy",
        choices=["prepend", "replace", "reject"],
        default="prepend",
        help="what a client system message gets (default: prepend)",
    )
    render.add_argument(
        "--markers",
        choices=["neutralize", "reject"],
        default="neutralize",
        help="role markers in client text (default: neutralize)",
    )
    render.add_argument("--body", action="store_true", help="print the whole upstream body as JSON")


def run(args: argparse.Namespace) -> int:
    try:
        templates = load_templates(args.dir or builtin_templates_dir())
        if args.action == "list":
            _list(templates, sys.stdout)
            return 0
        template = _pick(templates, args.name)
        if args.action == "show":
            sys.stdout.write(format_template(template))
            return 0
        body = _read_request(args.messages)
        policy = Policy(system=args.system_policy, markers=args.markers)
        path, upstream = enforce(body, template, policy, args.mode)
    except (TemplateError, ValueError) as exc:
        print(f"ptst templates: error: {exc}", file=sys.stderr)
        return 2
    except BadRequest as exc:
        print(f"ptst templates: request rejected (400, param={exc.param}): {exc}", file=sys.stderr)
        return 1
    if args.body:
        print(json.dumps({"path": path, "body": upstream}, indent=2, ensure_ascii=False))
    elif path == "/completions":
        print(upstream["prompt"])
    else:
        print(json.dumps(upstream["messages"], indent=2, ensure_ascii=False))
    return 0


def format_template(template: Template) -> str:
    """The template as YAML, multi-line strings as literal blocks."""
    header = f"# {template.source}\n" if template.source else ""
    return header + yaml.dump(
        template.model_dump(mode="json"),
        Dumper=_LiteralDumper,
        sort_keys=False,
        allow_unicode=True,
        width=10**6,
    )


def _list(templates: dict[str, Template], out: TextIO) -> None:
    width = max((len(name) for name in templates), default=4)
    for name, template in sorted(templates.items()):
        system = template.system_prompt or "(no system prompt)"
        if len(system) > 60:
            system = system[:57] + "..."
        out.write(f"{name:<{width}}  {template.mode:<8}  {system}\n")


def _pick(templates: dict[str, Template], name: str) -> Template:
    if name not in templates:
        raise TemplateError(f"no template named {name!r}; known: {', '.join(sorted(templates))}")
    return templates[name]


def _read_request(source: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
        data = json.loads(text)
    except OSError as exc:
        raise ValueError(f"{source}: cannot read: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON: {exc}") from None
    if isinstance(data, list):
        return {"messages": data}
    if isinstance(data, dict):
        return data
    raise ValueError(f"{source}: expected a JSON list of messages or a chat request object")


class _LiteralDumper(yaml.SafeDumper):
    pass


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = None
    if "\n" in value:  # Jinja prompts as literal blocks, short strings like "\nQ:" quoted
        style = "|" if value.count("\n") > 1 and not value.startswith("\n") else '"'
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_LiteralDumper.add_representer(str, _str_representer)
