"""`qwen-local serve`: the HTTP face of the engine (FastAPI app factory + uvicorn runner).

Endpoints (Swagger UI at /docs, ReDoc at /redoc, both from the fastapi-offline wheel's local files):
  POST /qwen/intent        {"query"} -> {"intent", "probs", "source", "latency_ms"}
  POST /qwen/intent/batch  {"queries": [...]} -> {"results": [<same shape>, ...]}
  POST /qwen/generate      {"query", "intent", "has_products", "products", "stream"} ->
                           {"message", "source", ...}, or with "stream": true Server-Sent Events:
                           `event: delta` {"text"} ..., then `event: done` {"message", "source", ...}
                           (or `event: error` {"detail"})
  GET  /health             model, quant, threads, GPU offload
  GET  /metrics            Prometheus

With --api-key, everything but /health, /docs, /redoc and /openapi.json (and the docs' assets) needs
the bearer key: a browser cannot send one to open the docs, and the schema holds nothing secret.

One engine worker owns the llama.cpp context; the server admits at most --max-queue requests at
once (queued + running) and answers 503 with Retry-After beyond that. Every request has a
timeout; a client that disconnects stops its generation. Bad input gets 413/422, never a 500: a body
over --max-body is refused before it is read in full, and bodies FastAPI would answer with a bare
400 (not UTF-8, nested too deeply) get 422 like any other malformed JSON.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import secrets
import sys
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from runtime.engine import Cancelled, Engine, EngineError, TooLong
from runtime.fallback import POLICIES, FallbackError
from runtime.metrics import CONTENT_TYPE_LATEST, Metrics


# ------------------------------------------------------------------------------------------------
# settings and errors
# ------------------------------------------------------------------------------------------------
@dataclass
class ServeSettings:
    max_queue: int = 32            # requests in flight (queued + running) before 503
    timeout: float = 60.0          # seconds per request (local part)
    api_key: str | None = None
    intent_policy: str = "local"   # local | local-then-fallback | fallback
    generate_policy: str = "local"
    max_batch: int = 64            # queries per /qwen/intent/batch
    retry_after: int = 1           # seconds, lower bound of the Retry-After header
    max_query_chars: int = 2000    # longer queries get 413
    max_tokens: int = 512          # cap on a reply's max_tokens (the profile's default applies below it)
    max_body: int = 1 << 20        # bytes of request body; larger gets 413 before any parsing
    fallback_timeout: float | None = None  # seconds per fallback call; None: the same as timeout

    def __post_init__(self):
        for p in (self.intent_policy, self.generate_policy):
            if p not in POLICIES:
                raise ValueError(f"policy must be one of {POLICIES}, not {p!r}")


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers: dict | None = None):
        self.status, self.detail, self.headers = status, detail, headers or {}


class Overloaded(Exception):
    pass


class ClientGone(Exception):
    pass


def _utf8(value: Any) -> Any:
    """Reject text that cannot be UTF-8 (lone surrogates from JSON escapes) with a 422."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _utf8(k)
            _utf8(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _utf8(v)
    return value


def _query(v: str) -> str:
    _utf8(v)
    if not v.strip():
        raise ValueError("query must not be empty")
    return v


# ------------------------------------------------------------------------------------------------
# request / response models
# ------------------------------------------------------------------------------------------------
class IntentRequest(BaseModel):
    query: str = Field(min_length=1, description="the customer's message")

    _check = field_validator("query")(_query)


class IntentResponse(BaseModel):
    intent: str
    probs: dict[str, float]
    source: str = Field(description='"local" or "fallback"')
    latency_ms: float


class BatchRequest(BaseModel):
    queries: list[str] = Field(min_length=1)

    @field_validator("queries")
    @classmethod
    def _each(cls, v: list[str]) -> list[str]:
        for q in v:
            _query(q)
        return v


class BatchResponse(BaseModel):
    results: list[IntentResponse]


class Product(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    price: float | int | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, v):  # extra fields too: every key and value must be encodable text
        return _utf8(v)


class GenerateRequest(BaseModel):
    query: str = Field(min_length=1)
    intent: str | None = Field(None, description="the label from /qwen/intent (adds a hint)")
    has_products: bool = False
    products: list[Product] | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=100_000,
                                   description="default: the prompt profile's (seed: 120); at most the "
                                               "server's --max-tokens (512): more is a 422, not a silent cap")
    temperature: float | None = Field(None, ge=0.0, le=2.0,
                                      description="default: the prompt profile's (seed: 0.5)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    _check = field_validator("query")(_query)


class GenerateResponse(BaseModel):
    message: str
    source: str
    intent: str | None = None
    finish_reason: str
    n_tokens: int | None = None
    latency_ms: float
    tokens_per_s: float | None = None


# ------------------------------------------------------------------------------------------------
# body guard and public paths
# ------------------------------------------------------------------------------------------------
DOCS_ASSETS = "/docs-assets"
# readable without the API key: a browser cannot send a bearer token to open the docs, and the
# schema holds nothing secret; every data endpoint and /metrics stay behind the key
PUBLIC_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
_ENDPOINTS = {"/qwen/intent": "intent", "/qwen/intent/batch": "batch", "/qwen/generate": "generate"}


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or (path.startswith(DOCS_ASSETS + "/") and ".." not in path)


class _BodyGuard:
    """Pure ASGI: reads the request body up to max_body bytes before FastAPI sees it.

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
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_big = f"request body larger than {self.max_body} bytes"
        headers = dict(scope.get("headers") or [])
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
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return await self.reject(scope, receive, send, 413, too_big)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        ctype = headers.get(b"content-type")
        if body and (not ctype or b"json" in ctype):  # FastAPI reads a body without a type as JSON
            try:
                json.loads(body.decode("utf-8"))
            except UnicodeDecodeError:
                return await self.reject(scope, receive, send, 422, "request body is not valid UTF-8")
            except RecursionError:
                return await self.reject(scope, receive, send, 422, "JSON nested too deeply")
            except ValueError:
                pass  # malformed JSON: FastAPI's own 422 says where
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)


# ------------------------------------------------------------------------------------------------
# the app
# ------------------------------------------------------------------------------------------------
def create_app(engine: Engine, settings: ServeSettings | None = None, fallback=None) -> FastAPI:
    """An app over a running engine. Several apps may share one engine (it is thread-safe)."""
    s = settings or ServeSettings()
    cfg = engine.cfg
    if fallback is None and (s.intent_policy != "local" or s.generate_policy != "local"):
        raise ValueError("a fallback policy needs a fallback backend (--fallback openai)")
    state = {"inflight": 0, "draining": False}
    metrics = Metrics(queue_depth=lambda: state["inflight"], engine_depth=lambda: engine.depth)

    # /docs and /redoc from the fastapi-offline wheel's Swagger UI / ReDoc files, not a CDN: they work
    # on a machine with no internet
    from fastapi_offline import FastAPIOffline

    app = FastAPIOffline(title="qwen-local", version="0.1.0",
                         description="Local Qwen2.5 intent + Vietnamese replies (drop-in for GPT-4o-mini "
                                     "calls)", static_url=DOCS_ASSETS)
    app.state.engine, app.state.settings, app.state.metrics = engine, s, metrics
    app.state.fallback = fallback
    # graceful shutdown (runtime.lifecycle): refuse new work with 503, let the in-flight finish
    app.state.begin_drain = lambda: state.update(draining=True)
    app.state.inflight = lambda: state["inflight"]
    fb_timeout = s.timeout if s.fallback_timeout is None else s.fallback_timeout

    app.add_middleware(_BodyGuard, max_body=s.max_body, on_reject=lambda scope, status: metrics.requests
                       .labels(_ENDPOINTS.get(scope.get("path"), "other"), str(status), "local").inc())

    # ---------------------------------------------------------------- auth (pure ASGI)
    if s.api_key:
        expected = f"Bearer {s.api_key}".encode()

        class _Auth:
            def __init__(self, app_):
                self.app_ = app_

            async def __call__(self, scope, receive, send):
                if scope["type"] == "http" and not _public(scope.get("path", "")):
                    got = dict(scope.get("headers") or []).get(b"authorization", b"")
                    if not secrets.compare_digest(got, expected):
                        resp = JSONResponse({"detail": "missing or wrong API key (Authorization: Bearer …)"},
                                            status_code=401, headers={"WWW-Authenticate": "Bearer"})
                        return await resp(scope, receive, send)
                return await self.app_(scope, receive, send)

        app.add_middleware(_Auth)
        schema = app.openapi

        def openapi_with_bearer():  # Swagger UI then shows "Authorize" for the bearer key
            doc = schema()
            doc.setdefault("components", {}).setdefault("securitySchemes", {})["bearer"] = {
                "type": "http", "scheme": "bearer"}
            doc["security"] = [{"bearer": []}]
            return doc

        app.openapi = openapi_with_bearer

    # ---------------------------------------------------------------- error handlers
    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, e: HTTPError):
        return JSONResponse({"detail": e.detail}, status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        # FastAPI's own handler echoes the input back, which cannot be encoded when it holds lone
        # surrogates (a 500); report location and message only.
        detail = [{"type": str(err.get("type", "")), "loc": [str(x) for x in err.get("loc", ())],
                   "msg": str(err.get("msg", "")).encode("utf-8", "replace").decode("utf-8")}
                  for err in e.errors()]
        metrics.requests.labels(_ENDPOINTS.get(request.url.path, "other"), "422", "local").inc()
        return JSONResponse({"detail": detail}, status_code=422)

    def retry_after() -> str:
        return str(max(s.retry_after, math.ceil(state["inflight"] / max(1, engine.slots))))

    # ---------------------------------------------------------------- admission
    class _Slot:
        """One place in the bounded queue; release() is idempotent (called by whoever ends first)."""

        def __init__(self, endpoint: str):
            self.endpoint, self.held = endpoint, False

        def acquire(self):
            if state["inflight"] >= s.max_queue or state["draining"]:
                metrics.rejected.labels(self.endpoint).inc()
                raise Overloaded()
            state["inflight"] += 1
            self.held = True
            return self

        def release(self):
            if self.held:
                self.held = False
                state["inflight"] -= 1

        __enter__ = acquire

        def __exit__(self, *exc):
            self.release()

    def overloaded() -> HTTPError:
        detail = ("server is shutting down, retry later" if state["draining"] else
                  "server busy: request queue is full, retry later")
        return HTTPError(503, detail, {"Retry-After": retry_after()})

    async def remote(aw, timeout: float | None = None):
        """One fallback call, bounded by the fallback timeout; whatever goes wrong is a 502/504,
        never a 500 (a remote that answers garbage can break the client library's parsing)."""
        try:
            return await asyncio.wait_for(aw, fb_timeout if timeout is None else timeout)
        except StopAsyncIteration:
            raise
        except FallbackError as e:
            raise HTTPError(502, str(e)) from None
        except (TimeoutError, asyncio.TimeoutError):
            raise HTTPError(504, f"fallback timed out after {fb_timeout:g} s") from None
        except Exception as e:  # noqa: BLE001
            raise HTTPError(502, f"fallback backend failed: {type(e).__name__}: {e}"[:300]) from None

    def check_query(q: str) -> None:
        if len(q) > s.max_query_chars:
            raise HTTPError(413, f"query too long: {len(q)} characters, the limit is "
                                 f"{s.max_query_chars}")

    # ---------------------------------------------------------------- local calls
    async def wait_job(job, fut: asyncio.Future, deadline: float, request: Request | None):
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                job.cancel()
                raise TimeoutError()
            done, _ = await asyncio.wait({fut}, timeout=min(0.2, remaining))
            if done:
                return fut.result()
            if request is not None and await request.is_disconnected():
                job.cancel()
                raise ClientGone()

    def future_sink(loop, fut):
        # a job cancelled after its waiter left still reports; mark that exception as seen
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())

        def sink(kind, data):
            def put():
                if fut.done():
                    return
                if kind == "error":
                    fut.set_exception(data)
                elif kind in ("result", "done"):
                    fut.set_result(data)
            if kind != "delta":
                loop.call_soon_threadsafe(put)
        return sink

    async def local_intents(queries: list[str], deadline: float, request: Request | None):
        loop = asyncio.get_running_loop()
        futs = [loop.create_future() for _ in queries]
        try:
            jobs = [engine.intent_job(q, future_sink(loop, f)) for q, f in zip(queries, futs)]
        except TooLong as e:
            raise HTTPError(413, str(e)) from None
        engine.submit(jobs)
        try:
            out = []
            for j, f in zip(jobs, futs):
                out.append(await wait_job(j, f, deadline, request))
            return out
        finally:
            for j in jobs:
                j.cancel()

    def intent_payload(r, source="local") -> dict:
        return {"intent": r.intent, "probs": r.probs, "source": source, "latency_ms": r.latency_ms}

    async def remote_intent(query: str, endpoint: str, reason: str) -> dict:
        t0 = time.perf_counter()
        r = await remote(fallback.intent(query))
        metrics.fallbacks.labels(endpoint, reason).inc()
        return {**r, "source": "fallback", "latency_ms": (time.perf_counter() - t0) * 1000}

    async def intents(queries: list[str], endpoint: str, request: Request) -> list[dict]:
        for q in queries:
            check_query(q)
        policy = s.intent_policy
        if policy == "fallback":
            with _Slot(endpoint):
                return list(await asyncio.gather(*(remote_intent(q, endpoint, "policy") for q in queries)))
        reason = None
        try:
            with _Slot(endpoint):
                deadline = time.monotonic() + s.timeout
                rs = await local_intents(queries, deadline, request)
                return [intent_payload(r) for r in rs]
        except Overloaded:
            reason, err = "overload", overloaded()
        except TimeoutError:
            reason, err = "timeout", HTTPError(504, f"local model timed out after {s.timeout:g} s")
        except ClientGone:
            reason, err = "cancelled", HTTPError(499, "client closed request")
        except EngineError as e:
            reason, err = "error", HTTPError(503, f"local model failed: {e}")
        if policy == "local-then-fallback" and reason != "cancelled" and not state["draining"]:
            return list(await asyncio.gather(*(remote_intent(q, endpoint, reason) for q in queries)))
        raise err

    # ---------------------------------------------------------------- routes
    def record(endpoint: str, status: int, source: str, t0: float):
        metrics.requests.labels(endpoint, str(status), source).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    @app.post("/qwen/intent", response_model=IntentResponse,
              responses={413: {"description": "query too long"}, 503: {"description": "busy"}})
    async def intent(body: IntentRequest, request: Request):
        t0 = time.perf_counter()
        try:
            (res,) = await intents([body.query], "intent", request)
        except HTTPError as e:
            record("intent", e.status, "local", t0)
            raise
        record("intent", 200, res["source"], t0)
        return res

    @app.post("/qwen/intent/batch", response_model=BatchResponse,
              responses={413: {"description": "too many or too long queries"}})
    async def intent_batch(body: BatchRequest, request: Request):
        t0 = time.perf_counter()
        if len(body.queries) > s.max_batch:
            record("batch", 413, "local", t0)
            raise HTTPError(413, f"too many queries: {len(body.queries)}, the limit is {s.max_batch}")
        try:
            res = await intents(body.queries, "batch", request)
        except HTTPError as e:
            record("batch", e.status, "local", t0)
            raise
        record("batch", 200, res[0]["source"] if res else "local", t0)
        return {"results": res}

    @app.post("/qwen/generate", response_model=GenerateResponse,
              responses={200: {"content": {"text/event-stream": {}},
                               "description": "JSON, or Server-Sent Events when stream=true"},
                         413: {"description": "input too long"}})
    async def generate(body: GenerateRequest, request: Request):
        t0 = time.perf_counter()
        try:
            return await _generate(body, request, t0)
        except HTTPError as e:
            record("generate", e.status, "local", t0)
            raise

    async def _generate(body: GenerateRequest, request: Request, t0: float):
        check_query(body.query)
        if body.intent is not None and body.intent not in cfg.labels:
            raise HTTPError(422, f"intent must be one of {list(cfg.labels)} (or omitted)")
        products = [p.model_dump(exclude_none=False) for p in body.products] if body.products else None
        if products and len(products) > cfg.max_products:
            raise HTTPError(413, f"too many products: {len(products)}, the limit is {cfg.max_products}")
        if body.max_tokens is not None and body.max_tokens > s.max_tokens:
            raise HTTPError(422, f"max_tokens must be at most {s.max_tokens} (this server's "
                                 f"--max-tokens), not {body.max_tokens}")
        max_tokens = body.max_tokens or min(cfg.reply.max_tokens, s.max_tokens)
        if body.temperature is None:
            body.temperature = cfg.reply.temperature
        args = (body.query, body.intent, body.has_products or bool(products), products)
        policy = s.generate_policy
        if policy == "fallback":
            return await remote_generate(body, args, max_tokens, "policy", t0)

        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        slot = _Slot("generate")

        def sink(kind, data):  # on the engine's thread
            loop.call_soon_threadsafe(q.put_nowait, (kind, data))
            if kind != "delta":  # the job is over: its place in the queue is free, whatever the client does
                loop.call_soon_threadsafe(slot.release)

        reason, err_msg = None, ""
        try:
            slot.acquire()
        except Overloaded:
            reason = "overload"
        if reason is None:
            try:
                job = engine.generate_job(*args, sink, max_tokens=max_tokens,
                                          temperature=body.temperature, seed=body.seed)
                engine.submit([job])
            except TooLong as e:
                slot.release()
                raise HTTPError(413, str(e)) from None
            except EngineError as e:
                slot.release()
                reason, err_msg = "error", str(e)
        if reason is None:
            deadline = time.monotonic() + s.timeout
            if body.stream:
                return await local_stream(job, q, slot, deadline, body, args, max_tokens, t0, policy)
            try:
                result = await collect(job, q, deadline, request)
            except TimeoutError:
                reason = "timeout"
                metrics.cancelled.labels("timeout").inc()
            except ClientGone:
                metrics.cancelled.labels("disconnect").inc()
                record("generate", 499, "local", t0)
                return Response(status_code=499)
            except EngineError as e:
                reason, err_msg = "error", str(e)
            finally:
                slot.release()
            if reason is None:
                metrics.tokens.inc(result.n_tokens)
                if result.tokens_per_s:
                    metrics.tokens_per_s.observe(result.tokens_per_s)
                record("generate", 200, "local", t0)
                return {"message": result.message, "source": "local", "intent": body.intent,
                        "finish_reason": result.finish_reason, "n_tokens": result.n_tokens,
                        "latency_ms": result.latency_ms, "tokens_per_s": result.tokens_per_s}
        if policy == "local-then-fallback" and not state["draining"]:
            return await remote_generate(body, args, max_tokens, reason, t0)
        if reason == "overload":
            raise overloaded()
        if reason == "timeout":
            raise HTTPError(504, f"local model timed out after {s.timeout:g} s")
        raise HTTPError(503, f"local model failed: {err_msg}")

    async def collect(job, q: asyncio.Queue, deadline: float, request: Request):
        next_check = time.monotonic() + 0.2
        while True:
            now = time.monotonic()
            if now >= deadline:
                job.cancel()
                raise TimeoutError()
            if now >= next_check:  # deltas may arrive every few ms: check on the clock, not when idle
                next_check = now + 0.2
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()
            try:
                kind, data = await asyncio.wait_for(q.get(), timeout=min(0.2, deadline - now))
            except (TimeoutError, asyncio.TimeoutError):
                continue
            if kind == "done":
                return data
            if kind == "error":
                raise data

    def sse(event: str, data: dict) -> dict:
        return {"event": event, "data": json.dumps(data, ensure_ascii=False)}

    async def local_stream(job, q, slot, deadline, body, args, max_tokens, t0, policy):
        from sse_starlette.sse import EventSourceResponse

        async def fail(can_fall_back: bool, reason: str, status: int, detail: str):
            """Before the first delta, local-then-fallback hands the stream to the remote model;
            otherwise the stream ends with an error event."""
            if can_fall_back and policy == "local-then-fallback":
                async for ev in remote_events(body, args, max_tokens, reason, t0):
                    yield ev
            else:
                record("generate", status, "local", t0)
                yield sse("error", {"detail": detail})

        async def events():
            started = False
            finished = False
            try:
                while True:
                    remaining = deadline - time.monotonic()
                    try:
                        if remaining <= 0:
                            raise TimeoutError()
                        kind, data = await asyncio.wait_for(q.get(), timeout=remaining)
                    except (TimeoutError, asyncio.TimeoutError):
                        job.cancel()
                        metrics.cancelled.labels("timeout").inc()
                        async for ev in fail(not started, "timeout", 504,
                                             f"local model timed out after {s.timeout:g} s"):
                            yield ev
                        finished = True
                        return
                    if kind == "delta":
                        started = True
                        yield sse("delta", {"text": data})
                    elif kind == "done":
                        metrics.tokens.inc(data.n_tokens)
                        if data.tokens_per_s:
                            metrics.tokens_per_s.observe(data.tokens_per_s)
                        record("generate", 200, "local", t0)
                        yield sse("done", {"message": data.message, "source": "local",
                                           "intent": body.intent, "finish_reason": data.finish_reason,
                                           "n_tokens": data.n_tokens, "latency_ms": data.latency_ms,
                                           "tokens_per_s": data.tokens_per_s})
                        finished = True
                        return
                    else:  # error
                        async for ev in fail(not started and not isinstance(data, Cancelled), "error",
                                             503, f"local model failed: {data}"):
                            yield ev
                        finished = True
                        return
            finally:
                if not finished and not job.done:  # client went away mid-stream
                    job.cancel()
                    metrics.cancelled.labels("disconnect").inc()
                    record("generate", 499, "local", t0)
                slot.release()

        return EventSourceResponse(events(), ping=15)

    async def remote_events(body, args, max_tokens, reason, t0):
        parts = []
        stream = fallback.stream(*args, max_tokens=max_tokens, temperature=body.temperature)
        deadline = time.monotonic() + fb_timeout
        try:
            while True:
                try:  # the whole remote stream shares one deadline, like a JSON fallback call
                    delta = await remote(stream.__anext__(), max(0.0, deadline - time.monotonic()))
                except StopAsyncIteration:
                    break
                parts.append(delta)
                yield sse("delta", {"text": delta})
            if not parts:  # e.g. a body that is not an event stream parses as no events at all
                raise HTTPError(502, "fallback backend failed: it streamed no reply")
        except HTTPError as e:
            record("generate", e.status, "fallback", t0)
            yield sse("error", {"detail": e.detail})
            return
        finally:
            await stream.aclose()
        metrics.fallbacks.labels("generate", reason).inc()
        record("generate", 200, "fallback", t0)
        yield sse("done", {"message": "".join(parts), "source": "fallback", "intent": body.intent,
                           "finish_reason": "stop", "n_tokens": None,
                           "latency_ms": (time.perf_counter() - t0) * 1000, "tokens_per_s": None})

    async def remote_generate(body, args, max_tokens, reason, t0):
        if body.stream:
            from sse_starlette.sse import EventSourceResponse

            return EventSourceResponse(remote_events(body, args, max_tokens, reason, t0), ping=15)
        msg = await remote(fallback.generate(*args, max_tokens=max_tokens, temperature=body.temperature))
        metrics.fallbacks.labels("generate", reason).inc()
        record("generate", 200, "fallback", t0)
        return {"message": msg, "source": "fallback", "intent": body.intent, "finish_reason": "stop",
                "n_tokens": None, "latency_ms": (time.perf_counter() - t0) * 1000,
                "tokens_per_s": None}

    @app.get("/health")
    async def health():
        info = engine.describe()
        info.update(status="draining" if state["draining"] else "ok", engine=dict(engine.stats),
                    engine_depth=engine.depth, kv_cells=engine.kv_cells(), inflight=state["inflight"],
                    max_queue=s.max_queue, timeout_s=s.timeout,
                    policies={"intent": s.intent_policy, "generate": s.generate_policy},
                    fallback=fallback.describe() if fallback else None,
                    auth=bool(s.api_key))
        return info

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


# ------------------------------------------------------------------------------------------------
# a real server in this process (eval --http, the demo)
# ------------------------------------------------------------------------------------------------
def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app: FastAPI, port: int | None = None, start_timeout: float = 30.0):
    """Run `app` with uvicorn on 127.0.0.1 in a background thread; yields its base URL."""
    import threading

    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="qwen-local-http", daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - t0 > start_timeout:
                raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from runtime.options import Parser, add_output_flags, float_in, int_in

    p = Parser(prog="qwen-local serve", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="GGUF file (from qwen-local convert)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int_in(1, 65535), default=8000)
    p.add_argument("--threads", type=int_in(1, 1024), default=None, help="default: physical cores")
    p.add_argument("--prompts", default=None, metavar="FILE|NAME",
                   help="prompt profile to serve instead of the one stored in the GGUF by convert "
                        "(a JSON file, or a built-in name: seed, catalog); the model was verified "
                        "with the stored one")
    p.add_argument("--ctx", type=int_in(512, 1 << 20), default=8192,
                   help="KV cache size in tokens, shared by all slots")
    p.add_argument("--slots", type=int_in(1, 256), default=4, help="sequences decoded together")
    p.add_argument("--gpu-layers", type=int_in(-1), default=None,
                   help="-1: all; default: all layers when llama.cpp has GPU offload (Metal), else 0")
    p.add_argument("--max-queue", type=int_in(1), default=32, help="requests in flight before 503")
    p.add_argument("--timeout", type=float_in(0, 86400, lo_open=True), default=60.0,
                   help="seconds per request")
    p.add_argument("--fallback-timeout", type=float_in(0, 86400, lo_open=True), default=None,
                   help="seconds per fallback call (default: --timeout)")
    p.add_argument("--grace", type=float_in(0, 86400), default=30.0,
                   help="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish (new ones: 503)")
    p.add_argument("--max-batch", type=int_in(1, 10_000), default=64, help="queries per batch request")
    p.add_argument("--max-query-chars", type=int_in(1, 1 << 20), default=2000,
                   help="longer queries get 413")
    p.add_argument("--max-tokens", type=int_in(1, 100_000), default=512,
                   help="largest max_tokens a reply may ask for (more is a 422); the prompt profile "
                        "sets the default length (120 for the seed profile)")
    p.add_argument("--max-body", type=int_in(1024, 1 << 30), default=1 << 20,
                   help="largest request body in bytes; larger gets 413 before parsing")
    p.add_argument("--api-key", default=os.environ.get("QWEN_LOCAL_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on the data endpoints and /metrics "
                        "(/health and /docs stay open; default: $QWEN_LOCAL_API_KEY)")
    p.add_argument("--fallback", choices=["openai"], default=None,
                   help="remote backend (OPENAI_BASE_URL, OPENAI_API_KEY)")
    p.add_argument("--fallback-model", default="gpt-4o-mini")
    p.add_argument("--intent-policy", choices=POLICIES, default=None,
                   help="default: local-then-fallback with --fallback, else local")
    p.add_argument("--generate-policy", choices=POLICIES, default=None,
                   help="default: local-then-fallback with --fallback, else local")
    p.add_argument("--log-level", default="info", help="uvicorn's log level")
    add_output_flags(p, progress=False)
    return p


def profile_warning(engine: Engine) -> str | None:
    """Why the served prompts may not be the ones the model was verified with, if they may not."""
    stored, served = engine.stored_profile, engine.cfg
    if stored is None:
        return (f"{engine.model_path} carries no prompt profile (not made by qwen-local convert?): "
                f"serving {served.name!r}; make sure the fine-tune was trained with these prompts")
    if stored.sha256 != served.sha256:
        return (f"serving prompt profile {served.name!r} ({served.sha256[:16]}), but the model was "
                f"converted and verified with {stored.name!r} ({stored.sha256[:16]}): a fine-tune "
                "answers like the trained model only with its training prompts")
    return None


def main(argv: list[str] | None = None) -> int:
    from runtime.errors import UserError
    from runtime.options import quiet
    from runtime.profile import load_profile

    a = build_parser().parse_args(argv)
    quiet(a.verbose)
    try:
        profile = load_profile(a.prompts) if a.prompts else None
    except ValueError as e:
        raise UserError(str(e)) from None
    default_policy = "local-then-fallback" if a.fallback else "local"
    settings = ServeSettings(max_queue=a.max_queue, timeout=a.timeout, api_key=a.api_key or None,
                             intent_policy=a.intent_policy or default_policy,
                             generate_policy=a.generate_policy or default_policy,
                             max_batch=a.max_batch, max_query_chars=a.max_query_chars,
                             max_tokens=a.max_tokens, max_body=a.max_body,
                             fallback_timeout=a.fallback_timeout)
    if not a.fallback and (settings.intent_policy, settings.generate_policy) != ("local", "local"):
        raise UserError("a fallback policy needs --fallback openai")
    try:
        engine = Engine(a.model, profile, threads=a.threads, n_ctx=a.ctx, slots=a.slots,
                        n_gpu_layers=a.gpu_layers)
    except (FileNotFoundError, EngineError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        warning = profile_warning(engine)
        if warning:
            print(f"qwen-local serve: warning: {warning}", file=sys.stderr, flush=True)
        fb = None
        if a.fallback == "openai":
            from runtime.fallback import OpenAIFallback

            try:  # the remote gets the same prompts as the local model
                fb = OpenAIFallback(engine.cfg, model=a.fallback_model)
            except ValueError as e:
                raise UserError(str(e)) from None
        app = create_app(engine, settings, fb)
        info = engine.describe()
        print(f"qwen-local serve: {info['model']} ({info['quant']}), prompts {info['profile']['name']!r} "
              f"({info['profile']['sha256']}), {info['threads']} threads, "
              f"GPU offload {'on' if info['gpu_offload'] else 'off'}, http://{a.host}:{a.port}/docs",
              flush=True)
        from runtime.lifecycle import serve

        serve(app, engine, host=a.host, port=a.port, log_level=a.log_level, grace=a.grace)
    finally:
        engine.close()
    return 0
