"""transformers ``TrainerCallback``s that connect a Trainer to a :class:`TrainSession`.

* :class:`StepMetrics` — every logging step: loss, learning rate, grad norm, tokens/s,
  samples/s and seconds per optimizer step (training time only: evaluation and checkpoint
  saving are excluded), eval metrics when an evaluation ran.
* :class:`ReportCheckpoints` — the in-process twin of Ray's ``RayTrainReportCallback``.
* :class:`FaultInjection` — kills this worker once at a given step (a marker file makes it
  fire only once): what the fault-tolerance tests and a chaos drill use.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from ragops.finetune.session import HF_CHECKPOINT_DIR, TrainSession, peak_rss_mb
from transformers import TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

#: Keys of transformers/TRL logs worth keeping per step.
_KEEP = ("loss", "learning_rate", "grad_norm", "mean_token_accuracy", "entropy", "accuracy", "margin", "epoch")
#: Evaluation bookkeeping that is not a quality metric.
_EVAL_NOISE = ("_runtime", "_per_second", "_num_tokens")


def keep_metric(key: str) -> bool:
    """Whether a transformers/TRL log key is worth recording."""
    if key.startswith("eval_"):
        return not key.endswith(_EVAL_NOISE)
    return key in _KEEP


class StepMetrics(TrainerCallback):
    """Record per-step metrics at every logging step (rank 0's are kept).

    Args:
        session: Where reports go.
    """

    def __init__(self, session: TrainSession) -> None:
        self.session = session
        self._step_started = 0.0
        self._train_time = 0.0
        self._tokens_at_log: float | None = None
        self._step_at_log = 0
        self._time_at_log = 0.0

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_at_log = state.global_step
        self._time_at_log = self._train_time
        # TRL counts tokens from 0 in each trainer (also after a resume).
        self._tokens_at_log = 0.0

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._step_started = time.perf_counter()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._train_time += time.perf_counter() - self._step_started

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        logs = logs or {}
        if any(k.startswith("train_") for k in logs) and "loss" not in logs:
            return  # the end-of-training summary: reported with the final metrics instead
        row: dict[str, Any] = {"step": int(state.global_step), "max_steps": int(state.max_steps)}
        for k, v in logs.items():
            if keep_metric(k) and isinstance(v, (int, float)):
                row[k] = float(v)
        if "loss" in logs:
            steps = state.global_step - self._step_at_log
            seconds = self._train_time - self._time_at_log
            world = max(1, args.world_size)
            if steps > 0 and seconds > 0:
                row["step_time_s"] = seconds / steps
                row["samples_per_s"] = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * world / seconds
                tokens = logs.get("num_tokens")
                if isinstance(tokens, (int, float)):
                    if self._tokens_at_log is not None and tokens > self._tokens_at_log:
                        row["tokens_per_s"] = (tokens - self._tokens_at_log) / seconds
                    self._tokens_at_log = float(tokens)
                    row["num_tokens"] = float(tokens)
            self._step_at_log, self._time_at_log = state.global_step, self._train_time
        row["peak_rss_mb"] = peak_rss_mb()
        self.session.log_metrics(row)

    @property
    def train_time_s(self) -> float:
        """Seconds spent in optimizer steps so far (this attempt)."""
        return self._train_time


class ReportCheckpoints(TrainerCallback):
    """After each transformers checkpoint save, hand it to the session (in-process runner)."""

    def __init__(self, session: TrainSession) -> None:
        self.session = session

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        import shutil

        source = get_last_checkpoint(args.output_dir)
        if source is None:
            return
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(source, Path(tmp) / HF_CHECKPOINT_DIR)
            self.session.report({"_type": "checkpoint", "step": int(state.global_step)}, checkpoint_dir=Path(tmp))


class FaultInjection(TrainerCallback):
    """Exit this process abruptly at ``step`` on ``rank``, once (a marker file remembers).

    A checkpoint reaches the runner asynchronously (Ray Train's controller collects reports
    every ~2 s); with ``store_root`` and ``run_id`` the callback first waits until the run
    record shows a persisted checkpoint, so the restart provably resumes from it.

    Args:
        world_rank: This worker's rank.
        step: Optimizer step after which to die.
        marker: File created just before dying; if it exists, nothing happens.
        rank: Which rank dies.
        store_root, run_id: The run whose checkpoint to wait for (optional).
        timeout_s: Longest wait for that checkpoint.
        hang: Stop making progress instead of dying (what the stall watchdog's test needs):
            the worker sleeps until its process is ended.
    """

    def __init__(
        self,
        world_rank: int,
        step: int,
        marker: str,
        rank: int = 0,
        store_root: str | None = None,
        run_id: str | None = None,
        timeout_s: float = 60.0,
        hang: bool = False,
    ) -> None:
        self.hang = hang
        self.world_rank = world_rank
        self.step = step
        self.marker = Path(marker)
        self.rank = rank
        self.store_root = store_root
        self.run_id = run_id
        self.timeout_s = timeout_s

    def _wait_for_checkpoint(self) -> None:
        if not (self.store_root and self.run_id):
            return
        from ragops.runs import RunStore

        store = RunStore(self.store_root)
        deadline = time.monotonic() + self.timeout_s
        while time.monotonic() < deadline:
            if store.get(self.run_id).last_checkpoint:
                return
            time.sleep(0.2)

    def maybe_fire(self, step: int) -> None:
        """Die now if this is the step and the rank, and the fault has not fired yet (custom loops call it)."""
        if step == self.step and self.world_rank == self.rank and not self.marker.exists():
            self._wait_for_checkpoint()
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            if self.hang:
                self.marker.write_text(f"hung at step {self.step} (pid {os.getpid()})\n")
                while True:
                    time.sleep(1)
            self.marker.write_text(f"killed at step {self.step} (pid {os.getpid()})\n")
            os._exit(17)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.maybe_fire(state.global_step)
