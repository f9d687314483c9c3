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
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAX_DRIFT_PCT = 2.0

MALFORMED = [  # (path, raw body or JSON) -> a 4xx, never a 5xx
    ("/qwen/intent", b"{not json"),
    ("/qwen/intent", {"query": ""}),
    ("/qwen/intent", {"query": "áo " * 1000}),
    ("/qwen/intent/batch", {"queries": ["áo"] * 65}),
    ("/qwen/generate", {"query": "x", "max_tokens": 0}),
    ("/qwen/generate", {"query": "x", "intent": "weather"}),
]
PRODUCTS = [{"name": "Váy maxi hoa nhí", "price": 459000, "color": "xanh"},
            {"name": "Áo sơ mi linen trắng", "price": 350000}]


def _queries() -> list[str]:
    path = ROOT / "runtime" / "data" / "intent_vi.jsonl"
    return [json.loads(line)["query"] for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss(pid: int) -> dict:
    from runtime.bench import read_status

    st = read_status(pid)
    return {"rss": st.get("VmRSS"), "rss_anon": st.get("RssAnon")}


def _metric(text: str, name: str, **labels) -> float:
    """Sum of a Prometheus sample over the series whose labels match."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


class Tally:
    """Client-side outcome of every request."""

    def __init__(self):
        self.status: dict[str, dict[str, int]] = {}
        self.latency: dict[str, list[float]] = {}
        self.unexpected_5xx: list[str] = []
        self.stream_errors: list[str] = []
        self.transport_errors: list[str] = []
        self.dropped = 0
        self.malformed_not_4xx: list[str] = []
        self.fallback_errors: dict[str, int] = {}   # 502/504 from a failing fallback (policy)
        self.max_seconds = 0.0                       # the slowest request, whatever its outcome

    def unexpected(self, what: str, status: int, text: str, fallback_faults: bool) -> None:
        """A 5xx that is neither load shedding (503 + Retry-After) nor, with --fallback-faults,
        the documented 502/504 of a failing fallback."""
        if fallback_faults and status in (502, 504) and "fallback" in text:
            self.fallback_errors[str(status)] = self.fallback_errors.get(str(status), 0) + 1
        else:
            self.unexpected_5xx.append(f"{what} {status}: {text[:200]}")

    def add(self, endpoint: str, status, seconds: float | None = None):
        d = self.status.setdefault(endpoint, {})
        d[str(status)] = d.get(str(status), 0) + 1
        if status == 200 and seconds is not None:
            self.latency.setdefault(endpoint, []).append(seconds)


class Soak:
    def __init__(self, url: str, *, seed: int, concurrency: int, max_queue: int, timeout: float,
                 log, fallback_faults: bool = False):
        self.url, self.seed, self.concurrency, self.max_queue = url, seed, concurrency, max_queue
        self.timeout, self.log, self.fallback_faults = timeout, log, fallback_faults
        self.t = Tally()
        self.queries = _queries()
        self.bursts: list[dict] = []
        self.retry_after: dict = {}  # task -> the Retry-After of its last 503

    # ---------------------------------------------------------------- one request of each kind
    async def _post(self, c, endpoint: str, path: str, body) -> int:
        """POST and count the outcome; returns the status (-1 for a transport error) and leaves a
        503's Retry-After in self.retry_after[task] for the calling client's back-off."""
        t0 = time.perf_counter()
        kw = {"content": body, "headers": {"content-type": "application/json"}} \
            if isinstance(body, bytes) else {"json": body}
        try:
            r = await c.post(path, **kw)
        except Exception as e:  # noqa: BLE001 - a transport error is an outcome to count
            self.t.transport_errors.append(f"{endpoint}: {type(e).__name__}: {e}"[:200])
            self.t.add(endpoint, "transport")
            return -1
        finally:
            self.t.max_seconds = max(self.t.max_seconds, time.perf_counter() - t0)
        self.t.add(endpoint, r.status_code, time.perf_counter() - t0)
        if r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers):
            self.t.unexpected(endpoint, r.status_code, r.text, self.fallback_faults)
        if r.status_code == 503:
            self.retry_after[asyncio.current_task()] = float(r.headers.get("retry-after", 1))
        return r.status_code

    async def _stream(self, c, rng: random.Random, drop: bool) -> None:
        endpoint = "stream_dropped" if drop else "stream"
        body = {"query": rng.choice(self.queries), "intent": "fashion", "products": PRODUCTS,
                "stream": True, "max_tokens": 200 if drop else rng.randint(16, 48),
                "seed": rng.randrange(2 ** 31)}
        t0 = time.perf_counter()
        deltas, last = 0, None
        try:
            async with c.stream("POST", "/qwen/generate", json=body) as r:
                if r.status_code != 200:
                    await r.aread()
                    self.t.add(endpoint, r.status_code)
                    if r.status_code == 503:
                        self.retry_after[asyncio.current_task()] = float(r.headers.get("retry-after", 1))
                    if r.status_code >= 500 and not (r.status_code == 503 and "retry-after" in r.headers):
                        self.t.unexpected("stream", r.status_code, r.text, self.fallback_faults)
                    return
                stop_after = rng.randint(1, 3)
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        last = line[6:].strip()
                        if last == "delta":
                            deltas += 1
                        elif last == "error":
                            pass
                    elif line.startswith("data:") and last == "error":
                        detail = line[5:].strip()
                        if self.fallback_faults and "fallback" in detail:
                            self.t.unexpected("stream error event", 502, detail, True)
                        else:
                            self.t.stream_errors.append(detail[:200])
                    if drop and deltas >= stop_after and last == "delta":
                        break  # hang up mid-stream: leaving the block closes the connection
        except Exception as e:  # noqa: BLE001
            self.t.transport_errors.append(f"{endpoint}: {type(e).__name__}: {e}"[:200])
            self.t.add(endpoint, "transport")
            return
        finally:
            self.t.max_seconds = max(self.t.max_seconds, time.perf_counter() - t0)
        if drop and last == "delta":
            self.t.dropped += 1
            self.t.add(endpoint, "dropped")
        else:
            self.t.add(endpoint, 200 if last == "done" else f"ended:{last}", time.perf_counter() - t0)

    async def _one(self, c, rng: random.Random) -> None:
        r = rng.random()
        if r < 0.02:
            path, body = rng.choice(MALFORMED)
            code = await self._post(c, "malformed", path, body)
            if not 400 <= code < 500:
                self.t.malformed_not_4xx.append(f"{path} -> {code}")
        elif r < 0.37:
            await self._post(c, "intent", "/qwen/intent", {"query": rng.choice(self.queries)})
        elif r < 0.50:
            qs = rng.sample(self.queries, rng.randint(2, 8))
            await self._post(c, "batch", "/qwen/intent/batch", {"queries": qs})
        elif r < 0.65:
            await self._post(c, "generate", "/qwen/generate",
                             {"query": rng.choice(self.queries), "intent": "chitchat",
                              "max_tokens": rng.randint(8, 32), "seed": rng.randrange(2 ** 31)})
        else:
            await self._stream(c, rng, drop=rng.random() < 0.10)

    # ---------------------------------------------------------------- loops
    async def client_loop(self, c, i: int, end: float) -> None:
        rng = random.Random(self.seed * 1000 + i)
        me = asyncio.current_task()
        while time.monotonic() < end:
            await self._one(c, rng)
            wait = self.retry_after.pop(me, 0.0)
            if wait:  # shed: wait as told, like a real client (clients that retry at once make a 503 storm)
                await asyncio.sleep(min(wait * rng.uniform(0.5, 1.5), max(0.0, end - time.monotonic())))

    async def burst_loop(self, c, end: float, every: float) -> None:
        n = 10 * self.max_queue
        while True:
            await asyncio.sleep(every)
            if time.monotonic() >= end:
                return
            rng = random.Random(self.seed + len(self.bursts))
            codes: dict[str, int] = {}

            async def one():
                t1 = time.perf_counter()
                try:
                    r = await c.post("/qwen/intent", json={"query": rng.choice(self.queries)})
                    k = str(r.status_code)
                    if r.status_code >= 500 and r.status_code != 503:
                        self.t.unexpected("burst intent", r.status_code, r.text, self.fallback_faults)
                except Exception as e:  # noqa: BLE001
                    k = type(e).__name__
                codes[k] = codes.get(k, 0) + 1
                self.t.max_seconds = max(self.t.max_seconds, time.perf_counter() - t1)

            t0 = time.monotonic()
            await asyncio.gather(*(one() for _ in range(n)))
            try:
                probe = (await c.post("/qwen/intent", json={"query": "xin chào shop"})).status_code
            except Exception as e:  # noqa: BLE001
                probe = type(e).__name__
            self.bursts.append({"requests": n, "status": codes, "seconds": round(time.monotonic() - t0, 2),
                                "probe_after": probe})
            self.log(f"  burst of {n}: {codes}, next request {probe}")

    async def sample_loop(self, c, pid: int, end: float, every: float, samples: list, t_start: float):
        while time.monotonic() < end:
            samples.append(await self.sample(c, pid, t_start))
            await asyncio.sleep(every)

    async def sample(self, c, pid: int, t_start: float) -> dict:
        s = {"t": round(time.monotonic() - t_start, 1), **_rss(pid)}
        # latency of the intents answered since the previous sample
        lat = self.t.latency.get("intent", [])
        window, self._seen = lat[getattr(self, "_seen", 0):], len(lat)
        if window:
            from runtime.bench import percentile
            s["intent_p50_s"] = round(percentile(window, 50), 4)
        try:
            h = (await c.get("/health")).json()
            s.update(inflight=h.get("inflight"), engine_depth=h.get("engine_depth"),
                     kv_in_use=(h.get("kv_cells") or {}).get("in_use"))
        except Exception as e:  # noqa: BLE001
            s["health_error"] = type(e).__name__
        return s


def _start_server(model: str, port: int, a, log_path: Path, remote_url: str | None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qwen_local", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", str(a.max_queue), "--timeout", str(a.timeout),
           "--slots", str(a.slots), "--ctx", str(a.ctx), "--grace", str(a.grace),
           "--log-level", "warning"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if remote_url:  # local first; overflow and local failures go to a fallback that fails
        cmd += ["--fallback", "openai", "--fallback-model", "soak", "--fallback-timeout",
                str(a.fallback_timeout), "--intent-policy", "local-then-fallback",
                "--generate-policy", "local-then-fallback"]
        env.update(OPENAI_BASE_URL=remote_url, OPENAI_API_KEY="unused")
    with open(log_path, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


async def _wait_up(url: str, proc: subprocess.Popen, log_path: Path, limit: float = 300) -> None:
    import httpx

    t0 = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=5) as c:
        while time.monotonic() - t0 < limit:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited ({proc.returncode}): "
                                   f"{log_path.read_text(errors='replace')[-1500:]}")
            try:
                if (await c.get("/health")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.3)
    raise RuntimeError(f"server did not come up in {limit:.0f} s")


async def _sigterm_phase(url: str, proc: subprocess.Popen, grace: float, n_streams: int) -> dict:
    """Streams in flight, then SIGTERM: they must end with done/error, new requests get 503."""
    import httpx

    started = [asyncio.Event() for _ in range(n_streams)]
    outcome: list[str] = ["?"] * n_streams

    async def stream(i: int, c) -> None:
        last = None
        try:
            async with c.stream("POST", "/qwen/generate",
                                json={"query": "kể chuyện dài về áo dài", "stream": True,
                                      "max_tokens": 200, "temperature": 0.9, "seed": i}) as r:
                if r.status_code != 200:
                    outcome[i] = f"status {r.status_code}"
                    started[i].set()
                    return
                async for line in r.aiter_lines():
                    if line.startswith("event:"):
                        last = line[6:].strip()
                        started[i].set()
            outcome[i] = last if last in ("done", "error") else f"cut after {last}"
        except Exception as e:  # noqa: BLE001
            outcome[i] = f"cut: {type(e).__name__}"
        finally:
            started[i].set()

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=grace + 60, limits=limits) as c:
        tasks = [asyncio.create_task(stream(i, c)) for i in range(n_streams)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), timeout=120)
        running = sum(o == "?" for o in outcome)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.1)  # let the server take the signal

        async def new_request():
            try:
                return (await c.post("/qwen/intent", json={"query": "xin chào"}, timeout=10)).status_code
            except httpx.HTTPError as e:
                return type(e).__name__

        new = list(await asyncio.gather(*(new_request() for _ in range(3))))
        await asyncio.gather(*tasks)
    rc = None
    while time.monotonic() - t0 < grace + 30:
        rc = proc.poll()
        if rc is not None:
            break
        await asyncio.sleep(0.1)
    exit_s = round(time.monotonic() - t0, 1)
    ok_new = all(x == 503 or x == "ConnectError" for x in new) and 503 in new
    return {"streams_in_flight": running, "stream_outcomes": outcome, "new_requests": new,
            "exit_code": rc, "exit_seconds": exit_s, "grace": grace,
            "pass": (running > 0 and all(o in ("done", "error") for o in outcome) and ok_new
                     and rc is not None and exit_s <= grace + 15)}


async def _soak(model: str, a, log) -> dict:
    import httpx

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = Path(a.server_log) if a.server_log else Path(os.environ.get("TMPDIR", "/tmp")) / \
        f"qwen-soak-{port}.log"
    remote = None
    if a.fallback_faults:
        from runtime.faults import FaultyRemote

        remote = FaultyRemote("cycle")
    proc = _start_server(model, port, a, log_path, remote and remote.url)
    try:
        t_load = time.monotonic()
        await _wait_up(url, proc, log_path)
        log(f"server up on {url} in {time.monotonic() - t_load:.1f} s (pid {proc.pid}, log {log_path})")
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
                soak.sample_loop(c, proc.pid, end, a.sample_every, samples, t_start))
            traffic_s = time.monotonic() - t_start
            # idle: nothing in flight, and the worker's KV snapshot shows only the prefixes
            idle = None
            t_idle = time.monotonic()
            while time.monotonic() - t_idle < 30:
                h = (await c.get("/health")).json()
                if h["inflight"] == 0 and h["engine_depth"] == 0 and h["kv_cells"]["clean"]:
                    idle = h
                    break
                await asyncio.sleep(0.2)
            if idle is None:
                idle = h
            await asyncio.sleep(1.0)
            final = await soak.sample(c, proc.pid, t_start)
            metrics = (await c.get("/metrics")).text
        sigterm = await _sigterm_phase(url, proc, a.grace, n_streams=min(3, a.slots))
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

    t = soak.t
    from runtime.bench import percentile

    warm = next((s for s in samples if s["t"] >= warmup and s.get("rss")), None)
    drift = None if not warm else (final["rss"] - warm["rss"]) / warm["rss"] * 100
    cancelled = {r: _metric(metrics, "qwen_generations_cancelled_total", reason=r)
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
        "model": model, "minutes": a.minutes, "traffic_seconds": round(traffic_s, 1),
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
        "fallback_errors": t.fallback_errors, "fallback_modes_served": remote and remote.served, "samples": samples + [dict(final, final=True)],
        "checks": checks, "passed": all(checks.values()),
        "machine": {"cpus": os.cpu_count(), "loadavg_end": list(os.getloadavg())},
    }


def render(r: dict) -> str:
    gb = lambda v: "-" if v is None else f"{v / 1024 ** 3:.3f} GB"  # noqa: E731
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
    from runtime.errors import UserError
    from runtime.gguf_file import gguf_problem

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
