"""Asking the fallback backend (the `fallback` and `local-then-fallback` policies). Whatever goes
wrong there is a 502 (or a 504 past --fallback-timeout), never a 500."""
from __future__ import annotations

import asyncio
import time

from qwen_local.runtime.serve.errors import HTTPError
from qwen_local.runtime.serve.fallback import FallbackError
from qwen_local.runtime.serve.schemas import Reply, reply_payload, sse
from qwen_local.runtime.serve.state import ServeState


async def call(st: ServeState, aw, timeout: float | None = None):
    """One fallback call, bounded by the fallback timeout (a remote that answers garbage can break
    the client library's parsing: that too is a 502)."""
    limit = st.settings.fallback_seconds
    try:
        return await asyncio.wait_for(aw, limit if timeout is None else timeout)
    except StopAsyncIteration:
        raise
    except FallbackError as e:
        raise HTTPError(502, str(e)) from None
    except (TimeoutError, asyncio.TimeoutError):
        raise HTTPError(504, f"fallback timed out after {limit:g} s") from None
    except Exception as e:  # noqa: BLE001
        raise HTTPError(502, f"fallback backend failed: {type(e).__name__}: {e}"[:300]) from None


async def intent(st: ServeState, query: str, endpoint: str, reason: str) -> dict:
    t0 = time.perf_counter()
    r = await call(st, st.fallback.intent(query))
    st.metrics.fallbacks.labels(endpoint, reason).inc()
    return {**r, "source": "fallback", "latency_ms": (time.perf_counter() - t0) * 1000}


def _answered(st: ServeState, reply: Reply, message: str, reason: str) -> dict:
    st.metrics.fallbacks.labels("generate", reason).inc()
    st.record("generate", 200, "fallback", reply.t0)
    return reply_payload(message, "fallback", reply.intent, "stop",
                         (time.perf_counter() - reply.t0) * 1000)


async def reply_events(st: ServeState, reply: Reply, reason: str):
    """The remote reply as `delta` events, then `done` (or `error`)."""
    parts = []
    stream = st.fallback.stream(*reply.prompt, max_tokens=reply.max_tokens,
                                temperature=reply.temperature)
    deadline = time.monotonic() + st.settings.fallback_seconds
    try:
        while True:
            try:  # the whole remote stream shares one deadline, like a JSON fallback call
                delta = await call(st, stream.__anext__(), max(0.0, deadline - time.monotonic()))
            except StopAsyncIteration:
                break
            parts.append(delta)
            yield sse("delta", {"text": delta})
        if not parts:  # e.g. a body that is not an event stream parses as no events at all
            raise HTTPError(502, "fallback backend failed: it streamed no reply")
    except HTTPError as e:
        st.record("generate", e.status, "fallback", reply.t0)
        yield sse("error", {"detail": e.detail})
        return
    finally:
        await stream.aclose()
    yield sse("done", _answered(st, reply, "".join(parts), reason))


async def generate(st: ServeState, reply: Reply, reason: str):
    """The remote reply as JSON, or as an event stream when the request asked for one."""
    if reply.stream:
        from sse_starlette.sse import EventSourceResponse

        return EventSourceResponse(reply_events(st, reply, reason), ping=15)
    message = await call(st, st.fallback.generate(*reply.prompt, max_tokens=reply.max_tokens,
                                                  temperature=reply.temperature))
    return _answered(st, reply, message, reason)
