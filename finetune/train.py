"""``ragops train sft|reward|ppo``: data → run → Ray Train (or in-process) → published artifact.

:func:`train` (SFT, reward model) and :func:`train_ppo` are what the CLI calls. Both

1. resolves the base model (and converts a GGUF base to safetensors once, see
   :func:`~ragops.finetune.models.materialize_base`);
2. builds the dataset (Ray Data) and splits off the held-out examples;
3. creates a run record — or, with ``resume``, reopens an interrupted one (``"auto"``: the
   latest unfinished run of the same kind on the same data; a path: that run's folder, or a
   checkpoint folder to start a new run from);
4. runs the train loop on Ray Train (:func:`~ragops.finetune.runner.run_on_ray`) or in-process;
5. publishes the adapter to the registry under the run's id, moving ``sft-latest`` /
   ``reward-latest`` / ``rm-latest`` / ``ppo-latest``, and closes the run record.

Steps 3-5 are :func:`_execute`, shared by every kind.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ragops.artifacts import Artifact, Registry, utc_now
from ragops.config import Settings
from ragops.errors import InputError, RagopsError
from ragops.runs import RunRecord, RunStore
from ragops.tracking import telemetry
from ragops.watchdog import Stalled, Watchdog

log = logging.getLogger(__name__)

TrainKind = Literal["sft", "reward", "ppo"]
Progress = Callable[[dict[str, Any]], None]
#: Chaos drill: ``RAGOPS_TRAIN_FAULT="step=3,rank=1,marker=.ragops/killed"`` kills that worker once.
FAULT_ENV = "RAGOPS_TRAIN_FAULT"


def fault_from_env(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """Parse :data:`FAULT_ENV` (``step=N[,rank=R][,marker=PATH]``) into a fault spec.

    Raises:
        InputError: a malformed value.
    """
    raw = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
    if not raw:
        return None
    try:
        spec = dict(item.split("=", 1) for item in raw.split(","))
        fault: dict[str, Any] = {"step": int(spec["step"]), "rank": int(spec.get("rank", 0))}
    except (KeyError, ValueError):
        raise InputError(f"{FAULT_ENV}='{raw}': expected step=N[,rank=R][,marker=PATH]") from None
    fault["marker"] = spec.get("marker") or str(Path(tempfile.gettempdir()) / f"ragops-fault-{fault['step']}-{fault['rank']}")
    return fault


class TrainingFailed(RagopsError):
    """The run failed; its checkpoints are kept and ``--resume auto`` continues it."""


@dataclass
class TrainResult:
    """What :func:`train` returns.

    Attributes:
        run: The run record (finished).
        artifact: The published artifact.
        resumed: Whether an interrupted run was continued.
        aliases: Aliases pointing at the artifact after publishing.
        data: ``{"files", "hash", "records", "train_examples", "eval_examples", "retrieved"}``.
    """

    run: RunRecord
    artifact: Artifact
    resumed: bool
    data: dict[str, Any] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run.run_id,
            "kind": self.run.kind,
            "status": self.run.status,
            "artifact": self.artifact.name,
            "aliases": self.aliases,
            "base_model": self.artifact.base_model,
            "resumed": self.resumed,
            "steps": self.run.step,
            "planned_steps": self.run.planned_steps,
            "restarts": self.run.restarts,
            "metrics": self.run.metrics,
            "data": self.data,
            "tags": self.run.tags,
        }


def _with_overrides(
    settings: Settings, kind: str, workers: int | None, use_gpu: bool | None, max_steps: int | None
) -> Settings:
    ft = settings.finetune
    updates: dict[str, Any] = {}
    if workers is not None:
        updates["workers"] = workers
        if workers > 1 and ft.runner == "local":
            updates["runner"] = "ray"
    if use_gpu is not None:
        updates["use_gpu"] = use_gpu
    if max_steps is not None:
        updates[kind] = getattr(ft, kind).model_copy(update={"max_steps": max_steps})
    if not updates:
        return settings
    data = ft.model_dump()
    data.update({k: (v.model_dump() if hasattr(v, "model_dump") else v) for k, v in updates.items()})
    chosen = [f"finetune.{k}" for k in updates if k != kind] + ([f"finetune.{kind}.max_steps"] if max_steps is not None else [])
    # Command-line options are the user's choices, like --set (admission never fits them).
    return settings.model_copy(update={"finetune": type(ft).model_validate(data)}).with_explicit(chosen)


def _resolve_resume(store: RunStore, resume: str, kind: str, data_hash: str) -> tuple[RunRecord | None, str | None]:
    """``(run to continue, checkpoint to start from)`` for ``--resume``."""
    if resume == "auto":
        return store.find_resumable(kind, data_hash), None
    path = Path(resume).expanduser()
    if path.is_dir() and (path / RunStore.RECORD).is_file():
        return store.get(path.name), None
    if path.is_dir() and any((path / f).is_file() for f in ("trainer_state.json", "checkpoint/trainer_state.json", "ppo_state.json")):
        return None, str(path.resolve())
    if not path.exists():
        try:
            return store.get(resume), None  # a run id
        except InputError:
            pass
    raise InputError(
        f"--resume '{resume}': expected 'auto', a run folder (holding run.json), a run id, or a checkpoint "
        "folder (holding trainer_state.json, or ppo_state.json for PPO)"
    )


def _admit(settings: Settings, kind: str) -> Settings:
    """Start or join Ray and admit the run's workers (fit, wait or fail before any work)."""
    from ragops.cluster.admission import admit
    from ragops.cluster.resources import training_demands
    from ragops.raylocal import ensure_ray

    ensure_ray(settings.ray)
    return admit(settings, training_demands(settings, kind))


class _Tail(threading.Thread):
    """Polls the run's metrics file and calls ``progress`` with each new row."""

    def __init__(self, store: RunStore, run_id: str, progress: Progress, interval: float = 0.5) -> None:
        super().__init__(daemon=True, name=f"progress-{run_id}")
        self.store, self.run_id, self.progress, self.interval = store, run_id, progress, interval
        self._halt = threading.Event()
        self._seen: set[tuple[int, str]] = set()

    def poll(self) -> None:
        for row in self.store.metrics(self.run_id):
            key = (int(row.get("step", 0)), "eval" if any(k.startswith("eval_") for k in row) else "train")
            if key not in self._seen:
                self._seen.add(key)
                self.progress(row)

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.poll()
            except Exception:  # progress display must never break training
                log.debug("progress poll failed", exc_info=True)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=2)
        try:
            self.poll()
        except Exception:  # progress display must never break training
            log.debug("progress poll failed", exc_info=True)


def train(
    settings: Settings,
    kind: TrainKind,
    data: str | Path | Sequence[str | Path],
    *,
    base_model: str | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    tags: Mapping[str, str] | None = None,
    parent: str | None = None,
    progress: Progress | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    fault: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Fine-tune and publish: SFT (LoRA adapter) or a reward model.

    Args:
        settings: Full settings (``finetune`` section; ``generator.model`` is the default base).
        kind: ``'sft'`` or ``'reward'``.
        data: Training file(s): a path, a folder of ``*.jsonl`` or a glob.
        base_model: Overrides ``finetune.base_model``.
        workers, use_gpu, max_steps: Override ``finetune.workers``, ``finetune.use_gpu`` and the
            kind's ``max_steps``.
        resume: ``None`` (new run), ``'auto'`` or a path (see :func:`_resolve_resume`).
        tags: Key/value tags stored with the run and the artifact.
        parent: Artifact this one derives from (recorded).
        progress: Called with each per-step metrics row (step, loss, tokens_per_s, ...).
        on_event: Called with ("data" | "run" | "publish", details) at each stage.
        fault: Fault injection for drills and tests: ``{"step", "marker", "rank"}`` (default:
            :data:`FAULT_ENV`, so a CLI run can be drilled too). The worker of that rank exits
            abruptly after that step, once; Ray Train restarts the group from the latest checkpoint.

    Raises:
        InputError: bad data or resume target; ConfigError: bad settings (e.g. QLoRA on CPU);
        ModelNotFoundError: base model; TrainingFailed: the workers failed beyond ``max_failures``.
    """
    from ragops.finetune.datasets import build_preference_examples, build_sft_examples
    from ragops.finetune.models import (
        base_source,
        check_quantization,
    )
    from ragops.finetune.reward import reward_train_loop
    from ragops.finetune.sft import sft_train_loop

    if kind not in ("sft", "reward"):
        raise InputError(f"unknown training kind '{kind}'; allowed: sft, reward")
    emit = on_event or (lambda _stage, _info: None)
    fault = fault if fault is not None else fault_from_env()
    settings = _with_overrides(settings, kind, workers, use_gpu, max_steps)
    ft = settings.finetune
    section = ft.sft if kind == "sft" else ft.reward
    check_quantization(ft.lora.quantization, ft.use_gpu)

    base_name = base_model or ft.base_model or settings.generator.model
    source = base_source(base_name, settings)
    if kind == "sft":
        built = build_sft_examples(data, settings, tokenizer_dir=source.path, gguf_file=source.gguf_file)
    else:
        built = build_preference_examples(data, settings)
    train_ex, eval_ex = built.split(section.eval_fraction, section.seed)
    data_info = {
        "files": built.files, "hash": built.hash, "records": built.records, "train_examples": len(train_ex),
        "eval_examples": len(eval_ex), "retrieved": built.retrieved, **built.extra,
    }  # fmt: skip
    emit("data", data_info)

    loop = sft_train_loop if kind == "sft" else reward_train_loop
    loop_config: dict[str, Any] = {
        "base": source.to_dict(),
        "train": train_ex,
        "eval": eval_ex,
        kind: section.model_dump(mode="json"),
        "lora": ft.lora.model_dump(mode="json"),
        "use_gpu": ft.use_gpu,
        "num_to_keep": ft.num_to_keep,
    }
    return _execute(
        settings, kind, base_name=base_name, data_info=data_info, loop=loop, loop_config=loop_config,
        run_config={kind: section.model_dump(mode="json"), "lora": ft.lora.model_dump(mode="json")},
        resume=resume, tags=tags, parent=parent, progress=progress, emit=emit, fault=fault,
        task="causal-lm" if kind == "sft" else "seq-cls", resume_hint=f"ragops train {kind} --data ...",
    )  # fmt: skip


def _execute(
    settings: Settings,
    kind: str,
    *,
    base_name: str,
    data_info: dict[str, Any],
    loop: Callable[[dict[str, Any], Any], None],
    loop_config: dict[str, Any],
    run_config: dict[str, Any],
    resume: str | None,
    tags: Mapping[str, str] | None,
    parent: str | None,
    progress: Progress | None,
    emit: Callable[[str, dict[str, Any]], None],
    fault: Mapping[str, Any] | None,
    task: str,
    resume_hint: str,
    publish_config: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Run record → train loop (Ray Train or in-process) → published artifact: shared by every kind.

    Args:
        settings: Full settings (``finetune`` section, already overridden).
        kind: ``sft``, ``reward`` or ``ppo``.
        base_name: The base model as configured (recorded in the run and the artifact).
        data_info: ``{"files", "hash", ...}`` of the training data (``hash`` identifies it for resume).
        loop, loop_config: The train loop and its config (``fault`` is added here).
        run_config: Settings recorded with the run (and the artifact).
        resume, tags, parent, progress, emit, fault: See :func:`train`.
        task: The artifact's task (``causal-lm`` or ``seq-cls``).
        resume_hint: The command that continues a failed run (for the error message).
        publish_config: Extra lineage recorded in the artifact's config.
    """
    from ragops.finetune.runner import Scaling

    ft = settings.finetune
    data_hash = data_info["hash"]

    if ft.runner == "ray":
        settings = _admit(settings, kind)
        ft = settings.finetune
    store = RunStore.from_settings(settings)
    scaling = Scaling(workers=ft.workers, use_gpu=ft.use_gpu, cpus_per_worker=ft.cpus_per_worker)
    rec, init_checkpoint = (None, None)
    if resume:
        rec, init_checkpoint = _resolve_resume(store, resume, kind, data_hash)
    resumed = rec is not None
    if rec is not None:
        if rec.kind != kind:
            raise InputError(f"run {rec.run_id} is a {rec.kind} run, not {kind}")
        if rec.status == "finished":
            raise InputError(f"run {rec.run_id} already finished (artifact {rec.artifact}); nothing to resume")
        if rec.data.get("hash") != data_hash:
            raise InputError(f"run {rec.run_id} was trained on different data (hash {rec.data.get('hash', '?')[:12]}…)")
        merged_tags = {**rec.tags, **dict(tags or {})}
        rec = store.update(
            rec.run_id, status="running", attempts=rec.attempts + 1, error=None, tags=merged_tags,
            pid=os.getpid(),
        )  # fmt: skip
    else:
        rec = store.create(
            kind,
            base_model=base_name,
            data=data_info,
            config=run_config,
            scaling={"runner": ft.runner, **scaling.to_dict()},
            tags=dict(tags or {}),
            parent=parent,
        )
    from ragops.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker.from_settings(settings)
    if tracker is not None:
        mlflow_id = tracker.start_run(rec, settings)
        if mlflow_id and mlflow_id != rec.mlflow_run_id:
            rec = store.update(rec.run_id, mlflow_run_id=mlflow_id)
    attrs = {"ragops.run_id": rec.run_id, "ragops.kind": kind, "ragops.base_model": base_name, "ragops.runner": ft.runner,
             "ragops.workers": ft.workers, "ragops.resumed": resumed, "ragops.data_hash": data_hash}  # fmt: skip
    try:
        with telemetry.span(f"train.{kind}", attrs) as root:
            result = _train_tracked(
                settings, kind, store, rec, resumed=resumed, init_checkpoint=init_checkpoint, scaling=scaling,
                tracker=tracker, base_name=base_name, data_info=data_info, loop=loop, loop_config=loop_config,
                progress=progress, emit=emit, fault=fault, task=task, resume_hint=resume_hint,
                publish_config=publish_config, parent=parent,
            )  # fmt: skip
            root.set_attributes({"ragops.artifact": result.artifact.name, "ragops.step": result.run.step})
            return result
    finally:
        if tracker is not None:
            final = store.get(rec.run_id)
            tracker.end_run("failed" if final.status == "running" else final.status, error=final.error)
            tracker.close()


def _train_tracked(
    settings: Settings,
    kind: str,
    store: RunStore,
    rec: RunRecord,
    *,
    resumed: bool,
    init_checkpoint: str | None,
    scaling: Any,
    tracker: Any,
    base_name: str,
    data_info: dict[str, Any],
    loop: Callable[[dict[str, Any], Any], None],
    loop_config: dict[str, Any],
    progress: Progress | None,
    emit: Callable[[str, dict[str, Any]], None],
    fault: Mapping[str, Any] | None,
    task: str,
    resume_hint: str,
    publish_config: Mapping[str, Any] | None,
    parent: str | None,
) -> TrainResult:
    """The part of :func:`_execute` after the run record exists: train, publish, finish the record."""
    from ragops.finetune.runner import run_local, run_on_ray

    ft = settings.finetune
    data_hash = data_info["hash"]
    emit("run", {"run_id": rec.run_id, "resumed": resumed, "run_dir": store.run_uri(rec.run_id), "init_checkpoint": init_checkpoint})

    loop_config = {
        **loop_config,
        "run_id": rec.run_id,
        "fault": {"store_root": store.uri, "run_id": rec.run_id, **fault} if fault else None,
    }
    last: dict[str, Any] = {}
    dog = Watchdog(
        settings.runtime.stall_timeout_s if ft.runner == "ray" else 0, f"train {kind}",
        status=lambda: f"run {rec.run_id}, " + (f"last step {last['step']}" if "step" in last else "no step yet"),
    )  # fmt: skip

    def on_row(row: dict[str, Any]) -> None:
        dog.beat()  # a metrics row is a training step (or an eval) that finished
        if tracker is not None:
            tracker.log_rows([row])
        last.update(row)
        if progress:
            progress(row)

    tail = _Tail(store, rec.run_id, on_row) if progress or dog.timeout_s or tracker else None
    if tail:
        tail.start()
    try:
        with dog, telemetry.span("train.fit", {"ragops.runner": ft.runner, "ragops.init_checkpoint": init_checkpoint}):
            if ft.runner == "local":
                outcome = run_local(
                    loop, loop_config, store, rec.run_id, num_to_keep=ft.num_to_keep,
                    init_checkpoint=init_checkpoint, cpus=ft.cpus_per_worker,
                )  # fmt: skip
            else:
                outcome = run_on_ray(
                    loop, loop_config, scaling, (store, rec.run_id), resume=resumed,
                    num_to_keep=ft.num_to_keep, max_failures=ft.max_failures,
                    init_checkpoint=init_checkpoint, ray_config=settings.ray,
                )  # fmt: skip
    except (KeyboardInterrupt, Stalled) as exc:
        if isinstance(exc, Stalled):
            store.update(rec.run_id, status="failed", error=f"stalled: {exc}"[:500])
        else:
            store.update(rec.run_id, status="interrupted", error="interrupted by the user")
        raise
    except Exception as exc:
        from ragops.raylocal import unwrap_ray_error

        cause = unwrap_ray_error(exc)
        message = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(cause).__name__
        store.update(rec.run_id, status="failed", error=message[:500])
        if isinstance(cause, RagopsError):
            raise cause from None
        raise TrainingFailed(
            f"training run {rec.run_id} failed: {message[:300]}. Its checkpoints are kept: continue it with "
            f"`{resume_hint} --resume auto` (or --resume {store.run_uri(rec.run_id)})"
        ) from exc
    finally:
        if tail:
            tail.stop()

    from ragops.finetune.session import scratch_root

    # Scratch folders of workers on this node (those of killed attempts included).
    shutil.rmtree(scratch_root(rec.run_id), ignore_errors=True)

    with telemetry.span("train.publish"):
        return _publish(settings, kind, store, rec, outcome, tracker=tracker, base_name=base_name, data_hash=data_hash,
                        task=task, parent=parent, publish_config=publish_config, emit=emit, resumed=resumed,
                        data_info=data_info)  # fmt: skip


def _publish(settings: Settings, kind: str, store: RunStore, rec: RunRecord, outcome: Any, *, tracker: Any,
             base_name: str, data_hash: str, task: str, parent: str | None, publish_config: Mapping[str, Any] | None,
             emit: Callable[[str, dict[str, Any]], None], resumed: bool, data_info: dict[str, Any]) -> TrainResult:  # fmt: skip
    """Publish the finished run's artifact, finish its record, and mirror both to MLflow."""
    from ragops.finetune.session import ARTIFACT_DIR

    metrics = outcome.metrics or {}
    metrics = {k: v for k, v in metrics.items() if k != "_type"}
    registry = Registry.from_settings(settings)
    artifact = registry.publish(
        outcome.final_dir / ARTIFACT_DIR,
        kind=kind,
        name=rec.run_id,
        base_model=base_name,
        task=task,
        parent=parent,
        run_id=rec.run_id,
        data_hash=data_hash,
        config={**rec.config, "scaling": rec.scaling, **dict(publish_config or {})},
        metrics=metrics,
        tags=rec.tags,
    )
    emit("publish", {"artifact": artifact.name, "aliases": registry.aliases_of(artifact.name), "registry": registry.storage.uri()})
    final_step = int(metrics.get("global_step", rec.step))
    rec = store.update(
        rec.run_id, status="finished", finished_at=utc_now(), artifact=artifact.name, metrics=metrics,
        step=final_step, planned_steps=int(metrics.get("planned_steps") or rec.planned_steps or final_step), error=None,
    )  # fmt: skip
    store.write_parquet(rec.run_id)
    if tracker is not None:
        tracker.log_rows([{**metrics, "step": final_step}])  # the final metrics, at the last step
        tracker.log_artifact(artifact, registry.storage.uri("artifacts", artifact.name), registry.aliases_of(artifact.name))
    return TrainResult(run=rec, artifact=artifact, resumed=resumed, data=data_info, aliases=registry.aliases_of(artifact.name))
