"""Every upstream fault the proxy must survive (issue 11, item 6), streamed and not, through real
`ptst serve` processes: the client gets an OpenAI-shaped error with the right status, or a
stream that ends with an error event and `data: [DONE]`; never a 500, never a hang.

The upstreams: bench/responder.py (one behaviour per model name), tests/fault_server.py (the
raw bytes an ASGI server cannot send: 1xx interim answers, a closed or non-HTTP reply, huge
headers), a port nothing listens on, and a listener that never accepts. Each case is checked
twice: with the official SDK (max_retries=0) and byte by byte with httpx. Then replicas: a
failing one is skipped for `server.cooldown_s` and a request not yet streaming moves to another;
a started stream is never restarted. Last, against real vLLM CPU: a client that leaves
mid-stream cancels the generation.

On the wire each fault is also tried in prompt mode, where the proxy asks the upstream's
/v1/completions and converts the answer to chat as it streams, and on /v1/responses.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import openai
import pytest

from ptst.bench import procs
from ptst.bench.responder import RETRY_AFTER
from tests.conftest import Proxy
from tests.fault_server import FaultServer, unaccepting_listener
from tests.servers import free_port

LIMIT = 12.0  # seconds any one call may take: a hang fails the test instead of stalling the run
# The proxy's own limits on the routes that need them (server.timeouts and routes' timeouts).
TIMEOUTS = {"connect": 1.0, "pool": 1.0, "first_byte": 1.5, "between_chunks": 1.0, "total": 4.0}
TOKENS = 200  # per responder answer: a `slow` one (50 ms a token) outlasts the total timeout
COOLDOWN_S = 3.0
TEXT = "the quick brown fox"
USER = [{"role": "user", "content": TEXT}]


@dataclass(frozen=True)
class Fault:
    """One fault and what the client must see.

    status: the statuses allowed for the answer when the fault hits before the upstream's 200
    (for both modes), or for a non-streamed answer when it hits after it. started: the fault
    hits after some of the stream went out, so a stream must be a 200 that ends in an error
    event. ok_text: not a fault for the client at all: the answer must arrive whole.
    """

    upstream: str  # responder | raw | refused | unaccepting
    model: str  # the upstream's model: picks the responder's or the raw server's behaviour
    status: frozenset[int] = frozenset()
    started: bool = False
    retry_after: str | None = None
    timed: bool = False  # needs the route's timeouts (TIMEOUTS) to end
    ok_text: str | None = None


def fault(upstream: str, model: str, *statuses: int, **kwargs: Any) -> Fault:
    return Fault(upstream, model, frozenset(statuses), **kwargs)


FAULTS = {
    "refused": fault("refused", "any", 503),
    "connect-hang": fault("unaccepting", "any", 503, 504, timed=True),
    "hang-before-headers": fault("responder", "hang", 504, timed=True),
    "hang-after-headers": fault("responder", "hang-body", 504, timed=True),
    "hang-between-chunks": fault("responder", "hang-mid-stream", 504, timed=True, started=True),
    "total-timeout": fault("responder", "slow", 504, timed=True, started=True),
    "error-400": fault("responder", "error-400", 400),
    "error-429": fault("responder", "error-429", 429, retry_after=RETRY_AFTER[429]),
    "error-500": fault("responder", "error-500", 502),
    "error-502": fault("responder", "error-502", 502),
    "error-503": fault("responder", "error-503", 503, retry_after=RETRY_AFTER[503]),
    "close-before-answer": fault("raw", "empty-reply", 502),
    "close-mid-stream": fault("responder", "drop-mid-stream", 502, started=True),
    "not-http": fault("raw", "not-http", 502),
    "huge-header": fault("raw", "huge-header", 502),
    "many-headers": fault("raw", "many-headers", 502),
    "not-json-not-sse": fault("responder", "garbage", 502),
    "malformed-json-sse": fault("responder", "bad-json", 502, started=True),
    "interim-100": fault("raw", "interim-100", ok_text=TEXT),
    "interim-103": fault("raw", "interim-103", ok_text=TEXT),
    "gzip": fault("responder", "gzip", ok_text=" ".join(["tok"] * TOKENS)),
}


@pytest.fixture(scope="module")
def own_responder() -> Iterator[str]:
    with procs.responder(tokens=TOKENS) as url:
        yield url


@pytest.fixture(scope="module")
def raw_server() -> Iterator[FaultServer]:
    with FaultServer() as server:
        yield server


@pytest.fixture(scope="module")
def unaccepting() -> Iterator[str]:
    with unaccepting_listener() as url:
        yield url


def matrix_routes(name: str, case: Fault, urls: dict[str, str]) -> list[dict[str, Any]]:
    """The fault's two routes: messages mode (`name`), and prompt mode (`prompt-<name>`: the
    upstream's /v1/completions, its answer converted to chat by the proxy)."""
    route: dict[str, Any] = {
        "model": name,
        "upstream": urls[case.upstream],
        "upstream_model": case.model,
        "template": "chat:llama",
    }
    route |= {"timeouts": TIMEOUTS} if case.timed else {}
    return [route, route | {"model": f"prompt-{name}", "mode": "prompt"}]


@pytest.fixture(scope="module")
def matrix_proxies(
    start_proxy: Callable[..., Proxy],
    own_responder: str,
    raw_server: FaultServer,
    unaccepting: str,
) -> Callable[[bool], Proxy]:
    """Two proxies, started when first asked for: the faults that end without the proxy's own
    timeouts, and those that need them (routes with `timeouts`), so that a config the proxy
    does not accept fails only the cases that need it."""
    urls = {
        "responder": own_responder,
        "raw": raw_server.url,
        "refused": f"http://127.0.0.1:{free_port()}/v1",
        "unaccepting": unaccepting,
    }
    started: dict[bool, Proxy] = {}

    def get(timed: bool) -> Proxy:
        if timed not in started:
            routes = [
                route
                for name, case in FAULTS.items()
                if case.timed == timed
                for route in matrix_routes(name, case, urls)
            ]
            started[timed] = start_proxy(routes)
        return started[timed]

    return get


def sdk(proxy: Proxy) -> openai.OpenAI:
    return proxy.client(timeout=LIMIT)


def assert_envelope(body: Any) -> None:
    """The OpenAI error envelope: {"error": {"message": str, "type": str, ...}}."""
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("message"), str) and body["error"]["message"], body
    assert isinstance(body["error"].get("type"), str), body


def sse_data(raw: bytes) -> list[str]:
    """The data of each event, in order; fails on any line that is not a data line."""
    lines = [ln for ln in raw.decode().replace("\r\n", "\n").split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), [ln[:120] for ln in lines[:6]]
    return [ln.removeprefix("data: ") for ln in lines]


def stream_text(data: list[str]) -> str:
    text = []
    for item in data:
        for choice in json.loads(item).get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
    return "".join(text)


def post(
    proxy: Proxy, path: str, body: dict[str, Any], request_id: str
) -> tuple[httpx.Response, bytes, dict[str, Any]]:
    """POST on the wire under our own request id: the response, its raw bytes, and the one log
    record it left (exactly one, whatever went wrong); never a 500."""
    with (
        httpx.Client(timeout=httpx.Timeout(LIMIT)) as client,
        client.stream(
            "POST", proxy.base_url + path, json=body, headers={"x-request-id": request_id}
        ) as resp,
    ):
        raw = resp.read()
    assert resp.status_code != 500, raw
    (record,) = proxy.log_records(request_id)
    return resp, raw, record


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_through_the_sdk(
    matrix_proxies: Callable[[bool], Proxy], name: str, stream: bool
) -> None:
    case = FAULTS[name]
    client = sdk(matrix_proxies(case.timed))
    began = time.monotonic()

    def call() -> str:
        if not stream:
            reply = client.chat.completions.create(model=name, messages=USER)
            return reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(model=name, messages=USER, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    if case.ok_text is not None:
        assert call() == case.ok_text
        return
    with pytest.raises(openai.APIError) as info:
        call()
    err = info.value
    assert not isinstance(err, openai.APIConnectionError), f"no answer: {err!r}"  # a hang
    assert time.monotonic() - began < LIMIT
    if isinstance(err, openai.APIStatusError):
        assert err.status_code in case.status, (err.status_code, err.body)
        assert not (stream and case.started), "a started stream must stay a 200"
        assert_envelope({"error": err.body})
        if case.retry_after is not None:
            assert err.response.headers.get("retry-after") == case.retry_after
    else:  # the SDK raises APIError for an error event inside a 200 stream
        assert stream, f"a non-streamed answer failed without a status: {err!r}"
        assert err.message


@pytest.mark.parametrize("mode", ["messages", "prompt"])
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_on_the_wire(
    matrix_proxies: Callable[[bool], Proxy], name: str, stream: bool, mode: str
) -> None:
    case = FAULTS[name]
    proxy = matrix_proxies(case.timed)
    route = name if mode == "messages" else f"prompt-{name}"
    body = {"model": route, "messages": USER, "stream": stream}
    request_id = f"matrix-{route}-{stream}-{uuid.uuid4().hex[:8]}"

    def whole(text: str) -> bool:  # in prompt mode a parrot repeats the whole rendered prompt
        assert case.ok_text is not None
        return text == case.ok_text or (mode == "prompt" and case.ok_text in text)

    resp, raw, record = post(proxy, "/chat/completions", body, request_id)
    if case.ok_text is None:  # a failure is logged with its status, after a 200 too
        assert record["status"] in case.status and record["error"], record
    else:
        assert record["status"] == 200, record
    if case.ok_text is not None:
        assert resp.status_code == 200, raw
        if not stream:
            assert whole(json.loads(raw)["choices"][0]["message"]["content"]), raw
            return
        data = sse_data(raw)
        assert data[-1] == "[DONE]" and not any('"error"' in d for d in data), data[-3:]
        assert whole(stream_text(data[:-1])), data
        return
    if resp.status_code != 200:
        assert not (stream and case.started), "a started stream must stay a 200"
        assert resp.status_code in case.status, (resp.status_code, raw)
        assert resp.headers["content-type"].startswith("application/json")
        assert_envelope(json.loads(raw))
        if case.retry_after is not None:
            assert resp.headers.get("retry-after") == case.retry_after
        return
    assert stream, f"a non-streamed fault answered 200: {raw!r}"
    data = sse_data(raw)
    assert data[-1] == "[DONE]", data[-3:]
    assert '"error"' in data[-2], f"the stream did not end with an error event: {data[-3:]}"
    assert_envelope(json.loads(data[-2]))
    for item in data[:-2]:  # what came before the error: whole chunks, no error among them
        assert "choices" in json.loads(item), item
    if case.started:
        assert stream_text(data[:-2]), "the chunks sent before the fault reached the client"


def named_events(raw: bytes) -> list[tuple[str, Any]]:
    """A Responses stream as (event name, decoded data); fails on any line that is neither."""
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        lines = [ln for ln in block.split("\n") if ln]
        if not lines:
            continue
        assert [ln.split(": ", 1)[0] for ln in lines] == ["event", "data"], lines[:4]
        events.append((lines[0].removeprefix("event: "), json.loads(lines[1][6:])))
    return events


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("name", list(FAULTS))
def test_fault_on_the_responses_wire(
    matrix_proxies: Callable[[bool], Proxy], name: str, stream: bool
) -> None:
    """The same faults on /v1/responses: statuses as for chat; a stream that has answered 200
    ends with an `error` event that carries the OpenAI envelope (this API sends no [DONE])."""
    case = FAULTS[name]
    proxy = matrix_proxies(case.timed)
    request_id = f"matrix-responses-{name}-{stream}-{uuid.uuid4().hex[:8]}"
    body = {"model": name, "input": TEXT, "stream": stream}
    resp, raw, record = post(proxy, "/responses", body, request_id)
    if case.ok_text is not None:
        assert resp.status_code == 200 and record["status"] == 200, (raw[:300], record)
        if not stream:
            (message,) = json.loads(raw)["output"]
            assert message["content"][0]["text"] == case.ok_text
            return
        events = named_events(raw)
        assert events[-1][0] == "response.completed", events[-1]
        deltas = [e["delta"] for kind, e in events if kind == "response.output_text.delta"]
        assert "".join(deltas) == case.ok_text
        return
    assert record["status"] in case.status and record["error"], record
    if resp.status_code != 200:
        assert not (stream and case.started), "a started stream must stay a 200"
        assert resp.status_code in case.status, (resp.status_code, raw)
        assert_envelope(json.loads(raw))
        if case.retry_after is not None:
            assert resp.headers.get("retry-after") == case.retry_after
        return
    assert stream, f"a non-streamed fault answered 200: {raw[:300]!r}"
    events = named_events(raw)
    kind, error = events[-1]
    assert kind == "error" and error["type"] == "error", events[-3:]
    assert_envelope(error)
    assert all(kind.startswith("response.") for kind, _ in events[:-1]), events[:-1]
    if case.started:
        assert any(kind == "response.output_text.delta" for kind, _ in events), events


def test_an_interim_answer_leaves_the_connection_in_step(
    matrix_proxies: Callable[[bool], Proxy], raw_server: FaultServer
) -> None:
    """After a 1xx, the next requests on the pooled connection get their own answers (a client
    that took the 100 for the answer would hand the real one to the next request)."""
    client = sdk(matrix_proxies(False))
    for i in range(6):
        name = "interim-100" if i % 2 == 0 else "interim-103"
        text = f"question number {i}"
        reply = client.chat.completions.create(
            model=name, messages=[{"role": "user", "content": text}]
        )
        assert reply.choices[0].message.content == text
    assert raw_server.requests["interim-100"] >= 3 and raw_server.requests["interim-103"] >= 3


def test_pool_wait_is_bounded(start_proxy: Callable[..., Proxy], own_responder: str) -> None:
    """With every upstream connection busy, a request waits `pool` seconds for one, then gets
    an error: it does not queue for as long as the busy streams last."""
    proxy = start_proxy(
        [
            {
                "model": "slow",
                "upstream": own_responder,
                "upstream_model": "slow",
                "timeouts": {**TIMEOUTS, "pool": 0.5, "total": 8.0},
            }
        ],
        server={"max_connections": 2},
    )
    body = {"model": "slow", "messages": USER, "stream": True}
    url = proxy.base_url + "/chat/completions"
    with httpx.Client(timeout=httpx.Timeout(LIMIT)) as client:
        with (
            client.stream("POST", url, json=body) as one,
            client.stream("POST", url, json=body) as two,
        ):
            assert one.status_code == two.status_code == 200
            next(one.iter_bytes()), next(two.iter_bytes())  # both connections are in use
            began = time.monotonic()
            third = client.post(url, json={**body, "stream": False})
            waited = time.monotonic() - began
        assert third.status_code in (503, 504), third.text
        assert_envelope(third.json())
        assert waited < 3.0, waited


# ---- replicas ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_replica() -> Iterator[str]:
    with procs.responder(tokens=8) as url:
        yield url


@pytest.fixture(scope="module")
def sick_replicas() -> Iterator[dict[str, str]]:
    """One failing responder per fault: every request it gets is answered that way."""
    with (
        procs.responder(tokens=8, fault="error-503") as e503,
        procs.responder(tokens=8, fault="error-500") as e500,
        procs.responder(tokens=8, fault="drop-mid-stream") as drop,
    ):
        yield {"error-503": e503, "error-500": e500, "drop-mid-stream": drop}


@pytest.fixture(scope="module")
def replica_proxy(
    start_proxy: Callable[..., Proxy], good_replica: str, sick_replicas: dict[str, str]
) -> Proxy:
    """Routes of two replicas, the failing one listed first; `upstream_model` is the route's
    name, so the healthy responder's count of it is the requests that reached it."""
    sick = {"refused": f"http://127.0.0.1:{free_port()}/v1", **sick_replicas}
    routes = [
        {
            "model": f"pair-{name}",
            "upstream": [url, good_replica],
            "upstream_model": f"pair-{name}",
            "template": "chat:llama",
        }
        for name, url in sick.items()
    ]
    return start_proxy(routes, server={"cooldown_s": COOLDOWN_S})


def counted(url: str, model: str) -> int:
    """The requests a responder got for `model` (under its --fault name for a failing one)."""
    stats = httpx.get(url.removesuffix("/v1") + "/debug/stats", timeout=5).json()
    return int(stats["by_model"].get(model, 0))


def ask(proxy: Proxy, route: str, stream: bool) -> str:
    client = sdk(proxy)
    if not stream:
        reply = client.chat.completions.create(model=route, messages=USER)
        return reply.choices[0].message.content or ""
    chunks = client.chat.completions.create(model=route, messages=USER, stream=True)
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


KIND = {"refused": "connect", "error-503": "status", "error-500": "status"}  # the metric's label


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("sick", sorted(KIND))
def test_a_failing_replica_is_skipped_and_cools_down(
    replica_proxy: Proxy,
    good_replica: str,
    sick_replicas: dict[str, str],
    sick: str,
    stream: bool,
) -> None:
    """Every request succeeds (one not yet streaming moves to the healthy replica); the failing
    replica is not tried again until its cooldown ends, and is tried again after."""
    route = f"pair-{sick}"
    answer = " ".join(["tok"] * 8)

    def tried() -> int:
        return counted(sick_replicas[sick], sick) if sick in sick_replicas else 0

    def failovers() -> float:  # the route's upstream errors of the sick replica's kind
        return replica_proxy.metric("ptst_upstream_errors_total", route=route, kind=KIND[sick])

    time.sleep(COOLDOWN_S + 0.5)  # whatever an earlier case left cooling has cooled
    before, counted_before = tried(), failovers()
    for _ in range(4):  # until the failing replica has been tried (it is listed first)
        assert ask(replica_proxy, route, stream) == answer
        if failovers() > counted_before:
            break
    assert failovers() == counted_before + 1  # not lost for the request having succeeded
    if sick not in sick_replicas:
        return  # a refused connection leaves no count to read
    assert tried() == before + 1
    cooling = time.monotonic()
    good = counted(good_replica, route)
    for _ in range(6):
        assert ask(replica_proxy, route, stream) == answer
    assert time.monotonic() - cooling < COOLDOWN_S, "the check ran past the cooldown"
    assert tried() == before + 1, "a replica in its cooldown was tried"
    assert counted(good_replica, route) == good + 6
    time.sleep(COOLDOWN_S + 0.5)
    for _ in range(4):
        assert ask(replica_proxy, route, stream) == answer
        if tried() > before + 1:
            break
    assert tried() == before + 2, "the cooldown ended but the replica was not tried again"


def test_a_started_stream_is_not_restarted(
    replica_proxy: Proxy, good_replica: str, sick_replicas: dict[str, str]
) -> None:
    """A stream cut after its first chunks ends with an error event; the request is not sent
    to the other replica, whose answer would be spliced onto the first one's."""
    route = "pair-drop-mid-stream"
    time.sleep(COOLDOWN_S + 0.5)
    body = {"model": route, "messages": USER, "stream": True}
    for _ in range(4):  # until a stream lands on the failing replica
        cut_before = counted(sick_replicas["drop-mid-stream"], "drop-mid-stream")
        good_before = counted(good_replica, route)
        with httpx.stream(
            "POST", replica_proxy.base_url + "/chat/completions", json=body, timeout=LIMIT
        ) as resp:
            raw = resp.read()
        assert resp.status_code == 200, raw
        data = sse_data(raw)
        assert data[-1] == "[DONE]"
        if counted(sick_replicas["drop-mid-stream"], "drop-mid-stream") == cut_before:
            assert not any('"error"' in d for d in data)
            continue
        assert_envelope(json.loads(data[-2]))
        assert stream_text(data[:-2]) == "tok ", data  # the cut answer's first token, alone
        roles = [d for d in data[:-2] if '"role"' in d]
        assert len(roles) == 1, "a second answer began in the same stream"
        assert counted(good_replica, route) == good_before, "the stream was restarted"
        return
    pytest.fail("no stream reached the failing replica")


# ---- real vLLM -------------------------------------------------------------------------------


def vllm_running(vllm_url: str) -> float:
    """vLLM's gauge of requests being generated (summed over its label sets)."""
    text = httpx.get(vllm_url.removesuffix("/v1") + "/metrics", timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running")
    ]
    assert values, "vLLM's /metrics has no vllm:num_requests_running"
    return sum(values)


WINDOW_S = 5.0  # for vLLM to drop a request whose client left


@pytest.mark.vllm
def test_client_disconnect_cancels_the_vllm_request(demo_proxy: Proxy, vllm_url: str) -> None:
    """A client that leaves mid-stream ends the generation upstream: vLLM's running-requests
    gauge is back to 0 within seconds, long before the 1,500 tokens asked for were written."""
    settle = time.monotonic()
    while vllm_running(vllm_url) > 0:  # an earlier test's request, still being dropped
        assert time.monotonic() - settle < WINDOW_S, "vLLM is busy before the test"
        time.sleep(0.2)
    client = demo_proxy.client(timeout=120)
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "Count from one to ten thousand, in words."}],
        stream=True,
        max_tokens=1500,  # the demo server's context is 2,048 tokens, the prompt included
        extra_body={"ignore_eos": True, "min_tokens": 1500},
    )
    began = 0.0
    for n, _ in enumerate(stream, 1):  # about one token per chunk
        if n == 5:
            began = time.monotonic()
        if n == 25:
            break
    rate = 20 / (time.monotonic() - began)
    rest = (1500 - 25) / rate
    assert rest > 3 * WINDOW_S, f"{rate:.0f} tokens/s: the rest ({rest:.1f} s) is too short to tell"
    assert vllm_running(vllm_url) >= 1, "the generation should still be running"
    stream.close()
    left = time.monotonic()
    while vllm_running(vllm_url) > 0:
        assert time.monotonic() - left < WINDOW_S, "vLLM kept generating after the client left"
        time.sleep(0.2)
    print(f"vLLM at {rate:.0f} tokens/s; running 0 after {time.monotonic() - left:.1f} s")
