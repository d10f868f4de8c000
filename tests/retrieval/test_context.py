"""Context assembly: neighbour expansion on a real collection, dedupe, token-budget packing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ragops.retrieval.context import (
    assemble_context,
    dedupe,
    expand_neighbors,
    hit_to_passage,
    merge_texts,
    pack,
)
from ragops.retrieval.prompts import Passage, format_passage
from ragops.retrieval.search import Retriever, SearchHit
from tests.retrieval._helpers import LONG_SENTENCES, chunks_of, ingest, settings_for, write_corpus


def words(text: str) -> int:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return len(text.split())


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory, tiny_embedder: Path) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("context")
    settings = settings_for(root / "data", tiny_embedder, "retrieval.expand_neighbors=1")
    ingest(settings, write_corpus(root / "docs"))
    with Retriever(settings) as retriever:
        store = retriever.store
        yield {"settings": settings, "retriever": retriever, "store": store, "long": chunks_of(store, "long.md")}


def _from_payload(p: dict[str, Any], rank: int, score: float = 1.0) -> SearchHit:
    return SearchHit(
        rank=rank,
        score=score,
        doc_id=p["doc_id"],
        chunk_id=p["chunk_id"],
        text=p["text"],
        source=p["source"],
        metadata=p["metadata"],
        title=p["title"],
        heading_path=p["heading_path"],
        chunk_index=p["chunk_index"],
        n_chunks=p["n_chunks"],
    )


PARAGRAPH = " ".join(LONG_SENTENCES)


# ---------------------------------------------------------------------------------------
# Merging and expansion
# ---------------------------------------------------------------------------------------


def test_merge_texts_removes_the_overlap() -> None:
    assert merge_texts("one two three four five", "four five six seven") == "one two three four five six seven"
    # A short accidental match ("the") is not an overlap.
    assert merge_texts("run the", "the end") == "run the\nthe end"
    assert merge_texts("alpha beta", "gamma") == "alpha beta\ngamma"
    assert merge_texts("intro text", "next text", same_section=False, heading="Usage") == "intro text\n\nUsage\nnext text"
    # Overlap must sit on word boundaries: "ending" is not "end" + "ing".
    assert merge_texts("the story is pending", "ending of it all") == "the story is pending\nending of it all"


def test_the_fixture_document_has_overlapping_chunks(corpus: dict[str, Any]) -> None:
    long = corpus["long"]
    assert len(long) >= 6
    assert all(p["text"] in PARAGRAPH for p in long)


def test_expand_neighbors_merges_a_window_in_document_order(corpus: dict[str, Any]) -> None:
    long = corpus["long"]
    middle = next(p for p in long if "flamingo" in p["text"] and p["chunk_index"] > 0)
    i = middle["chunk_index"]
    hit = _from_payload(middle, rank=1, score=0.7)
    (passage,) = expand_neighbors([hit], corpus["store"], 1)
    window = long[i - 1 : i + 2]
    # The merged text is the paragraph's span from the first chunk's start to the last's end:
    # exactly once each, overlap removed.
    start = PARAGRAPH.index(window[0]["text"])
    end = PARAGRAPH.index(window[-1]["text"]) + len(window[-1]["text"])
    assert passage.text == PARAGRAPH[start:end]
    assert len(passage.text) < sum(len(p["text"]) for p in window)
    assert (passage.rank, passage.score, passage.chunk_id) == (1, 0.7, middle["chunk_id"])
    assert passage.chunk_index == i - 1


def test_expand_neighbors_merges_adjacent_hits_and_keeps_docs_apart(corpus: dict[str, Any]) -> None:
    long = corpus["long"]
    gpus = chunks_of(corpus["store"], "gpus.md")[0]
    hits = [
        _from_payload(long[3], rank=1, score=0.9),
        _from_payload(gpus, rank=2, score=0.8),
        _from_payload(long[2], rank=3, score=0.7),
    ]
    merged = expand_neighbors(hits, corpus["store"], 0)
    assert [p.doc_id for p in merged] == ["long.md", "gpus.md"]
    assert [p.rank for p in merged] == [1, 2]
    first = merged[0]
    assert first.chunk_id == long[3]["chunk_id"]  # the best hit of the run speaks for it
    assert first.chunk_index == 2
    assert first.text.startswith(long[2]["text"]) and first.text.endswith(long[3]["text"])
    assert first.text in PARAGRAPH
    assert merged[1].text == gpus["text"]


def test_expand_neighbors_at_document_edges(corpus: dict[str, Any]) -> None:
    long = corpus["long"]
    first = expand_neighbors([_from_payload(long[0], rank=1)], corpus["store"], 2)
    assert first[0].text == PARAGRAPH[: PARAGRAPH.index(long[2]["text"]) + len(long[2]["text"])]
    last = expand_neighbors([_from_payload(long[-1], rank=1)], corpus["store"], 1)
    assert last[0].text.endswith(long[-1]["text"]) and last[0].text.startswith(long[-2]["text"])
    # Two distant hits of one document stay two passages.
    apart = expand_neighbors([_from_payload(long[0], rank=1), _from_payload(long[-1], rank=2)], corpus["store"], 1)
    assert len(apart) == 2
    assert expand_neighbors([], corpus["store"], 1) == []


# ---------------------------------------------------------------------------------------
# Dedupe
# ---------------------------------------------------------------------------------------


def _hit(rank: int, text: str, score: float | None = None, doc: str | None = None) -> SearchHit:
    return SearchHit(rank=rank, score=score if score is not None else 1.0 / rank, doc_id=doc or f"d{rank}",
                     chunk_id=f"c{rank}", text=text, source="")


def test_dedupe_identical_and_near_identical() -> None:
    hits = [
        _hit(1, "GPUs are requested with nvidia.com/gpu."),
        _hit(2, "Something else entirely."),
        _hit(3, "  gpus are requested\nwith NVIDIA.com/gpu. "),  # same after normalization
        _hit(4, ""),
    ]
    out = dedupe(hits)
    assert [h.chunk_id for h in out] == ["c1", "c2"]
    assert [h.rank for h in out] == [1, 2]


def test_dedupe_contained_chunks() -> None:
    # A worse hit contained in a better one goes.
    out = dedupe([_hit(1, "alpha beta gamma delta"), _hit(2, "beta gamma")])
    assert [h.chunk_id for h in out] == ["c1"]
    # A better hit contained in a worse one: the containing text takes the better position.
    out = dedupe([_hit(1, "beta gamma"), _hit(2, "other text"), _hit(3, "alpha beta gamma delta")])
    assert [(h.rank, h.chunk_id) for h in out] == [(1, "c3"), (2, "c2")]
    assert out[0].score == 1.0  # the better score is kept
    # One text swallowing two kept ones keeps a single copy.
    out = dedupe([_hit(1, "beta"), _hit(2, "delta"), _hit(3, "alpha beta gamma delta")])
    assert [h.chunk_id for h in out] == ["c3"]


# ---------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------


def _passages(*texts: str) -> list[Passage]:
    return [Passage(n=0, text=t, title=None, doc_id=f"d{i}", chunk_id=f"c{i}") for i, t in enumerate(texts)]


def _cost(p: Passage) -> int:
    return words(format_passage(p))


def test_pack_keeps_everything_that_fits_and_numbers_it() -> None:
    out = pack(_passages("a b c", "d e f", "g h"), 100, words)
    assert [p.n for p in out] == [1, 2, 3]
    assert [p.text for p in out] == ["a b c", "d e f", "g h"]


def test_pack_stops_when_little_budget_is_left() -> None:
    ten = " ".join(["w"] * 10)
    # Each costs 13 tokens ("[n]", two quote fences, 10 words); 3 fit in 40, 1 is left: not worth a cut.
    out = pack(_passages(ten, ten, ten, ten, "short"), 40, words)
    assert len(out) == 3
    assert sum(_cost(p) for p in out) <= 40


def test_pack_truncates_the_last_passage_at_a_word_boundary() -> None:
    long_text = " ".join(f"word{i}" for i in range(200))
    out = pack(_passages("a b c", long_text, "never reached"), 60, words)
    assert [p.n for p in out] == [1, 2]
    assert sum(_cost(p) for p in out) == 60  # the cut fills the budget exactly
    # Passage 1 costs 6 ("[1]", the two quote fences, 3 words); passage 2's header 3.
    assert out[1].text == " ".join(f"word{i}" for i in range(60 - 6 - 3))
    assert long_text.startswith(out[1].text)


def test_pack_truncates_a_first_passage_bigger_than_the_budget() -> None:
    out = pack(_passages(" ".join(["x"] * 500)), 64, words)
    assert len(out) == 1 and _cost(out[0]) <= 64


def test_pack_respects_the_budget_with_a_real_tokenizer(corpus: dict[str, Any]) -> None:
    from transformers import AutoTokenizer

    from tests.conftest import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))

    def count(text: str) -> int:
        return len(tok(text, add_special_tokens=False)["input_ids"])

    passages = [hit_to_passage(_from_payload(p, rank=i)) for i, p in enumerate(corpus["long"], start=1)]
    for budget in (50, 120, 333):
        out = pack(passages, budget, count)
        assert sum(count(format_passage(p)) for p in out) <= budget
        assert [p.n for p in out] == list(range(1, len(out) + 1))
        assert all(p.text.strip() for p in out)


# ---------------------------------------------------------------------------------------
# All together
# ---------------------------------------------------------------------------------------


def test_assemble_context(corpus: dict[str, Any]) -> None:
    retriever: Retriever = corpus["retriever"]
    hits = retriever.search("flamingo gauge pelican", mode="sparse", k=4).hits
    assert hits[0].doc_id == "long.md"
    settings = corpus["settings"]
    passages = assemble_context(hits, store=corpus["store"], settings=settings, count_tokens=words)
    assert [p.n for p in passages] == list(range(1, len(passages) + 1))
    assert sum(_cost(p) for p in passages) <= settings.generator.context_tokens
    # The flamingo chunk arrives with its neighbours, merged, without repeated text.
    top = passages[0]
    assert "flamingo" in top.text and top.text in PARAGRAPH
    texts = [p.text for p in passages]
    assert len(texts) == len(set(texts))
    # A tight budget cuts the context.
    small = assemble_context(hits, store=corpus["store"], settings=settings, count_tokens=words, budget_tokens=40)
    assert sum(_cost(p) for p in small) <= 40
    # Without expansion, hits map one to one (after dedupe).
    plain_settings = settings.model_copy(update={"retrieval": settings.retrieval.model_copy(update={"expand_neighbors": 0})})
    plain = assemble_context(hits, store=None, settings=plain_settings, count_tokens=words)
    assert [p.chunk_id for p in plain] == [h.chunk_id for h in dedupe(hits)]
