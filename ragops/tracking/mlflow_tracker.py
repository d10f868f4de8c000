"""Mirror ragops training runs and registry aliases into MLflow.

ragops' own run records (``ragops runs``) stay the source of truth; MLflow gets a copy for the
teams that already look there. Everything is sent from the driver on one background thread,
fed from the metrics rows the driver already reads: nothing runs inside a training step, and a
slow or vanished server costs the run nothing but one warning.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ragops.artifacts import Artifact, Registry
    from ragops.config import Settings
    from ragops.runs import RunRecord

log = logging.getLogger(__name__)

MAX_PARAMS_PER_BATCH = 100  # MLflow's log_batch limits
MAX_METRICS_PER_BATCH = 1000
MAX_PARAM_CHARS = 6000
FLUSH_TIMEOUT_S = 30.0
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``: settings as MLflow params (lists as JSON)."""
    out: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:MAX_PARAM_CHARS]
    return out


def numeric_metrics(row: Mapping[str, Any]) -> dict[str, float]:
    """The numeric values of a metrics row (``step`` is the x axis, not a metric)."""
    return {
        k: float(v) for k, v in row.items()
        if k not in ("step", "_type") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }  # fmt: skip


def _ray_job_id() -> str | None:
    """The submission id under ``ray job submit`` (else the driver's Ray job id), if Ray is up."""
    for var in ("RAY_JOB_SUBMISSION_ID", "RAY_SUBMISSION_ID"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            sub = getattr(ctx, "get_submission_id", None)
            return (sub() if sub else None) or ctx.get_job_id()
    except Exception:  # a tag is never worth failing a run
        return None
    return None


class MlflowTracker:
    """One training run's mirror in MLflow, written from a background thread.

    Args:
        uri: A validated tracking URI (:func:`ragops.tracking.uri.check_tracking_uri`).
        experiment: Experiment name.
        register_models: Register published artifacts and mirror aliases.
        timeout_s: HTTP timeout per request.
    """

    def __init__(self, uri: str, experiment: str = "ragops", *, register_models: bool = True, timeout_s: float = 10.0) -> None:
        if uri.startswith("file:"):
            # MLflow 3 keeps the folder store only behind this opt-in; it still works offline.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        # MLflow's defaults retry an unreachable server for minutes; a mirror should give up fast.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, int(timeout_s))))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            from ragops.errors import InputError

            raise InputError("tracking.mlflow_uri is set but MLflow is not installed: pip install 'mlflow-skinny>=3' sqlalchemy alembic") from exc
        self.uri, self.experiment, self.register_models = uri, experiment, register_models
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.run_id: str | None = None
        self.failed = False
        self._queue: queue.Queue[tuple[Callable[..., Any], tuple[Any, ...]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, daemon=True, name="mlflow-tracker")
        self._thread.start()

    @classmethod
    def from_settings(cls, settings: Settings) -> MlflowTracker | None:
        """A tracker when ``tracking.mlflow_uri`` is set, else None."""
        t = settings.tracking
        if not t.mlflow_uri:
            return None
        return cls(t.mlflow_uri, t.experiment, register_models=t.register_models, timeout_s=t.timeout_s)

    # -- the background thread -------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if not self.failed:
                    fn, args = item
                    try:
                        fn(*args)
                    except Exception as exc:  # the server went away: warn once, keep training
                        self._fail(exc)
            finally:
                self._queue.task_done()

    def _fail(self, exc: BaseException) -> None:
        self.failed = True
        first = str(exc).strip().splitlines()
        reason = first[0][:300] if first else type(exc).__name__
        sys.stderr.write(
            f"ragops: warning: MLflow at {self.uri} is unreachable or refused a write ({reason}); "
            "training goes on and `ragops runs show` has every metric\n"
        )
        log.debug("MLflow write failed", exc_info=exc)

    def _submit(self, fn: Callable[..., Any], *args: Any) -> None:
        if not self.failed:
            self._queue.put((fn, args))

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Wait (bounded) until everything queued was sent; False when it did not finish in time."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Send what is queued (bounded wait) and stop the thread."""
        if not self.flush(timeout_s):
            sys.stderr.write(f"ragops: warning: MLflow at {self.uri} did not take the last writes within {timeout_s:.0f}s\n")
            self.failed = True
        self._queue.put(None)
        self._thread.join(timeout=1)

    # -- runs ----------------------------------------------------------------------------

    def start_run(self, rec: RunRecord, settings: Settings) -> str | None:
        """Create (or, for a resumed run, reopen) the MLflow run; return its id (None if MLflow failed).

        Synchronous, so the id can be stored in the ragops run record; bounded by the HTTP timeout.
        """
        try:
            from ragops.artifacts import code_version

            if rec.mlflow_run_id:
                self.client.update_run(rec.mlflow_run_id, status="RUNNING")
                self.run_id = rec.mlflow_run_id
                return self.run_id
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(self.experiment, artifact_location=self._artifact_root())
            code = code_version()
            tags = {
                "ragops.run_id": rec.run_id,
                "ragops.kind": rec.kind,
                "ragops.base_model": rec.base_model or "",
                "ragops.data_hash": str(rec.data.get("hash") or ""),
                "ragops.version": str(code.get("ragops") or ""),
                **({"mlflow.source.git.commit": code["git"]} if code.get("git") else {}),
                **({"ray.job_id": job} if (job := _ray_job_id()) else {}),
                **{str(k): str(v) for k, v in rec.tags.items()},
            }
            run = self.client.create_run(exp_id, tags=tags, run_name=rec.run_id)
            self.run_id = run.info.run_id
        except Exception as exc:
            self._fail(exc)
            return None
        params = flatten({"settings": settings.model_dump(mode="json"), "run": {"config": rec.config, "scaling": rec.scaling}})
        items = sorted(params.items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self._submit(self._log_params, dict(items[i : i + MAX_PARAMS_PER_BATCH]))
        return self.run_id

    def _artifact_root(self) -> str | None:
        """Where a new experiment keeps its artifacts: beside a sqlite store's file.

        MLflow's default for database stores is ``./mlruns`` under whatever the current folder
        is, which scatters artifacts over the user's checkouts; a server decides for itself.
        """
        if not self.uri.startswith("sqlite:///"):
            return None
        db = Path(self.uri[len("sqlite:///") :]).expanduser()
        return (db.parent / "mlartifacts").resolve().as_uri()

    def _log_params(self, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in params.items()])

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue metrics rows (each with its ``step``)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [
            Metric(k, v, now, int(row.get("step", 0)))
            for row in rows for k, v in numeric_metrics(row).items()
        ]  # fmt: skip
        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._submit(self._log_metrics, metrics[i : i + MAX_METRICS_PER_BATCH])

    def _log_metrics(self, metrics: list[Any]) -> None:
        if self.run_id:
            self.client.log_batch(self.run_id, metrics=metrics)

    def end_run(self, status: str, *, error: str | None = None) -> None:
        """Mark the run ``finished``/``failed``/``interrupted`` (ragops' names)."""
        self._submit(self._end, _STATUS.get(status, "FAILED"), error)

    def _end(self, status: str, error: str | None) -> None:
        if not self.run_id:
            return
        if error:
            self.client.set_tag(self.run_id, "ragops.error", error[:5000])
        self.client.set_terminated(self.run_id, status=status)

    # -- artifacts and the registry --------------------------------------------------------

    def log_artifact(self, artifact: Artifact, source_uri: str, aliases: Iterable[str] = ()) -> None:
        """Reference the published artifact from the run, and register it as a model version."""
        self._submit(self._log_artifact, artifact, source_uri, list(aliases))

    def _log_artifact(self, artifact: Artifact, source_uri: str, aliases: list[str]) -> None:
        if self.run_id:
            self.client.set_tag(self.run_id, "ragops.artifact", artifact.name)
            self.client.set_tag(self.run_id, "ragops.artifact_uri", source_uri)
            # The manifest (lineage, metrics, files), not the weights: those stay in ragops' registry.
            self.client.log_text(self.run_id, json.dumps(artifact.to_dict(), indent=2, default=str), "ragops/artifact.json")
        if self.register_models:
            self._register(artifact, source_uri)
            for alias in aliases:
                self._set_alias(artifact, alias)

    def model_name(self, kind: str) -> str:
        """The registered model an artifact kind maps to: ``<experiment>-<kind>``."""
        return f"{self.experiment}-{kind}"

    def _register(self, artifact: Artifact, source_uri: str) -> str:
        from mlflow.exceptions import MlflowException

        name = self.model_name(artifact.kind)
        if self._version_of(name, artifact.name) is not None:
            return name
        try:
            self.client.create_registered_model(name, description="ragops artifacts of one kind (mirrored from the ragops registry)")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        self.client.create_model_version(
            name, source=source_uri, run_id=self.run_id if self.run_id else None,
            tags={"ragops.artifact": artifact.name, "ragops.base_model": artifact.base_model},
        )  # fmt: skip
        return name

    def _version_of(self, model: str, artifact_name: str) -> str | None:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name = '{model}' and tags.`ragops.artifact` = '{artifact_name}'")
        except MlflowException:
            return None
        return found[0].version if found else None

    def _set_alias(self, artifact: Artifact, alias: str) -> None:
        model = self.model_name(artifact.kind)
        version = self._version_of(model, artifact.name)
        if version is None:
            return
        try:
            self.client.set_registered_model_alias(model, alias, version)
        except Exception as exc:  # e.g. an alias MLflow reserves ("latest", "v3"): skip that one
            sys.stderr.write(f"ragops: warning: alias '{alias}' not mirrored to MLflow: {str(exc).splitlines()[0][:200]}\n")

    def mirror_alias(self, registry: Registry, alias: str) -> None:
        """Point MLflow's alias where ragops' ``alias`` points now (after promote or rollback)."""
        target = (registry.aliases().get(alias) or {}).get("target")
        if not target or not self.register_models:
            return
        artifact = registry.get(target)
        self._submit(self._mirror, artifact, registry.storage.uri("artifacts", target), alias)

    def _mirror(self, artifact: Artifact, source_uri: str, alias: str) -> None:
        self._register(artifact, source_uri)
        self._set_alias(artifact, alias)


def log_eval_run(settings: Settings, kind: str, metrics: Mapping[str, Any], *, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, str] | None = None) -> str | None:  # fmt: skip
    """Record one evaluation (``eval-retrieval``, ``eval-answers``) as a finished MLflow run, when tracking is on.

    ``metrics`` may nest (``{"hybrid": {"ndcg@10": ...}}`` becomes ``hybrid.ndcg@10``); non-numeric
    values are dropped. Returns the MLflow run id (None when tracking is off or MLflow failed).
    """
    tracker = MlflowTracker.from_settings(settings)
    if tracker is None:
        return None
    try:
        from mlflow.entities import Metric, Param, RunTag

        exp = tracker.client.get_experiment_by_name(tracker.experiment)
        exp_id = exp.experiment_id if exp else tracker.client.create_experiment(tracker.experiment)
        run = tracker.client.create_run(exp_id, tags={"ragops.kind": kind, **dict(tags or {})}, run_name=kind)
        now = int(time.time() * 1000)
        values = _numbers(metrics)
        items = sorted(flatten({"settings": settings.model_dump(mode="json"), "eval": dict(params or {})}).items())
        for i in range(0, len(items), MAX_PARAMS_PER_BATCH):
            tracker.client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in items[i : i + MAX_PARAMS_PER_BATCH]])
        tracker.client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in values.items()],
                                 tags=[RunTag("ragops.version", str(__import__("ragops").__version__))])  # fmt: skip
        tracker.client.set_terminated(run.info.run_id, status="FINISHED")
        return run.info.run_id
    except Exception as exc:  # an evaluation's result is printed either way
        tracker._fail(exc)
        return None
    finally:
        tracker.close(timeout_s=1)



def _numbers(data: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested numeric values as MLflow metric names (``@`` is not allowed there: ``ndcg@10`` → ``ndcg_at_10``)."""
    out: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}".replace("@", "_at_")
        if isinstance(value, Mapping):
            out.update(_numbers(value, f"{name}."))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = float(value)
    return out
