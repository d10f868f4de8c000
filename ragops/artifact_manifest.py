"""Artifact manifests and names: the :class:`Artifact` record (``artifact.json``), artifact
kinds, the name and alias formats, and the code version stamped on every artifact and run.

Split from :mod:`ragops.artifacts` (the registry), which re-exports everything here.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from ragops.errors import InputError, ModelNotFoundError

ArtifactKind = Literal["sft", "reward", "ppo", "gguf", "embedder", "reranker"]
KINDS: tuple[str, ...] = ("sft", "reward", "ppo", "gguf", "embedder", "reranker")
#: Kinds published as a whole sentence-transformers model (``model/``), not a LoRA adapter.
MODEL_KINDS: tuple[str, ...] = ("embedder", "reranker")
#: Aliases moved by publishing an artifact of each kind.
LATEST_ALIASES: dict[str, tuple[str, ...]] = {
    "sft": ("sft-latest",),
    "reward": ("reward-latest", "rm-latest"),
    "ppo": ("ppo-latest",),
    "gguf": ("gguf-latest",),
    "embedder": ("embedder-latest",),
    "reranker": ("reranker-latest",),
}
NAME_RE = re.compile(r"^(sft|reward|ppo|gguf|embedder|reranker)-\d{8}-\d{4,6}-[0-9a-f]{4}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Where a packaged GGUF model lies inside its artifact folder.
GGUF_FILE = "model/model.gguf"
#: Files an artifact may contain: weights as safetensors, everything else JSON / text.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jsonl", ".jinja", ".txt", ".md", ".model")


def utc_now() -> str:
    """ISO-8601 UTC timestamp with milliseconds (sortable), e.g. ``2026-11-25T15:30:12.345Z``."""
    now = datetime.now(timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


def new_name(kind: str, now: datetime | None = None) -> str:
    """A fresh artifact / run name: ``<kind>-YYYYMMDD-HHMM-xxxx``."""
    if kind not in KINDS:
        raise InputError(f"unknown artifact kind '{kind}'; allowed: {', '.join(KINDS)}")
    now = now or datetime.now(timezone.utc)
    return f"{kind}-{now:%Y%m%d-%H%M}-{secrets.token_hex(2)}"


def code_version() -> dict[str, Any]:
    """``{"ragops": __version__, "git": commit or None, "dirty": bool or None}``.

    Git is asked read-only (``--no-optional-locks`` keeps ``status`` from refreshing the index).
    """
    import ragops

    info: dict[str, Any] = {"ragops": ragops.__version__, "git": None, "dirty": None}
    repo = Path(ragops.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return info
    try:
        env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=5, env=env, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "--no-optional-locks", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, timeout=5, env=env, check=True,
        ).stdout  # fmt: skip
        info["git"], info["dirty"] = sha or None, bool(status.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    return info


# ---------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """One published artifact (its ``artifact.json``).

    Attributes:
        name: ``<kind>-YYYYMMDD-HHMM-xxxx``; the training run has the same id. A packaged GGUF
            may carry a chosen name (``ragops models package NAME --as smol-q8``).
        kind: ``sft``, ``reward``, ``ppo`` or ``gguf``.
        created_at: UTC publish time.
        base_model: The base model as configured (registry name or path); serving loads it and
            applies the adapter on top.
        task: ``causal-lm`` (a generator adapter) or ``seq-cls`` (a reward model: LoRA plus the
            scalar score head).
        format: ``peft-lora`` (files under ``adapter/``), ``gguf`` (``model/model.gguf``: a
            whole model, base plus merged adapter, that llama.cpp and transformers load) or
            ``sentence-transformers`` (an embedder or cross-encoder folder under ``model/``).
        parent: The artifact this one was trained from (PPO starts from an SFT adapter), if any.
        run_id: The run that produced it (``ragops runs show``).
        data_hash: SHA-256 of the training data files.
        code_version: ``{"ragops", "git", "dirty"}``.
        config: Training settings (trainer, LoRA, scaling).
        metrics: Final training metrics, merged with the latest recorded evaluation.
        evals: Evaluations recorded after publishing (``record_eval``), oldest first.
        files: Files under ``adapter/`` (``model/`` for a GGUF).
        tags: The run's key/value tags.
        lineage: For a packaged GGUF, where it came from: ``source`` (what was packaged),
            ``source_artifact`` and ``adapter`` (artifact names or None), ``base_model``,
            ``quant``, ``sha256`` and ``size_bytes`` of the file, ``tools`` (versions of gguf,
            llama_cpp, transformers, torch, peft, ragops) and ``created_at``. Empty otherwise.
    """

    name: str
    kind: str
    created_at: str
    base_model: str
    task: str = "causal-lm"
    format: str = "peft-lora"
    parent: str | None = None
    run_id: str | None = None
    data_hash: str | None = None
    code_version: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    evals: list[dict[str, Any]] = field(default_factory=list)
    files: list[str] = field(default_factory=list)
    tags: dict[str, str] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def is_gguf(self) -> bool:
        """Whether this is a packaged GGUF model (not an adapter)."""
        return self.format == "gguf"

    @property
    def is_encoder(self) -> bool:
        """Whether this is a whole retrieval model (an embedder or a cross-encoder), not an adapter."""
        return self.kind in MODEL_KINDS

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Artifact:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class PromoteResult:
    """What :meth:`Registry.promote` did.

    Attributes:
        alias: The alias moved.
        name: Its new target.
        previous: Its target before, if any.
        gate: The evaluation gate's verdict (``GateResult.to_dict()``) when one was required.
    """

    alias: str
    name: str
    previous: str | None
    gate: dict[str, Any] | None = None


def _require_adapter(art: Artifact) -> None:
    if art.is_gguf:
        raise ModelNotFoundError(
            f"artifact '{art.name}' is a packaged GGUF model ({art.lineage.get('quant', '?')}), not a LoRA adapter: "
            f"use it as the model itself (--model {art.name}, or generator.model)"
        )


def _check_alias(alias: str) -> None:
    if not ALIAS_RE.match(alias):
        raise InputError(f"alias '{alias}': use lower-case letters, digits, '.', '_' or '-' (max 64 characters)")
    if NAME_RE.match(alias):
        raise InputError(f"alias '{alias}' looks like an artifact name; pick a name such as 'prod' or 'staging'")


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
            v = v.item()
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[str(k)] = v
        elif isinstance(v, dict):
            out[str(k)] = _jsonable(v)
        elif isinstance(v, (list, tuple)):
            out[str(k)] = [x if isinstance(x, (str, int, float, bool)) or x is None else str(x) for x in v]
        else:
            out[str(k)] = str(v)
    return out
