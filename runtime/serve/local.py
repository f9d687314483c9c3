"""Awaiting the engine from the event loop: its jobs report on the engine's thread through a sink;
these bridge that to asyncio, with a deadline and a watch for a client that has gone."""
from __future__ import annotations

import asyncio
import time

from fastapi import Request
from starlette.concurrency import run_in_threadpool

from qwen_local.runtime.engine import Engine, TooLong
from qwen_local.runtime.serve.admission import Slot
from qwen_local.runtime.serve.errors import ClientGone, HTTPError

POLL = 0.2  # seconds between checks of the deadline and of the client's connection


async def wait_job(job, fut: asyncio.Future, deadline: float, request: Request | None):
    """The job's result, or TimeoutError / ClientGone (the job then cancelled)."""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            job.cancel()
            raise TimeoutError()
        done, _ = await asyncio.wait({fut}, timeout=min(POLL, remaining))
        if done:
            return fut.result()
        if request is not None and await request.is_disconnected():
            job.cancel()
            raise ClientGone()


def future_sink(loop: asyncio.AbstractEventLoop, fut: asyncio.Future):
    """A job sink that settles `fut` with the job's result or error (deltas are dropped)."""
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


async def intents(engine: Engine, queries: list[str], deadline: float, request: Request | None) -> list:
    """Intent results for all queries, submitted together so the engine batches them."""
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


async def submit_generation(engine: Engine, slot: Slot, make_job):
    """(job, queue): `make_job(sink)` run off the event loop (tokenizing a long prompt takes a
    while), then submitted. Its events arrive on the queue, and its place in the admission queue is
    freed when it ends, whatever the client does. What make_job or submit raises is raised, with
    the place freed."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()

    def sink(kind, data):  # on the engine's thread
        loop.call_soon_threadsafe(q.put_nowait, (kind, data))
        if kind != "delta":  # the job is over: its place in the queue is free
            loop.call_soon_threadsafe(slot.release)

    try:
        job = await run_in_threadpool(make_job, sink)
        engine.submit([job])
    except BaseException:
        slot.release()
        raise
    return job, q


async def job_events(job, q: asyncio.Queue, deadline: float):
    """A streaming job's (kind, data) until it ends: "delta" texts, then "done" (its result),
    "error" (an exception) or "timeout" (at the deadline; the job is then cancelled)."""
    while True:
        try:
            kind, data = await next_event(q, deadline)
        except TimeoutError:
            job.cancel()
            yield "timeout", None
            return
        yield kind, data
        if kind != "delta":
            return


async def next_event(q: asyncio.Queue, deadline: float):
    """The next (kind, data) a streaming job put on q, or TimeoutError at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError()
    try:
        return await asyncio.wait_for(q.get(), timeout=remaining)
    except asyncio.TimeoutError:  # Python 3.10: not yet the builtin TimeoutError
        raise TimeoutError() from None


async def collect(job, q: asyncio.Queue, deadline: float, request: Request):
    """The final result of a generation whose events arrive on q; TimeoutError or ClientGone (the job
    then cancelled), or the job's own error."""
    next_check = time.monotonic() + POLL
    while True:
        now = time.monotonic()
        if now >= deadline:
            job.cancel()
            raise TimeoutError()
        if now >= next_check:  # deltas may arrive every few ms: check on the clock, not when idle
            next_check = now + POLL
            if await request.is_disconnected():
                job.cancel()
                raise ClientGone()
        try:
            kind, data = await asyncio.wait_for(q.get(), timeout=min(POLL, deadline - now))
        except (TimeoutError, asyncio.TimeoutError):
            continue
        if kind == "done":
            return data
        if kind == "error":
            raise data
