"""Inference engines: transformers float32 against llama.cpp on packaged GGUFs, in one run.

The prompts are the stuff reader's (k = 5 passages retrieved from the sample corpus for the
questions of ``samples/eval/answers.jsonl``), so prefill is as heavy as in real use. Parts:

1. ``speed`` — per variant (transformers f32; llama.cpp on the f16, q8_0, q4_k_m packages
   and on the shipped Q4_1 file): prefill tokens/s (prompt tokens / time to first token),
   TTFT, and decode tokens/s ((tokens - 1) / (total - TTFT)), greedy with
   ``min_new_tokens == max_new_tokens``; medians over the prompts. The variants take turns
   prompt by prompt, so background load hits them alike.
2. ``identity`` — greedy f16 (llama.cpp) against transformers: prompts whose first 16 tokens
   are identical.
3. ``quality`` — ``ragops eval answers`` (stuff reader) per engine/quant: answer F1 etc.
4. ``batching`` — in-process, 8 threads on the q8_0 generator against one at a time, on the
   RAG prompts and on bare questions (how much shared decode steps give).
5. ``serve`` — the Ray Serve app on each engine in turn (transformers, llama.cpp q8_0): chat
   p50 with one client (k = 5, 32 tokens), total tokens/s of 8 concurrent clients against one,
   and the generator replica's RSS and PSS.

Packages are written into the data dir's registry on first use (``ragops models package``).

Usage::

    python benchmarks/engines.py [--parts speed identity batching quality serve] [--prompts 10] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "benchmarks"))

QUANTS = ("f16", "q8_0", "q4_k_m")
BASE = "smollm2-135m-instruct"


def machine() -> dict[str, Any]:
    import psutil
    import torch

    import llama_cpp

    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1), "torch": torch.__version__,
            "llama_cpp_python": llama_cpp.__version__, "load_avg_start": os.getloadavg()}  # fmt: skip


def settings_for(data_dir: Path, *overrides: str) -> Any:
    from ragops.config import load_settings

    return load_settings([], ["ingest.runner=local", "serve.request_timeout_s=900", *overrides], data_dir=data_dir)


def ensure_index(data_dir: Path) -> None:
    from ragops.ingest.pipeline import run_ingest

    report = run_ingest(settings_for(data_dir), [str(REPO / "samples/docs")]).to_dict()
    print(f"index: {report['documents']} documents, {report['chunks']} chunks ({report['new']} new)", flush=True)


def ensure_packages(data_dir: Path) -> dict[str, Path]:
    """The GGUF file of each quant of the base model (packaged now when missing)."""
    from ragops.artifacts import Registry
    from ragops.packaging import package_model

    registry = Registry.from_settings(settings_for(data_dir))
    paths = {}
    for quant in QUANTS:
        name = f"{BASE}.{quant}"
        if not registry.has(name):
            t0 = time.perf_counter()
            package_model(BASE, registry=registry, quant=quant, name=name)
            print(f"packaged {name} in {time.perf_counter() - t0:.1f} s", flush=True)
        paths[quant] = registry.gguf_path(name)
    return paths


def rag_prompts(data_dir: Path, n: int) -> list[list[dict[str, str]]]:
    """The stuff reader's chat messages (k = 5) for the first ``n`` eval questions."""
    from ragops.retrieval.prompts import build_stuff_messages
    from ragops.retrieval.rag import RAGPipeline

    settings = settings_for(data_dir, "generator.engine=transformers")
    rows = [json.loads(line) for line in (REPO / "samples/eval/answers.jsonl").read_text().splitlines() if line.strip()]
    with RAGPipeline(settings) as rag:
        out = []
        for row in rows[:n]:
            _, passages = rag.retrieve(row["question"], k=5)
            out.append(build_stuff_messages(row["question"], passages))
    return out


def plain_cfg(**extra: Any) -> Any:
    from ragops.config import GeneratorConfig

    # Repetition controls off: every variant emits the argmax token, so outputs are comparable.
    return GeneratorConfig(repetition_penalty=1.0, no_repeat_ngram_size=0, stop_on_repeat=False, **extra)


def variants(paths: dict[str, Path]) -> dict[str, Any]:
    from ragops.model_registry import resolve_model
    from ragops.retrieval.generation import Generator
    from ragops.retrieval.llamacpp_engine import LlamaCppGenerator

    spec = resolve_model(BASE, kind="generator")
    files = {**{f"llamacpp {q}": p for q, p in paths.items()}, "llamacpp Q4_1 (shipped)": spec.locate() / spec.gguf_file}
    gens: dict[str, Any] = {"transformers f32": Generator(plain_cfg())}
    gens.update({label: LlamaCppGenerator(plain_cfg(), gguf_path=path) for label, path in files.items()})
    for gen in gens.values():
        gen.warm_up()
    return gens


def speed(gens: dict[str, Any], prompts: list[Any], new_tokens: int) -> dict[str, Any]:
    rows: dict[str, dict[str, list[float]]] = {k: {"ttft": [], "prefill": [], "decode": []} for k in gens}
    for gen in gens.values():  # warm-up
        gen.generate(prompts[0], max_new_tokens=4)
    for i, msgs in enumerate(prompts):
        for label, gen in gens.items():
            res = gen.generate(msgs, max_new_tokens=new_tokens, min_new_tokens=new_tokens)
            t = res.timings
            rows[label]["ttft"].append(t.time_to_first_token_s)
            rows[label]["prefill"].append(res.prompt_tokens / t.time_to_first_token_s)
            rows[label]["decode"].append((res.completion_tokens - 1) / max(t.total_s - t.time_to_first_token_s, 1e-9))
        print(f"speed: prompt {i + 1}/{len(prompts)} ({res.prompt_tokens} tokens)", flush=True)
    base = {k: statistics.median(v) for k, v in rows["transformers f32"].items()}
    out = {}
    for label, r in rows.items():
        med = {k: statistics.median(v) for k, v in r.items()}
        out[label] = {"ttft_p50_s": med["ttft"], "prefill_tok_s": med["prefill"], "decode_tok_s": med["decode"],
                      "ttft_ratio": med["ttft"] / base["ttft"], "prefill_ratio": med["prefill"] / base["prefill"],
                      "decode_ratio": med["decode"] / base["decode"]}  # fmt: skip
    return {"new_tokens": new_tokens, "prompts": len(prompts),
            "prompt_tokens_p50": statistics.median(len(gens["transformers f32"].apply_chat_template(p, tokenize=True)) for p in prompts),
            "variants": out}  # fmt: skip


def identity(gens: dict[str, Any], prompts: list[Any], tokens: int = 16) -> dict[str, Any]:
    ref, f16 = gens["transformers f32"], gens["llamacpp f16"]
    same = []
    for msgs in prompts:
        a = ref.generate(msgs, max_new_tokens=tokens, min_new_tokens=tokens)
        b = f16.generate(msgs, max_new_tokens=tokens, min_new_tokens=tokens)
        same.append(ref.count_tokens(a.text) == tokens and a.text == b.text)
    return {"prompts": len(prompts), "tokens": tokens, "identical": sum(same)}


def batching(gens: dict[str, Any], prompts: list[Any], clients: int, new_tokens: int) -> dict[str, Any]:
    """In-process: ``clients`` threads on the q8_0 generator against the same prompts one at a time.

    Two prompt sets: the RAG prompts (prefill-heavy) and the bare questions (decode-bound), so
    the share of the gain that comes from shared decode steps is visible.
    """
    import threading

    gen = gens["llamacpp q8_0"]
    rows = [json.loads(line) for line in (REPO / "samples/eval/answers.jsonl").read_text().splitlines() if line.strip()]
    bare = [[{"role": "user", "content": row["question"]}] for row in rows]
    out = {}
    for label, batch in (("rag_prompts", prompts[:clients]), ("short_prompts", bare[:clients])):
        opts = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        t0 = time.perf_counter()
        alone = [gen.generate(m, **opts) for m in batch]
        seq_s = time.perf_counter() - t0
        got: list[Any] = [None] * len(batch)

        def run(i: int, m: Any) -> None:
            got[i] = gen.generate(m, **opts)

        steps0 = gen.batcher.steps
        threads = [threading.Thread(target=run, args=(i, m)) for i, m in enumerate(batch)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        par_s = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in got)
        out[label] = {"requests": len(batch), "prompt_tokens_p50": statistics.median(r.prompt_tokens for r in got),
                      "sequential_tok_s": sum(r.completion_tokens for r in alone) / seq_s, "concurrent_tok_s": tokens / par_s,
                      "gain": seq_s / par_s, "decode_calls": gen.batcher.steps - steps0, "tokens": tokens,
                      "same_answers": sum(a.text == b.text for a, b in zip(alone, got))}  # fmt: skip
        print(f"batching {label}: {out[label]}", flush=True)
    return out


def quality(data_dir: Path, paths: dict[str, Path], limit: int | None) -> dict[str, Any]:
    """``ragops eval answers`` per engine (a subprocess each, as a user runs it)."""
    data = REPO / "samples/eval/answers.jsonl"
    if limit:
        subset = data_dir / "answers-subset.jsonl"
        subset.write_text("".join(data.read_text().splitlines(True)[:limit]))
        data = subset
    runs = {"transformers f32": ["--set", "generator.engine=transformers"]}
    runs.update({f"llamacpp {q}": ["--model", f"{BASE}.{q}"] for q in paths})
    out = {}
    for label, extra in runs.items():
        cmd = [sys.executable, "-m", "ragops.cli", "eval", "answers", "--data", str(data), "--data-dir", str(data_dir),
               "--set", "generator.reader=stuff", "--json", *extra]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"{label}: {res.stderr[-2000:]}")
        got = json.loads(res.stdout)
        out[label] = {k: got[k] for k in ("questions", "token_f1", "exact_match", "answer_contains") if k in got}
        out[label]["wall_s"] = time.perf_counter() - t0
        print(f"quality {label}: {out[label]}", flush=True)
    ref = out["transformers f32"]["token_f1"]
    for row in out.values():
        row["token_f1_delta"] = row["token_f1"] - ref
    return out


def _generator_memory(app: str) -> dict[str, float]:
    import serve as serve_bench

    rows = [r for r in serve_bench._memory_rows(serve_bench.serve_processes()) if r["process"].startswith(f"ray::ServeReplica:{app}:Generator")]
    return {"rss_mib": sum(r["rss_mib"] for r in rows), "pss_mib": sum(r["pss_mib"] for r in rows), "replicas": len(rows)}


def serve_part(data_dir: Path, questions: int, clients: int, max_tokens: int) -> dict[str, Any]:
    import httpx
    from ray import serve

    import serve as serve_bench
    from ragops.raylocal import ensure_ray
    from ragops.serve.app import build_application
    from ragops.serve.auth import ApiKeys

    q8 = f"{BASE}.q8_0"
    engines = {"transformers f32": ["generator.engine=transformers"], "llamacpp q8_0": ["generator.engine=llamacpp", f"generator.model={q8}"]}
    port = serve_bench.free_port()
    url = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    started = False
    for label, overrides in engines.items():
        from ragops.artifacts import apply_model

        settings = settings_for(data_dir, *[o for o in overrides if not o.startswith("generator.model=")])
        if any(o.startswith("generator.model=") for o in overrides):
            settings = apply_model(settings, q8)
        if not started:
            ensure_ray(settings.ray)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            started = True
        app = "engines-" + label.split()[0]
        t0 = time.perf_counter()
        serve.run(build_application(settings, keys=ApiKeys()), name=app, route_prefix="/")
        print(f"serve {label}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
        gen = {"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0}
        qs = serve_bench.questions(max(questions, clients * 2))
        bodies = [{"model": "ragops", "messages": [{"role": "user", "content": q}], "rag": {"k": 5, "reader": "stuff"}, **gen} for q in qs]
        with httpx.Client(base_url=url, timeout=900) as http:
            for b in bodies[:2]:
                http.post("/v1/chat/completions", json=b)
            engine = http.get("/healthz").json().get("generator", {}).get("engine")
        one = asyncio.run(serve_bench.load(url, "/v1/chat/completions", bodies[:questions], 1, serve_bench.serve_processes()))
        many = asyncio.run(serve_bench.load(url, "/v1/chat/completions", bodies, clients, serve_bench.serve_processes()))
        out[label] = {"engine": engine, "one_client": one, f"{clients}_clients": many,
                      "concurrency_gain": many["tokens_per_s"] / one["tokens_per_s"], "memory": _generator_memory(app)}  # fmt: skip
        print(f"serve {label}: p50 {one['p50_s']:.2f} s, {one['tokens_per_s']:.1f} tok/s alone, "
              f"{many['tokens_per_s']:.1f} tok/s with {clients} clients, memory {out[label]['memory']}", flush=True)  # fmt: skip
        serve.delete(app)
    serve.shutdown()
    base = out["transformers f32"]
    for row in out.values():
        row["p50_ratio"] = row["one_client"]["p50_s"] / base["one_client"]["p50_s"]
        row["rss_ratio"] = row["memory"]["rss_mib"] / base["memory"]["rss_mib"]
        row["pss_ratio"] = row["memory"]["pss_mib"] / base["memory"]["pss_mib"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=OUT / "engines-bench")
    ap.add_argument("--parts", nargs="+", default=["speed", "identity", "batching", "quality", "serve"],
                    choices=["speed", "identity", "batching", "quality", "serve"])  # fmt: skip
    ap.add_argument("--prompts", type=int, default=10, help="RAG prompts for the speed part.")
    ap.add_argument("--identity-prompts", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--quality-limit", type=int, default=None, help="Questions of the eval set (default: all).")
    ap.add_argument("--serve-questions", type=int, default=8)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="Also write benchmarks/out/engines.json.")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    ensure_index(args.data_dir)
    paths = ensure_packages(args.data_dir)
    results: dict[str, Any] = {"machine": machine()}
    if {"speed", "identity", "batching"} & set(args.parts):
        gens = variants(paths)
        prompts = rag_prompts(args.data_dir, max(args.prompts, args.identity_prompts))
        if "speed" in args.parts:
            results["speed"] = speed(gens, prompts[: args.prompts], args.new_tokens)
            print(json.dumps(results["speed"], indent=1), flush=True)
        if "identity" in args.parts:
            results["identity"] = identity(gens, prompts[: args.identity_prompts])
            print(json.dumps(results["identity"]), flush=True)
        if "batching" in args.parts:
            results["batching"] = batching(gens, prompts, args.clients, args.new_tokens)
        for gen in gens.values():
            gen.close()
    if "quality" in args.parts:
        results["quality"] = quality(args.data_dir, paths, args.quality_limit)
    if "serve" in args.parts:
        results["serve"] = serve_part(args.data_dir, args.serve_questions, args.clients, args.new_tokens)
    results["machine"]["load_avg_end"] = os.getloadavg()
    if args.json:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "engines.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
