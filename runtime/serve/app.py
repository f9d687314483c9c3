"""`create_app`: one FastAPI app over a running engine, wired from its parts (state, guards, error
handlers, routes, the playground page). /docs and /redoc come from the fastapi-offline wheel's
Swagger UI and ReDoc files, not a CDN, and the page from this package's files: they work on a
machine with no internet."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from qwen_local.runtime.engine import Engine
from qwen_local.runtime.errors import __version__
from qwen_local.runtime.serve.errors import HTTPError, http_error, invalid_request, starlette_error
from qwen_local.runtime.serve.guards import DOCS_ASSETS, BearerAuth, BodyGuard, offer_bearer
from qwen_local.runtime.serve.openai_api import router as openai_router
from qwen_local.runtime.serve.playground import playground_router
from qwen_local.runtime.serve.routes import router
from qwen_local.runtime.serve.settings import ServeSettings
from qwen_local.runtime.serve.state import ServeState


def create_app(engine: Engine, settings: ServeSettings | None = None, fallback=None) -> FastAPI:
    """An app over a running engine. Several apps may share one engine (it is thread-safe)."""
    from fastapi_offline import FastAPIOffline

    s = settings or ServeSettings()
    if fallback is None and not s.local_only:
        raise ValueError("a fallback policy needs a fallback backend (--fallback openai)")
    app = FastAPIOffline(title="qwen-local", version=__version__,
                         description="Local Qwen2.5 intent + Vietnamese replies (drop-in for GPT-4o-mini "
                                     "calls)", static_url=DOCS_ASSETS)
    st = app.state.serve = ServeState(engine, s, fallback)
    # the last added runs first: the key is checked before a body is read
    app.add_middleware(BodyGuard, max_body=s.max_body, on_reject=lambda scope, status: st.count(
        scope.get("path"), status))
    if s.api_key:
        app.add_middleware(BearerAuth, api_key=s.api_key)
        offer_bearer(app)
    app.add_exception_handler(HTTPError, http_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(StarletteHTTPException, starlette_error)
    app.include_router(router)
    app.include_router(openai_router)
    if s.playground:
        app.include_router(playground_router())
    return app
