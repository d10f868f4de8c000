"""Context assembly: from ranked hits to the numbered passages a reader is given.

:func:`assemble_context` runs, in order:

1. :func:`expand_neighbors` (when ``retrieval.expand_neighbors > 0``): add the chunks around
   each hit from its document and merge runs of adjacent chunks into one passage, so the
   reader sees a sentence that straddles a chunk boundary whole;
2. :func:`dedupe`: drop passages whose text repeats (or is contained in) a better one — the
   same file ingested twice, or two overlapping hits;
3. :func:`pack`: keep passages in rank order within the generator's token budget, cutting
   the last one at a word boundary when enough budget is left to be worth it;

and numbers the result ``1..n`` (the numbers citations refer to).
"""

from __future__ import annotations

import dataclasses
import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ragops.retrieval.prompts import Passage, format_passage
from ragops.retrieval.search import SearchHit
from ragops.vectorstore.base import Filter, Hit, Match, VectorStore

if TYPE_CHECKING:
    from ragops.config import Settings

__all__ = ["Passage", "assemble_context", "dedupe", "expand_neighbors", "hit_to_passage", "merge_texts", "pack"]

CountTokens = Callable[[str], int]

#: Fewest tokens left in the budget for which cutting a passage to fit is worth it.
MIN_TRUNCATED_TOKENS = 32

#: Shortest suffix/prefix (in characters) treated as chunk overlap rather than coincidence.
MIN_OVERLAP_CHARS = 8

#: Payload fields a neighbour fetch needs.
_NEIGHBOUR_FIELDS = ("doc_id", "chunk_id", "chunk_index", "n_chunks", "text", "source", "title", "heading_path", "metadata")


# ---------------------------------------------------------------------------------------
# Neighbour expansion
# ---------------------------------------------------------------------------------------


def _overlap(prev: str, nxt: str) -> int:
    """Length of the longest suffix of ``prev`` that is a prefix of ``nxt``, at word boundaries.

    The chunker starts a chunk up to ``overlap_tokens`` back, on a word start, so consecutive
    chunks of one section share a whole-word run of text; a shorter match than
    :data:`MIN_OVERLAP_CHARS` is more likely a coincidence ("the") and is kept.
    """
    longest = min(len(prev), len(nxt))
    for n in range(longest, MIN_OVERLAP_CHARS - 1, -1):
        if not prev.endswith(nxt[:n]):
            continue
        starts_word = n == len(prev) or prev[-n - 1].isspace()
        ends_word = n == len(nxt) or nxt[n].isspace() or not nxt[n - 1].isalnum() or not nxt[n].isalnum()
        if starts_word and ends_word:
            return n
    return 0


def merge_texts(prev: str, nxt: str, *, same_section: bool = True, heading: str | None = None) -> str:
    """Join two consecutive chunks of one document, dropping the text they share.

    Args:
        prev: The earlier chunk.
        nxt: The chunk right after it.
        same_section: Whether both lie in one section (only then can they overlap).
        heading: Heading of ``nxt``'s section, put on its own line when the section changes.
    """
    if same_section:
        n = _overlap(prev, nxt)
        if n == len(nxt):
            return prev
        if n:
            return prev + nxt[n:]
        return f"{prev}\n{nxt}"
    return f"{prev}\n\n{heading}\n{nxt}" if heading else f"{prev}\n\n{nxt}"


def _fetch_chunks(store: VectorStore, doc_id: str, indices: Sequence[int]) -> dict[int, SearchHit]:
    """The chunks ``indices`` of one document, read by payload filter (ids are not needed)."""
    flt = Filter(must=[Match("doc_id", [doc_id]), Match("chunk_index", sorted(set(indices)))])
    out: dict[int, SearchHit] = {}
    for rec in store.scroll(flt, fields=list(_NEIGHBOUR_FIELDS), batch_size=max(16, len(indices))):
        hit = SearchHit.from_store_hit(Hit(id=rec.id, score=0.0, payload=rec.payload), rank=0)
        out[hit.chunk_index] = hit
    return out


def expand_neighbors(hits: Sequence[SearchHit], store: VectorStore, n: int) -> list[SearchHit]:
    """Add the ``n`` chunks before and after each hit and merge adjacent chunks per document.

    Chunks of one document whose indices form a consecutive run (hits and their neighbours)
    become one passage, its text in document order with the chunk overlap removed. Each
    passage takes the rank, score and chunk id of its best hit; passages are ordered by that
    rank. Hits without a ``chunk_index`` are passed through unchanged.

    Args:
        hits: Ranked hits.
        store: The store they came from (neighbours are fetched by ``doc_id`` and
            ``chunk_index``).
        n: Chunks to add on each side; 0 only merges hits that are already adjacent.

    Returns:
        Passages as hits, best first, with ranks renumbered ``1..m``.
    """
    if not hits:
        return []
    by_doc: dict[str, dict[int, SearchHit]] = {}
    passthrough: list[SearchHit] = []
    for h in hits:
        if h.chunk_index < 0:
            passthrough.append(h)
            continue
        chunks = by_doc.setdefault(h.doc_id, {})
        best = chunks.get(h.chunk_index)
        if best is None or h.rank < best.rank:
            chunks[h.chunk_index] = h

    merged: list[SearchHit] = list(passthrough)
    for doc_id, found in by_doc.items():
        wanted: set[int] = set()
        for i, h in found.items():
            top = h.n_chunks - 1 if h.n_chunks > 0 else i + n
            wanted.update(range(max(0, i - n), min(top, i + n) + 1))
        missing = sorted(wanted - set(found))
        neighbours = _fetch_chunks(store, doc_id, missing) if missing and n > 0 else {}
        chunks = {**neighbours, **found}
        merged.extend(_merge_runs(chunks, found))
    merged.sort(key=lambda h: h.rank)
    return [dataclasses.replace(h, rank=r) for r, h in enumerate(merged, start=1)]


def _merge_runs(chunks: dict[int, SearchHit], hits: dict[int, SearchHit]) -> list[SearchHit]:
    """One passage per run of consecutive chunk indices that contains at least one hit."""
    out: list[SearchHit] = []
    run: list[SearchHit] = []
    for index in sorted(chunks):
        if run and index != run[-1].chunk_index + 1:
            out.extend(_passage_of(run, hits))
            run = []
        run.append(chunks[index])
    if run:
        out.extend(_passage_of(run, hits))
    return out


def _passage_of(run: list[SearchHit], hits: dict[int, SearchHit]) -> list[SearchHit]:
    ranked = [hits[c.chunk_index] for c in run if c.chunk_index in hits]
    if not ranked:  # neighbours only (cannot happen with a fetched window, kept for safety)
        return []
    best = min(ranked, key=lambda h: h.rank)
    text = run[0].text
    for prev, nxt in zip(run, run[1:]):
        same = list(prev.heading_path) == list(nxt.heading_path)
        heading = nxt.heading_path[-1] if nxt.heading_path else None
        text = merge_texts(text, nxt.text, same_section=same, heading=heading)
    return [
        dataclasses.replace(
            best,
            text=text,
            # The passage starts where its first chunk does (its headings are the first's).
            chunk_index=run[0].chunk_index,
            heading_path=list(run[0].heading_path),
        )
    ]


# ---------------------------------------------------------------------------------------
# Dedupe
# ---------------------------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_for_dedupe(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed: the form duplicates are compared in."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedupe(hits: Sequence[SearchHit]) -> list[SearchHit]:
    """Drop hits that repeat a better hit's text, or whose text another hit contains.

    Texts are compared after :func:`normalize_for_dedupe`. When one text contains another,
    the containing hit is kept (it says everything the other does) at the better of the two
    positions. Empty texts are dropped.

    Args:
        hits: Ranked hits (or merged passages from :func:`expand_neighbors`).

    Returns:
        The kept hits, best first, ranks renumbered ``1..m``.
    """
    kept: list[tuple[str, SearchHit]] = []
    for h in sorted(hits, key=lambda h: h.rank):
        norm = normalize_for_dedupe(h.text)
        if not norm:
            continue
        if any(norm in other for other, _ in kept):
            continue  # identical to, or inside, a better hit
        swallowed = [i for i, (other, _) in enumerate(kept) if other in norm]
        if swallowed:
            # This hit contains better ones: it takes the best one's place, the others go.
            first = swallowed[0]
            kept[first] = (norm, dataclasses.replace(h, score=max(h.score, kept[first][1].score)))
            for i in reversed(swallowed[1:]):
                del kept[i]
            continue
        kept.append((norm, h))
    return [dataclasses.replace(h, rank=r) for r, (_, h) in enumerate(kept, start=1)]


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def hit_to_passage(hit: SearchHit, n: int | None = None) -> Passage:
    """The reader's view of a hit (numbered ``n``, its rank by default)."""
    return Passage(
        n=hit.rank if n is None else n,
        text=hit.text,
        title=hit.title or None,
        source=hit.source or None,
        doc_id=hit.doc_id,
        chunk_id=hit.chunk_id,
        score=hit.score,
    )


def _cut_to_fit(passage: Passage, budget: int, count_tokens: CountTokens) -> Passage | None:
    """The longest word-boundary prefix of the passage whose rendering fits ``budget`` tokens."""
    # Candidate cut points: the end of every word (so a cut never splits one).
    ends = [m.end() for m in re.finditer(r"\S+", passage.text)]
    lo, hi, best = 0, len(ends) - 1, -1
    while lo <= hi:  # binary search: token counts grow with the prefix length
        mid = (lo + hi) // 2
        candidate = dataclasses.replace(passage, text=passage.text[: ends[mid]])
        if count_tokens(format_passage(candidate)) <= budget:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    if best < 0:
        return None
    return dataclasses.replace(passage, text=passage.text[: ends[best]])


def pack(
    passages: Sequence[Passage],
    budget_tokens: int,
    count_tokens: CountTokens,
    *,
    min_truncated_tokens: int = MIN_TRUNCATED_TOKENS,
) -> list[Passage]:
    """Keep passages in order until the token budget is spent, and number them ``1..n``.

    A passage is measured as the reader renders it (``[n] Title: ...`` and its text, see
    :func:`ragops.retrieval.prompts.format_passage`) with ``count_tokens``, normally the
    generator's tokenizer. The first passage that does not fit is cut at a word boundary to
    the budget left when at least ``min_truncated_tokens`` are left, and packing stops there:
    later passages rank lower, and skipping ahead to smaller ones would reorder the context.

    Args:
        passages: Passages, best first.
        budget_tokens: Token budget for all passages together.
        count_tokens: Text → number of tokens.
        min_truncated_tokens: Least budget left for which a cut passage is still useful.

    Returns:
        The passages that fit, the last one possibly cut, numbered ``1..n``.
    """
    out: list[Passage] = []
    left = budget_tokens
    for p in passages:
        p = dataclasses.replace(p, n=len(out) + 1)
        cost = count_tokens(format_passage(p))
        if cost <= left:
            out.append(p)
            left -= cost
            continue
        if left >= min_truncated_tokens:
            cut = _cut_to_fit(p, left, count_tokens)
            if cut is not None:
                out.append(cut)
        break
    return out


# ---------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------


def assemble_context(
    hits: Sequence[SearchHit],
    *,
    store: VectorStore | None,
    settings: Settings,
    count_tokens: CountTokens,
    budget_tokens: int | None = None,
) -> list[Passage]:
    """Expand (when configured), dedupe, pack and number the passages for the reader.

    Args:
        hits: Ranked search hits.
        store: The store the hits came from (needed only for neighbour expansion).
        settings: ``retrieval.expand_neighbors`` and ``generator.context_tokens`` are read.
        count_tokens: The generator tokenizer's token counter.
        budget_tokens: Overrides ``generator.context_tokens``.

    Returns:
        Passages numbered ``1..n``, in rank order, within the token budget.
    """
    n = settings.retrieval.expand_neighbors
    ranked = sorted(hits, key=lambda h: h.rank)
    if n > 0 and store is not None:
        ranked = expand_neighbors(ranked, store, n)
    ranked = dedupe(ranked)
    budget = settings.generator.context_tokens if budget_tokens is None else budget_tokens
    return pack([hit_to_passage(h) for h in ranked], budget, count_tokens)
