"""Set-up shared by every deployment's replica (each replica is its own process)."""

from __future__ import annotations

import logging
import os
from typing import Any

from ragops.config import Settings


def replica_settings(settings: dict[str, Any] | Settings, torch_threads_of: str | None = None) -> Settings:
    """Rebuild the app's settings in a replica and prepare the process.

    Settings travel to replicas as JSON-able dicts (stable across processes and Ray
    versions). When ``torch_threads_of`` names a deployment section of ``serve`` whose
    ``torch_threads`` is set, torch's intra-op pool is sized to it (Ray's default is the
    replica's CPU reservation, floored, at least 1).
    """
    s = settings if isinstance(settings, Settings) else Settings.model_validate(settings)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if torch_threads_of:
        threads = getattr(s.serve, torch_threads_of).torch_threads
        if threads:
            import torch

            torch.set_num_threads(threads)
    return s
