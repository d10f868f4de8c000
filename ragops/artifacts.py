"""Registry of trained artifacts: versioned adapters and reward heads that serving loads.

Layout under the registry root (``<data_dir>/registry`` or a URI such as ``s3://bucket/reg``)::

    artifacts/<name>/artifact.json     manifest: kind, base model, parent, data hash, metrics, evals,
                                       code version, config, run id, files
    artifacts/<name>/adapter/          adapter_config.json + adapter_model.safetensors (peft)
    aliases.json                       {alias: {"target", "previous": [...], "log": [...]}}

Names look like ``sft-20261125-1530-ab12`` (kind, UTC time, 4 random hex digits); the run that
trained an artifact has the same id (see :mod:`ragops.runs`). Publishing moves the kind's
``-latest`` alias (``sft-latest``; ``reward-latest`` and ``rm-latest``; ``ppo-latest``).
:meth:`Registry.promote` points any alias at an artifact, optionally behind an evaluation gate,
and :meth:`Registry.rollback` moves an alias back to its previous target. Every alias move is
logged in ``aliases.json``.

Only safetensors and JSON are ever written: no pickle (an HF checkpoint's ``training_args.bin``
or ``optimizer.pt`` never reaches the registry).

Storage goes through :mod:`pyarrow.fs`, so a registry can live on S3/GCS; adapters from a
remote registry are downloaded once to ``<data_dir>/cache/registry/<name>`` for loading.
Alias updates on a local registry are serialised with a file lock; on object storage the
last writer wins (publish from one place).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ragops.errors import ConfigError, InputError, ModelNotFoundError

if TYPE_CHECKING:
    import pyarrow.fs as pafs

    from ragops.config import Settings

ArtifactKind = Literal["sft", "reward", "ppo"]
KINDS: tuple[str, ...] = ("sft", "reward", "ppo")
#: Aliases moved by publishing an artifact of each kind.
LATEST_ALIASES: dict[str, tuple[str, ...]] = {
    "sft": ("sft-latest",),
    "reward": ("reward-latest", "rm-latest"),
    "ppo": ("ppo-latest",),
}
NAME_RE = re.compile(r"^(sft|reward|ppo)-\d{8}-\d{4,6}-[0-9a-f]{4}$")
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
#: Files an artifact may contain: weights as safetensors, everything else JSON / text.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".jinja", ".txt", ".md", ".model")


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
# Storage: a path or a URI through pyarrow.fs
# ---------------------------------------------------------------------------------------


class Storage:
    """A folder on the local disk or on object storage, addressed by relative paths.

    Args:
        root: A local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``file:///...``).
    """

    def __init__(self, root: str | Path) -> None:
        import pyarrow.fs as pafs

        text = str(root)
        if "://" in text and not text.startswith("file://"):
            try:
                fs, base = pafs.FileSystem.from_uri(text)
            except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for bad URIs
                raise ConfigError(f"storage location '{text}' cannot be opened: {exc}") from None
            self.fs: pafs.FileSystem = fs
            self.base = base.rstrip("/")
            self.local = False
        else:
            path = Path(text.removeprefix("file://")).expanduser().resolve()
            self.fs = pafs.LocalFileSystem()
            self.base = path.as_posix()
            self.local = True
        self.root = text

    def __repr__(self) -> str:
        return f"Storage({self.root!r})"

    def path(self, *parts: str) -> str:
        """Filesystem path (no scheme) of ``parts`` under the root."""
        return "/".join([self.base, *[p.strip("/") for p in parts if p]])

    def uri(self, *parts: str) -> str:
        """What to show or hand to Ray: a local path, or the URI with its scheme."""
        if self.local:
            return self.path(*parts)
        scheme = self.root.split("://", 1)[0]
        return f"{scheme}://{self.path(*parts)}"

    def local_path(self, *parts: str) -> Path | None:
        """A :class:`Path` when the storage is local, else None."""
        return Path(self.path(*parts)) if self.local else None

    def exists(self, *parts: str) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    def read_text(self, *parts: str) -> str | None:
        """The file's text, or None when it does not exist."""
        try:
            with self.fs.open_input_stream(self.path(*parts)) as fh:
                return fh.read().decode("utf-8")
        except (FileNotFoundError, OSError):
            return None

    def write_text(self, rel: str, text: str) -> None:
        """Write a whole file; atomic on a local disk (temp file + rename)."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    fh.write(text)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
            return
        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path(rel)) as fh:
            fh.write(text.encode("utf-8"))

    def append_text(self, rel: str, text: str) -> None:
        """Append to a file (object stores have no append: the file is rewritten)."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as fh:
                fh.write(text)
                fh.flush()
            return
        self.write_text(rel, (self.read_text(rel) or "") + text)

    def read_json(self, *parts: str) -> Any:
        text = self.read_text(*parts)
        if text is None:
            return None
        try:
            return json.loads(text)
        except ValueError as exc:
            raise InputError(f"{self.uri(*parts)}: not valid JSON ({exc})") from None

    def write_json(self, rel: str, data: Any) -> None:
        self.write_text(rel, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")

    def list_dirs(self, *parts: str) -> list[str]:
        """Names of the sub-folders of a folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path(*parts), allow_not_found=True)
        return sorted(i.base_name for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.Directory)

    def list_files(self, *parts: str) -> list[str]:
        """Relative paths of the files under a folder, recursively."""
        import pyarrow.fs as pafs

        root = self.path(*parts)
        selector = pafs.FileSelector(root, allow_not_found=True, recursive=True)
        return sorted(i.path[len(root) + 1 :] for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File)

    def upload(self, local_file: Path, rel: str) -> None:
        """Copy one local file to ``rel``."""
        if self.local:
            target = Path(self.path(rel))
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(local_file, target)
            return
        import pyarrow.fs as pafs

        parent = self.path(rel).rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        pafs.copy_files(str(local_file), self.path(rel), source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def download_dir(self, rel: str, dest: Path) -> Path:
        """Copy a folder to the local ``dest`` (replaced atomically) and return it."""
        import pyarrow.fs as pafs

        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
        pafs.copy_files(self.path(rel), str(tmp), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
        return dest

    def delete_dir(self, *parts: str) -> None:
        with contextlib.suppress(FileNotFoundError, OSError):
            self.fs.delete_dir(self.path(*parts))

    @contextlib.contextmanager
    def lock(self, rel: str) -> Iterator[None]:
        """An exclusive lock for read-modify-write of ``rel`` (local disks; a no-op elsewhere)."""
        if not self.local:
            yield
            return
        target = Path(self.path(rel))
        lock_path = target.with_name(f".{target.name}.lock")
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# ---------------------------------------------------------------------------------------
# Artifacts
# ---------------------------------------------------------------------------------------


@dataclass
class Artifact:
    """One published artifact (its ``artifact.json``).

    Attributes:
        name: ``<kind>-YYYYMMDD-HHMM-xxxx``; the training run has the same id.
        kind: ``sft``, ``reward`` or ``ppo``.
        created_at: UTC publish time.
        base_model: The base model as configured (registry name or path); serving loads it and
            applies the adapter on top.
        task: ``causal-lm`` (a generator adapter) or ``seq-cls`` (a reward model: LoRA plus the
            scalar score head).
        format: ``peft-lora``.
        parent: The artifact this one was trained from (PPO starts from an SFT adapter), if any.
        run_id: The run that produced it (``ragops runs show``).
        data_hash: SHA-256 of the training data files.
        code_version: ``{"ragops", "git", "dirty"}``.
        config: Training settings (trainer, LoRA, scaling).
        metrics: Final training metrics, merged with the latest recorded evaluation.
        evals: Evaluations recorded after publishing (``record_eval``), oldest first.
        files: Files under ``adapter/``.
        tags: The run's key/value tags.
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
        """A local folder with the artifact's adapter files (downloaded once from remote storage)."""
        art = self.get(ref)
        local = self.storage.local_path("artifacts", art.name, "adapter")
        if local is not None:
            return local
        dest = self.cache_dir / art.name
        if not (dest / "adapter_config.json").is_file():
            self.storage.download_dir(f"artifacts/{art.name}/adapter", dest)
        return dest

    # -- writing -------------------------------------------------------------------------

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
        if kind not in KINDS:
            raise InputError(f"unknown artifact kind '{kind}'; allowed: {', '.join(KINDS)}")
        if not (src / "adapter_config.json").is_file() or not list(src.glob("*.safetensors")):
            raise InputError(f"{src}: no adapter_config.json and *.safetensors to publish")
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
                self.storage.write_json(f"artifacts/{name}/adapter/{rel}", cfg)
            else:
                self.storage.upload(f, f"artifacts/{name}/adapter/{rel}")
            files.append(rel)
        art = Artifact(
            name=name,
            kind=kind,
            created_at=utc_now(),
            base_model=base_model,
            task=task,
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
        from ragops.finetune.gate import compare_metrics, metric_direction

        name = self.resolve(ref)
        gate = None
        if require_metric:
            base_ref = baseline or (self.aliases().get(alias) or {}).get("target")
            before = self.get(base_ref).metrics if base_ref else {}
            after = self._load(name).metrics
            hib = metric_direction(require_metric) if higher_is_better is None else higher_is_better
            result = compare_metrics(before, after, require_metric, higher_is_better=hib)
            gate = {**result.to_dict(), "baseline": self.resolve(base_ref) if base_ref else None}
            if not result.passed:
                raise InputError(f"promotion of {name} to '{alias}' refused: {result.reason}")
        previous = self.set_alias(alias, name, action="promote")
        return PromoteResult(alias=alias, name=name, previous=previous, gate=gate)

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
        ModelNotFoundError: unknown name, or an artifact that is not a generator adapter.
    """
    reg = _as_registry(registry)
    art = reg.get(ref)
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
    folder = adapter_dir(ref, registry=reg)
    gen = settings.generator.model_copy(update={"adapter": str(folder), "model": adapter_base(ref, registry=reg)})
    return settings.model_copy(update={"generator": gen})
