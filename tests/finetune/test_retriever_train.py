"""``ragops train embedder|reranker``: pairs, negatives, splits, training and the published model.

Real code paths throughout: the tiny sentence embedder, the sample corpus ingested into a
real Qdrant Edge index, sentence-transformers' trainers, the registry on disk.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ragops.errors import InputError
from ragops.finetune.retriever_pairs import (
    Chunk,
    Pair,
    check_no_leak,
    load_corpus,
    mine_negatives,
    read_doc_ids,
    read_pair_files,
    split_by_document,
)
from ragops.finetune.retriever_synth import bm25_filter, structural_query
from tests.finetune.conftest import write_jsonl


@pytest.fixture
def indexed(make_settings: Any, sample_docs: Path) -> Any:
    """Settings whose index holds the sample corpus; training runs in-process."""
    from ragops.ingest.pipeline import run_ingest

    settings = make_settings(
        "finetune.runner=local", "finetune.embedder.batch_size=4", "finetune.reranker.batch_size=4",
        "finetune.embedder.pairs.synthesize_generated=0", "finetune.reranker.pairs.synthesize_generated=0",
        "finetune.embedder.pairs.eval_distractors=50",
    )  # fmt: skip
    run_ingest(settings, [str(sample_docs)])
    return settings


def _pair_file(path: Path, corpus: list[Chunk], n: int = 24) -> Path:
    """Pairs whose query is a chunk's heading + its first words: learnable, from known documents."""
    rng = random.Random(0)
    rows = []
    for c in rng.sample(corpus, min(n, len(corpus))):
        words = c.body.split()[:8]
        rows.append({"query": " ".join(words), "positive": c.text, "doc_id": c.doc_id})
    return write_jsonl(path, rows)


# -- pairs --------------------------------------------------------------------------------


def test_pair_files_name_the_bad_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"query": "q", "positive": "p"}\n{"query": "q2"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:2: missing required field\(s\) 'positive'"):
        read_pair_files([str(bad)])
    bad.write_text('{"query": "q", "positive": "p", "negatives": "x"}\n')
    with pytest.raises(InputError, match="negatives"):
        read_pair_files([str(bad)])
    bad.write_text("{not json\n")
    with pytest.raises(InputError, match="p.jsonl:1: invalid JSON"):
        read_pair_files([str(bad)])
    with pytest.raises(InputError, match="not found"):
        read_pair_files([str(tmp_path / "missing.jsonl")])
    bad.write_text('{"query": "  ", "positive": "p"}\n')
    with pytest.raises(InputError, match=r"p.jsonl:1: \"query\" must be a non-empty string"):
        read_pair_files([str(bad)])
    ok = write_jsonl(tmp_path / "ok.jsonl", [{"query": " a ", "positive": "b", "doc_id": "d", "negative": "n"}])
    [p] = read_pair_files([str(ok)])
    assert (p.query, p.positive, p.doc_id, p.negatives, p.source) == ("a", "b", "d", ["n"], "file")


def test_split_holds_out_whole_documents_and_leaks_are_refused() -> None:
    pairs = [Pair(query=f"q{i}", positive=f"p{i}", doc_id=f"d{i % 7}") for i in range(70)]
    train, held = split_by_document(pairs, 0.3, seed=1)
    assert held and train and len(train) + len(held) == 70
    assert not {p.doc_id for p in train} & {p.doc_id for p in held}
    check_no_leak(train, held)
    with pytest.raises(InputError, match="leaks into training"):
        check_no_leak(train, held + [Pair(query="x", positive="y", doc_id=train[0].doc_id)])
    with pytest.raises(InputError, match="excluded documents"):
        check_no_leak(train, held, excluded={train[0].doc_id})


def test_structural_queries_come_from_headings_or_a_cut_sentence() -> None:
    body = ("MIG splits a GPU into instances. Each one has its own memory and compute, isolated from the rest. "
            "MPS instead shares one GPU between processes without isolation.")  # fmt: skip
    c = Chunk(chunk_id="c", doc_id="d", text=f"Guide > GPU sharing\n\n{body}", body=body, label="Guide > GPU sharing")
    seen = {structural_query(c, random.Random(s)) for s in range(60)}
    assert ("GPU sharing Guide", c.text) in seen
    cut = {q for q in seen if q and q[1] != c.text}
    # any sentence may be the query (inverse cloze), and it always leaves the positive
    assert {q.split()[0] for q, _ in cut} == {"MIG", "Each", "MPS"}
    assert all(q not in positive and positive.startswith("Guide > GPU sharing\n\n") for q, positive in cut)
    middle = next(p for q, p in cut if q.startswith("Each"))
    assert "instances. MPS instead" in middle  # the text around a cut sentence is joined, not lost
    assert structural_query(Chunk("c", "d", "x", "x", ""), random.Random(0)) is None


def test_negatives_come_from_other_documents_and_bm25_filters_synthetic_queries(indexed: Any) -> None:
    corpus = load_corpus(indexed)
    by_doc = {c.doc_id for c in corpus}
    assert len(by_doc) > 2
    c0 = corpus[0]
    pairs = [Pair(query=c0.body[:80], positive=c0.text, doc_id=c0.doc_id, chunk_id=c0.chunk_id)]
    stats = mine_negatives(indexed, pairs, corpus, k=3, mode="hybrid", skip=0, depth=20, seed=0)
    own_doc = {c.text for c in corpus if c.doc_id == c0.doc_id}
    assert len(pairs[0].negatives) == 3 and stats["mined"] + stats["random"] == 3
    assert not own_doc & set(pairs[0].negatives)
    # BM25 keeps a query made of its chunk's words and drops one that names nothing in it.
    good = Pair(query=" ".join(c0.body.split()[:12]), positive=c0.text, doc_id=c0.doc_id, chunk_id=c0.chunk_id)
    bad = Pair(query="zebra quantum marmalade", positive=c0.text, doc_id=c0.doc_id, chunk_id=c0.chunk_id)
    assert bm25_filter(indexed, [good, bad], k=5) == [good]


def test_exclude_docs_reads_qrels_or_plain_ids(tmp_path: Path) -> None:
    q = write_jsonl(tmp_path / "qrels.jsonl", [{"qid": "1", "doc_id": "a#x"}, {"qid": "2", "doc_id": "b"}])
    assert read_doc_ids(str(q)) == {"a#x", "b"}
    (tmp_path / "ids.txt").write_text("a\n\nb\n")
    assert read_doc_ids(str(tmp_path / "ids.txt")) == {"a", "b"}
    with pytest.raises(InputError, match="no document ids"):
        (tmp_path / "empty.txt").write_text("\n")
        read_doc_ids(str(tmp_path / "empty.txt"))


# -- training -----------------------------------------------------------------------------


def test_train_embedder_publishes_a_loadable_model_with_before_after_metrics(indexed: Any, tmp_path: Path, sample_docs: Path) -> None:
    from ragops.artifacts import Registry
    from ragops.embeddings import TextEmbedder
    from ragops.finetune.retriever_loops import HELDOUT_QRELS, HELDOUT_QUERIES
    from ragops.finetune.retriever_train import PairSources, train_retriever

    corpus = load_corpus(indexed)
    events: list[str] = []
    result = train_retriever(
        indexed, "embedder", PairSources(data=[str(_pair_file(tmp_path / "pairs.jsonl", corpus))], synthesize=30), max_steps=3,
        on_event=lambda stage, _info: events.append(stage),
    )  # fmt: skip
    assert {"mine", "data", "run", "publish"} <= set(events)
    art = result.artifact
    assert art.kind == "embedder" and art.format == "sentence-transformers" and art.task == "embedding"
    m = art.metrics
    for key in ("initial_eval_ndcg_at_10", "eval_ndcg_at_10", "eval_recall_at_10", "eval_mrr_at_10"):
        assert 0.0 <= m[key] <= 1.0, key
    assert m["global_step"] == 3
    assert result.data["pairs"]["file"] == 24 and result.data["pairs"]["synthetic"]["kept"] > 0
    reg = Registry.from_settings(indexed)
    folder = reg.local_dir("embedder-latest")
    held = [json.loads(x) for x in (folder / HELDOUT_QUERIES).read_text().splitlines()]
    assert len(held) == result.data["eval_examples"] > 0 and (folder / HELDOUT_QRELS).is_file()

    # The artifact is an embedder by name or alias; the collection would record its name.
    cfg = indexed.embedder.model_copy(update={"model": "embedder-latest"})
    emb = TextEmbedder(cfg)
    assert emb.identity == art.name
    vec = emb.encode_queries(["how do I share a GPU?"])
    assert vec.shape == (1, TextEmbedder(indexed.embedder).dim) and np.isfinite(vec).all()
    # ...and it changed: fine-tuning moved the weights.
    before = TextEmbedder(indexed.embedder).encode_queries(["how do I share a GPU?"])
    assert not np.allclose(vec, before, atol=1e-6)
    # Ingest and search with the alias as embedder.model: the collection records the artifact.
    from ragops.index import collection_stats
    from ragops.ingest.pipeline import run_ingest
    from ragops.retrieval.search import Retriever

    by_alias = indexed.model_copy(update={"embedder": cfg})
    run_ingest(by_alias, [str(sample_docs)], collection="tuned")
    assert collection_stats(by_alias, "tuned")["embedder"] == art.name
    with Retriever(by_alias, collection="tuned") as retriever:
        assert retriever.search("GPU sharing", k=2, mode="dense").hits
    # The same gate as adapters: a candidate without the metric's value is refused by name.
    reg.promote(art.name, "retriever-prod", require_metric="eval_ndcg_at_10")
    with pytest.raises(InputError, match="eval_pairwise_accuracy"):
        reg.promote(art.name, "retriever-prod", require_metric="eval_pairwise_accuracy")


def test_bad_input_trains_nothing(indexed: Any, tmp_path: Path) -> None:
    from ragops.artifacts import Registry
    from ragops.finetune.retriever_train import PairSources, train_retriever
    from ragops.runs import RunStore

    corpus = load_corpus(indexed)
    pairs = _pair_file(tmp_path / "pairs.jsonl", corpus)
    leaking = write_jsonl(tmp_path / "eval.jsonl", [json.loads(pairs.read_text().splitlines()[0])])
    with pytest.raises(InputError, match="leaks into training"):
        train_retriever(indexed, "embedder", PairSources(data=[str(pairs)], eval_data=[str(leaking)]), max_steps=1)
    with pytest.raises(InputError, match="no training pairs"):
        train_retriever(indexed, "embedder", PairSources(), max_steps=1)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"query": "only a query"}\n')
    with pytest.raises(InputError, match="broken.jsonl:1"):
        train_retriever(indexed, "reranker", PairSources(data=[str(broken)]), max_steps=1)
    with pytest.raises(InputError, match="does not exist"):
        train_retriever(indexed, "embedder", PairSources(data=[str(pairs)], collection="nope"), max_steps=1)
    assert Registry.from_settings(indexed).list() == [] and RunStore.from_settings(indexed).list() == []


def test_train_reranker_scores_with_the_published_cross_encoder(indexed: Any, tmp_path: Path) -> None:
    from ragops.finetune.retriever_train import PairSources, train_retriever
    from ragops.retrieval.rerank import Reranker

    corpus = load_corpus(indexed)
    result = train_retriever(indexed, "reranker", PairSources(data=[str(_pair_file(tmp_path / "pairs.jsonl", corpus))]), max_steps=2)
    art = result.artifact
    assert art.kind == "reranker" and art.task == "rerank" and art.base_model == str(indexed.embedder.model)
    assert 0 <= art.metrics["initial_eval_ndcg_at_10"] <= 1 and 0 <= art.metrics["eval_ndcg_at_10"] <= 1
    rr = Reranker(indexed.retrieval.rerank.model_copy(update={"model": "reranker-latest"}))
    rr.warm_up()
    assert rr.spec.artifact == art.name
    # A reranker is not an embedder, and an unknown name says where names may come from.
    from ragops.errors import ModelNotFoundError
    from ragops.model_registry import resolve_model

    with pytest.raises(ModelNotFoundError, match="is a reranker model, not a embedder"):
        resolve_model("reranker-latest", kind="embedder", registry=indexed.embedder._registry)
    with pytest.raises(ModelNotFoundError, match="published embedder/reranker artifact"):
        resolve_model("embedder-nope", kind="embedder", registry=indexed.embedder._registry)


def test_cli_trains_an_embedder_on_ray_train(indexed: Any, tmp_path: Path, ray_local: None, tiny_embedder: Path) -> None:
    """The command as users run it: Ray Train workers, --json summary, the help that explains it."""
    from typer.testing import CliRunner

    from tests.finetune.test_train import cli

    corpus = load_corpus(indexed)
    pairs = _pair_file(tmp_path / "pairs.jsonl", corpus)
    args = ["train", "embedder", "--data", str(pairs), "--synthesize", "10", "--max-steps", "2", "--json",
            "--data-dir", str(indexed.data_dir), "--set", f"embedder.model={tiny_embedder}",
            "--set", "ingest.chunker.chunk_tokens=64", "--set", "ingest.chunker.overlap_tokens=8",
            "--set", "finetune.runner=ray", "--set", "finetune.embedder.batch_size=4",
            "--set", "finetune.embedder.pairs.synthesize_generated=0"]  # fmt: skip
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["kind"] == "embedder" and summary["artifact"].startswith("embedder-")
    assert summary["metrics"]["world_size"] == 1 and "eval_ndcg_at_10" in summary["metrics"]
    from ragops.runs import RunStore

    assert RunStore.from_settings(indexed).get(summary["run_id"]).scaling["runner"] == "ray"
    help_text = CliRunner().invoke(cli(), ["train", "embedder", "--help"]).stdout
    for flag in ("--data", "--feedback", "--synthesize", "--eval-data", "--exclude-docs"):
        assert flag in help_text


def test_generated_queries_go_through_the_generator_and_the_bm25_filter(
    make_settings: Any, sample_docs: Path, tiny_llm_dir: Path
) -> None:
    """The generator path end to end on the tiny LM: whatever it writes is cleaned, counted, filtered."""
    from ragops.finetune.retriever_synth import _clean_question, synthesize
    from ragops.ingest.pipeline import run_ingest

    assert _clean_question("Question: What does MIG isolate?\n\nmore") == "What does MIG isolate?"
    assert _clean_question("ok") is None and _clean_question("\n\n") is None
    settings = make_settings(f"generator.model={tiny_llm_dir}", "generator.engine=transformers")
    run_ingest(settings, [str(sample_docs)])
    corpus = load_corpus(settings)
    seen: list[int] = []
    kept, stats = synthesize(settings, corpus, 6, generated_share=0.5, filter_k=20, seed=0, progress=seen.append)
    assert stats["sampled"] == 6 and seen == [3]  # three chunks went to the generator, as one batch
    assert stats["generated"] <= 3 and stats["structural"] <= 3
    assert stats["kept"] + stats["dropped_by_bm25"] == stats["generated"] + stats["structural"] == len(kept) + stats["dropped_by_bm25"]
    assert all(p.chunk_id in {c.chunk_id for c in corpus} for p in kept)
