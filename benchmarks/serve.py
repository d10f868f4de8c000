"""Serving benchmark: latency, throughput, batching gain and memory of the Ray Serve app.

With the default models (``minilm-l6`` embedder, ``smollm2-135m-instruct`` generator) on the
sample corpus (``samples/docs``), it measures:

1. ``POST /v1/search`` and ``POST /v1/chat/completions`` (``max_tokens`` 32, greedy,
   non-streaming, ``min_tokens`` 32 so every answer has the same length) at several numbers of
   concurrent clients: p50/p99 latency, requests/s and, for chat, generated tokens/s, plus the
   CPU time the Serve processes spent (a measure that neighbours on a shared machine do not
   inflate). Each client sends its requests back to back.
2. The cost of serving: chat p50 through HTTP (one client) against the same pipeline called
   in-process (:meth:`RAGPipeline.ask`, same questions, k, options), in the same run. The
   in-process pipeline searches a copy of the index (an Edge shard can be open in one process
   only) and the two alternate question by question, so background load hits both alike.
3. Dynamic batching: total tokens/s with 8 concurrent clients over tokens/s with one, with the
   default 5 passages (long prompts: prefill, which batching does not share, dominates) and
   with one passage (short prompts: decoding dominates).
4. Memory, with psutil: resident set size (RSS) summed, and proportional set size (PSS,
   shared pages split between processes), of (a) the app's actors (Serve controller, proxy,
   replicas) and (b) the whole Ray session: every process of this run's Ray (GCS server,
   raylet, dashboard and its agents, autoscaler monitor, log monitor, every worker, idle ones
   included), found by the session directory on their command lines and their descendants.
   The driver (this script) is reported apart: here it also holds the in-process baseline
   pipeline, which ``ragops serve``'s driver does not.

Usage::

    python benchmarks/serve.py [--concurrency 1 4 8 16] [--chat-per-client 1] [--search-per-client 20]
                               [--compare-questions 8] [--max-tokens 32] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
SERVE_PROCESS_PREFIXES = ("ray::ServeController", "ray::ProxyActor", "ray::ServeReplica")


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def questions(n: int) -> list[str]:
    """Questions of the sample eval set (cycled when more are asked for)."""
    rows = [json.loads(line)["question"] for line in (REPO / "samples/eval/answers.jsonl").read_text().splitlines() if line.strip()]
    return [rows[i % len(rows)] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_processes() -> list[psutil.Process]:
    """This run's Ray Serve processes (controller, proxy, replicas): descendants of this driver."""
    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(SERVE_PROCESS_PREFIXES):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return out


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User + system CPU time consumed so far by ``procs``."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def ray_session_processes(session_dir: str | None) -> list[psutil.Process]:
    """Every process of this run's Ray session except the driver.

    Ray's own processes name the session directory on their command lines (GCS server, raylet,
    dashboard, monitors); workers and agents are the raylet's children, whose titles
    (``ray::...``) no longer show it, hence the descendants. Processes this driver started
    (a local Ray starts its GCS server, raylet and monitors as children) count too. Other Ray
    sessions on the machine have other session directories and are left out.
    """
    me = psutil.Process()
    roots: dict[int, psutil.Process] = {p.pid: p for p in me.children(recursive=True)}
    if session_dir:
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != me.pid and session_dir in " ".join(p.info["cmdline"] or ()):
                roots[p.pid] = p
    found = dict(roots)
    for p in roots.values():
        try:
            found.update({c.pid: c for c in p.children(recursive=True)})
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(me.pid, None)
    return list(found.values())


def _label(p: psutil.Process) -> str:
    """``ray::Actor`` titles as they are; binaries and scripts by file name."""
    cmd = p.cmdline()
    if cmd and cmd[0].startswith("ray::"):
        return cmd[0].strip()
    script = next((a for a in cmd[1:3] if a.endswith(".py")), None)
    return os.path.basename(script or (cmd[0] if cmd else p.name()))


def _memory_rows(procs: list[psutil.Process]) -> list[dict[str, Any]]:
    rows = []
    for p in procs:
        try:
            info = p.memory_full_info()
            rows.append({"process": _label(p), "pid": p.pid, "rss_mib": info.rss / 2**20,
                         "pss_mib": getattr(info, "pss", 0) / 2**20, "nice": p.nice()})  # fmt: skip
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return sorted(rows, key=lambda r: -r["rss_mib"])


def serve_memory(session_dir: str | None) -> dict[str, Any]:
    """RSS and PSS (MiB) of the app's actors, of the whole Ray session, and of the driver."""
    app = _memory_rows(serve_processes())
    session = _memory_rows(ray_session_processes(session_dir))
    driver = _memory_rows([psutil.Process()])
    return {
        "processes": app,
        "rss_total_mib": sum(r["rss_mib"] for r in app),
        "pss_total_mib": sum(r["pss_mib"] for r in app),
        "session_processes": session,
        "session_rss_total_mib": sum(r["rss_mib"] for r in session),
        "session_pss_total_mib": sum(r["pss_mib"] for r in session),
        "driver_rss_mib": driver[0]["rss_mib"] if driver else 0.0,
        "driver_pss_mib": driver[0]["pss_mib"] if driver else 0.0,
    }


def ray_session_dir() -> str | None:
    """This driver's Ray session directory (None when Ray does not say)."""
    import ray

    try:
        return ray._private.worker.global_worker.node.get_session_dir_path()  # no public accessor in Ray 2.60
    except AttributeError:
        return None


async def load(url: str, path: str, bodies: list[dict[str, Any]], clients: int, procs: list[psutil.Process]) -> dict[str, Any]:
    """``clients`` concurrent clients split ``bodies`` and send them back to back.

    ``procs`` (the Serve processes) are charged the CPU time spent serving the run.
    """
    latencies: list[float] = []
    tokens = 0
    errors = 0
    failed: dict[int, int] = {}
    prompt_tokens: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=1200) as http:

        async def client(mine: list[dict[str, Any]]) -> None:
            nonlocal tokens, errors
            for body in mine:
                t0 = time.perf_counter()
                r = await http.post(path, json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1
                    failed[r.status_code] = failed.get(r.status_code, 0) + 1
                    continue
                usage = r.json().get("usage", {})
                tokens += usage.get("completion_tokens", 0)
                prompt_tokens.append(usage.get("prompt_tokens", 0))

        cpu0, started = cpu_seconds(procs), time.perf_counter()
        await asyncio.gather(*(client(bodies[i::clients]) for i in range(clients)))
        wall = time.perf_counter() - started
        cpu = cpu_seconds(procs) - cpu0
    return {
        "clients": clients,
        "requests": len(bodies),
        "errors": errors,
        "error_statuses": failed,
        "p50_s": percentile(latencies, 50),
        "p99_s": percentile(latencies, 99),
        "requests_per_s": len(bodies) / wall,
        "tokens": tokens,
        "prompt_tokens_p50": statistics.median(prompt_tokens) if prompt_tokens else 0,
        "tokens_per_s": tokens / wall,
        "wall_s": wall,
        "serve_cpu_s": cpu,
        "tokens_per_cpu_s": tokens / cpu if cpu else 0.0,
    }


def prepare(args: argparse.Namespace) -> Any:
    from ragops.config import load_settings
    from ragops.ingest.pipeline import run_ingest

    # A long time limit: under heavy load a request should be measured, not cut off at 120 s.
    settings = load_settings([], ["ingest.runner=local", "serve.request_timeout_s=900"], data_dir=args.data_dir)
    report = run_ingest(settings, [str(REPO / "samples/docs")])
    print(f"index: {report.to_dict()['documents']} documents, {report.to_dict()['chunks']} chunks "
          f"({report.to_dict()['new']} new)", flush=True)  # fmt: skip
    return settings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=OUT / "serve-bench")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--chat-per-client", type=int, default=1, help="Chat requests per client (at least 8 in total).")
    ap.add_argument("--search-per-client", type=int, default=20, help="Search requests per client (at least 40 in total).")
    ap.add_argument("--compare-questions", type=int, default=8, help="Questions for HTTP vs in-process.")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--json", action="store_true", help="Also write benchmarks/out/serve.json.")
    args = ap.parse_args()

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from ray import serve

    from ragops.raylocal import ensure_ray
    from ragops.retrieval.rag import RAGPipeline
    from ragops.serve.app import build_application
    from ragops.serve.auth import ApiKeys

    settings = prepare(args)
    # The in-process baseline searches a copy of the index: the serving retriever holds the original.
    copy_dir = args.data_dir.with_name(args.data_dir.name + "-inprocess")
    shutil.rmtree(copy_dir, ignore_errors=True)
    shutil.copytree(args.data_dir, copy_dir)
    local = RAGPipeline(settings.model_copy(update={"data_dir": copy_dir}))
    t0 = time.perf_counter()
    local.warm_up()
    print(f"in-process pipeline loaded in {time.perf_counter() - t0:.1f} s (torch threads {torch.get_num_threads()})", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    ensure_ray(settings.ray)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_application(settings, keys=ApiKeys()), name="ragops-bench", route_prefix="/")
    print(f"app ready in {time.perf_counter() - t0:.1f} s at {url}", flush=True)
    results: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(),
            "ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_start": os.getloadavg(),
        },
        "max_tokens": args.max_tokens,
    }
    try:
        gen = {"max_tokens": args.max_tokens, "temperature": 0}
        with httpx.Client(base_url=url, timeout=600) as http:
            for q in questions(2):  # warm-up: first-call costs out of the measurements
                http.post("/v1/chat/completions", json={"model": "ragops", "messages": [{"role": "user", "content": q}], **gen})
                http.post("/v1/search", json={"query": q, "k": 5})
                local.ask(q, k=5, max_new_tokens=args.max_tokens, temperature=0)

            # 1. HTTP vs in-process, alternating question by question.
            # CPU seconds as well as wall time: on a shared machine wall time also measures the
            # neighbours, CPU time only the work each path does (HTTP: every Serve process plus
            # this client; in-process: this process).
            procs = [*serve_processes(), psutil.Process()]
            me = [psutil.Process()]
            http_s, local_s, http_gen, local_gen, http_cpu, local_cpu, same = [], [], [], [], [], [], 0
            for q in questions(args.compare_questions):
                c0, t0 = cpu_seconds(procs), time.perf_counter()
                r = http.post("/v1/chat/completions", json={"model": "ragops", "messages": [{"role": "user", "content": q}], **gen})
                http_s.append(time.perf_counter() - t0)
                http_cpu.append(cpu_seconds(procs) - c0)
                http_gen.append(r.json()["ragops"]["timings"]["generate_s"])
                c0, t0 = cpu_seconds(me), time.perf_counter()
                a = local.ask(q, k=5, max_new_tokens=args.max_tokens, temperature=0)
                local_s.append(time.perf_counter() - t0)
                local_cpu.append(cpu_seconds(me) - c0)
                local_gen.append(a.timings["generate_s"])
                same += r.json()["choices"][0]["message"]["content"] == a.answer
            results["http_vs_inprocess"] = {
                "questions": len(http_s),
                "http_p50_s": statistics.median(http_s),
                "inprocess_p50_s": statistics.median(local_s),
                "ratio_p50": statistics.median(http_s) / statistics.median(local_s),
                # Generation alone (reader call, prefill included), as each side reports it.
                "http_generate_p50_s": statistics.median(http_gen),
                "inprocess_generate_p50_s": statistics.median(local_gen),
                "http_cpu_p50_s": statistics.median(http_cpu),
                "inprocess_cpu_p50_s": statistics.median(local_cpu),
                "cpu_ratio_p50": statistics.median(http_cpu) / statistics.median(local_cpu),
                "identical_answers": same,
            }
            print(json.dumps(results["http_vs_inprocess"]), flush=True)
        local.close()

        # 2. Load at several concurrencies.
        results["search"], results["chat"] = [], []
        for c in args.concurrency:
            n = max(40, c * args.search_per_client)
            bodies = [{"query": q, "k": 5} for q in questions(n)]
            res = asyncio.run(load(url, "/v1/search", bodies, c, serve_processes()))
            results["search"].append(res)
            print("search", json.dumps(res), flush=True)
        # Every answer is exactly max_tokens long (min_tokens), so tokens/s compare across runs.
        fixed = {**gen, "min_tokens": args.max_tokens}
        for c in args.concurrency:
            n = max(8, c * args.chat_per_client)
            bodies = [{"model": "ragops", "messages": [{"role": "user", "content": q}], **fixed} for q in questions(n)]
            res = asyncio.run(load(url, "/v1/chat/completions", bodies, c, serve_processes()))
            results["chat"].append(res)
            print("chat", json.dumps(res), flush=True)
        by_c = {r["clients"]: r for r in results["chat"]}
        if 1 in by_c and 8 in by_c:
            results["batching_gain_8_vs_1"] = by_c[8]["tokens_per_s"] / by_c[1]["tokens_per_s"]
            results["batching_gain_per_cpu_8_vs_1"] = by_c[8]["tokens_per_cpu_s"] / by_c[1]["tokens_per_cpu_s"]
        # The same with one passage: a short prompt, so decoding (what batching shares) dominates.
        results["chat_k1"] = []
        for c in (1, 8):
            bodies = [{"model": "ragops", "messages": [{"role": "user", "content": q}], "rag": {"k": 1}, **fixed}
                      for q in questions(max(8, c * args.chat_per_client))]  # fmt: skip
            res = asyncio.run(load(url, "/v1/chat/completions", bodies, c, serve_processes()))
            results["chat_k1"].append(res)
            print("chat k=1", json.dumps(res), flush=True)
        k1 = {r["clients"]: r for r in results["chat_k1"]}
        results["batching_gain_k1_8_vs_1"] = k1[8]["tokens_per_s"] / k1[1]["tokens_per_s"]
        results["batching_gain_k1_per_cpu_8_vs_1"] = k1[8]["tokens_per_cpu_s"] / k1[1]["tokens_per_cpu_s"]

        # 3. Memory of the Serve processes (models loaded, after load).
        results["memory"] = serve_memory(ray_session_dir())
        results["machine"]["load_avg_end"] = os.getloadavg()
    finally:
        serve.shutdown()
    report(results)
    if args.json:
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "serve.json").write_text(json.dumps(results, indent=2))


def report(r: dict[str, Any]) -> None:
    m = r["machine"]
    print(f"\nmachine: {m['cpus']} CPUs ({m['cpu']}), {m['ram_gib']} GiB, Python {m['python']}, torch {m['torch']}; "
          f"load average {m['load_avg_start'][0]:.1f} at start, {m.get('load_avg_end', [float('nan')])[0]:.1f} at end")  # fmt: skip
    c = r["http_vs_inprocess"]
    print(f"\nchat p50, max_tokens {r['max_tokens']}, {c['questions']} questions: HTTP {c['http_p50_s']:.3f} s, "
          f"in-process RAGPipeline.ask {c['inprocess_p50_s']:.3f} s, ratio {c['ratio_p50']:.3f} "
          f"(identical answers: {c['identical_answers']}/{c['questions']}); generation alone: served "
          f"{c['http_generate_p50_s']:.3f} s, in-process {c['inprocess_generate_p50_s']:.3f} s; CPU seconds per "
          f"request: HTTP {c['http_cpu_p50_s']:.3f}, in-process {c['inprocess_cpu_p50_s']:.3f}, ratio {c['cpu_ratio_p50']:.3f}")  # fmt: skip
    print("\n| endpoint | clients | requests | p50 (s) | p99 (s) | requests/s | tokens/s | Serve CPU s | tokens/CPU s | errors |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("search", "chat", "chat_k1"):
        for x in r.get(name, []):
            tps = f"{x['tokens_per_s']:.1f}" if name != "search" else "-"
            tpc = f"{x['tokens_per_cpu_s']:.1f}" if name != "search" else "-"
            print(f"| {name} | {x['clients']} | {x['requests']} | {x['p50_s']:.3f} | {x['p99_s']:.3f} | "
                  f"{x['requests_per_s']:.2f} | {tps} | {x['serve_cpu_s']:.1f} | {tpc} | {x['errors']} |")  # fmt: skip
    if "batching_gain_8_vs_1" in r:
        print(f"\nbatching, k=5: 8 clients / 1 client: total tokens/s {r['batching_gain_8_vs_1']:.2f}x, "
              f"tokens per Serve CPU second {r['batching_gain_per_cpu_8_vs_1']:.2f}x")
    if "batching_gain_k1_8_vs_1" in r:
        print(f"batching, k=1: 8 clients / 1 client: total tokens/s {r['batching_gain_k1_8_vs_1']:.2f}x, "
              f"tokens per Serve CPU second {r['batching_gain_k1_per_cpu_8_vs_1']:.2f}x")
    mem = r["memory"]
    print(f"\nApp actors (Serve controller, proxy, replicas): RSS {mem['rss_total_mib']:.0f} MiB in total, "
          f"PSS {mem['pss_total_mib']:.0f} MiB")  # fmt: skip
    for p in mem["processes"]:
        print(f"  {p['process']:<44} RSS {p['rss_mib']:7.0f} MiB  PSS {p['pss_mib']:7.0f} MiB  nice {p['nice']}")
    if "session_processes" in mem:
        rows = mem["session_processes"]
        print(f"Whole Ray session ({len(rows)} processes, driver excluded): RSS {mem['session_rss_total_mib']:.0f} MiB, "
              f"PSS {mem['session_pss_total_mib']:.0f} MiB; with the driver (this script, which also holds the "
              f"in-process baseline): RSS {mem['session_rss_total_mib'] + mem['driver_rss_mib']:.0f} MiB, "
              f"PSS {mem['session_pss_total_mib'] + mem['driver_pss_mib']:.0f} MiB")  # fmt: skip
        others = [p for p in rows if p["pid"] not in {q["pid"] for q in mem["processes"]}]
        for p in others:
            print(f"  {p['process']:<44} RSS {p['rss_mib']:7.0f} MiB  PSS {p['pss_mib']:7.0f} MiB")
        print(f"  driver{'':<38} RSS {mem['driver_rss_mib']:7.0f} MiB  PSS {mem['driver_pss_mib']:7.0f} MiB")


if __name__ == "__main__":
    main()
