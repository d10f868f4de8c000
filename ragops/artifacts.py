"""Registry of trained artifacts: versioned adapters, reward heads and packaged GGUF models.

Layout under the registry root (``<data_dir>/registry`` or a URI such as ``s3://bucket/reg``)::

    artifacts/<name>/artifact.json     manifest: kind, base model, parent, data hash, metrics, evals,
                                       code version, config, run id, files
    artifacts/<name>/adapter/          adapter_config.json + adapter_model.safetensors (peft)
    artifacts/<name>/model/model.gguf  a packaged GGUF model (kind ``gguf``, :mod:`ragops.packaging`)
    aliases.json                       {alias: {"target", "previous": [...], "log": [...]}}

Names look like ``sft-20261125-1530-ab12`` (kind, UTC time, 4 random hex digits); the run that
trained an artifact has the same id (see :mod:`ragops.runs`). Publishing moves the kind's
``-latest`` alias (``sft-latest``; ``reward-latest`` and ``rm-latest``; ``ppo-latest``;
``gguf-latest``).
:meth:`Registry.promote` points any alias at an artifact, optionally behind an evaluation gate,
and :meth:`Registry.rollback` moves an alias back to its previous target. Every alias move is
logged in ``aliases.json``.

Only safetensors, GGUF and JSON are ever written: no pickle (an HF checkpoint's
``training_args.bin`` or ``optimizer.pt`` never reaches the registry).

Storage goes through :mod:`pyarrow.fs` (:class:`ragops.storage.Storage`, re-exported here), so a
registry can live on S3/GCS; adapters and GGUF files from a remote registry are downloaded once
to ``<data_dir>/cache/registry/<name>`` for loading.
Alias updates on a local registry are serialised with a file lock; on object storage the
last writer wins (publish from one place).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ragops.artifact_manifest import (
    ALIAS_RE,
    ALLOWED_SUFFIXES,
    GGUF_FILE,
    KINDS,
    LATEST_ALIASES,
    MODEL_KINDS,
    NAME_RE,
    Artifact,
    ArtifactKind,
    PromoteResult,
    _check_alias,
    _jsonable,
    _require_adapter,
    code_version,
    new_name,
    utc_now,
)
from ragops.errors import InputError, ModelNotFoundError
from ragops.storage import Storage

if TYPE_CHECKING:
    from ragops.config import Settings

__all__ = [
    "ALIAS_RE", "ALLOWED_SUFFIXES", "ArtifactKind", "GGUF_FILE", "KINDS", "LATEST_ALIASES", "NAME_RE", "Artifact", "PromoteResult", "Registry", "Storage",
    "adapter_base", "adapter_dir", "apply_model", "code_version", "default_registry", "looks_like_ref",
    "new_name", "record_eval", "utc_now",
]  # fmt: skip

class Registry:
    """Artifacts and aliases under one root (a path or a URI).

    Args:
        root: Registry location.
        cache_dir: Local folder for adapters downloaded from a remote registry.
    """

    MANIFEST = "artifact.json"
    ALIASES = "aliases.json"

    def __init__(self, root: str | Path, cache_dir: str | Path | None = None) -> None:
        self.storage = Storage(root)
        self.cache_dir = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "ragops-registry-cache"

    @classmethod
    def from_settings(cls, settings: Settings) -> Registry:
        """The registry of ``settings``: ``finetune.registry_path`` or ``<data_dir>/registry``."""
        root = settings.finetune.registry_path or str(Path(settings.data_dir) / "registry")
        return cls(root, cache_dir=Path(settings.data_dir) / "cache" / "registry")

    def __repr__(self) -> str:
        return f"Registry({self.storage.root!r})"

    # -- reading -------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Artifact names, oldest first (names sort by time within a kind)."""
        names = [n for n in self.storage.list_dirs("artifacts") if self.storage.exists("artifacts", n, self.MANIFEST)]
        return sorted(names, key=lambda n: (self._load(n).created_at, n))

    def list(self, kind: str | None = None) -> list[Artifact]:
        """Every artifact (optionally of one kind), oldest first."""
        out = [self._load(n) for n in self.names()]
        return [a for a in out if kind is None or a.kind == kind]

    def aliases(self) -> dict[str, dict[str, Any]]:
        """``{alias: {"target", "previous", "log"}}``."""
        return self.storage.read_json(self.ALIASES) or {}

    def aliases_of(self, name: str) -> list[str]:
        """Aliases currently pointing at ``name``."""
        return sorted(a for a, rec in self.aliases().items() if rec.get("target") == name)

    def resolve(self, ref: str) -> str:
        """The artifact name for an artifact name or an alias.

        Raises:
            ModelNotFoundError: neither an artifact nor an alias (the message lists some).
        """
        if self.storage.exists("artifacts", ref, self.MANIFEST):
            return ref
        rec = self.aliases().get(ref)
        if rec and rec.get("target"):
            return str(rec["target"])
        known = list(self.aliases()) + self.names()[-5:]
        hint = f" (known: {', '.join(known)})" if known else " (the registry is empty: train one with `ragops train sft`)"
        raise ModelNotFoundError(f"no artifact or alias '{ref}' in the registry at {self.storage.uri()}{hint}")

    def has(self, ref: str) -> bool:
        """Whether ``ref`` names an artifact or an alias here."""
        try:
            self.resolve(ref)
            return True
        except ModelNotFoundError:
            return False

    def get(self, ref: str) -> Artifact:
        """The artifact for a name or an alias."""
        return self._load(self.resolve(ref))

    def _load(self, name: str) -> Artifact:
        data = self.storage.read_json("artifacts", name, self.MANIFEST)
        if data is None:
            raise ModelNotFoundError(f"artifact '{name}' has no {self.MANIFEST} in {self.storage.uri('artifacts', name)}")
        return Artifact.from_dict(data)

    def local_dir(self, ref: str) -> Path:
        """A local folder with the artifact's adapter (or encoder model) files, downloaded once from remote storage.

        Raises:
            ModelNotFoundError: unknown name, or a packaged GGUF (see :meth:`gguf_path`).
        """
        art = self.get(ref)
        _require_adapter(art)
        sub, marker = ("model", "config.json") if art.is_encoder else ("adapter", "adapter_config.json")
        local = self.storage.local_path("artifacts", art.name, sub)
        if local is not None:
            return local
        dest = self.cache_dir / art.name
        if not (dest / marker).is_file():
            self.storage.download_dir(f"artifacts/{art.name}/{sub}", dest)
        return dest

    def gguf_path(self, ref: str) -> Path:
        """The local GGUF file of a packaged model (downloaded once from remote storage).

        Raises:
            ModelNotFoundError: unknown name, or an artifact that is not a packaged GGUF.
        """
        art = self.get(ref)
        if not art.is_gguf:
            raise ModelNotFoundError(
                f"artifact '{art.name}' is a {art.kind} adapter, not a packaged GGUF model; "
                f"package it with `ragops models package {art.name}`"
            )
        rel = f"artifacts/{art.name}/{GGUF_FILE}"
        local = self.storage.local_path(rel)
        if local is not None:
            return local
        dest = self.cache_dir / art.name / GGUF_FILE
        if not dest.is_file() or dest.stat().st_size != art.lineage.get("size_bytes", dest.stat().st_size):
            self.storage.download_file(rel, dest)
        return dest

    def find_package(self, base_model: str, adapter_artifact: str | None = None, quant: str | None = None) -> Artifact | None:
        """The newest packaged GGUF built from ``base_model`` (+ ``adapter_artifact``), if any.

        Args:
            base_model: The base model as recorded (a built-in name or a path).
            adapter_artifact: The adapter artifact (name or alias) merged into it; None: a
                package of the bare base.
            quant: Only packages of this quantization (``f16``, ``q8_0``, ``q4_k_m``); None: any.
        """
        adapter = self.resolve(adapter_artifact) if adapter_artifact and self.has(adapter_artifact) else adapter_artifact
        for art in reversed(self.list(kind="gguf")):
            lin = art.lineage
            if lin.get("base_model") == base_model and lin.get("adapter") == adapter and quant in (None, lin.get("quant")):
                return art
        return None

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def staging(self, name: str) -> Iterator[Path]:
        """A local scratch folder to build artifact ``name`` in, removed when the block ends.

        On a local registry it lies under ``<root>/.tmp/`` (the same filesystem as
        ``artifacts/``), so :meth:`commit_staged` moves it in with one rename and a failure at
        any point (KeyboardInterrupt included) leaves nothing under ``artifacts/``.
        """
        local_root = self.storage.local_path(".tmp")
        parent = local_root if local_root is not None else self.cache_dir / ".tmp"
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(dir=parent, prefix=f"{name}-"))
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)  # already renamed away after a local commit

    def commit_staged(self, folder: Path, art: Artifact, *, move_latest: bool = True) -> Artifact:
        """Move a folder built in :meth:`staging` into ``artifacts/<art.name>`` with its manifest.

        The manifest is written inside the folder before a local rename, or uploaded last to a
        remote registry, so the registry never lists a half-written artifact.

        Raises:
            InputError: the name is already taken.
        """
        if self.storage.exists("artifacts", art.name):
            raise InputError(f"artifact '{art.name}' already exists in {self.storage.uri()}")
        target = self.storage.local_path("artifacts", art.name)
        if target is not None:
            (folder / self.MANIFEST).write_text(json.dumps(art.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder, target)
        else:
            for f in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != self.MANIFEST):
                self.storage.upload(f, f"artifacts/{art.name}/{f.relative_to(folder).as_posix()}")
            self.storage.write_json(f"artifacts/{art.name}/{self.MANIFEST}", art.to_dict())
        if move_latest:
            for alias in LATEST_ALIASES[art.kind]:
                self.set_alias(alias, art.name, action="publish")
        return art


    def publish(
        self,
        source_dir: str | Path,
        *,
        kind: str,
        base_model: str,
        name: str | None = None,
        task: str = "causal-lm",
        parent: str | None = None,
        run_id: str | None = None,
        data_hash: str | None = None,
        config: Mapping[str, Any] | None = None,
        metrics: Mapping[str, Any] | None = None,
        tags: Mapping[str, str] | None = None,
        move_latest: bool = True,
    ) -> Artifact:
        """Copy an adapter folder into the registry and move the kind's ``-latest`` aliases.

        Only safetensors and JSON/text files are copied (never pickles); the manifest is written
        last, so a half-copied artifact is never listed.

        Args:
            source_dir: Folder written by peft's ``save_pretrained``.
            kind: ``sft``, ``reward`` or ``ppo``.
            base_model: The base model as configured.
            name: Artifact name (default: a fresh one; runs pass their id).
            task, parent, run_id, data_hash, config, metrics, tags: Recorded in the manifest.
            move_latest: Point ``<kind>-latest`` (and ``rm-latest`` for reward) at it.

        Raises:
            InputError: unknown kind, a source without adapter weights, or a name already taken.
        """
        src = Path(source_dir)
        if kind not in KINDS or kind == "gguf":
            adapters = [k for k in KINDS if k != "gguf"]
            hint = " (a GGUF is written by ragops.packaging.package_model)" if kind == "gguf" else ""
            raise InputError(f"unknown adapter kind '{kind}'; allowed: {', '.join(adapters)}{hint}")
        # Embedders and cross-encoders are whole (small) models, fully fine-tuned: no adapter.
        whole = kind in MODEL_KINDS
        marker, sub = ("config.json", "model") if whole else ("adapter_config.json", "adapter")
        if not (src / marker).is_file() or not list(src.rglob("*.safetensors")):
            raise InputError(f"{src}: no {marker} and *.safetensors to publish")
        name = name or new_name(kind)
        if self.storage.exists("artifacts", name, self.MANIFEST):
            raise InputError(f"artifact '{name}' already exists in {self.storage.uri()}")
        files = []
        for f in sorted(p for p in src.rglob("*") if p.is_file()):
            rel = f.relative_to(src).as_posix()
            if f.suffix not in ALLOWED_SUFFIXES or rel.startswith("."):
                continue  # pickles (optimizer.pt, training_args.bin, rng states) stay out
            if f.name == "adapter_config.json":
                cfg = json.loads(f.read_text(encoding="utf-8"))
                # The training-time path of the base (a cache folder) means nothing elsewhere.
                cfg["base_model_name_or_path"] = base_model
                self.storage.write_json(f"artifacts/{name}/{sub}/{rel}", cfg)
            else:
                self.storage.upload(f, f"artifacts/{name}/{sub}/{rel}")
            files.append(rel)
        art = Artifact(
            name=name,
            kind=kind,
            created_at=utc_now(),
            base_model=base_model,
            task=task,
            format="sentence-transformers" if whole else "peft-lora",
            parent=parent,
            run_id=run_id,
            data_hash=data_hash,
            code_version=code_version(),
            config=dict(config or {}),
            metrics=_jsonable(dict(metrics or {})),
            files=files,
            tags=dict(tags or {}),
        )
        self.storage.write_json(f"artifacts/{name}/{self.MANIFEST}", art.to_dict())
        if move_latest:
            for alias in LATEST_ALIASES[kind]:
                self.set_alias(alias, name, action="publish")
        return art

    def set_alias(self, alias: str, ref: str, *, action: str = "promote", note: str | None = None) -> str | None:
        """Point ``alias`` at an artifact; return its previous target.

        The previous target is pushed on the alias's ``previous`` stack (what rollback pops)
        and the move is appended to its ``log``.

        Raises:
            InputError: a malformed alias or one that is an artifact name.
            ModelNotFoundError: ``ref`` does not resolve.
        """
        _check_alias(alias)
        name = self.resolve(ref)
        with self.storage.lock(self.ALIASES):
            data = self.aliases()
            rec = data.setdefault(alias, {"target": None, "previous": [], "log": []})
            old = rec.get("target")
            if old == name:
                return old
            if old:
                rec["previous"].append(old)
            rec["target"] = name
            rec["log"].append({"at": utc_now(), "action": action, "from": old, "to": name, **({"note": note} if note else {})})
            self.storage.write_json(self.ALIASES, data)
        return old

    def promote(
        self,
        ref: str,
        alias: str,
        *,
        require_metric: str | None = None,
        baseline: str | None = None,
        higher_is_better: bool | None = None,
    ) -> PromoteResult:
        """Point ``alias`` at ``ref``, behind an optional evaluation gate.

        With ``require_metric``, the candidate's recorded metric is compared with the baseline's
        (``baseline`` — an alias or name — or the alias's current target); a worse value refuses
        the promotion. No baseline yet (a new alias) passes.

        Raises:
            InputError: the gate refused, or the candidate has no value for the metric.
        """
        name = self.resolve(ref)
        gate = self.check_gate(name, alias, require_metric=require_metric, baseline=baseline, higher_is_better=higher_is_better)
        previous = self.set_alias(alias, name, action="promote")
        return PromoteResult(alias=alias, name=name, previous=previous, gate=gate)

    def check_gate(
        self,
        ref: str,
        alias: str,
        *,
        require_metric: str | None = None,
        baseline: str | None = None,
        higher_is_better: bool | None = None,
        tolerance: float = 0.0,
    ) -> dict[str, Any] | None:
        """The evaluation gate of :meth:`promote`, without moving anything.

        ``ragops models promote --package`` asks it before packaging, so a refused promotion
        does not cost a conversion.

        Returns:
            The gate's verdict (None without ``require_metric``).

        Raises:
            InputError: the gate refused, or the candidate has no value for the metric.
        """
        from ragops.finetune.gate import compare_metrics, metric_direction

        if not require_metric:
            return None
        name = self.resolve(ref)
        base_ref = baseline or (self.aliases().get(alias) or {}).get("target")
        before = self.get(base_ref).metrics if base_ref else {}
        after = self._load(name).metrics
        hib = metric_direction(require_metric) if higher_is_better is None else higher_is_better
        result = compare_metrics(before, after, require_metric, higher_is_better=hib, tolerance=tolerance)
        if not result.passed:
            raise InputError(f"promotion of {name} to '{alias}' refused: {result.reason}")
        return {**result.to_dict(), "baseline": self.resolve(base_ref) if base_ref else None}

    def rollback(self, alias: str) -> PromoteResult:
        """Move ``alias`` back to its previous target (popping the ``previous`` stack).

        Raises:
            InputError: unknown alias, or no previous target to go back to.
        """
        with self.storage.lock(self.ALIASES):
            data = self.aliases()
            rec = data.get(alias)
            if rec is None:
                raise InputError(f"unknown alias '{alias}' (known: {', '.join(sorted(data)) or 'none'})")
            if not rec.get("previous"):
                raise InputError(f"alias '{alias}' has no previous target to roll back to (it points at {rec.get('target')})")
            old = rec.get("target")
            rec["target"] = rec["previous"].pop()
            rec["log"].append({"at": utc_now(), "action": "rollback", "from": old, "to": rec["target"]})
            self.storage.write_json(self.ALIASES, data)
        return PromoteResult(alias=alias, name=rec["target"], previous=old)

    def record_eval(self, ref: str, metrics: Mapping[str, Any], *, source: str = "eval") -> Artifact:
        """Attach evaluation metrics to an artifact (``ragops eval answers --model NAME``).

        The record is appended to ``evals`` and its values are merged into ``metrics``, so the
        promotion gate compares the latest evaluation.
        """
        name = self.resolve(ref)
        rel = f"artifacts/{name}/{self.MANIFEST}"
        with self.storage.lock(rel):
            art = self._load(name)
            clean = _jsonable(dict(metrics))
            art.evals.append({"at": utc_now(), "source": source, "metrics": clean})
            art.metrics.update(clean)
            self.storage.write_json(rel, art.to_dict())
        return art


# ---------------------------------------------------------------------------------------
# Module-level helpers (CLI, serving, eval)
# ---------------------------------------------------------------------------------------


def _as_registry(registry: Registry | Settings | str | Path | None) -> Registry:
    if isinstance(registry, Registry):
        return registry
    if registry is None:
        return default_registry()
    if isinstance(registry, (str, Path)):
        return Registry(registry)
    return Registry.from_settings(registry)


def default_registry() -> Registry:
    """The registry of the settings found in the environment (``RAGOPS_HOME``, ``RAGOPS_FINETUNE__*``).

    Used when only a name is at hand (``generator.adapter: sft-latest`` in a serving config).
    """
    from ragops.config import load_settings

    return Registry.from_settings(load_settings())


def record_eval(
    name: str, metrics: Mapping[str, Any], *, registry: Registry | Settings | str | Path | None = None, source: str = "eval"
) -> Artifact:
    """Record evaluation metrics on an artifact (what ``ragops eval answers --model NAME`` calls).

    Args:
        name: Artifact name or alias.
        metrics: Metric values, e.g. ``{"answer_f1": 0.41, "citation_precision": 0.7}``.
        registry: A :class:`Registry`, settings, or a registry path/URI; None: :func:`default_registry`.
        source: What produced the metrics (kept with the record).
    """
    return _as_registry(registry).record_eval(name, metrics, source=source)


def looks_like_ref(ref: str) -> bool:
    """Whether ``ref`` could be a registry name or alias rather than a filesystem path."""
    return bool(ALIAS_RE.match(ref)) and "/" not in ref and not Path(ref).expanduser().exists()


def adapter_dir(ref: str, *, registry: Registry | Settings | str | Path | None = None) -> Path:
    """Local adapter folder of a generator artifact (name or alias).

    Raises:
        ModelNotFoundError: unknown name, or an artifact that is not a generator adapter (a
            reward model, or a packaged GGUF, which is a whole model).
    """
    reg = _as_registry(registry)
    art = reg.get(ref)
    _require_adapter(art)
    if art.task != "causal-lm":
        raise ModelNotFoundError(
            f"artifact '{art.name}' is a {art.kind} model ({art.task}), not a generator adapter; "
            "use an sft or ppo artifact for generation"
        )
    return reg.local_dir(art.name)


def adapter_base(ref: str, *, registry: Registry | Settings | str | Path | None = None) -> str:
    """The base model an artifact was trained on (what ``generator.model`` must be)."""
    return _as_registry(registry).get(ref).base_model


def apply_model(settings: Settings, ref: str) -> Settings:
    """Settings whose generator runs artifact ``ref``: its base model plus its adapter folder.

    A packaged GGUF artifact (kind ``gguf``) becomes the model itself (its local file), with no
    adapter.

    A built-in generator name or a full local model folder switches the base model instead.
    This is how ``ragops ask --model NAME`` (and serving) should switch models: the base is
    *switched* to the artifact's base, because an adapter merged into another base either
    fails on shapes or silently produces garbage. A local adapter path is applied as is.

    Raises:
        ModelNotFoundError: unknown name or alias, or a reward artifact.
    """
    from ragops.model_registry import BUILTIN_MODELS

    path = Path(ref).expanduser()
    if any(ref == m.name for m in BUILTIN_MODELS if m.kind == "generator") or (path / "config.json").exists():
        # A base model (registry name or a full local model folder), not an adapter.
        gen = settings.generator.model_copy(update={"model": ref, "adapter": None})
        return settings.model_copy(update={"generator": gen})
    if path.exists():
        gen = settings.generator.model_copy(update={"adapter": str(path)})
        return settings.model_copy(update={"generator": gen})
    reg = Registry.from_settings(settings)
    if reg.get(ref).is_gguf:
        # A whole model: resolve_model turns the .gguf path into a spec with gguf_file set.
        gen = settings.generator.model_copy(update={"model": str(reg.gguf_path(ref)), "adapter": None})
        return settings.model_copy(update={"generator": gen})
    folder = adapter_dir(ref, registry=reg)
    gen = settings.generator.model_copy(update={"adapter": str(folder), "model": adapter_base(ref, registry=reg)})
    return settings.model_copy(update={"generator": gen})
