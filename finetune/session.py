"""What a training loop sees of its runner: rank, reporting, checkpoints.

A train loop is a plain function ``loop(config: dict, session: TrainSession) -> None``. It
resumes from :meth:`TrainSession.checkpoint`, reports metrics (and checkpoints) with
:meth:`TrainSession.report`, and ends with one :meth:`TrainSession.report_final` carrying the
folder to publish. Two sessions implement it:

* :class:`LocalSession` — in this process, no Ray: checkpoints are copied into the run folder;
* :class:`RaySession` — inside a Ray Train worker: ``ray.train.report`` / ``get_checkpoint``.

SFT and reward training drive a transformers ``Trainer`` and plug in through
:meth:`TrainSession.hf_callbacks`; a custom loop (PPO) calls ``report`` itself.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import shutil
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

#: File in a checkpoint folder marking the final one (holds the artifact to publish).
FINAL_MARKER = "ragops_final.json"
#: Sub-folder of the final checkpoint with the adapter files.
ARTIFACT_DIR = "artifact"
#: Sub-folder RayTrainReportCallback puts the transformers checkpoint in.
HF_CHECKPOINT_DIR = "checkpoint"
#: Checkpoint folders of the in-process runner.
_LOCAL_CKPT = re.compile(r"^checkpoint_\d{6}$")


def scratch_root(run_id: str | None) -> Path:
    """Local scratch folder of a run's workers on this node."""
    return Path(tempfile.gettempdir()) / "ragops-train" / (run_id or "adhoc")


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux reports KB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


class TrainSession(ABC):
    """A training loop's view of where it runs.

    Attributes:
        world_rank: This worker's rank (0 in-process).
        world_size: Number of workers.
        local_rank: Rank on this node.
    """

    world_rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __init__(self, recorder: Any = None, init_checkpoint: str | None = None) -> None:
        self.recorder = recorder
        self.init_checkpoint = init_checkpoint
        self._scratch: Path | None = None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes the artifact)."""
        return self.world_rank == 0

    @property
    def scratch(self) -> Path:
        """A fresh local folder for this attempt (the HF Trainer's output_dir).

        It lives under ``<tmp>/ragops-train/<run_id>/``; folders this rank left behind in an
        earlier attempt of the run (a worker that was killed never cleans up) are removed.
        """
        if self._scratch is None:
            root = scratch_root(getattr(self.recorder, "run_id", None))
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(f"rank{self.world_rank}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            self._scratch = Path(tempfile.mkdtemp(dir=root, prefix=f"rank{self.world_rank}-{uuid.uuid4().hex[:6]}-"))
        return self._scratch

    def cleanup(self) -> None:
        """Remove the scratch folder."""
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
            self._scratch = None

    def log_metrics(self, row: Mapping[str, Any]) -> None:
        """Record one per-step metrics row (rank 0 writes; other ranks return at once).

        Written straight to the run's storage rather than through ``ray.train.report``: a
        report waits for the Ray Train controller to collect it (every ~2 s), too slow per step.
        """
        if self.is_main and self.recorder is not None:
            self.recorder.on_report([{"_type": "log", **row}], None)

    @abstractmethod
    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        """Record metrics and persist a checkpoint folder, if given (every rank must call it)."""

    @abstractmethod
    def _latest(self) -> contextlib.AbstractContextManager[Path | None]:
        """The runner's latest checkpoint, as a local folder (or None)."""

    @contextlib.contextmanager
    def checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint to resume from, copied to a private local folder.

        The runner's latest checkpoint wins; else ``init_checkpoint`` (``--resume PATH``);
        else None (a fresh start). The copy keeps resuming safe while the runner deletes old
        checkpoints (``num_to_keep``).
        """
        with self._latest() as latest:
            source = latest or (Path(self.init_checkpoint) if self.init_checkpoint else None)
            if source is None:
                yield None
                return
            dest = self.scratch / "resume-from"
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(source, dest)
        yield dest

    def report_final(self, metrics: Mapping[str, Any], artifact_dir: Path | None) -> None:
        """Report final metrics; rank 0 passes the adapter folder to publish."""
        payload = {"_type": "final", **metrics}
        if artifact_dir is None or not self.is_main:
            self.report(payload)
            return
        holder = self.scratch / "final"
        if holder.exists():
            shutil.rmtree(holder)
        holder.mkdir(parents=True)
        shutil.copytree(artifact_dir, holder / ARTIFACT_DIR)
        import json

        (holder / FINAL_MARKER).write_text(json.dumps(dict(metrics), default=str, indent=2))
        self.report(payload, checkpoint_dir=holder)

    def hf_callbacks(self, fault: Mapping[str, Any] | None = None) -> list[Any]:
        """transformers callbacks: per-step metrics, checkpoint reporting, optional fault."""
        from ragops.finetune.callbacks import FaultInjection, StepMetrics

        cbs: list[Any] = [StepMetrics(self)]
        if fault:
            cbs.append(FaultInjection(self.world_rank, **fault))
        return cbs

    def prepare(self, trainer: Any) -> Any:
        """Adapt a transformers Trainer to the runner (Ray: ``prepare_trainer``)."""
        return trainer


class LocalSession(TrainSession):
    """In-process training: checkpoints go to ``<run>/checkpoint_NNNNNN``, metrics to the run.

    Args:
        recorder: Receives every report (see :class:`ragops.finetune.runner.RunRecorder`).
        run_dir: Local folder of the run.
        num_to_keep: Checkpoints kept.
        init_checkpoint: Checkpoint to start from when the run has none (``--resume PATH``).
    """

    def __init__(self, recorder: Any, run_dir: Path, num_to_keep: int, init_checkpoint: str | None = None) -> None:
        super().__init__(recorder, init_checkpoint)
        self.run_dir = run_dir
        self.num_to_keep = num_to_keep
        self.final_dir: Path | None = None
        self.final_metrics: dict[str, Any] = {}

    def _checkpoints(self) -> list[Path]:
        return sorted(p for p in self.run_dir.glob("checkpoint_*") if p.is_dir() and _LOCAL_CKPT.match(p.name))

    @contextlib.contextmanager
    def _latest(self) -> Iterator[Path | None]:
        ckpts = self._checkpoints()
        if ckpts:
            yield ckpts[-1]
            return
        # A run started on Ray Train and continued in-process: its record knows the checkpoint.
        last = self.recorder.store.get(self.recorder.run_id).last_checkpoint if self.recorder else None
        yield Path(last) if last and Path(last).is_dir() else None

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        saved = None
        if checkpoint_dir is not None:
            existing = self._checkpoints()
            index = int(existing[-1].name.split("_")[-1]) + 1 if existing else 0
            saved = self.run_dir / f"checkpoint_{index:06d}"
            tmp = saved.with_name(saved.name + ".tmp")
            shutil.copytree(checkpoint_dir, tmp)
            os.replace(tmp, saved)
            keep = self._checkpoints()
            final = [p for p in keep if (p / FINAL_MARKER).is_file()]
            for old in [p for p in keep if p not in final][: max(0, len(keep) - self.num_to_keep)]:
                shutil.rmtree(old, ignore_errors=True)
        if metrics.get("_type") == "final":
            self.final_metrics = {k: v for k, v in metrics.items() if k != "_type"}
            if saved is not None:
                self.final_dir = saved
        self.recorder.on_report([dict(metrics)], str(saved) if saved else None)

    def hf_callbacks(self, fault: Mapping[str, Any] | None = None) -> list[Any]:
        from ragops.finetune.callbacks import ReportCheckpoints

        return [*super().hf_callbacks(fault), ReportCheckpoints(self)]


class RaySession(TrainSession):
    """Inside a Ray Train worker (``TorchTrainer``): Ray persists checkpoints and restores them.

    Args:
        recorder: Writes per-step metrics of rank 0 to the run (the run storage is shared).
        init_checkpoint: Checkpoint to start from when Ray has none (``--resume PATH``).
    """

    def __init__(self, recorder: Any = None, init_checkpoint: str | None = None) -> None:
        super().__init__(recorder, init_checkpoint)
        import ray.train

        ctx = ray.train.get_context()
        self.world_rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()

    @contextlib.contextmanager
    def _latest(self) -> Iterator[Path | None]:
        import ray.train

        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            yield None
            return
        with ckpt.as_directory() as d:
            yield Path(d)

    def report(self, metrics: Mapping[str, Any], checkpoint_dir: Path | None = None) -> None:
        import ray.train

        checkpoint = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(dict(metrics), checkpoint=checkpoint)

    def hf_callbacks(self, fault: Mapping[str, Any] | None = None) -> list[Any]:
        from ray.train.huggingface.transformers import RayTrainReportCallback

        # RayTrainReportCallback persists every transformers checkpoint (on_save) to Ray's
        # storage, where FailureConfig restarts and --resume find it.
        return [*super().hf_callbacks(fault), RayTrainReportCallback()]

    def prepare(self, trainer: Any) -> Any:
        from ray.train.huggingface.transformers import prepare_trainer

        return prepare_trainer(trainer)


def unwrap_hf_checkpoint(ckpt: Path) -> Path:
    """The transformers checkpoint folder inside a runner checkpoint."""
    inner = ckpt / HF_CHECKPOINT_DIR
    return inner if inner.is_dir() else ckpt


def now() -> float:
    """Monotonic seconds (a seam for tests)."""
    return time.perf_counter()
