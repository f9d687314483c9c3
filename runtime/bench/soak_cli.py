"""`qwen-local bench soak`: the real server under hours of mixed traffic and client faults.

    qwen-local bench soak --model M.gguf [--minutes 30] [--concurrency 8] [--max-queue 16]
                          [--seed 0] [--json OUT]

It starts `qwen-local serve` as a child process on 127.0.0.1 and drives a seeded mix against it with
`--concurrency` clients, each a bounded loop that stops at the deadline:

- single intents (~35%), batch intents of 2-8 queries (~13%), JSON replies (~15%), streamed replies
  (the rest), of which ~10% are dropped by the client after 1-3 deltas (the connection is closed);
- ~2% malformed or oversized requests (bad JSON, empty query, 413-sized query or batch, max_tokens 0);
- every `--burst-every` seconds a burst of 10x `--max-queue` intents at once, then one probe request.

Every `--sample-every` seconds it records the server's RSS (from /proc), in-flight and engine depth
and the KV cells in use (/health). When the traffic stops it waits for the server to go idle and
checks the KV cache holds only the cached system prompts; then it sends SIGTERM with streams in
flight and checks they end cleanly, that new requests get 503, and that the process exits.

Invariants (each PASS/FAIL in the report and JSON):
- no_5xx: no 5xx except the 503 + Retry-After of load shedding, and no stream ended by an error event;
- rss_drift: RSS at the end (idle) within 2% of RSS after warm-up;
- kv_idle: when idle, no request sequence holds a KV cell and the prefixes are intact;
- cancelled: every dropped stream counted as a cancelled generation by the server;
- bursts: bursts get only 200/503 and the next request is served at once;
- sigterm: in-flight streams end with `done` or `error` (never cut), new requests get 503 (or a
  refused connection once the server is gone), the process exits within the grace period;
- bounded: no request took longer than --timeout (+ --fallback-timeout) + 10 s.

With --fallback-faults the server falls back (local-then-fallback) to runtime.faults.FaultyRemote,
which hangs, answers garbage or drops the connection in turn: overflow then ends in the documented
502/504 instead of 503, and those are counted apart from unexpected 5xx.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from qwen_local.runtime.bench.soak import Soak
from qwen_local.runtime.bench.soak_server import sigterm_phase, start_server, wait_up
from qwen_local.runtime.serve.runner import free_port
from qwen_local.runtime.bench.stats import percentile

MAX_DRIFT_PCT = 2.0


def _metric(text: str, name: str, **labels) -> float:
    """Sum of a Prometheus sample over the series whose labels match."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


async def _wait_idle(c) -> dict:
    """/health once nothing is in flight and the worker's KV snapshot shows only the prefixes (the
    last answer if that takes more than 30 s)."""
    t_idle = time.monotonic()
    while time.monotonic() - t_idle < 30:
        h = (await c.get("/health")).json()
        if h["inflight"] == 0 and h["engine_depth"] == 0 and h["kv_cells"]["clean"]:
            return h
        await asyncio.sleep(0.2)
    return h


async def _traffic(url: str, pid: int, a, log) -> dict:
    """The mixed traffic until the deadline, then the idle server's /health, RSS and /metrics."""
    import httpx

    duration = a.minutes * 60
    burst_every = a.burst_every or max(5.0, min(60.0, duration / 4))
    # warm-up ends once every kind of traffic has run, the first burst included: its 10x
    # concurrency sets the allocator's high-water mark once (measured: +6 MB on the tiny model,
    # flat after), which is not a leak
    warmup = a.warmup if a.warmup is not None else max(0.1 * duration, burst_every + 5)
    soak = Soak(url, seed=a.seed, concurrency=a.concurrency, max_queue=a.max_queue,
                timeout=a.timeout, log=log, fallback_faults=a.fallback_faults)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=a.concurrency + 4)
    samples: list[dict] = []
    async with httpx.AsyncClient(base_url=url, timeout=a.timeout + 30, limits=limits) as c:
        t_start = time.monotonic()
        end = t_start + duration
        log(f"traffic: {a.concurrency} clients for {duration:.0f} s, bursts of "
            f"{10 * a.max_queue} every {burst_every:.0f} s, warm-up {warmup:.0f} s")
        await asyncio.gather(
            *(soak.client_loop(c, i, end) for i in range(a.concurrency)),
            soak.burst_loop(c, end, burst_every),
            soak.sample_loop(c, pid, end, a.sample_every, samples, t_start))
        traffic_s = time.monotonic() - t_start
        idle = await _wait_idle(c)
        await asyncio.sleep(1.0)
        final = await soak.sample(c, pid, t_start)
        metrics = (await c.get("/metrics")).text
    return {"soak": soak, "samples": samples, "warmup": warmup, "traffic_s": traffic_s, "idle": idle,
            "final": final, "metrics": metrics}


async def _soak(model: str, a, log) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(a.server_log) if a.server_log else Path(os.environ.get("TMPDIR", "/tmp")) / \
        f"qwen-soak-{port}.log"
    remote = None
    if a.fallback_faults:
        from qwen_local.runtime.faults import FaultyRemote

        remote = FaultyRemote("cycle")
    proc = start_server(model, port, a, log_path, remote and remote.url)
    try:
        t_load = time.monotonic()
        await wait_up(url, proc, log_path)
        log(f"server up on {url} in {time.monotonic() - t_load:.1f} s (pid {proc.pid}, log {log_path})")
        run = await _traffic(url, proc.pid, a, log)
        sigterm = await sigterm_phase(url, proc, a.grace, n_streams=min(3, a.slots))
    finally:
        if remote:
            remote.stop()
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=a.grace + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return _result(model, a, run, sigterm, remote)


def _result(model: str, a, run: dict, sigterm: dict, remote) -> dict:
    """The invariants judged, and every figure behind them."""
    soak, samples, warmup = run["soak"], run["samples"], run["warmup"]
    final, idle = run["final"], run["idle"]
    t = soak.t
    warm = next((s for s in samples if s["t"] >= warmup and s.get("rss")), None)
    drift = None if not warm else (final["rss"] - warm["rss"]) / warm["rss"] * 100
    cancelled = {r: _metric(run["metrics"], "qwen_generations_cancelled_total", reason=r)
                 for r in ("disconnect", "timeout")}
    latency = {ep: {"n": len(v), "p50_s": round(percentile(v, 50), 4), "p99_s": round(percentile(v, 99), 4)}
               for ep, v in sorted(t.latency.items()) if v}
    fives = t.unexpected_5xx + [f"stream error event: {e}" for e in t.stream_errors]
    allowed = {"200", "503"} | ({"502", "504"} if a.fallback_faults else set())
    # no request waits past the local --timeout plus, when it falls back, --fallback-timeout
    bound = a.timeout + (a.fallback_timeout if a.fallback_faults else 0) + 10
    checks = {
        "no_5xx": not fives and not t.malformed_not_4xx,
        "rss_drift": drift is not None and drift <= MAX_DRIFT_PCT,
        "kv_idle": bool(idle["kv_cells"]["clean"]),
        "cancelled": cancelled["disconnect"] == t.dropped,
        "bursts": bool(soak.bursts) and all(set(b["status"]) <= allowed and b["probe_after"] == 200
                                              for b in soak.bursts),
        "bounded": t.max_seconds <= bound,
        "sigterm": sigterm["pass"],
    }
    return {
        "model": model, "minutes": a.minutes, "traffic_seconds": round(run["traffic_s"], 1),
        "concurrency": a.concurrency, "max_queue": a.max_queue, "seed": a.seed,
        "requests_by_status": t.status, "latency": latency,
        "rss_after_warmup": warm and warm["rss"], "rss_end": final["rss"],
        "rss_anon_after_warmup": warm and warm.get("rss_anon"), "rss_anon_end": final.get("rss_anon"),
        "rss_drift_pct": None if drift is None else round(drift, 2), "warmup_seconds": warmup,
        "dropped_streams": t.dropped, "cancelled_generations": cancelled,
        "engine_cancelled": idle["engine"].get("cancelled"),
        "kv_idle": idle["kv_cells"], "cached_prefix_tokens": idle["cached_prefix_tokens"],
        "unexpected_5xx": fives[:20], "n_unexpected_5xx": len(fives),
        "malformed_not_4xx": t.malformed_not_4xx, "transport_errors": t.transport_errors[:20],
        "n_transport_errors": len(t.transport_errors),
        "bursts": soak.bursts, "sigterm": sigterm, "max_request_seconds": round(t.max_seconds, 2),
        "request_bound_seconds": bound, "fallback_faults": a.fallback_faults,
        "fallback_errors": t.fallback_errors, "fallback_modes_served": remote and remote.served,
        "samples": samples + [dict(final, final=True)],
        "checks": checks, "passed": all(checks.values()),
        "machine": {"cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg())},
    }


def render(r: dict) -> str:
    gb = lambda v: "-" if v is None else f"{v / 1024 ** 3:.3f} GiB"  # noqa: E731
    lines = [f"soak of {r['model']}: {r['traffic_seconds']:.0f} s of traffic, {r['concurrency']} clients, "
             f"--max-queue {r['max_queue']}, seed {r['seed']}", "", "requests by status:"]
    for ep, d in sorted(r["requests_by_status"].items()):
        lines.append(f"  {ep:<15} " + ", ".join(f"{k}: {v}" for k, v in sorted(d.items())))
    lines += ["", "latency of 200s (client side; streams: to the done event):"]
    for ep, d in r["latency"].items():
        lines.append(f"  {ep:<15} n={d['n']:<6} p50 {d['p50_s']:.3f} s   p99 {d['p99_s']:.3f} s")
    lines += ["",
              f"RSS after warm-up ({r['warmup_seconds']:.0f} s) {gb(r['rss_after_warmup'])}, at the end "
              f"(idle) {gb(r['rss_end'])}: drift {r['rss_drift_pct']}% (limit {MAX_DRIFT_PCT}%)",
              f"dropped streams {r['dropped_streams']}, cancelled generations {r['cancelled_generations']}",
              f"KV cells when idle: {r['kv_idle']} (cached prefixes {r['cached_prefix_tokens']})",
              f"unexpected 5xx / stream errors: {r['n_unexpected_5xx']}; transport errors: "
              f"{r['n_transport_errors']}; slowest request {r['max_request_seconds']} s "
              f"(bound {r['request_bound_seconds']:g} s)",
              *([f"faulty fallback: served {r['fallback_modes_served']}, answered as "
                 f"{r['fallback_errors']}"] if r["fallback_faults"] else []),
              f"bursts: {len(r['bursts'])}, statuses "
              f"{sorted({k for b in r['bursts'] for k in b['status']})}, next request "
              f"{sorted({b['probe_after'] for b in r['bursts']})}",
              f"SIGTERM: {r['sigterm']['streams_in_flight']} streams in flight -> "
              f"{r['sigterm']['stream_outcomes']}, new requests {r['sigterm']['new_requests']}, exit "
              f"{r['sigterm']['exit_code']} after {r['sigterm']['exit_seconds']} s "
              f"(grace {r['sigterm']['grace']:g} s)", ""]
    for k, v in r["checks"].items():
        lines.append(f"  {'PASS' if v else 'FAIL'}  {k}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-local bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="GGUF to serve")
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--concurrency", type=int, default=8, help="clients sending one request at a time")
    p.add_argument("--max-queue", type=int, default=None, help="the server's --max-queue "
                   "(default: 2x --concurrency, so bursts, not steady traffic, hit the limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="server threads (default: its own)")
    p.add_argument("--slots", type=int, default=4)
    p.add_argument("--ctx", type=int, default=8192)
    p.add_argument("--timeout", type=float, default=120.0, help="the server's --timeout")
    p.add_argument("--grace", type=float, default=20.0, help="the server's --grace on SIGTERM")
    p.add_argument("--warmup", type=float, default=None,
                   help="seconds before the RSS reference (default: 10%% of the run, and at least "
                        "until 5 s after the first burst)")
    p.add_argument("--burst-every", type=float, default=None,
                   help="seconds between bursts (default: a quarter of the run, 5-60 s)")
    p.add_argument("--sample-every", type=float, default=5.0)
    p.add_argument("--fallback-faults", action="store_true",
                   help="serve with --fallback openai (local-then-fallback) pointed at a loopback "
                        "remote that hangs, answers garbage or drops the connection in turn: "
                        "overflow must end in 502/504 within --fallback-timeout, never 500 or a hang")
    p.add_argument("--fallback-timeout", type=float, default=2.0)
    p.add_argument("--server-log", default=None, help="where the server's output goes")
    p.add_argument("--json", default=None, help="write the full report here")
    return p


def run(argv: list[str], log=None) -> dict:
    from qwen_local.runtime.errors import UserError
    from qwen_local.runtime.gguf_file import gguf_problem

    a = build_parser().parse_args(argv)
    log = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if a.max_queue is None:
        a.max_queue = 2 * a.concurrency
    if a.minutes <= 0 or a.concurrency < 1 or a.max_queue < 1:
        raise UserError("--minutes, --concurrency and --max-queue must be positive")
    if not Path(a.model).is_file():
        raise UserError(f"no such GGUF: {a.model}")
    problem = gguf_problem(a.model)
    if problem:
        raise UserError(f"cannot load {a.model}: {problem}")
    result = asyncio.run(_soak(a.model, a, log))
    if a.json:
        tmp = Path(a.json).with_name(Path(a.json).name + ".tmp")
        tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False))
        os.replace(tmp, a.json)
    return result


def main(argv: list[str]) -> int:
    result = run(argv)
    print(render(result))
    return 0 if result["passed"] else 1
