"""Model registry: packaged, local and hub models, and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ragops.config import EmbedderConfig
from ragops.embeddings import TextEmbedder
from ragops.errors import ModelNotFoundError
from ragops.model_registry import BGE_QUERY_INSTRUCTION, list_models, resolve_model


def test_packaged_models_resolve_offline() -> None:
    emb = resolve_model("minilm-l6", kind="embedder")
    assert (emb.locate() / "config.json").exists()
    gen = resolve_model("smollm2-135m-instruct", kind="generator")
    assert (gen.locate() / gen.gguf_file).exists()


def test_hub_id_offline_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    spec = resolve_model("BAAI/bge-small-en-v1.5")
    assert spec.query_instruction == BGE_QUERY_INSTRUCTION
    with pytest.raises(ModelNotFoundError) as exc:
        spec.locate()
    msg = str(exc.value)
    assert "local" in msg and "minilm-l6" in msg and "embedder.model" in msg


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ModelNotFoundError, match="minilm-l6"):
        resolve_model("no-such-model", kind="embedder")


def test_kind_mismatch() -> None:
    with pytest.raises(ModelNotFoundError, match="generator"):
        resolve_model("smollm2-135m-instruct", kind="embedder")


def test_list_models_reports_availability() -> None:
    rows = {r["name"]: r for r in list_models()}
    assert rows["minilm-l6"]["available"] is True
    assert rows["smollm2-135m-instruct"]["available"] is True
    assert rows["bge-small-en-v1.5"]["source"] == "hub"


def test_bge_style_local_model_instruction_on_queries_only(tmp_path: Path) -> None:
    """A tiny BERT with CLS pooling and a shipped query prompt behaves like BGE."""
    from tests.conftest import build_tiny_sentence_model

    path = build_tiny_sentence_model(tmp_path, pooling="cls", prompts={"query": "Represent this: "})
    emb = TextEmbedder(EmbedderConfig(model=str(path)))
    assert emb.query_instruction == "Represent this: "
    q = emb.encode_queries(["what is mig"])
    p = emb.encode_passages(["what is mig"])
    assert not np.allclose(q, p)  # the instruction changes the query side only
    p2 = emb.encode_passages(["Represent this: what is mig"])
    assert np.allclose(q, p2, atol=1e-5)
    assert np.allclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5)
    # Pooling comes from the model's own config: CLS here.
    assert emb.model[1].get_config_dict()["pooling_mode"] == "cls"


def test_configured_instruction_overrides_and_disables(tmp_path: Path) -> None:
    from tests.conftest import build_tiny_sentence_model

    path = build_tiny_sentence_model(tmp_path, pooling="cls", prompts={"query": "Q: "})
    emb = TextEmbedder(EmbedderConfig(model=str(path), query_instruction=""))
    assert emb.query_instruction == ""
    assert np.allclose(emb.encode_queries(["x"]), emb.encode_passages(["x"]))
