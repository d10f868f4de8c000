"""Dense text embedders (sentence-transformers, or ONNX Runtime int8) resolved through the model registry.

:class:`TextEmbedder` is the one place that knows how to turn text into vectors: the ingest
stage encodes passages with it and the retriever encodes queries with it. BGE specifics are
honoured here: the query instruction is prefixed to queries only, pooling comes from the
model's own sentence-transformers config (CLS for BGE, mean for MiniLM), and vectors are
L2-normalized so cosine similarity is a dot product. ``embedder.backend: onnx`` swaps the
float32 torch model for an int8 ONNX Runtime one behind the same interface
(:mod:`ragops.onnx_embedder`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ragops.config import EmbedderConfig
from ragops.errors import ModelNotFoundError
from ragops.model_registry import ModelSpec, resolve_model, with_instruction

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    """Map 'auto' to 'cuda' when a GPU is visible, else 'cpu'."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def embedder_identity(cfg: EmbedderConfig) -> str:
    """What a collection built with ``cfg.model`` records as its embedder, without loading it.

    The configured name, except for a registry alias of a published embedder
    (``embedder-latest``): that moves, so the artifact it names now is recorded.
    """
    spec = resolve_model(cfg.model, kind="embedder", registry=cfg._registry)
    return spec.artifact or cfg.model


class TextEmbedder:
    """Encodes passages and queries with one sentence-transformers model.

    Loading is lazy (first use or :meth:`warm_up`), so constructing one is free and it can be
    shipped to Ray actors by config alone.

    Args:
        cfg: Embedder settings.
        model: Which model to load; defaults to ``cfg.model`` (the passage side).
    """

    def __init__(self, cfg: EmbedderConfig, model: str | None = None) -> None:
        self.cfg = cfg
        self.model_name = model or cfg.model
        self.spec: ModelSpec = with_instruction(resolve_model(self.model_name, kind="embedder", registry=cfg._registry), cfg.query_instruction)
        self._model: Any = None
        self._lock = threading.Lock()

    # -- loading -------------------------------------------------------------------------
    def warm_up(self) -> None:
        """Load the model (idempotent, thread-safe)."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            path: Path = self.spec.locate()
            if self.cfg.backend == "onnx":
                # Same interface as SentenceTransformer for everything used below; int8 on CPU
                # (config validation refuses cuda; 'auto' means the CPU for this backend).
                from ragops.onnx_embedder import OnnxSentenceModel

                model: Any = OnnxSentenceModel.load(path, self.cfg.onnx_cache_dir)
            else:
                from sentence_transformers import SentenceTransformer

                try:
                    model = SentenceTransformer(str(path), device=resolve_device(self.cfg.device), local_files_only=True)
                except Exception as exc:  # noqa: BLE001 - surface as a model error with the path
                    raise ModelNotFoundError(f"could not load embedder '{self.model_name}' from {path}: {exc}") from exc
            if self.cfg.max_seq_length:
                model.max_seq_length = self.cfg.max_seq_length
            if not self.spec.query_instruction:
                # A local model may ship its own query prompt (sentence-transformers config).
                prompt = (getattr(model, "prompts", None) or {}).get("query", "")
                if prompt and self.cfg.query_instruction is None:
                    self.spec = with_instruction(self.spec, prompt)
            self._model = model

    @property
    def model(self) -> Any:
        """The loaded SentenceTransformer."""
        self.warm_up()
        return self._model

    @property
    def dim(self) -> int:
        """Embedding size."""
        return int(self.model.get_embedding_dimension())

    @property
    def tokenizer(self) -> Any:
        """The model's (fast) tokenizer, used for token-aware chunking."""
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        """Longest input (in tokens) the model reads; longer input is truncated."""
        return int(self.model.max_seq_length)

    @property
    def query_instruction(self) -> str:
        """Prefix applied to queries ('' for none)."""
        self.warm_up()
        return self.spec.query_instruction

    @property
    def identity(self) -> str:
        """What a collection records as its embedder: the configured name, or for a registry
        alias (``embedder-latest``, which moves) the artifact it named.

        The backend is deliberately not part of it: ``onnx`` (int8) runs the same model in the
        same vector space (cosine to the float32 vectors about 0.99+), so a collection embedded
        with one backend is searched and extended with the other without re-embedding. Which
        backend embedded is recorded per ingest run instead (:attr:`backend`)."""
        return self.spec.artifact or self.model_name

    @property
    def backend(self) -> str:
        """'torch' (float32 sentence-transformers) or 'onnx-int8' (ONNX Runtime, int8)."""
        return "onnx-int8" if self.cfg.backend == "onnx" else "torch"

    # -- encoding ------------------------------------------------------------------------
    def encode_passages(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed passages (no instruction). Returns float32 ``(n, dim)``."""
        return self._encode(list(texts), prompt=None, batch_size=batch_size)

    def encode_queries(self, texts: Sequence[str], batch_size: int | None = None) -> np.ndarray:
        """Embed queries, with the model's query instruction prefixed (BGE)."""
        return self._encode(list(texts), prompt=self.query_instruction or None, batch_size=batch_size)

    def count_tokens(self, text: str) -> int:
        """Number of model tokens in ``text`` (special tokens excluded)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _encode(self, texts: list[str], prompt: str | None, batch_size: int | None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        vectors = self.model.encode(
            texts,
            prompt=prompt,
            batch_size=batch_size or self.cfg.batch_size,
            normalize_embeddings=self.cfg.normalize,
            convert_to_numpy=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32)
