"""`ptst bench overhead`: the proxy's own cost, direct upstream vs through the proxy, interleaved.

    ptst bench overhead --setting fast
    ptst bench overhead --setting vllm --upstream http://127.0.0.1:18000/v1 --model smollm2

It starts what it needs on free loopback ports (the test responder, `ptst serve` with ONE
worker) and stops it afterwards. Both targets run in alternating rounds (ABBA), so machine
noise (other processes on these 2 cores) hits both alike.

- fast: non-streaming chat requests over 32 keep-alive connections to `ptst.bench.responder`,
  direct vs through the proxy, with the raw generator of bench/blaster.py, in three phases:
  a closed loop (capacity: requests/s), an open loop at --rate requests/s (default 1,500, the
  throughput target: the latency the proxy adds at that load), and a closed loop on one
  connection (the per-request cost). The generator's capacity is the "direct" number
  (generator + responder alone), and its own CPU use per round is reported, so a
  generator-bound result is visible. The closed loop's added p50 is reported too: at
  saturation every connection queues behind the slower target, so it measures throughput
  (p50 ~ connections / req/s), not the cost of one request.
- vllm: 16 concurrent streams of 64 output tokens (ignore_eos) against a running vLLM, direct
  vs through the proxy, with `ptst bench load`'s request code and metric definitions. The
  direct requests carry exactly the body the proxy sends upstream (learned by routing one
  probe request through the proxy to the responder), so vLLM does the same work for both.
  Throughput comes from alternating rounds; TTFT added from a paired phase where each direct
  request and a proxied one are sent together into the same engine batches (paired_streams).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvloop

from ptst.bench import load, plots, report, stats
from ptst.bench.blaster import Blaster, Side, http_request, interleave
from ptst.bench.procs import proxy, responder
from ptst.engine.process import terminate_on_signals

FAST_TARGETS = {"requests_per_s": 1500.0, "added_p50_ms": 2.0}
VLLM_TARGETS = {"throughput_ratio": 0.97, "ttft_p50_added_ms": 10.0}
PROBE = "ptst-overhead-probe-7f3a"


# --- settings --------------------------------------------------------------------------------


def chat_body(model: str, max_tokens: int) -> dict[str, Any]:
    content = "Say hello to the benchmark, in a few words please."
    return {
        "model": model,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }


async def measure_fast(
    direct_url: str,
    proxy_url: str,
    connections: int,
    rounds: int,
    round_seconds: float,
    warmup_seconds: float,
    tokens: int,
    rate: float | None = None,
) -> dict[str, Any]:
    """Interleaved rounds in each phase, direct vs proxy: a closed loop on `connections`
    ("loaded": capacity), an open loop at `rate` req/s over the same connections ("at_rate"),
    and a closed loop on one connection ("single": the per-request cost)."""
    request = http_request(direct_url, "/chat/completions", chat_body("bench", tokens))
    targets = [
        Blaster(direct_url, request, connections),
        Blaster(
            proxy_url,
            http_request(proxy_url, "/chat/completions", chat_body("bench", tokens)),
            connections,
        ),
    ]
    phases: dict[str, list[Side]] = {}
    try:
        for b in targets:
            await b.round(warmup_seconds)
        phases["loaded"] = await interleave(targets, rounds, round_seconds)
        if rate:
            phases["at_rate"] = await interleave(targets, rounds, round_seconds, rate=rate)
        phases["single"] = await interleave(targets, rounds, round_seconds / 2, connections=1)
    finally:
        for b in targets:
            b.close()
    out: dict[str, Any] = {"connections": connections, "rate": rate}
    for name, sides in phases.items():
        direct, proxied = sides[0].summary(), sides[1].summary()
        out[name] = {
            "latencies": {"direct": sides[0].latencies, "proxy": sides[1].latencies},
            "direct": direct,
            "proxy": proxied,
            "added_p50_ms": proxied["latency_ms"]["p50"] - direct["latency_ms"]["p50"],
            "throughput_ratio": stats.ratio(proxied["requests_per_s"], direct["requests_per_s"]),
        }
    return out


def run_fast(args: argparse.Namespace) -> dict[str, Any]:
    tokens = 16
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(responder(tokens))
        route = {"model": "bench", "upstream": upstream, "upstream_model": "bench"}
        front = args.proxy_url or stack.enter_context(proxy([route | {"template": args.template}]))
        # the proxy must really answer: one checked request before measuring
        check = httpx.post(front + "/chat/completions", json=chat_body("bench", tokens), timeout=30)
        check.raise_for_status()
        result: dict[str, Any] = uvloop.run(
            measure_fast(
                upstream,
                front,
                args.connections,
                args.rounds,
                args.round_seconds,
                1.0,
                tokens,
                args.rate or None,
            )
        )
    result["direct_url"], result["proxy_url"] = upstream, front
    return result


def probe_rewrite(template: str) -> dict[str, Any]:
    """The body the proxy sends upstream for a one-message chat request on a `template` route."""
    with responder() as upstream:
        routes = [
            {
                "model": "probe",
                "upstream": upstream,
                "upstream_model": "bench",
                "template": template,
            }
        ]
        with proxy(routes) as front:
            sent = {
                "model": "probe",
                "messages": [{"role": "user", "content": PROBE}],
                "max_tokens": 1,
            }
            httpx.post(front + "/chat/completions", json=sent, timeout=30).raise_for_status()
            seen = httpx.get(upstream.removesuffix("/v1") + "/debug/requests", timeout=10).json()
    if not seen or not isinstance(seen[-1], dict):
        raise RuntimeError("the probe request did not reach the responder")
    return dict(seen[-1])


def direct_target(
    name: str, url: str, model: str, upstream_body: dict[str, Any], api_key: str | None
) -> load.Target:
    """A load target that sends vLLM what the proxy would: same system messages, wrapper, fields."""
    messages = upstream_body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RuntimeError(
            "the template renders a prompt (prompt mode); --setting vllm needs a messages-mode template"
        )
    last = messages[-1]
    content = last.get("content") if isinstance(last, dict) else None
    if not isinstance(content, str) or PROBE not in content:
        raise RuntimeError(f"cannot find the probe text in the rewritten request: {last!r}")
    skip = ("model", "messages", "max_tokens", "max_completion_tokens", "stream", "stream_options")
    extra = {k: v for k, v in upstream_body.items() if k not in skip}
    return load.Target(
        name,
        url,
        model,
        api_key,
        prefix_messages=messages[:-1],
        user_format=content.replace("{", "{{").replace("}", "}}").replace(PROBE, "{prompt}"),
        extra_body=extra,
    )


async def paired_streams(
    targets: tuple[load.Target, load.Target],
    prompts: Sequence[str],
    opts: load.Options,
    concurrency: int,
    count_tokens: Callable[[str], int],
) -> dict[str, Any]:
    """Direct and proxied streams side by side in the same vLLM batches: TTFT added and the
    per-stream output rate ratio.

    `concurrency / 2` workers each send one request to each target at the same instant (two
    different prompts of one length; which target goes first alternates) and wait for both.
    vLLM takes both into the same engine step, so a pair's TTFT difference is what the proxy
    adds, free of the step-to-step and round-to-round variation that dominates TTFT on a busy
    engine (a step is hundreds of ms on this CPU).
    """
    timeout = httpx.Timeout(connect=10.0, read=600.0, write=60.0, pool=600.0)
    clients = [
        httpx.AsyncClient(
            timeout=timeout,
            trust_env=False,
            headers={"Authorization": f"Bearer {t.api_key}"} if t.api_key else None,
        )
        for t in targets
    ]
    work = [(i, prompts[i], prompts[i + 1]) for i in range(0, len(prompts) - 1, 2)]
    pairs: list[tuple[load.Result, load.Result]] = []

    async def send(t: int, prompt: str) -> load.Result:
        return await load.send_request(clients[t], targets[t], prompt, opts, count_tokens)

    async def worker() -> None:
        while work:
            i, first, second = work.pop(0)
            if i % 4:  # alternate who is sent first
                b, a = await asyncio.gather(send(1, second), send(0, first))
            else:
                a, b = await asyncio.gather(send(0, first), send(1, second))
            pairs.append((a, b))

    try:
        await asyncio.gather(*(worker() for _ in range(max(1, concurrency // 2))))
    finally:
        for client in clients:
            await client.aclose()
    ok = [(a, b) for a, b in pairs if a.ok and b.ok]

    def rate(side: list[load.Result]) -> float:  # output tokens per second of streaming
        seconds = sum(r.e2e for r in side)
        return sum(r.output_tokens for r in side) / seconds if seconds else 0.0

    return {
        "pairs": len(pairs),
        "failed_pairs": len(pairs) - len(ok),
        "ttft_added_ms": stats.summarize([b.ttft - a.ttft for a, b in ok], 1000),
        "e2e_added_ms": stats.summarize([b.e2e - a.e2e for a, b in ok], 1000),
        "stream_rate_ratio": stats.ratio(rate([b for _, b in ok]), rate([a for a, _ in ok])),
        "ttft_ms": {
            "direct": stats.summarize([a.ttft for a, _ in ok], 1000),
            "proxy": stats.summarize([b.ttft for _, b in ok], 1000),
        },
    }


def round_throughput(entry: dict[str, Any], n_prompts: int, rounds: int) -> dict[str, list[float]]:
    """Output tokens/s of each alternating round, per target: how much rounds vary by themselves."""
    out: dict[str, list[float]] = {}
    plan = load.round_plan(n_prompts, rounds, 2)
    for t, name in enumerate(("direct", "proxy")):
        requests, at = entry["targets"][name]["requests"], 0
        out[name] = []
        for _, part in (p for p in plan if p[0] == t):
            size = part.stop - part.start
            wave = [r for r in requests[at : at + size] if r["ok"]]
            at += size
            if wave:
                seconds = max(r["start"] + r["e2e"] for r in wave) - min(r["start"] for r in wave)
                out[name].append(sum(r["output_tokens"] for r in wave) / seconds)
    return out


def run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    if not args.upstream or not args.model:
        raise SystemExit("--setting vllm needs --upstream URL and --model NAME")
    body = probe_rewrite(args.template)
    tokens = load.load_tokenizer(args.tokenizer)
    prompts = load.make_prompts(args.num_prompts, args.input_len, tokens, args.seed)
    warm = load.make_prompts(args.concurrency, args.input_len, tokens, args.seed + 1)
    opts = load.Options("chat", True, args.output_len, ignore_eos=True)
    direct = direct_target("direct", args.upstream, args.model, body, args.api_key)
    routes = [
        {
            "model": "bench",
            "upstream": args.upstream,
            "upstream_model": args.model,
            "template": args.template,
        }
    ]
    with contextlib.ExitStack() as stack:
        front = args.proxy_url or stack.enter_context(proxy(routes))
        through = load.Target("proxy", front, "bench", args.api_key)
        levels = [load.Level("concurrency", float(args.concurrency))]
        entries = asyncio.run(
            load.run_bench(
                [direct, through], prompts, opts, levels, tokens, warm, args.rounds, args.seed
            )
        )
        paired_prompts = load.make_prompts(
            2 * args.num_prompts, args.input_len, tokens, args.seed + 2
        )
        paired = asyncio.run(
            paired_streams((direct, through), paired_prompts, opts, args.concurrency, tokens.count)
        )
    entry = entries[0]
    return {
        "upstream_body_fields": sorted(body),
        "level": entry,
        "round_throughput": round_throughput(entry, len(prompts), args.rounds),
        "paired": paired,
        "proxy_url": front,
    }


# --- reporting -------------------------------------------------------------------------------


PHASES = {"loaded": "closed loop", "at_rate": "open loop", "single": "closed loop"}


def fast_markdown(res: dict[str, Any]) -> str:
    conns, rate = res["connections"], res.get("rate")
    rows = []
    for name, loop in PHASES.items():
        if name not in res:
            continue
        part = res[name]
        offered = f"{rate:g} req/s" if name == "at_rate" else "as fast as answered"
        for side in ("direct", "proxy"):
            s = part[side]
            rows.append(
                [
                    1 if name == "single" else conns,
                    f"{loop}, {offered}",
                    side,
                    s["requests"],
                    s["errors"],
                    s["requests_per_s"],
                    s["latency_ms"]["p50"],
                    s["latency_ms"]["p99"],
                    s["generator_cpu_share"],
                ]
            )
    loaded, single = res["loaded"], res["single"]
    rps, want_rps = loaded["proxy"]["requests_per_s"], FAST_TARGETS["requests_per_s"]
    want_ms = FAST_TARGETS["added_p50_ms"]
    verdict = [
        f"- proxy capacity at {conns} connections (closed loop): **{rps:.0f} req/s** "
        f"(target >= {want_rps:.0f}: {'met' if rps >= want_rps else 'NOT met'})",
    ]
    if "at_rate" in res and rate:
        at = res["at_rate"]
        kept = at["proxy"]["requests_per_s"]
        verdict.append(
            f"- added p50 at {rate:g} req/s offered over {conns} connections (open loop): "
            f"**{at['added_p50_ms']:.2f} ms** (target <= {want_ms:g} ms: "
            f"{'met' if at['added_p50_ms'] <= want_ms and kept >= 0.97 * rate else 'NOT met'}); "
            f"the proxy completed {kept:.0f} req/s"
        )
    verdict += [
        f"- added p50 at saturation (closed loop, {conns} connections): "
        f"{loaded['added_p50_ms']:.2f} ms: every connection queues behind the slower target, "
        f"so p50 is about {conns} / throughput on each side",
        f"- added p50 at 1 connection (the per-request cost): **{single['added_p50_ms']:.2f} ms**",
        f"- generator capacity (direct, generator + responder alone): "
        f"{loaded['direct']['requests_per_s']:.0f} req/s; generator CPU share while driving the "
        f"proxy: {loaded['proxy']['generator_cpu_share']:.0%} of one core",
    ]
    headers = ["connections", "load", "target", "requests", "errors", "req/s", "p50 ms"]
    table = report.markdown_table([*headers, "p99 ms", "generator CPU"], rows)
    return "\n".join(verdict) + "\n\n" + table


def ttft_verdict(added_ms: float, target_ms: float) -> str:
    """A proxy cannot make TTFT faster: a negative difference larger than the target is the
    upstream's own round-to-round noise, and the run cannot resolve the target."""
    if added_ms < -target_ms:
        return "not resolved: the direct/proxy difference is noise larger than the target"
    return "met" if added_ms <= target_ms else "NOT met"


def vllm_markdown(res: dict[str, Any]) -> str:
    entry = res["level"]
    c = entry["compare"]
    ratio = c["ratio"]["output_throughput"] or 0.0
    want_ratio, want_ms = VLLM_TARGETS["throughput_ratio"], VLLM_TARGETS["ttft_p50_added_ms"]
    lines = []
    paired = res.get("paired")
    if paired:
        rate = paired["stream_rate_ratio"] or 0.0
        added = paired["ttft_added_ms"]["p50"]
        ttft = paired["ttft_ms"]
        marginal = ttft["proxy"]["p50"] - ttft["direct"]["p50"]
        n = paired["pairs"] - paired["failed_pairs"]
        lines += [
            f"- paired phase: {n} direct/proxy pairs sent together into the same engine batches",
            f"  - TTFT p50 added (median of the pairs' differences): **{added:.1f} ms** "
            f"(target <= {want_ms:g} ms: {ttft_verdict(added, want_ms)}); TTFT p50 direct "
            f"{ttft['direct']['p50']:.0f} ms, proxy {ttft['proxy']['p50']:.0f} ms "
            f"(difference {marginal:.1f} ms)",
            f"  - output rate per stream, proxy/direct: **{rate:.3f}** (target >= {want_ratio}: "
            f"{'met' if rate >= want_ratio else 'NOT met'}); E2E p50 added "
            f"{paired['e2e_added_ms']['p50']:.1f} ms",
        ]
    added = c["added_ms"]["ttft_p50"]
    lines += [
        f"- alternating rounds (each target alone on the engine): output throughput ratio "
        f"proxy/direct **{ratio:.3f}** ({'met' if ratio >= want_ratio else 'NOT met'}), "
        f"TTFT p50 difference {added:.1f} ms ({ttft_verdict(added, want_ms)})",
    ]
    rounds = res.get("round_throughput", {})
    if rounds.get("direct") and rounds.get("proxy"):
        spread = " / ".join(f"{name} {min(v):.1f}-{max(v):.1f}" for name, v in rounds.items() if v)
        direct = rounds["direct"]
        own = (max(direct) - min(direct)) / (sum(direct) / len(direct))
        lines.append(
            f"  - output tok/s of single rounds: {spread}; direct rounds alone spread by "
            f"{own:.0%} of their mean"
            + (" (more than the proxy/direct gap)" if own > abs(1 - ratio) else "")
        )
    lines.append(
        "- direct requests carry the same rewritten messages and fields as the proxy's upstream calls"
    )
    return "\n".join(lines) + "\n\n" + load.summary_markdown([entry], ["direct", "proxy"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--setting",
        choices=["fast", "vllm"],
        default="fast",
        help="fast: a minimal responder it starts; vllm: a running vLLM at --upstream",
    )
    parser.add_argument("--template", default="chat:llama", help="template of the proxy route")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per target")
    parser.add_argument(
        "--out", type=Path, default=Path("results"), help="results root (default: results/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="prompts and arrivals (default: 0)")
    parser.add_argument(
        "--proxy-url",
        help="measure an already running proxy instead of starting one (fast: it must route "
        "model 'bench' to a bench.responder; vllm: model 'bench' to --upstream)",
    )
    fast = parser.add_argument_group("fast")
    fast.add_argument(
        "--connections", type=int, default=32, help="keep-alive connections (default: 32)"
    )
    fast.add_argument(
        "--round-seconds", type=float, default=1.5, help="length of each round (default: 1.5)"
    )
    fast.add_argument(
        "--rate",
        type=float,
        default=FAST_TARGETS["requests_per_s"],
        help="offered req/s of the open-loop phase (0: skip it)",
    )
    vllm = parser.add_argument_group("vllm")
    vllm.add_argument("--upstream", help="vLLM base URL, e.g. http://127.0.0.1:18000/v1")
    vllm.add_argument("--model", help="served model name at --upstream")
    vllm.add_argument("--api-key", help="bearer token for --upstream")
    vllm.add_argument("--tokenizer", help="model folder (else ~4 chars/token prompts)")
    vllm.add_argument("--concurrency", type=int, default=16, help="streams in flight (default: 16)")
    vllm.add_argument("--num-prompts", type=int, default=96, help="requests per target")
    vllm.add_argument("--input-len", type=int, default=64, help="prompt tokens (default: 64)")
    vllm.add_argument(
        "--output-len", type=int, default=64, help="max_tokens per request (default: 64)"
    )


def fast_plots(folder: Path, result: dict[str, Any]) -> list[Path]:
    """Bars of req/s and p50 per phase, and the latency CDF at the offered rate (else loaded)."""
    sides = ("direct", "proxy")
    parts = [p for p in PHASES if p in result]
    names = {
        "loaded": f"{result['connections']} conns, closed",
        "at_rate": f"{result['rate'] or 0:g} req/s, open",  # only named when it ran
        "single": "1 conn, closed",
    }
    groups = [names[p] for p in parts]
    rps = {s: [result[p][s]["requests_per_s"] for p in parts] for s in sides}
    p50 = {s: [result[p][s]["latency_ms"]["p50"] for p in parts] for s in sides}
    latencies = result["at_rate" if "at_rate" in result else "loaded"]["latencies"]
    return [
        plots.plot_bars(folder / "throughput.png", groups, rps, "requests/s"),
        plots.plot_bars(folder / "latency_p50.png", groups, p50, "p50 latency (ms)"),
        plots.plot_cdf(folder / "latency_cdf.png", latencies, "latency (s)"),
    ]


def run(args: argparse.Namespace) -> int:
    with terminate_on_signals():  # SIGTERM stops the children it started, as Ctrl-C does
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    if args.setting == "fast":
        result = run_fast(args)
        md = fast_markdown(result)
        folder = report.run_dir(args.out, "overhead", "fast")
        images = fast_plots(folder, result)
        for part in PHASES:  # raw latencies: plotted, not stored
            if part in result:
                result[part].pop("latencies")
    else:
        result = run_vllm(args)
        md = vllm_markdown(result)
        folder = report.run_dir(args.out, "overhead", "vllm")
        images = load.make_plots(folder, [result["level"]], ["direct", "proxy"])
    print(md)
    data = {
        "bench": "overhead",
        "setting": args.setting,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "targets": FAST_TARGETS if args.setting == "fast" else VLLM_TARGETS,
        "result": result,
    }
    html = report.write_report(
        folder,
        f"Proxy overhead ({args.setting})",
        data,
        f"# Proxy overhead ({args.setting})\n\n{md}",
        images,
    )
    print(f"\nreport: {html}")
    return 0
