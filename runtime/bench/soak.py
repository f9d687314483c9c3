"""The soak's traffic: a seeded mix of intents, batches, JSON and streamed replies, dropped streams and
malformed requests from bounded client loops, bursts of 10x --max-queue, and periodic samples of the
server's memory and /health; every outcome counted client-side."""
from __future__ import annotations

import asyncio
import random
import time

from qwen_local.runtime.bench.memory import read_status
from qwen_local.runtime.bench.stats import percentile
from qwen_local.runtime.dataset import packaged

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


def _rss(pid: int) -> dict:
    st = read_status(pid)
    return {"rss": st.get("VmRSS"), "rss_anon": st.get("RssAnon")}


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
        self.queries = packaged().queries
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
            s["intent_p50_s"] = round(percentile(window, 50), 4)
        try:
            h = (await c.get("/health")).json()
            s.update(inflight=h.get("inflight"), engine_depth=h.get("engine_depth"),
                     kv_in_use=(h.get("kv_cells") or {}).get("in_use"))
        except Exception as e:  # noqa: BLE001
            s["health_error"] = type(e).__name__
        return s
