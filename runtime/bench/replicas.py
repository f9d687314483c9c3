"""`qwen-local bench replicas`: what a second machine buys, measured with local replicas.

    qwen-local bench replicas --model M.gguf [--replicas 2] [--requests 200] [--concurrency 8]
                              [--threads N] [--burst 64] [--max-queue 4] [--json OUT]

It starts `--replicas` `qwen-local serve` processes on 127.0.0.1 (each with --threads, default: the
physical cores shared out) and measures, with intents of the packaged data set:

1. one replica alone, then all of them behind a round-robin client (request i goes to replica
   i mod N), `--requests` each time at `--concurrency`: requests/s, p50 and p95 latency;
2. the overflow share: replica 0 restarted with `--max-queue` and `--fallback openai` pointed at
   replica 1's /v1 (local-then-fallback, so the fallback sends the rendered prompt to
   /v1/completions), then a burst of `--burst` intents at once: how many were answered locally,
   by the fallback, or refused.

On one box the replicas share its cores, so (1) shows the cost of running them side by side; on two
machines each would have its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from qwen_local.runtime.bench.soak_server import start_server, wait_up
from qwen_local.runtime.bench.stats import percentile
from qwen_local.runtime.serve.runner import free_port


def _server_args(a, max_queue: int) -> argparse.Namespace:
    return argparse.Namespace(max_queue=max_queue, timeout=a.timeout, slots=a.slots, ctx=a.ctx,
                              grace=5.0, threads=a.threads, fallback_timeout=a.timeout)


async def _start(a, max_queue: int, log_dir: Path, remote: str | None = None):
    port = free_port()
    url, log_path = f"http://127.0.0.1:{port}", log_dir / f"qwen-replica-{port}.log"
    proc = start_server(a.model, port, _server_args(a, max_queue), log_path, remote)
    try:
        await wait_up(url, proc, log_path)
    except BaseException:
        _stop(proc)
        raise
    return url, proc


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _load(urls: list[str], queries: list[str], n: int, concurrency: int, timeout: float) -> dict:
    """n intents spread round-robin over urls, at most `concurrency` in flight."""
    import httpx

    gate = asyncio.Semaphore(concurrency)
    seconds, statuses, sources, errors = [], Counter(), Counter(), Counter()

    async def one(c, i: int):
        async with gate:
            t0 = time.perf_counter()
            try:
                r = await c.post(f"{urls[i % len(urls)]}/qwen/intent",
                                 json={"query": queries[i % len(queries)]})
                statuses[str(r.status_code)] += 1
                if r.status_code == 200:
                    sources[r.json()["source"]] += 1
                    seconds.append(time.perf_counter() - t0)
                else:  # what went wrong, not only that it did
                    errors[f"{r.status_code}: {r.text[:200]}"] += 1
            except httpx.HTTPError as e:
                statuses[type(e).__name__] += 1

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as c:
        t0 = time.perf_counter()
        await asyncio.gather(*(one(c, i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"replicas": len(urls), "requests": n, "concurrency": concurrency, "seconds": round(wall, 3),
            "requests_per_s": round(len(seconds) / wall, 3) if wall > 0 else None,
            "p50_s": round(percentile(seconds, 50), 4) if seconds else None,
            "p95_s": round(percentile(seconds, 95), 4) if seconds else None,
            "status": dict(statuses), "source": dict(sources), "errors": dict(errors)}


async def _measure(a, queries: list[str], log) -> dict:
    log_dir = Path(a.log_dir)
    started = [await _start(a, a.queue, log_dir) for _ in range(a.replicas)]
    try:
        urls = [u for u, _ in started]
        log(f"{len(urls)} replicas up: {', '.join(urls)}")
        await _load(urls, queries, min(8, a.requests), a.concurrency, a.timeout)  # warm every replica
        alone = await _load(urls[:1], queries, a.requests, a.concurrency, a.timeout)
        log(f"one replica: {alone['requests_per_s']} requests/s")
        together = await _load(urls, queries, a.requests, a.concurrency, a.timeout)
        log(f"{len(urls)} replicas round-robin: {together['requests_per_s']} requests/s")
        _stop(started[0][1])
        started[0] = await _start(a, a.max_queue, log_dir, remote=f"{urls[1]}/v1")
        burst = await _load([started[0][0]], queries, a.burst, a.burst, a.timeout)
        log(f"burst of {a.burst} at --max-queue {a.max_queue}: {burst['source']}, status {burst['status']}")
    finally:
        for _, proc in started:
            _stop(proc)
    share = {k: round(v / a.burst, 4) for k, v in burst["source"].items()}
    return {"model": a.model, "threads_per_replica": a.threads, "one_replica": alone,
            "round_robin": together, "burst": {**burst, "max_queue": a.max_queue, "share": share}}


def build_parser() -> argparse.ArgumentParser:
    from qwen_local.runtime.llama import default_threads

    p = argparse.ArgumentParser(prog="qwen-local bench replicas", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="GGUF every replica serves")
    p.add_argument("--replicas", type=int, default=2, help="at least 2 (the overflow goes to replica 1)")
    p.add_argument("--requests", type=int, default=200, help="intents per throughput measurement")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--threads", type=int, default=None,
                   help="llama.cpp threads per replica (default: the physical cores shared out)")
    p.add_argument("--burst", type=int, default=64, help="intents sent at once for the overflow share")
    p.add_argument("--max-queue", type=int, default=4, help="replica 0's --max-queue during the burst")
    p.add_argument("--queue", type=int, default=64, help="every replica's --max-queue for throughput")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--log-dir", default=tempfile.gettempdir(), help="where each replica's output goes")
    p.add_argument("--json", default=None, help="write the figures here")
    p.set_defaults(usable=default_threads())
    return p


def main(argv: list[str], log=None) -> int:
    from qwen_local.runtime.dataset import packaged
    from qwen_local.runtime.errors import UserError

    a = build_parser().parse_args(argv)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if a.replicas < 2 or min(a.requests, a.concurrency, a.burst, a.max_queue, a.queue) < 1:
        raise UserError("--replicas must be at least 2, and the counts positive")
    if not Path(a.model).is_file():
        raise UserError(f"no such GGUF: {a.model}")
    a.threads = a.threads or max(1, a.usable // a.replicas)
    result = asyncio.run(_measure(a, packaged().queries, log))
    print(json.dumps(result, indent=2, ensure_ascii=False))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0
