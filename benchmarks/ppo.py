"""PPO step time on the default model: where a step goes, rollout speed against bare generate(), 1 vs 2 workers.

Every configuration runs in its own subprocess, one after the other, on the real default model
(SmolLM2-135M-Instruct from the packaged GGUF, dequantized to float32 and cached once as
safetensors), with one torch thread per process (see ``benchmarks/train.py`` for why):

* ``generate`` — the baseline: the bare transformers model (no adapter, no ragops, no Ray)
  sampling answers for the same prompts, batch and generation settings with ``generate()``;
* ``ppo1`` — ``ragops train ppo`` on Ray Train, 1 worker, ``--batch`` prompts per step;
* ``ppo2`` — the same global batch on 2 workers (half the prompts each, DDP over gloo).

Per PPO configuration, from the run's per-step metrics (median over steps 2+, step 1 warms
up): seconds per step split into rollout (sampling), scoring (the ``rag`` reward), the
no-gradient forward (policy log-probs + values, and the reference = adapter disabled) and the
update (``ppo_epochs`` × minibatches of forward + backward + AdamW); rollout tokens/s against
``generate`` (ratio), and prompts/s against ``ppo1`` (ratio).

Usage::

    python benchmarks/ppo.py [--steps 4] [--batch 4] [--max-new-tokens 32] [--epochs 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("generate", "ppo1", "ppo2")
PHASES = ("time_rollout_s", "time_score_s", "time_forward_s", "time_update_s")

FACTS = [
    ("GPU scheduling", "Ray reserves GPUs per actor with num_gpus, and fractional values share one device between actors."),
    ("vector storage", "Qdrant keeps dense and sparse vectors per point and fuses their rankings with reciprocal rank fusion."),
    ("ingestion", "Ray Data reads documents in parallel, chunks them by tokens and embeds batches on an actor pool."),
    ("checkpoints", "Ray Train persists every reported checkpoint to the run's storage path and restores the latest on failure."),
    ("serving", "Ray Serve scales replicas between a minimum and a maximum from the number of ongoing requests."),
    ("adapters", "A LoRA adapter adds low-rank updates to the attention projections and leaves the base weights frozen."),
]


def write_prompts(path: Path, n: int) -> Path:
    """RAG prompts: a question over two passages, the fact in the second."""
    rows = []
    for i in range(n):
        topic, fact = FACTS[i % len(FACTS)]
        other = FACTS[(i + 3) % len(FACTS)][1]
        rows.append({"question": f"How does {topic} work in the platform (case {i})?", "contexts": [other, f"Notes on {topic}: {fact}"]})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def overrides(args: argparse.Namespace, workers: int) -> list[str]:
    return [
        "finetune.runner=ray",
        "finetune.data.runner=local",
        f"finetune.workers={workers}",
        "finetune.cpus_per_worker=1",
        f"finetune.ppo.batch_size={args.batch // workers}",
        f"finetune.ppo.minibatch_size={max(1, args.batch // workers // 2)}",
        f"finetune.ppo.ppo_epochs={args.epochs}",
        f"finetune.ppo.max_new_tokens={args.max_new_tokens}",
        f"finetune.ppo.max_steps={args.steps}",
        f"finetune.ppo.save_steps={args.steps}",
        "finetune.ppo.reward.name=rag",
        "finetune.lora.r=16",
        "ray.num_cpus=2",
    ]


# ---------------------------------------------------------------------------------------
# One configuration (runs in a subprocess)
# ---------------------------------------------------------------------------------------


def run_generate(settings: Any, prompts: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Bare ``generate()`` of the base model on the prompts PPO samples at its steps 2..N."""
    import torch
    from ragops.finetune.models import (
        load_model,
        load_tokenizer,
        materialize_base,
        resolve_base,
    )
    from ragops.finetune.ppo import encode_prompts, step_prompts
    from ragops.finetune.prompts import build_ppo_prompts
    from transformers import GenerationConfig

    torch.set_num_threads(1)
    source = materialize_base(resolve_base(settings.generator.model), Path(settings.data_dir) / "cache" / "base-models")
    tok, model = load_tokenizer(source), load_model(source, task="causal-lm").eval()
    examples = build_ppo_prompts(prompts, settings, runner="local").examples
    ids = encode_prompts(tok, [e["prompt"] for e in examples], settings.finetune.ppo.max_prompt_tokens)
    eos = {tok.eos_token_id, *([model.generation_config.eos_token_id] if isinstance(model.generation_config.eos_token_id, int) else (model.generation_config.eos_token_id or []))}
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
                           pad_token_id=tok.pad_token_id, eos_token_id=sorted(e for e in eos if e is not None))  # fmt: skip
    rates = []
    for step in range(1, args.steps + 1):
        batch = [ids[i] for i in step_prompts(len(ids), step, 0, args.batch, 1, settings.finetune.ppo.seed)]
        width = max(map(len, batch))
        x = torch.full((len(batch), width), tok.pad_token_id)
        attn = torch.zeros((len(batch), width), dtype=torch.long)
        for i, p in enumerate(batch):
            x[i, width - len(p) :], attn[i, width - len(p) :] = torch.tensor(p), 1
        torch.manual_seed(step)
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=attn, generation_config=gen)
        seconds = time.perf_counter() - t
        resp = out[:, width:]
        # Count what PPO counts: tokens up to and including the first EOS.
        n = 0
        for row in resp.tolist():
            ends = [j for j, t_ in enumerate(row) if t_ in eos]
            n += (ends[0] + 1) if ends else len(row)
        rates.append({"tokens": n, "seconds": seconds})
    steady = rates[1:] or rates
    return {"rollout_tokens_per_s": sum(r["tokens"] for r in steady) / sum(r["seconds"] for r in steady), "per_step": rates}


def run_ppo(settings: Any, prompts: Path) -> dict[str, Any]:
    """``ragops train ppo`` through the library; per-step metrics from the run."""
    from ragops.finetune.ppo_train import train_ppo

    from ragops.runs import RunStore

    result = train_ppo(settings, prompts)
    rows = [r for r in RunStore.from_settings(settings).metrics(result.run.run_id) if "reward" in r]
    return {"rows": rows, "metrics": result.run.metrics}


def one(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ragops.config import load_settings

    workers = 2 if args.one == "ppo2" else 1
    settings = load_settings([], overrides(args, workers), data_dir=args.home, environ={})
    load = os.getloadavg()[0]
    res = run_generate(settings, args.prompts, args) if args.one == "generate" else run_ppo(settings, args.prompts)
    res["wall_s"] = time.perf_counter() - T0
    res["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    print("RESULT " + json.dumps(res, default=str))


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def summarize(config: str, res: dict[str, Any], batch: int) -> dict[str, Any]:
    if config == "generate":
        return {"config": config, "rollout_tokens_per_s": res["rollout_tokens_per_s"], "wall_s": res["wall_s"], "load_1min": res["load_1min"]}
    rows = res["rows"][1:] or res["rows"]
    med = {k: statistics.median(r[k] for r in rows) for k in (*PHASES, "step_time_s", "rollout_tokens_per_s", "response_len")}
    return {
        "config": config,
        "steps": len(res["rows"]),
        **med,
        "prompts_per_s": batch / med["step_time_s"],
        "share": {k: med[k] / med["step_time_s"] for k in PHASES},
        "peak_rss_mb": res["metrics"].get("peak_rss_mb"),
        "wall_s": res["wall_s"],
        "load_1min": res["load_1min"],
    }


def machine() -> dict[str, str]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    import torch

    return {"nproc": str(os.cpu_count()), "cpu": model, "python": platform.python_version(), "torch": torch.__version__,
            "load_avg_start": " ".join(f"{x:.2f}" for x in os.getloadavg())}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="PPO steps per configuration (step 1 is warm-up).")
    parser.add_argument("--batch", type=int, default=4, help="Prompts per step, all workers together.")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="Answer length cap.")
    parser.add_argument("--epochs", type=int, default=2, help="PPO epochs per rollout batch.")
    parser.add_argument("--prompts", type=int, default=24, help="Distinct prompts.")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"Comma-separated subset of {', '.join(CONFIGS)}.")
    parser.add_argument("--home", type=Path, default=REPO / "benchmarks" / "out" / "ppo-home", help="Data dir (model cache, runs).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--prompts-file", dest="prompts_path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.prompts = args.prompts_path
        one(args)
        return

    prompts = write_prompts(args.home / "bench-prompts.jsonl", args.prompts)
    info = machine()
    from ragops.finetune.models import materialize_base, resolve_base

    from ragops.config import load_settings

    settings = load_settings([], [], data_dir=args.home, environ={})
    print("caching the base model ...", file=sys.stderr, flush=True)
    materialize_base(resolve_base(settings.generator.model), args.home / "cache" / "base-models")
    results = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", config, "--prompts-file", str(prompts), "--home", str(args.home),
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
               "--epochs", str(args.epochs)]  # fmt: skip
        print(f"running {config} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {config} failed")
        results.append(summarize(config, json.loads(line[len("RESULT "):]), args.batch))
    bare = next((r for r in results if r["config"] == "generate"), None)
    one_worker = next((r for r in results if r["config"] == "ppo1"), None)
    for r in results:
        if r["config"] == "generate":
            continue
        r["rollout_vs_generate"] = r["rollout_tokens_per_s"] / bare["rollout_tokens_per_s"] if bare else None
        r["speed_vs_ppo1"] = r["prompts_per_s"] / one_worker["prompts_per_s"] if one_worker else None
    if args.json:
        print(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("one", "prompts_path", "home")},
                          "results": results}, indent=2, default=str))  # fmt: skip
        return
    print(f"machine: nproc={info['nproc']} cpu={info['cpu']!r} python={info['python']} torch={info['torch']} load={info['load_avg_start']}")
    print(f"PPO LoRA r=16, {args.steps} steps, {args.batch} prompts/step, {args.epochs} epochs, max_new_tokens {args.max_new_tokens}, reward rag")
    if bare:
        print(f"generate (baseline): {bare['rollout_tokens_per_s']:.1f} tokens/s, load {bare['load_1min']}")
    head = (f"{'config':<6} {'s/step':>7} {'rollout':>8} {'score':>6} {'fwd':>6} {'update':>7} {'roll tok/s':>10} "
            f"{'vs generate':>11} {'prompts/s':>9} {'vs ppo1':>7} {'wall s':>7} {'load 1m':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in results:
        if r["config"] == "generate":
            continue
        load = "→".join(f"{x:.1f}" for x in r["load_1min"])
        print(f"{r['config']:<6} {r['step_time_s']:>7.2f} {r['time_rollout_s']:>8.2f} {r['time_score_s']:>6.3f} {r['time_forward_s']:>6.2f} "
              f"{r['time_update_s']:>7.2f} {r['rollout_tokens_per_s']:>10.1f} {r['rollout_vs_generate'] or 0:>10.2f}x "
              f"{r['prompts_per_s']:>9.3f} {r['speed_vs_ppo1'] or 0:>6.2f}x {r['wall_s']:>7.1f} {load:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
