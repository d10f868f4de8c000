"""Shared pieces of the search / rerank / context / evaluate tests.

A small hand-written corpus is ingested through the real pipeline (``runner=local``) into a
real Qdrant Edge store with the tiny random embedder. Dense scores of a random model are
meaningless, so tests that need "the obvious document" use distinctive words (BM25 makes
sparse and hybrid search reliable) or query with a chunk's exact embedded text (cosine 1).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The same base overrides as the ``make_settings`` fixture of tests/conftest.py; repeated
#: here because module-scoped fixtures (one ingest per test module) cannot use that
#: function-scoped fixture.
BASE_OVERRIDES = (
    "ingest.runner=local",
    "ingest.chunker.chunk_tokens=64",
    "ingest.chunker.overlap_tokens=8",
)

GPUS_MD = """---
tags: [gpu, nvidia]
team: infra
---
# Alpha GPUs

The zebrafish cluster runs on H100 accelerators with NVLink.
"""

STORAGE_MD = """---
tags: [storage]
---
# Beta storage

Parquet files land in the kraken bucket every night.
"""

# Short on purpose: BM25 orders it above gpus.md for "walrus zebrafish" (tests/evaluate).
NOTES_TXT = "The walrus scheduler walrus queue mentions zebrafish.\n"

#: One long section: several overlapping chunks with a unique word in the middle one.
LONG_SENTENCES = [f"Step {i} of the pelican procedure tightens bolt number {i * 7 + 3}." for i in range(1, 31)]
LONG_SENTENCES[15] = "Step 16 of the pelican procedure inspects the flamingo gauge carefully."
LONG_MD = "# Pelican handbook\n\n" + " ".join(LONG_SENTENCES) + "\n"

CORPUS = {
    "gpus.md": GPUS_MD,
    "storage.md": STORAGE_MD,
    "notes.txt": NOTES_TXT,
    "long.md": LONG_MD,
}


def write_corpus(root: Path, files: dict[str, str] | None = None) -> Path:
    """Write the corpus files under ``root`` and return it."""
    root.mkdir(parents=True, exist_ok=True)
    for name, text in (files or CORPUS).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root


def settings_for(data_dir: Path, embedder: Path, *overrides: str) -> Any:
    """Settings like ``make_settings`` gives, on ``data_dir``."""
    from ragops.config import load_settings

    return load_settings([], [f"embedder.model={embedder}", *BASE_OVERRIDES, *overrides], data_dir=data_dir, environ={})


def ingest(settings: Any, docs: Path, collection: str | None = None) -> None:
    """Ingest ``docs`` with the real pipeline; fails the test if anything failed."""
    from ragops.ingest.pipeline import run_ingest

    report = run_ingest(settings, [str(docs)], collection=collection)
    assert report.ok, report.to_dict()


def chunks_of(store: Any, doc_id: str) -> list[dict[str, Any]]:
    """Payloads of a document's chunks in chunk order."""
    from ragops.vectorstore.base import Filter, Match

    payloads = [r.payload for r in store.scroll(Filter(must=[Match("doc_id", [doc_id])]))]
    return sorted(payloads, key=lambda p: p["chunk_index"])


def embedded_text(payload: dict[str, Any]) -> str:
    """What the dense embedder saw for a chunk (heading label + text), for exact-match queries."""
    from ragops.ingest.chunkers import heading_label

    label = heading_label(payload.get("title") or None, payload.get("heading_path") or [])
    return f"{label}\n\n{payload['text']}" if label else payload["text"]


def build_tiny_cross_encoder(target: Path) -> Path:
    """A 2-layer, 32-wide BERT sequence classifier (one label) with the MiniLM tokenizer.

    Loads with ``sentence_transformers.CrossEncoder(path)``; its scores are random but fixed.
    """
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from tests.conftest import minilm_dir

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=1,
        # Wider random weights than the default 0.02 so scores differ clearly between texts.
        initializer_range=0.5,
    )
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(target)
    tok.save_pretrained(target)
    return target
