"""Training run records: what ran, on what data, with which tags, and its per-step metrics.

Each run has a folder under the runs root (``<data_dir>/runs`` or ``finetune.storage_path``, a
path or URI); Ray Train writes its checkpoints into the same folder (``RunConfig(name=run_id,
storage_path=runs root)``), so a run is one self-contained directory::

    <runs>/<run_id>/run.json           the record (status, kind, data hash, tags, steps, artifact)
    <runs>/<run_id>/metrics.jsonl      one line per logged step: loss, learning_rate, tokens_per_s,
                                       eval_loss, ... (appended while training)
    <runs>/<run_id>/metrics.parquet    the same, de-duplicated, written when the run ends
    <runs>/<run_id>/checkpoint_*/      Ray Train checkpoints (resume state)

A step logged twice (a worker group restarted from an earlier checkpoint) keeps its last value.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ragops.artifacts import Storage, new_name, utc_now
from ragops.errors import InputError

if TYPE_CHECKING:
    from ragops.config import Settings

RunStatus = Literal["running", "finished", "failed", "interrupted"]
UNFINISHED: tuple[str, ...] = ("running", "failed", "interrupted")


@dataclass
class RunRecord:
    """One training run (its ``run.json``).

    Attributes:
        run_id: ``<kind>-YYYYMMDD-HHMM-xxxx``; the published artifact has the same name.
        kind: ``sft``, ``reward`` or ``ppo``.
        status: running, finished, failed or interrupted.
        created_at, updated_at, finished_at: UTC timestamps.
        base_model: The base model as configured.
        data: ``{"files", "hash", "train_examples", "eval_examples"}``.
        config: The trainer settings used.
        scaling: ``{"runner", "workers", "use_gpu", "cpus_per_worker"}``.
        tags: Key/value tags (``--tag k=v``).
        planned_steps: Optimizer steps the run will take (known once training starts).
        step: Last optimizer step reported.
        last_checkpoint: Location of the latest checkpoint (resume point).
        metrics: Final metrics (train loss, eval loss, pairwise accuracy, throughput, ...).
        artifact: Name of the published artifact.
        parent: Artifact the run started from, if any.
        attempts: Times the run was started (``--resume`` adds one; worker restarts are in ``restarts``).
        restarts: Worker-group restarts after failures (Ray Train FailureConfig).
        error: Last error message of a failed run.
        pid, host: The driver process, to tell a live run from an abandoned one.
        mlflow_run_id: The run's mirror in MLflow (``tracking.mlflow_uri``), reopened on resume.
    """

    run_id: str
    kind: str
    status: str = "running"
    created_at: str = field(default_factory=utc_now)
    updated_at: str = field(default_factory=utc_now)
    finished_at: str | None = None
    base_model: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    scaling: dict[str, Any] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    planned_steps: int | None = None
    step: int = 0
    last_checkpoint: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    artifact: str | None = None
    parent: str | None = None
    attempts: int = 1
    restarts: int = 0
    error: str | None = None
    pid: int | None = None
    host: str | None = None
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def matches(self, tags: Mapping[str, str]) -> bool:
        """Whether every ``k=v`` in ``tags`` is set on this run."""
        return all(self.tags.get(k) == v for k, v in tags.items())

    def is_alive(self) -> bool:
        """Whether the run's driver still runs on this host (a 'running' record may be abandoned)."""
        if self.status != "running" or self.pid is None or self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return False  # this process trains synchronously: an earlier run of it has stopped
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


class RunStore:
    """Run folders under one root (a path or a URI).

    Args:
        root: The runs root; also Ray Train's ``storage_path``.
    """

    RECORD = "run.json"
    METRICS = "metrics.jsonl"
    PARQUET = "metrics.parquet"

    def __init__(self, root: str | Path) -> None:
        self.storage = Storage(root)

    @classmethod
    def from_settings(cls, settings: Settings) -> RunStore:
        """``finetune.storage_path`` or ``<data_dir>/runs``."""
        return cls(settings.finetune.storage_path or str(Path(settings.data_dir) / "runs"))

    @property
    def uri(self) -> str:
        """The root as Ray Train's ``storage_path`` expects it."""
        return self.storage.uri()

    def run_uri(self, run_id: str) -> str:
        return self.storage.uri(run_id)

    # -- records -------------------------------------------------------------------------

    def create(self, kind: str, **fields: Any) -> RunRecord:
        """Create and save a new run record (status running)."""
        run_id = fields.pop("run_id", None) or new_name(kind)
        rec = RunRecord(run_id=run_id, kind=kind, pid=os.getpid(), host=socket.gethostname(), **fields)
        self.save(rec)
        return rec

    def save(self, rec: RunRecord) -> None:
        rec.updated_at = utc_now()
        self.storage.write_json(f"{rec.run_id}/{self.RECORD}", rec.to_dict())

    def update(self, run_id: str, **changes: Any) -> RunRecord:
        """Read-modify-write a record (serialised by a lock on local storage)."""
        with self.storage.lock(f"{run_id}/{self.RECORD}"):
            rec = self.get(run_id)
            for k, v in changes.items():
                setattr(rec, k, v)
            self.save(rec)
        return rec

    def ids(self) -> list[str]:
        return [d for d in self.storage.list_dirs() if self.storage.exists(d, self.RECORD)]

    def get(self, ref: str) -> RunRecord:
        """A run by id, unique id prefix, or artifact name.

        Raises:
            InputError: no such run, or an ambiguous prefix.
        """
        data = self.storage.read_json(ref, self.RECORD) if "/" not in ref else None
        if data is not None:
            return RunRecord.from_dict(data)
        ids = self.ids()
        hits = [i for i in ids if i.startswith(ref)]
        if len(hits) == 1:
            return RunRecord.from_dict(self.storage.read_json(hits[0], self.RECORD))
        if len(hits) > 1:
            raise InputError(f"run '{ref}' is ambiguous: {', '.join(hits[:5])}")
        for rid in ids:  # an artifact name resolves to its run
            rec = RunRecord.from_dict(self.storage.read_json(rid, self.RECORD))
            if rec.artifact == ref:
                return rec
        raise InputError(f"no run '{ref}' under {self.uri} (see `ragops runs list`)")

    def list(self, *, kind: str | None = None, tags: Mapping[str, str] | None = None) -> list[RunRecord]:
        """Runs, oldest first, filtered by kind and tags."""
        recs = []
        for rid in self.ids():
            data = self.storage.read_json(rid, self.RECORD)
            if data is None:
                continue
            rec = RunRecord.from_dict(data)
            if (kind is None or rec.kind == kind) and rec.matches(tags or {}):
                recs.append(rec)
        return sorted(recs, key=lambda r: (r.created_at, r.run_id))

    def find_resumable(self, kind: str, data_hash: str) -> RunRecord | None:
        """The latest unfinished run of ``kind`` on the same data (``--resume auto``).

        A 'running' record whose driver is still alive is skipped: it is not interrupted.
        """
        for rec in reversed(self.list(kind=kind)):
            if rec.status in UNFINISHED and rec.data.get("hash") == data_hash and not rec.is_alive():
                return rec
        return None

    # -- metrics -------------------------------------------------------------------------

    def append_metrics(self, run_id: str, rows: Iterable[Mapping[str, Any]]) -> None:
        """Append per-step metric rows (JSON lines)."""
        lines = "".join(json.dumps(dict(r), sort_keys=True, default=str) + "\n" for r in rows)
        if lines:
            self.storage.append_text(f"{run_id}/{self.METRICS}", lines)

    def metrics(self, run_id: str) -> list[dict[str, Any]]:
        """Per-step rows, one per (step, train|eval), the last write winning, in step order."""
        text = self.storage.read_text(run_id, self.METRICS) or ""
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for line in text.splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue  # a torn last line (crash mid-write)
            # Training and evaluation rows of one step are kept apart (train first).
            key = (int(row.get("step", 0)), 1 if any(k.startswith("eval_") for k in row) else 0)
            rows[key] = row
        return [rows[k] for k in sorted(rows)]

    def write_parquet(self, run_id: str) -> str | None:
        """Write the de-duplicated metrics as Parquet next to the JSONL; return its location."""
        rows = self.metrics(run_id)
        if not rows:
            return None
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = sorted({k for r in rows for k in r})
        columns = {}
        for k in keys:
            values = [r.get(k) for r in rows]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) or v is None for v in values):
                columns[k] = pa.array([None if v is None else float(v) for v in values], type=pa.float64())
            else:
                columns[k] = pa.array([None if v is None else str(v) for v in values], type=pa.string())
        table = pa.table(columns)
        path = self.storage.path(run_id, self.PARQUET)
        pq.write_table(table, path, filesystem=self.storage.fs)
        return self.storage.uri(run_id, self.PARQUET)

    # -- comparison ----------------------------------------------------------------------

    def compare(self, *refs: str) -> dict[str, Any]:
        """Side-by-side summary of two or more runs: settings that differ and final metrics.

        Returns:
            ``{"runs": [ids], "rows": [{"key", "values", ...}], "config_diff": [{"key", "values", ...}]}``;
            with exactly two runs every row also has ``a``, ``b`` and (rows) ``delta`` = B - A.

        Raises:
            InputError: fewer than two runs, or one named twice.
        """
        from ragops.errors import InputError

        if len(refs) < 2:
            raise InputError("compare needs at least two runs")
        recs = [self.get(r) for r in refs]
        ids = [r.run_id for r in recs]
        if len(set(ids)) != len(ids):
            raise InputError(f"a run is named twice: {', '.join(refs)}")

        def row(key: str, values: list[Any], delta: bool) -> dict[str, Any]:
            out: dict[str, Any] = {"key": key, "values": values}
            if len(values) == 2:
                out["a"], out["b"] = values
                if delta:  # B - A of numbers; None for the identity rows
                    out["delta"] = values[1] - values[0] if all(_is_num(v) for v in values) else None
            return out

        identity = ("kind", "status", "base_model", "planned_steps", "step", "artifact")
        rows = [row(key, [getattr(r, key) for r in recs], False) for key in identity]
        rows.append(row("data.hash", [r.data.get("hash") for r in recs], False))
        if len(recs) == 2:
            for r in rows:
                r["delta"] = None
        for key in sorted(set().union(*(r.metrics for r in recs))):
            rows.append(row(key, [r.metrics.get(key) for r in recs], True))
        diff = []
        flat = [_flatten(r.config) for r in recs]
        for key in sorted(set().union(*flat)):
            values = [f.get(key) for f in flat]
            if any(v != values[0] for v in values):
                diff.append(row(key, values, False))
        for key in sorted(set().union(*(r.tags for r in recs))):
            values = [r.tags.get(key) for r in recs]
            if any(v != values[0] for v in values):
                diff.append(row(f"tag.{key}", values, False))
        return {"runs": ids, "rows": rows, "config_diff": diff}

    def curves(self, run_ids: Sequence[str], metrics: Sequence[str]) -> dict[str, dict[str, list[tuple[int, float]]]]:
        """``{metric: {run_id: [(step, value), ...]}}`` from the runs' per-step rows."""
        out: dict[str, dict[str, list[tuple[int, float]]]] = {m: {} for m in metrics}
        for run_id in run_ids:
            rows = self.metrics(run_id)
            for m in metrics:
                points = sorted({int(r["step"]): float(r[m]) for r in rows if _is_num(r.get(m)) and "step" in r}.items())
                if points:
                    out[m][run_id] = points
        return out


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out
