"""Synthetic training queries from the indexed corpus (``ragops train embedder --synthesize N``).

Two kinds, mixed by ``finetune.<model>.pairs.synthesize_generated``:

* **generated**: the configured generator reads a sampled chunk and writes one question that
  the chunk answers (the recipe of docTTTTTquery / InPars / "GenQ" in sentence-transformers'
  examples), greedy, a few dozen tokens;
* **structural**: free, from the chunk itself: its innermost heading as a topic query
  ("json > Basic Usage" → "Basic Usage json"), or one of its sentences as a query with that
  sentence removed from the positive (the Inverse Cloze Task of ORQA), so the pair does not
  match on the very words it was cut from.

A synthetic query is kept only if BM25 ranks its own chunk within the top
``synthesize_filter_k`` hits: a question the chunk does not lexically answer at all is more
likely the generator's invention than a paraphrase worth learning (InPars' filter idea, with
BM25 as the cheap judge). What was kept and dropped is counted.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from ragops.config import Settings
from ragops.finetune.retriever_pairs import Chunk, Pair

_SENTENCE = re.compile(r"(.+?[.!?])(\s+|$)", re.S)
_QUESTION_PROMPT = (
    "Write one short question that a user of this documentation would ask and that the passage "
    "below answers. Reply with the question only.\n\nPassage:\n{passage}"
)


def structural_query(chunk: Chunk, rng: random.Random) -> tuple[str, str] | None:
    """``(query, positive)`` from a chunk's heading or one of its sentences; None when it has neither.

    The sentence is drawn from anywhere in the body, as ORQA's Inverse Cloze Task does, not only
    the first: in reference documentation the sentence a user's question paraphrases is as often
    the one under a signature in the middle of a section as the section's opening line.
    """
    options: list[tuple[str, str]] = []
    parts = [p.strip() for p in chunk.label.split(" > ") if p.strip()]
    if parts:
        inner = parts[-1]
        context = parts[0] if len(parts) > 1 else ""
        query = f"{inner} {context}".strip() if context and context.lower() not in inner.lower() else inner
        if len(query.split()) >= 2:
            options.append((query, chunk.text))
    body = chunk.body.strip()
    spans = [m for m in _SENTENCE.finditer(body) if 4 <= len(m.group(1).split()) <= 40]
    if spans:
        m = rng.choice(spans)
        rest = f"{body[: m.start()].rstrip()} {body[m.end() :].lstrip()}".strip()
        if len(rest.split()) >= 8:
            positive = f"{chunk.label}\n\n{rest}" if chunk.label else rest
            options.append((" ".join(m.group(1).split()), positive))
    return rng.choice(options) if options else None


def _clean_question(text: str) -> str | None:
    line = next((ln.strip() for ln in text.strip().splitlines() if ln.strip()), "")
    line = re.sub(r"^(question|q)\s*[:.-]\s*", "", line, flags=re.I).strip().strip('"').strip()
    if not (3 <= len(line.split()) <= 40):
        return None
    return line


#: Chunks whose questions are generated together: llama.cpp decodes them as one batch (and the
#: transformers engine as one padded batch), several times faster than one at a time.
GENERATE_BATCH = 16


def generated_queries(settings: Settings, chunks: Sequence[Chunk], progress: Callable[[int], None] | None = None) -> list[Pair]:
    """One generator-written question per chunk (those it wrote no usable question for are skipped)."""
    from ragops.retrieval.engines import generator_for

    gen = generator_for(settings)
    out: list[Pair] = []
    for start in range(0, len(chunks), GENERATE_BATCH):
        batch = chunks[start : start + GENERATE_BATCH]
        chats = [[{"role": "user", "content": _QUESTION_PROMPT.format(passage=c.text[:1500])}] for c in batch]
        results = gen.generate_batch(chats, max_new_tokens=40, temperature=0.0, stop=["\n\n"])
        for chunk, result in zip(batch, results, strict=True):
            q = _clean_question(result.text)
            if q:
                out.append(Pair(query=q, positive=chunk.text, doc_id=chunk.doc_id, chunk_id=chunk.chunk_id, source="synthetic-generated"))
        if progress:
            progress(start + len(batch))
    return out


def bm25_filter(settings: Settings, pairs: list[Pair], k: int, collection: str | None = None) -> list[Pair]:
    """The pairs whose own chunk BM25 ranks within the top ``k`` for their query."""
    from ragops.retrieval.search import Retriever

    kept: list[Pair] = []
    with Retriever(settings, collection=collection) as retriever:
        for start in range(0, len(pairs), 128):
            batch = pairs[start : start + 128]
            results = retriever.search_batch([p.query for p in batch], k=k, mode="sparse")
            for p, hits in zip(batch, results, strict=True):
                if any(h.chunk_id == p.chunk_id for h in hits.hits):
                    kept.append(p)
    return kept


def synthesize(
    settings: Settings,
    corpus: Sequence[Chunk],
    n: int,
    *,
    generated_share: float,
    filter_k: int,
    seed: int,
    collection: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[list[Pair], dict[str, Any]]:
    """``n`` synthetic pairs (before filtering) from chunks sampled from ``corpus``.

    Returns:
        The kept pairs and ``{"sampled", "generated", "structural", "kept", "dropped_by_bm25"}``.
    """
    rng = random.Random(seed)
    sample = rng.sample(list(corpus), min(n, len(corpus)))
    n_gen = round(len(sample) * generated_share)
    to_generate, to_structure = sample[:n_gen], sample[n_gen:]
    pairs: list[Pair] = []
    for chunk in to_structure:
        made = structural_query(chunk, rng)
        if made:
            pairs.append(Pair(query=made[0], positive=made[1], doc_id=chunk.doc_id, chunk_id=chunk.chunk_id, source="synthetic-structural"))
    structural = len(pairs)
    if to_generate:
        pairs.extend(generated_queries(settings, to_generate, progress))
    kept = bm25_filter(settings, pairs, filter_k, collection)
    stats = {"sampled": len(sample), "generated": len(pairs) - structural, "structural": structural,
             "kept": len(kept), "dropped_by_bm25": len(pairs) - len(kept)}  # fmt: skip
    return kept, stats
