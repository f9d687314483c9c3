"""The server under faults (short versions; `qwen-local bench soak` runs the long ones).

Real parts throughout: llama.cpp over the tiny converted GGUF, uvicorn on 127.0.0.1, HTTP clients.
The misbehaving fallback is a real HTTP server on loopback that answers slowly, with garbage, or not
at all; the shutdown test runs `qwen-local serve` as a process and sends it SIGTERM.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

pytest.importorskip("llama_cpp")

from qwen_local.runtime.engine import Engine  # noqa: E402
from qwen_local.runtime.faults import FaultyRemote  # noqa: E402
from qwen_local.runtime.profile import load_profile  # noqa: E402
from qwen_local.runtime.serve import ServeSettings, create_app  # noqa: E402
from qwen_local.runtime.serve.fallback import OpenAIFallback  # noqa: E402
from qwen_local.runtime.serve.runner import free_port  # noqa: E402
from live import hang_up_when, live, metric, sse_events, wait_for  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    e = Engine(tiny_gguf, threads=2, n_ctx=4096, slots=2)
    yield e
    e.close()


def assert_idle_and_clean(engine):
    assert wait_for(lambda: engine.depth == 0 and engine.kv_cells()["clean"]), engine.kv_cells()


# ------------------------------------------------------------------------------- the KV view
def test_kv_cells_show_prefixes_only_when_idle(engine):
    kv = engine.kv_cells()
    prefixes = {name: n for name, n in engine.describe()["cached_prefix_tokens"].items()}
    assert kv["clean"] and kv["slots"] == {} and kv["prefix"] == prefixes
    assert kv["in_use"] == sum(prefixes.values())
    # while a reply runs, its slot holds cells beyond the prefixes; afterwards they are gone
    gen = engine.generate("kể chuyện", max_tokens=200, temperature=0.9, seed=1)
    next(gen)  # the worker refreshes its view after each step: read it while the reply runs
    assert wait_for(lambda: engine.kv_cells()["slots"] != {}, 5)
    busy = engine.kv_cells()
    assert not busy["clean"] and busy["in_use"] > kv["in_use"]
    gen.close()
    assert_idle_and_clean(engine)


# ------------------------------------------------------------------------------- a faulty fallback
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["slow", "garbage", "wrong", "reset", "refused"])
def test_faulty_fallback_gets_502_or_504_in_time(engine, mode):
    """Policy `fallback`: a remote that hangs is cut at --fallback-timeout (504), one that answers
    garbage, drops the connection or refuses it is a 502; never a 500, never a hang."""
    remote = FaultyRemote(mode) if mode != "refused" else None
    url = remote.url if remote else f"http://127.0.0.1:{free_port()}/v1"
    fb = OpenAIFallback(engine.cfg, model="x", base_url=url, api_key="unused", timeout=30)
    want = 504 if mode == "slow" else 502
    try:
        with live(create_app(engine, ServeSettings(timeout=5, fallback_timeout=1.0,
                                                   intent_policy="fallback",
                                                   generate_policy="fallback"), fb)) as srv:
            with srv.client() as c:
                for path, body in (("/qwen/intent", {"query": "áo"}),
                                   ("/qwen/intent/batch", {"queries": ["áo", "xin chào"]}),
                                   ("/qwen/generate", {"query": "áo", "max_tokens": 4})):
                    t0 = time.monotonic()
                    r = c.post(path, json=body)
                    assert r.status_code == want, (path, r.status_code, r.text)
                    assert time.monotonic() - t0 < 1.0 + 5  # bounded by --fallback-timeout, with slack
                    assert "fallback" in r.json()["detail"]
                with c.stream("POST", "/qwen/generate", json={"query": "áo", "stream": True}) as s:
                    events = sse_events(s.iter_lines())
                assert events[-1][0] == "error" and "fallback" in events[-1][1]["detail"]
                assert metric(c.get("/metrics").text, "qwen_requests_total", status="500") == 0
                assert c.get("/health").json()["inflight"] == 0
    finally:
        if remote:
            remote.stop()


def test_local_timeout_then_slow_fallback_is_bounded(engine):
    """local-then-fallback: the local part times out (--timeout 0), the remote hangs: 504 after
    --fallback-timeout, not after the client library's own 30 s x retries."""
    remote = FaultyRemote("slow")
    fb = OpenAIFallback(engine.cfg, model="x", base_url=remote.url, api_key="unused", timeout=30)
    try:
        with live(create_app(engine, ServeSettings(
                timeout=0.0, fallback_timeout=1.0, intent_policy="local-then-fallback",
                generate_policy="local-then-fallback"), fb)) as srv:
            with srv.client() as c:
                t0 = time.monotonic()
                r = c.post("/qwen/intent", json={"query": "áo"})
                assert r.status_code == 504 and "fallback timed out" in r.json()["detail"]
                assert time.monotonic() - t0 < 6
    finally:
        remote.stop()
    assert_idle_and_clean(engine)


def test_serve_waits_for_the_fallback_as_long_as_its_setting(engine, monkeypatch):
    """serve's fallback client waits --fallback-timeout (or --timeout), not the client library's
    30 s: a 3B replica answering a burst of 60 overflow intents took up to 57 s, and 12 of them
    came back as 502 'Request timed out' under --fallback-timeout 120 before this."""
    from qwen_local.runtime.serve.cli import _fallback

    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    for kw, want in ((dict(fallback_timeout=120.0), 120.0), (dict(timeout=75.0), 75.0)):
        fb = _fallback(ServeSettings(fallback="openai", **kw), engine)
        assert fb.client.timeout == want, kw


# ------------------------------------------------------------------------------- disconnects
@pytest.fixture(scope="module")
def one_slot(tiny_gguf):
    """One slot, replies up to 2000 tokens (~10 s here), prompts evaluated 4 tokens per step: a
    request can be made to wait in the queue, or be caught in the middle of its prefill (the
    catalog profile lists the products in the prompt, which makes a long one: ~150 steps, several
    times the server's 0.2 s between checks of the client's connection)."""
    from dataclasses import replace

    e = Engine(tiny_gguf, replace(load_profile("catalog"), max_products=40), threads=2,
               n_ctx=4096, slots=1, n_batch=4)
    yield e
    e.close()


def test_disconnect_while_queued(one_slot):
    """The only slot is busy with a stream, a second request waits in the engine's queue; its
    client leaves: it is dropped from the queue and never takes a slot."""
    e = one_slot
    with live(create_app(e, ServeSettings(max_queue=8, timeout=60, max_tokens=2000))) as srv:
        with srv.client() as c:
            before = dict(e.stats)
            with c.stream("POST", "/qwen/generate",
                          json={"query": "kể chuyện dài", "stream": True, "max_tokens": 2000,
                                "temperature": 0.9, "seed": 1}) as r:
                lines = r.iter_lines()  # keep it: a dropped iterator closes the connection
                assert next(lines).startswith("event:")  # the slot is generating
                # a second client leaves once its request waits in the engine's queue
                assert hang_up_when(srv.url, "/qwen/generate", {"query": "chờ", "max_tokens": 8},
                                    lambda: e.depth == 2)
                # the queued job is cancelled while the stream still holds the slot
                assert wait_for(lambda: e.stats["cancelled"] == before["cancelled"] + 1)
                assert e.depth == 1 and e.stats["generate"] == before["generate"]
            assert wait_for(lambda: e.stats["cancelled"] == before["cancelled"] + 2)
            m = c.get("/metrics").text
            assert metric(m, "qwen_generations_cancelled_total", reason="disconnect") == 2
    assert_idle_and_clean(e)


def test_disconnect_during_prefill(one_slot):
    """A long prompt evaluated 4 tokens per step; the client leaves before the first token: the
    prefill stops part-way, no token is generated, the slot's cells are released."""
    e = one_slot
    products = [{"name": f"Áo khoác dạ dáng dài số {i}", "price": 1000 * i, "color": "xanh rêu đậm"}
                for i in range(40)]
    with live(create_app(e, ServeSettings(timeout=60))) as srv:
        job = e.generate_job("áo nào ấm?", "fashion", True, products, lambda *a: None)
        n_prompt = len(job.tokens)
        assert n_prompt > 550
        before = dict(e.stats)
        # the client leaves as soon as the prefill has begun
        assert hang_up_when(srv.url, "/qwen/generate",
                            {"query": "áo nào ấm?", "intent": "fashion", "products": products,
                             "max_tokens": 8},
                            lambda: e.stats["prompt_tokens"] > before["prompt_tokens"])
        assert wait_for(lambda: e.stats["cancelled"] == before["cancelled"] + 1)
        evaluated = e.stats["prompt_tokens"] - before["prompt_tokens"]
        assert e.stats["generated_tokens"] == before["generated_tokens"]
        assert 0 < evaluated < n_prompt, (evaluated, n_prompt)  # it was cut in the middle
        assert_idle_and_clean(e)


def test_disconnect_mid_stream_releases_the_slot(engine):
    with live(create_app(engine, ServeSettings(timeout=60))) as srv:
        with srv.client() as c:
            before = engine.stats["cancelled"]
            with c.stream("POST", "/qwen/generate",
                          json={"query": "viết dài", "stream": True, "max_tokens": 200,
                                "temperature": 0.9, "seed": 7}) as r:
                deltas = 0
                for line in r.iter_lines():
                    deltas += line.startswith("event: delta")
                    if deltas == 3:
                        break
            assert wait_for(lambda: engine.stats["cancelled"] == before + 1)
    assert_idle_and_clean(engine)


# ------------------------------------------------------------------------------- bursts
def test_burst_of_10x_max_queue_gets_only_200_or_503_and_recovers(engine):

    async def burst():
        limits = httpx.Limits(max_connections=None)
        async with httpx.AsyncClient(base_url=srv.url, timeout=60, limits=limits) as c:
            rs = await asyncio.gather(*(c.post("/qwen/intent", json={"query": f"áo số {i}"})
                                        for i in range(40)))
            after = await c.post("/qwen/intent", json={"query": "xin chào"})
            return [r.status_code for r in rs], [r.headers.get("retry-after") for r in rs], after

    with live(create_app(engine, ServeSettings(max_queue=4, timeout=60))) as srv:
        codes, retry, after = asyncio.run(burst())
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes and 200 in codes
        assert all(ra and int(ra) >= 1 for code, ra in zip(codes, retry) if code == 503)
        assert after.status_code == 200  # no back-off needed once the burst is answered
    assert_idle_and_clean(engine)


# ------------------------------------------------------------------------------- SIGTERM
@pytest.mark.slow
def test_sigterm_drains_in_flight_and_refuses_new(tiny_gguf, tmp_path):
    """`qwen-local serve` with one slot: a stream running and one queued behind it, then SIGTERM.
    New requests get 503 + Retry-After, both streams end with a done or error event (never a cut
    connection), and the process exits 143 within the grace period."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_local", "serve", "--model", str(tiny_gguf), "--port", str(port),
             "--threads", "1", "--slots", "1", "--ctx", "2048", "--grace", "2", "--log-level", "warning"],
            stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        assert wait_for(lambda: _up(url) or proc.poll() is not None, 60) and proc.poll() is None, \
            log.read_text()
        outcomes: list[str] = []
        started = threading.Event()

        def stream(i):
            last = None
            try:
                with httpx.stream("POST", f"{url}/qwen/generate", timeout=60,
                                  json={"query": "kể chuyện thật dài", "stream": True, "max_tokens": 200,
                                        "temperature": 0.9, "seed": i}) as r:
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            last = line[6:].strip()
                            started.set()
                outcomes.append(last)
            except httpx.HTTPError as e:
                outcomes.append(f"cut: {type(e).__name__}")

        threads = [threading.Thread(target=stream, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        assert started.wait(30)
        assert wait_for(lambda: httpx.get(f"{url}/health").json()["inflight"] == 2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert wait_for(lambda: httpx.get(f"{url}/health").json()["status"] == "draining")
        r = httpx.post(f"{url}/qwen/intent", json={"query": "xin chào"})
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]
        assert int(r.headers["Retry-After"]) >= 1
        for t in threads:
            t.join(60)
        assert sorted(outcomes) and all(o in ("done", "error") for o in outcomes), outcomes
        rc = proc.wait(timeout=30)
        assert rc == 143, log.read_text()
        assert time.monotonic() - t0 < 2 + 5 + 10  # grace + the cancel wait + slack
        assert "draining 2 request(s)" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _up(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# ------------------------------------------------------------------------------- broken GGUFs
@pytest.fixture(scope="module")
def broken_ggufs(tiny_gguf, tmp_path_factory):
    """A cut-off download at three depths, a file that is not a GGUF, and a whole GGUF whose
    architecture llama.cpp does not know (only llama.cpp itself can refuse that one)."""
    from qwen_local.runtime.gguf_file import read_header

    d = tmp_path_factory.mktemp("broken")
    data = tiny_gguf.read_bytes()
    h = read_header(tiny_gguf)
    key = b"general.architecture"
    at = data.index(key) + len(key) + 4 + 8  # value type (u32), string length (u64)
    assert data[at:at + 5] == b"qwen2"
    variants = {
        "empty": b"",
        "header_cut": data[:h.infos[0] // 2],
        "data_cut": data[:h.data_offset + (len(data) - h.data_offset) // 2],
        "not_gguf": b"PK\x03\x04" + bytes(range(256)) * 64,
        "bad_arch": data[:at] + b"qwenX" + data[at + 5:],
    }
    out = {}
    for name, blob in variants.items():
        (d / f"{name}.gguf").write_bytes(blob)
        out[name] = d / f"{name}.gguf"
    return out


def one_line_error(args: list[str], command: str) -> str:
    r = subprocess.run([sys.executable, "-m", "qwen_local", *args], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2, r.stderr
    # one error line, last; before it at most the command's own progress ("loading ..."), never
    # llama.cpp's log
    assert lines and lines[-1].startswith(f"qwen-local {command}: error:"), r.stderr
    assert sum("error" in line for line in lines) == 1, r.stderr
    assert not any(line.startswith(("llama", "gguf", "ggml")) for line in lines), r.stderr
    assert len(lines) <= 2, r.stderr
    return lines[-1]


@pytest.mark.parametrize("variant", ["empty", "header_cut", "data_cut", "not_gguf", "bad_arch"])
def test_serve_broken_gguf_is_one_line(broken_ggufs, variant):
    line = one_line_error(["serve", "--model", str(broken_ggufs[variant]), "--port", str(free_port())],
                          "serve")
    assert str(broken_ggufs[variant]) in line
    if variant == "data_cut":
        assert "truncated" in line
    if variant == "bad_arch":
        assert "qwenX" in line  # llama.cpp's own reason, folded into the line


@pytest.mark.parametrize("command", ["eval", "bench"])
@pytest.mark.parametrize("variant", ["data_cut", "bad_arch"])
def test_eval_and_bench_broken_gguf_is_one_line(broken_ggufs, command, variant):
    line = one_line_error([command, "--model", str(broken_ggufs[variant])], command)
    assert str(broken_ggufs[variant]) in line


def test_model_file_replaced_or_cut_under_a_running_server(tiny_gguf, tmp_path):
    """On the CPU the engine reads the GGUF into memory (no mmap): a deploy that replaces the file,
    or a copy that truncates it in place, cannot fault the running server (a mapped file cut under
    it would be a SIGBUS)."""
    import shutil

    path = tmp_path / "live.gguf"
    shutil.copyfile(tiny_gguf, path)
    e = Engine(path, threads=2, n_ctx=2048, slots=1, warmup=False)
    try:
        with live(create_app(e, ServeSettings())) as srv:
            with srv.client() as c:
                before = c.post("/qwen/intent", json={"query": "váy đỏ"}).json()
                with open(path, "r+b") as f:  # cut in place, as an interrupted copy would
                    f.truncate(1024)
                r = c.post("/qwen/intent", json={"query": "váy đỏ"})
                assert r.status_code == 200 and r.json()["probs"] == before["probs"]
                (tmp_path / "new.gguf").write_bytes(b"GGUF")
                os.replace(tmp_path / "new.gguf", path)  # replaced, as a deploy would
                g = c.post("/qwen/generate", json={"query": "chào", "max_tokens": 8, "temperature": 0})
                assert g.status_code == 200
                assert c.get("/health").json()["status"] == "ok"
    finally:
        e.close()
