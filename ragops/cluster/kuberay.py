"""KubeRay manifests (``ray.io/v1``): a RayJob per batch command, a RayService, a RayCluster.

What goes where, and why:

* **Configuration → environment.** A RayJob or RayCluster carries the settings that differ
  from the defaults as ``RAGOPS_*`` variables on every pod (:mod:`.envconfig`): one
  self-contained document, nothing left behind after ``ttlSecondsAfterFinished``. A
  RayService carries them in ``serveConfigV2`` instead (``build_app``'s ``set`` argument), so
  a config change is an in-place Serve update rather than a new Ray cluster.
* **Secrets → references.** Values never appear: ``env.valueFrom.secretKeyRef`` for the
  Qdrant API key (``vectorstore.api_key_env``), the serve API keys
  (``RAGOPS_API_KEYS_CHAT``/``_ADMIN``) and the Ray dashboard token (``RAY_AUTH_TOKEN``, key
  ``auth_token``, with ``authOptions`` so the operator authenticates to the dashboard with
  the same Secret; KubeRay >= 1.6).
* **Resources → worker groups** (:mod:`.resources`): a CPU group always, a GPU group with
  ``nvidia.com/gpu`` limits when a stage asks for GPUs, replica bounds from the settings.
* **The head runs no tasks** (``num-cpus: "0"``): drivers, the Serve controller and the
  autoscaler stay responsive however busy the workers are.
* **Shared storage** (``--data-pvc``): a ReadWriteMany claim mounted at ``data_dir`` on every
  pod, for manifests, training runs and artifacts.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import yaml

from ragops.cluster.envconfig import settings_env, settings_overrides
from ragops.cluster.resources import (
    JOB_KINDS,
    Shapes,
    WorkerGroup,
    entrypoint_resources,
    job_demands,
    plan_cluster_groups,
    plan_groups,
    serve_demands,
    serve_deployments,
)
from ragops.config import Settings
from ragops.errors import ConfigError

API_VERSION = "ray.io/v1"
#: Key of the Ray token in its Secret (KubeRay's convention for authOptions.secretName).
RAY_TOKEN_KEY = "auth_token"
#: Keys of the application Secret.
QDRANT_KEY = "qdrant-api-key"
CHAT_KEYS_KEY = "api-keys-chat"
ADMIN_KEYS_KEY = "api-keys-admin"
CHAT_KEYS_ENV = "RAGOPS_API_KEYS_CHAT"
#: ``runtime.autoscaling`` as the pods' environment sets it.
AUTOSCALING_ENV = "RAGOPS_RUNTIME__AUTOSCALING"
ADMIN_KEYS_ENV = "RAGOPS_API_KEYS_ADMIN"
SERVE_IMPORT_PATH = "ragops.serve.app:build_app"
#: ragops command run by each RayJob kind (the user's arguments follow).
JOB_COMMANDS: dict[str, list[str]] = {
    "ingest": ["ragops", "ingest"],
    "train-sft": ["ragops", "train", "sft"],
    "train-reward": ["ragops", "train", "reward"],
    "eval": ["ragops", "eval"],
    "loop": ["ragops", "loop"],
}
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def _ray_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ray")
    except PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "2.60.0"


def _ragops_version() -> str:
    from ragops import __version__

    return __version__


@dataclass
class SecretEnv:
    """An environment variable filled from a Kubernetes Secret key.

    Attributes:
        name: Variable name in the container.
        secret: Secret name.
        key: Key in the Secret.
        optional: Start the pod even when the Secret or key is missing.
    """

    name: str
    secret: str
    key: str
    optional: bool = True

    def to_env(self) -> dict[str, Any]:
        """The container ``env`` entry."""
        ref: dict[str, Any] = {"name": self.secret, "key": self.key}
        if self.optional:
            ref["optional"] = True
        return {"name": self.name, "valueFrom": {"secretKeyRef": ref}}


@dataclass
class RenderOptions:
    """Everything about the manifest that is not in the ragops settings.

    Attributes:
        image: Container image with ragops installed (see the repository's Dockerfile).
        namespace: ``metadata.namespace``; None leaves it to ``kubectl -n``.
        name: ``metadata.name``; None: ``ragops-<job>``, ``ragops-serve`` or ``ragops``.
        shapes: Pod shapes of head, CPU and GPU workers.
        app_secret: Secret holding ``qdrant-api-key``, ``api-keys-chat``, ``api-keys-admin``.
        ray_auth_secret: Secret holding the Ray dashboard token (key ``auth_token``); None
            renders a cluster without token authentication.
        secret_env: More variables from Secrets (cloud storage credentials, hub tokens...).
        data_pvc: ReadWriteMany PersistentVolumeClaim mounted at ``data_dir`` on every pod.
        ttl_s: RayJob ``ttlSecondsAfterFinished``.
        deadline_s: RayJob ``activeDeadlineSeconds`` (None: no deadline).
        insecure: RayService without required API keys (an open API).
        ray_version: ``rayVersion`` (the image's Ray).
        sources: Config sources named in the header comment.
    """

    image: str = field(default_factory=lambda: f"ragops:{_ragops_version()}")
    namespace: str | None = None
    name: str | None = None
    shapes: Shapes = field(default_factory=Shapes)
    app_secret: str = "ragops-secrets"
    ray_auth_secret: str | None = "ragops-ray-auth"
    secret_env: list[SecretEnv] = field(default_factory=list)
    data_pvc: str | None = None
    ttl_s: int = 600
    deadline_s: int | None = None
    insecure: bool = False
    ray_version: str = field(default_factory=_ray_version)
    sources: list[str] = field(default_factory=list)


def parse_secret_env(items: Sequence[str], default_secret: str) -> list[SecretEnv]:
    """``--secret-env NAME`` or ``NAME=SECRET:KEY`` into :class:`SecretEnv` entries.

    ``NAME`` alone reads key ``name-in-kebab-case`` of the application Secret.
    """
    out = []
    for item in items:
        name, eq, ref = item.partition("=")
        if not _ENV_NAME.match(name):
            raise ConfigError(f"--secret-env '{item}': '{name}' is not an environment variable name")
        if eq:
            secret, colon, key = ref.partition(":")
            if not (secret and colon and key):
                raise ConfigError(f"--secret-env '{item}': expected NAME or NAME=SECRET:KEY")
        else:
            secret, key = default_secret, name.lower().replace("_", "-")
        out.append(SecretEnv(name, secret, key))
    return out


# -- pieces ------------------------------------------------------------------------------


def _labels(component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "ragops", "app.kubernetes.io/component": component, "app.kubernetes.io/part-of": "ragops"}


def _metadata(name: str, opts: RenderOptions, component: str) -> dict[str, Any]:
    if not _NAME.match(name) or len(name) > 50:
        raise ConfigError(
            f"name '{name}': Kubernetes names here are lower-case letters, digits and '-', at most 50 characters"
        )
    meta: dict[str, Any] = {"name": name}
    if opts.namespace:
        meta["namespace"] = opts.namespace
    meta["labels"] = _labels(component)
    return meta


def _check_store(settings: Settings) -> None:
    if settings.vectorstore.backend == "edge":
        raise ConfigError(
            "KubeRay manifests need a Qdrant server: the embedded Qdrant Edge store (vectorstore.backend=edge) is a "
            "directory on one pod's disk that only one process may open, so the cluster's other pods cannot use it. "
            "Use --config cluster, or --set vectorstore.backend=qdrant --set vectorstore.url=http://qdrant:6333"
        )


def _env(settings: Settings, opts: RenderOptions, *, config_env: bool, serve_keys: bool) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = []
    if config_env:
        env += [{"name": k, "value": v} for k, v in settings_env(settings)]
    if settings.runtime.autoscaling == "auto":
        # Every rendered cluster runs KubeRay's autoscaler: a command whose stages do not fit the
        # pods running now waits for new ones (runtime.schedule_timeout_s) instead of failing.
        env.append({"name": AUTOSCALING_ENV, "value": "on"})
    if opts.ray_auth_secret:
        env.append({"name": "RAY_AUTH_MODE", "value": "token"})
        env.append(SecretEnv("RAY_AUTH_TOKEN", opts.ray_auth_secret, RAY_TOKEN_KEY, optional=False).to_env())
    if settings.vectorstore.backend == "qdrant":
        env.append(SecretEnv(settings.vectorstore.api_key_env, opts.app_secret, QDRANT_KEY).to_env())
    if serve_keys:
        env.append(SecretEnv(CHAT_KEYS_ENV, opts.app_secret, CHAT_KEYS_KEY, optional=opts.insecure).to_env())
        env.append(SecretEnv(ADMIN_KEYS_ENV, opts.app_secret, ADMIN_KEYS_KEY).to_env())
    env += [s.to_env() for s in opts.secret_env]
    return env


def _resources(cpus: int, memory: str, gpus: int = 0) -> dict[str, Any]:
    res: dict[str, Any] = {"cpu": str(cpus), "memory": memory}
    limits = dict(res)
    if gpus:
        limits["nvidia.com/gpu"] = str(gpus)
    return {"requests": res, "limits": limits}


def _volumes(settings: Settings, opts: RenderOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    # /dev/shm backs Ray's object store; the container default (64 MiB) is far too small.
    volumes: list[dict[str, Any]] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    mounts: list[dict[str, Any]] = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if opts.data_pvc:
        path = PurePosixPath(str(settings.data_dir))
        if not path.is_absolute():
            raise ConfigError(
                f"--data-pvc mounts the claim at data_dir, which is relative ('{settings.data_dir}'): "
                "set data_dir to an absolute path (configs/cluster.yaml uses /mnt/ragops)"
            )
        volumes.append({"name": "ragops-data", "persistentVolumeClaim": {"claimName": opts.data_pvc}})
        mounts.append({"name": "ragops-data", "mountPath": str(path)})
    return volumes, mounts


def _pod_template(
    component: str,
    container_name: str,
    shape_cpus: int,
    memory: str,
    gpus: int,
    env: list[dict[str, Any]],
    settings: Settings,
    opts: RenderOptions,
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    volumes, mounts = _volumes(settings, opts)
    container: dict[str, Any] = {"name": container_name, "image": opts.image}
    if ports:
        container["ports"] = ports
    container["resources"] = _resources(shape_cpus, memory, gpus)
    if env:
        container["env"] = env
    container["volumeMounts"] = mounts
    spec: dict[str, Any] = {"containers": [container], "volumes": volumes}
    if gpus:
        spec["tolerations"] = [dict(_GPU_TOLERATION)]
    return {"metadata": {"labels": _labels(component)}, "spec": spec}


def _ray_cluster_spec(
    settings: Settings,
    opts: RenderOptions,
    groups: list[WorkerGroup],
    component: str,
    *,
    config_env: bool,
    serve_keys: bool,
    serve_port: int | None = None,
) -> dict[str, Any]:
    env = _env(settings, opts, config_env=config_env, serve_keys=serve_keys)
    head = opts.shapes.head
    ports = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    if serve_port is not None:
        ports.append({"containerPort": serve_port, "name": "serve"})
    spec: dict[str, Any] = {"rayVersion": opts.ray_version, "enableInTreeAutoscaling": True}
    if opts.ray_auth_secret:
        spec["authOptions"] = {"mode": "token", "secretName": opts.ray_auth_secret}
    spec["headGroupSpec"] = {
        # No tasks or actors on the head: it keeps GCS, dashboard, drivers and the Serve
        # controller responsive whatever the workers do.
        "rayStartParams": {"num-cpus": "0"},
        "template": _pod_template(component, "ray-head", head.cpus, head.memory, 0, env, settings, opts, ports),
    }
    workers = []
    for g in groups:
        workers.append(
            {
                "groupName": f"{g.name}-workers",
                "replicas": g.replicas,
                "minReplicas": g.min_replicas,
                "maxReplicas": g.max_replicas,
                # KubeRay derives --num-cpus / --num-gpus from the container limits.
                "rayStartParams": {},
                "template": _pod_template(
                    component, "ray-worker", g.shape.cpus, g.shape.memory, g.shape.gpus, env, settings, opts
                ),
            }
        )
    spec["workerGroupSpecs"] = workers
    return spec


# -- manifests ---------------------------------------------------------------------------


def job_entrypoint(kind: str, args: Sequence[str], settings: Settings | None = None) -> str:
    """The RayJob entrypoint: the ragops command of ``kind`` followed by the user's arguments.

    An ingest job without arguments reads ``ingest.sources`` from the settings the pods carry.

    Raises:
        ConfigError: unknown kind, or arguments the command cannot run without.
    """
    if kind not in JOB_COMMANDS:
        raise ConfigError(f"unknown job '{kind}'; allowed: {', '.join(JOB_KINDS)}")
    args = list(args)
    if kind == "ingest" and not args and not (settings is not None and settings.ingest.sources):
        raise ConfigError(
            "--job ingest: put the paths or URIs to ingest after --, e.g. -- s3://bucket/docs, "
            "or set ingest.sources in the config"
        )
    if kind == "eval" and (not args or args[0] not in ("retrieval", "answers")):
        raise ConfigError("--job eval: start the arguments with 'retrieval' or 'answers', e.g. -- answers --data FILE")
    if kind == "loop" and (not args or args[0].startswith("-")):
        raise ConfigError("--job loop: put the alias first after --, e.g. -- prod --eval-data /mnt/ragops/eval.jsonl")
    return shlex.join(JOB_COMMANDS[kind] + args)


def render_job(settings: Settings, kind: str, args: Sequence[str], opts: RenderOptions) -> dict[str, Any]:
    """A RayJob running one ragops batch command on its own autoscaling Ray cluster.

    Args:
        settings: The job's settings (sizes the workers; shipped as pod environment).
        kind: ``ingest``, ``train-sft``, ``train-reward`` or ``eval``.
        args: Arguments appended to the command (paths, ``--data FILE``...).
        opts: Image, secrets, shapes...

    Raises:
        ConfigError: embedded store, bad arguments, a bundle larger than a pod.
    """
    _check_store(settings)
    entrypoint = job_entrypoint(kind, args, settings)
    groups = plan_groups(job_demands(settings, kind), opts.shapes, "job")
    spec: dict[str, Any] = {"entrypoint": entrypoint}
    spec.update(entrypoint_resources(settings, kind))
    spec["shutdownAfterJobFinishes"] = True
    spec["ttlSecondsAfterFinished"] = opts.ttl_s
    if opts.deadline_s:
        spec["activeDeadlineSeconds"] = opts.deadline_s
    spec["rayClusterSpec"] = _ray_cluster_spec(settings, opts, groups, kind, config_env=True, serve_keys=False)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayJob",
        "metadata": _metadata(opts.name or f"ragops-{kind}", opts, kind),
        "spec": spec,
    }


def serve_config_v2(settings: Settings) -> dict[str, Any]:
    """The Ray Serve config (``serveConfigV2``): ``build_app`` with the settings as ``set``
    overrides, and each deployment's autoscaling, limits and actor resources from
    ``settings.serve`` (the same values the app binds in code, visible and editable here)."""
    deployments = []
    for key, name in serve_deployments(settings).items():
        options = getattr(settings.serve, key).deployment_options()
        deployments.append(
            {
                "name": name,
                "max_ongoing_requests": options["max_ongoing_requests"],
                "max_queued_requests": options["max_queued_requests"],
                "autoscaling_config": options["autoscaling_config"],
                "ray_actor_options": options["ray_actor_options"],
            }
        )
    args: dict[str, Any] = {"set": [f"{k}={v}" for k, v in settings_overrides(settings)]}
    return {
        # Inside the pod the proxy must listen on every interface; the Service does the rest.
        "http_options": {"host": "0.0.0.0", "port": settings.serve.port},
        "applications": [
            {
                "name": "ragops",
                "import_path": SERVE_IMPORT_PATH,
                "route_prefix": "/",
                "args": args,
                "deployments": deployments,
            }
        ],
    }


def render_service(settings: Settings, opts: RenderOptions) -> dict[str, Any]:
    """A RayService: the OpenAI-compatible RAG endpoint with Serve and Ray autoscaling.

    Raises:
        ConfigError: embedded store, a replica larger than a pod.
    """
    _check_store(settings)
    groups = plan_groups(serve_demands(settings), opts.shapes, "service")
    serve_yaml = _dump(serve_config_v2(settings))
    return {
        "apiVersion": API_VERSION,
        "kind": "RayService",
        "metadata": _metadata(opts.name or "ragops-serve", opts, "serve"),
        "spec": {
            "serveConfigV2": serve_yaml,
            "rayClusterConfig": _ray_cluster_spec(
                settings, opts, groups, "serve", config_env=False, serve_keys=True, serve_port=settings.serve.port
            ),
        },
    }


def render_cluster(settings: Settings, opts: RenderOptions) -> dict[str, Any]:
    """An interactive RayCluster for ``ragops job submit``: autoscaling from zero workers.

    Raises:
        ConfigError: embedded store, a bundle larger than a pod.
    """
    _check_store(settings)
    groups = plan_cluster_groups(settings, opts.shapes)
    return {
        "apiVersion": API_VERSION,
        "kind": "RayCluster",
        "metadata": _metadata(opts.name or "ragops", opts, "cluster"),
        "spec": _ray_cluster_spec(
            settings, opts, groups, "cluster", config_env=True, serve_keys=True, serve_port=settings.serve.port
        ),
    }


# -- YAML --------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style, literal multi-line strings (serveConfigV2), no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(obj: Any) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120, allow_unicode=True)


def secret_refs(manifest: Any) -> dict[str, dict[str, bool]]:
    """Every Secret key the manifest references: ``{secret: {key: optional}}``."""
    found: dict[str, dict[str, bool]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            ref = node.get("secretKeyRef")
            if isinstance(ref, dict):
                keys = found.setdefault(ref["name"], {})
                keys[ref["key"]] = keys.get(ref["key"], True) and bool(ref.get("optional", False))
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(manifest)
    return found


def to_yaml(manifest: dict[str, Any], opts: RenderOptions) -> str:
    """The manifest as YAML, with a header saying where it came from and which Secrets it needs."""
    kind = manifest["kind"]
    sources = ", ".join(opts.sources) if opts.sources else "built-in defaults"
    header = [
        f"# {kind} rendered by `ragops kuberay render` (ragops {_ragops_version()}) from: {sources}.",
        "# Re-render after changing the configuration instead of editing this file.",
    ]
    for secret, keys in secret_refs(manifest).items():
        listed = ", ".join(f"{k}{' (optional)' if opt else ''}" for k, opt in keys.items())
        header.append(f"# Secret {secret}: {listed}.")
    if opts.data_pvc:
        header.append(f"# Shared storage: the ReadWriteMany PersistentVolumeClaim '{opts.data_pvc}' at data_dir.")
    return "\n".join(header) + "\n" + _dump(manifest)
