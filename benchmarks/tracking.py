"""MLflow tracking overhead on training: median optimizer-step time with tracking ÷ without.

The same in-process SFT run (``finetune.runner=local``, the real default model, LoRA r=16,
the RAG examples of ``benchmarks/train.py``) is trained alternately without and with
``tracking.mlflow_uri`` (a sqlite store in a temporary folder), ``--repeats`` times each, in
one process and one data dir, after one discarded warm-up run (which materializes the base
model). Step times are the
``step_time_s`` ragops records per step (steps 3+, warm-up excluded); the ratio of the medians
is what the issue bounds (≤ 1.02).

Usage::

    python benchmarks/tracking.py [--steps 12] [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train import machine, overrides, write_data  # noqa: E402  (the same workload as the training benchmark)


def run(home: Path, data: Path, args: argparse.Namespace, uri: str | None) -> dict[str, Any]:
    from ragops.config import load_settings
    from ragops.finetune.train import train
    from ragops.runs import RunStore

    extra = [f"tracking.mlflow_uri={uri}"] if uri else []
    settings = load_settings([], [*overrides(args, "local"), *extra], data_dir=home, environ={})
    t0 = time.perf_counter()
    result = train(settings, "sft", data)
    wall = time.perf_counter() - t0
    rows = [r for r in RunStore.from_settings(settings).metrics(result.run.run_id) if "step_time_s" in r]
    steps = [r["step_time_s"] for r in rows][2:]
    return {"tracking": bool(uri), "step_s_median": statistics.median(steps), "wall_s": wall, "mlflow_run": result.run.mlflow_run_id}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--examples", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        home, data = Path(tmp) / "home", write_data(Path(tmp) / "sft.jsonl", args.examples)
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        # One untracked warm-up run, discarded: it materializes the base model and warms caches.
        print(json.dumps({"warmup": run(home, data, args, None)}), file=sys.stderr)
        results = []
        for i in range(args.repeats * 2):
            res = run(home, data, args, uri if i % 2 else None)
            results.append(res)
            print(json.dumps(res), file=sys.stderr)
    off = statistics.median(r["step_s_median"] for r in results if not r["tracking"])
    on = statistics.median(r["step_s_median"] for r in results if r["tracking"])
    report = {"machine": machine(), "runs": results, "step_s_off": off, "step_s_on": on, "ratio": on / off}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"median step: {off:.3f} s without tracking, {on:.3f} s with MLflow (sqlite): ratio {on / off:.3f}")


if __name__ == "__main__":
    main()
