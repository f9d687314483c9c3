"""How a request fails: the exceptions the endpoints raise, and the handlers that answer them.

Errors from /v1 take OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with 400
where the rest of the API says 422 (what OpenAI's clients expect for a bad parameter); the other
endpoints answer `{"detail": ...}`.
"""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

V1 = "/v1"
# OpenAI's error types by status; anything else 4xx is an invalid request, 5xx a server error
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


class HTTPError(Exception):
    """An answer with this status and {"detail": ...} (on /v1: OpenAI's error with param and code)."""

    def __init__(self, status: int, detail: str, headers: dict | None = None, *,
                 param: str | None = None, code: str | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.param, self.code = param, code


class Overloaded(Exception):
    """No place in the bounded queue (or the server is draining)."""


class ClientGone(Exception):
    """The client disconnected while its request waited for the engine."""


def is_v1(path: str | None) -> bool:
    return bool(path) and (path == V1 or path.startswith(V1 + "/"))


def error_response(path: str | None, status: int, detail, headers: dict | None = None, *,
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    """The error answer for a request to `path`, in the shape its API uses."""
    if not is_v1(path):
        return JSONResponse({"detail": detail}, status_code=status, headers=headers)
    status = 400 if status == 422 else status
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return JSONResponse({"error": {"message": str(detail), "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


async def http_error(request: Request, e: HTTPError) -> JSONResponse:
    return error_response(request.url.path, e.status, e.detail, e.headers, param=e.param, code=e.code)


async def starlette_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    """Unknown paths and methods (404, 405), in the shape of the API asked."""
    return error_response(request.url.path, e.status_code, e.detail, getattr(e, "headers", None))


def _clean(text) -> str:
    text = str(text).encode("utf-8", "replace").decode("utf-8")
    return text.removeprefix("Value error, ")  # pydantic's wording for a validator's ValueError


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input back, which cannot be encoded when it holds lone
    # surrogates (a 500); report location and message only.
    detail = [{"type": str(err.get("type", "")), "loc": [str(x) for x in err.get("loc", ())],
               "msg": _clean(err.get("msg", ""))} for err in e.errors()]
    path = request.url.path
    request.app.state.serve.count(path, 422)
    if not is_v1(path):
        return JSONResponse({"detail": detail}, status_code=422)
    first = detail[0] if detail else {"loc": [], "msg": "invalid request", "type": ""}
    param = ".".join(first["loc"][1:]) or None  # after "body"
    message = (f"unsupported field: {param}" if first["type"] == "extra_forbidden"
               else f"{param}: {first['msg']}" if param else first["msg"])
    return error_response(path, 400, message, param=param,
                          code="unsupported_parameter" if first["type"] == "extra_forbidden" else None)
