"""Scores of the refusal detector on the labelled corpus, per source, leave-one-source-out.

    quality(examples) -> {source: {detector: scores}}

Detectors: `rules` (the proxy's rule stage), `rules+second` (both stages; for each source the
classifier is fitted on every *other* source, so no score is measured on answers it was
trained on), and the two public string-match baselines. Positive = full or partial refusal.
The row `all` pools every source's held-out predictions. The classifier is fitted on the
answers the rules are unsure of (`unsure`): the only ones it is ever asked about.

`fit_weights(examples)` fits the classifier on every source: the weights the proxy ships.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptst.bench.baselines import BASELINES
from ptst.bench.detect_corpus import LABELS, Example, by_source
from ptst.engine.demo_model import ensure_model
from ptst.extras import require
from ptst.proxy.refusal import HEAD_CHARS, detect
from ptst.proxy.second_stage import (
    PROBE_MODEL,
    THRESHOLD,
    Embedder,
    Encoders,
    Featurizer,
    Probe,
    SecondStage,
    Weights,
    unsure,
)

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

Scores = dict[str, float]
# The logistic regression's inverse regularisation. C and the decision threshold
# (second_stage.THRESHOLD) were chosen among a few values on the pooled leave-one-source-out F1.
C = 10.0


def scores(predicted: Iterable[bool], actual: Iterable[bool]) -> Scores:
    """Precision, recall and F1 for the positive class (refusal or partial refusal)."""
    pairs = list(zip(predicted, actual, strict=True))
    tp = sum(p and a for p, a in pairs)
    fp = sum(p and not a for p, a in pairs)
    fn = sum(a and not p for p, a in pairs)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "n": float(len(pairs))}


class EmbeddingCache:
    """An encoder's vectors of answer heads (`make()` builds the encoder on the first miss),
    kept in an .npz keyed by the head's SHA-256, so that repeated runs encode only new
    answers."""

    def __init__(
        self, path: Path | None, make: Callable[[], Callable[[Sequence[str]], Any]]
    ) -> None:
        self.np = require("numpy", "detect")
        self.path = path
        self.make = make
        self._embed: Callable[[Sequence[str]], Any] | None = None  # loaded on first miss
        self.known: dict[str, Any] = {}
        if path is not None and path.is_file():
            with self.np.load(path) as data:
                self.known = {key: data[key] for key in data.files}

    def __call__(self, heads: Sequence[str]) -> NDArray[np.float32]:
        keys = [hashlib.sha256(h.encode()).hexdigest() for h in heads]
        todo = sorted(
            {k: h for k, h in zip(keys, heads, strict=True) if k not in self.known}.items()
        )
        if todo:
            if self._embed is None:
                self._embed = self.make()
            vectors = self._embed([h for _, h in todo])
            self.known.update({k: v for (k, _), v in zip(todo, vectors, strict=True)})
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.np.savez(self.path, **self.known)
        return self.np.stack([self.known[k] for k in keys])


def probe() -> Probe:
    """The probe, its model built first if need be."""
    return Probe(ensure_model(PROBE_MODEL, quiet=True))


def cached_encoders(folder: Path | None) -> Encoders:
    """The second stage's encoders, each with its cache in `folder` (None: no cache)."""
    if folder is None:
        return Encoders(EmbeddingCache(None, Embedder), EmbeddingCache(None, probe))
    return Encoders(
        EmbeddingCache(folder / "embeddings.npz", Embedder),
        EmbeddingCache(folder / "probe.npz", probe),
    )


def fit(
    examples: Sequence[Example], encoders: Encoders, meta: dict[str, Any] | None = None
) -> Weights:
    """The classifier fitted on the `examples` the rules are unsure of (vocabulary, idf, the
    probe's scale and coefficients)."""
    linear = require("sklearn.linear_model", "detect")
    judged = [(e, e.text[:HEAD_CHARS], detect(e.text)) for e in examples]
    asked = [(e, head, verdict) for e, head, verdict in judged if unsure(verdict, head)]
    heads = [head for _, head, _ in asked]
    features = Featurizer.fit(heads, encoders)
    model = linear.LogisticRegression(C=C, max_iter=5000, class_weight="balanced")
    model.fit(features(heads, [v for _, _, v in asked]), [e.label for e, _, _ in asked])
    classes = tuple(str(c) for c in model.classes_)
    if set(classes) != set(LABELS):
        raise ValueError(f"the training answers need all of {LABELS}, got {classes}")
    return Weights(
        classes,
        model.coef_.tolist(),
        model.intercept_.tolist(),
        features.vocabulary,
        features.vectorizer.idf_.tolist(),
        (features.mean.tolist(), features.spread.tolist()),
        meta or {},
    )


def fit_weights(examples: Sequence[Example], encoders: Encoders) -> Weights:
    """The classifier fitted on every source: the weights the proxy ships."""
    sources = sorted({e.source for e in examples})
    meta = {"sources": sources, "n": len(examples), "C": C, "threshold": THRESHOLD}
    return fit(examples, encoders, meta)


def quality(
    examples: Sequence[Example], encoders: Encoders | None = None
) -> dict[str, dict[str, Scores]]:
    """Scores per source and detector; with `encoders`, also both stages, leave-one-source-out."""
    groups = by_source(examples)
    verdicts = {e.id: detect(e.text) for e in examples}
    predicted: dict[str, dict[str, bool]] = {"rules": {k: v.refusal for k, v in verdicts.items()}}
    for name, fn in BASELINES.items():
        predicted[name] = {e.id: fn(e.text) for e in examples}
    asked = {e.id: unsure(verdicts[e.id], e.text[:HEAD_CHARS]) for e in examples}
    if encoders is not None:
        both: dict[str, bool] = {}
        for source, held_out in groups.items():
            weights = fit([e for e in examples if e.source != source], encoders)
            stage = SecondStage(weights, encoders)
            judged = stage.judge_many([e.text for e in held_out])  # what `ptst detect` runs
            both.update({e.id: v.refusal for e, v in zip(held_out, judged, strict=True)})
        predicted["rules+second"] = both
    result: dict[str, dict[str, Scores]] = {}
    for source, group in [*groups.items(), ("all", list(examples))]:
        actual = [e.positive for e in group]
        result[source] = {
            name: scores((pred[e.id] for e in group), actual) for name, pred in predicted.items()
        }
        if encoders is not None:
            result[source]["rules+second"]["asked"] = sum(asked[e.id] for e in group) / len(group)
    return result


def table(result: dict[str, dict[str, Scores]]) -> str:
    """A Markdown table: one row per source and detector."""
    lines = [
        "| source | detector | n | precision | recall | F1 |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for source, by_name in result.items():
        for name, s in by_name.items():
            asked = f" (stage 2 asked on {s['asked']:.0%})" if "asked" in s else ""
            lines.append(
                f"| {source} | {name}{asked} | {s['n']:.0f} | {s['precision']:.3f} "
                f"| {s['recall']:.3f} | {s['f1']:.3f} |"
            )
    return "\n".join(lines)
