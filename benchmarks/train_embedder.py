"""Fine-tune the embedder (and a reranker) for the Python-docs benchmark and score them on its test split.

Needs the benchmark (``build_pydocs_benchmark.py``) and its index (``retrieval_quality.py``,
collection ``pydocs`` under ``benchmarks/out/pydocs-index``). Then, in one run:

1. **Pairs** from the benchmark's ``train`` split only: each train query with one chunk of
   its relevant section (the section's chunk that the current hybrid search ranks best, else
   its first chunk). Pages that hold any ``test`` query are excluded from everything
   (``--exclude-docs``: no positive, negative or synthetic query comes from them), as the
   issue asks; ``dev`` pages may give synthetic queries.
2. ``ragops train embedder --data pairs.jsonl --synthesize N --exclude-docs ...`` — the CLI as
   a user runs it (Ray Train, one worker), publishing an ``embedder-...`` artifact.
3. The corpus ingested again into ``pydocs-ft`` with ``embedder.model=<artifact>``.
4. dense and hybrid nDCG@10 (and recall@10, MRR@10) on the ``test`` split for the packaged
   model (``pydocs``) and the fine-tuned one (``pydocs-ft``), in this run.
5. With ``--reranker``: ``ragops train reranker`` on the same pairs, then hybrid + rerank on a
   seeded sample of ``--rerank-queries`` test queries against plain hybrid on the same sample.

Usage::

    python benchmarks/train_embedder.py --synthesize 2000 --max-steps 300
    python benchmarks/train_embedder.py --skip-train embedder-20261207-1130-ab12   # score an artifact again
    python benchmarks/train_embedder.py --reranker --rerank-queries 400

Writes ``benchmarks/out/pydocs/embedder-results-<artifact>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BENCH = HERE / "out" / "pydocs"
DATA = HERE / "out" / "pydocs-index"


def _settings(data_dir: Path, collection: str, extra: list[str]) -> Any:
    from ragops.config import load_settings

    return load_settings([], [f"vectorstore.collection={collection}", "ingest.runner=local", *extra], data_dir=data_dir)


def build_pairs(settings: Any, bench: Path, out: Path) -> tuple[Path, Path, dict[str, int]]:
    """The train split's pairs and the excluded (test-page) document ids."""
    from ragops.finetune.retriever_pairs import load_corpus
    from ragops.retrieval.evaluate import read_jsonl
    from ragops.retrieval.search import Retriever

    corpus = load_corpus(settings)
    by_doc: dict[str, list[Any]] = {}
    for c in corpus:
        by_doc.setdefault(c.doc_id, []).append(c)
    test_pages = {r["doc_id"].split("#")[0] for r in read_jsonl(bench / "qrels.jsonl", ["qid", "doc_id"])}
    excluded = sorted(d for d in by_doc if d.split("#")[0] in test_pages)
    queries = {q["qid"]: q["query"] for q in read_jsonl(bench / "train_queries.jsonl", ["qid", "query"])}
    qrels = read_jsonl(bench / "train_qrels.jsonl", ["qid", "doc_id"])
    rows = []
    with Retriever(settings) as retriever:
        todo = [(queries[r["qid"]], r["doc_id"]) for r in qrels if r["qid"] in queries and r["doc_id"] in by_doc]
        for start in range(0, len(todo), 64):
            batch = todo[start : start + 64]
            results = retriever.search_batch([q for q, _ in batch], k=50, mode="hybrid")
            for (query, doc), res in zip(batch, results, strict=True):
                if doc.split("#")[0] in test_pages:
                    continue
                ranked = [h.chunk_id for h in res.hits if h.doc_id == doc]
                chunks = {c.chunk_id: c for c in by_doc[doc]}
                chunk = chunks[ranked[0]] if ranked and ranked[0] in chunks else sorted(by_doc[doc], key=lambda c: c.chunk_id)[0]
                rows.append({"query": query, "positive": chunk.text, "doc_id": doc})
    out.mkdir(parents=True, exist_ok=True)
    pairs, excl = out / "train-pairs.jsonl", out / "exclude-docs.txt"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    excl.write_text("".join(d + "\n" for d in excluded), encoding="utf-8")
    return pairs, excl, {"pairs": len(rows), "excluded_docs": len(excluded), "test_pages": len(test_pages)}


def _cli(args: list[str]) -> dict[str, Any]:
    env = {**os.environ}
    started = time.perf_counter()
    ragops = Path(sys.executable).with_name("ragops")  # the console script of this environment
    proc = subprocess.run([str(ragops), *args, "--json"], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"ragops {' '.join(args[:2])} failed ({proc.returncode})")
    out = json.loads(proc.stdout)
    out["wall_s"] = round(time.perf_counter() - started, 1)
    return out


def score(settings: Any, bench: Path, modes: tuple[str, ...], sample: int = 0, seed: int = 0,
          variants: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """The split's metrics per mode (no reranking), plus each named hybrid ``variant``.

    A variant is ``evaluate_retrieval`` keywords (``{"fusion": "dbsf"}``, ``{"rerank": True}``)
    run on the same queries with the same open retriever, so the models load once.
    """
    from ragops.retrieval.evaluate import evaluate_retrieval, read_jsonl
    from ragops.retrieval.search import Retriever

    queries, qrels = bench / "queries.jsonl", bench / "qrels.jsonl"
    if sample:
        rows = read_jsonl(queries, ["qid", "query"])
        keep = {r["qid"] for r in random.Random(seed).sample(rows, min(sample, len(rows)))}
        queries = bench / f"test-sample-{sample}-queries.jsonl"
        queries.write_text("".join(json.dumps(r) + "\n" for r in rows if r["qid"] in keep), encoding="utf-8")
    with Retriever(settings) as retriever:
        out = evaluate_retrieval(retriever, queries, qrels, k=10, modes=modes, latency_samples=0, rerank=False)
        for name, kwargs in (variants or {}).items():
            other = evaluate_retrieval(retriever, queries, qrels, k=10, modes=("hybrid",), latency_samples=0, **kwargs)
            out["modes"][name] = other["modes"]["hybrid"]
        return out


def embedder_stage(args: argparse.Namespace, base: Any, common: list[str], results: dict[str, Any]) -> tuple[Any, str]:
    """Train (or take) the embedder, ingest with it, score both collections; its settings and artifact."""
    from ragops.ingest.pipeline import run_ingest

    artifact = args.skip_train
    if not artifact:
        train_args = ["train", "embedder", *common, "--set", f"finetune.embedder.pairs.synthesize_generated={args.generated}",
                      "--set", f"finetune.embedder.batch_size={args.batch_size}", "--set", "finetune.cpus_per_worker=2"]  # fmt: skip
        if args.max_steps:
            train_args += ["--max-steps", str(args.max_steps)]
        trained = _cli(train_args)
        artifact = trained["artifact"]
        results["embedder_run"] = {k: trained[k] for k in ("artifact", "steps", "metrics", "data", "wall_s")}
        print(f"trained {artifact} in {trained['wall_s']} s", file=sys.stderr)
    ft = _settings(args.data_dir, args.ft_collection or f"{args.collection}-ft", [*args.set, f"embedder.model={artifact}"])
    if not args.skip_ingest:
        started = time.perf_counter()
        report = run_ingest(ft, [str(args.bench / "corpus")])
        results["ft_ingest"] = {"chunks": report.chunks, "wall_s": round(time.perf_counter() - started, 1)}
    dbsf = {"hybrid-dbsf": {"fusion": "dbsf"}}
    results["packaged"] = score(base, args.bench, ("dense", "hybrid"), variants=dbsf)
    results["finetuned"] = score(ft, args.bench, ("dense", "hybrid"), variants=dbsf)
    print("| model | mode | recall@10 | MRR@10 | nDCG@10 |\n|---|---|---:|---:|---:|")
    for name in ("packaged", "finetuned"):
        for mode, row in results[name]["modes"].items():
            print(f"| {name} | {mode} | {row['recall@10']:.3f} | {row['mrr@10']:.3f} | {row['ndcg@10']:.3f} |")
    for mode in ("dense", "hybrid", "hybrid-dbsf"):
        delta = results["finetuned"]["modes"][mode]["ndcg@10"] - results["packaged"]["modes"][mode]["ndcg@10"]
        print(f"{mode} nDCG@10 change: {delta:+.3f}")
    return ft, artifact


def reranker_stage(args: argparse.Namespace, first: Any, common: list[str], results: dict[str, Any]) -> str:
    """Train the cross-encoder and score hybrid with and without it over ``first``; its artifact."""
    rr_args = ["train", "reranker", *common, "--set", f"finetune.reranker.pairs.synthesize_generated={args.generated}",
               "--set", "finetune.cpus_per_worker=2"]  # fmt: skip
    if args.reranker_steps:
        rr_args += ["--max-steps", str(args.reranker_steps)]
    rr = _cli(rr_args)
    results["reranker_run"] = {k: rr[k] for k in ("artifact", "steps", "metrics", "data", "wall_s")}
    reranked = first.model_copy(update={"retrieval": first.retrieval.model_copy(
        update={"rerank": first.retrieval.rerank.model_copy(update={"model": rr["artifact"]})})})  # fmt: skip
    sample = score(reranked, args.bench, ("hybrid",), sample=args.rerank_queries, variants={"hybrid+rerank": {"rerank": True}})
    results["rerank_sample"] = {"collection": first.vectorstore.collection, **sample["modes"]}
    for name, row in sample["modes"].items():
        print(f"| {name} ({args.rerank_queries} queries) | {row['recall@10']:.3f} | {row['mrr@10']:.3f} | {row['ndcg@10']:.3f} |")
    return rr["artifact"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bench", type=Path, default=BENCH)
    ap.add_argument("--data-dir", type=Path, default=DATA)
    ap.add_argument("--collection", default="pydocs")
    ap.add_argument("--synthesize", type=int, default=2000, help="chunks to write synthetic queries for")
    ap.add_argument("--generated", type=float, default=0.3, help="share of synthetic queries written by the generator")
    ap.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--skip-train", metavar="ARTIFACT", help="score this embedder artifact instead of training one")
    ap.add_argument("--skip-ingest", action="store_true", help="the fine-tuned collection is already built")
    ap.add_argument("--ft-collection", help="collection for the fine-tuned embedder (default: <collection>-ft)")
    ap.add_argument("--reranker", action="store_true", help="also train and score a cross-encoder")
    ap.add_argument("--reranker-only", action="store_true",
                    help="train and score only the cross-encoder, over the packaged embedder's collection (no embedder run)")
    ap.add_argument("--reranker-steps", type=int, default=None)
    ap.add_argument("--rerank-queries", type=int, default=400)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    base = _settings(args.data_dir, args.collection, args.set)
    if not (args.bench / "qrels.jsonl").is_file():
        raise SystemExit(f"no benchmark at {args.bench}: run benchmarks/build_pydocs_benchmark.py first")
    results: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "args": vars(args) | {"bench": str(args.bench), "data_dir": str(args.data_dir)}}
    work = args.bench / "embedder-train"
    pairs, excl, results["pairs"] = build_pairs(base, args.bench, work)
    print(f"pairs: {results['pairs']}", file=sys.stderr)
    common = ["--data-dir", str(args.data_dir), "--set", f"vectorstore.collection={args.collection}", "--data", str(pairs),
              "--exclude-docs", str(excl), "--synthesize", str(args.synthesize)]  # fmt: skip
    for s in args.set:
        common += ["--set", s]
    artifact = "packaged"
    first = base  # the first stage the reranker is scored over: the better hybrid
    if not args.reranker_only:
        ft, artifact = embedder_stage(args, base, common, results)
        if results["finetuned"]["modes"]["hybrid"]["ndcg@10"] >= results["packaged"]["modes"]["hybrid"]["ndcg@10"]:
            first = ft
    if args.reranker or args.reranker_only:
        reranker = reranker_stage(args, first, common, results)
        if args.reranker_only:
            artifact = reranker
    out = args.bench / f"embedder-results-{artifact}.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
