"""Run a train loop in-process or on Ray Train, with run records, checkpoints and resume.

:func:`run_on_ray` is the generic Ray Train wiring every trainer shares (SFT, reward, and a
custom PPO loop later): ``TorchTrainer`` with ``ScalingConfig(num_workers, use_gpu)``, DDP over
gloo on CPU workers (NCCL on GPUs), ``RunConfig(name=run_id, storage_path=runs root)`` so the
checkpoints live in the run's folder, ``CheckpointConfig(num_to_keep)`` and
``FailureConfig(max_failures)``: a worker that dies restarts the worker group from the latest
checkpoint. Running again with the same run id resumes it (Ray Train restores its checkpoint
list from the run folder), which is how ``--resume`` works.

:func:`run_local` runs the same loop in this process without Ray.

Both feed a :class:`RunRecorder` — on the Ray Train controller through a ``UserCallback`` —
that appends per-step metrics to the run and tracks its latest checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragops.runs import RunStore

log = logging.getLogger(__name__)

#: A train loop: ``loop(config, session)``; must be importable by name (Ray pickles it).
TrainLoop = Callable[[dict[str, Any], Any], None]

#: Environment for training workers: offline hub, quiet libraries.
WORKER_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
}


@dataclass(frozen=True)
class Scaling:
    """How many workers and what each gets.

    Attributes:
        workers: Ray Train workers (data-parallel).
        use_gpu: One GPU per worker.
        cpus_per_worker: CPUs reserved per worker (and its torch threads).
    """

    workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"workers": self.workers, "use_gpu": self.use_gpu, "cpus_per_worker": self.cpus_per_worker}


@dataclass
class RunOutcome:
    """What a finished run left behind.

    Attributes:
        final_dir: Local folder of the final checkpoint (holds ``artifact/`` to publish).
        metrics: Final metrics of rank 0.
        keep_alive: Objects to hold while ``final_dir`` is in use (a temporary download).
    """

    final_dir: Path
    metrics: dict[str, Any]
    keep_alive: list[Any] = field(default_factory=list)


class RunRecorder:
    """Turns reports into run records: metric rows, latest checkpoint, restarts, final metrics.

    Args:
        store_root: The runs root (path or URI).
        run_id: The run.
    """

    def __init__(self, store_root: str, run_id: str) -> None:
        self.store_root = store_root
        self.run_id = run_id
        self._store: RunStore | None = None

    @property
    def store(self) -> RunStore:
        if self._store is None:
            self._store = RunStore(self.store_root)
        return self._store

    def on_report(self, per_worker: Sequence[Mapping[str, Any]], checkpoint: str | None) -> None:
        """Record one report (``per_worker[i]`` is worker i's metrics; rank 0 speaks for the run)."""
        if not per_worker:
            return
        main = dict(per_worker[0])
        kind = main.pop("_type", None)
        changes: dict[str, Any] = {}
        if kind == "log":
            # Peak memory is per process: keep the largest over workers.
            peaks = [m.get("peak_rss_mb") for m in per_worker if isinstance(m.get("peak_rss_mb"), (int, float))]
            if peaks:
                main["peak_rss_mb"] = max(peaks)
            self.store.append_metrics(self.run_id, [main])
            changes["step"] = int(main.get("step", 0))
            if main.get("max_steps"):
                changes["planned_steps"] = int(main["max_steps"])
        elif kind == "final":
            peaks = [m.get("peak_rss_mb") for m in per_worker if isinstance(m.get("peak_rss_mb"), (int, float))]
            if peaks:
                main["peak_rss_mb"] = max(peaks)
            changes["metrics"] = main
            if main.get("global_step") is not None:
                changes["step"] = int(main["global_step"])
        elif "step" in main:
            changes["step"] = int(main["step"])
        if checkpoint:
            changes["last_checkpoint"] = checkpoint
        if changes:
            self.store.update(self.run_id, **changes)

    def on_failure(self, errors: Mapping[int, BaseException]) -> None:
        """Count a worker-group failure (Ray restarts it when FailureConfig allows)."""
        rec = self.store.get(self.run_id)
        first = next(iter(errors.values()), None)
        self.store.update(self.run_id, restarts=rec.restarts + 1, error=_short_error(first) if first else rec.error)


def _short_error(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[-1] if text else type(exc).__name__)[:500]


def _worker_setup(cpus_per_worker: float) -> None:
    """Quiet libraries and size torch's thread pool to the worker's CPU reservation."""
    for key, value in WORKER_ENV.items():
        os.environ.setdefault(key, value)
    import torch

    torch.set_num_threads(max(1, int(cpus_per_worker)))
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - datasets comes with trl
        pass
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover
        pass


# ---------------------------------------------------------------------------------------
# In-process
# ---------------------------------------------------------------------------------------


def run_local(
    train_loop: TrainLoop,
    config: dict[str, Any],
    store: RunStore,
    run_id: str,
    *,
    num_to_keep: int = 2,
    init_checkpoint: str | None = None,
    cpus: float = 1.0,
) -> RunOutcome:
    """Run ``train_loop`` in this process (no Ray); checkpoints go into the run folder.

    Raises:
        ConfigError: the runs root is not a local path.
    """
    from ragops.finetune.session import LocalSession

    from ragops.errors import ConfigError

    run_dir = store.storage.local_path(run_id)
    if run_dir is None:
        raise ConfigError("finetune.runner 'local' needs a local finetune.storage_path; use runner 'ray' for URIs")
    run_dir.mkdir(parents=True, exist_ok=True)
    _worker_setup(cpus)
    session = LocalSession(RunRecorder(store.uri, run_id), run_dir, num_to_keep, init_checkpoint)
    try:
        train_loop(config, session)
    finally:
        session.cleanup()
    if session.final_dir is None:
        raise RuntimeError("the train loop ended without reporting a final artifact")
    return RunOutcome(final_dir=session.final_dir, metrics=session.final_metrics)


# ---------------------------------------------------------------------------------------
# Ray Train
# ---------------------------------------------------------------------------------------


def _ray_entry(payload: dict[str, Any]) -> None:
    """Worker entry point (module-level, so Ray pickles it by reference)."""
    from ragops.finetune.session import RaySession

    _worker_setup(payload["cpus_per_worker"])
    session = RaySession(RunRecorder(payload["store_root"], payload["run_id"]), payload.get("init_checkpoint"))
    try:
        payload["loop"](payload["config"], session)
    finally:
        session.cleanup()


def _recorder_callback(store_root: str, run_id: str) -> Any:
    from ray.train import UserCallback

    class RunRecorderCallback(UserCallback):
        """Runs on the Ray Train controller: every report lands in the run record."""

        def __init__(self) -> None:
            self.recorder = RunRecorder(store_root, run_id)

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            try:
                self.recorder.on_report(metrics, checkpoint.path if checkpoint is not None else None)
            except Exception:  # bookkeeping must never kill the training run
                log.exception("could not record a training report")

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            try:
                self.recorder.on_failure(worker_exceptions)
            except Exception:  # bookkeeping must never kill the training run
                log.exception("could not record a worker failure")

    return RunRecorderCallback()


def run_on_ray(
    train_loop: TrainLoop,
    config: dict[str, Any],
    scaling: Scaling,
    run_dir: tuple[RunStore, str],
    resume: bool = False,
    *,
    num_to_keep: int = 2,
    max_failures: int = 1,
    init_checkpoint: str | None = None,
    ray_config: Any = None,
) -> RunOutcome:
    """Run ``train_loop`` on Ray Train workers; return the final checkpoint.

    Args:
        train_loop: ``loop(config, session)``, importable by name.
        config: The loop's config (plain, picklable data).
        scaling: Workers, GPU, CPUs per worker.
        run_dir: ``(store, run_id)``: checkpoints go to ``<store>/<run_id>``.
        resume: Continue the run's existing checkpoints (a run folder with Ray state and
            ``resume=False`` is refused, so a new run never silently resumes an old one).
        num_to_keep: ``CheckpointConfig(num_to_keep)``.
        max_failures: ``FailureConfig(max_failures)``: worker-group restarts from the latest
            checkpoint.
        init_checkpoint: A checkpoint folder to start from when the run has none.
        ray_config: ``RayConfig`` for starting/joining Ray.

    Raises:
        ray.train.TrainingFailedError: the workers failed more than ``max_failures`` times.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from ragops.errors import InputError
    from ragops.raylocal import ensure_ray

    store, run_id = run_dir
    if not resume and store.storage.exists(run_id, "checkpoint_manager_snapshot.json"):
        raise InputError(f"run {run_id} already has Ray Train state; resume it (--resume) or start a new run")
    ensure_ray(ray_config)
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _ray_entry,
        train_loop_config={
            "loop": train_loop,
            "config": config,
            "cpus_per_worker": scaling.cpus_per_worker,
            "init_checkpoint": init_checkpoint,
            "store_root": store.uri,
            "run_id": run_id,
        },
        # gloo on CPU workers, NCCL on GPUs (Ray's default would pick the same; explicit is clearer).
        torch_config=TorchConfig(backend="nccl" if scaling.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=scaling.workers, use_gpu=scaling.use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_id,
            storage_path=store.uri,
            checkpoint_config=CheckpointConfig(num_to_keep=num_to_keep),
            failure_config=FailureConfig(max_failures=max_failures),
            callbacks=[_recorder_callback(store.uri, run_id)],
            worker_runtime_env={"env_vars": dict(WORKER_ENV)},
        ),
    )
    result = trainer.fit()
    checkpoint = result.checkpoint
    if checkpoint is None:
        raise RuntimeError(f"run {run_id} finished without a checkpoint")
    local = store.storage.local_path()
    if local is not None and Path(checkpoint.path).is_dir():
        return RunOutcome(final_dir=Path(checkpoint.path), metrics=dict(result.metrics or {}))
    import tempfile

    tmp = tempfile.TemporaryDirectory(prefix="ragops-final-")
    checkpoint.to_directory(tmp.name)
    return RunOutcome(final_dir=Path(tmp.name), metrics=dict(result.metrics or {}), keep_alive=[tmp])
