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

import math
from collections.abc import Iterator, Sequence
from typing import Any

from ragops.ingest.embed import EmbedStage
from ragops.ingest.loaders import SourceFile

from ragops.config import Settings
from ragops.errors import RagopsError
from ragops.raylocal import ensure_ray, unwrap_ray_error

def load_chunk_batch(batch: dict[str, Any], stage: Any) -> dict[str, Any]:
    """Ray task body: run the (driver-built) load/chunk stage on one batch of files.

    Tasks rather than an actor pool: the stage's only heavy state is the tokenizer, which
    :func:`ragops.ingest.pipeline.load_tokenizer` caches per worker process, and Ray reuses
    worker processes across tasks.
    """
    return stage(batch)


def admit_ingest(settings: Settings) -> Settings:
    """Check that the actor pool *and* a load task fit the cluster; fit, wait or fail.

    The actor pool is placed first: without room left for at least one load task it would hold
    every CPU and wait forever for input that no task can produce.
    """
    from ragops.cluster.admission import admit
    from ragops.cluster.resources import job_demands

    load, actors = job_demands(settings, "ingest")
    return admit(settings, [actors, load])


def run_ray(settings: Settings, stage: Any, files: Sequence[SourceFile]) -> Iterator[dict[str, Any]]:
    """Run load/chunk and embed under Ray Data; returns the stream of embedded batches.

    Ray starts (or is joined) and the stages' resources are admitted here, before the stream
    is returned: a request that cannot fit fails now, and waiting for an autoscaler is not
    taken for a stall by the caller's watchdog.
    """
    import ray
    import ray.data
    from ragops.ingest.pipeline import source_rows
    from ray.data import ActorPoolStrategy

    from ragops.cluster.resources import LOAD_TASK_CPUS

    ensure_ray(settings.ray)
    settings = admit_ingest(settings)
    cfg = settings.ingest
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
            "hold_file": cfg.test_hold_file,
        },
        batch_size=cfg.embed_batch_size,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=cfg.embed_actors),
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    return _stream(ds)


def _stream(ds: Any) -> Iterator[dict[str, Any]]:
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
    except Exception as exc:  # noqa: BLE001 - re-raise our own error, not Ray's wrapper
        inner = unwrap_ray_error(exc)
        if isinstance(inner, RagopsError):
            raise inner from None
        raise
