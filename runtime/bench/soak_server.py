"""The server under soak: `qwen-local serve` as a child process on 127.0.0.1, waited for, and at the
end SIGTERM with streams in flight."""
from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

from qwen_local.runtime.bench.process import ROOT, child_env


def start_server(model: str, port: int, a, log_path: Path, remote_url: str | None) -> subprocess.Popen:
    # the server runs from the repository root: a path relative to the caller's folder must not break
    model = str(Path(model).resolve())
    cmd = [sys.executable, "-m", "qwen_local", "serve", "--model", model, "--host", "127.0.0.1",
           "--port", str(port), "--max-queue", str(a.max_queue), "--timeout", str(a.timeout),
           "--slots", str(a.slots), "--ctx", str(a.ctx), "--grace", str(a.grace),
           "--log-level", "warning"]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    env = child_env()
    if remote_url:  # local first; overflow and local failures go to a fallback that fails
        cmd += ["--fallback", "openai", "--fallback-model", "soak", "--fallback-timeout",
                str(a.fallback_timeout), "--intent-policy", "local-then-fallback",
                "--generate-policy", "local-then-fallback"]
        env.update(OPENAI_BASE_URL=remote_url, OPENAI_API_KEY="unused")
    with open(log_path, "wb") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


async def wait_up(url: str, proc: subprocess.Popen, log_path: Path, limit: float = 300) -> None:
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


async def sigterm_phase(url: str, proc: subprocess.Popen, grace: float, n_streams: int) -> dict:
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
