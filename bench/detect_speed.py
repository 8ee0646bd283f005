"""`ptst bench detect`: speed of the refusal detector's rule path on one core (and, with
--labels, its quality against the two keyword baselines).

Responses are built from realistic openings (refusals, partial refusals, plain and tricky
compliance) followed by ordinary answer text, each cut to exactly --length characters. Time
is CPU time of this process (time.process_time), so other load on the machine inflates it
less than wall time; both are printed, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from ptst.bench.baselines import BASELINES
from ptst.proxy.refusal import HEAD_CHARS, RefusalDetector, detect

OPENINGS_REFUSAL = (
    "I'm sorry, but I can't help with that request.",
    "I cannot fulfill your request. I'm just an AI, it's not within my programming or ethical "
    "guidelines to provide that information.",
    "That's not something I can help with.",
    "As an AI language model, I cannot provide instructions for that.",
    "I’m sorry, but I can’t assist with creating that content.",
    "This request goes against my guidelines, so I have to decline.",
    "That's a serious question. However, I cannot give you step-by-step instructions for it.",
)
OPENINGS_PARTIAL = (
    "I can't help with getting into someone else's account, but here is how to secure your own: ",
    "I won't write a working exploit. What I can do is explain how to patch the issue: ",
    "I can't give medical advice for your specific case, but in general, ",
)
OPENINGS_COMPLIANCE = (
    "Sure! Here's a simple way to do it. ",
    "Sorry to hear that. Here's how to get your account back: ",
    "I cannot stress enough how important backups are. Once you have one, ",
    "Great question. The short answer is yes, and here is why: ",
    "It is illegal in some countries, so check local law; the steps are: ",
    'The detective sighed. "I\'m sorry," she said, "but the butler was in Leeds." ',
    "**Step 1:** Preheat the oven to 200°C. **Step 2:** ",
)
BODY = (
    "Start by gathering what you need and reading the instructions once end to end. Work in "
    "small steps, check the result after each one, and keep notes so you can retrace them. If "
    "something looks wrong, stop and compare with the previous step before going on. Most "
    "problems come from skipping a step or from a typo in a command, so copy commands exactly. "
    "When you are done, test the whole thing from a clean start to make sure it works. In the "
    "kitchen, the same idea applies: measure first, taste as you go, and write down changes. "
    "For code, commit often and run the tests before every push. "
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-n", "--responses", type=int, default=100_000, help="responses to time")
    parser.add_argument("--length", type=int, default=500, help="characters per response")
    parser.add_argument(
        "--refusal-share", type=float, default=0.4, help="share of refusals and partial refusals"
    )
    parser.add_argument(
        "--chunk", type=int, default=16, help="delta size for the streaming measurement"
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic responses (default: 0)")
    parser.add_argument(
        "--cpu", type=int, default=None, help="pin the process to this CPU (Linux only)"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        default=None,
        help="JSONL with text/label/split: also print precision, recall and F1 per split",
    )
    parser.add_argument("--json", type=Path, default=None, help="write the results here as JSON")


def build_corpus(count: int, length: int, refusal_share: float, seed: int) -> list[str]:
    """`count` distinct responses of exactly `length` characters, refusals mixed in."""
    rng = random.Random(seed)
    corpus = []
    for i in range(count):
        if rng.random() < refusal_share:
            opening = rng.choice(OPENINGS_REFUSAL + OPENINGS_PARTIAL)
        else:
            opening = rng.choice(OPENINGS_COMPLIANCE)
        offset = rng.randrange(len(BODY))
        body = (BODY[offset:] + BODY) * (length // len(BODY) + 2)
        corpus.append(f"{opening}{body}"[: length - 8] + f" #{i % 10_000_000:07d}"[:8])
    return corpus


def time_calls(fn: Callable[[str], Any], texts: Sequence[str]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) to call `fn` on every text once."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for text in texts:
        fn(text)
    return time.process_time() - cpu0, time.perf_counter() - wall0


def stream_once(chunk: int) -> Callable[[str], Any]:
    def run_stream(text: str) -> Any:
        detector = RefusalDetector()
        for i in range(0, len(text), chunk):
            detector.feed(text[i : i + chunk])
        return detector.verdict()

    return run_stream


def scores(predicted: Iterable[bool], actual: Iterable[bool]) -> dict[str, float]:
    """Precision, recall and F1 for the positive class (refusal or partial refusal)."""
    pairs = list(zip(predicted, actual, strict=True))
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    fn = sum(a and not p for p, a in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n": float(len(pairs))}


def quality(path: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Scores per split and detector (ours and the baselines) on a labelled JSONL file."""
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    detectors: dict[str, Callable[[str], bool]] = {"ptst": lambda t: detect(t).refusal, **BASELINES}
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split in sorted({row.get("split", "all") for row in rows}):
        subset = [row for row in rows if row.get("split", "all") == split]
        actual = [row["label"] != "compliance" for row in subset]
        result[split] = {
            name: scores((fn(row["text"]) for row in subset), actual)
            for name, fn in detectors.items()
        }
    return result


def _pin(cpu: int | None) -> str:
    if cpu is None:
        return "not pinned (single thread)"
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this platform)"
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def run(args: argparse.Namespace) -> int:
    print("command:", shlex.join(["ptst", "bench", "detect", *sys.argv[3:]]))
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"cpu_count={os.cpu_count()}, python {platform.python_version()}, {_pin(args.cpu)}"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    corpus = build_corpus(args.responses, args.length, args.refusal_share, args.seed)
    refusals = sum(detect(t).refusal for t in corpus[:2000]) / min(len(corpus), 2000)
    print(
        f"corpus: {len(corpus)} responses of {args.length} chars "
        f"(head scanned: {HEAD_CHARS}), detector flags {refusals:.0%} of the first 2000"
    )
    results: dict[str, Any] = {"responses": len(corpus), "length": args.length}
    for name, fn in (("detect", detect), (f"stream/{args.chunk}", stream_once(args.chunk))):
        cpu, wall = time_calls(fn, corpus)
        results[name] = {"cpu_s": cpu, "wall_s": wall, "responses_per_s": len(corpus) / cpu}
        print(
            f"{name:>12}: {len(corpus) / cpu:>10,.0f} responses/s (CPU time), "
            f"{len(corpus) / wall:>10,.0f}/s wall, {cpu / len(corpus) * 1e6:.1f} µs each"
        )
    if args.labels is not None:
        results["quality"] = quality(args.labels)
        print(f"\nquality on {args.labels} (positive = refusal or partial refusal)")
        print("| split | detector | n | precision | recall | F1 |\n|---|---|---|---|---|---|")
        for split, by_name in results["quality"].items():
            for name, s in by_name.items():
                print(
                    f"| {split} | {name} | {s['n']:.0f} | {s['precision']:.3f} "
                    f"| {s['recall']:.3f} | {s['f1']:.3f} |"
                )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
