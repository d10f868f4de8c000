"""The ingress deployment: the FastAPI app of :mod:`ragops.serve.http_app` on Ray Serve.

The app is built per replica (``__serve_build_asgi_app__``, Ray Serve's late-bound ingress)
from the replica's own state: settings, API key digests, the downstream handles, a private
metrics registry and the feedback store.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI
from ray import serve
from ray.serve.handle import DeploymentHandle

from ragops.serve.auth import ApiKeys
from ragops.serve.backend import HandleBackend
from ragops.serve.feedback import FeedbackStore, feedback_dir
from ragops.serve.http_app import IngressContext, create_app
from ragops.serve.metrics import ServeMetrics
from ragops.serve.models import ModelCatalog
from ragops.serve.replica import replica_settings

#: How long a deployment-status answer is reused by /healthz (the controller is not hammered).
STATUS_TTL_S = 1.0


@serve.deployment(name="Ingress")
@serve.ingress()
class Ingress:
    """HTTP front door: auth, validation, orchestration (embed → retrieve → [rerank →] generate), metrics.

    Args:
        settings: The app's settings as a dict.
        keys: API key digests (never the keys).
        embedder, retriever, generator: Handles of the other deployments.
        reranker: Handle of the reranker deployment; None when ``retrieval.rerank.model`` is unset.
    """

    def __init__(
        self,
        settings: dict[str, Any],
        keys: ApiKeys,
        embedder: DeploymentHandle,
        retriever: DeploymentHandle,
        generator: DeploymentHandle,
        reranker: DeploymentHandle | None = None,
    ) -> None:
        self.settings = replica_settings(settings)
        metrics = ServeMetrics()
        self._status: tuple[float, dict[str, str], dict[str, int]] = (0.0, {}, {})
        self.ctx = IngressContext(
            settings=self.settings,
            keys=keys,
            backend=HandleBackend(
                embedder, retriever, generator, metrics, self.settings.serve.retry_after_s,
                reranker=reranker, retrieval=self.settings.retrieval,
            ),
            metrics=metrics,
            feedback=FeedbackStore(feedback_dir(self.settings)),
            catalog=ModelCatalog(self.settings),
            deployment_status=self._deployment_status,
            running_replicas=self._running_replicas,
        )

    async def _fetch_status(self) -> tuple[dict[str, str], dict[str, int]]:
        at, cached, running = self._status
        if time.monotonic() - at < STATUS_TTL_S and cached:
            return cached, running

        def fetch() -> tuple[dict[str, str], dict[str, int]]:
            app = serve.get_replica_context().app_name
            st = serve.status().applications.get(app)
            if st is None:
                return {}, {}
            statuses = {name: str(getattr(d.status, "value", d.status)) for name, d in st.deployments.items()}
            counts = {
                name: sum(n for state, n in d.replica_states.items() if str(getattr(state, "value", state)) == "RUNNING")
                for name, d in st.deployments.items()
            }
            return statuses, counts

        statuses, running = await asyncio.to_thread(fetch)
        self._status = (time.monotonic(), statuses, running)
        return statuses, running

    async def _deployment_status(self) -> dict[str, str]:
        return (await self._fetch_status())[0]

    async def _running_replicas(self) -> dict[str, int]:
        """Running replicas per deployment (0: scaled to zero, or still starting)."""
        return (await self._fetch_status())[1]

    def __serve_build_asgi_app__(self) -> FastAPI:
        return create_app(self.ctx)
