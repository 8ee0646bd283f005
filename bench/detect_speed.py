"""`ptst bench detect`: speed of the refusal detector's rule path on one core (with
--second-stage N, of both stages), or, with --labels, its precision, recall and F1 per corpus
source against the two keyword baselines (`ptst.bench.detect_quality`).

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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

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
        "--second-stage",
        type=int,
        default=0,
        metavar="N",
        help="also time both stages (rules, and the classifier where unsure) on N responses",
    )
    parser.add_argument(
        "--labels",
        type=Path,
        action="append",
        default=None,
        help="labelled corpus files or folders (repeatable; e.g. bench/refusal_corpus): print "
        "precision, recall and F1 per source instead of timing",
    )
    parser.add_argument(
        "--rules-only",
        action="store_true",
        help="with --labels: score the rules and baselines only (no second stage, no embeddings)",
    )
    parser.add_argument(
        "--embeddings-cache",
        type=Path,
        default=Path("results/.cache/detect"),
        help="with --labels: a folder keeping the encoders' vectors of answers seen before "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--fit-weights",
        type=Path,
        default=None,
        metavar="OUT",
        help="with --labels: fit the second stage on every source and write its weights to OUT "
        "(the proxy ships proxy/second_stage.json)",
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


def _pin(cpu: int | None) -> str:
    if cpu is None:
        return "not pinned (single thread)"
    if not hasattr(os, "sched_setaffinity"):
        return "not pinned (no sched_setaffinity on this platform)"
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


def machine(cpu: int | None) -> None:
    print("command:", shlex.join(["ptst", "bench", "detect", *sys.argv[3:]]))
    print(
        f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"cpu_count={os.cpu_count()}, python {platform.python_version()}, {_pin(cpu)}"
    )
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    if load is not None:
        print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def speed(args: argparse.Namespace) -> dict[str, Any]:
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
    if args.second_stage:
        results["second_stage"] = second_stage_speed(corpus[: args.second_stage])
    return results


def second_stage_speed(texts: Sequence[str]) -> dict[str, float]:
    """Both stages over `texts` in one batch, wall time (the models use threads)."""
    from ptst.engine.demo_model import ensure_model
    from ptst.proxy.second_stage import PROBE_MODEL, SecondStage, unsure

    ensure_model(PROBE_MODEL)
    stage = SecondStage.load()
    asked = sum(unsure(detect(t), t[:HEAD_CHARS]) for t in texts)
    stage.judge_many(texts[:8])  # warm-up
    wall0 = time.perf_counter()
    stage.judge_many(texts)
    wall = time.perf_counter() - wall0
    print(
        f"both stages: {len(texts) / wall:,.0f} responses/s wall over {len(texts)} responses, "
        f"{asked} of them ({asked / len(texts):.0%}) sent to the classifier: "
        f"{asked / wall:,.0f} classifier answers/s"
    )
    return {"responses": len(texts), "asked": asked, "wall_s": wall}


def labelled(args: argparse.Namespace) -> dict[str, Any]:
    from ptst.bench.detect_corpus import load_corpus
    from ptst.bench.detect_quality import cached_encoders, fit_weights, quality, table

    examples = load_corpus(args.labels)
    sources = sorted({e.source for e in examples})
    print(
        f"corpus: {len(examples)} labelled answers from {len(sources)} sources: {', '.join(sources)}"
    )
    encoders = None if args.rules_only else cached_encoders(args.embeddings_cache)
    result = quality(examples, encoders)
    print("\npositive = refusal or partial refusal; rules+second: leave-one-source-out")
    print(table(result))
    if args.fit_weights is not None:
        fit_weights(examples, encoders or cached_encoders(args.embeddings_cache)).write(
            args.fit_weights
        )
        print(f"\nsecond-stage weights fitted on all {len(examples)} answers: {args.fit_weights}")
    return {"quality": result}


def run(args: argparse.Namespace) -> int:
    machine(args.cpu)
    results = labelled(args) if args.labels else speed(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0
