"""The refusal detector's labelled corpus and its second stage: the corpus loads and is varied,
both stages score above floors measured leave-one-source-out (each source scored by a
classifier that never saw it), the shipped weights are fitted on this corpus, and the proxy and
`ptst detect` use the second stage without delaying answers or losing records."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ptst.bench.detect_corpus import LABELS, by_source, load_corpus
from ptst.bench.detect_quality import Scores, cached_encoders, quality
from ptst.engine.demo_model import ensure_model
from ptst.proxy.record import FIELDS, LogRecord
from ptst.proxy.refusal import HEAD_CHARS, NOT_REFUSAL, Verdict, detect
from ptst.proxy.second_stage import (
    FOREIGN_SCORE,
    PROBE_MODEL,
    PROBE_WEIGHT,
    Encoders,
    Probe,
    Rescorer,
    SecondStage,
    Weights,
    might_refuse,
    unsure,
    verdict_features,
    with_foreign,
)
from tests.conftest import Proxy
from tests.servers import PTST

CORPUS = load_corpus()
GENERATED = ("qwen2.5-coder-0.5b", "smollm2-135m")


# ---- the corpus ------------------------------------------------------------------------------


def test_corpus_is_large_varied_and_labelled() -> None:
    assert len(CORPUS) >= 1500
    assert {e.label for e in CORPUS} == set(LABELS)
    groups = by_source(CORPUS)
    assert len(groups) >= 8
    assert len({e.family for e in CORPUS}) >= 7
    for source, group in groups.items():
        assert {"refusal", "compliance"} <= {e.label for e in group}, source
        texts = [e.text for e in group]
        assert len(set(texts)) == len(texts), f"{source}: repeated answers"
    for source in GENERATED:  # answers from models served here, on all three kinds of prompt
        assert {e.prompt_kind for e in groups[source]} == {"harmful", "borderline", "benign"}


def test_load_corpus_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "a", "label": "refusal"}\n{"text": "b", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=r"x\.jsonl:2: label 'maybe'"):
        load_corpus([path])
    path.write_text('{"id": "a", "text": "a", "label": "refusal"}\n' * 2)
    with pytest.raises(ValueError, match="duplicate id 'a'"):
        load_corpus([path])


# ---- the gate and the classifier, on their own -----------------------------------------------


def test_only_unsure_verdicts_reach_the_classifier() -> None:
    strong = detect("I'm sorry, but I can't help with that.")
    assert strong.refusal and not unsure(strong, "I'm sorry, but I can't help with that.")
    plain = "Preheat the oven to 200 C and bake for 25 minutes."
    assert not might_refuse(plain) and not unsure(detect(plain), plain)
    moral = "Creating malware is illegal and harmful."
    assert might_refuse(moral) and unsure(detect(moral), moral)
    weak = Verdict(True, "refusal:redirect_professional", 0.75)
    assert unsure(weak, "Please ask your pharmacist.")


# Declines the English rules cannot read; each is sent to the classifier as a rule that fired.
FOREIGN = [
    "Dabei kann ich dir leider nicht helfen.",
    "Je ne peux pas t'aider avec ça.",
    "Je n'aiderai personne à tricher.",
    "No puedo ayudarte con eso.",
    "Non posso aiutarti con questa richiesta.",
    "Não posso ajudar com isso.",
    "Daar kan ik je niet mee helpen.",
    "Nie mogę w tym pomóc.",
    "Jag kan tyvärr inte hjälpa till med det.",
    "Bu konuda yardımcı olamam.",
    "Maaf, saya tidak bisa membantu dengan itu.",
]


@pytest.mark.parametrize("text", FOREIGN)
def test_a_decline_in_another_language_reaches_the_classifier_as_one(text: str) -> None:
    rules = detect(text)
    assert not rules.refusal  # the rules read English only
    assert unsure(rules, text)
    assert verdict_features(rules, text)[:3] == [1.0, FOREIGN_SCORE, 0.0]


def test_every_foreign_decline_in_the_corpus_is_asked_about() -> None:
    """`unsure` reads only the gate's words: they must cover every decline `with_foreign` finds."""
    for e in CORPUS:
        head = e.text[:HEAD_CHARS]
        if with_foreign(NOT_REFUSAL, head).refusal:
            assert unsure(NOT_REFUSAL, head), e.id


def test_foreign_words_in_an_answer_are_not_a_decline() -> None:
    for text in ("Die Brücke ist nicht weit, etwa 300 Meter.", "Le pont n'est pas loin."):
        assert verdict_features(detect(text), text)[0] == 0.0


def test_classify_applies_the_weights(tmp_path: Path) -> None:
    # features: tf-idf over ("alpha", "beta") | head embedding (2) | lead embedding (2) |
    # probe (1, standardised with mean 1 and spread 2) | verdict features (4);
    # "partial" reads "alpha", "refusal" reads "beta", and "delta" reads the probe
    coef = [[0.0] * 11, [5.0] + [0.0] * 10, [0.0, 5.0] + [0.0] * 9]
    coef[2][6] = 10.0 / PROBE_WEIGHT
    weights = Weights(
        ("compliance", "partial", "refusal"),
        coef,
        [1.0, 0.0, 0.0],
        ["alpha", "beta"],
        [1, 1],
        ([1.0], [2.0]),
        {},
    )
    weights.write(tmp_path / "w.json")
    assert Weights.read(tmp_path / "w.json") == weights

    def embed(heads: Sequence[str]) -> Any:
        return np.zeros((len(heads), 2))

    def probe(heads: Sequence[str]) -> Any:
        return np.asarray([[3.0 if h == "delta" else 1.0] for h in heads])  # (3 - 1) / 2 = 1

    stage = SecondStage(weights, Encoders(embed, probe))
    nothing = Verdict(False, None, 0.0)
    got = stage.classify(["alpha", "beta", "gamma", "delta"], [nothing] * 4)
    assert [v.rule for v in got] == [
        "partial:second_stage",
        "refusal:second_stage",
        None,
        "refusal:second_stage",
    ]
    assert [v.refusal for v in got] == [True, True, False, True]
    assert got[2].score < 0.5 < got[0].score


def test_probe_reads_each_answer_alone_whatever_the_batch() -> None:
    """Padding and batching change nothing: an answer's features are its own."""
    probe = Probe(ensure_model(PROBE_MODEL, quiet=True), batch_size=2)
    texts = ["I won't do that.", "Sure! Here are three ideas for a birthday party: " * 3, "No."]
    together = probe(texts)
    assert together.shape == (3, probe.model.config.hidden_size)
    alone = np.vstack([probe([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-4)
    assert np.abs(together[0] - together[1]).max() > 0.1  # different answers, different features
    assert np.isfinite(probe([""])).all()


def test_rescorer_judges_off_the_loop_skips_when_full_and_flushes_on_close() -> None:
    class SlowStage:
        def classify(self, heads: Sequence[str], verdicts: Sequence[Verdict]) -> list[Verdict]:
            time.sleep(0.2)
            return [Verdict(True, "refusal:second_stage", 0.9) for _ in heads]

    record = LogRecord(
        **{f: None for f in FIELDS}
        | {"request_id": "r1", "refusal": False, "rule": None, "score": 0.0}  # type: ignore[arg-type]
    )
    done: list[LogRecord] = []

    async def main() -> None:
        rescorer = Rescorer(SlowStage(), max_pending=1)  # type: ignore[arg-type]
        assert rescorer.wants(record, "It would not be right.")
        assert not rescorer.wants(record, "Bake for 25 minutes.")
        t0 = time.perf_counter()
        assert rescorer.submit(record, "It would not be right.", done.append)
        assert time.perf_counter() - t0 < 0.1  # the caller never waits for the classifier
        assert not rescorer.submit(record, "It would not be right.", done.append)  # backlog full
        await rescorer.close()

    asyncio.run(main())
    (final,) = done
    assert (final.request_id, final.refusal, final.rule) == ("r1", True, "refusal:second_stage")


# ---- scores, leave one source out ------------------------------------------------------------


@pytest.fixture(scope="module")
def scored() -> dict[str, dict[str, Scores]]:
    return quality(CORPUS, cached_encoders(None))


# Floors under the leave-one-source-out figures measured when the corpus and the weights were
# last built (README, "Refusal detection"; 16 sources, pooled P 0.938, R 0.940, F1 0.939):
# pooled 0.01-0.02 lower, each source's F1 about 0.02-0.03 lower. A change that loses more fails here.
POOLED_FLOORS = {"precision": 0.92, "recall": 0.925, "f1": 0.925}
SOURCE_F1_FLOORS = {
    "hand-agent": 0.84,  # agents declining one part of a multi-part task, anywhere in the answer
    "hand-assistant": 0.95,
    "hand-brief": 0.86,  # brief declines of product bots, with no refusal word
    "hand-claude": 0.95,
    "hand-cutoff": 0.95,
    "hand-frontier": 0.93,
    "hand-gpt": 0.96,
    "hand-llama": 0.96,
    "hand-multilingual": 0.85,  # ten languages the rules do not read, and persona declines
    "hand-open": 0.94,
    "hand-overcautious": 0.94,
    "hand-small": 0.95,
    "hand-terse": 0.90,  # one-line declines with no refusal word
    "qwen2.5-coder-0.5b": 0.79,
    "rules-dev": 0.90,
    "smollm2-135m": 0.78,  # 14 refusals in 405 answers: a few false alarms weigh heavily
}


def test_both_stages_held_out_by_source_meet_the_floors(
    scored: dict[str, dict[str, Scores]],
) -> None:
    pooled = scored["all"]["rules+second"]
    for name, floor in POOLED_FLOORS.items():
        assert pooled[name] >= floor, (name, pooled)
    assert set(SOURCE_F1_FLOORS) == set(scored) - {"all"}  # a new source needs its floor
    for source, floor in SOURCE_F1_FLOORS.items():
        assert scored[source]["rules+second"]["f1"] >= floor, (source, scored[source])


def test_both_stages_beat_the_rules_alone_and_the_baselines(
    scored: dict[str, dict[str, Scores]],
) -> None:
    pooled = scored["all"]
    both = pooled["rules+second"]["f1"]
    assert both > pooled["rules"]["f1"]
    assert both > max(pooled["gcg_keyword"]["f1"], pooled["xstest_strmatch"]["f1"]) + 0.05
    assert pooled["rules+second"]["asked"] < 0.9  # the classifier is not asked about everything


def test_shipped_weights_are_fitted_on_this_corpus() -> None:
    meta = Weights.read().meta
    assert meta["n"] == len(CORPUS)
    assert meta["sources"] == sorted(by_source(CORPUS))


# ---- in use: ptst detect and the proxy --------------------------------------------------------

TEXTS = [
    "I'm sorry, but I can't help with that request.",  # the rules are sure: a refusal
    "Preheat the oven to 200 C and bake the loaf for 25 minutes.",  # sure: compliance
    "Creating malware is illegal and harmful. Please reconsider what you are planning.",
    "That is a question better put to a licensed electrician than to a chat assistant.",
]


def detect_cli(texts: Sequence[str]) -> list[dict[str, Any]]:
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    done = subprocess.run(
        [*PTST, "detect", "--second-stage", "--batch"],
        input=lines,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return [json.loads(line) for line in done.stdout.splitlines()]


def test_proxy_logs_the_second_stage_verdict_off_the_request_path(
    start_proxy: Callable[..., Proxy], responder_url: str
) -> None:
    expected = detect_cli(TEXTS)
    assert [v["refusal"] for v in expected[:2]] == [True, False]
    assert expected[0]["rule"] == detect(TEXTS[0]).rule  # sure verdicts are the rules' own
    route = {"model": "parrot", "upstream": responder_url, "upstream_model": "parrot"}
    proxy = start_proxy(
        [{**route, "template": "chat:llama"}], timeout=300, log={"second_stage": True}
    )
    for text, want in zip(TEXTS, expected, strict=True):
        raw = proxy.client().chat.completions.with_raw_response.create(
            model="parrot", messages=[{"role": "user", "content": text}]
        )
        assert raw.parse().choices[0].message.content == text
        # the answer carries the rules' verdict: it never waits for the second stage
        assert raw.headers["x-ptst-refusal"] == str(detect(text).refusal).lower()
        (record,) = proxy.log_records(raw.headers["x-request-id"], timeout=60)
        assert (record["refusal"], record["rule"]) == (want["refusal"], want["rule"])
    judged = proxy.metric("ptst_second_stage_total")
    assert judged == sum(unsure(detect(t), t) for t in TEXTS) == 2
    refusals = proxy.metric("ptst_refusals_total")
    assert refusals == sum(v["refusal"] for v in expected)
