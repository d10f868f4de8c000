"""Retrieval latency at 100k chunks: ragops' Retriever against "encode + exact numpy search".

The baseline is the least a retriever must do: encode the query with the same model, then
an exact (brute-force) dot product over all vectors held in a numpy array, top-k by
argpartition. The Retriever does the same encode, then asks Qdrant Edge (HNSW, after
``optimize()``) — dense, or hybrid with BM25 and RRF fused in the engine. Both run in the same
process and run, on the same queries, interleaved.

Vectors: 100k chunks would take hours to embed on 2 cores, so the collection holds the real
embeddings of the sample corpus' chunks plus synthetic chunks: texts of words sampled from the
corpus vocabulary (their BM25 vectors are real), dense vectors = a random real chunk's vector
plus noise, renormalized. Latency does not depend on the vectors' meaning; the index shape
and sizes are those of a real 100k-chunk collection.

Usage::

    python benchmarks/retrieval_latency.py --chunks 100000 --queries 200
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile in milliseconds."""
    ordered = sorted(values)
    return 1000 * ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def build(args: argparse.Namespace, data_dir: Path):
    from ragops.config import load_settings
    from ragops.embeddings import TextEmbedder
    from ragops.sparse import BM25Encoder
    from ragops.vectorstore import open_store
    from ragops.vectorstore.base import CollectionSpec, Point

    settings = load_settings([], [], data_dir=data_dir, environ={})
    texts = []
    for f in sorted((REPO / "samples" / "docs").rglob("*")):
        if f.is_file():
            texts.extend(p.strip() for p in re.split(r"\n\s*\n", f.read_text()) if len(p.split()) > 15)
    emb = TextEmbedder(settings.embedder)
    real = emb.encode_passages(texts)
    vocab = sorted({w for t in texts for w in re.findall(r"[A-Za-z][A-Za-z0-9-]+", t)})
    rng = np.random.default_rng(0)
    pyrng = random.Random(0)
    bm25 = BM25Encoder(settings.ingest.sparse)

    store = open_store(settings.vectorstore, data_dir)
    store.ensure_collection(CollectionSpec(name=store.collection, dim=emb.dim, embedder=settings.embedder.model))
    matrix = np.zeros((args.chunks, emb.dim), dtype=np.float32)
    batch: list[Point] = []
    for i in range(args.chunks):
        if i < len(texts):
            text, vec = texts[i], real[i]
        else:
            text = " ".join(pyrng.choices(vocab, k=pyrng.randint(40, 160)))
            vec = real[pyrng.randrange(len(real))] + rng.normal(0, 0.04, emb.dim).astype(np.float32)
            vec = vec / np.linalg.norm(vec)
        matrix[i] = vec
        pid = str(uuid.UUID(int=i + 1))
        payload = {"doc_id": f"doc{i // 4}", "chunk_index": i % 4, "text": text[:400], "source": f"doc{i // 4}.md"}
        batch.append(Point(id=pid, vector=vec, payload=payload, sparse=bm25.encode_documents([text])[0]))
        if len(batch) == 1024:
            store.upsert(batch)
            batch = []
    if batch:
        store.upsert(batch)
    store.flush()
    t = time.perf_counter()
    store.optimize()
    print(f"built {args.chunks} points; optimize {time.perf_counter() - t:.1f}s", flush=True)
    return settings, store, matrix, emb


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--k", type=int, default=10)
    args = p.parse_args()

    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from ragops.retrieval.search import Retriever

    data_dir = Path(tempfile.mkdtemp(prefix="ragops-latency-"))
    settings, store, matrix, emb = build(args, data_dir)
    retriever = Retriever(settings, store=store)
    retriever.warm_up()
    queries = [json.loads(line)["query"] for line in (REPO / "samples/eval/queries.jsonl").read_text().splitlines()]
    queries = (queries * (args.queries // len(queries) + 1))[: args.queries]

    def baseline(q: str) -> None:
        v = emb.encode_queries([q])[0]
        scores = matrix @ v
        top = np.argpartition(-scores, args.k)[: args.k]
        top[np.argsort(-scores[top])]

    timings: dict[str, list[float]] = {"baseline": [], "dense": [], "hybrid": []}
    for q in queries[:10]:  # warm-up
        baseline(q)
        retriever.search(q, k=args.k, mode="dense")
        retriever.search(q, k=args.k, mode="hybrid")
    for q in queries:  # interleaved so machine noise hits all three alike
        t = time.perf_counter()
        baseline(q)
        timings["baseline"].append(time.perf_counter() - t)
        for mode in ("dense", "hybrid"):
            t = time.perf_counter()
            retriever.search(q, k=args.k, mode=mode)
            timings[mode].append(time.perf_counter() - t)
    base50, base99 = percentile(timings["baseline"], 50), percentile(timings["baseline"], 99)
    print(f"\n{args.chunks} chunks, dim {matrix.shape[1]}, {len(queries)} queries, top-{args.k}, {os.cpu_count()} CPUs\n")
    print("| path | p50 ms | p99 ms | p50 / baseline | p99 / baseline |\n|---|---:|---:|---:|---:|")
    print(f"| baseline: encode + exact numpy | {base50:.2f} | {base99:.2f} | 1.00 | 1.00 |")
    for mode in ("dense", "hybrid"):
        p50, p99 = percentile(timings[mode], 50), percentile(timings[mode], 99)
        print(f"| Retriever {mode} (Qdrant Edge) | {p50:.2f} | {p99:.2f} | {p50 / base50:.2f} | {p99 / base99:.2f} |")
    enc = [emb.encode_queries([q]) for q in queries[:20]]
    del enc
    print(f"\n(mean of means: baseline {statistics.mean(timings['baseline']) * 1000:.2f} ms)")
    retriever.close()


if __name__ == "__main__":
    main()
