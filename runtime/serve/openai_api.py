"""OpenAI's API on the local model: /v1/models, /v1/chat/completions and /v1/completions.

The same engine, admission queue, API key, body limit, metrics and drain as /qwen/*; answers come
from the local model only (a client that wants a fallback names it itself, as the README's Next.js
route does). Prompts follow the one tokenization rule: chat messages through the GGUF's chat
template with their texts untrusted (runtime.chat), a raw completions prompt trusted as a whole
(runtime.profile.raw_segments). `guided_choice` runs one intent-style pass: the choice whose
first-token prefix group holds the most probability (runtime.labels), so the profile's intent
prompt with its labels gives exactly /qwen/intent's label.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from qwen_local.runtime.chat import ChatTemplateError
from qwen_local.runtime.engine import EngineError, TooLong
from qwen_local.runtime.profile import raw_segments
from qwen_local.runtime.serve.errors import ClientGone, HTTPError, Overloaded
from qwen_local.runtime.serve.local import collect, future_sink, job_events, submit_generation, wait_job
from qwen_local.runtime.serve.openai_schemas import (ChatRequest, CompletionRequest, Shape, V1Request,
                                                     usage)
from qwen_local.runtime.serve.state import ServeState, get_state

router = APIRouter(prefix="/v1")
BAD = {400: {"description": "bad input, in OpenAI's error shape"},
       503: {"description": "busy or shutting down (Retry-After)"}}
STREAMED = {200: {"content": {"text/event-stream": {}},
                  "description": "JSON, or with stream=true Server-Sent Events ending `data: [DONE]`"}}


@router.get("/models")
async def models(st: ServeState = Depends(get_state)):
    return {"object": "list", "data": [_card(st)]}


@router.get("/models/{model_id:path}", responses={404: {"description": "not this server's model"}})
async def model(model_id: str, st: ServeState = Depends(get_state)):
    if model_id != st.model_id:
        raise HTTPError(404, f"the model {model_id!r} does not exist; this server serves {st.model_id!r}",
                        param="model", code="model_not_found")
    return _card(st)


def _card(st: ServeState) -> dict:
    return {"id": st.model_id, "object": "model", "created": st.started, "owned_by": "qwen-local"}


@router.post("/chat/completions", responses={**BAD, **STREAMED})
async def chat(body: ChatRequest, request: Request, st: ServeState = Depends(get_state)):
    return await _answer(st, "chat", body, request)


@router.post("/completions", responses={**BAD, **STREAMED})
async def completions(body: CompletionRequest, request: Request, st: ServeState = Depends(get_state)):
    return await _answer(st, "completions", body, request)


@dataclass
class Call:
    """A /v1 request checked against this server: what to render, and how to answer."""
    endpoint: str
    body: V1Request
    shape: Shape
    t0: float
    max_tokens: int
    groups: dict | None

    def segments(self, st: ServeState) -> list:
        if isinstance(self.body, ChatRequest):
            try:
                return st.chat_template().segments([m.for_template() for m in self.body.messages])
            except ChatTemplateError as e:
                raise HTTPError(400, str(e), param="messages") from None
        return raw_segments(self.body.text)

    @property
    def include_usage(self) -> bool:
        return bool(self.body.stream_options and self.body.stream_options.include_usage)


def _check(st: ServeState, endpoint: str, body: V1Request, t0: float) -> Call:
    limit = st.settings.max_tokens
    if body.length is not None and body.length > limit:
        raise HTTPError(400, f"max_tokens must be at most {limit} (this server's --max-tokens), not "
                             f"{body.length}",
                        param="max_tokens" if body.max_tokens is not None else "max_completion_tokens")
    groups = None
    if body.choices is not None:
        # the one-pass rule decides; nothing is sampled, so sampling settings cannot apply
        for name, default in (("temperature", 0), ("top_p", 1), ("top_k", 0), ("stop", None)):
            value = getattr(body, name)
            if value is not None and value != default and not (name == "top_k" and value == -1):
                raise HTTPError(400, f"guided_choice answers by the one-pass label rule, with no "
                                     f"sampling: leave {name} out", param=name)
        try:
            groups = st.engine.piece_index.groups(body.choices)
        except ValueError as e:
            raise HTTPError(400, f"guided_choice: {e}", param="guided_choice") from None
    return Call(endpoint, body, Shape(endpoint == "chat", st.model_id), t0,
                body.length or limit, groups)


async def _answer(st: ServeState, endpoint: str, body: V1Request, request: Request):
    t0 = time.perf_counter()
    try:
        call = _check(st, endpoint, body, t0)
        slot = st.admission.slot(endpoint)
        try:
            slot.acquire()
        except Overloaded:
            raise st.admission.overloaded() from None
        if call.groups is not None:
            try:
                return await _choose(st, call, request)
            finally:
                slot.release()
        return await _generate(st, call, slot, request)
    except HTTPError as e:
        st.record(endpoint, e.status, "local", t0)
        raise


def _timed_out(st: ServeState) -> HTTPError:
    return HTTPError(504, f"local model timed out after {st.settings.timeout:g} s", code="timeout")


def _failed(e: Exception) -> HTTPError:
    return HTTPError(503, f"local model failed: {e}", code="unavailable")


def _too_long(call: Call, e: TooLong) -> HTTPError:
    return HTTPError(400, str(e), param="messages" if call.shape.chat else "prompt",
                     code="context_length_exceeded")


async def _choose(st: ServeState, call: Call, request: Request):
    """guided_choice: one forward pass, the label rule, the choice as the whole answer."""
    loop = asyncio.get_running_loop()
    fut = loop.create_future()
    try:  # rendered and tokenized off the event loop: a prompt may be long
        job = await run_in_threadpool(lambda: st.engine.prepare(
            "intent", call.segments(st), groups=call.groups, sink=future_sink(loop, fut)))
        st.engine.submit([job])
        result = await wait_job(job, fut, time.monotonic() + st.settings.timeout, request)
    except TooLong as e:
        raise _too_long(call, e) from None
    except TimeoutError:
        raise _timed_out(st) from None
    except ClientGone:
        st.record(call.endpoint, 499, "local", call.t0)
        return Response(status_code=499)
    except EngineError as e:
        raise _failed(e) from None
    used = usage(job.prefix_len + len(job.tokens), len(st.engine.tokenize(result.intent, special=False)))
    st.record(call.endpoint, 200, "local", call.t0)
    if not call.body.stream:
        return call.shape.whole(result.intent, "stop", used)
    chunks = [call.shape.opening(), call.shape.chunk(result.intent), call.shape.chunk(finish="stop"),
              call.shape.usage_chunk(used) if call.include_usage else None]
    return _stream(_each([c for c in chunks if c is not None]))


async def _each(chunks: list):
    for chunk in chunks:
        yield chunk


def _stream(chunks):
    """Server-Sent Events as OpenAI sends them: `data: <chunk>` lines, then `data: [DONE]`."""
    from sse_starlette.sse import EventSourceResponse

    async def events():
        async for chunk in chunks:
            yield {"data": json.dumps(chunk, ensure_ascii=False)}
        yield {"data": "[DONE]"}

    return EventSourceResponse(events(), ping=15, sep="\n")


def _make_job(st: ServeState, call: Call):
    b = call.body
    seed = None if b.seed is None else b.seed & 0x7FFFFFFF  # llama.cpp takes 32 bits; all-ones means "random"
    return lambda sink: st.engine.prepare(
        "generate", call.segments(st), sink=sink, max_new=call.max_tokens,
        temperature=1.0 if b.temperature is None else b.temperature,
        top_p=1.0 if b.top_p is None else b.top_p, top_k=max(0, b.top_k or 0), seed=seed, stop=b.stops)


def _used(job, result) -> dict:
    return usage(job.prefix_len + len(job.tokens), result.n_tokens)


def _done(st: ServeState, call: Call, result) -> None:
    st.metrics.tokens.inc(result.n_tokens)
    if result.tokens_per_s:
        st.metrics.tokens_per_s.observe(result.tokens_per_s)
    st.record(call.endpoint, 200, "local", call.t0)


async def _generate(st: ServeState, call: Call, slot, request: Request):
    try:
        job, q = await submit_generation(st.engine, slot, _make_job(st, call))
    except TooLong as e:
        raise _too_long(call, e) from None
    except EngineError as e:
        raise _failed(e) from None
    deadline = time.monotonic() + st.settings.timeout
    if call.body.stream:
        return _stream(_chunks(st, call, job, q, slot, deadline))
    try:
        result = await collect(job, q, deadline, request)
    except TimeoutError:
        st.metrics.cancelled.labels("timeout").inc()
        raise _timed_out(st) from None
    except ClientGone:
        st.metrics.cancelled.labels("disconnect").inc()
        st.record(call.endpoint, 499, "local", call.t0)
        return Response(status_code=499)
    except EngineError as e:
        raise _failed(e) from None
    finally:
        slot.release()
    _done(st, call, result)
    return call.shape.whole(result.message, result.finish_reason, _used(job, result))


async def _chunks(st: ServeState, call: Call, job, q: asyncio.Queue, slot, deadline: float):
    """The reply as chunks; a failure after the stream began is an error chunk (as vLLM sends)."""
    finished = False
    try:
        opening = call.shape.opening()
        if opening:
            yield opening
        async for kind, data in job_events(job, q, deadline):
            if kind == "delta":
                yield call.shape.chunk(data)
            elif kind == "done":
                _done(st, call, data)
                yield call.shape.chunk(finish=data.finish_reason)
                if call.include_usage:
                    yield call.shape.usage_chunk(_used(job, data))
            else:
                if kind == "timeout":
                    st.metrics.cancelled.labels("timeout").inc()
                e = _timed_out(st) if kind == "timeout" else _failed(data)
                st.record(call.endpoint, e.status, "local", call.t0)
                yield {"error": {"message": e.detail, "type": "server_error", "param": None, "code": e.code}}
        finished = True
    finally:
        if not finished and not job.done:  # the client went away mid-stream
            job.cancel()
            st.metrics.cancelled.labels("disconnect").inc()
            st.record(call.endpoint, 499, "local", call.t0)
        slot.release()
