"""The extractive reader: the answer is the passages' own best sentences, cited to the character.

No generator runs. Every sentence of the retrieved passages is a candidate answer, scored
against the question by two signals that fail differently:

* **dense**: cosine between the question and the sentence under the retrieval embedder (the
  query side with its instruction; the sentence prefixed with its document title, because
  "It partitions the GPU into up to seven instances." means little without knowing that the
  document is about MIG), or, when ``retrieval.rerank.model`` names a cross-encoder, that
  cross-encoder's probability for the (question, sentence) pair;
* **lexical**: BM25-style coverage, the IDF-weighted share of the question's analysed terms
  (the BM25 analyser: stop words out, Snowball stems) that the sentence or its title contains,
  with IDF over the candidate sentences. A rare question term ("DRA", an env var) that a
  sentence contains weighs most; a question term that no candidate contains pulls every
  candidate down, which is what makes the score useful for abstention.

``score = dense_weight * dense + (1 - dense_weight) * lexical``, both on an absolute 0..1
scale, so one threshold (``generator.abstain_below``, calibrated on the answer-quality
benchmark) separates "the passages answer this" from "they do not".

The answer is the top sentence plus up to ``max_sentences - 1`` more whose score is within
``keep_ratio`` of it, each followed by its ``[n]`` citation. Each citation carries the exact
span: ``doc_id``, ``chunk_id`` and ``start``/``end`` character offsets into the passage text
(the chunk's text unless ``retrieval.expand_neighbors`` merged neighbours into it), so
``passage.text[start:end] == quote``. Sentences that :mod:`~ragops.retrieval.injection`
redacted, headings and fragments with fewer than ``min_words`` content words are never
candidates.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragops.errors import InputError
from ragops.retrieval.decoding import GenerationTimings, ResultStream
from ragops.retrieval.injection import REDACTED, neutralize
from ragops.retrieval.prompts import Passage, as_passages
from ragops.retrieval.support import content_words
from ragops.sparse import BM25Encoder

#: Sentence ends: ., ! or ? before whitespace (not a "1." list marker), and line breaks.
_BOUNDARY = re.compile(r"(?<=[.!?])(?<!^\d\.)(?<!^\d\d\.)[ \t]+|\s*\n\s*", re.MULTILINE)
#: List markers and heading hashes trimmed from the start of a quote.
_LEAD = re.compile(r"(?:#{1,6}\s+|[-*+•]\s+|\d{1,3}[.)]\s+|>\s+)+")
#: A quote longer than this is cut at a word boundary (tables and lists without full stops).
MAX_QUOTE_CHARS = 400


@dataclass(frozen=True)
class Candidate:
    """One candidate answer sentence.

    Attributes:
        n: Number of the passage it comes from.
        start: Offset of its first character in the passage text.
        end: Offset after its last character (``passage.text[start:end] == text``).
        text: The sentence.
        dense: Question–sentence similarity, 0..1.
        lexical: IDF-weighted share of the question's terms the sentence covers, 0..1.
        score: The combined score (see the module docstring).
    """

    n: int
    start: int
    end: int
    text: str
    dense: float
    lexical: float
    score: float


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of ``text``: trimmed of whitespace and list markers.

    A sentence that ends in a colon keeps the list or lines right after it (up to the next
    blank line, at most :data:`MAX_QUOTE_CHARS`): "the common profiles are:" says nothing
    without its items.
    """
    spans = _plain_spans(text)
    out: list[tuple[int, int]] = []
    for s, e in spans:
        if text[e - 1 : e] == ":":
            stop = text.find("\n\n", e)
            stop = len(text) if stop < 0 else stop
            stop = min(stop, s + MAX_QUOTE_CHARS)
            while stop > e and text[stop - 1].isspace():
                stop -= 1
            if stop > e:
                out.append((s, stop))
                continue
        out.append((s, e))
    return out


def _plain_spans(text: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in [*_BOUNDARY.finditer(text), None]:
        end = m.start() if m else len(text)
        s, e = pos, end
        while s < e and text[s].isspace():
            s += 1
        lead = _LEAD.match(text, s, e)
        if lead:
            s = lead.end()
        while e > s and text[e - 1].isspace():
            e -= 1
        if e - s > MAX_QUOTE_CHARS:
            cut = text.rfind(" ", s, s + MAX_QUOTE_CHARS)
            e = cut if cut > s else s + MAX_QUOTE_CHARS
        if s < e:
            spans.append((s, e))
        pos = m.end() if m else len(text)
    return spans


class SentenceScorer:
    """Scores the passages' sentences against a question (dense or cross-encoder, and BM25).

    Args:
        embedder: A :class:`~ragops.embeddings.TextEmbedder` (or anything with
            ``encode_queries``/``encode_passages`` returning normalised rows).
        cross_encoder: Optional :class:`~ragops.retrieval.rerank.Reranker`; replaces the dense
            signal when given.
        bm25: The analyser of lexical terms (the collection's, so stems agree with retrieval).
        dense_weight: Weight of the dense signal in the score.
        min_words: Fewest content words a candidate sentence must have.
    """

    def __init__(
        self,
        embedder: Any,
        *,
        cross_encoder: Any = None,
        bm25: BM25Encoder | None = None,
        dense_weight: float = 0.5,
        min_words: int = 3,
    ) -> None:
        if not 0 <= dense_weight <= 1:
            raise InputError(f"dense_weight must be in [0, 1] (got {dense_weight})")
        self.embedder = embedder
        self.cross_encoder = cross_encoder
        self.bm25 = bm25 or BM25Encoder()
        self.dense_weight = dense_weight
        self.min_words = min_words

    def candidates(self, question: str, passages: Sequence[Passage]) -> list[Candidate]:
        """Every eligible sentence of ``passages``, best first."""
        raw: list[tuple[Passage, int, int]] = []
        for p in passages:
            for s, e in sentence_spans(p.text):
                sentence = p.text[s:e]
                if REDACTED in sentence or len(content_words(sentence)) < self.min_words:
                    continue
                raw.append((p, s, e))
        if not raw:
            return []
        texts = [p.text[s:e] for p, s, e in raw]
        contexts = [f"{p.title}: {t}" if p.title else t for (p, _, _), t in zip(raw, texts)]
        dense = self._dense(question, contexts)
        lexical = self._lexical(question, texts, [p.title or "" for p, _, _ in raw])
        w = self.dense_weight
        defines = _definition_patterns(question)
        # A name the question asks about ("Milvus", "B200", "--swap-space") that no passage
        # mentions means the passages are about something else, however close the topic.
        pool = " ".join(f"{p.title or ''} {p.text}" for p in passages).lower()
        missing = [t for t in named_terms(question) if t.lower() not in pool]
        damp = MISSING_NAME_FACTOR ** min(len(missing), 2)
        out = [
            Candidate(n=p.n, start=s, end=e, text=t, dense=d, lexical=lx,
                      score=damp * min(1.0, w * d + (1 - w) * lx + (DEFINITION_BONUS if any(r.match(t) for r in defines) else 0.0)))
            for (p, s, e), t, d, lx in zip(raw, texts, dense, lexical)
        ]  # fmt: skip
        # Ties (equal scores) keep the retrieval order: the better-ranked passage first.
        return sorted(out, key=lambda c: -c.score)

    def _dense(self, question: str, texts: list[str]) -> list[float]:
        if self.cross_encoder is not None:
            logits = self.cross_encoder.score_pairs([(question, t) for t in texts])
            return [1.0 / (1.0 + math.exp(-float(x))) for x in logits]
        q = np.asarray(self.embedder.encode_queries([question]), dtype=np.float32)[0]
        m = np.asarray(self.embedder.encode_passages(texts), dtype=np.float32)
        sims = m @ q / (np.linalg.norm(m, axis=1) * (np.linalg.norm(q) or 1.0) + 1e-9)
        return [float(max(0.0, s)) for s in sims]

    def _lexical(self, question: str, texts: list[str], titles: list[str]) -> list[float]:
        q_terms = set(self.bm25.tokenize(question))
        if not q_terms:
            return [0.0] * len(texts)
        docs = [set(self.bm25.tokenize(t)) for t in texts]
        heads = [set(self.bm25.tokenize(t)) for t in titles]
        for acronym, expansion in _acronyms(question):
            # "What does DRA stand for?": a sentence that spells the acronym out contains it.
            for d, t in zip(docs, texts):
                if expansion.search(t):
                    d.update(self.bm25.tokenize(acronym))
        n = len(docs)
        df = {t: sum(t in d or t in h for d, h in zip(docs, heads)) for t in q_terms}
        # Terms no candidate holds ("stand", "maximum") cannot tell candidates apart; they only
        # lower the coverage that abstention reads (see `coverage` below).
        present = [t for t in q_terms if df[t]]
        if not present:
            return [0.0] * n
        # BM25's IDF (Robertson–Spärck Jones, +1 so that a term every candidate holds still
        # counts) over the candidates, so a rare question term weighs most.
        weight = {t: 1.0 + math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5)) for t in present}
        total = sum(weight.values())
        coverage = len(present) / len(q_terms)
        # Coverage of the question by the whole pool scales every candidate: passages that hold
        # half the question's terms are weaker evidence than passages that hold all of them.
        scale = coverage**0.5
        # A term only in the document's title counts half: the sentence itself should say it.
        return [scale * sum(weight[t] * (1.0 if t in d else 0.5 if t in h else 0.0) for t in present) / total
                for d, h in zip(docs, heads)]  # fmt: skip


#: Score factor per name in the question that no passage mentions (at most two count).
MISSING_NAME_FACTOR = 0.7
_NAME = re.compile(r"(?<!\w)[A-Za-z0-9][\w.+/-]*[A-Za-z0-9]|(?<!\w)[A-Z0-9]")


def named_terms(question: str) -> list[str]:
    """Terms of the question that name something: capitals inside, digits, or inner - _ .

    The first word is skipped (sentence case is not a name); a possessive "'s" is dropped.
    """
    out = []
    for i, m in enumerate(_NAME.finditer(question.replace("’", "'"))):
        term = m.group(0)
        term = term[:-2] if term.endswith("'s") else term
        if i == 0 or len(term) < 2:
            continue
        if any(c.isupper() for c in term) or any(c.isdigit() for c in term) or any(c in "-_." for c in term[1:-1]):
            out.append(term)
    return out


#: Added to the score of a sentence that defines what a "What is X?" question asks about.
DEFINITION_BONUS = 0.25
_DEFINITION_Q = re.compile(r"^\s*(?:what\s+(?:is|are|does)|define|explain)\b", re.IGNORECASE)


def _definition_patterns(question: str) -> list[re.Pattern[str]]:
    """Patterns of a sentence that opens by defining the question's acronym(s).

    "What is MPS?" / "What does DRA stand for?": a sentence that starts with the acronym or its
    spelled-out form, followed by "is", "are", "(", "," or "stands for", is the definition the
    question wants, even where the embedder prefers a sentence that merely uses the term.
    """
    if not _DEFINITION_Q.match(question):
        return []
    out = []
    for acronym, expansion in _acronyms(question):
        subject = rf"(?:{re.escape(acronym)}|{expansion.pattern})"
        out.append(re.compile(rf"^(?:(?:the|a|an)\s+)?(?:[A-Z][\w-]*\s+)?{subject}(?:\s*\([^)]{{1,30}}\))?"
                              r"(?:\s+(?:is|are|stands\s+for|refers\s+to)\b|,\s+(?:usually|also|often|short|or)\b)",
                              re.IGNORECASE))  # fmt: skip
    return out


_ACRONYM = re.compile(r"\b[A-Z][A-Z0-9]{1,5}s?\b")


def _acronyms(question: str) -> list[tuple[str, re.Pattern[str]]]:
    """Upper-case acronyms in the question and a pattern for their spelled-out form."""
    out = []
    for m in _ACRONYM.finditer(question):
        word = m.group(0).rstrip("s") if m.group(0).endswith("s") and len(m.group(0)) > 2 else m.group(0)
        letters = [c for c in word if c.isalpha()]
        if len(letters) < 2 or len(letters) != len(word):
            continue
        # Words (or hyphen parts) starting with each letter in turn: "Multi-Instance GPU" for MIG.
        parts = r"[\s-]+(?:(?:of|and|for|the|in|on|to|a)\s+)?".join(rf"{c}[\w]*" for c in letters)
        out.append((word, re.compile(rf"\b{parts}\b", re.IGNORECASE)))
    return out


@dataclass(frozen=True)
class Quote:
    """One extracted sentence and where it sits: ``passages[n-1].text[start:end] == text``."""

    n: int
    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True)
class Extraction:
    """The extractive answer, or the evidence that there is none."""

    answer: str
    quotes: list[Quote]
    best_score: float


def extract(candidates: Sequence[Candidate], *, max_sentences: int = 2, keep_ratio: float = 0.9) -> Extraction:
    """The answer text from the best candidates: ``sentence [n] sentence [m]``."""
    if not candidates:
        return Extraction(answer="", quotes=[], best_score=0.0)
    top = candidates[0].score
    chosen: list[Candidate] = []
    seen: set[str] = set()
    for c in candidates:
        if len(chosen) >= max_sentences or c.score < keep_ratio * top:
            break
        key = " ".join(c.text.lower().split())
        if key in seen:
            continue
        seen.add(key)
        chosen.append(c)
    parts = []
    for c in chosen:
        text = c.text.rstrip()
        end = text[-1] if text and text[-1] in ".!?" else "."
        body = text[:-1] if text and text[-1] in ".!?" else text
        parts.append(f"{body} [{c.n}]{end}")
    quotes = [Quote(n=c.n, start=c.start, end=c.end, text=c.text, score=round(c.score, 4)) for c in chosen]
    return Extraction(answer=" ".join(parts), quotes=quotes, best_score=top)


class ExtractiveReader:
    """Answers with the passages' best sentences (see the module docstring).

    Args:
        scorer: Scores candidate sentences.
        max_sentences: Most sentences in an answer.
        keep_ratio: A sentence after the first is kept when its score is at least this share
            of the best one's.
    """

    name = "extractive"

    def __init__(self, scorer: SentenceScorer, *, max_sentences: int = 2, keep_ratio: float = 0.9) -> None:
        if max_sentences < 1:
            raise InputError(f"max_sentences must be at least 1 (got {max_sentences})")
        self.scorer = scorer
        self.max_sentences = max_sentences
        self.keep_ratio = keep_ratio

    def extract(self, question: str, passages: Sequence[Passage]) -> Extraction:
        """Score and pick sentences (passages already neutralised)."""
        return extract(self.scorer.candidates(question, passages), max_sentences=self.max_sentences,
                       keep_ratio=self.keep_ratio)  # fmt: skip

    def read(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> Any:
        """Answer ``question`` from ``passages`` (generation options are accepted and ignored)."""
        return self.stream(question, passages, **gen_kwargs).collect()

    def stream(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ResultStream[Any]:
        """The answer as one delta; ``.result`` is a :class:`~ragops.retrieval.readers.ReaderResult`."""
        t0 = time.perf_counter()
        if not isinstance(question, str) or not question.strip():
            raise InputError("the question is empty")
        clean = [neutralize(p) for p in as_passages(passages)]

        return self.replay(None, clean, t0, question=question)

    def replay(self, extraction: Extraction | None, passages: list[Passage], t0: float, *,
               question: str = "") -> ResultStream[Any]:  # fmt: skip
        """A stream of ``extraction`` (computed from ``question`` when None) as a reader result."""
        from ragops.retrieval.readers import ReaderResult

        def run() -> PyGenerator[str, None, ReaderResult]:
            ex = extraction if extraction is not None else self.extract(question, passages)
            if ex.answer:
                yield ex.answer
            total = time.perf_counter() - t0
            return ReaderResult(
                answer=ex.answer,
                citations=list(dict.fromkeys(q.n for q in ex.quotes)),
                passages=passages,
                reader=self.name,
                finish_reason="stop",
                prompt_tokens=0,
                completion_tokens=0,
                timings=GenerationTimings(time_to_first_token_s=total, total_s=total, tokens_per_s=0.0),
                quotes=ex.quotes,
                evidence=ex.best_score,
            )

        return ResultStream(run())


_EMBEDDERS: dict[str, Any] = {}
_EMBEDDERS_LOCK = threading.Lock()


def shared_embedder(cfg: Any) -> Any:
    """One :class:`~ragops.embeddings.TextEmbedder` per embedder config in this process.

    A serving replica answers many requests with one reader each; the sentence scorer's model
    must load once, not per request.
    """
    from ragops.embeddings import TextEmbedder

    key = cfg.model_dump_json()
    with _EMBEDDERS_LOCK:
        if key not in _EMBEDDERS:
            _EMBEDDERS[key] = TextEmbedder(cfg)
        return _EMBEDDERS[key]


_RERANKERS: dict[str, Any] = {}


def shared_reranker(cfg: Any, device: str = "cpu") -> Any:
    """One cross-encoder :class:`~ragops.retrieval.rerank.Reranker` per config in this process."""
    from ragops.retrieval.rerank import Reranker

    key = f"{cfg.model_dump_json()}@{device}"
    with _EMBEDDERS_LOCK:
        if key not in _RERANKERS:
            _RERANKERS[key] = Reranker(cfg, device=device)
        return _RERANKERS[key]
