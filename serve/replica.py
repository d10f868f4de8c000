"""Set-up shared by every deployment's replica (each replica is its own process)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

from ragops.config import Settings

log = logging.getLogger(__name__)


def replica_settings(settings: dict[str, Any] | Settings, torch_threads_of: str | None = None) -> Settings:
    """Rebuild the app's settings in a replica and prepare the process.

    Settings travel to replicas as JSON-able dicts (stable across processes and Ray
    versions). Traces are exported from here on when ``telemetry`` is set (the replica's
    ``ragops.component`` is ``serve-<deployment>``). When ``torch_threads_of`` names a deployment section of ``serve`` whose
    ``torch_threads`` is set, torch's intra-op pool is sized to it (Ray's default is the
    replica's CPU reservation, floored, at least 1), without importing torch for it.
    """
    s = settings if isinstance(settings, Settings) else Settings.model_validate(settings)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    for noisy in ("transformers", "sentence_transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from ragops.tracking import telemetry

    telemetry.configure(s.telemetry, f"serve-{torch_threads_of or 'ingress'}")
    if s.serve.replica_niceness is not None:
        renice(s.serve.replica_niceness)
    if torch_threads_of:
        threads = getattr(s.serve, torch_threads_of).torch_threads
        if threads:
            if "torch" in sys.modules:
                sys.modules["torch"].set_num_threads(threads)
            else:
                # torch sizes its pool from OMP_NUM_THREADS when it loads. Importing it here
                # would cost a llama.cpp generator replica, which never needs torch, ~700 MiB.
                os.environ["OMP_NUM_THREADS"] = str(threads)
    return s


def renice(niceness: int) -> None:
    """Set every thread of this process to ``niceness`` (threads created later inherit it).

    On Linux niceness is per thread, and Ray has already started some (event loop, gRPC), so
    each task of ``/proc/self/task`` is set; elsewhere the process is.
    """
    tasks = Path("/proc/self/task")
    ids = [int(t) for t in os.listdir(tasks)] if tasks.is_dir() else [0]
    for tid in ids:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) != niceness:
                os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except PermissionError:
            log.warning("could not set the replica's niceness to %d (needs privileges); keeping Ray's", niceness)
            return
        except OSError:
            continue  # a thread that ended meanwhile
