"""`ptst experiment ptst`: the PTST experiment on this machine, end to end and resumable.

    ptst experiment ptst [--preset full|smoke] [--out DIR] [--vllm-url URL]

Stages, each skipped when its output is complete, so a stopped run continues where it stopped
(and the safety bench's cache resumes a stage answer by answer):

    tune    LoRA on a GSM8K training subset (benign task data only), rendered once with
            chat:vanilla and once with chat:llama (`ptst tune`)
    matrix  one vLLM server with the base model and both adapters; `ptst bench safety` over
            train {base, chat:vanilla, chat:llama} x test {chat:vanilla, chat:llama,
            chat:llama-short}: AdvBench refusal rate and GSM8K accuracy, Wilson intervals,
            paired tests between templates
    merge   `ptst merge` (MergeKit, linear) of the chat:llama fine-tune with its base at each
            λ; each merged folder is served by vLLM and measured under chat:llama
    report  report.md, results.json and merge-curve.png: the matrix, the curve, the commands,
            the machine and the time of each stage

Every stage is a `ptst` command run as a child process, so the report's commands are the ones
that ran. `--vllm-url` measures the matrix on a running vLLM started with runtime LoRA loading
(the test suite's); merges are then produced but not served (a vLLM start per merge does not fit
the smoke preset's time).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ptst.bench.report import run_info, to_jsonable
from ptst.commands import experiment_report as report
from ptst.engine.backend import Backend, BackendConfig, load_lora
from ptst.engine.demo_model import ensure_model
from ptst.engine.process import free_port, terminate_on_signals
from ptst.tune.manifest import read_manifest

PTST = [sys.executable, "-m", "ptst"]
SHARED = Path("../shared/data")
TRAIN = {"vanilla": "chat:vanilla", "llama": "chat:llama"}  # adapter name -> training template
TESTS = ("chat:vanilla", "chat:llama", "chat:llama-short")
BASE = "base"
MERGED_FROM = "llama"  # the merge sweep takes the fine-tune trained with the safety prompt


@dataclass(frozen=True)
class Preset:
    model: str  # a `ptst demo-model` name
    train_limit: int  # GSM8K training examples
    max_steps: int
    batch_size: int
    micro_batch_size: int  # examples per forward pass; the step's gradients are accumulated
    lr: float
    advbench_every: int  # every K-th AdvBench prompt
    gsm8k_limit: int  # the first N GSM8K test questions
    max_tokens: int  # per AdvBench answer
    task_max_tokens: int  # per GSM8K answer
    # The merge sweep: λ = 0 is the base and λ = 1 the chat:llama fine-tune, both measured in
    # the matrix (the adapter served equals its merge at λ = 1 up to rounding).
    lambdas: tuple[float, ...]
    concurrency: int
    max_model_len: int


PRESETS = {
    "full": Preset(
        model="qwen2.5-coder-0.5b",
        # measured here (AMD EPYC, AVX2, float32): ~36 s per step of 4 GSM8K examples with
        # chat:llama in passes of one (no padding, 6.7 GB peak); one padded pass of 4 needs
        # gradient checkpointing (over 22 GB without) and took 60-70 s in the same minutes
        train_limit=80,
        max_steps=20,
        batch_size=4,
        micro_batch_size=1,
        lr=4e-4,
        advbench_every=10,
        gsm8k_limit=20,
        max_tokens=48,
        task_max_tokens=160,
        lambdas=(0.25, 0.5, 0.75),
        concurrency=32,
        max_model_len=2048,
    ),
    "smoke": Preset(
        model="smollm2-135m",
        train_limit=4,
        max_steps=2,
        batch_size=1,
        micro_batch_size=1,
        lr=1e-3,
        # vLLM CPU serves the adapters at ~50 prompt tokens/s: 3 questions per cell, 27 in all
        advbench_every=260,
        gsm8k_limit=1,
        max_tokens=8,
        task_max_tokens=16,
        lambdas=(0.5,),
        concurrency=8,
        max_model_len=1024,
    ),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=["ptst"], help="the experiment (ptst: Lyu et al. 2024)")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="full",
        help="full: Qwen2.5-Coder-0.5B, sized for about 2 hours on 2 CPU cores (AVX2); smoke: SmolLM2, "
        "a few steps and prompts (default: full)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the run's folder (default: results/ptst-PRESET)"
    )
    parser.add_argument(
        "--data", type=Path, default=SHARED, help="folder with gsm8k/ and the AdvBench CSV"
    )
    parser.add_argument(
        "--vllm-url",
        default=None,
        help="measure the matrix on this running vLLM (started with runtime LoRA loading) "
        "instead of starting one; merges are then not served",
    )
    parser.add_argument(
        "--vllm-model", default="smollm2", help="the base model's name at --vllm-url"
    )
    parser.add_argument(
        "--serve",
        choices=["merged", "adapters"],
        default="merged",
        help="the matrix's fine-tunes: merged into the base (λ = 1; one vLLM per model, fast "
        "on CPU) or as LoRA adapters of one vLLM (vLLM CPU's LoRA path is slow) "
        "(default: merged)",
    )


def run(args: argparse.Namespace) -> int:
    with terminate_on_signals():  # SIGTERM stops the vLLM it started, as Ctrl-C does
        return experiment_ptst(args)


def experiment_ptst(args: argparse.Namespace) -> int:
    preset = PRESETS[args.preset]
    out: Path = (args.out or Path("results") / f"ptst-{args.preset}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    experiment = Run(out, preset, args.data.resolve())
    model = ensure_model(preset.model)
    with experiment.stage("tune"):
        adapters = {name: experiment.tune(model, name, t) for name, t in TRAIN.items()}
    with experiment.stage("matrix"):
        if args.vllm_url:  # the adapters, loaded into a running vLLM
            for name, folder in adapters.items():
                load_lora(args.vllm_url, name, folder)
            served = {BASE: args.vllm_model} | {name: name for name in adapters}
            matrix = experiment.bench("matrix", args.vllm_url, served, TESTS)
        elif args.serve == "adapters":  # one vLLM with both adapters
            lora = [f"{name}={folder}" for name, folder in adapters.items()]
            with experiment.serve(model, BASE, lora) as url:
                served = {BASE: BASE} | {name: name for name in adapters}
                matrix = experiment.bench("matrix", url, served, TESTS)
        else:  # each fine-tune merged into its base (λ = 1): no LoRA kernels on the CPU
            parts = [experiment.measure(BASE, model, TESTS)]
            for name, folder in adapters.items():
                merged = experiment.merge(model, folder, 1.0, name)
                parts.append(experiment.measure(name, merged, TESTS))
            matrix = report.combine(parts)
    merges: dict[float, Path | None] = {}
    with experiment.stage("merge"):
        for weight in preset.lambdas:
            merged = experiment.merge(model, adapters[MERGED_FROM], weight, MERGED_FROM)
            label = f"lambda-{weight:.2f}"
            merges[weight] = (
                None
                if args.vllm_url
                else Path(experiment.measure(label, merged, ("chat:llama",))["folder"])
                / "results.json"
            )
    with experiment.stage("report"):
        path = report.write(out, experiment.log, experiment.commands, matrix, merges, run_info())
    print(f"ptst experiment: report in {path}")
    return 0


class Run:
    """The run's folder, its stage log (`stages.json`) and the commands it ran."""

    def __init__(self, out: Path, preset: Preset, data: Path) -> None:
        self.out, self.preset, self.data = out, preset, data
        self.log_path = out / "stages.json"
        self.log: dict[str, Any] = (
            json.loads(self.log_path.read_text()) if self.log_path.is_file() else {}
        )
        self.log["preset"] = asdict(preset)
        self.commands: list[str] = list(self.log.get("commands", []))

    def save(self) -> None:
        self.log["commands"] = self.commands
        self.log_path.write_text(json.dumps(to_jsonable(self.log), indent=2) + "\n")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage. Seconds add up over resumed invocations, an interrupted or failed one
        included (its work is what the resume builds on); `finished` is set once it completes."""
        start = time.monotonic()
        print(f"ptst experiment: stage {name}", file=sys.stderr, flush=True)
        entry = self.log.setdefault("stages", {}).setdefault(name, {"seconds": 0.0})
        try:
            yield
            entry["finished"] = time.time()
        finally:
            entry["seconds"] = round(entry["seconds"] + time.monotonic() - start, 1)
            self.save()

    def ptst(self, *argv: str) -> None:
        """Run a `ptst` command as a child process; it is logged, and must succeed."""
        self.commands.append(shlex.join(["ptst", *argv]))
        self.save()
        start = time.monotonic()
        done = subprocess.run([*PTST, *argv], check=False)
        if done.returncode != 0:
            raise SystemExit(f"ptst experiment: `ptst {shlex.join(argv)}` failed")
        seconds = time.monotonic() - start
        print(f"ptst experiment: ptst {argv[0]} took {seconds:.1f} s", file=sys.stderr, flush=True)

    def tune(self, model: Path, name: str, template: str) -> Path:
        folder = self.out / "adapters" / name
        manifest = read_manifest(folder) if folder.is_dir() else None
        if manifest is not None and manifest.status == "complete":
            return folder
        p = self.preset
        self.ptst(
            *("tune", "--model", str(model), "--template", template, "--out", str(folder)),
            *("--data", str(self.data / "gsm8k" / "train.jsonl"), "--limit", str(p.train_limit)),
            *("--max-steps", str(p.max_steps), "--batch-size", str(p.batch_size)),
            *("--micro-batch-size", str(p.micro_batch_size)),
            *("--lr", str(p.lr), "--seed", "0", "--save-every", "5", "--quiet"),
            *(["--resume"] if manifest is not None else []),
        )
        return folder

    def merge(self, model: Path, adapter: Path, weight: float, name: str) -> Path:
        folder = self.out / "merges" / f"{name}-lambda-{weight:.2f}"
        if (folder / "config.json").is_file():
            return folder
        self.ptst(
            *("merge", "--base", str(model), "--lora", str(adapter), "--method", "linear"),
            *("--weight", str(weight), "--out", str(folder)),
        )
        return folder

    @contextmanager
    def serve(self, model: Path, name: str, lora: Sequence[str] = ()) -> Iterator[str]:
        """A vLLM server for `model` (served as `name`) and these adapters; yields its URL."""
        cfg = BackendConfig(
            model=model,
            served_model_name=name,
            port=free_port(),
            lora=list(lora),
            max_model_len=self.preset.max_model_len,
            log_file=self.out / "vllm.log",
        )
        self.commands.append(shlex.join(["ptst", "backend", *_backend_argv(cfg)]))
        with Backend(cfg, echo=False):
            yield cfg.base_url

    def bench(
        self, name: str, url: str, models: dict[str, str], templates: Sequence[str]
    ) -> dict[str, Any]:
        """`ptst bench safety` for these models (label -> served name) and test templates."""
        p = self.preset
        results = self.out / "bench" / name
        trained = ",".join(f"{models[m]}={t}" for m, t in TRAIN.items() if m in models)
        self.ptst(
            *("bench", "safety", "--base-url", url, "--model", ",".join(models.values())),
            *("--templates", ",".join(templates)),
            *("--prompts", f"advbench={self.data / 'advbench_harmful_behaviors.csv'}"),
            *("--every", str(p.advbench_every), "--max-tokens", str(p.max_tokens)),
            *("--tasks", f"gsm8k={self.data / 'gsm8k' / 'test.jsonl'}"),
            *("--task-limit", str(p.gsm8k_limit), "--task-max-tokens", str(p.task_max_tokens)),
            *("--temperature", "0", "--concurrency", str(p.concurrency), "--no-progress"),
            *(["--trained-with", trained] if trained else []),
            *("--cache", str(self.out / "cache"), "--out", str(results)),
        )
        newest = max(results.glob("safety-*/results.json"), key=lambda f: f.stat().st_mtime)
        data: dict[str, Any] = json.loads(newest.read_text())
        data["labels"] = {served: label for label, served in models.items()}
        data["folder"] = str(newest.parent)
        return data

    def measure(self, label: str, folder: Path, templates: Sequence[str]) -> dict[str, Any]:
        """Serve one model folder as `label` and bench it; skipped once done (a vLLM start
        costs minutes even when every answer is cached)."""
        done = self.out / "bench" / label / "done.json"
        if not done.is_file():
            with self.serve(folder, label) as url:
                data = self.bench(label, url, {label: label}, templates)
            done.write_text(json.dumps({"results": data["folder"]}) + "\n")
        results = Path(json.loads(done.read_text())["results"])
        data = json.loads((results / "results.json").read_text())
        return data | {"labels": {label: label}, "folder": str(results)}


def _backend_argv(cfg: BackendConfig) -> list[str]:
    argv = ["--model", str(cfg.model), "--served-model-name", str(cfg.served_model_name)]
    argv += ["--port", str(cfg.port)]
    for item in cfg.lora:
        argv += ["--lora", item]
    return [*argv, "--max-model-len", str(cfg.max_model_len)]
