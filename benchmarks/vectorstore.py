"""Embedded Qdrant Edge vs qdrant-client's local mode, through ragops' own store classes.

Measures what ingest and retrieval see: upsert throughput (points/s, in batches like the
ingest sink writes) and top-k query latency (p50/p99 of single ``search`` calls), for
:class:`ragops.vectorstore.edge.EdgeStore` and for
:class:`ragops.vectorstore.server.QdrantServerStore` on ``QdrantClient(":memory:")``, the
pure-Python local mode that stands in for a server in tests. Speed is reported as the ratio
Edge / client measured in the same run.

Queries are noisy copies of stored vectors, so "top-1 hit" (the source point ranked first)
checks that both engines return the right answer and not only a fast one.

Usage::

    python benchmarks/vectorstore.py                       # 50k points, 384 dims, 200 queries
    python benchmarks/vectorstore.py --client-points 20000 # fewer points for the slow client
"""

from __future__ import annotations

import argparse
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ragops.vectorstore import CollectionSpec, Point, SearchRequest, SparseVector, VectorStore
from ragops.vectorstore.edge import EdgeStore
from ragops.vectorstore.server import QdrantServerStore


@dataclass
class Result:
    """One backend's measurements."""

    name: str
    points: int
    upsert_pps: float
    p50_ms: float
    p99_ms: float
    top1: float
    note: str = ""


def make_data(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors (float32), like a normalising embedder produces."""
    rng = np.random.default_rng(seed)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    return vecs


def make_points(vecs: np.ndarray, start: int, stop: int, sparse: bool) -> list[Point]:
    """Points with an ingest-like payload; ids are deterministic UUIDs."""
    out = []
    for i in range(start, stop):
        sv = SparseVector(indices=[i % 5000, 5000 + i % 97], values=[1.0, 0.5]) if sparse else None
        out.append(
            Point(
                id=str(uuid.UUID(int=i + 1)),
                vector=vecs[i],
                sparse=sv,
                payload={"doc_id": f"doc-{i // 8}", "chunk_index": i % 8, "text": f"chunk {i} " * 8},
            )
        )
    return out


def run_backend(
    name: str,
    factory: Callable[[], VectorStore],
    vecs: np.ndarray,
    queries: np.ndarray,
    targets: np.ndarray,
    *,
    batch: int,
    k: int,
    mode: str,
    after_load: Callable[[VectorStore], str] | None = None,
) -> Result:
    """Load ``vecs`` into a fresh store, then time ``len(queries)`` single searches."""
    store = factory()
    sparse = mode == "hybrid"
    store.ensure_collection(CollectionSpec(name=store.collection, dim=vecs.shape[1], embedder="bench", sparse=sparse))
    n = len(vecs)
    # Points are built before the clock starts: the rate is the store's (conversion to the
    # engine's types included), not this script's payload generation.
    batches = [make_points(vecs, start, min(start + batch, n), sparse) for start in range(0, n, batch)]
    t0 = time.perf_counter()
    for points in batches:
        store.upsert(points)
    store.flush()
    upsert_s = time.perf_counter() - t0
    note = after_load(store) if after_load else ""
    lat: list[float] = []
    hits_top1 = 0
    for q, target in zip(queries, targets):
        req = SearchRequest(
            k=k,
            mode="hybrid" if sparse else "dense",
            dense=q,
            sparse=SparseVector([int(target) % 5000], [1.0]) if sparse else None,
        )
        t = time.perf_counter()
        hits = store.search(req)
        lat.append((time.perf_counter() - t) * 1000)
        hits_top1 += bool(hits) and hits[0].id == str(uuid.UUID(int=int(target) + 1))
    store.drop()
    store.close()
    lat.sort()
    p99 = lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))]
    return Result(name, n, n / upsert_s, statistics.median(lat), p99, hits_top1 / len(queries), note)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, run both backends, print a markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=50_000, help="points loaded into Edge (default 50000)")
    ap.add_argument("--client-points", type=int, default=None, help="points for the client local mode (default: --points)")
    ap.add_argument("--dim", type=int, default=384, help="vector dimension (default 384, MiniLM / bge-small)")
    ap.add_argument("--queries", type=int, default=200, help="timed queries per backend (default 200)")
    ap.add_argument("--k", type=int, default=10, help="hits per query (default 10)")
    ap.add_argument("--batch", type=int, default=512, help="points per upsert call (default 512, ingest's write_batch_size)")
    ap.add_argument("--mode", choices=["dense", "hybrid"], default="dense", help="query mode (hybrid adds BM25-like sparse vectors)")
    ap.add_argument("--optimize", action="store_true", help="also time Edge after optimize() (HNSW build)")
    ap.add_argument(
        "--client-location",
        choices=["memory", "path"],
        default="memory",
        help="client local mode in RAM (':memory:', default) or persisted in a folder ('path:DIR')",
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    client_points = args.client_points or args.points
    vecs = make_data(max(args.points, client_points), args.dim, args.seed)
    rng = np.random.default_rng(args.seed + 1)

    def queries_for(n: int) -> tuple[np.ndarray, np.ndarray]:
        targets = rng.integers(0, n, size=args.queries)
        q = vecs[targets] + rng.normal(scale=0.02, size=(args.queries, args.dim)).astype(np.float32)
        return q / np.linalg.norm(q, axis=1, keepdims=True), targets

    tmp = Path(tempfile.mkdtemp(prefix="ragops-bench-"))
    results: list[Result] = []
    try:
        q, t = queries_for(args.points)
        common = dict(batch=args.batch, k=args.k, mode=args.mode)
        results.append(
            run_backend("Qdrant Edge (EdgeStore)", lambda: EdgeStore(tmp / "edge", "bench"), vecs[: args.points], q, t, **common)
        )
        if args.optimize:

            def optimize(store: VectorStore) -> str:
                t0 = time.perf_counter()
                assert isinstance(store, EdgeStore)
                store.optimize()
                return f"optimize() {time.perf_counter() - t0:.1f} s, not in upsert rate"

            results.append(
                run_backend(
                    "Qdrant Edge, optimized",
                    lambda: EdgeStore(tmp / "edge-opt", "bench"),
                    vecs[: args.points],
                    q,
                    t,
                    after_load=optimize,
                    **common,
                )
            )
        q, t = queries_for(client_points)
        url = ":memory:" if args.client_location == "memory" else f"path:{tmp / 'client'}"
        results.append(
            run_backend(
                f"qdrant-client local ({'path' if url.startswith('path:') else url})",
                lambda: QdrantServerStore.from_url(url, "bench"),
                vecs[:client_points],
                q,
                t,
                **common,
            )
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    client = results[-1]
    print(f"\n{args.mode} search, dim {args.dim}, top-{args.k}, {args.queries} queries, upsert batches of {args.batch}")
    print(f"python {platform.python_version()}, {platform.machine()}\n")
    print("| backend | points | upsert points/s | query p50 ms | query p99 ms | top-1 hit | note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        print(
            f"| {r.name} | {r.points:,} | {r.upsert_pps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.top1:.0%} | {r.note} |"
        )
    for r in results[:-1]:
        print(
            f"| ratio {r.name} / client | | {r.upsert_pps / client.upsert_pps:,.1f}x faster | "
            f"{client.p50_ms / r.p50_ms:,.1f}x faster | {client.p99_ms / r.p99_ms:,.1f}x faster | | |"
        )
    if client.points != results[0].points:
        print(f"\n(the client ran on {client.points:,} points, Edge on {results[0].points:,}: latency ratios favour the client)")


if __name__ == "__main__":
    main()
