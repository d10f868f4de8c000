"""Chunker: token limits measured with the real tokenizer, boundaries, sections, ids, rows."""

from __future__ import annotations

import dataclasses
import random

import pyarrow as pa
import pytest

from ragops.config import ChunkerConfig, LoaderConfig
from ragops.documents import Chunk, Document, Section, chunk_id_for, content_hash
from ragops.ingest.chunkers import CHUNK_COLUMNS, Chunker, chunks_to_rows, heading_label, rows_to_chunks
from ragops.ingest.loaders import discover, load_file

WORDS = (
    "retrieval augmented generation tokenization internationalization embeddings vector store "
    "qdrant ray cluster autoscaling replicas passage encoder unbelievably the a of and to in is "
    "configuration documentation straightforward e.g. state-of-the-art don't 3.14 (parenthesis) naïve café"
).split()


def _sentences(rng: random.Random, n: int, tag: str = "") -> str:
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 16))]
        if tag:
            words[0] = tag
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", "."]))
    return " ".join(out)


def _paragraphs(seed: int, paragraphs: int, sentences: int, tag: str = "") -> str:
    rng = random.Random(seed)
    return "\n\n".join(_sentences(rng, sentences, tag) for _ in range(paragraphs))


def _doc(sections: list[Section], title: str | None = "Guide", doc_id: str = "guide.md") -> Document:
    text = "\n\n".join(s.text for s in sections)
    return Document(doc_id, text, f"/kb/{doc_id}", content_hash(text), title, sections, {"type": "md", "size": len(text)})


def _ntok(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _positions(text: str, chunks: list[Chunk]) -> list[tuple[int, int]]:
    """Where each chunk lies in ``text`` (chunks are exact substrings, in order)."""
    out, start = [], 0
    for c in chunks:
        p = text.find(c.text, start)
        assert p != -1, f"chunk {c.chunk_index} is not a substring of its section"
        out.append((p, p + len(c.text)))
        start = p + 1
    return out


def _assert_word_boundaries(text: str, spans: list[tuple[int, int]]) -> None:
    for a, e in spans:
        assert a == 0 or text[a - 1].isspace(), f"chunk starts inside a word: {text[max(0, a - 10):a + 10]!r}"
        assert e == len(text) or text[e].isspace(), f"chunk ends inside a word: {text[max(0, e - 10):e + 10]!r}"


@pytest.mark.parametrize("include_heading", [True, False])
@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (48, 8), (200, 32)])
def test_chunks_fit_the_token_limit(minilm_tokenizer, include_heading: bool, size: int, overlap: int) -> None:
    cfg = ChunkerConfig(chunk_tokens=size, overlap_tokens=overlap, include_heading=include_heading)
    doc = _doc([Section(["Guide", "Install"], _paragraphs(1, 6, 8))])
    chunks = Chunker(cfg, minilm_tokenizer)(doc)
    assert len(chunks) > 2
    for c in chunks:
        assert _ntok(minilm_tokenizer, c.embed_text) <= size
    if include_heading:
        assert all(c.embed_text == f"Guide > Install\n\n{c.text}" for c in chunks)
    else:
        assert all(c.embed_text == c.text for c in chunks)


def test_overlap_between_consecutive_chunks(minilm_tokenizer) -> None:
    text = _paragraphs(2, 3, 10)
    doc = _doc([Section(["Guide"], text)])
    chunks = Chunker(ChunkerConfig(chunk_tokens=64, overlap_tokens=12), minilm_tokenizer)(doc)
    spans = _positions(text, chunks)
    assert len(spans) > 3
    for (a1, e1), (a2, _) in zip(spans, spans[1:]):
        assert a1 < a2 < e1, "consecutive chunks must share text"
        assert 0 < _ntok(minilm_tokenizer, text[a2:e1]) <= 12


def test_no_overlap_when_disabled(minilm_tokenizer) -> None:
    text = _paragraphs(3, 3, 10)
    chunks = Chunker(ChunkerConfig(chunk_tokens=64, overlap_tokens=0), minilm_tokenizer)(_doc([Section([], text)]))
    spans = _positions(text, chunks)
    assert all(e1 <= a2 for (_, e1), (a2, _) in zip(spans, spans[1:]))
    assert "".join(text[a:e] for a, e in spans).replace(" ", "").replace("\n", "") == text.replace(" ", "").replace("\n", "")


@pytest.mark.parametrize("seed", range(5))
def test_never_splits_inside_a_word(minilm_tokenizer, seed: int) -> None:
    # Long sentences without paragraphs force whitespace and sentence splits; WordPiece
    # splits words like "internationalization" into several tokens that must stay together.
    text = _sentences(random.Random(seed), 40)
    chunks = Chunker(ChunkerConfig(chunk_tokens=24, overlap_tokens=6), minilm_tokenizer)(_doc([Section([], text)]))
    _assert_word_boundaries(text, _positions(text, chunks))


def test_prefers_paragraph_then_sentence_boundaries(minilm_tokenizer) -> None:
    chunker = Chunker(ChunkerConfig(chunk_tokens=100, overlap_tokens=0, include_heading=False), minilm_tokenizer)
    paragraphs = _paragraphs(4, 6, 2)  # paragraphs of ~30 tokens: several fit in one chunk
    spans = _positions(paragraphs, chunker(_doc([Section([], paragraphs)])))
    assert len(spans) > 1
    assert all(e == len(paragraphs) or paragraphs[e : e + 2] == "\n\n" for _, e in spans)
    flat = _sentences(random.Random(5), 30)  # one paragraph: split at sentence ends
    chunks = chunker(_doc([Section([], flat)]))
    assert len(chunks) > 1
    assert all(c.text[-1] in ".!?" for c in chunks)


def test_sections_are_never_straddled(minilm_tokenizer) -> None:
    sections = [
        Section([], "Preamble words before headings."),
        Section(["Guide"], _paragraphs(6, 2, 6, tag="alphaword")),
        Section(["Guide", "Install"], "Tiny."),
        Section(["Guide", "Usage"], _paragraphs(7, 3, 5, tag="betaword")),
        Section(["Appendix"], "Also tiny."),
    ]
    chunks = Chunker(ChunkerConfig(chunk_tokens=40, overlap_tokens=8), minilm_tokenizer)(_doc(sections))
    by_path = {tuple(s.heading_path): s.text for s in sections}
    for c in chunks:
        assert c.text in by_path[tuple(c.heading_path)]
    seen = [tuple(c.heading_path) for c in chunks]
    assert sorted(set(seen), key=seen.index) == list(by_path)  # every section, in order, none merged
    assert [c.text for c in chunks if c.heading_path == ["Guide", "Install"]] == ["Tiny."]
    assert [c.chunk_index for c in chunks] == list(range(len(chunks)))


def test_heading_prefix() -> None:
    assert heading_label("Guide", ["Guide", "Install"]) == "Guide > Install"
    assert heading_label("Manual", ["Install", "", "Linux"]) == "Manual > Install > Linux"
    assert heading_label(None, ["Install"]) == "Install"
    assert heading_label("Title", []) == "Title"
    assert heading_label(None, []) == ""


def test_embed_text_prefix_and_untitled(minilm_tokenizer) -> None:
    chunker = Chunker(ChunkerConfig(), minilm_tokenizer)
    (c,) = chunker(_doc([Section(["Install", "Linux"], "Run pip.")], title="Manual"))
    assert (c.text, c.embed_text, c.heading_path, c.title) == ("Run pip.", "Manual > Install > Linux\n\nRun pip.", ["Install", "Linux"], "Manual")
    (c,) = chunker(_doc([Section([], "Just text.")], title=None))
    assert c.embed_text == "Just text."


def test_long_title_leaves_room_for_text(minilm_tokenizer) -> None:
    title = " ".join(["verylongtitleword"] * 60)
    cfg = ChunkerConfig(chunk_tokens=32, overlap_tokens=4)
    chunks = Chunker(cfg, minilm_tokenizer)(_doc([Section(["Part"], _paragraphs(8, 2, 4))], title=title))
    for c in chunks:
        assert _ntok(minilm_tokenizer, c.embed_text) <= 32
        assert _ntok(minilm_tokenizer, c.text) >= 8


def test_word_longer_than_the_budget_is_cut_but_fits(minilm_tokenizer) -> None:
    blob = "x1-" * 200  # no whitespace at all: ~600 tokens
    text = f"Before the blob. {blob} After the blob."
    cfg = ChunkerConfig(chunk_tokens=50, overlap_tokens=0, include_heading=False)
    chunks = Chunker(cfg, minilm_tokenizer)(_doc([Section([], text)]))
    assert all(_ntok(minilm_tokenizer, c.text) <= 50 for c in chunks)
    assert "".join(c.text for c in chunks).replace(" ", "") == text.replace(" ", "")


def test_ids_are_deterministic_and_content_addressed(minilm_tokenizer) -> None:
    cfg = ChunkerConfig(chunk_tokens=32, overlap_tokens=4)
    sections = [Section(["A"], _paragraphs(9, 2, 4)), Section(["B"], _paragraphs(10, 2, 4))]
    first = Chunker(cfg, minilm_tokenizer)(_doc(sections))
    again = Chunker(cfg, minilm_tokenizer)(_doc([dataclasses.replace(s) for s in sections]))
    assert [c.chunk_id for c in first] == [c.chunk_id for c in again]
    assert all(c.chunk_id == chunk_id_for("guide.md", c.chunk_index, c.text) for c in first)
    assert len({c.chunk_id for c in first}) == len(first)

    changed = [sections[0], Section(["B"], sections[1].text.replace(".", " changed.", 1))]
    edited = Chunker(cfg, minilm_tokenizer)(_doc(changed))
    unchanged_a = [c for c in first if c.heading_path == ["A"]]
    assert [c.chunk_id for c in edited[: len(unchanged_a)]] == [c.chunk_id for c in unchanged_a]
    assert edited[len(unchanged_a)].chunk_id != first[len(unchanged_a)].chunk_id
    other_doc = Chunker(cfg, minilm_tokenizer)(_doc(sections, doc_id="copy.md"))
    assert not {c.chunk_id for c in other_doc} & {c.chunk_id for c in first}


def test_respect_sections_off_chunks_the_whole_text(minilm_tokenizer) -> None:
    sections = [Section(["A"], "Short alpha section."), Section(["B"], "Short beta section."), Section(["B", "C"], _paragraphs(11, 2, 6))]
    doc = _doc(sections)
    cfg = ChunkerConfig(chunk_tokens=40, overlap_tokens=0, respect_sections=False)
    chunks = Chunker(cfg, minilm_tokenizer)(doc)
    assert chunks[0].text.startswith("Short alpha section.\n\nShort beta section.")  # spans two sections
    assert chunks[0].heading_path == ["A"]
    assert chunks[-1].heading_path == ["B", "C"]
    assert all(c.text in doc.text and _ntok(minilm_tokenizer, c.embed_text) <= 40 for c in chunks)


def test_byte_level_bpe_tokenizer(bpe_tokenizer) -> None:
    """Tokens that carry their leading space, and a separator that costs tokens: still exact."""
    text = _paragraphs(12, 4, 6)
    cfg = ChunkerConfig(chunk_tokens=40, overlap_tokens=8)
    chunks = Chunker(cfg, bpe_tokenizer)(_doc([Section(["Guide", "Install"], text)], title="Quick brown guide"))
    assert len(chunks) > 3
    assert all(_ntok(bpe_tokenizer, c.embed_text) <= 40 for c in chunks)
    _assert_word_boundaries(text, _positions(text, chunks))


def test_empty_document_has_no_chunks(minilm_tokenizer) -> None:
    doc = Document("e", "", "/e", content_hash(""), None, [Section(["A"], "  ")], {})
    assert Chunker(ChunkerConfig(), minilm_tokenizer)(doc) == []


def test_document_without_sections_uses_its_text(minilm_tokenizer) -> None:
    doc = Document("t.txt", "Plain text.", "/t.txt", content_hash("Plain text."), None, [], {"type": "txt"})
    (c,) = Chunker(ChunkerConfig(), minilm_tokenizer)(doc)
    assert (c.text, c.heading_path, c.metadata, c.content_hash) == ("Plain text.", [], {"type": "txt"}, doc.content_hash)


def test_slow_tokenizer_is_rejected() -> None:
    with pytest.raises(TypeError, match="fast"):
        Chunker(ChunkerConfig(), object())


def test_batch_equals_one_by_one(minilm_tokenizer) -> None:
    docs = [_doc([Section(["S"], _paragraphs(20 + i, 2, 3))], doc_id=f"d{i}.md") for i in range(8)]
    chunker = Chunker(ChunkerConfig(chunk_tokens=32, overlap_tokens=4), minilm_tokenizer)
    assert chunker.chunk_documents(docs) == [c for d in docs for c in chunker(d)]


def test_rows_round_trip_and_arrow(minilm_tokenizer) -> None:
    doc = _doc([Section(["A"], _paragraphs(30, 2, 4)), Section([], "Untitled part.")], title=None)
    chunks = Chunker(ChunkerConfig(chunk_tokens=32, overlap_tokens=4), minilm_tokenizer)(doc)
    rows = chunks_to_rows(chunks)
    assert tuple(rows) == CHUNK_COLUMNS
    assert all(len(col) == len(chunks) for col in rows.values())
    assert rows["title"][0] == "" and rows["heading_path"][0] == ["A"]
    assert rows["metadata_json"][0] == '{"size": %d, "type": "md"}' % len(doc.text)
    table = pa.Table.from_pydict(rows)
    assert table.schema.field("heading_path").type == pa.list_(pa.string())
    assert rows_to_chunks(table.to_pydict()) == chunks
    assert chunks_to_rows([]) == {c: [] for c in CHUNK_COLUMNS}


def test_loaded_markdown_chunks_end_to_end(minilm_tokenizer, write_files) -> None:
    body = _paragraphs(40, 3, 5)
    root = write_files({"guide.md": f"# Guide\n\nIntro.\n\n```sh\n# comment in code\npip install x\n```\n\n## Install\n\n{body}\n"})
    (sf,) = discover([str(root)], LoaderConfig())
    (doc,) = load_file(sf, LoaderConfig())
    chunks = Chunker(ChunkerConfig(chunk_tokens=48, overlap_tokens=8), minilm_tokenizer)(doc)
    assert chunks[0].heading_path == ["Guide"] and "# comment in code" in chunks[0].text
    assert chunks[0].embed_text.startswith("Guide\n\nIntro.")
    install = [c for c in chunks if c.heading_path == ["Guide", "Install"]]
    assert len(install) > 2 and all(c.embed_text.startswith("Guide > Install\n\n") for c in install)
    assert all(c.source == str(root / "guide.md") and c.doc_id == "guide.md" for c in chunks)
