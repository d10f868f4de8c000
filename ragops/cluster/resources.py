"""What each stage asks Ray for, from settings, and the worker groups that can hold it.

The settings already say how much every stage reserves in Ray's accounting:

=====================  ==========================================================
stage                  settings
=====================  ==========================================================
ingest embedding       ``ingest.embed_actors`` x (``ingest.cpus_per_actor``, ``ingest.gpus_per_actor``)
ingest load/chunk      one CPU per Ray Data task
training (SFT/reward)  ``finetune.workers`` x (``finetune.cpus_per_worker``, 1 GPU if ``finetune.use_gpu``)
eval                   the driver: 1 CPU, 1 GPU if ``generator.device`` is CUDA
serving                per deployment: ``serve.<d>.num_cpus`` / ``num_gpus`` x replicas
                       (``autoscaling.min_replicas`` .. ``max_replicas``)
=====================  ==========================================================

A *demand* is ``count`` identical bundles (CPUs, GPUs). Demands with GPUs go to the GPU
worker group, the others to the CPU group; a group's bundles are packed into pods of its
shape first-fit decreasing, which gives the replica bounds. A bundle bigger than a pod is a
configuration error that names the settings and the option to raise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from ragops.config import Settings
from ragops.errors import ConfigError

JobKind = Literal["ingest", "train-sft", "train-reward", "eval"]
JOB_KINDS: tuple[str, ...] = ("ingest", "train-sft", "train-reward", "eval", "loop")
Mode = Literal["job", "service", "cluster"]

#: CPUs a Ray Data load/chunk task reserves (ragops.ingest.ray_pipeline uses this value):
#: reading and tokenizing are light next to embedding.
LOAD_TASK_CPUS = 0.25
#: Serve deployment keys in ``settings.serve`` → deployment names in ragops.serve.app (the
#: deployments every app has).
SERVE_DEPLOYMENTS: dict[str, str] = {
    "ingress": "Ingress",
    "embedder": "QueryEmbedder",
    "retriever": "Retriever",
    "generator": "Generator",
}
#: The reranker deployment, created only when ``retrieval.rerank.model`` is set.
RERANKER_DEPLOYMENT: tuple[str, str] = ("reranker", "Reranker")


def serve_deployments(settings: Settings) -> dict[str, str]:
    """The deployments the app builds with these settings (key in ``settings.serve`` → name).

    Listing a deployment the app does not build would make Ray Serve refuse the config, so the
    reranker appears only when ``retrieval.rerank.model`` is set.
    """
    out: dict[str, str] = {}
    for key, name in SERVE_DEPLOYMENTS.items():
        if key == "generator" and settings.retrieval.rerank.model:
            out[RERANKER_DEPLOYMENT[0]] = RERANKER_DEPLOYMENT[1]  # in request order: after the retriever
        out[key] = name
    return out


@dataclass(frozen=True)
class PodShape:
    """Resources of one pod (requests = limits, so pods get the Guaranteed QoS class).

    Attributes:
        cpus: Whole CPUs (KubeRay passes the limit to ``ray start --num-cpus``).
        memory: Kubernetes quantity, e.g. ``16Gi``.
        gpus: ``nvidia.com/gpu`` per pod (0 for CPU pods).
    """

    cpus: int
    memory: str
    gpus: int = 0


@dataclass(frozen=True)
class Shapes:
    """Pod shapes of the head and the two worker groups."""

    head: PodShape = PodShape(2, "8Gi")
    cpu_worker: PodShape = PodShape(4, "16Gi")
    gpu_worker: PodShape = PodShape(8, "32Gi", 1)


@dataclass(frozen=True)
class Demand:
    """``count`` bundles of (``cpus``, ``gpus``) that one stage may hold at once.

    Attributes:
        what: The stage and the settings that size it, for messages.
        cpus: CPUs per bundle.
        gpus: GPUs per bundle (fractions share a GPU).
        count: Most bundles at once.
        min_count: Bundles that must always exist (serve ``min_replicas``).
        label: The settings with their values (``ingest.cpus_per_actor=2 × ingest.embed_actors=1``),
            for admission messages; empty when no setting sizes the stage.
        keys: The settings that size it (a user-chosen one is never fitted to the cluster).
        fit: The per-bundle CPU setting admission may lower to fit a fixed-size cluster.
    """

    what: str
    cpus: float
    gpus: float
    count: int
    min_count: int = 0
    label: str = ""
    keys: tuple[str, ...] = ()
    fit: str | None = None


@dataclass
class WorkerGroup:
    """One KubeRay worker group: a pod shape and its replica bounds."""

    name: str
    shape: PodShape
    replicas: int
    min_replicas: int
    max_replicas: int
    demands: list[Demand] = field(default_factory=list)


def uses_cuda(device: str) -> bool:
    """Whether a torch device string asks for a GPU ('auto' does not reserve one)."""
    return device.startswith("cuda")


def job_demands(settings: Settings, kind: str) -> list[Demand]:
    """The bundles one batch job holds at most."""
    if kind == "ingest":
        ing = settings.ingest
        return [
            Demand("ingest load/chunk tasks", LOAD_TASK_CPUS, 0.0, 1, label="an ingest load/chunk task"),
            Demand(
                "ingest embedding actors (ingest.embed_actors x ingest.cpus_per_actor / ingest.gpus_per_actor)",
                ing.cpus_per_actor, ing.gpus_per_actor, ing.embed_actors,
                label=_label(("ingest.cpus_per_actor", ing.cpus_per_actor), ("ingest.gpus_per_actor", ing.gpus_per_actor),
                             ("ingest.embed_actors", ing.embed_actors)),
                keys=("ingest.cpus_per_actor", "ingest.gpus_per_actor", "ingest.embed_actors"),
                fit="ingest.cpus_per_actor",
            ),
        ]  # fmt: skip
    if kind in ("train-sft", "train-reward"):
        ft = settings.finetune
        out = [training_demand(settings)]
        if ft.data.runner == "ray":
            out.append(Demand("training data preparation (Ray Data tasks)", 1.0, 0.0, 1))
        return out
    if kind == "eval":
        return [Demand("eval driver (generator.device)", 1.0, 1.0 if _eval_needs_gpu(settings) else 0.0, 1)]
    if kind == "loop":  # the steps run one after another: the training workers, then the eval driver
        return [training_demand(settings)]
    raise ConfigError(f"unknown job '{kind}'; allowed: {', '.join(JOB_KINDS)}")


def training_demand(settings: Settings) -> Demand:
    """The Ray Train worker group of ``train sft|reward|ppo``."""
    ft = settings.finetune
    return Demand(
        "training workers (finetune.workers x finetune.cpus_per_worker, 1 GPU each with finetune.use_gpu)",
        ft.cpus_per_worker, 1.0 if ft.use_gpu else 0.0, ft.workers,
        label=_label(("finetune.cpus_per_worker", ft.cpus_per_worker), ("finetune.use_gpu", ft.use_gpu),
                     ("finetune.workers", ft.workers)),
        keys=("finetune.cpus_per_worker", "finetune.use_gpu", "finetune.workers"),
        fit="finetune.cpus_per_worker",
    )  # fmt: skip


def training_demands(settings: Settings, kind: str) -> list[Demand]:
    """What ``train <kind>`` holds while it trains: the workers, and PPO's rollout actors if any."""
    out = [training_demand(settings)]
    ro = settings.finetune.ppo.rollout
    if kind == "ppo" and ro.where == "actors":
        out.append(
            Demand(
                "PPO rollout actors (finetune.ppo.rollout.actors x cpus_per_actor / gpus_per_actor)",
                ro.cpus_per_actor, ro.gpus_per_actor, ro.actors,
                label=_label(("finetune.ppo.rollout.cpus_per_actor", ro.cpus_per_actor),
                             ("finetune.ppo.rollout.gpus_per_actor", ro.gpus_per_actor),
                             ("finetune.ppo.rollout.actors", ro.actors)),
                keys=("finetune.ppo.rollout",),
            )
        )  # fmt: skip
    return out


def _label(*pairs: tuple[str, object]) -> str:
    """``a=1 × b=2`` of the settings that matter (GPU settings only when they ask for GPUs)."""
    shown = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in pairs if v not in (0, 0.0, False, None)]
    return " × ".join(shown)


def _eval_needs_gpu(settings: Settings) -> bool:
    return uses_cuda(settings.generator.device) or uses_cuda(settings.embedder.device)


def entrypoint_resources(settings: Settings, kind: str) -> dict[str, float]:
    """RayJob ``entrypointNumCpus``/``entrypointNumGpus``: where the driver itself must run.

    Only eval computes in the driver (it loads the generator); other drivers only coordinate
    and stay on the head, which offers no CPUs to tasks.
    """
    if kind != "eval":
        return {}
    res = {"entrypointNumCpus": 1.0}
    if _eval_needs_gpu(settings):
        res["entrypointNumGpus"] = 1.0
    return res


def serve_demands(settings: Settings) -> list[Demand]:
    """One demand per Serve deployment, its replicas' bounds from its autoscaling settings."""
    out = []
    for key, name in serve_deployments(settings).items():
        d = getattr(settings.serve, key)
        auto = d.autoscaling
        out.append(
            Demand(
                f"serve deployment {name} (serve.{key}.num_cpus / num_gpus x autoscaling.max_replicas)",
                d.num_cpus, d.num_gpus, auto.max_replicas, auto.min_replicas,
                label=_label((f"serve.{key}.num_cpus", float(d.num_cpus)), (f"serve.{key}.num_gpus", float(d.num_gpus)),
                             (f"serve.{key}.autoscaling.min_replicas", auto.min_replicas)),
                keys=(f"serve.{key}.num_cpus", f"serve.{key}.num_gpus", f"serve.{key}.autoscaling"),
                fit=f"serve.{key}.num_cpus",
            )
        )  # fmt: skip
    return out


def bundles_per_pod(d: Demand, shape: PodShape, group: str) -> int:
    """How many of a demand's bundles fit one pod.

    Raises:
        ConfigError: one bundle does not fit (names the settings and the pod option to raise).
    """
    eps = 1e-9
    fits = math.inf
    if d.cpus > 0:
        fits = min(fits, math.floor(shape.cpus / d.cpus + eps))
    if d.gpus > 0:
        fits = min(fits, math.floor(shape.gpus / d.gpus + eps)) if shape.gpus else 0
    if fits == 0:
        option = "--gpu-worker-cpus / --gpus-per-pod" if group == "gpu" else "--worker-cpus"
        raise ConfigError(
            f"{d.what}: one bundle ({d.cpus:g} CPU, {d.gpus:g} GPU) does not fit a {group} worker pod "
            f"({shape.cpus} CPU, {shape.gpus} GPU); lower the setting or raise {option}"
        )
    return 10**6 if fits == math.inf else int(fits)


def pack(bundles: list[tuple[float, float]], shape: PodShape) -> int:
    """Pods of ``shape`` that hold ``bundles`` of (CPUs, GPUs): first-fit decreasing.

    Close to what Ray's scheduler achieves, and never fewer pods than the bundles need.
    """
    eps = 1e-9
    free: list[list[float]] = []
    for cpus, gpus in sorted(bundles, key=lambda b: (b[1], b[0]), reverse=True):
        for pod in free:
            if pod[0] + eps >= cpus and pod[1] + eps >= gpus:
                pod[0] -= cpus
                pod[1] -= gpus
                break
        else:
            free.append([shape.cpus - cpus, shape.gpus - gpus])
    return len(free)


def _pods(demands: list[Demand], shape: PodShape, group: str) -> tuple[int, int]:
    for d in demands:
        bundles_per_pod(d, shape, group)  # a clear error for a bundle no pod can hold
    most = pack([(d.cpus, d.gpus) for d in demands for _ in range(d.count)], shape)
    least = pack([(d.cpus, d.gpus) for d in demands for _ in range(d.min_count)], shape)
    return most, least


def plan_groups(demands: list[Demand], shapes: Shapes, mode: str) -> list[WorkerGroup]:
    """Worker groups for a set of demands.

    Replica policy per manifest:

    * ``job`` (RayJob): start at full size (``replicas = maxReplicas``) so the job's stages
      see their resources as soon as it starts; ``minReplicas: 0`` lets the autoscaler
      release pods a finished stage no longer uses.
    * ``service`` (RayService): ``minReplicas`` holds the deployments' ``min_replicas``,
      ``maxReplicas`` their ``max_replicas``; Serve's autoscaler asks, Ray's adds pods.
    * ``cluster`` (interactive RayCluster): from zero, up to what the stages ask for.

    The CPU group always exists (at least one pod at most): the head offers no CPUs to tasks.
    The GPU group exists only when some demand asks for GPUs.
    """
    gpu = [d for d in demands if d.gpus > 0]
    cpu = [d for d in demands if d.gpus <= 0]
    groups = []
    most, least = _pods(cpu, shapes.cpu_worker, "cpu")
    groups.append(_group("cpu", shapes.cpu_worker, max(1, most), least, mode, cpu))
    if gpu:
        most, least = _pods(gpu, shapes.gpu_worker, "gpu")
        groups.append(_group("gpu", shapes.gpu_worker, most, least, mode, gpu))
    return groups


def _group(name: str, shape: PodShape, most: int, least: int, mode: str, demands: list[Demand]) -> WorkerGroup:
    least = min(least, most)
    if mode == "job":
        return WorkerGroup(name, shape, replicas=most, min_replicas=0, max_replicas=most, demands=demands)
    if mode == "service":
        return WorkerGroup(name, shape, replicas=least, min_replicas=least, max_replicas=most, demands=demands)
    return WorkerGroup(name, shape, replicas=0, min_replicas=0, max_replicas=most, demands=demands)


def plan_cluster_groups(settings: Settings, shapes: Shapes) -> list[WorkerGroup]:
    """Worker groups of an interactive cluster: Serve running next to one batch job at a time.

    Per group, the bound is Serve's pods plus the largest batch job's pods.
    """
    serve = serve_demands(settings)
    merged: dict[str, WorkerGroup] = {}
    for kind in JOB_KINDS:
        for g in plan_groups(job_demands(settings, kind) + serve, shapes, "cluster"):
            if g.name not in merged or g.max_replicas > merged[g.name].max_replicas:
                merged[g.name] = g
    return [merged[n] for n in ("cpu", "gpu") if n in merged]
