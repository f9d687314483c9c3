"""The endpoints, on one APIRouter; each reaches its app's engine and settings through
`Depends(get_state)`. Every answer, good or bad, is counted in the metrics by endpoint, status and
source."""
from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from qwen_local.runtime.serve.intents import answer as answer_intents
from qwen_local.runtime.serve.replies import answer as answer_reply
from qwen_local.runtime.serve.errors import HTTPError
from qwen_local.runtime.serve.metrics import CONTENT_TYPE_LATEST
from qwen_local.runtime.serve.schemas import (BatchRequest, BatchResponse, GenerateRequest, GenerateResponse,
                                   IntentRequest, IntentResponse)
from qwen_local.runtime.serve.state import ServeState, get_state

router = APIRouter()


@router.post("/qwen/intent", response_model=IntentResponse,
             responses={413: {"description": "query too long"}, 503: {"description": "busy"}})
async def intent(body: IntentRequest, request: Request, st: ServeState = Depends(get_state)):
    t0 = time.perf_counter()
    try:
        (res,) = await answer_intents(st, [body.query], "intent", request)
    except HTTPError as e:
        st.record("intent", e.status, "local", t0)
        raise
    st.record("intent", 200, res["source"], t0)
    return res


@router.post("/qwen/intent/batch", response_model=BatchResponse,
             responses={413: {"description": "too many or too long queries"}})
async def intent_batch(body: BatchRequest, request: Request, st: ServeState = Depends(get_state)):
    t0 = time.perf_counter()
    limit = st.settings.max_batch
    if len(body.queries) > limit:
        st.record("batch", 413, "local", t0)
        raise HTTPError(413, f"too many queries: {len(body.queries)}, the limit is {limit}")
    try:
        res = await answer_intents(st, body.queries, "batch", request)
    except HTTPError as e:
        st.record("batch", e.status, "local", t0)
        raise
    st.record("batch", 200, res[0]["source"] if res else "local", t0)
    return {"results": res}


@router.post("/qwen/generate", response_model=GenerateResponse,
             responses={200: {"content": {"text/event-stream": {}},
                              "description": "JSON, or Server-Sent Events when stream=true"},
                        413: {"description": "input too long"}})
async def generate(body: GenerateRequest, request: Request, st: ServeState = Depends(get_state)):
    t0 = time.perf_counter()
    try:
        return await answer_reply(st, body, request, t0)
    except HTTPError as e:
        st.record("generate", e.status, "local", t0)
        raise


@router.get("/health")
async def health(st: ServeState = Depends(get_state)):
    s, engine = st.settings, st.engine
    info = engine.describe()
    info.update(status="draining" if st.draining else "ok", engine=dict(engine.stats),
                engine_depth=engine.depth, kv_cells=engine.kv_cells(), inflight=st.admission.inflight,
                max_queue=s.max_queue, timeout_s=s.timeout,
                policies={"intent": s.intent_policy, "generate": s.generate_policy},
                fallback=st.fallback.describe() if st.fallback else None,
                auth=bool(s.api_key), fidelity=st.fidelity)
    return info


@router.get("/metrics")
async def prometheus(st: ServeState = Depends(get_state)):
    return Response(st.metrics.render(), media_type=CONTENT_TYPE_LATEST)
