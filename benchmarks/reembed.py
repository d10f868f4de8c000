"""Benchmark: ``ragops index reembed`` on the Python-docs index, with a client searching throughout.

What it measures, in one run on one machine:

* the re-embed: wall time and chunks/s of :func:`ragops.ingest.reembed.run_reembed` over the
  whole collection (read → embed → write → optimize → alias move);
* its baseline: the raw throughput of the same embedder (``encode_passages``, same batch size)
  on a sample of the same chunk texts: the ratio says what reading, writing, fingerprints and
  the HNSW build cost on top of the model;
* a client searching throughout, in another process, through the serving code path
  (the query-embedder and retriever deployment classes of :mod:`ragops.serve`, without Ray or
  HTTP): every query, its latency, the collection that answered, and failures — the target is
  0 failed queries across the alias move. The client holds the live Edge shard, as
  ``ragops serve`` would, so the re-embed reads the chunks from a copy of its files.

Input: a copy of the index built by ``benchmarks/retrieval_quality.py`` (``benchmarks/out/
pydocs-index``, collection ``pydocs``, minilm-l6; build the corpus with ``python
benchmarks/build_pydocs_benchmark.py`` first). The new embedder defaults to a copy of the
packaged MiniLM saved to a local folder: the same cost as a MiniLM fine-tuned by ``ragops
train embedder``, which is what a re-embed is typically for.

    python benchmarks/reembed.py                      # ~10 min on 2 CPU cores
    python benchmarks/reembed.py --embedder PATH --batch-size 128
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
DEFAULT_INDEX = HERE / "out" / "pydocs-index"
DEFAULT_WORK = HERE / "out" / "reembed"
QUERIES = HERE / "out" / "pydocs" / "queries.jsonl"


def _settings(data_dir: Path, collection: str) -> Any:
    from ragops.config import load_settings

    return load_settings([], [f"vectorstore.collection={collection}"], data_dir=data_dir, environ={})


def _queries(n: int = 200) -> list[str]:
    if QUERIES.exists():
        rows = [json.loads(line) for line in QUERIES.read_text().splitlines() if line.strip()]
        return [r["query"] for r in rows[:n]]
    return ["How do I read a file line by line?", "Return the absolute value of a number", "sort a list in place"]


# -- the client ----------------------------------------------------------------------------


def client(data_dir: Path, collection: str, ready: Path, stop: Path, out: Path, qps: float) -> None:
    """Search at ``qps`` until ``stop`` exists; write every query's outcome to ``out``."""
    from ragops.serve.embedder import QueryEmbedder
    from ragops.serve.retriever import RetrieverDeployment

    data = _settings(data_dir, collection).model_dump(mode="json")
    embedder = QueryEmbedder.func_or_class(data)
    retriever = RetrieverDeployment.func_or_class(data)
    queries = _queries()
    log: list[dict[str, Any]] = []

    async def run() -> None:
        i = 0
        ready.write_text("ready")
        while not stop.exists():
            q = queries[i % len(queries)]
            i += 1
            t0 = time.time()
            row: dict[str, Any] = {"t": t0}
            try:
                (encoded,) = await asyncio.to_thread(embedder._encode, [q])
                result = await retriever.search(q, encoded, {"k": 10, "mode": "hybrid"})
                row.update(ok=bool(result.hits), collection=encoded.collection)
            except Exception as exc:  # noqa: BLE001 - counted, that is the point
                row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:300])
            row["latency_ms"] = (time.time() - t0) * 1000
            log.append(row)
            await asyncio.sleep(max(0.0, 1.0 / qps - (time.time() - t0)))

    asyncio.run(run())
    out.write_text(json.dumps(log))


# -- the driver ----------------------------------------------------------------------------


def _copy_index(index: Path, data_dir: Path) -> None:
    shutil.rmtree(data_dir.parent, ignore_errors=True)
    data_dir.parent.mkdir(parents=True)
    shutil.copytree(index, data_dir, ignore=shutil.ignore_patterns("ragops.pid", "aliases", "tmp"))


def _default_embedder(work: Path) -> str:
    from ragops.model_registry import resolve_model

    target = work / "minilm-l6-copy"
    shutil.copytree(resolve_model("minilm-l6").locate(), target)
    return str(target)


def _raw_throughput(settings: Any, embedder: str, sample: int, batch_size: int) -> float:
    """Chunks/s of the bare model on the first ``sample`` chunk texts (same text reembed embeds)."""
    from ragops.embeddings import TextEmbedder
    from ragops.ingest.reembed import embed_text
    from ragops.vectorstore import open_store

    with open_store(settings.vectorstore, settings.data_dir) as store:
        texts = []
        for r in store.scroll(batch_size=batch_size):
            texts.append(embed_text(r.payload, settings.ingest.chunker.include_heading))
            if len(texts) >= sample:
                break
    model = TextEmbedder(settings.embedder.model_copy(update={"model": embedder}))
    model.warm_up()
    model.encode_passages(texts[:32])  # warm the kernels
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        model.encode_passages(texts[start : start + batch_size])
    return len(texts) / (time.perf_counter() - t0)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _phases(log: list[dict[str, Any]], start: float, switch: float, source: str, target: str) -> dict[str, Any]:
    phases = {"before": [r for r in log if r["t"] < start], "during": [r for r in log if start <= r["t"] < switch],
              "after": [r for r in log if r["t"] >= switch]}  # fmt: skip
    out: dict[str, Any] = {}
    for name, rows in phases.items():
        lat = [r["latency_ms"] for r in rows if r["ok"]]
        out[name] = {
            "queries": len(rows), "failed": sum(not r["ok"] for r in rows),
            "p50_ms": round(_pct(lat, 0.5), 1), "p99_ms": round(_pct(lat, 0.99), 1),
            "by_collection": {c: sum(r.get("collection") == c for r in rows) for c in (source, target)},
        }  # fmt: skip
    first_new = next((r["t"] for r in log if r.get("collection") == target), None)
    out["switch_seen_after_s"] = round(first_new - switch, 2) if first_new else None
    out["errors"] = sorted({r["error"] for r in log if "error" in r})[:5]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=Path, default=DEFAULT_INDEX, help="data dir holding the collection (copied)")
    parser.add_argument("--collection", default="pydocs")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--embedder", help="new embedder (default: a local copy of minilm-l6)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--sample", type=int, default=1024, help="chunks for the raw-throughput baseline")
    parser.add_argument("--qps", type=float, default=10.0, help="client query rate")
    parser.add_argument("--raw-only", action="store_true",
                        help="only measure the raw-throughput baseline again, on the --work copy of a finished run")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ready", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--stop", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_dir = args.work / "data"
    if args.client:
        client(data_dir, args.collection, args.ready, args.stop, args.out, args.qps)
        return

    from ragops.ingest.reembed import run_reembed

    if args.raw_only:
        # The live collection of the finished run (the alias moved): same chunks, read the same way.
        raw = _raw_throughput(_settings(data_dir, args.collection), args.embedder or str(args.work / "minilm-l6-copy"),
                              args.sample, args.batch_size)  # fmt: skip
        print(json.dumps({"raw_chunks_per_s": round(raw, 1), "load_avg_1m": round(os.getloadavg()[0], 2)}))
        return
    if not (args.index / "collections" / args.collection).is_dir():
        sys.exit(f"no collection '{args.collection}' under {args.index}: build it with benchmarks/retrieval_quality.py")
    _copy_index(args.index, data_dir)
    embedder = args.embedder or _default_embedder(args.work)
    settings = _settings(data_dir, args.collection)
    print(f"raw throughput of {embedder} on {args.sample} chunks ...", flush=True)
    raw = _raw_throughput(settings, embedder, args.sample, args.batch_size)
    load_before = os.getloadavg()[0]
    print(f"  {raw:.1f} chunks/s (load average {load_before:.1f})", flush=True)

    ready, stop, out = args.work / "client.ready", args.work / "client.stop", args.work / "client.json"
    proc = subprocess.Popen([sys.executable, __file__, "--client", "--work", str(args.work), "--collection", args.collection,
                             "--ready", str(ready), "--stop", str(stop), "--out", str(out), "--qps", str(args.qps)])  # fmt: skip
    while not ready.exists():
        if proc.poll() is not None:
            sys.exit("the client died before it started searching")
        time.sleep(0.2)
    time.sleep(5)  # a baseline of queries before the re-embed starts
    last = [0.0]

    def progress(p: dict[str, Any]) -> None:
        if time.monotonic() - last[0] > 15:
            last[0] = time.monotonic()
            print(f"  reembed {p['done']}/{p['total']} chunks, {p['done'] / p['elapsed']:.1f} chunks/s", flush=True)

    started = time.time()
    report = run_reembed(settings, embedder, batch_size=args.batch_size, progress=progress)
    switched = time.time()
    time.sleep(15)  # the client keeps searching on the new collection
    stop.write_text("stop")
    proc.wait(timeout=120)
    log = json.loads(out.read_text())
    phases = _phases(log, started, switched, report.source, report.target)
    result = {
        "machine": {"nproc": os.cpu_count(), "load_avg_1m_at_baseline": round(load_before, 2),
                    "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "python": sys.version.split()[0]},
        "reembed": report.to_dict(),
        "raw_chunks_per_s": round(raw, 1),
        "reembed_vs_raw": round(report.chunks_per_s / raw, 3),
        "client": {"qps_target": args.qps, "queries": len(log), "failed": sum(not r["ok"] for r in log), **phases},
    }
    (args.work / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
