"""The embedding stage: chunk rows in, dense + BM25 sparse vectors out.

:class:`EmbedStage` is a plain callable class: it works on a columnar batch (``dict`` of
column name → array/list) in-process, and the Ray layer runs the very same class in
``map_batches`` with an actor pool (see :mod:`ragops.ingest.ray_pipeline`). Heavy state (the
model) loads lazily on the first batch, so constructing it on the driver costs nothing.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from ragops.config import EmbedderConfig, SparseConfig
from ragops.embeddings import TextEmbedder
from ragops.sparse import BM25Encoder

Batch = dict[str, Any]


class EmbedStage:
    """Adds ``vector`` (float32, ``(n, dim)``), ``sparse_indices`` and ``sparse_values``.

    Rows whose ``kind`` is not ``"chunk"`` (document events riding along the stream) get a
    zero vector and empty sparse lists, so the batch keeps one schema.

    Args:
        embedder: Embedder settings (model, batch size, device).
        sparse: BM25 settings; ``sparse.enabled=False`` leaves the sparse columns empty.
        torch_threads: Intra-op threads for torch; defaults to torch's own choice. Under Ray
            it is set from the actor's CPU reservation so actors do not oversubscribe cores.
        hold_file: TEST HOOK (``ingest.test_hold_file``): each batch waits while it exists.
    """

    def __init__(
        self,
        embedder: EmbedderConfig,
        sparse: SparseConfig,
        torch_threads: float | None = None,
        hold_file: Path | None = None,
    ) -> None:
        self.hold_file = hold_file
        self.embedder = TextEmbedder(embedder)
        self.sparse_cfg = sparse
        self.bm25 = BM25Encoder(sparse) if sparse.enabled else None
        self.torch_threads = torch_threads
        self._threads_set = False

    def _set_threads(self) -> None:
        if self._threads_set or not self.torch_threads:
            return
        import torch

        torch.set_num_threads(max(1, math.ceil(self.torch_threads)))
        self._threads_set = True

    def __call__(self, batch: Batch) -> Batch:
        """Embed the ``embed_text`` column of the chunk rows in ``batch``."""
        while self.hold_file is not None and self.hold_file.exists():  # TEST HOOK, see hold_file
            time.sleep(0.2)
        self._set_threads()
        kinds = list(batch.get("kind", ["chunk"] * len(batch["embed_text"])))
        texts = list(batch["embed_text"])
        chunk_rows = [i for i, k in enumerate(kinds) if k == "chunk"]
        dim = self.embedder.dim
        vectors = np.zeros((len(texts), dim), dtype=np.float32)
        indices: list[list[int]] = [[] for _ in texts]
        values: list[list[float]] = [[] for _ in texts]
        if chunk_rows:
            chunk_texts = [str(texts[i]) for i in chunk_rows]
            vectors[chunk_rows] = self.embedder.encode_passages(chunk_texts)
            if self.bm25 is not None:
                # BM25 sees the stored text (with its heading prefix), like the dense side.
                for i, sv in zip(chunk_rows, self.bm25.encode_documents(chunk_texts), strict=False):
                    indices[i] = list(sv.indices)
                    values[i] = list(sv.values)
        out = dict(batch)
        out["vector"] = vectors
        out["sparse_indices"] = indices
        out["sparse_values"] = values
        return out
