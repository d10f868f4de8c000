"""Start or join Ray on demand (never at import time).

Embedded default: a local Ray started in-process the first time a stage needs it. On a
cluster, ``RAY_ADDRESS`` (set by ``ray job submit``) or ``ray.address`` in config joins it.
"""

from __future__ import annotations

import logging
import os

from ragops.config import RayConfig

log = logging.getLogger(__name__)


def ensure_ray(cfg: RayConfig | None = None) -> None:
    """Initialise Ray once per process, quietly, with Ray Data's own progress bars off."""
    import ray

    cfg = cfg or RayConfig()
    if not ray.is_initialized():
        address = driver_address(cfg.address, os.environ.get("RAY_ADDRESS"))
        kwargs: dict = {"ignore_reinit_error": True, "log_to_driver": False, "logging_level": logging.ERROR}
        if address:
            kwargs["address"] = address
        else:
            if _is_dashboard_url(os.environ.get("RAY_ADDRESS")):
                # ray.init() reads RAY_ADDRESS itself, and a dashboard URL is not joinable.
                kwargs["address"] = "local"
            kwargs["include_dashboard"] = False
            if cfg.num_cpus:
                kwargs["num_cpus"] = cfg.num_cpus
        ray.init(**kwargs)
    from ray.data import DataContext

    # Ray Data configures its own loggers on import; keep them to errors in ragops' output.
    for name in ("ray", "ray.data", "ray.serve", "ray.train"):
        logging.getLogger(name).setLevel(logging.ERROR)

    ctx = DataContext.get_current()
    # ragops draws its own progress (documents, chunks, points/s); Ray's bars would interleave.
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if hasattr(ctx, "enable_rich_progress_bars"):
        ctx.enable_rich_progress_bars = False


def _is_dashboard_url(address: str | None) -> bool:
    return bool(address) and address.startswith(("http://", "https://"))  # type: ignore[union-attr]


def driver_address(configured: str | None, env_address: str | None) -> str | None:
    """The address ``ray.init`` should join, or None to start a local Ray.

    ``ray.address`` may be a dashboard URL (``http://head:8265``): that is where
    ``ragops job submit`` sends jobs, not something a driver can join. Inside a job, Ray sets
    ``RAY_ADDRESS`` to the cluster's own address, which then wins over such a URL.
    """
    if configured and not _is_dashboard_url(configured):
        return configured
    if env_address and not _is_dashboard_url(env_address):
        return env_address
    return None


def unwrap_ray_error(exc: BaseException) -> BaseException:
    """The first :class:`RagopsError` in an exception's cause chain (Ray wraps user errors)."""
    from ragops.errors import RagopsError

    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, RagopsError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return exc
