"""Token-aware, structure-aware chunking with the embedder's own tokenizer.

A chunk is an exact (stripped) substring of one section of a document (of the whole text
when ``respect_sections`` is off), at most
``chunk_tokens`` tokens *including* the title/heading prefix that is embedded with it, so the
embedder never truncates. Split points are chosen from the tokenizer's offset mapping:

1. a paragraph break (a blank line between two tokens),
2. a sentence end or line break,
3. any whitespace,

and never between two tokens that touch (that would cut a word), except inside a single
"word" longer than the whole budget (a giant URL or base64 blob), where no whitespace
exists. Consecutive chunks of one section share about ``overlap_tokens`` tokens, starting on a
word boundary.

Each section is tokenized once; split points are found by scanning offsets, not by
re-tokenizing candidate pieces. A final batched count of every embedded text guards the
limit for tokenizers whose counts are not additive over whitespace (byte-level BPE): a
section with a piece over the limit is split again, from the same offsets, with a tighter
budget.

Tiny sections are not merged with their siblings: a merged chunk would have no correct
heading path and would straddle two sections; the heading prefix already gives a small
chunk its context.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ragops.config import ChunkerConfig
from ragops.documents import Chunk, Document, chunk_id_for

#: Characters that end a sentence when they precede whitespace.
_SENTENCE_END = frozenset(".!?…。！？")
#: Closing characters that may follow a sentence end (``end.")``).
_CLOSERS = frozenset("\"')]}’”»")

_PARAGRAPH, _SENTENCE, _WORD, _NONE = 3, 2, 1, 0

#: Re-split rounds for a section whose measured pieces still exceed the limit.
_MAX_REFIT_ROUNDS = 6


@dataclass
class _Unit:
    """A run of text chunked on its own: one section, or the whole document."""

    text: str
    heading_path: list[str] | None  # None: look the path up per chunk (respect_sections off)


@dataclass
class _Plan:
    """A unit with its token offsets, current budget and the pieces cut for that budget."""

    doc: Document
    unit: _Unit
    offsets: Sequence[tuple[int, int]]
    budget: int
    pieces: list[_Piece] = field(default_factory=list)


@dataclass
class _Piece:
    text: str
    heading_path: list[str]
    label: str


def heading_label(title: str | None, heading_path: Sequence[str]) -> str:
    """The context line embedded before a chunk: ``"Title > H1 > H2"``.

    The title is left out when the first heading repeats it (a Markdown H1 is usually the
    title), so the label does not say the same thing twice.
    """
    parts = [p for p in heading_path if p]
    if title and (not parts or parts[0] != title):
        parts.insert(0, title)
    return " > ".join(parts)


class _Splitter:
    """Chooses chunk boundaries in one tokenized text."""

    def __init__(self, text: str, offsets: Sequence[tuple[int, int]], budget: int, overlap: int):
        self.text = text
        self.offsets = offsets
        self.n = len(offsets)
        self.budget = max(1, budget)
        self.overlap = overlap

    def gap(self, j: int) -> tuple[int, int]:
        """Characters between token ``j - 1`` and token ``j``, whitespace edges of both included.

        WordPiece offsets exclude whitespace; byte-level BPE tokens carry it ("Ġword", "ĊĊ").
        The gap may also hold characters the tokenizer dropped (control characters, bytes a
        small vocabulary lacks).
        """
        (prev_start, end), (start, next_end) = self.offsets[j - 1], self.offsets[j]
        text = self.text
        while end > prev_start and text[end - 1].isspace():
            end -= 1
        while start < next_end and text[start].isspace():
            start += 1
        return end, max(end, start)

    def rank(self, j: int) -> int:
        """How good a split is between token ``j - 1`` and token ``j`` (0: inside a word)."""
        end, start = self.gap(j)
        text = self.text
        gap = text[end:start]
        if not any(c.isspace() for c in gap):  # touching tokens: inside a word
            return _NONE
        newlines = gap.count("\n")
        if newlines >= 2:
            return _PARAGRAPH
        if newlines == 1:
            return _SENTENCE
        last = end - 1
        while last > 0 and text[last] in _CLOSERS:
            last -= 1
        return _SENTENCE if last >= 0 and text[last] in _SENTENCE_END else _WORD

    def best_break(self, s: int) -> int:
        """Token index ``b`` ending the chunk that starts at ``s`` (tokens ``[s, b)``)."""
        e = s + self.budget
        lo = s + max(1, self.budget // 2)
        best, best_rank = -1, _NONE
        for b in range(e, lo - 1, -1):  # latest boundary of the best kind in the back half
            r = self.rank(b)
            if r > best_rank:
                best, best_rank = b, r
                if r == _PARAGRAPH:
                    break
        if best_rank > _NONE:
            return best
        for b in range(lo - 1, s, -1):  # long words: any whitespace at all
            if self.rank(b) > _NONE:
                return b
        return e  # one "word" longer than the budget: a cut inside it cannot be avoided

    def next_start(self, s: int, b: int) -> int:
        """First token of the chunk after ``[s, b)``: up to ``overlap`` tokens back, at a word start."""
        if self.overlap <= 0:
            return b
        # The next chunk starts past the middle of this one, or a big overlap with a small
        # budget would crawl forward a few tokens at a time.
        lo = max(b - self.overlap, s + (b - s) // 2 + 1)
        for j in range(lo, b):
            if self.rank(j) > _NONE:
                return j
        return b

    def _cut(self, j: int) -> tuple[int, int]:
        """Where a chunk ending before token ``j`` stops, and where one starting at ``j`` begins.

        At a word boundary both cuts sit at the gap's whitespace, so untokenized characters
        next to a word stay with that word; without whitespace (a forced cut inside a long
        "word") they are the two tokens' edges.
        """
        end, start = self.gap(j)
        ws = [i for i in range(end, start) if self.text[i].isspace()]
        if not ws:
            return self.offsets[j][0], self.offsets[j - 1][1]
        return ws[0], ws[-1] + 1

    def char_span(self, s: int, b: int) -> tuple[int, int]:
        """Characters of tokens ``[s, b)`` plus the untokenized text around them, stripped."""
        a = 0 if s == 0 else self._cut(s)[1]
        e = len(self.text) if b >= self.n else self._cut(b)[0]
        while a < e and self.text[a].isspace():
            a += 1
        while e > a and self.text[e - 1].isspace():
            e -= 1
        return a, e

    def spans(self) -> list[tuple[int, int]]:
        """Character spans of the chunks, in order."""
        if self.n <= self.budget:
            span = self.char_span(0, self.n)
            return [span] if span[1] > span[0] else []
        out: list[tuple[int, int]] = []
        s = 0
        while True:
            if self.n - s <= self.budget:
                out.append(self.char_span(s, self.n))
                break
            b = self.best_break(s)
            out.append(self.char_span(s, b))
            s = self.next_start(s, b)
        return [sp for sp in out if sp[1] > sp[0]]


class Chunker:
    """Splits documents into chunks sized for the embedder.

    Args:
        cfg: Chunk size, overlap and structure settings.
        tokenizer: The embedder's Hugging Face *fast* tokenizer (it must return offset
            mappings); token counts are made with ``add_special_tokens=False``, so
            ``chunk_tokens`` counts text tokens only ([CLS]/[SEP] come on top).

    Raises:
        TypeError: the tokenizer is not a fast tokenizer.
    """

    def __init__(self, cfg: ChunkerConfig, tokenizer: Any):
        if not getattr(tokenizer, "is_fast", False):
            raise TypeError(
                f"Chunker needs a fast (Rust) Hugging Face tokenizer for offset mappings, got {type(tokenizer).__name__}; "
                "load it with AutoTokenizer.from_pretrained(path, use_fast=True)"
            )
        self.cfg = cfg
        self.tokenizer = tokenizer

    # -- tokenizer access ---------------------------------------------------------------

    def _encode(self, texts: list[str], offsets: bool) -> dict[str, Any]:
        # verbose=False: sections longer than the model's max length are expected here.
        return self.tokenizer(
            texts,
            add_special_tokens=False,
            return_offsets_mapping=offsets,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        """Token counts (no special tokens) of ``texts``, in one batched call."""
        if not texts:
            return []
        return [len(ids) for ids in self._encode(list(texts), offsets=False)["input_ids"]]

    # -- public API ---------------------------------------------------------------------

    def __call__(self, doc: Document) -> list[Chunk]:
        """Chunk one document (see :meth:`chunk_documents`)."""
        return self.chunk_documents([doc])

    def chunk_documents(self, docs: Iterable[Document]) -> list[Chunk]:
        """Chunk many documents with one tokenizer call per phase (the fast path for batches).

        Args:
            docs: Documents from the loaders.

        Returns:
            Chunks of all documents, in document order; ``chunk_index`` restarts at 0 for
            each document and runs over all its sections.
        """
        docs = list(docs)
        labels = self._labels(docs)
        units = [self._units(doc) for doc in docs]
        flat = [u.text for us in units for u in us]
        offsets = iter(self._encode(flat, offsets=True)["offset_mapping"] if flat else [])
        plans = [[_Plan(doc, u, next(offsets), self._initial_budget(doc, u, labels)) for u in us] for doc, us in zip(docs, units)]
        for plan in (p for ps in plans for p in ps):
            self._split(plan, labels)
        self._enforce_limit([p for ps in plans for p in ps], labels)
        out: list[Chunk] = []
        for doc, doc_plans in zip(docs, plans):
            out.extend(self._finish(doc, [piece for p in doc_plans for piece in p.pieces]))
        return out

    # -- planning -----------------------------------------------------------------------

    def _units(self, doc: Document) -> list[_Unit]:
        sections = [s for s in doc.sections if s.text.strip()]
        if not sections:
            return [_Unit(doc.text, [])] if doc.text.strip() else []
        if self.cfg.respect_sections:
            return [_Unit(s.text, list(s.heading_path)) for s in sections]
        return [_Unit(doc.text, None)] if doc.text.strip() else []

    def _paths(self, doc: Document) -> list[list[str]]:
        return [[]] + [list(s.heading_path) for s in doc.sections]

    def _labels(self, docs: list[Document]) -> dict[str, tuple[str, int]]:
        """Every heading label these documents need → (label as embedded, its token count).

        A label may use at most half the chunk budget; a longer one is cut at a token
        boundary so the chunk text always keeps room.
        """
        if not self.cfg.include_heading:
            return {}
        wanted = sorted({heading_label(d.title, p) for d in docs for p in self._paths(d)} - {""})
        if not wanted:
            return {"": ("", 0)}
        enc = self._encode(wanted, offsets=True)
        limit = self.cfg.chunk_tokens // 2
        out: dict[str, tuple[str, int]] = {"": ("", 0)}
        for label, offs in zip(wanted, enc["offset_mapping"]):
            if len(offs) > limit:
                out[label] = (label[: offs[limit - 1][1]].rstrip(), limit)
            else:
                out[label] = (label, len(offs))
        return out

    def _label_for(self, doc: Document, path: list[str], labels: dict[str, tuple[str, int]]) -> tuple[str, int]:
        if not self.cfg.include_heading:
            return "", 0
        return labels[heading_label(doc.title, path)]

    def _initial_budget(self, doc: Document, unit: _Unit, labels: dict[str, tuple[str, int]]) -> int:
        if unit.heading_path is not None:
            return self.cfg.chunk_tokens - self._label_for(doc, unit.heading_path, labels)[1]
        # Whole-document mode: the heading path depends on where a chunk starts, so budget
        # for the longest label the document has.
        return self.cfg.chunk_tokens - max(self._label_for(doc, p, labels)[1] for p in self._paths(doc))

    def _split(self, plan: _Plan, labels: dict[str, tuple[str, int]]) -> None:
        """(Re)compute a unit's pieces for its current budget; the offsets are reused."""
        unit, doc = plan.unit, plan.doc
        spans = _Splitter(unit.text, plan.offsets, plan.budget, self.cfg.overlap_tokens).spans()
        if unit.heading_path is not None:
            label = self._label_for(doc, unit.heading_path, labels)[0]
            plan.pieces = [_Piece(unit.text[a:e], unit.heading_path, label) for a, e in spans]
            return
        locate = _SectionLocator(doc)
        plan.pieces = []
        for a, e in spans:
            path = locate(a)
            plan.pieces.append(_Piece(unit.text[a:e], path, self._label_for(doc, path, labels)[0]))

    # -- limit guard --------------------------------------------------------------------

    def _enforce_limit(self, plans: list[_Plan], labels: dict[str, tuple[str, int]]) -> None:
        """Measure every embedded text in one batch; re-split units with a piece over the limit.

        The embedded text can cost more than label + text: a separator token, byte-level BPE
        merges across the join, a word cut in a forced split tokenized afresh. Such a unit is
        split again from its offsets with the budget cut by the excess.
        """
        limit = self.cfg.chunk_tokens
        pending = plans
        for round_ in range(_MAX_REFIT_ROUNDS):
            counts = iter(self.count_tokens([self._embed_text(pc) for p in pending for pc in p.pieces]))
            over: list[_Plan] = []
            for plan in pending:
                excess = max((next(counts) for _ in plan.pieces), default=0) - limit
                if excess > 0 and plan.budget > 1:
                    # Later rounds shrink faster so a stubborn unit cannot loop for long.
                    shrink = excess if round_ < 2 else max(excess, plan.budget // 4)
                    plan.budget = max(1, plan.budget - shrink)
                    self._split(plan, labels)
                    over.append(plan)
            if not over:
                return
            pending = over

    # -- output -------------------------------------------------------------------------

    def _embed_text(self, piece: _Piece) -> str:
        return f"{piece.label}\n\n{piece.text}" if piece.label else piece.text

    def _finish(self, doc: Document, pieces: list[_Piece]) -> list[Chunk]:
        return [
            Chunk(
                chunk_id=chunk_id_for(doc.doc_id, i, p.text),
                doc_id=doc.doc_id,
                chunk_index=i,
                text=p.text,
                embed_text=self._embed_text(p),
                heading_path=list(p.heading_path),
                source=doc.source,
                title=doc.title,
                content_hash=doc.content_hash,
                metadata=dict(doc.metadata),
            )
            for i, p in enumerate(pieces)
        ]


class _SectionLocator:
    """Maps a character offset in ``doc.text`` to the heading path of the section there."""

    def __init__(self, doc: Document):
        self.ends: list[int] = []
        self.paths: list[list[str]] = []
        pos = 0
        for section in doc.sections:
            start = doc.text.find(section.text, pos) if section.text else -1
            if start == -1:
                continue  # a section not verbatim in the text cannot be located; skip it
            pos = start + len(section.text)
            self.ends.append(pos)
            self.paths.append(list(section.heading_path))

    def __call__(self, offset: int) -> list[str]:
        # The first section that ends after the chunk's start: a chunk opening on a heading
        # line belongs to the section that heading introduces.
        i = bisect.bisect_right(self.ends, offset)
        if not self.paths:
            return []
        return list(self.paths[min(i, len(self.paths) - 1)])


#: Columns of :func:`chunks_to_rows`, in order.
CHUNK_COLUMNS = (
    "chunk_id",
    "doc_id",
    "chunk_index",
    "text",
    "embed_text",
    "heading_path",
    "source",
    "title",
    "content_hash",
    "metadata_json",
)


def chunks_to_rows(chunks: Sequence[Chunk]) -> dict[str, list[Any]]:
    """Columnar batch (one list per column) for Ray Data / Arrow.

    ``title`` is ``""`` when the document has none (as in ``Document.to_row``);
    ``metadata_json`` is the metadata as sorted-key JSON.
    """
    cols: dict[str, list[Any]] = {c: [] for c in CHUNK_COLUMNS}
    for c in chunks:
        cols["chunk_id"].append(c.chunk_id)
        cols["doc_id"].append(c.doc_id)
        cols["chunk_index"].append(c.chunk_index)
        cols["text"].append(c.text)
        cols["embed_text"].append(c.embed_text)
        cols["heading_path"].append(list(c.heading_path))
        cols["source"].append(c.source)
        cols["title"].append(c.title or "")
        cols["content_hash"].append(c.content_hash)
        cols["metadata_json"].append(json.dumps(c.metadata, sort_keys=True, default=str))
    return cols


def rows_to_chunks(rows: dict[str, Sequence[Any]]) -> list[Chunk]:
    """Inverse of :func:`chunks_to_rows` (accepts any sequences, e.g. numpy arrays)."""
    n = len(rows["chunk_id"])
    return [
        Chunk(
            chunk_id=str(rows["chunk_id"][i]),
            doc_id=str(rows["doc_id"][i]),
            chunk_index=int(rows["chunk_index"][i]),
            text=str(rows["text"][i]),
            embed_text=str(rows["embed_text"][i]),
            heading_path=[str(h) for h in rows["heading_path"][i]],
            source=str(rows["source"][i]),
            title=str(rows["title"][i]) or None,
            content_hash=str(rows["content_hash"][i]),
            metadata=json.loads(rows["metadata_json"][i] or "{}"),
        )
        for i in range(n)
    ]
