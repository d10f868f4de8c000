"""The ASGI gate in front of the API: metrics, authentication and the body limit, before any parsing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ragops.serve.auth import Role, authorize
from ragops.serve.errors import APIError

if TYPE_CHECKING:
    from ragops.serve.http_app import IngressContext

#: The endpoints metrics and traces name; any other path is counted as ``other``.
ROUTES = (
    "/", "/healthz", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/search", "/v1/embeddings",
    "/v1/feedback", "/v1/admin/reload", "/v1/admin/routes",
)  # fmt: skip
_REJECTION_REASON = {400: "invalid", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "invalid",
                     413: "too_large", 503: "overloaded", 504: "timeout"}  # fmt: skip


async def _send_error(send: Send, err: APIError) -> None:
    resp = JSONResponse(err.body(), status_code=err.status, headers=err.headers)
    await resp({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - responses never read
    return {"type": "http.disconnect"}


class GateMiddleware:
    """Counts and times every request, then checks its key and body size before the app.

    Authentication runs before the body is parsed, so an anonymous client learns nothing
    about what the API would accept. The body is buffered up to ``max_body_bytes`` (413
    above; a ``Content-Length`` over it is refused without reading).
    """

    def __init__(self, app: ASGIApp, ctx: IngressContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ROUTES else "other"
        m = self.ctx.metrics
        status = {"code": 500}

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        started = time.perf_counter()
        inflight = m.inflight.labels(endpoint)
        inflight.inc()
        try:
            await self._guarded(scope, receive, send_counted, path)
        finally:
            inflight.dec()
            code = status["code"]
            # The chat handler names the variant that answered in the scope's state.
            variant = str((scope.get("state") or {}).get("variant") or "")
            m.requests.labels(endpoint, scope.get("method", ""), str(code), variant).inc()
            m.latency.labels(endpoint, variant).observe(time.perf_counter() - started)
            if code in _REJECTION_REASON:
                m.rejections.labels(_REJECTION_REASON[code]).inc()

    async def _guarded(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        needed = Role.ADMIN if path.startswith("/v1/admin/") else Role.CHAT if path.startswith("/v1/") else None
        if needed is not None and scope.get("method") != "OPTIONS":
            headers = dict(scope.get("headers") or [])
            raw = headers.get(b"authorization")
            try:
                authorize(self.ctx.keys, raw.decode("latin-1") if raw is not None else None, needed)
            except APIError as err:
                await _send_error(send, err)
                return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            body = await self._read_body(scope, receive)
            if body is None:
                limit = self.ctx.settings.serve.max_body_bytes
                await _send_error(send, APIError(413, f"the request body exceeds the limit of {limit} bytes",
                                                 code="request_too_large"))  # fmt: skip
                return
            receive = _replay(body, receive)
        await self.app(scope, receive, send)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.ctx.settings.serve.max_body_bytes
        for name, value in scope.get("headers") or []:
            if name == b"content-length":
                try:
                    if int(value) > limit:
                        return None
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # later reads wait for the disconnect, as a real receive does

    return replay
