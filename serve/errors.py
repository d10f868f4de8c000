"""OpenAI-style API errors: ``{"error": {"message", "type", "code", "param"}}``.

Every error the HTTP layer answers goes through :class:`APIError`, so clients (the official
``openai`` package included) see the shape they expect, and a status code that says whose
fault it was: 4xx for the request, 503/504 for load, never a 5xx for bad input.
"""

from __future__ import annotations

from typing import Any

from ragops.errors import CollectionError, InputError, ModelNotFoundError, RagopsError, StoreLockedError


class APIError(Exception):
    """An error answered as OpenAI-style JSON.

    Args:
        status: HTTP status code.
        message: Complete, user-facing message (never contains secrets).
        type: OpenAI error type (``invalid_request_error``, ``authentication_error``, ...).
        code: Machine-readable code (``model_not_found``, ``invalid_api_key``, ...).
        param: The request field at fault, when one is.
        headers: Extra response headers (``Retry-After``, ``WWW-Authenticate``).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",  # the OpenAI field name
        code: str | None = None,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body."""
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}

    def to_dict(self) -> dict[str, Any]:
        """A picklable form, for errors that deployments hand back as data."""
        return {"status": self.status, "message": self.message, "type": self.type, "code": self.code, "param": self.param}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> APIError:
        """Inverse of :meth:`to_dict`."""
        return cls(int(d["status"]), str(d["message"]), type=d.get("type") or "server_error", code=d.get("code"),
                   param=d.get("param"))  # fmt: skip


def bad_request(message: str, *, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    """400: the request is malformed or asks for something unsupported."""
    return APIError(400, message, param=param, code=code)


def model_not_found(model: str) -> APIError:
    """404 for an unknown model, worded like OpenAI's."""
    return APIError(
        404,
        f"The model '{model}' does not exist or is not served here; GET /v1/models lists the served models.",
        code="model_not_found",
        param="model",
    )


def overloaded(retry_after_s: int, what: str = "the server") -> APIError:
    """503 with ``Retry-After``: a queue is full; the request was not started."""
    return APIError(
        503,
        f"{what} is at capacity; retry after {retry_after_s} s",
        type="server_error",
        code="overloaded",
        headers={"Retry-After": str(retry_after_s)},
    )


def timed_out(limit_s: float) -> APIError:
    """504: the request ran past its time limit (see ``serve.request_timeout_s``)."""
    return APIError(
        504, f"the request did not complete within its time limit of {limit_s:g} s", type="timeout_error", code="timeout"
    )


def from_ragops_error(exc: BaseException) -> APIError:
    """Map a library error (possibly wrapped by Ray) to an API error.

    Input problems are the caller's (400), unknown models 404, store or collection problems
    are the server's state (503: retrying after an operator acts can succeed).
    """
    from ragops.raylocal import unwrap_ray_error

    inner: BaseException = exc
    for _ in range(8):  # Ray wraps a replica's exception in RayTaskError(s); `.cause` is the original
        cause = getattr(inner, "cause", None)
        if not isinstance(cause, BaseException) or cause is inner:
            break
        inner = cause
    inner = unwrap_ray_error(inner)
    if isinstance(inner, APIError):
        return inner
    if isinstance(inner, InputError):
        return bad_request(str(inner))
    if isinstance(inner, ModelNotFoundError):
        return APIError(404, str(inner), code="model_not_found", param="model")
    if isinstance(inner, (CollectionError, StoreLockedError)):
        return APIError(503, str(inner), type="server_error", code="index_unavailable")
    if isinstance(inner, RagopsError):
        return APIError(500, str(inner), type="server_error", code="internal_error")
    return APIError(500, "internal error; see the server logs", type="server_error", code="internal_error")
