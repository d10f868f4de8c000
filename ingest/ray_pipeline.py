"""Ray Data wiring of the ingest stages (thin: what runs is defined in :mod:`pipeline`).

::

    from_items(files) ─map_batches(LoadChunkStage, tasks)─▶ map_batches(EmbedStage, actor pool)
                      ─iter_batches─▶ driver ─▶ QdrantSink (single writer)

Loading/chunking runs as Ray tasks (the tokenizer is cached per worker process); embedding
runs in an ``ActorPoolStrategy`` pool whose size, batch size and CPUs/GPUs per actor come
from ``ingest.*`` config. Batches stream back to the driver as they finish, so the driver's
memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

from ragops.ingest.embed import EmbedStage
from ragops.ingest.loaders import SourceFile

from ragops.config import Settings
from ragops.errors import RagopsError
from ragops.raylocal import ensure_ray, unwrap_ray_error

log = logging.getLogger(__name__)

#: CPU share of a load/chunk task: reading and tokenizing are light next to embedding.
LOAD_TASK_CPUS = 0.25


def load_chunk_batch(batch: dict[str, Any], stage: Any) -> dict[str, Any]:
    """Ray task body: run the (driver-built) load/chunk stage on one batch of files.

    Tasks rather than an actor pool: the stage's only heavy state is the tokenizer, which
    :func:`ragops.ingest.pipeline.load_tokenizer` caches per worker process, and Ray reuses
    worker processes across tasks.
    """
    return stage(batch)


def fit_actor_cpus(per_actor: float, actors: int, cluster_cpus: float) -> float:
    """Shrink the embedding actors' CPU reservation so the load tasks can still be scheduled.

    Without room for at least one load task, the actor pool would hold every CPU and wait
    forever for input that no task can produce.
    """
    room = cluster_cpus - LOAD_TASK_CPUS
    if per_actor * actors <= room:
        return per_actor
    fitted = max(0.1, room / actors)
    log.info(
        "ingest.cpus_per_actor=%s x %s actors does not fit %s CPUs beside the load tasks; using %.2f per actor",
        per_actor, actors, cluster_cpus, fitted,
    )
    return fitted


def run_ray(settings: Settings, stage: Any, files: Sequence[SourceFile]) -> Iterator[dict[str, Any]]:
    """Run load/chunk and embed under Ray Data; yield embedded batches to the driver."""
    import ray
    import ray.data
    from ragops.ingest.pipeline import source_rows
    from ray.data import ActorPoolStrategy

    ensure_ray(settings.ray)
    cfg = settings.ingest
    cpus_per_actor = cfg.cpus_per_actor
    if not (settings.ray.address or os.environ.get("RAY_ADDRESS")):
        # Only a Ray we started here has a fixed size; a cluster may autoscale up to fit.
        cpus_per_actor = fit_actor_cpus(cpus_per_actor, cfg.embed_actors, ray.cluster_resources().get("CPU", 1.0))
    blocks = max(1, math.ceil(len(files) / cfg.docs_per_task))
    ds = ray.data.from_items(source_rows(files), override_num_blocks=blocks)
    ds = ds.map_batches(
        load_chunk_batch,
        fn_kwargs={"stage": stage},
        batch_size=cfg.docs_per_task,
        batch_format="numpy",
        num_cpus=LOAD_TASK_CPUS,
    )
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={
            "embedder": settings.embedder,
            "sparse": cfg.sparse,
            "torch_threads": cfg.cpus_per_actor,
        },
        batch_size=cfg.embed_batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.embed_actors),
        num_cpus=cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:  # noqa: BLE001 - re-raise our own error, not Ray's wrapper
        inner = unwrap_ray_error(exc)
        if isinstance(inner, RagopsError):
            raise inner from None
        raise
