"""Answering /qwen/generate under the generate policy: the local reply as JSON or as an event stream,
and the fallback's when the policy says so or (local-then-fallback) when the local model is busy,
too slow or failing (for a stream: only before its first delta)."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from fastapi.responses import Response

from qwen_local.runtime.engine import Cancelled, EngineError, TooLong
from qwen_local.runtime.serve.local import collect, job_events, submit_generation
from qwen_local.runtime.serve.remote import generate as remote_generate, reply_events as remote_events
from qwen_local.runtime.serve.admission import Slot
from qwen_local.runtime.serve.errors import ClientGone, HTTPError, Overloaded
from qwen_local.runtime.serve.schemas import GenerateRequest, Reply, reply_payload, sse
from qwen_local.runtime.serve.state import ServeState


class LocalFailed(Exception):
    """The local model did not answer (reason: overload, timeout or error); the policy says what next."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail

    def error(self, st: ServeState) -> HTTPError:
        if self.reason == "overload":
            return st.admission.overloaded()
        if self.reason == "timeout":
            return HTTPError(504, f"local model timed out after {st.settings.timeout:g} s")
        return HTTPError(503, f"local model failed: {self.detail}")


def prepare(st: ServeState, body: GenerateRequest, t0: float) -> Reply:
    """The request checked against this server's limits and profile, its defaults filled in."""
    cfg, s = st.engine.cfg, st.settings
    st.check_query(body.query)
    if body.intent is not None and body.intent not in cfg.labels:
        raise HTTPError(422, f"intent must be one of {list(cfg.labels)} (or omitted)")
    products = [p.model_dump(exclude_none=False) for p in body.products] if body.products else None
    if products and len(products) > cfg.max_products:
        raise HTTPError(413, f"too many products: {len(products)}, the limit is {cfg.max_products}")
    if body.max_tokens is not None and body.max_tokens > s.max_tokens:
        raise HTTPError(422, f"max_tokens must be at most {s.max_tokens} (this server's "
                             f"--max-tokens), not {body.max_tokens}")
    return Reply(query=body.query, intent=body.intent, has_products=body.has_products or bool(products),
                 products=products, max_tokens=body.max_tokens or min(cfg.reply.max_tokens, s.max_tokens),
                 temperature=cfg.reply.temperature if body.temperature is None else body.temperature,
                 seed=body.seed, stream=body.stream, t0=t0)


async def answer(st: ServeState, body: GenerateRequest, request: Request, t0: float):
    reply = prepare(st, body, t0)
    policy = st.settings.generate_policy
    if policy == "fallback":
        return await remote_generate(st, reply, "policy")
    try:
        return await _local(st, reply, request)
    except LocalFailed as failed:
        if policy == "local-then-fallback" and not st.draining:
            return await remote_generate(st, reply, failed.reason)
        raise failed.error(st) from None


def _answered(st: ServeState, reply: Reply, result) -> dict:
    st.metrics.tokens.inc(result.n_tokens)
    if result.tokens_per_s:
        st.metrics.tokens_per_s.observe(result.tokens_per_s)
    st.record("generate", 200, "local", reply.t0)
    return reply_payload(result.message, "local", reply.intent, result.finish_reason, result.latency_ms,
                         result.n_tokens, result.tokens_per_s)


async def _submit(st: ServeState, reply: Reply, slot: Slot):
    try:
        return await submit_generation(st.engine, slot, lambda sink: st.engine.generate_job(
            *reply.prompt, sink, max_tokens=reply.max_tokens, temperature=reply.temperature,
            seed=reply.seed))
    except TooLong as e:
        raise HTTPError(413, str(e)) from None
    except EngineError as e:
        raise LocalFailed("error", str(e)) from None


async def _local(st: ServeState, reply: Reply, request: Request):
    slot = st.admission.slot("generate")
    try:
        slot.acquire()
    except Overloaded:
        raise LocalFailed("overload") from None
    job, q = await _submit(st, reply, slot)
    deadline = time.monotonic() + st.settings.timeout
    if reply.stream:
        from sse_starlette.sse import EventSourceResponse

        return EventSourceResponse(_local_events(st, reply, job, q, slot, deadline), ping=15)
    try:
        result = await collect(job, q, deadline, request)
    except TimeoutError:
        st.metrics.cancelled.labels("timeout").inc()
        raise LocalFailed("timeout") from None
    except ClientGone:
        st.metrics.cancelled.labels("disconnect").inc()
        st.record("generate", 499, "local", reply.t0)
        return Response(status_code=499)
    except EngineError as e:
        raise LocalFailed("error", str(e)) from None
    finally:
        slot.release()
    return _answered(st, reply, result)


async def _stream_failed(st: ServeState, reply: Reply, can_fall_back: bool, reason: str, status: int,
                         detail: str):
    """Before the first delta, local-then-fallback hands the stream to the remote model; otherwise
    the stream ends with an error event."""
    if can_fall_back and st.settings.generate_policy == "local-then-fallback":
        async for ev in remote_events(st, reply, reason):
            yield ev
    else:
        st.record("generate", status, "local", reply.t0)
        yield sse("error", {"detail": detail})


async def _local_events(st: ServeState, reply: Reply, job, q: asyncio.Queue, slot: Slot, deadline: float):
    """The local reply as `delta` events, then `done` (or `error`, or the fallback's events)."""
    started = finished = False
    try:
        async for kind, data in job_events(job, q, deadline):
            if kind == "delta":
                started = True
                yield sse("delta", {"text": data})
            elif kind == "done":
                yield sse("done", _answered(st, reply, data))
            elif kind == "timeout":
                st.metrics.cancelled.labels("timeout").inc()
                async for ev in _stream_failed(st, reply, not started, "timeout", 504,
                                               f"local model timed out after {st.settings.timeout:g} s"):
                    yield ev
            else:  # error
                async for ev in _stream_failed(st, reply, not started and not isinstance(data, Cancelled),
                                               "error", 503, f"local model failed: {data}"):
                    yield ev
        finished = True
    finally:
        if not finished and not job.done:  # client went away mid-stream
            job.cancel()
            st.metrics.cancelled.labels("disconnect").inc()
            st.record("generate", 499, "local", reply.t0)
        slot.release()
