"""OpenAI-style API errors: ``{"error": {"message", "type", "code", "param"}}``.

Every error the HTTP layer answers goes through :class:`APIError`, so clients (the official
``openai`` package included) see the shape they expect, and a status code that says whose
fault it was: 4xx for the request, 503/504 for load, never a 5xx for bad input.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ragops.errors import CollectionError, InputError, ModelNotFoundError, RagopsError, StoreLockedError

log = logging.getLogger(__name__)


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


# ---------------------------------------------------------------------------------------
# Error handlers
# ---------------------------------------------------------------------------------------


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    err = errors[0]
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    kind = err.get("type", "")
    where = ".".join(loc)
    param = loc[0] if loc else None
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "json_invalid":
        return bad_request("the request body is not valid JSON", code="invalid_json")
    if kind == "missing" and not loc:
        return bad_request("the request body is missing; send a JSON object", code="missing_body")
    if kind == "value_error" and not loc:  # a model-level rule (unsupported option, last message...)
        return bad_request(msg)
    if not loc:
        return bad_request(f"the request body must be a JSON object ({msg})")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {where}", param=param, code="unknown_parameter")
    if kind == "missing":
        return bad_request(f"missing required parameter '{where}'", param=param, code="missing_parameter")
    return bad_request(f"'{where}': {msg}", param=param)


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error of ``app`` as an OpenAI-shaped JSON body (FastAPI's 422 → 400)."""
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = _validation_error(exc)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "invalid_request")
        message = {404: "no such endpoint", 405: "method not allowed on this endpoint"}.get(exc.status_code, str(exc.detail))
        err = APIError(exc.status_code, message, code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        err = APIError(500, "internal error; see the server logs", type="server_error", code="internal_error")
        return JSONResponse(err.body(), status_code=500)
