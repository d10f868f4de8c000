"""Retrieval quality on the Python documentation: dense vs BM25 vs hybrid, and reranking.

Ingests the corpus built by ``benchmarks/build_pydocs_benchmark.py`` with ragops
(:func:`ragops.ingest.pipeline.run_ingest`, incremental: a second run re-embeds nothing),
then scores every search mode with :func:`ragops.retrieval.evaluate.evaluate_retrieval` at
``k=10`` on one split of the benchmark's queries:

* ``dense`` (MiniLM bi-encoder), ``sparse`` (BM25), ``hybrid`` with RRF and with DBSF
  fusion (both fused inside Qdrant), over all the split's queries;
* ``hybrid`` + cross-encoder reranking of the top ``retrieval.rerank.candidates`` chunks,
  when ``--rerank-model`` is given, on a seeded sample of ``--rerank-queries`` queries
  (reranking costs one cross-encoder pass per candidate); plain hybrid is scored again on
  the same sample so the two rows compare like with like.

Prints a markdown table and writes the raw numbers to ``<bench>/results-<split>.json``.

Usage::

    python benchmarks/build_pydocs_benchmark.py            # once: corpus + queries
    python benchmarks/retrieval_quality.py                 # ingest + dense/sparse/hybrid
    python benchmarks/train_reranker.py                    # optional: a cross-encoder
    python benchmarks/retrieval_quality.py --rerank-model benchmarks/out/reranker-minilm
    python benchmarks/retrieval_quality.py --split dev --set retrieval.prefetch=100
    python benchmarks/retrieval_quality.py --split dev --skip-ingest --sweep   # fusion settings
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ragops.ingest.pipeline import run_ingest
from ragops.retrieval.encoder import EncodedQuery, QueryEncoder
from ragops.retrieval.evaluate import evaluate_retrieval, read_jsonl
from ragops.retrieval.search import Retriever

from ragops.config import Settings, load_settings

HERE = Path(__file__).resolve().parent
DEFAULT_BENCH = HERE / "out" / "pydocs"
DEFAULT_DATA = HERE / "out" / "pydocs-index"
SPLIT_PREFIX = {"test": "", "dev": "dev_", "train": "train_"}
COLUMNS = ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")


def machine() -> str:
    """CPU model and count, for the results file."""
    model = platform.processor() or "unknown CPU"
    try:
        out = subprocess.run(
            ["lscpu"], capture_output=True, text=True, check=False
        ).stdout
        model = next(
            (
                ln.split(":", 1)[1].strip()
                for ln in out.splitlines()
                if ln.startswith("Model name")
            ),
            model,
        )
    except FileNotFoundError:
        pass
    return f"{os.cpu_count()} CPUs ({model}), Python {platform.python_version()}"


def settings_for(args: argparse.Namespace, extra: list[str] = ()) -> Settings:  # type: ignore[assignment]
    return load_settings(
        overrides=[
            f"data_dir={args.data_dir}",
            f"vectorstore.collection={args.collection}",
            f"ingest.runner={args.runner}",
            *args.set,
            *extra,
        ]
    )


def ingest(settings: Settings, corpus: Path) -> dict[str, Any]:
    """Run (or top up) the ingest; returns the report's counts."""
    last = [0.0]

    def progress(p: dict[str, Any]) -> None:
        if p["elapsed"] - last[0] >= 30:
            last[0] = p["elapsed"]
            print(
                f"  ingest: {p['files_done']}/{p['files']} files, {p['chunks']} chunks, {p['elapsed']:.0f}s",
                flush=True,
            )

    t0 = time.perf_counter()
    report = run_ingest(settings, [str(corpus)], progress=progress)
    d = report.to_dict()
    d["wall_s"] = round(time.perf_counter() - t0, 1)
    if not report.ok:
        print(
            f"warning: {d['failed_count']} document(s) failed to ingest: {d['failed'][:3]}",
            file=sys.stderr,
        )
    return d


def sample_split(
    bench: Path, split: str, n: int, seed: int, dest: Path
) -> tuple[Path, Path]:
    """Write a seeded sample of ``n`` queries of a split (and their qrels) under ``dest``."""
    pre = SPLIT_PREFIX[split]
    queries = read_jsonl(bench / f"{pre}queries.jsonl", ["qid", "query"])
    qrels = read_jsonl(bench / f"{pre}qrels.jsonl", ["qid", "doc_id"])
    if n < len(queries):
        queries = random.Random(seed).sample(queries, n)
    keep = {q["qid"] for q in queries}
    qp, rp = (
        dest / f"{split}-sample-queries.jsonl",
        dest / f"{split}-sample-qrels.jsonl",
    )
    qp.write_text("".join(json.dumps(q) + "\n" for q in queries), encoding="utf-8")
    rp.write_text(
        "".join(json.dumps(r) + "\n" for r in qrels if r["qid"] in keep),
        encoding="utf-8",
    )
    return qp, rp


def evaluate(
    settings: Settings,
    queries: Path,
    qrels: Path,
    runs: list[tuple[str, str, str]],
    latency_samples: int = 100,
) -> dict[str, dict]:
    """Score ``(label, mode, fusion)`` runs with one retriever (reranking when configured)."""
    out: dict[str, dict] = {}
    with Retriever(settings) as retriever:
        for label, mode, fusion in runs:
            t0 = time.perf_counter()
            res = evaluate_retrieval(
                retriever,
                queries,
                qrels,
                k=10,
                modes=(mode,),
                fusion=fusion,
                latency_samples=latency_samples,
            )
            metrics = dict(res["modes"][mode])
            metrics["eval_s"] = round(time.perf_counter() - t0, 1)
            out[label] = metrics
            print(f"  {label}: recall@10={metrics['recall@10']:.4f} ndcg@10={metrics['ndcg@10']:.4f} "
                  f"({metrics['queries']} queries, {metrics['eval_s']}s)", flush=True)  # fmt: skip
    return out


class CachingEncoder(QueryEncoder):
    """A query encoder that encodes each text once (the sweep searches the same queries many times)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self._memo: dict[tuple[str, bool], EncodedQuery] = {}

    def encode_batch(
        self, queries: Sequence[str], *, with_dense: bool = True
    ) -> list[EncodedQuery]:
        todo = [q for q in dict.fromkeys(queries) if (q, with_dense) not in self._memo]
        if todo:
            for q, e in zip(todo, super().encode_batch(todo, with_dense=with_dense)):
                self._memo[(q, with_dense)] = e
        return [self._memo[(q, with_dense)] for q in queries]


def sweep(args: argparse.Namespace, queries: Path, qrels: Path) -> dict[str, dict]:
    """Hybrid fusion settings: RRF's k and the per-branch prefetch, and DBSF.

    ragops has no setting for RRF's k (both backends use ``RRF_K`` = 2, the engine's
    default), so this experiment patches the constant the Edge backend reads. Run it on the
    dev split: choosing settings on the test split would tune on the evaluation queries.
    """
    from ragops.vectorstore import edge

    base = settings_for(args)
    encoder = CachingEncoder(base.embedder, base.ingest.sparse)
    out: dict[str, dict] = {}
    original = edge.RRF_K
    try:
        for fusion, rrf_k in [("rrf", 2), ("rrf", 10), ("rrf", 60), ("dbsf", None)]:
            for prefetch in (20, 50, 100):
                edge.RRF_K = rrf_k if rrf_k is not None else original
                settings = settings_for(args, [f"retrieval.prefetch={prefetch}"])
                with Retriever(settings, encoder=encoder) as retriever:
                    res = evaluate_retrieval(
                        retriever,
                        queries,
                        qrels,
                        k=10,
                        modes=("hybrid",),
                        fusion=fusion,
                        latency_samples=0,
                    )
                label = (
                    f"hybrid {fusion}"
                    + (f" k={rrf_k}" if rrf_k is not None else "")
                    + f" prefetch={prefetch}"
                )
                out[label] = res["modes"]["hybrid"]
                print(
                    f"  {label}: recall@10={out[label]['recall@10']:.4f} ndcg@10={out[label]['ndcg@10']:.4f}",
                    flush=True,
                )
    finally:
        edge.RRF_K = original
    return out


def paired(
    args: argparse.Namespace, queries: Path, qrels: Path, seed: int = 0
) -> dict[str, dict]:
    """Per-query comparison of hybrid (RRF) with each single branch on the same queries.

    For recall@10 and nDCG@10: the mean difference with a 95% paired-bootstrap interval
    (1,000 resamples of the queries), and how many queries each side wins.
    """
    import numpy as np
    from ragops.retrieval.evaluate import read_qrels, read_queries
    from ragops.retrieval.metrics import dedupe_doc_ranking, ndcg_at_k, recall_at_k

    texts = read_queries(queries)
    judged = {q: d for q, d in read_qrels(qrels).items() if d and q in texts}
    qids = sorted(judged)
    settings = settings_for(args)
    encoder = CachingEncoder(settings.embedder, settings.ingest.sparse)
    per: dict[str, dict[str, np.ndarray]] = {}
    with Retriever(settings, encoder=encoder) as retriever:
        for mode in ("dense", "sparse", "hybrid"):
            rec, ndcg = [], []
            for start in range(0, len(qids), 64):
                ids = qids[start : start + 64]
                found = retriever.search_batch(
                    [texts[q] for q in ids], k=30, mode=mode, fusion="rrf"
                )
                for q, res in zip(ids, found):
                    ranking = dedupe_doc_ranking(h.doc_id for h in res.hits)
                    rec.append(recall_at_k(ranking, judged[q], 10))
                    ndcg.append(ndcg_at_k(ranking, judged[q], 10))
            per[mode] = {"recall@10": np.array(rec), "ndcg@10": np.array(ndcg)}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(qids), size=(1000, len(qids)))
    out: dict[str, dict] = {}
    for other in ("sparse", "dense"):
        for metric in ("recall@10", "ndcg@10"):
            diff = per["hybrid"][metric] - per[other][metric]
            boot = diff[idx].mean(axis=1)
            out[f"hybrid - {other}: {metric}"] = {
                "mean_diff": round(float(diff.mean()), 4),
                "ci95": [
                    round(float(np.percentile(boot, 2.5)), 4),
                    round(float(np.percentile(boot, 97.5)), 4),
                ],
                "hybrid_better": int((diff > 1e-12).sum()),
                "other_better": int((diff < -1e-12).sum()),
                "queries": len(qids),
            }
    return out


def table(rows: dict[str, dict]) -> str:
    head = "| mode | queries | recall@1 | recall@5 | recall@10 | MRR@10 | nDCG@10 | p50 latency (ms) |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, m in rows.items():
        cells = " | ".join(f"{m[c]:.3f}" for c in COLUMNS)
        lines.append(
            f"| {label} | {m['queries']} | {cells} | {m['latency_p50_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--bench",
        type=Path,
        default=DEFAULT_BENCH,
        help="output folder of build_pydocs_benchmark.py",
    )
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="ragops data dir for the index",
    )
    ap.add_argument("--collection", default="pydocs")
    ap.add_argument(
        "--runner",
        choices=("local", "ray"),
        default="local",
        help="ingest runner (local was faster on 2 CPUs)",
    )
    ap.add_argument(
        "--split",
        choices=tuple(SPLIT_PREFIX),
        default="test",
        help="query split to score",
    )
    ap.add_argument(
        "--skip-ingest", action="store_true", help="search the existing index as it is"
    )
    ap.add_argument(
        "--sweep",
        action="store_true",
        help="only score hybrid fusion settings (RRF k, prefetch, DBSF) on the split; use --split dev",
    )
    ap.add_argument(
        "--no-paired",
        action="store_true",
        help="skip the per-query hybrid-vs-branch comparison",
    )
    ap.add_argument(
        "--no-fusion-variants", action="store_true", help="score hybrid with RRF only"
    )
    ap.add_argument(
        "--rerank-model",
        help="CrossEncoder folder (e.g. from train_reranker.py); adds hybrid+rerank",
    )
    ap.add_argument(
        "--rerank-candidates",
        type=int,
        default=30,
        help="chunks the cross-encoder re-orders",
    )
    ap.add_argument(
        "--rerank-queries",
        type=int,
        default=500,
        help="seeded sample of the split to rerank (0: all)",
    )
    ap.add_argument(
        "--latency-samples",
        type=int,
        default=100,
        help="queries timed one at a time per mode",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra ragops settings",
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    bench: Path = args.bench
    pre = SPLIT_PREFIX[args.split]
    queries, qrels = bench / f"{pre}queries.jsonl", bench / f"{pre}qrels.jsonl"
    if not (bench / "corpus").is_dir() or not queries.is_file():
        print(
            f"error: {bench} has no corpus/ or {queries.name}: run benchmarks/build_pydocs_benchmark.py first",
            file=sys.stderr,
        )
        return 2
    settings = settings_for(args)
    results: dict[str, Any] = {
        "machine": machine(),
        "split": args.split,
        "settings": args.set,
    }
    stats_file = bench / "stats.json"
    if stats_file.is_file():
        results["benchmark"] = json.loads(stats_file.read_text(encoding="utf-8"))

    if not args.skip_ingest:
        print(
            f"ingesting {bench / 'corpus'} into {args.data_dir} ({args.runner} runner) ...",
            flush=True,
        )
        results["ingest"] = rep = ingest(settings, bench / "corpus")
        print(f"  {rep['documents']} documents ({rep['new']} new, {rep['unchanged']} unchanged), "
              f"{rep['points_written']} points written in {rep['wall_s']}s", flush=True)  # fmt: skip
    with Retriever(settings) as r:
        results["index"] = {
            "chunks": r.store.count(),
            "documents": len(r.store.facet("doc_id", limit=1_000_000)),
        }
    print(
        f"index: {results['index']['documents']} documents, {results['index']['chunks']} chunks",
        flush=True,
    )

    if args.sweep:
        print(
            f"sweeping hybrid fusion settings on the {args.split} split ...", flush=True
        )
        rows = sweep(args, queries, qrels)
        results["sweep"] = rows
        out = bench / f"sweep-{args.split}.json"
        out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print("\n| setting | recall@10 | nDCG@10 |\n|---|---:|---:|")
        for label, m in rows.items():
            print(f"| {label} | {m['recall@10']:.3f} | {m['ndcg@10']:.3f} |")
        print(f"\nraw results: {out}")
        return 0

    runs = [
        ("dense", "dense", "rrf"),
        ("sparse (BM25)", "sparse", "rrf"),
        ("hybrid (RRF)", "hybrid", "rrf"),
    ]
    if not args.no_fusion_variants:
        runs.append(("hybrid (DBSF)", "hybrid", "dbsf"))
    print(f"scoring {args.split} split: {queries}", flush=True)
    rows = evaluate(settings, queries, qrels, runs, args.latency_samples)

    if not args.no_paired:
        print("paired comparison of hybrid with each branch ...", flush=True)
        results["paired"] = paired(args, queries, qrels, args.seed)

    if args.rerank_model:
        with tempfile.TemporaryDirectory() as tmp:
            n = args.rerank_queries
            sq, sr = (
                (queries, qrels)
                if n == 0
                else sample_split(bench, args.split, n, args.seed, Path(tmp))
            )
            tag = "" if n == 0 else f", {n}-query sample"
            print(
                f"reranking with {args.rerank_model} (top {args.rerank_candidates} hybrid chunks{tag}) ...",
                flush=True,
            )
            rows.update(
                evaluate(
                    settings,
                    sq,
                    sr,
                    [(f"hybrid (RRF){tag}", "hybrid", "rrf")],
                    args.latency_samples,
                )
            )
            rr = settings_for(args, [f"retrieval.rerank.model={args.rerank_model}",
                                     f"retrieval.rerank.candidates={args.rerank_candidates}"])  # fmt: skip
            rows.update(
                evaluate(
                    rr,
                    sq,
                    sr,
                    [(f"hybrid (RRF) + rerank{tag}", "hybrid", "rrf")],
                    min(args.latency_samples, 20),
                )
            )
        results["rerank_model"] = args.rerank_model

    results["rows"] = rows
    out = bench / f"results-{args.split}.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print()
    print(f"{args.split} split, k=10, document-level metrics; {results['machine']}")
    print(table(rows))
    if "paired" in results:
        print(
            "\n| comparison | mean difference | 95% bootstrap CI | queries hybrid wins | queries it loses |"
        )
        print("|---|---:|---:|---:|---:|")
        for label, d in results["paired"].items():
            lo, hi = d["ci95"]
            print(
                f"| {label} | {d['mean_diff']:+.3f} | [{lo:+.3f}, {hi:+.3f}] | {d['hybrid_better']} | {d['other_better']} |"
            )
    print(f"\nraw results: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
