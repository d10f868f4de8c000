"""The closed loop's figures: routing overhead, the A/B verdict's accuracy, cold start from zero replicas.

Three parts, one run, on the embedded defaults (sample corpus, SmolLM2 on the configured engine):

* ``routing`` — chat p50 through a 2-variant split ÷ the same requests without one, on one
  Serve app, interleaved. Both variants are the base model (``ragops`` and its registry name),
  so the ratio isolates the routing (catalog lookup, hashing, variant in headers and log).
* ``ab`` — the verdict of :mod:`ragops.llmops.abtest` against users with known preferences on
  two real variants: the extractive reader's answers and the generator's (stuff reader) on the
  eval questions. A simulated user rates an answer up with probability 0.8 when it contains a
  reference answer and 0.3 otherwise, so each variant's true up-rate is known from its real
  answers. 200 seeded A/B tests, each stopped at the sample size the report says is enough;
  the verdict is right when it names the variant with the higher true up-rate.
* ``cold`` — the generator at ``min_replicas: 0`` with a short ``downscale_delay_s``: after it
  scaled to zero, seconds to the first streamed token of a chat, against the same request warm.

    python benchmarks/llmops.py [--parts routing ab cold] [--requests 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "benchmarks" / "out"
sys.path.insert(0, str(REPO / "benchmarks"))

from engines import ensure_index, machine, settings_for  # noqa: E402


def _questions(n: int) -> list[dict[str, Any]]:
    rows = [json.loads(x) for x in (REPO / "samples/eval/answers.jsonl").read_text().splitlines() if x.strip()]
    return rows[:n]


def _serve(settings: Any, app: str) -> str:
    from ray import serve

    import serve as serve_bench
    from ragops.raylocal import ensure_ray
    from ragops.serve.app import build_application
    from ragops.serve.auth import ApiKeys

    port = serve_bench.free_port()
    ensure_ray(settings.ray)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build_application(settings, keys=ApiKeys()), name=app, route_prefix="/")
    print(f"{app}: ready in {time.perf_counter() - t0:.1f} s", flush=True)
    return f"http://127.0.0.1:{port}"


def _first_token_s(http: Any, body: dict[str, Any]) -> tuple[float, float]:
    """(seconds to the first content chunk, seconds to the end) of a streamed chat."""
    t0 = time.perf_counter()
    first = None
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        for line in resp.iter_lines():
            if first is None and line.startswith("data: {") and '"content":"' in line.replace(" ", "") and '"content":""' not in line.replace(" ", ""):
                first = time.perf_counter() - t0
    return (first if first is not None else time.perf_counter() - t0), time.perf_counter() - t0


def routing_and_cold(data_dir: Path, requests: int, max_tokens: int, parts: list[str]) -> dict[str, Any]:
    import httpx
    from ray import serve

    from ragops.serve.models import ALIAS_TTL_S, ModelCatalog

    settings = settings_for(data_dir, "serve.generator.autoscaling.min_replicas=0",
                            "serve.generator.autoscaling.downscale_delay_s=20",
                            "serve.generator.autoscaling.upscale_delay_s=0")  # fmt: skip
    catalog = ModelCatalog(settings)
    catalog.set_route("ab-bench", None, by="benchmark")
    url = _serve(settings, "llmops-bench")
    out: dict[str, Any] = {}
    qs = [q["question"] for q in _questions(requests)]
    gen = {"max_tokens": max_tokens, "min_tokens": max_tokens, "temperature": 0, "rag": {"k": 5, "reader": "stuff"}}
    with httpx.Client(base_url=url, timeout=900) as http:
        if "routing" in parts:
            catalog.set_route("ab-bench", {"ragops": 0.5, settings.generator.model: 0.5}, by="benchmark")
            time.sleep(ALIAS_TTL_S + 0.5)
            for q in qs[:2]:  # warm both paths
                http.post("/v1/chat/completions", json={"model": "ragops", "messages": [{"role": "user", "content": q}], **gen})
            plain, split, variants = [], [], {}
            for i, q in enumerate(qs):
                order = ("ragops", "ab-bench") if i % 2 == 0 else ("ab-bench", "ragops")
                for model in order:
                    t0 = time.perf_counter()
                    r = http.post("/v1/chat/completions", json={"model": model, "messages": [{"role": "user", "content": q}],
                                                                 "user": f"bench-{i}", **gen})  # fmt: skip
                    r.raise_for_status()
                    (split if model == "ab-bench" else plain).append(time.perf_counter() - t0)
                    if model == "ab-bench":
                        variants[r.headers["x-ragops-variant"]] = variants.get(r.headers["x-ragops-variant"], 0) + 1
            out["routing"] = {"requests_each": len(qs), "p50_plain_s": statistics.median(plain),
                              "p50_split_s": statistics.median(split), "variants": variants,
                              "ratio": statistics.median(split) / statistics.median(plain)}  # fmt: skip
            print(f"routing: p50 {out['routing']['p50_split_s']:.3f} s split vs {out['routing']['p50_plain_s']:.3f} s "
                  f"plain = {out['routing']['ratio']:.3f}, variants {variants}", flush=True)  # fmt: skip
            catalog.set_route("ab-bench", None, by="benchmark")
        if "cold" in parts:
            body = {"model": "ragops", "messages": [{"role": "user", "content": qs[0]}], **gen}
            warm = [_first_token_s(http, body) for _ in range(3)]
            t0 = time.perf_counter()
            while True:  # wait for the autoscaler to take the generator to zero
                replicas = http.get("/healthz").json().get("replicas", {}).get("Generator")
                if replicas == 0:
                    break
                if time.perf_counter() - t0 > 300:
                    raise RuntimeError("the generator did not scale to zero in 300 s")
                time.sleep(2)
            idle_s = time.perf_counter() - t0
            health = http.get("/healthz").json()
            cold = _first_token_s(http, body)
            out["cold"] = {"warm_first_token_s": statistics.median(w[0] for w in warm), "warm_total_s": statistics.median(w[1] for w in warm),
                           "cold_first_token_s": cold[0], "cold_total_s": cold[1], "scaled_to_zero_after_s": idle_s,
                           "healthz_at_zero": {"status": health.get("status"), "generator": health.get("generator")}}  # fmt: skip
            print(f"cold start: first token {cold[0]:.2f} s (warm {out['cold']['warm_first_token_s']:.2f} s), "
                  f"scaled to zero {idle_s:.0f} s after the last request", flush=True)  # fmt: skip
    serve.shutdown()
    return out


def variant_answers(data_dir: Path, questions: int) -> dict[str, list[bool]]:
    """Whether each variant's real answer contains a reference answer, per eval question (cached)."""
    from ragops.retrieval.metrics import answer_contains
    from ragops.retrieval.rag import RAGPipeline

    cache = OUT / f"llmops-ab-answers-{questions}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    contains: dict[str, list[bool]] = {"extractive": [], "stuff": []}
    with RAGPipeline(settings_for(data_dir)) as rag:
        for row in _questions(questions):
            for reader in contains:
                ans = rag.ask(row["question"], k=5, reader=reader)
                contains[reader].append(bool(answer_contains(ans.answer, row["answers"])))
    OUT.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(contains))
    return contains


def ab_simulation(data_dir: Path, questions: int, seeds: int, min_effect: float,
                  rates: dict[str, float] | None = None) -> dict[str, Any]:  # fmt: skip
    """The seeded A/B tests. ``rates`` (true up-rates measured by an earlier run) skips answering again:
    a rating draws a question uniformly, so a variant's ratings are Bernoulli(its mean up-rate) either way."""
    from ragops.llmops.abtest import decide, ratings_needed

    if rates:
        contains = {r: [(p - 0.3) / 0.5] for r, p in rates.items()}
    else:
        contains = variant_answers(data_dir, questions)
    rows = contains["stuff"]
    p_up = {r: [0.3 + 0.5 * c for c in cs] for r, cs in contains.items()}
    true_rate = {r: statistics.fmean(ps) for r, ps in p_up.items()}
    a, b = "stuff", "extractive"  # A: the generator's answers (control), B: the extractive reader
    truth = "B better" if true_rate[b] > true_rate[a] else "B worse"
    need = ratings_needed(min_effect)
    right = 0
    for seed in range(seeds):
        rng = random.Random(seed)
        ups = {}
        for variant in (a, b):  # each rating: a random eval question, the user's known preference
            ups[variant] = sum(rng.random() < p_up[variant][rng.randrange(len(rows))] for _ in range(need))
        right += decide(ups[a], need, ups[b], need, min_effect=min_effect)["verdict"] == truth
    out = {"questions": len(rows), "answers_cache": str(OUT / f"llmops-ab-answers-{questions}.json"), "contains": {r: statistics.fmean(c) for r, c in contains.items()}, "true_up_rate": true_rate,
           "difference": true_rate[b] - true_rate[a], "min_effect": min_effect, "ratings_per_variant": need,
           "seeds": seeds, "right": right, "accuracy": right / seeds, "truth": truth}  # fmt: skip
    print(f"A/B simulation: true up-rates {true_rate}, {need} ratings per variant, verdict right in {right}/{seeds}", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", type=Path, default=OUT / "llmops-bench")
    ap.add_argument("--parts", nargs="+", default=["routing", "ab", "cold"], choices=["routing", "ab", "cold"])
    ap.add_argument("--requests", type=int, default=20, help="Chat requests per arm for the routing part.")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--ab-questions", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=200)
    ap.add_argument("--min-effect", type=float, default=0.1)
    ap.add_argument("--ab-rates", default=None, help="extractive=P,stuff=P: true up-rates from an earlier run (no answering).")
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not args.ab_rates or {"routing", "cold"} & set(args.parts):
        ensure_index(args.data_dir)
    result: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv)}
    if "ab" in args.parts:
        rates = {k: float(v) for k, v in (p.split("=") for p in args.ab_rates.split(","))} if args.ab_rates else None
        result["ab"] = ab_simulation(args.data_dir, args.ab_questions, args.seeds, args.min_effect, rates)
    if {"routing", "cold"} & set(args.parts):
        result.update(routing_and_cold(args.data_dir, args.requests, args.max_tokens, args.parts))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "llmops.json").write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=2, default=str))


if __name__ == "__main__":
    main()
