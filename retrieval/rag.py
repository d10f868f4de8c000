"""Retrieval-augmented answering: retrieve → (rerank) → assemble context → read.

:class:`RAGPipeline` is the one composition of the retrieval and generation stages. The
CLI's ``ask`` and ``eval answers`` call it in-process; the Ray Serve deployments call the same
stages (retriever, reader) on their replicas, so nothing is implemented twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from ragops.retrieval.context import assemble_context
from ragops.retrieval.decoding import ResultStream
from ragops.retrieval.engines import generator_for
from ragops.retrieval.generator_base import GeneratorBase
from ragops.retrieval.prompts import Passage
from ragops.retrieval.extractive import ExtractiveReader, SentenceScorer, shared_embedder, shared_reranker
from ragops.retrieval.grounding import GroundedReader
from ragops.retrieval.readers import ReaderResult, check_reader_name, get_reader
from ragops.retrieval.search import Retriever, SearchFilters, SearchResult

from ragops.config import Settings
from ragops.errors import InputError
from ragops.sparse import BM25Encoder

def sentence_scorer(settings: Settings, embedder: Any = None) -> SentenceScorer:
    """The extractive scorer of ``settings``: the retrieval embedder (shared in this process, or
    ``embedder``), the retrieval cross-encoder when one is configured, the collection's BM25."""
    rerank = settings.retrieval.rerank
    cross = shared_reranker(rerank, settings.embedder.device) if rerank.model else None
    ext = settings.generator.extractive
    return SentenceScorer(embedder or shared_embedder(settings.embedder), cross_encoder=cross,
                          bm25=BM25Encoder(settings.ingest.sparse), dense_weight=ext.dense_weight,
                          min_words=ext.min_words)  # fmt: skip


#: The generative reader used when a model is chosen but the configured reader is extractive.
GENERATIVE_FALLBACK_READER = "stuff"


def reader_name(settings: Settings, reader: str | None, *, model_chosen: bool) -> str:
    """The reader to use: ``reader`` if given; else the config's, except that a chosen model
    (``--model``, a served adapter) with the extractive default reads with ``stuff``.

    The extractive reader never runs the generator, so asking for (or evaluating) a trained
    adapter through it would silently measure the same quotes for every model.
    """
    if reader:
        return reader
    configured = settings.generator.reader
    return GENERATIVE_FALLBACK_READER if model_chosen and configured == "extractive" else configured


def reader_for(settings: Settings, generator: Any, name: str | None = None, *, embedder: Any = None) -> GroundedReader:
    """The reader ``name`` (default: ``generator.reader`` from config) over ``generator``, checked.

    Every reader comes wrapped in the abstention and grounding checks of ``generator.grounding``
    (see :mod:`ragops.retrieval.grounding`). Shared by the CLI pipeline and the serving layer so
    both validate, size and check readers alike.

    Args:
        settings: The settings.
        generator: The generation backend (unused by the extractive reader).
        name: ``stuff``, ``fid`` or ``extractive``; None takes the config's.
        embedder: The sentence scorer's embedder (the retriever's, to load it once).

    Raises:
        InputError: an unknown reader name.
    """
    g = settings.generator
    name = name or g.reader
    check_reader_name(name)
    ext = ExtractiveReader(sentence_scorer(settings, embedder), max_sentences=g.extractive.max_sentences,
                           keep_ratio=g.extractive.keep_ratio)  # fmt: skip
    inner = ext if name == "extractive" else get_reader(name, generator, context_tokens=g.context_tokens)
    return GroundedReader(inner, ext, mode=g.grounding, min_support=g.min_support, abstain_below=g.abstain_below)


@dataclass
class Answer:
    """A cited answer with what it was built from.

    Attributes:
        answer: The generated text.
        citations: ``[{"n", "doc_id", "chunk_id", "source", "score"}]`` for each cited passage.
        timings: retrieve_s, generate_s, time_to_first_token_s, total_s, tokens_per_s.
        passages: The numbered passages the reader saw.
        reader: 'extractive', 'stuff' or 'fid'.
        usage: prompt/completion token counts.
        finish_reason: 'stop' or 'length'.
        grounding: The grounding check's report (``GroundingReport.to_dict()``), None when off.
        abstained: The documents do not cover the question (the answer says so).
        flagged_passages: Passages with instruction-like text that was neutralised.
        engine: The engine that decoded the answer (``transformers``, ``llamacpp``, ``vllm``;
            empty for the extractive reader, which decodes nothing).
    """

    question: str
    answer: str
    citations: list[dict[str, Any]]
    timings: dict[str, float]
    passages: list[Passage] = field(default_factory=list)
    reader: str = "stuff"
    usage: dict[str, int] = field(default_factory=dict)
    finish_reason: str = "stop"
    query_truncated: bool = False
    grounding: dict[str, Any] | None = None
    abstained: bool = False
    flagged_passages: list[dict[str, Any]] = field(default_factory=list)
    engine: str = ""

    @property
    def grounded(self) -> bool | None:
        """Whether the grounding check found the answer supported (None when it did not run)."""
        return None if self.grounding is None else bool(self.grounding["grounded"])

    def to_dict(self, *, with_passages: bool = False) -> dict[str, Any]:
        """``{"answer", "citations", "grounded", "grounding", ...}`` as ``ragops ask --json`` prints it."""
        d: dict[str, Any] = {
            "answer": self.answer,
            "citations": self.citations,
            "grounded": self.grounded,
            "abstained": self.abstained,
            "grounding": self.grounding,
            "flagged_passages": self.flagged_passages,
            "timings": self.timings,
            "reader": self.reader,
            "usage": self.usage,
            "finish_reason": self.finish_reason,
            "engine": self.engine,
        }
        if with_passages:
            d["passages"] = [passage_dict(p) for p in self.passages]
        return d


def passage_dict(p: Passage) -> dict[str, Any]:
    """JSON form of a passage (feedback records, --json output)."""
    return {"n": p.n, "doc_id": p.doc_id, "chunk_id": p.chunk_id, "source": p.source, "score": p.score, "text": p.text}


def citation_dicts(result: ReaderResult) -> list[dict[str, Any]]:
    """The reader's cited passages as citation records.

    Extractive answers add the exact span: ``start``/``end`` character offsets into the
    passage text and the ``quote`` itself (the first quoted span of that passage).
    """
    spans: dict[int, Any] = {}
    for q in result.quotes or []:
        spans.setdefault(q.n, q)
    out = []
    for p in result.cited_passages:
        rec: dict[str, Any] = {"n": p.n, "doc_id": p.doc_id, "chunk_id": p.chunk_id, "source": p.source, "score": p.score}
        if p.n in spans:
            q = spans[p.n]
            rec.update(start=q.start, end=q.end, quote=q.text)
        out.append(rec)
    return out


def flagged_dicts(passages: list[Passage]) -> list[dict[str, Any]]:
    """Passages whose instruction-like text or template tokens were neutralised."""
    return [{"n": p.n, "doc_id": p.doc_id, "chunk_id": p.chunk_id, "source": p.source, "flags": list(p.flags)}
            for p in passages if p.flags]  # fmt: skip


class AnswerStream(Iterator[str]):
    """Text deltas of an answer; :attr:`answer` is set once the stream is exhausted."""

    def __init__(
        self, question: str, search: SearchResult, stream: ResultStream[ReaderResult], started: float, engine: str = ""
    ) -> None:
        self.question = question
        self.engine = engine
        self.search = search
        self._stream = stream
        self._started = started
        self.answer: Answer | None = None

    def __iter__(self) -> "AnswerStream":
        return self

    def __next__(self) -> str:
        try:
            return next(self._stream)
        except StopIteration:
            if self.answer is None:
                self.answer = _to_answer(self.question, self.search, self._stream.result, self._started, self.engine)
            raise

    def close(self) -> None:
        """Stop generating (the consumer went away)."""
        close = getattr(self._stream, "close", None)
        if close:
            close()


def _to_answer(question: str, search: SearchResult, res: ReaderResult, started: float, engine: str) -> Answer:
    timings = {
        "retrieve_s": round(search.timings.get("total_s", 0.0), 4),
        "time_to_first_token_s": round(res.timings.time_to_first_token_s, 4),
        "generate_s": round(res.timings.total_s, 4),
        "tokens_per_s": round(res.timings.tokens_per_s, 2),
        "total_s": round(time.perf_counter() - started, 4),
    }
    return Answer(
        question=question,
        answer=res.answer,
        citations=citation_dicts(res),
        timings=timings,
        passages=list(res.passages),
        reader=res.reader,
        usage={"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens},
        finish_reason=res.finish_reason,
        query_truncated=search.query_truncated,
        grounding=res.grounding.to_dict() if res.grounding is not None else None,
        abstained=res.abstained,
        flagged_passages=flagged_dicts(list(res.passages)),
        engine=engine,
    )


class RAGPipeline:
    """Answers questions from a collection with citations.

    Args:
        settings: Full settings (retrieval, generator, embedder, vectorstore).
        collection: Collection name override.
        retriever: An existing retriever (tests, serving); built from settings otherwise.
        generator: An existing generator; built from settings otherwise.
    """

    def __init__(
        self,
        settings: Settings,
        collection: str | None = None,
        *,
        retriever: Retriever | None = None,
        generator: GeneratorBase | None = None,
    ) -> None:
        self.settings = settings
        self.retriever = retriever or Retriever(settings, collection=collection)
        self._own_generator = generator is None
        self.generator = generator or generator_for(settings)
        #: The transformers generator the FiD reader runs on when ``self.generator``'s engine
        #: cannot fuse (built on first use: ``--reader fid`` under ``engine: auto``).
        self._fused_generator: GeneratorBase | None = None

    def warm_up(self) -> None:
        """Load the retriever and the generator now instead of on the first question."""
        self.retriever.warm_up()
        self.generator.warm_up()

    def close(self) -> None:
        """Release the store and the generators this pipeline built."""
        self.retriever.close()
        if self._own_generator:
            self.generator.close()
        if self._fused_generator is not None:
            self._fused_generator.close()

    def __enter__(self) -> "RAGPipeline":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- stages --------------------------------------------------------------------------
    def retrieve(
        self,
        question: str,
        *,
        k: int | None = None,
        mode: str | None = None,
        filters: SearchFilters | dict[str, Any] | list[str] | None = None,
        count_tokens: Any = None,
    ) -> tuple[SearchResult, list[Passage]]:
        """Search and assemble the reader's numbered passages.

        ``count_tokens`` sizes the passages against ``generator.context_tokens``; None takes the
        generator's tokenizer (which loads the generator).
        """
        result = self.retriever.search(question, k=k or 5, mode=mode, filters=filters)
        passages = assemble_context(
            result.hits,
            store=self.retriever.store,
            settings=self.settings,
            count_tokens=count_tokens or self.generator.count_tokens,
        )
        return result, passages

    def _generator_for(self, reader: str) -> GeneratorBase:
        # `auto` picks the engine for the configured reader; a per-question `--reader fid` on an
        # engine that cannot fuse gets its own transformers generator rather than an error.
        # An engine set explicitly is kept, and the reader then says it needs transformers.
        if reader != "fid" or self.generator.supports_fused or self.settings.generator.engine != "auto":
            return self.generator
        if self._fused_generator is None:
            self._fused_generator = generator_for(self.settings, need_fused=True)
        return self._fused_generator

    def _reader(self, reader: str | None) -> Any:
        gen = self._generator_for(reader or self.settings.generator.reader)
        return reader_for(self.settings, gen, reader, embedder=self.retriever.encoder.embedder)

    # -- answering -----------------------------------------------------------------------
    def ask(self, question: str, *, k: int | None = None, mode: str | None = None, reader: str | None = None,
            filters: Any = None, **gen: Any) -> Answer:  # fmt: skip
        """Answer ``question`` (blocking). ``gen`` takes the generator's options."""
        stream = self.ask_stream(question, k=k, mode=mode, reader=reader, filters=filters, **gen)
        for _ in stream:
            pass
        assert stream.answer is not None
        return stream.answer

    def ask_stream(self, question: str, *, k: int | None = None, mode: str | None = None, reader: str | None = None,
                   filters: Any = None, **gen: Any) -> AnswerStream:  # fmt: skip
        """Answer ``question`` as a stream of text deltas (then ``.answer``)."""
        started = time.perf_counter()
        rd = self._reader(reader)  # validate before any work
        # The extractive reader runs no generator: size its passages with the embedder's
        # tokenizer (already loaded for the query) instead of loading the LM to count tokens.
        count = self.retriever.encoder.embedder.count_tokens if isinstance(rd.inner, ExtractiveReader) else None
        result, passages = self.retrieve(question, k=k, mode=mode, filters=filters, count_tokens=count)
        gen = {key: v for key, v in gen.items() if v is not None}
        engine = "" if isinstance(rd.inner, ExtractiveReader) else rd.inner.generator.engine
        return AnswerStream(question, result, rd.stream(question, passages, **gen), started, engine)
