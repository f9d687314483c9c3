"""Answering /qwen/intent and /qwen/intent/batch under the intent policy: the local model within
--timeout, and the fallback when the policy says so or (local-then-fallback) when the local model
is busy, too slow or failing."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request

from qwen_local.runtime.engine import EngineError
from qwen_local.runtime.serve.local import intents as local_intents
from qwen_local.runtime.serve.remote import intent as remote_intent
from qwen_local.runtime.serve.errors import ClientGone, HTTPError, Overloaded
from qwen_local.runtime.serve.state import ServeState


def _payload(r) -> dict:
    return {"intent": r.intent, "probs": r.probs, "source": "local", "latency_ms": r.latency_ms}


async def _remote(st: ServeState, queries: list[str], endpoint: str, reason: str) -> list[dict]:
    return list(await asyncio.gather(*(remote_intent(st, q, endpoint, reason) for q in queries)))


async def answer(st: ServeState, queries: list[str], endpoint: str, request: Request) -> list[dict]:
    """One {"intent", "probs", "source", "latency_ms"} per query, or an HTTPError."""
    for q in queries:
        st.check_query(q)
    policy = st.settings.intent_policy
    if policy == "fallback":
        with st.admission.slot(endpoint):
            return await _remote(st, queries, endpoint, "policy")
    timeout = st.settings.timeout
    try:
        with st.admission.slot(endpoint):
            rs = await local_intents(st.engine, queries, time.monotonic() + timeout, request)
            return [_payload(r) for r in rs]
    except Overloaded:
        reason, err = "overload", st.admission.overloaded()
    except TimeoutError:
        reason, err = "timeout", HTTPError(504, f"local model timed out after {timeout:g} s")
    except ClientGone:
        reason, err = "cancelled", HTTPError(499, "client closed request")
    except EngineError as e:
        reason, err = "error", HTTPError(503, f"local model failed: {e}")
    if policy == "local-then-fallback" and reason != "cancelled" and not st.draining:
        return await _remote(st, queries, endpoint, reason)
    raise err
