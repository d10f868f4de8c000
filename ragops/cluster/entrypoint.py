"""Turn a command line into a Ray job: entrypoint, runtime_env, and the checks made first.

Decisions (see docs/cluster.md):

* **Code comes from the image.** The cluster's image has ragops installed; a job ships only
  its working dir (data, configs). ``pip`` in the runtime_env is opt-in (``--pip SPEC`` or
  ``--pip-project``): it makes every node build a virtualenv and download packages, which is
  slow, needs a package index, and on a head that already has ragops is pure waste.
* **Secrets by name only.** Ray's runtime_env has no secret references: whatever is in
  ``env_vars`` is stored in the GCS and shown by the dashboard. So a job spec lists the *names*
  of the variables it needs (``--env QDRANT_API_KEY``); the values come from the cluster's own
  environment (KubeRay: ``env.valueFrom.secretKeyRef`` in the pod templates; the local head:
  the environment of ``ragops cluster up``). The entrypoint starts with a POSIX check, so a
  missing variable fails the job at once with its name, not deep in a client library.
* **The job's configuration is the command's own** (its ``--config``/``--set``/``--data-dir``
  plus the cluster's ``RAGOPS_*`` environment). The submitter's ``RAGOPS_*`` variables do not
  travel; the checks below read the command line only.
"""

from __future__ import annotations

import re
import secrets
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ragops.cluster.errors import JobRefused
from ragops.config import Settings, load_settings
from ragops.errors import ConfigError, RagopsError

#: ragops command groups that never open the vector store.
STORE_FREE = frozenset({"models", "config", "job", "cluster", "kuberay"})
#: Excluded from the shipped working dir: environments, caches, local data (gitignore syntax,
#: relative to the working dir). Ray also honours the dir's .gitignore and .rayignore.
DEFAULT_EXCLUDES = (".git", ".venv", "venv", ".ragops", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")
#: Source folders of a ragops checkout. Ray puts the working dir first on PYTHONPATH, so a
#: shipped checkout would shadow the image's installed ragops with half a package.
_RAGOPS_SOURCE_DIRS = ("/ragops", "/ingest", "/retrieval", "/finetune", "/serve", "/cli.py")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class JobSpec:
    """Everything ``submit_job`` needs, plus what the checks found out.

    Attributes:
        argv: The command as given after ``--``.
        entrypoint: Shell command the cluster runs (env check + command).
        runtime_env: Ray runtime_env (working_dir, excludes, optional pip; never env values).
        metadata: Job metadata (strings): command, env names, ragops version.
        submission_id: Id to submit under.
        env_names: Environment variable names the job needs from the cluster.
        settings: The job's effective settings when it is a ragops command whose
            configuration could be read here; else None.
        warnings: Things worth telling the user before submitting.
    """

    argv: list[str]
    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    env_names: list[str] = field(default_factory=list)
    settings: Settings | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def command_words(self) -> list[str]:
        """``["ingest"]``, ``["train", "sft"]``... for a ragops command; [] otherwise."""
        return ragops_words(self.argv)


def command_string(argv: Sequence[str]) -> str:
    """The shell command for ``argv``.

    One argument is taken as a shell command line as is (so ``-- "a && b"`` works, like
    ``ray job submit``); several are quoted one by one (so paths with spaces survive).
    """
    if not argv:
        raise RagopsError("no command to run: put it after --, e.g. ragops job submit -- ragops ingest docs")
    return argv[0] if len(argv) == 1 else shlex.join(argv)


def env_guard(names: Sequence[str]) -> str:
    """A POSIX-shell prefix that fails the job when a needed variable is unset or empty."""
    checks = [f': "${{{n}:?is not set in the cluster environment (see ragops job submit --env)}}"' for n in names]
    return " && ".join(checks)


def validate_env_names(names: Sequence[str]) -> list[str]:
    """Check ``--env`` values are bare names (values never go into a job spec)."""
    out: list[str] = []
    for n in names:
        if "=" in n:
            raise RagopsError(
                f"--env '{n.split('=', 1)[0]}=...': pass the name only; the value must come from the cluster's "
                "environment (a Kubernetes Secret, or the environment of `ragops cluster up`), never from the job "
                "spec. Settings go through --set on the command"
            )
        if not _ENV_NAME.match(n):
            raise RagopsError(f"--env '{n}' is not a valid environment variable name")
        if n not in out:
            out.append(n)
    return out


def ragops_words(argv: Sequence[str]) -> list[str]:
    """The (sub)command words of a ``ragops ...`` command line; [] for any other command."""
    if not argv:
        return []
    if len(argv) == 1:  # a shell string: look at its first simple command
        try:
            argv = shlex.split(argv[0])
        except ValueError:
            return []
    if not argv or Path(argv[0]).name != "ragops":
        return []
    words = []
    for a in argv[1:3]:
        if a.startswith("-"):
            break
        words.append(a)
    return words[:2] if words[:1] in (["train"], ["eval"], ["index"], ["models"], ["config"]) else words[:1]


def settings_options(argv: Sequence[str]) -> tuple[list[str], list[str], str | None]:
    """The ``--config``/``-c``, ``--set``/``-s`` and ``--data-dir`` values of a ragops command."""
    if len(argv) == 1:
        argv = shlex.split(argv[0])
    configs: list[str] = []
    sets: list[str] = []
    data_dir: str | None = None
    it = iter(list(argv)[1:])
    for a in it:
        if a == "--":
            break
        name, eq, val = a.partition("=")
        if name in ("--config", "-c", "--set", "-s", "--data-dir"):
            if not eq:
                val = next(it, "")
            if name in ("--config", "-c"):
                configs.append(val)
            elif name in ("--set", "-s"):
                sets.append(val)
            else:
                data_dir = val
    return configs, sets, data_dir


def job_settings(argv: Sequence[str], working_dir: Path | None, warnings: list[str]) -> Settings | None:
    """The settings the job will run with, as far as the command line tells.

    Config files are looked up in the shipped working dir first (that is where the job runs),
    then as given, then as preset names. A file that exists only on the cluster cannot be
    read here: the checks are skipped with a warning.

    Raises:
        JobRefused: the configuration is invalid (e.g. ``ray.nodes > 1`` with the embedded store).
    """
    configs, sets, data_dir = settings_options(argv)
    files: list[str | Path] = []
    for c in configs:
        local = working_dir / c if working_dir is not None and not Path(c).is_absolute() else Path(c)
        if local.is_file():
            files.append(local)
            if working_dir is not None and not _inside(local, working_dir):
                warnings.append(
                    f"--config {c} is outside the shipped working dir: the job reads {c} on the cluster, "
                    "so it must exist there too (or ship it inside --working-dir)"
                )
        elif not Path(c).suffix:
            files.append(c)  # a preset name: shipped in the package on both sides
        else:
            warnings.append(f"config file {c} is not readable here, so the job's settings were not checked")
            return None
    try:
        return load_settings(files, sets, data_dir=data_dir, environ={})
    except ConfigError as exc:
        raise JobRefused(f"the job's configuration is invalid, nothing was submitted: {exc}") from None


def _inside(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def project_requirements(project_dir: Path) -> list[str]:
    """``[project].dependencies`` of ``project_dir/pyproject.toml`` (for ``--pip-project``)."""
    path = project_dir / "pyproject.toml"
    try:
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - Python 3.10
            import tomli as tomllib  # type: ignore[import-not-found,no-redef]
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RagopsError(f"--pip-project: no pyproject.toml in {project_dir}") from None
    except ImportError:  # pragma: no cover
        raise RagopsError("--pip-project needs Python 3.11+ (tomllib) or the tomli package") from None
    except ValueError as exc:
        raise RagopsError(f"--pip-project: {path} is not valid TOML: {exc}") from None
    deps = data.get("project", {}).get("dependencies", [])
    if not deps:
        raise RagopsError(f"--pip-project: {path} lists no [project].dependencies")
    return [str(d) for d in deps]


def build_runtime_env(working_dir: Path | None, pip: Sequence[str] = ()) -> dict[str, Any]:
    """The runtime_env: the working dir with sensible excludes, and pip only when asked.

    No ``env_vars``: values never go into a job spec (see the module docstring).
    """
    env: dict[str, Any] = {}
    if working_dir is not None:
        excludes = list(DEFAULT_EXCLUDES)
        if _is_ragops_checkout(working_dir):
            excludes += list(_RAGOPS_SOURCE_DIRS)
        env["working_dir"] = str(working_dir)
        env["excludes"] = excludes
    if pip:
        env["pip"] = list(pip)
    return env


def _is_ragops_checkout(d: Path) -> bool:
    try:
        text = (d / "pyproject.toml").read_text(encoding="utf-8")
    except OSError:
        return False
    return bool(re.search(r'(?m)^name\s*=\s*"ragops"\s*$', text)) and (d / "ragops" / "__init__.py").is_file()


def new_submission_id(words: Sequence[str]) -> str:
    """``ragops-<command>-<8 hex>``, e.g. ``ragops-train-sft-1a2b3c4d`` (``job-...`` for others)."""
    stem = "-".join(["ragops", *words]) if words else "job"
    stem = re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-")
    return f"{stem}-{secrets.token_hex(4)}"


def build_job(
    argv: Sequence[str],
    *,
    working_dir: Path | None,
    pip: Sequence[str] = (),
    env_names: Sequence[str] = (),
    submission_id: str | None = None,
) -> JobSpec:
    """Assemble a :class:`JobSpec` and collect warnings (no network access).

    Raises:
        RagopsError: no command, a bad ``--env``, or an invalid job configuration.
    """
    from ragops import __version__

    argv = list(argv)
    cmd = command_string(argv)
    names = validate_env_names(env_names)
    words = ragops_words(argv)
    warnings: list[str] = []
    settings = job_settings(argv, working_dir, warnings) if words and words[0] not in STORE_FREE else None
    if settings is not None and not settings.data_dir.is_absolute():
        warnings.append(
            f"data_dir '{settings.data_dir}' is relative: on the cluster it resolves inside the job's own copy of "
            "the working dir, which Ray deletes after the job. Use --data-dir / RAGOPS_HOME on shared storage "
            "(a volume every node mounts) for manifests, runs and artifacts"
        )
    entrypoint = f"{env_guard(names)} && {cmd}" if names else cmd
    metadata = {"ragops.version": __version__, "ragops.command": " ".join(words) or Path(shlex.split(cmd)[0]).name}
    if names:
        metadata["ragops.env"] = ",".join(names)
    return JobSpec(
        argv=argv,
        entrypoint=entrypoint,
        runtime_env=build_runtime_env(working_dir, pip),
        metadata=metadata,
        submission_id=submission_id or new_submission_id(words),
        env_names=names,
        settings=settings,
        warnings=warnings,
    )


def check_store_placement(spec: JobSpec, address: str, is_local: bool, node_count: int | None) -> list[str]:
    """Refuse a job on the embedded store when the cluster has several nodes; warn on remote.

    Args:
        spec: The job (its ``settings`` are the job's effective settings, or None).
        address: The cluster's dashboard URL (for messages).
        is_local: Whether the cluster is this machine's local head.
        node_count: Alive nodes, or None when they could not be counted.

    Returns:
        Warnings to print.

    Raises:
        JobRefused: embedded store (``vectorstore.backend=edge``) on a multi-node cluster.
    """
    s = spec.settings
    if s is None or s.vectorstore.backend != "edge":
        return []
    cmd = " ".join(["ragops", *spec.command_words])
    fix = (
        "Use a Qdrant server: --set vectorstore.backend=qdrant --set vectorstore.url=http://qdrant:6333 "
        "(or --config cluster), its API key from the cluster's environment (--env QDRANT_API_KEY)"
    )
    if node_count is not None and node_count > 1:
        raise JobRefused(
            f"not submitting `{cmd}`: it uses the embedded Qdrant Edge store (vectorstore.backend=edge) and the "
            f"cluster at {address} has {node_count} nodes. An Edge shard is a directory on one node's disk that "
            f"only one process may open, so tasks, replicas and later jobs on the other nodes cannot use it. {fix}"
        )
    if is_local:
        return []
    counted = "has one node now" if node_count == 1 else "could not be asked how many nodes it has"
    warning = (
        f"`{cmd}` uses the embedded Qdrant Edge store on a remote cluster that {counted}: the shard will live "
        f"under {s.data_dir} on the node that runs the job, invisible to other nodes and lost with the pod "
        f"unless that path is shared storage. {fix}"
    )
    return [warning]
