"""``ragops train embedder|reranker``: pairs → Ray Train → a published retrieval model.

The driver gathers the pairs (files, feedback, synthesis; see
:mod:`ragops.finetune.retriever_pairs`), mines hard negatives from the current index, holds
out whole documents, builds the held-out evaluation (the held-out queries against their
documents' chunks plus sampled distractors), and hands everything to the shared
:func:`ragops.finetune.train._execute`: the same run records, resume, fault drills, Ray Train
workers, MLflow mirroring and registry publishing as SFT. The artifact (kind ``embedder`` or
``reranker``) is a whole sentence-transformers folder; ``embedder.model: embedder-latest``
(or its name) loads it, and ``ragops index reembed`` rebuilds the index with it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from ragops.config import Settings
from ragops.errors import InputError
from ragops.finetune.retriever_pairs import (
    Chunk,
    Pair,
    check_no_leak,
    data_hash,
    feedback_pairs,
    load_corpus,
    mine_negatives,
    read_doc_ids,
    read_pair_files,
    split_by_document,
)

RetrieverKind = Literal["embedder", "reranker"]
#: Smallest training set worth a run: below it, in-batch negatives and the held-out split are noise.
MIN_PAIRS = 4


def _base_model(settings: Settings, kind: RetrieverKind, base: str | None) -> str:
    section = getattr(settings.finetune, kind)
    if base or section.base_model:
        return str(base or section.base_model)
    if kind == "reranker" and settings.retrieval.rerank.model:
        return settings.retrieval.rerank.model
    return settings.embedder.model


@dataclass(frozen=True)
class PairSources:
    """Where the training pairs come from (the command's options).

    Attributes:
        data: Pair files (``{"query", "positive"}`` JSONL).
        feedback: Add the chat feedback's up-rated answers.
        synthesize: Chunks to write synthetic queries for (0: none).
        eval_data: Pair files to evaluate on instead of a held-out share of the documents.
        exclude_docs: A file of document ids never trained on (e.g. a benchmark's test qrels).
        collection: The collection to mine from (default ``vectorstore.collection``).
    """

    data: Sequence[str] = ()
    feedback: bool = False
    synthesize: int = 0
    eval_data: Sequence[str] = ()
    exclude_docs: str | None = None
    collection: str | None = None


def gather_pairs(
    settings: Settings,
    kind: RetrieverKind,
    sources: PairSources,
    emit: Callable[[str, dict[str, Any]], None] = lambda _s, _i: None,
) -> tuple[list[Pair], list[Pair], list[Chunk], dict[str, Any]]:
    """``(train pairs, held-out pairs, corpus, info)`` with negatives mined for both splits.

    Raises:
        InputError: no source given, bad pair files, too few pairs, or a leaking evaluation split.
    """
    from ragops.finetune.retriever_synth import synthesize as make_synthetic

    data, collection = sources.data, sources.collection
    if not (data or sources.feedback or sources.synthesize):
        raise InputError("no training pairs: give --data FILE, --feedback and/or --synthesize N")
    ps = getattr(settings.finetune, kind).pairs
    excluded = read_doc_ids(sources.exclude_docs) if sources.exclude_docs else set()
    corpus = load_corpus(settings, collection, exclude_docs=excluded)
    by_chunk = {c.chunk_id: c for c in corpus}
    pairs = read_pair_files(data) if data else []
    counts: dict[str, Any] = {"file": len(pairs)}
    if sources.feedback:
        fb = feedback_pairs(settings)
        for p in fb:  # the stored chunk carries the heading label the request log lacks
            if p.chunk_id in by_chunk:
                p.positive = by_chunk[p.chunk_id].text
        fb = [p for p in fb if p.doc_id not in excluded]
        counts["feedback"] = len(fb)
        pairs += fb
    if sources.synthesize:
        n_sampled = min(sources.synthesize, len(corpus))
        emit("synthesize", {"chunks": n_sampled})
        synthetic, stats = make_synthetic(
            settings, corpus, sources.synthesize, generated_share=ps.synthesize_generated, filter_k=ps.synthesize_filter_k,
            seed=ps.seed, collection=collection, progress=lambda n: emit("synthesize", {"chunks": n_sampled, "generated": n}),
        )  # fmt: skip
        counts["synthetic"] = stats
        pairs += synthetic
    if sources.eval_data:
        held = read_pair_files(sources.eval_data)
        train = pairs
    else:
        train, held = split_by_document(pairs, ps.eval_fraction, ps.seed)
    check_no_leak(train, held, excluded)
    if len(train) < MIN_PAIRS:
        raise InputError(f"only {len(train)} training pair(s) after filtering; at least {MIN_PAIRS} are needed")
    emit("mine", {"pairs": len(train) + len(held), "negatives": ps.hard_negatives})
    mined = mine_negatives(settings, train, corpus, k=ps.hard_negatives, mode=ps.mine_mode, skip=ps.mine_skip,
                           depth=ps.mine_depth, seed=ps.seed, collection=collection, exclude_docs=excluded)  # fmt: skip
    if kind == "reranker":  # judged on re-ranking each held-out positive among ten hard negatives
        mine_negatives(settings, held, corpus, k=max(ps.hard_negatives, 9), mode=ps.mine_mode, skip=ps.mine_skip,
                       depth=ps.mine_depth, seed=ps.seed + 1, collection=collection, exclude_docs=excluded)  # fmt: skip
    info = {"pairs": counts, "train_pairs": len(train), "eval_pairs": len(held), "negatives": mined,
            "excluded_docs": len(excluded), "corpus_chunks": len(corpus)}  # fmt: skip
    return train, held, corpus, info


def embedder_eval(held: Sequence[Pair], corpus: Sequence[Chunk], distractors: int, seed: int) -> dict[str, Any] | None:
    """Held-out queries against the chunks of their documents plus ``distractors`` sampled chunks.

    Relevance is by document (any chunk of the positive's document counts), as in ``ragops
    eval retrieval``; a positive that is not an indexed chunk is added to the corpus.
    """
    if not held:
        return None
    held_docs = {p.doc_id for p in held if p.doc_id}
    docs_chunks: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    others: list[Chunk] = []
    for c in corpus:
        if c.doc_id in held_docs:
            docs_chunks.setdefault(c.doc_id, []).append(c.chunk_id)
            texts[c.chunk_id] = c.text
        else:
            others.append(c)
    for c in random.Random(seed).sample(others, min(distractors, len(others))):
        texts[c.chunk_id] = c.text
    queries, relevant = {}, {}
    by_text = {t: cid for cid, t in texts.items()}
    for i, p in enumerate(held):
        qid = f"q{i}"
        queries[qid] = p.query
        rel = set(docs_chunks.get(p.doc_id, []))
        if p.positive not in by_text:
            cid = f"positive-{i}"
            texts[cid] = p.positive
            by_text[p.positive] = cid
        rel.add(p.chunk_id if p.chunk_id in texts else by_text[p.positive])
        relevant[qid] = sorted(rel)
    return {"queries": queries, "corpus": texts, "relevant": relevant}


def _examples(kind: RetrieverKind, train: Sequence[Pair], k: int) -> list[dict[str, Any]]:
    if kind == "embedder":
        return [{"anchor": p.query, "positive": p.positive, **{f"negative_{j + 1}": n for j, n in enumerate(p.negatives[:k])}}
                for p in train]  # fmt: skip
    rows: list[dict[str, Any]] = []
    for p in train:
        rows.append({"query": p.query, "passage": p.positive, "label": 1.0})
        rows.extend({"query": p.query, "passage": n, "label": 0.0} for n in p.negatives[:k])
    return rows


def train_retriever(
    settings: Settings,
    kind: RetrieverKind,
    sources: PairSources,
    *,
    base_model: str | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    tags: Mapping[str, str] | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    fault: Mapping[str, Any] | None = None,
) -> Any:
    """Fine-tune the embedder or a reranker on (query, passage) pairs and publish it.

    Args:
        settings: Full settings (``finetune.embedder`` / ``finetune.reranker``, the index, the generator).
        kind: ``embedder`` or ``reranker``.
        sources: Where the pairs come from.
        base_model, workers, use_gpu, max_steps, resume, tags, progress, on_event, fault: As
            for :func:`ragops.finetune.train.train`.

    Returns:
        The :class:`~ragops.finetune.train.TrainResult`.
    """
    from ragops.finetune.retriever_loops import embedder_train_loop, reranker_train_loop
    from ragops.finetune.train import _execute, _with_overrides, fault_from_env
    from ragops.model_registry import resolve_model

    emit = on_event or (lambda _stage, _info: None)
    fault = fault if fault is not None else fault_from_env()
    settings = _with_overrides(settings, kind, workers, use_gpu, max_steps)
    section = getattr(settings.finetune, kind)
    base_name = _base_model(settings, kind, base_model)
    spec = resolve_model(base_name, kind="embedder" if kind == "embedder" else None, registry=settings.embedder._registry)
    base_path = str(spec.locate())

    train, held, corpus, info = gather_pairs(settings, kind, sources, emit)
    k = section.pairs.hard_negatives
    digest = data_hash(train, held)
    data_info = {"files": list(sources.data) + list(sources.eval_data), "hash": digest, "records": len(train) + len(held),
                 "train_examples": len(train), "eval_examples": len(held), **info}  # fmt: skip
    emit("data", data_info)
    heldout = [p.to_dict() for p in held]
    if kind == "embedder":
        evaluation: Any = embedder_eval(held, corpus, section.pairs.eval_distractors, section.pairs.seed)
    else:
        evaluation = [{"query": p.query, "positive": [p.positive], "negative": p.negatives} for p in held] or None
    loop_config: dict[str, Any] = {
        "base": {"name": base_name, "path": base_path},
        "train": _examples(kind, train, k),
        "eval": evaluation,
        "heldout": heldout,
        kind: section.model_dump(mode="json"),
        "use_gpu": settings.finetune.use_gpu,
        "num_to_keep": settings.finetune.num_to_keep,
        "query_prompt": spec.query_instruction if kind == "embedder" else None,
    }
    from ragops.artifacts import Registry

    reg = Registry.from_settings(settings)
    parent = reg.get(base_name).name if reg.has(base_name) else None
    return _execute(
        settings, kind, base_name=base_name, data_info=data_info,
        loop=embedder_train_loop if kind == "embedder" else reranker_train_loop, loop_config=loop_config,
        run_config={kind: section.model_dump(mode="json")}, resume=resume, tags=tags, parent=parent,
        progress=progress, emit=emit, fault=fault, task="embedding" if kind == "embedder" else "rerank",
        resume_hint=f"ragops train {kind} ...", publish_config={"pairs": info["pairs"], "negatives": info["negatives"]},
    )  # fmt: skip
