"""Query side of the DPR-style bi-encoder: a dense query vector plus a BM25 query vector.

The passage side (ingest) embeds chunks with ``embedder.model``; queries are embedded here
with the same model and the model's query instruction (BGE: "Represent this sentence for
searching relevant passages: "), or with ``embedder.query_model`` when a separate query tower
is configured (two-tower DPR). The BM25 side needs no model: a query term weighs 1.0 and
Qdrant supplies the IDF (see :mod:`ragops.sparse`).

An over-long query is not an error: the tokenizer truncates it to the model's limit (as
sentence-transformers always does), :class:`EncodedQuery` says so and a warning is logged.
The BM25 side always sees the whole query.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ragops.config import EmbedderConfig, SparseConfig
from ragops.embeddings import TextEmbedder
from ragops.errors import InputError
from ragops.sparse import BM25Encoder
from ragops.vectorstore.base import SparseVector

log = logging.getLogger(__name__)


@dataclass
class EncodedQuery:
    """One query, encoded for every search mode.

    Attributes:
        dense: The query embedding, float32 ``(dim,)``; None when dense encoding was skipped
            (``with_dense=False``, e.g. for a sparse-only search).
        sparse: BM25 query vector (1.0 per distinct analysed term; empty for a query made
            only of stop words).
        truncated: The query (with its instruction) was longer than the dense model's token
            limit and was cut to it.
        tokens: Tokens the dense model would read without truncation (special tokens and
            instruction included); 0 when dense encoding was skipped.
        collection: The physical collection these vectors were made for (set by the serving
            query embedder, which follows collection aliases; None: the configured one).
    """

    dense: np.ndarray | None
    sparse: SparseVector
    truncated: bool = False
    tokens: int = 0
    collection: str | None = None


def _check_queries(queries: Sequence[str]) -> list[str]:
    out = []
    for i, q in enumerate(queries):
        if not isinstance(q, str):
            raise InputError(f"query {i + 1} must be a string, got {type(q).__name__}")
        if not q.strip():
            raise InputError("empty query" if len(queries) == 1 else f"empty query (query {i + 1} of {len(queries)})")
        out.append(q.strip())
    return out


class QueryEncoder:
    """Encodes queries into the dense vector and the BM25 vector a hybrid search needs.

    Construction is free; the dense model loads on first use or :meth:`warm_up`.

    Args:
        cfg: Embedder settings. ``cfg.query_model`` (when set) is the query tower;
            otherwise ``cfg.model`` encodes queries with its query instruction.
        sparse: BM25 settings (only the language matters for query vectors).

    Example:
        >>> enc = QueryEncoder(settings.embedder, settings.ingest.sparse)  # doctest: +SKIP
        >>> q = enc.encode("how do I request a GPU?")  # doctest: +SKIP
        >>> q.dense.shape, len(q.sparse.indices)  # doctest: +SKIP
        ((384,), 2)
    """

    def __init__(self, cfg: EmbedderConfig, sparse: SparseConfig | None = None) -> None:
        self.cfg = cfg
        self.embedder = TextEmbedder(cfg, model=cfg.query_model or cfg.model)
        self.bm25 = BM25Encoder(sparse)

    @property
    def model_name(self) -> str:
        """The model that encodes queries (``query_model`` or ``model``)."""
        return self.embedder.model_name

    @property
    def dim(self) -> int:
        """Dense query vector size (loads the model)."""
        return self.embedder.dim

    @property
    def max_tokens(self) -> int:
        """The dense model's token limit (loads the model)."""
        return self.embedder.max_tokens

    def warm_up(self) -> None:
        """Load the dense query model now rather than on the first query."""
        self.embedder.warm_up()

    def encode(self, query: str, *, with_dense: bool = True) -> EncodedQuery:
        """Encode one query.

        Args:
            query: The user's query.
            with_dense: Compute the dense vector (skip it for sparse-only search).

        Raises:
            InputError: the query is empty or whitespace.
        """
        return self.encode_batch([query], with_dense=with_dense)[0]

    def encode_batch(self, queries: Sequence[str], *, with_dense: bool = True) -> list[EncodedQuery]:
        """Encode several queries with one batched forward pass.

        Args:
            queries: The queries.
            with_dense: Compute dense vectors (skip them for sparse-only search).

        Returns:
            One :class:`EncodedQuery` per query, in order.

        Raises:
            InputError: a query is empty or whitespace (the message says which).
        """
        texts = _check_queries(list(queries))
        if not texts:
            return []
        sparse = self.bm25.encode_queries(texts)
        if not with_dense:
            return [EncodedQuery(dense=None, sparse=s) for s in sparse]
        lengths = self._token_lengths(texts)
        limit = self.embedder.max_tokens
        for text, n in zip(texts, lengths):
            if n > limit:
                # Not an error: the tail of a pasted document rarely changes what is relevant,
                # and refusing a chat turn over it would be worse than a slightly blunter query.
                log.warning(
                    "query has %d tokens, more than the query encoder's limit of %d; it was truncated: %.80r",
                    n,
                    limit,
                    text,
                )
        dense = self.embedder.encode_queries(texts)
        return [
            EncodedQuery(dense=dense[i], sparse=sparse[i], truncated=lengths[i] > limit, tokens=lengths[i])
            for i in range(len(texts))
        ]

    def _token_lengths(self, texts: list[str]) -> list[int]:
        """Token counts as the model sees the input: instruction and special tokens included."""
        prefix = self.embedder.query_instruction
        tokenizer: Any = self.embedder.tokenizer
        # verbose=False: over-long inputs are exactly what is being measured here.
        enc = tokenizer([prefix + t for t in texts], add_special_tokens=True, truncation=False, verbose=False)
        return [len(ids) for ids in enc["input_ids"]]
