"""How a request fails: the exceptions the endpoints raise, and the handlers that answer them."""
from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse


class HTTPError(Exception):
    """An answer with this status and {"detail": ...}."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


class Overloaded(Exception):
    """No place in the bounded queue (or the server is draining)."""


class ClientGone(Exception):
    """The client disconnected while its request waited for the engine."""


async def http_error(request: Request, e: HTTPError) -> JSONResponse:
    return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)


async def invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    # FastAPI's own handler echoes the input back, which cannot be encoded when it holds lone
    # surrogates (a 500); report location and message only.
    detail = [{"type": str(err.get("type", "")), "loc": [str(x) for x in err.get("loc", ())],
               "msg": str(err.get("msg", "")).encode("utf-8", "replace").decode("utf-8")}
              for err in e.errors()]
    request.app.state.serve.count(request.url.path, 422)
    return JSONResponse({"detail": detail}, status_code=422)
