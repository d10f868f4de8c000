"""SFT training speed: ragops on Ray Train (1 and 2 workers) against the same TRL run in one process.

Every configuration trains the same LoRA adapter (r=16 on q/k/v/o) on the same RAG examples
for the same number of optimizer steps at the same global batch, on the real default model
(SmolLM2-135M-Instruct from the packaged GGUF, dequantized to float32 and cached once as
safetensors):

* ``plain``  — TRL's ``SFTTrainer`` in one plain process: no ragops, no Ray (the baseline);
* ``local``  — ``ragops.finetune.train`` with ``finetune.runner=local`` (in-process);
* ``ray1``   — Ray Train, 1 worker, per-worker batch = global batch;
* ``ray2``   — Ray Train, 2 workers with 1 CPU each, DDP over gloo, per-worker batch = global / 2.

``plain``, ``local`` and ``ray1`` use ``--threads`` torch threads (default 1, the same as each
``ray2`` worker): on a 2-core machine shared with other processes, a 2-thread OpenMP process
slows down several-fold whenever a core is taken (its threads spin at every barrier), which
would swamp the Ray overhead being measured. ``--threads 2`` measures that setting.

Each configuration runs in its own subprocess (a clean peak-memory reading, a fresh Ray), one
after the other. Reported per configuration: samples/s and tokens/s over the optimizer steps
(training time only: step start to step end), the median seconds per optimizer step (steps 3+,
warm-up excluded), the wall time of the whole command (imports, Ray start, data, model load,
checkpoints, publish) and the peak resident memory of the largest training process. The Ray
Train overhead is the wall-time difference to ``plain`` and the step-time ratio.

Usage::

    python benchmarks/train.py [--steps 12] [--batch 4] [--max-length 192] [--examples 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
REPO = Path(__file__).resolve().parent.parent
CONFIGS = ("plain", "local", "ray1", "ray2")

TOPICS = [
    ("GPU scheduling", "Ray reserves GPUs per actor with num_gpus, and fractional values share one device between actors."),
    ("vector storage", "Qdrant keeps dense and sparse vectors per point and fuses their rankings with reciprocal rank fusion."),
    ("ingestion", "Ray Data reads documents in parallel, chunks them by tokens and embeds batches on an actor pool."),
    ("checkpoints", "Ray Train persists every reported checkpoint to the run's storage path and restores the latest on failure."),
    ("serving", "Ray Serve scales replicas between a minimum and a maximum from the number of ongoing requests."),
    ("adapters", "A LoRA adapter adds low-rank updates to the attention projections and leaves the base weights frozen."),
]


def write_data(path: Path, n: int) -> Path:
    """RAG triples: a question, two passages, an answer found in the second passage."""
    rows = []
    for i in range(n):
        topic, fact = TOPICS[i % len(TOPICS)]
        other = TOPICS[(i + 3) % len(TOPICS)][1]
        rows.append(
            {
                "question": f"How does {topic} work in the platform (case {i})?",
                "answer": fact,
                "contexts": [other, f"Notes on {topic}: {fact}"],
            }
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def overrides(args: argparse.Namespace, config: str) -> list[str]:
    workers = 2 if config == "ray2" else 1
    return [
        f"finetune.runner={'local' if config in ('plain', 'local') else 'ray'}",
        "finetune.data.runner=local",
        f"finetune.workers={workers}",
        f"finetune.cpus_per_worker={1 if workers == 2 else args.threads}",
        f"finetune.sft.batch_size={args.batch // workers}",
        f"finetune.sft.max_steps={args.steps}",
        f"finetune.sft.max_length={args.max_length}",
        "finetune.sft.eval_fraction=0",
        f"finetune.sft.save_steps={args.steps}",
        "finetune.sft.learning_rate=0.0002",
        "finetune.sft.logging_steps=1",
        "finetune.lora.r=16",
    ]


# ---------------------------------------------------------------------------------------
# One configuration (runs in a subprocess)
# ---------------------------------------------------------------------------------------


def run_plain(settings: Any, data: Path, threads: int) -> dict[str, Any]:
    """TRL's SFTTrainer on the same examples, model and arguments, in this process."""
    import torch
    from datasets import Dataset
    from ragops.finetune.datasets import build_sft_examples
    from ragops.finetune.hf import LoopOptions, training_arguments
    from ragops.finetune.models import (
        load_model,
        load_tokenizer,
        lora_config,
        materialize_base,
        resolve_base,
    )
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(threads)
    ft = settings.finetune
    source = materialize_base(resolve_base(settings.generator.model), Path(settings.data_dir) / "cache" / "base-models")
    examples = build_sft_examples(data, settings).examples
    tok, model = load_tokenizer(source), load_model(source, task="causal-lm")
    step_times: list[float] = []

    class Steps(TrainerCallback):
        def on_step_begin(self, *a: Any, **k: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *a: Any, **k: Any) -> None:
            step_times.append(time.perf_counter() - self.t)

    opts = LoopOptions.from_settings(ft.sft.model_dump())
    import tempfile

    with tempfile.TemporaryDirectory() as out:
        targs = training_arguments(opts, output_dir=out, use_gpu=False, has_eval=False, num_to_keep=1, world_size=1)
        targs["save_strategy"] = "no"  # the baseline keeps no checkpoints
        args = SFTConfig(**targs, completion_only_loss=True)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(examples), processing_class=tok,
                             peft_config=lora_config(ft.lora, "causal-lm"), callbacks=[Steps()])  # fmt: skip
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    tokens = max((h.get("num_tokens", 0) for h in trainer.state.log_history), default=0)
    return {
        "steps": trainer.state.global_step,
        "step_times": step_times,
        "tokens": float(tokens),
        "train_time_s": sum(step_times),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_ragops(settings: Any, data: Path) -> dict[str, Any]:
    """``ragops train sft`` through the library (in-process or Ray Train)."""
    from ragops.finetune.train import train

    from ragops.runs import RunStore

    result = train(settings, "sft", data)
    rows = [r for r in RunStore.from_settings(settings).metrics(result.run.run_id) if "loss" in r]
    m = result.run.metrics
    return {
        "steps": m["global_step"],
        "step_times": [r["step_time_s"] for r in rows if "step_time_s" in r],
        "tokens": float(rows[-1].get("num_tokens", 0.0)) if rows else 0.0,
        "train_time_s": m.get("train_time_s", 0.0),
        "peak_rss_mb": max(m.get("peak_rss_mb", 0.0), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "artifact": result.artifact.name,
    }


def one(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from ragops.config import load_settings

    settings = load_settings([], [*overrides(args, args.one), "ray.num_cpus=2"], data_dir=args.home, environ={})
    load = os.getloadavg()[0]
    res = run_plain(settings, args.data, args.threads) if args.one == "plain" else run_ragops(settings, args.data)
    res["wall_s"] = time.perf_counter() - T0
    res["load_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def summarize(config: str, res: dict[str, Any], batch: int) -> dict[str, Any]:
    steady = res["step_times"][2:] or res["step_times"]
    train_s = res["train_time_s"] or sum(res["step_times"])
    return {
        "config": config,
        "steps": res["steps"],
        "samples_per_s": res["steps"] * batch / train_s if train_s else 0.0,
        "tokens_per_s": res["tokens"] / train_s if train_s else 0.0,
        "step_s_median": statistics.median(steady) if steady else 0.0,
        "train_s": train_s,
        "wall_s": res["wall_s"],
        "peak_rss_mb": res["peak_rss_mb"],
        "load_1min": res.get("load_1min"),
    }


def machine() -> dict[str, str]:
    model = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        model = next((ln.split(":", 1)[1].strip() for ln in lscpu.splitlines() if ln.startswith("Model name")), "")
    except OSError:
        pass
    import torch

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12, help="Optimizer steps per configuration.")
    parser.add_argument("--batch", type=int, default=4, help="Global batch (per-worker batch = batch / workers).")
    parser.add_argument("--max-length", type=int, default=192, help="Tokens per example (truncation).")
    parser.add_argument("--examples", type=int, default=64, help="Training examples.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of plain, local and ray1 (ray2: 1 per worker).")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"Comma-separated subset of {', '.join(CONFIGS)}.")
    parser.add_argument("--home", type=Path, default=REPO / "benchmarks" / "out" / "train-home", help="Data dir (model cache, runs).")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON.")
    parser.add_argument("--one", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args)
        return

    data = write_data(args.home / "bench-sft.jsonl", args.examples)
    info = machine()
    # Convert the GGUF once (outside the timed runs): every configuration loads the cached copy.
    from ragops.finetune.models import materialize_base, resolve_base

    from ragops.config import load_settings

    settings = load_settings([], [], data_dir=args.home, environ={})
    print("caching the base model ...", file=sys.stderr, flush=True)
    materialize_base(resolve_base(settings.generator.model), args.home / "cache" / "base-models")
    results = []
    for config in args.configs.split(","):
        cmd = [sys.executable, __file__, "--one", config, "--data", str(data), "--home", str(args.home),
               "--steps", str(args.steps), "--batch", str(args.batch), "--max-length", str(args.max_length),
               "--threads", str(args.threads)]  # fmt: skip
        print(f"running {config} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"configuration {config} failed")
        results.append(summarize(config, json.loads(line[len("RESULT "):]), args.batch))
    base = next((r for r in results if r["config"] == "plain"), None)
    for r in results:
        r["step_vs_plain"] = r["step_s_median"] / base["step_s_median"] if base and base["step_s_median"] else None
        r["wall_overhead_s"] = r["wall_s"] - base["wall_s"] if base else None
    if args.json:
        print(json.dumps({"machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("one", "data", "home")}, "results": results}, indent=2, default=str))
        return
    print(f"machine: nproc={info['nproc']} cpu={info['cpu']!r} python={info['python']} torch={info['torch']} load={info['load_avg_start']}")
    print(f"SFT LoRA r=16, {args.steps} steps, global batch {args.batch}, max_length {args.max_length}, {args.examples} examples, "
          f"{args.threads} thread(s) for plain/local/ray1")  # fmt: skip
    head = (f"{'config':<7} {'samples/s':>9} {'tokens/s':>9} {'s/step':>7} {'vs plain':>8} {'train s':>8} {'wall s':>7} "
            f"{'overhead s':>10} {'peak MB':>8} {'load 1m':>11}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in results:
        ratio = f"{r['step_vs_plain']:.2f}x" if r["step_vs_plain"] else "-"
        over = f"{r['wall_overhead_s']:+.1f}" if r["wall_overhead_s"] is not None else "-"
        load = "→".join(f"{x:.1f}" for x in r["load_1min"]) if r.get("load_1min") else "-"
        print(f"{r['config']:<7} {r['samples_per_s']:>9.2f} {r['tokens_per_s']:>9.1f} {r['step_s_median']:>7.2f} {ratio:>8} "
              f"{r['train_s']:>8.1f} {r['wall_s']:>7.1f} {over:>10} {r['peak_rss_mb']:>8.0f} {load:>11}")  # fmt: skip


if __name__ == "__main__":
    main()
