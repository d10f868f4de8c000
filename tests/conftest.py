"""Session-wide fixtures: tiny models built once, one local Ray per test session.

Tiny models are real transformers/sentence-transformers models with random weights and the
packaged MiniLM tokenizer: every code path is the production one, compute is milliseconds.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DOCS = REPO / "samples" / "docs"


def minilm_dir() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 (tokenizer source for tiny models)."""
    from ragops.model_registry import resolve_model

    return resolve_model("minilm-l6").locate()


def build_tiny_sentence_model(target: Path, pooling: str = "mean", prompts: dict[str, str] | None = None) -> Path:
    """Save a 2-layer, 32-wide BERT as a sentence-transformers model under ``target``."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    cfg = BertConfig(
        vocab_size=tok.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=512,
    )
    raw = target / "hf"
    BertModel(cfg).save_pretrained(raw)
    tok.save_pretrained(raw)
    word = Transformer(str(raw), max_seq_length=128)
    pool = Pooling(word.get_embedding_dimension(), pooling_mode=pooling)
    model = SentenceTransformer(modules=[word, pool], prompts=prompts or {})
    out = target / "st"
    model.save(str(out))
    shutil.rmtree(raw)
    return out


@pytest.fixture(scope="session")
def tiny_embedder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny mean-pooling sentence embedder (dim 32) saved once per session."""
    return build_tiny_sentence_model(tmp_path_factory.mktemp("tiny-embedder"))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray for the whole test session (started lazily by the tests that need it)."""
    import ray

    from ragops.config import RayConfig
    from ragops.raylocal import ensure_ray

    ensure_ray(RayConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture
def make_settings(tmp_path: Path, tiny_embedder: Path) -> Callable[..., Any]:
    """Settings on a fresh data dir with the tiny embedder; ``--set``-style overrides apply."""
    from ragops.config import load_settings

    def make(*overrides: str, data_dir: Path | None = None) -> Any:
        base = [
            f"embedder.model={tiny_embedder}",
            "ingest.runner=local",
            "ingest.chunker.chunk_tokens=64",
            "ingest.chunker.overlap_tokens=8",
        ]
        return load_settings([], base + list(overrides), data_dir=data_dir or tmp_path / "data", environ={})

    return make


@pytest.fixture
def sample_docs(tmp_path: Path) -> Path:
    """A private copy of a slice of the shipped sample corpus (tests may edit it)."""
    dest = tmp_path / "docs"
    shutil.copytree(SAMPLE_DOCS, dest)
    return dest
