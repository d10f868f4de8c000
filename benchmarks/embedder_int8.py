"""Dense embedder: torch float32 vs ONNX Runtime int8 (``embedder.backend``), in one run.

Measures, on the Python-docs benchmark corpus (``benchmarks/build_pydocs_benchmark.py``):

* **ingest**: the ragops pipeline (:func:`ragops.ingest.pipeline.run_ingest`,
  ``ingest.runner=local``) into one collection per backend. The corpus pages are dealt into
  ``--slices`` slices and the slices are ingested alternately (torch, onnx, onnx, torch, ...),
  so both arms see the same load on a shared machine. Reported: chunks/s end to end (load,
  chunk, embed, BM25, write) and chunks/s of the embedding call alone (time spent in
  ``TextEmbedder.encode_passages`` during those runs).
* **query encoding**: p50/p90 of ``--queries`` single-query ``encode_queries`` calls per
  backend, interleaved in blocks of ``--query-block`` queries (ABBA), after a warm-up.
* **quality**: nDCG@10 / recall@10 of dense and hybrid search on the test split, each index
  searched with queries encoded by its own backend (what a user of either backend gets).

The ONNX export happens once before the timed runs (its duration is reported separately) and
is cached, like in production. Speed claims are ratios between the two arms of this run.

Usage::

    python benchmarks/build_pydocs_benchmark.py          # once
    python benchmarks/embedder_int8.py                   # full corpus, all test queries
    python benchmarks/embedder_int8.py --max-pages 120 --eval-queries 800   # a quicker subset
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from retrieval_quality import machine  # noqa: E402

from ragops.config import Settings, load_settings  # noqa: E402
from ragops.embeddings import TextEmbedder  # noqa: E402
from ragops.ingest.pipeline import run_ingest  # noqa: E402
from ragops.model_registry import resolve_model  # noqa: E402
from ragops.retrieval.evaluate import evaluate_retrieval, read_jsonl  # noqa: E402
from ragops.retrieval.search import Retriever  # noqa: E402

ARMS = ("torch", "onnx")
EMBED_SECONDS: dict[str, float] = {"torch": 0.0, "onnx": 0.0}
EMBED_TEXTS: dict[str, int] = {"torch": 0, "onnx": 0}


def _timed_encode_passages() -> None:
    """Wrap TextEmbedder.encode_passages to add its time per backend (local runner: in-process)."""
    original = TextEmbedder.encode_passages

    def timed(self: TextEmbedder, texts: Any, batch_size: int | None = None) -> np.ndarray:
        t0 = time.perf_counter()
        out = original(self, texts, batch_size)
        arm = "onnx" if self.backend == "onnx-int8" else "torch"
        EMBED_SECONDS[arm] += time.perf_counter() - t0
        EMBED_TEXTS[arm] += len(out)
        return out

    TextEmbedder.encode_passages = timed  # type: ignore[method-assign]


def settings_for(arm: str, work: Path, extra: list[str]) -> Settings:
    return load_settings(overrides=[
        f"data_dir={work / arm}", "vectorstore.collection=pydocs", "ingest.runner=local",
        f"embedder.backend={arm}", f"embedder.onnx_cache_dir={work / 'onnx-cache'}", *extra,
    ])  # fmt: skip


def make_slices(corpus: Path, dest: Path, n: int, max_pages: int, seed: int) -> tuple[list[Path], set[str]]:
    """Symlink the corpus pages into ``n`` slice folders; returns them and the pages used."""
    pages = sorted(corpus.rglob("*.jsonl"))
    if max_pages and max_pages < len(pages):
        pages = sorted(random.Random(seed).sample(pages, max_pages))
    shutil.rmtree(dest, ignore_errors=True)
    slices = [dest / f"slice-{k}" for k in range(n)]
    for i, page in enumerate(pages):
        target = slices[i % n] / page.relative_to(corpus)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(page.resolve())
    return [s for s in slices if s.exists()], {str(p.relative_to(corpus).with_suffix("")) for p in pages}


def run_peer(python: str, part: Path, model: Path) -> dict[str, Any]:
    """One slice through the LlamaIndex IngestionPipeline, in its own virtualenv."""
    cmd = [python, str(HERE / "llamaindex_ingest.py"), "--model", str(model), str(part)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def bench_ingest(settings: dict[str, Settings], slices: list[Path], peer_python: str | None = None) -> dict[str, dict[str, float]]:
    """Ingest every slice with each arm, rotating which arm goes first."""
    arms = [*ARMS, "llamaindex"] if peer_python else list(ARMS)
    out = {arm: {"wall_s": 0.0, "chunks": 0, "points": 0, "documents": 0} for arm in arms}
    for k, part in enumerate(slices):
        for arm in arms[k % len(arms):] + arms[: k % len(arms)]:
            if arm == "llamaindex":
                model = resolve_model(settings["torch"].embedder.model, kind="embedder").locate()
                peer = run_peer(str(peer_python), part, model)
                for key in ("wall_s", "chunks", "documents"):
                    out[arm][key] += peer[key]
                print(f"  ingest llamaindex slice {k}: {peer['chunks']} chunks in {peer['wall_s']:.1f}s", flush=True)
                continue
            t0 = time.perf_counter()
            report = run_ingest(settings[arm], [str(part)])
            wall = time.perf_counter() - t0
            if not report.ok:
                print(f"warning: {arm} slice {k}: {report.to_dict()['failed'][:2]}", file=sys.stderr)
            out[arm]["wall_s"] += wall
            out[arm]["chunks"] += report.chunks
            out[arm]["points"] += report.points_written
            out[arm]["documents"] += report.documents
            print(f"  ingest {arm} slice {k}: {report.chunks} chunks in {wall:.1f}s "
                  f"(backend recorded: {report.embedder_backend})", flush=True)  # fmt: skip
    for arm in arms:
        o = out[arm]
        o["chunks_per_s"] = o["chunks"] / o["wall_s"]
        o["documents_per_s"] = o["documents"] / o["wall_s"]
        if arm in ARMS:
            o["embed_s"] = EMBED_SECONDS[arm]
            o["embed_chunks_per_s"] = EMBED_TEXTS[arm] / EMBED_SECONDS[arm] if EMBED_SECONDS[arm] else 0.0
    return out


def bench_queries(settings: dict[str, Settings], queries: list[str], block: int = 10) -> dict[str, Any]:
    """Single-query latency, interleaved in blocks of ``block`` queries per backend (ABBA).

    Blocks rather than query-by-query alternation: both runtimes' worker threads spin for a
    while after a call, and on a 2-core machine the other backend's spinning threads would be
    timed too; a serving process runs one backend, so a block measures what it sees.
    """
    embedders = {arm: TextEmbedder(settings[arm].embedder) for arm in ARMS}
    for e in embedders.values():
        e.encode_queries(queries[:10])  # warm-up (load, first-call allocations)
    queries = queries[10:]
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    vecs: dict[str, list[np.ndarray]] = {arm: [] for arm in ARMS}
    for b, start in enumerate(range(0, len(queries), block)):
        for arm in ARMS if b % 2 == 0 else ARMS[::-1]:
            for q in queries[start : start + block]:
                t0 = time.perf_counter()
                v = embedders[arm].encode_queries([q])
                times[arm].append((time.perf_counter() - t0) * 1000)
                vecs[arm].append(v[0])
    cos = (np.stack(vecs["torch"]) * np.stack(vecs["onnx"])).sum(1)
    out: dict[str, Any] = {
        arm: {"p50_ms": statistics.median(t), "p90_ms": float(np.percentile(t, 90)), "n": len(t)} for arm, t in times.items()
    }
    out["cosine_torch_vs_onnx"] = {"mean": float(cos.mean()), "min": float(cos.min())}
    return out


def bench_quality(settings: dict[str, Settings], queries: Path, qrels: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        with Retriever(settings[arm]) as retriever:
            res = evaluate_retrieval(retriever, queries, qrels, k=10, modes=("dense", "hybrid"), latency_samples=0)
        out[arm] = {m: {k: res["modes"][m][k] for k in ("ndcg@10", "recall@10", "mrr@10", "queries")} for m in ("dense", "hybrid")}
        print(f"  quality {arm}: " + ", ".join(f"{m} nDCG@10 {v['ndcg@10']:.4f}" for m, v in out[arm].items()), flush=True)
    return out


def split_files(bench: Path, pages: set[str], n: int, seed: int, dest: Path) -> tuple[Path, Path, int]:
    """Test queries whose relevant document is in the ingested pages (all of them by default)."""
    qs = read_jsonl(bench / "queries.jsonl", ["qid", "query"])
    rels = [r for r in read_jsonl(bench / "qrels.jsonl", ["qid", "doc_id"]) if r["doc_id"].split(".html#")[0] in pages]
    keep = {r["qid"] for r in rels}
    qs = [q for q in qs if q["qid"] in keep]
    if n and n < len(qs):
        qs = random.Random(seed).sample(qs, n)
        keep = {q["qid"] for q in qs}
    qp, rp = dest / "queries.jsonl", dest / "qrels.jsonl"
    qp.write_text("".join(json.dumps(q) + "\n" for q in qs))
    rp.write_text("".join(json.dumps(r) + "\n" for r in rels if r["qid"] in keep))
    return qp, rp, len(qs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bench", type=Path, default=HERE / "out" / "pydocs", help="output of build_pydocs_benchmark.py")
    ap.add_argument("--work", type=Path, default=HERE / "out" / "embedder-int8", help="indexes, slices, results")
    ap.add_argument("--slices", type=int, default=4, help="corpus slices ingested alternately per backend")
    ap.add_argument("--max-pages", type=int, default=0, help="ingest a seeded sample of pages (0: all)")
    ap.add_argument("--queries", type=int, default=200, help="single queries timed per backend")
    ap.add_argument("--eval-queries", type=int, default=0, help="test queries scored (0: all that apply)")
    ap.add_argument("--query-block", type=int, default=10, help="queries per backend before switching (1: alternate each query)")
    ap.add_argument("--only-queries", action="store_true", help="time query encoding only (no ingest, no quality)")
    ap.add_argument("--max-slices", type=int, default=0, help="ingest only the first N slices (0: all)")
    ap.add_argument("--peer-python", help="a virtualenv's python with LlamaIndex: adds its IngestionPipeline as a third arm")
    ap.add_argument("--only-ingest", action="store_true", help="stop after the ingest comparison")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra dotted.key=value settings for both arms")
    args = ap.parse_args(argv)

    work: Path = args.work
    if args.only_queries:
        settings = {arm: settings_for(arm, work, args.set) for arm in ARMS}
        all_queries = [q["query"] for q in read_jsonl(args.bench / "queries.jsonl", ["qid", "query"])]
        sample = random.Random(args.seed).sample(all_queries, min(args.queries + 10, len(all_queries)))
        res = bench_queries(settings, sample, args.query_block)
        print(json.dumps(res, indent=2))
        (work / f"queries-block{args.query_block}.json").write_text(json.dumps(res, indent=2))
        return 0
    for arm in ARMS:
        shutil.rmtree(work / arm, ignore_errors=True)  # a fresh index per run: ingest must embed everything
    work.mkdir(parents=True, exist_ok=True)
    settings = {arm: settings_for(arm, work, args.set) for arm in ARMS}
    _timed_encode_passages()

    t0 = time.perf_counter()
    TextEmbedder(settings["onnx"].embedder).warm_up()
    export_s = time.perf_counter() - t0
    print(f"onnx export + load (cached after the first run ever): {export_s:.1f}s", flush=True)

    slices, pages = make_slices(args.bench / "corpus", work / "slices", args.slices, args.max_pages, args.seed)
    if args.max_slices:
        slices = slices[: args.max_slices]
    print(f"ingesting {len(pages)} pages dealt into slices; {len(slices)} slices per arm", flush=True)
    ingest = bench_ingest(settings, slices, args.peer_python)
    if args.only_ingest:
        (work / "results-ingest.json").write_text(json.dumps({"machine": machine(), "ingest": ingest}, indent=2))
        print(json.dumps(ingest, indent=2))
        return 0

    all_queries = [q["query"] for q in read_jsonl(args.bench / "queries.jsonl", ["qid", "query"])]
    sample = random.Random(args.seed).sample(all_queries, min(args.queries + 10, len(all_queries)))
    print(f"timing {args.queries} single queries per backend", flush=True)
    queries = bench_queries(settings, sample, args.query_block)

    qp, rp, n_eval = split_files(args.bench, pages, args.eval_queries, args.seed, work)
    print(f"scoring {n_eval} test queries", flush=True)
    quality = bench_quality(settings, qp, rp)

    results = {
        "machine": machine(), "pages": len(pages), "slices": len(slices), "export_s": export_s,
        "ingest": ingest, "query_encode": queries, "quality": quality, "eval_queries": n_eval,
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=2))
    print(table(results))
    return 0


def table(r: dict[str, Any]) -> str:
    i, q, m = r["ingest"], r["query_encode"], r["quality"]
    rows = [
        "| metric | torch float32 | onnx int8 | onnx / torch | target | met |",
        "|---|---:|---:|---:|---:|:---:|",
    ]
    ratio = i["onnx"]["chunks_per_s"] / i["torch"]["chunks_per_s"]
    rows.append(f"| ingest chunks/s (end to end) | {i['torch']['chunks_per_s']:.1f} | {i['onnx']['chunks_per_s']:.1f} | "
                f"{ratio:.2f}x | >= 1.8x | {'yes' if ratio >= 1.8 else 'no'} |")  # fmt: skip
    er = i["onnx"]["embed_chunks_per_s"] / i["torch"]["embed_chunks_per_s"]
    rows.append(f"| embedding call chunks/s (inside ingest) | {i['torch']['embed_chunks_per_s']:.1f} | "
                f"{i['onnx']['embed_chunks_per_s']:.1f} | {er:.2f}x | | |")  # fmt: skip
    qr = q["onnx"]["p50_ms"] / q["torch"]["p50_ms"]
    rows.append(f"| query encode p50 ms ({q['torch']['n']} single queries) | {q['torch']['p50_ms']:.2f} | "
                f"{q['onnx']['p50_ms']:.2f} | {qr:.2f}x | <= 0.6x | {'yes' if qr <= 0.6 else 'no'} |")  # fmt: skip
    rows.append(f"| query encode p90 ms | {q['torch']['p90_ms']:.2f} | {q['onnx']['p90_ms']:.2f} | "
                f"{q['onnx']['p90_ms'] / q['torch']['p90_ms']:.2f}x | | |")  # fmt: skip
    for mode in ("dense", "hybrid"):
        a, b = m["torch"][mode]["ndcg@10"], m["onnx"][mode]["ndcg@10"]
        rows.append(f"| nDCG@10 {mode} ({m['torch'][mode]['queries']} queries) | {a:.4f} | {b:.4f} | "
                    f"{b - a:+.4f} | loss <= 0.01 | {'yes' if a - b <= 0.01 else 'no'} |")  # fmt: skip
        a, b = m["torch"][mode]["recall@10"], m["onnx"][mode]["recall@10"]
        rows.append(f"| recall@10 {mode} | {a:.4f} | {b:.4f} | {b - a:+.4f} | | |")
    c = q["cosine_torch_vs_onnx"]
    rows.append(f"\nquery vectors, cosine torch vs onnx: mean {c['mean']:.4f}, min {c['min']:.4f}; "
                f"one-time export: {r['export_s']:.1f}s")  # fmt: skip
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())
