"""What "supported by a passage" means, in one place: serving, evaluation and training agree.

The grounding check on served answers (:mod:`ragops.retrieval.grounding`), the answer-quality
benchmark's citation precision, SFT's citation appending and PPO's ``rag`` reward all call
:func:`support`. It is content-word overlap: the share of a sentence's content words (lower
case, longer than two letters, not stop words, citations removed) that the passage contains.
Crude, but cheap, deterministic, model-free, and hard to game without copying evidence, which
is exactly what a grounded answer should do.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

from ragops.retrieval.prompts import CITATION, parse_citations

_WORD = re.compile(r"\w+", re.UNICODE)
_STOP = frozenset(
    ["the", "a", "an", "and", "or", "of", "to", "in", "on", "at", "for", "from", "by", "with", "is", "are", "was", "were", "be", "been", "it", "its", "this", "that", "these", "those", "as", "into", "than", "then", "there", "their", "they", "you", "your", "we", "our", "not", "no", "yes", "can", "will", "would", "should"]
)
#: Sentence boundaries: after ., ! or ? followed by whitespace, and at line breaks.
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")
_LEADING_CITES = re.compile(rf"((?:{CITATION.pattern}\s*)+)[.!?]?")  # used with .match(text, pos)
#: Largest passage number :func:`cited_numbers` keeps.
MAX_CITATION = 1000


def normalize(text: str) -> str:
    """Lower-cased words joined by single spaces (punctuation dropped)."""
    return " ".join(_WORD.findall(text.lower()))


def content_words(text: str) -> set[str]:
    """Lower-cased words longer than two letters that are not stop words (what overlap counts)."""
    return {w for w in _WORD.findall(text.lower()) if len(w) > 2 and w not in _STOP}


def strip_citations(text: str) -> str:
    """``text`` without its ``[n]`` citation marks."""
    return CITATION.sub(" ", text)


def support(claim: str, passage: str) -> float:
    """Share of the claim's content words that the passage contains (0..1; citations ignored)."""
    words = content_words(strip_citations(claim))
    if not words:
        return 0.0
    return len(words & content_words(passage)) / len(words)


def split_claims(answer: str) -> list[str]:
    """Sentences of an answer (a citation right after a full stop stays with its sentence)."""
    return [answer[s:e] for s, e in claim_spans(answer)]


def claim_spans(answer: str) -> list[tuple[int, int]]:
    """``(start, end)`` of each sentence of :func:`split_claims` in ``answer``."""
    spans: list[tuple[int, int]] = []
    for start, end in _pieces(answer):
        # "Paris is the capital. [1] It is old." — citations that open a piece close the sentence before.
        lead = _LEADING_CITES.match(answer, start, end)
        if spans and lead:
            cites_end = start + len(lead.group(1).rstrip())
            spans[-1] = (spans[-1][0], cites_end)
            start = lead.end()
            while start < end and answer[start].isspace():
                start += 1
        if start < end:
            spans.append((start, end))
    return spans


def _pieces(text: str) -> Iterator[tuple[int, int]]:
    """Stripped non-empty pieces between sentence boundaries."""
    pos = 0
    for m in [*_SENTENCE.finditer(text), None]:
        end = m.start() if m else len(text)
        s, e = pos, end
        while s < e and text[s].isspace():
            s += 1
        while e > s and text[e - 1].isspace():
            e -= 1
        if s < e:
            yield s, e
        pos = m.end() if m else len(text)


def cited_numbers(sentence: str) -> list[int]:
    """Passage numbers cited in one sentence (``[2]``, ``[1, 3]``, ``[1-2]``, ``[1][2]``).

    Numbers that are not passages are kept (unlike the reader's :func:`parse_citations`, which
    drops them): citing a passage that does not exist is a wrong citation here.
    """
    # A bound (not the passage count) keeps wrong numbers while capping what a runaway
    # "[1-999999]" can expand to.
    return parse_citations(sentence, MAX_CITATION)
