"""Ray Data wiring of the ingest stages (thin: what runs is defined in :mod:`pipeline`).

::

    from_items(files) ─map_batches(LoadChunkStage, actors)─▶ map_batches(EmbedStage, actor pool)
                      ─iter_batches─▶ driver ─▶ QdrantSink (single writer)

Loading/chunking runs in a small actor pool (the tokenizer loads once per actor); embedding
runs in an ``ActorPoolStrategy`` pool whose size, batch size and CPUs/GPUs per actor come
from ``ingest.*`` config. Batches stream back to the driver as they finish, so the driver's
memory does not grow with the corpus.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

from ragops.config import Settings
from ragops.ingest.embed import EmbedStage
from ragops.ingest.loaders import SourceFile
from ragops.raylocal import ensure_ray

#: CPU share of a load/chunk actor: tokenizing is light next to embedding.
LOAD_ACTOR_CPUS = 0.25


def run_ray(settings: Settings, stage: Any, files: Sequence[SourceFile]) -> Iterator[dict[str, Any]]:
    """Run load/chunk and embed under Ray Data; yield embedded batches to the driver."""
    import ray.data
    from ray.data import ActorPoolStrategy

    from ragops.ingest.pipeline import source_rows

    ensure_ray(settings.ray)
    cfg = settings.ingest
    blocks = max(1, math.ceil(len(files) / cfg.docs_per_task))
    ds = ray.data.from_items(source_rows(files), override_num_blocks=blocks)
    ds = ds.map_batches(
        type(stage),
        fn_constructor_kwargs={"settings": stage.settings, "known": stage.known, "indexed": stage.indexed},
        batch_size=cfg.docs_per_task,
        batch_format="numpy",
        compute=ActorPoolStrategy(size=1),
        num_cpus=LOAD_ACTOR_CPUS,
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
        num_cpus=cfg.cpus_per_actor,
        num_gpus=cfg.gpus_per_actor or None,
    )
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")
