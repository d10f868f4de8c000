"""``GET /healthz``: deployment states, the vector store, the generator's engine, replicas at zero."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from fastapi.responses import JSONResponse, Response

from ragops.serve.backend import Deadline
from ragops.serve.errors import APIError

if TYPE_CHECKING:
    from ragops.serve.http_app import IngressContext

#: Deployment states that serve requests (scaling changes the replica count, not the service).
_SERVING_STATES = ("HEALTHY", "UPSCALING", "DOWNSCALING")
#: Ray Serve deployment names /healthz would otherwise call into.
_RETRIEVER, _GENERATOR = "Retriever", "Generator"


async def health_response(ctx: IngressContext) -> Response:
    """Health without waking anything: a deployment scaled to zero is reported, not called.

    (Calling a deployment at zero replicas would start one: a probe every few seconds would
    keep a scale-to-zero deployment up forever.)
    """
    checks: dict[str, Any] = {}
    ok = True
    running: dict[str, int] = {}
    if ctx.deployment_status is not None:
        try:
            statuses = await asyncio.wait_for(ctx.deployment_status(), 5.0)
            if ctx.running_replicas is not None:
                running = await asyncio.wait_for(ctx.running_replicas(), 5.0)
        except Exception as exc:  # noqa: BLE001 - health must answer, not fail
            statuses, ok = {}, False
            checks["deployments_error"] = type(exc).__name__
        checks["deployments"] = statuses
        if running:
            checks["replicas"] = running
        ok = ok and bool(statuses) and all(s in _SERVING_STATES for s in statuses.values())
    asleep = "scaled to zero: the next request starts a replica (cold start)"
    if running.get(_RETRIEVER) == 0:
        store: dict[str, Any] = {"ok": True, "replicas": 0, "state": asleep}
    else:
        try:
            store = await ctx.backend.retriever_health(deadline=Deadline(5.0))
        except APIError as err:
            store = {"ok": False, "error": err.message}
    checks["vectorstore"] = store
    ok = ok and bool(store.get("ok"))
    if running.get(_GENERATOR) == 0:
        checks["generator"] = {"replicas": 0, "state": asleep}
    else:
        try:
            # Which engine decodes (and why): informational, never a reason to report unhealthy.
            checks["generator"] = await ctx.backend.generator_info(deadline=Deadline(5.0))
        except APIError as err:
            checks["generator"] = {"error": err.message}
    return JSONResponse({"status": "ok" if ok else "unavailable", **checks}, status_code=200 if ok else 503)
