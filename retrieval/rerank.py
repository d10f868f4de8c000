"""Optional cross-encoder reranking of retrieved chunks.

A bi-encoder scores query and passage independently; a cross-encoder reads them together and
ranks far better, at the cost of one forward pass per (query, passage) pair. So the retriever
fetches ``rerank.candidates`` hits cheaply and the cross-encoder orders them, keeping ``k``.

The model is a sentence-transformers ``CrossEncoder`` loaded from a local path, or a registry
name (``bge-reranker-base``) resolved by :func:`ragops.model_registry.resolve_model`; a hub
model that is not cached fails with the registry's message on how to point at a local copy.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ragops.config import RerankConfig
from ragops.errors import ModelNotFoundError
from ragops.model_registry import ModelSpec, resolve_model

if TYPE_CHECKING:
    from ragops.retrieval.search import SearchHit


def pair_text(hit: SearchHit) -> str:
    """The passage side of a cross-encoder pair: heading context, blank line, chunk text.

    The chunk's title and heading path are what the dense embedder saw in front of the text
    at ingest (see :func:`ragops.ingest.chunkers.heading_label`); the cross-encoder gets the
    same context, since a chunk often does not repeat the subject its heading names.
    """
    parts = [p for p in (hit.heading_path or []) if p]
    if hit.title and (not parts or parts[0] != hit.title):
        parts.insert(0, hit.title)
    label = " > ".join(parts)
    return f"{label}\n\n{hit.text}" if label else hit.text


class Reranker:
    """Re-scores hits with a cross-encoder; the model loads lazily.

    Args:
        cfg: Rerank settings; ``cfg.model`` must be set.
        device: Torch device for the cross-encoder (``'cpu'``, ``'cuda'``, ``'auto'``).

    Raises:
        ValueError: ``cfg.model`` is None (reranking is disabled).
        ModelNotFoundError: the name does not resolve (raised on construction) or the model
            cannot be loaded (raised on first use).
    """

    def __init__(self, cfg: RerankConfig, device: str = "cpu") -> None:
        if not cfg.model:
            raise ValueError("Reranker needs retrieval.rerank.model to be set")
        self.cfg = cfg
        self.device = device
        self.spec: ModelSpec = resolve_model(cfg.model, kind="reranker", registry=cfg._registry)
        self._model: Any = None
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        """Load the cross-encoder (idempotent, thread-safe)."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is not None:
                return
            from sentence_transformers import CrossEncoder

            from ragops.embeddings import resolve_device

            path = self.spec.locate()
            try:
                model = CrossEncoder(str(path), device=resolve_device(self.device), local_files_only=True)
            except Exception as exc:  # noqa: BLE001 - surface as a model error naming the path
                raise ModelNotFoundError(f"could not load reranker '{self.cfg.model}' from {path}: {exc}") from exc
            self._model = model

    @property
    def model(self) -> Any:
        """The loaded ``CrossEncoder``."""
        self.warm_up()
        return self._model

    def score(self, query: str, hits: Sequence[SearchHit]) -> list[float]:
        """Cross-encoder scores of ``(query, hit)`` pairs, in the order of ``hits``."""
        return self.score_pairs([(query, pair_text(h)) for h in hits])

    def score_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        """Cross-encoder scores of raw ``(query, passage)`` pairs (higher is more relevant)."""
        if not pairs:
            return []
        scores = self.model.predict(
            list(pairs), batch_size=self.cfg.batch_size, show_progress_bar=False, convert_to_numpy=True
        )
        return [float(s) for s in scores.reshape(len(pairs), -1)[:, 0]]

    def rerank(self, query: str, hits: Sequence[SearchHit], top_k: int | None = None) -> list[SearchHit]:
        """Order ``hits`` by cross-encoder score and keep the best ``top_k``.

        Args:
            query: The query the hits were retrieved for.
            hits: Retrieved hits (any order).
            top_k: How many to keep; None keeps all.

        Returns:
            New hits with ``score`` set to the cross-encoder score, ``retrieval_score`` to the
            score they were retrieved with, and ranks ``1..n``. Equal scores keep the
            retrieval order.
        """
        return self.rerank_batch([query], [hits], top_k)[0]

    def rerank_batch(
        self, queries: Sequence[str], hits: Sequence[Sequence[SearchHit]], top_k: int | None = None
    ) -> list[list[SearchHit]]:
        """:meth:`rerank` for several queries with one batched ``predict`` over all pairs."""
        if len(queries) != len(hits):
            raise ValueError(f"got {len(queries)} queries but {len(hits)} hit lists")
        pairs = [(q, pair_text(h)) for q, hs in zip(queries, hits) for h in hs]
        scores = self.score_pairs(pairs)
        out: list[list[SearchHit]] = []
        pos = 0
        for hs in hits:
            mine = scores[pos : pos + len(hs)]
            pos += len(hs)
            # sorted() is stable: ties keep the retrieval order.
            order = sorted(range(len(hs)), key=lambda i: -mine[i])
            if top_k is not None:
                order = order[:top_k]
            out.append(
                [
                    dataclasses.replace(
                        hs[i],
                        rank=rank,
                        score=mine[i],
                        retrieval_score=hs[i].retrieval_score if hs[i].retrieval_score is not None else hs[i].score,
                    )
                    for rank, i in enumerate(order, start=1)
                ]
            )
        return out
