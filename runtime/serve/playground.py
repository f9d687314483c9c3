"""The playground: one small page at `/` and `/playground` for trying the model in a browser (the
intent with a bar per label, the reply streamed, a batch as a table and CSV, what /health says).

The page is three package files (runtime/serve/page/), plain HTML, CSS and JavaScript with no
framework and no build step: what it does (fetch, a stream reader for Server-Sent Events, a few DOM
updates) is what browsers already have, ~400 lines in all. A vendored library would be more code
to review and to keep up with security releases than the page itself, and a build step would need
Node at install time. Nothing is fetched from elsewhere, so it works offline, and the
Content-Security-Policy below tells the browser to refuse anything that is not this server.

The page and its files are public, as /docs is: with --api-key the page asks for the key and sends
it as `Authorization: Bearer` on the data endpoints; the key stays in the tab's sessionStorage.
"""
from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from fastapi.responses import Response

PAGE_PATHS = ("/", "/playground")
ASSETS = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
ASSET_PREFIX = "/playground/"
PUBLIC_PATHS = frozenset((*PAGE_PATHS, *(ASSET_PREFIX + name for name in ASSETS)))

HEADERS = {
    # only this server: scripts, styles, API calls; the favicon is an empty data: URL
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
                               "base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # a newer qwen-local's page is never mixed with an older script
}


def _read(name: str) -> bytes:
    return resources.files("qwen_local.runtime.serve").joinpath("page", name).read_bytes()


def playground_router() -> APIRouter:
    """The page's routes, with its files read once (they are package data); left out of the API
    schema, which describes the data endpoints."""
    page = _read("index.html")
    assets = {name: _read(name) for name in ASSETS}
    router = APIRouter(include_in_schema=False)

    async def index():
        return Response(page, media_type="text/html; charset=utf-8", headers=HEADERS)

    for path in PAGE_PATHS:
        router.add_api_route(path, index, methods=["GET"])

    @router.get(ASSET_PREFIX + "{name}")
    async def asset(name: str):
        if name not in assets:
            raise HTTPException(404, "Not Found")
        return Response(assets[name], media_type=ASSETS[name], headers=HEADERS)

    return router
