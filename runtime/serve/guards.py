"""What runs before FastAPI sees a request (pure ASGI): the bearer-key check and the body guard.

With an API key, everything but the public paths needs `Authorization: Bearer KEY`: a browser
cannot send a bearer token to open the docs or the playground page (which then asks for the key),
and the schema and the page hold nothing secret; every data endpoint and /metrics stay behind the
key.
"""
from __future__ import annotations

import json
import secrets

from fastapi import FastAPI

from qwen_local.runtime.serve.errors import error_response

from qwen_local.runtime.serve.playground import PUBLIC_PATHS as PAGE_PATHS

DOCS_ASSETS = "/docs-assets"
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})


def is_public(path: str) -> bool:
    return (path in PUBLIC_PATHS or path in PAGE_PATHS
            or (path.startswith(DOCS_ASSETS + "/") and ".." not in path))


class BearerAuth:
    """401 for a request to a non-public path without `Authorization: Bearer <api_key>`."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not is_public(scope.get("path", "")):
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not secrets.compare_digest(got, self.expected):
                resp = error_response(scope.get("path"), 401, "missing or wrong API key (Authorization: "
                                      "Bearer …)", {"WWW-Authenticate": "Bearer"}, code="invalid_api_key")
                return await resp(scope, receive, send)
        return await self.app(scope, receive, send)


def offer_bearer(app: FastAPI) -> None:
    """The schema names the bearer scheme, so Swagger UI shows "Authorize" for the key."""
    schema = app.openapi

    def openapi_with_bearer():
        doc = schema()
        doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
            "type": "http", "scheme": "bearer"}
        doc["security"] = [{"bearer": []}]
        return doc

    app.openapi = openapi_with_bearer


class BodyGuard:
    """Reads the request body up to max_body bytes before FastAPI sees it.

    Larger bodies get 413 as soon as Content-Length or the bytes read so far exceed the limit (the
    rest is never buffered). Bodies that FastAPI would answer with a bare 400 (not UTF-8, or JSON
    nested deeper than Python's parser recurses) get the documented 422. The body is then handed
    on unchanged; later receive() calls go to the client, so disconnects are still seen.
    """

    def __init__(self, app, max_body: int, on_reject=None):
        self.app, self.max_body, self.on_reject = app, max_body, on_reject

    async def reject(self, scope, receive, send, status: int, detail: str):
        if self.on_reject:
            self.on_reject(scope, status)
        await error_response(scope.get("path"), status, detail)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        body = await self._read(scope, receive, send, headers)
        if body is None:  # refused, or the client left before sending it all
            return
        problem = self._unreadable(body, headers.get(b"content-type"))
        if problem:
            return await self.reject(scope, receive, send, 422, problem)
        return await self.app(scope, replay(body, receive), send)

    async def _read(self, scope, receive, send, headers: dict) -> bytes | None:
        too_big = f"request body larger than {self.max_body} bytes"
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await self.reject(scope, receive, send, 413, too_big)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client left before sending it all
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self.reject(scope, receive, send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    @staticmethod
    def _unreadable(body: bytes, ctype: bytes | None) -> str | None:
        """Why FastAPI would answer this body with a bare 400, if it would."""
        if body and (not ctype or b"json" in ctype):  # FastAPI reads a body without a type as JSON
            try:
                json.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                return "request body is not valid UTF-8"
            except RecursionError:
                return "JSON nested too deeply"
            except ValueError:
                pass  # malformed JSON: FastAPI's own 422 says where
        return None


def replay(body: bytes, receive):
    """An ASGI receive() that hands on a body already read, then the client's own messages (so a
    disconnect is still seen)."""
    replayed = False

    async def again():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
