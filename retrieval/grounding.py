"""Checking answers against their passages: per-sentence support, citation repair, abstention.

:func:`check_grounding` scores every sentence of an answer with
:func:`~ragops.retrieval.support.support` (the measure PPO's ``rag`` reward uses, so training
and serving agree on "supported") against the passages it cites and against every passage:

* a citation to a passage that does not support its sentence is moved to the passage that
  does, or removed when none does; a supported sentence without a citation gets one;
* the answer's support is the mean of its judged sentences' best support (sentences with
  fewer than two content words, such as "Yes.", are not judged).

:class:`GroundedReader` wraps a generative reader with the checks of
``generator.grounding``:

* **abstention first**: the extractive scorer rates the passages' sentences against the
  question; when the best is below ``generator.abstain_below`` the documents do not answer
  it, and the reply says so and names the closest sources, without generating anything;
* ``off``: the generated answer as is; ``flag``: as is, with ``grounded`` and the per-sentence
  scores; ``fallback`` (default): citations repaired, and an answer whose support is below
  ``generator.min_support`` is replaced by the extractive answer. A generated "I don't know"
  while the evidence is strong is replaced the same way (the small model gives up on answers
  the passages hold). In ``fallback`` mode the reply streams once it has been checked: text
  that is about to be withdrawn is never shown.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator as PyGenerator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ragops.retrieval.decoding import GenerationTimings, ResultStream
from ragops.retrieval.extractive import ExtractiveReader, Extraction
from ragops.retrieval.injection import neutralize
from ragops.retrieval.prompts import CITATION, Passage, as_passages
from ragops.retrieval.support import claim_spans, cited_numbers, content_words, strip_citations, support

Grounding = Literal["off", "flag", "fallback"]
GROUNDING_MODES = ("off", "flag", "fallback")

#: Sentences with fewer content words are not judged ("Yes.", "See [2].").
MIN_JUDGED_WORDS = 2

_DONT_KNOW = re.compile(
    r"\b(?:i\s+(?:do\s*n[o']?t|cannot|can't)\s+know|(?:do(?:es)?\s+not|don't|doesn't)\s+(?:contain|mention|provide|say|include)|"
    r"no\s+information|not\s+(?:mentioned|covered|provided)|(?:i'm|i am)\s+(?:not\s+sure|unable))",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class SentenceSupport:
    """How well one answer sentence is supported.

    Attributes:
        text: The sentence as returned (citations repaired).
        support: Best support by any passage (0..1).
        cited_support: Best support by the passages it cited as generated (0 if none).
        citations: Its citations after repair.
        judged: Whether it counts towards the answer's support (enough content words).
    """

    text: str
    support: float
    cited_support: float
    citations: list[int]
    judged: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON form (rounded scores)."""
        return {"text": self.text, "support": round(self.support, 3), "cited_support": round(self.cited_support, 3),
                "citations": self.citations, "judged": self.judged}  # fmt: skip


@dataclass
class GroundingReport:
    """The grounding check's verdict on one answer.

    Attributes:
        mode: ``off``, ``flag`` or ``fallback``.
        support: Mean best support of the judged sentences (0 when none is judged).
        grounded: ``support >= min_support`` with at least one judged sentence.
        sentences: Per-sentence scores.
        action: ``kept`` (as generated), ``repaired`` (citations fixed), ``flagged``
            (unsupported, returned as is), ``fallback`` (replaced by the extractive answer),
            ``abstained`` (the documents do not cover the question).
        citations_fixed: How many citations were moved, added or removed.
        evidence: Best extractive candidate score for the question (abstention's signal).
    """

    mode: str
    support: float
    grounded: bool
    sentences: list[SentenceSupport] = field(default_factory=list)
    action: str = "kept"
    citations_fixed: int = 0
    evidence: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form, as ``--json`` and the HTTP response carry it."""
        return {
            "mode": self.mode,
            "grounded": self.grounded,
            "support": round(self.support, 3),
            "action": self.action,
            "citations_fixed": self.citations_fixed,
            "evidence": None if self.evidence is None else round(self.evidence, 3),
            "sentences": [s.to_dict() for s in self.sentences],
        }


def _with_marks(sentence: str, cites: Sequence[int]) -> str:
    """The sentence without its citation marks, ``[n]`` marks put before its final stop."""
    body = re.sub(r"\s+([.!?,;:])", r"\1", re.sub(r"[ \t]{2,}", " ", CITATION.sub("", sentence))).strip()
    if not cites:
        return body
    marks = "".join(f"[{n}]" for n in cites)
    if body and body[-1] in ".!?":
        return f"{body[:-1]} {marks}{body[-1]}"
    return f"{body} {marks}"


def check_grounding(answer: str, passages: Sequence[Passage], *, min_support: float = 0.6,
                    repair: bool = True, mode: str = "fallback") -> tuple[str, GroundingReport]:  # fmt: skip
    """Score ``answer``'s sentences against ``passages``; repair citations when ``repair``.

    Args:
        answer: The generated answer with ``[n]`` citations.
        passages: The numbered passages the reader saw.
        min_support: Share of a sentence's content words a passage must hold to support it;
            also the answer-level threshold for ``grounded``.
        repair: Rewrite citations (move, add, remove); otherwise the text is returned as is.
        mode: Recorded in the report.

    Returns:
        The (repaired) answer and the report.
    """
    texts = {p.n: p.text for p in passages}
    pieces: list[str] = []
    sentences: list[SentenceSupport] = []
    fixed = 0
    last = 0
    for start, end in claim_spans(answer):
        sentence = answer[start:end]
        per = {n: support(sentence, t) for n, t in texts.items()}
        cited = [n for n in cited_numbers(sentence)]
        cited_ok = [n for n in cited if per.get(n, 0.0) >= min_support]
        best_n, best = max(per.items(), key=lambda kv: kv[1], default=(None, 0.0))
        judged = len(content_words(strip_citations(sentence))) >= MIN_JUDGED_WORDS
        new = cited
        if judged and repair:
            if cited_ok:
                new = cited_ok
            elif best >= min_support and best_n is not None:
                new = [best_n]
            else:
                new = []
        if new != cited:
            fixed += len(set(new) ^ set(cited))
            sentence = _with_marks(sentence, new)
        cited_support = max((per.get(n, 0.0) for n in cited), default=0.0)
        sentences.append(SentenceSupport(sentence, best, cited_support, list(new), judged))
        pieces.append(answer[last:start] + sentence)
        last = end
    pieces.append(answer[last:])
    judged = [s for s in sentences if s.judged]
    score = sum(s.support for s in judged) / len(judged) if judged else 0.0
    report = GroundingReport(mode=mode, support=score, grounded=bool(judged) and score >= min_support,
                             sentences=sentences, citations_fixed=fixed)  # fmt: skip
    return ("".join(pieces) if repair else answer), report


def is_dont_know(answer: str) -> bool:
    """Whether the answer says it cannot answer."""
    return bool(_DONT_KNOW.search(answer))


def abstain_answer(passages: Sequence[Passage], max_sources: int = 3) -> str:
    """The reply when the documents do not cover the question, naming the closest sources."""
    names = []
    for p in passages[:max_sources]:
        name = p.title or p.doc_id or p.source or f"passage {p.n}"
        if name not in names:
            names.append(name)
    text = "The indexed documents do not cover this question."
    if names:
        text += " The closest sources are: " + "; ".join(names) + "."
    return text


class GroundedReader:
    """A reader with abstention and the grounding check around it (see the module docstring).

    Args:
        inner: The reader that writes the answer (stuff, fid or extractive).
        extractive: Scores the evidence (abstention) and supplies the fallback answer.
        mode: ``off``, ``flag`` or ``fallback``.
        min_support: Support a sentence (and the answer) needs to count as grounded.
        abstain_below: Abstain when the best candidate sentence scores below this (0 = never).
    """

    def __init__(self, inner: Any, extractive: ExtractiveReader, *, mode: Grounding = "fallback",
                 min_support: float = 0.6, abstain_below: float = 0.0) -> None:  # fmt: skip
        self.inner = inner
        self.extractive = extractive
        self.mode = mode
        self.min_support = min_support
        self.abstain_below = abstain_below
        self.name = inner.name

    def read(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> Any:
        """See :meth:`~ragops.retrieval.readers.StuffReader.read`."""
        return self.stream(question, passages, **gen_kwargs).collect()

    def stream(self, question: str, passages: Iterable[Passage | str], **gen_kwargs: Any) -> ResultStream[Any]:
        """Abstain, or run the inner reader and check its answer (see the module docstring)."""
        t0 = time.perf_counter()
        clean = [neutralize(p) for p in as_passages(passages)]
        if not isinstance(question, str) or not question.strip():
            return self.inner.stream(question, clean, **gen_kwargs)  # the inner reader raises the error
        evidence = self.extractive.extract(question, clean)
        if evidence.best_score < self.abstain_below or not evidence.quotes:
            return ResultStream(self._abstain(clean, evidence, t0))
        if isinstance(self.inner, ExtractiveReader):
            # The evidence already is the extractive answer: no second scoring pass.
            return ResultStream(self._checked(self.inner.replay(evidence, clean, t0), evidence, clean, live=True))
        inner = self.inner.stream(question, clean, **gen_kwargs)
        return ResultStream(self._checked(inner, evidence, clean, live=self.mode != "fallback"))

    def _abstain(self, passages: list[Passage], evidence: Extraction, t0: float) -> PyGenerator[str, None, Any]:
        from ragops.retrieval.readers import ReaderResult

        text = abstain_answer(passages)
        yield text
        total = time.perf_counter() - t0
        report = GroundingReport(mode=self.mode, support=0.0, grounded=True, action="abstained",
                                 evidence=evidence.best_score)  # fmt: skip
        return ReaderResult(
            answer=text, citations=[], passages=passages, reader=self.name, finish_reason="stop",
            prompt_tokens=0, completion_tokens=0,
            timings=GenerationTimings(time_to_first_token_s=total, total_s=total, tokens_per_s=0.0),
            evidence=evidence.best_score, grounding=report, abstained=True,
        )

    def _checked(self, inner: ResultStream[Any], evidence: Extraction, passages: list[Passage], *,
                 live: bool) -> PyGenerator[str, None, Any]:  # fmt: skip
        """Pass the inner stream through (``live``) or hold it until checked; then the verdict.

        ``passages`` are all the passages the evidence was scored on (the inner reader may have
        fitted fewer into its prompt; a fallback answer may quote any of them).
        """
        for delta in inner:
            if live:
                yield delta
        res = inner.result
        if self.mode == "off" and res.reader != "extractive":
            return replace(res, evidence=evidence.best_score)
        repair = self.mode == "fallback" and res.reader != "extractive"
        answer, report = check_grounding(res.answer, res.passages, min_support=self.min_support, repair=repair,
                                         mode=self.mode)  # fmt: skip
        report.evidence = evidence.best_score
        replace_it = self.mode == "fallback" and res.reader != "extractive" and (
            not report.grounded or is_dont_know(res.answer)
        )
        if replace_it:
            answer = evidence.answer
            _, fallback_report = check_grounding(answer, passages, min_support=self.min_support, repair=False)
            report.sentences, report.action = fallback_report.sentences, "fallback"
            report.grounded, report.support = fallback_report.grounded, fallback_report.support
            citations, quotes = list(dict.fromkeys(q.n for q in evidence.quotes)), evidence.quotes
            res = replace(res, passages=passages)
        else:
            if repair and report.citations_fixed:
                report.action = "repaired"
            elif not report.grounded:
                report.action = "flagged"
            citations = _citations_in(answer, len(res.passages)) if repair else res.citations
            quotes = res.quotes
        if not live and answer:
            yield answer
        return replace(res, answer=answer, citations=citations, quotes=quotes, grounding=report,
                       evidence=evidence.best_score)  # fmt: skip


def _citations_in(answer: str, n_passages: int) -> list[int]:
    from ragops.retrieval.prompts import parse_citations

    return parse_citations(answer, n_passages)
