"""Loop runs recorded in the registry: one JSON record per run of ``ragops loop``.

Layout under the registry root::

    loops/<alias>/<loop-id>/loop.json       the record (status, each step's outcome)
    loops/<alias>/<loop-id>/feedback.jsonl  the feedback this loop trains on (a snapshot)

A record is rewritten whole after every change (atomic on a local disk, whole objects on
object storage), so a loop killed at any point leaves the last finished step recorded; the
next ``ragops loop`` continues at the step that did not finish and never repeats one that
did. A training step records its run id as soon as the run exists, so a killed PPO resumes
from its latest checkpoint instead of starting again.
"""

from __future__ import annotations

import secrets
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ragops.errors import InputError
from ragops.storage import Storage

#: The steps of one loop, in order.
STEPS = ("collect", "reward", "ppo", "eval", "gate", "canary")
#: Statuses: running (steps left), canary (A/B split live, waiting for --decide), and the ends.
RUNNING, CANARY, REJECTED, PROMOTED, ROLLED_BACK = "running", "canary", "rejected", "promoted", "rolled_back"
FINISHED = (REJECTED, PROMOTED, ROLLED_BACK)


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class LoopRecord:
    """One run of the loop for one alias.

    Attributes:
        id: ``loop-YYYYMMDD-HHMMSS-xxxx`` (sorts by start time).
        alias: The alias the loop improves (its target is the control).
        route: The served name whose traffic is split for the canary.
        control: The alias' target when the loop started.
        since: Unix time after which feedback was taken (the previous loop's ``cutoff``).
        cutoff: Unix time of the newest feedback this loop took.
        status: running | canary | rejected | promoted | rolled_back.
        steps: ``{step: {"status": "running" | "done" | "skipped", ...outcome}}``.
        candidate: The PPO artifact, once trained.
        decision: What ``--decide`` concluded (verdict, report summary).
    """

    id: str
    alias: str
    route: str
    control: str
    since: float
    cutoff: float
    status: str = RUNNING
    created_at: str = field(default_factory=_now)
    updated_at: str = field(default_factory=_now)
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    candidate: str | None = None
    decision: dict[str, Any] | None = None
    reason: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoopRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def done(self, step: str) -> bool:
        """Whether ``step`` finished (done or skipped) in this loop."""
        return self.steps.get(step, {}).get("status") in ("done", "skipped")

    def next_step(self) -> str | None:
        """The first step that has not finished (None: all finished)."""
        return next((s for s in STEPS if not self.done(s)), None)


def new_loop_id() -> str:
    return f"loop-{datetime.now(timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


class LoopStore:
    """The loop records of a registry.

    Args:
        storage: The registry's storage.
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    @staticmethod
    def _dir(alias: str, loop_id: str) -> str:
        return f"loops/{alias}/{loop_id}"

    def save(self, rec: LoopRecord) -> LoopRecord:
        """Write the record (after stamping ``updated_at``)."""
        rec.updated_at = _now()
        self.storage.write_json(f"{self._dir(rec.alias, rec.id)}/loop.json", rec.to_dict())
        return rec

    def list(self, alias: str) -> list[LoopRecord]:
        """The alias' loops, oldest first."""
        out = []
        for loop_id in sorted(self.storage.list_dirs("loops", alias)):
            data = self.storage.read_json("loops", alias, loop_id, "loop.json")
            if isinstance(data, dict):
                out.append(LoopRecord.from_dict(data))
        return out

    def latest(self, alias: str) -> LoopRecord | None:
        loops = self.list(alias)
        return loops[-1] if loops else None

    def get(self, alias: str, loop_id: str) -> LoopRecord:
        data = self.storage.read_json("loops", alias, loop_id, "loop.json")
        if not isinstance(data, dict):
            raise InputError(f"no loop '{loop_id}' for alias '{alias}'")
        return LoopRecord.from_dict(data)

    def write_snapshot(self, rec: LoopRecord, lines: list[str]) -> None:
        """Store the feedback the loop trains on, next to its record."""
        self.storage.write_text(f"{self._dir(rec.alias, rec.id)}/feedback.jsonl", "".join(lines))

    def snapshot_path(self, rec: LoopRecord, cache_dir: Path) -> Path:
        """The snapshot as a local file for the trainers (downloaded once from a remote registry)."""
        rel = f"{self._dir(rec.alias, rec.id)}/feedback.jsonl"
        local = self.storage.local_path(rel)
        if local is not None:
            return local
        dest = cache_dir / rec.id / "feedback.jsonl"
        return dest if dest.is_file() else self.storage.download_file(rel, dest)
