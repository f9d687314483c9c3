"""`qwen-local bench soak`, the 60-second version on the tiny model: the real server as a process,
the seeded mix (intents, batches, JSON and streamed replies, dropped streams, malformed requests,
bursts of 10x --max-queue), a fallback that hangs, answers garbage or drops the connection, then
SIGTERM with streams in flight. Same invariants as the long run."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp")


def test_soak_one_minute_invariants(tiny_gguf, tmp_path):
    from qwen_local.runtime.bench.soak_cli import render, run

    out = tmp_path / "soak.json"
    r = run(["--model", str(tiny_gguf), "--minutes", "1", "--concurrency", "4", "--threads", "2",
             "--ctx", "4096", "--sample-every", "2", "--seed", "1", "--fallback-faults",
             "--fallback-timeout", "1", "--json", str(out)],
            log=lambda m: None)
    report = render(r)
    assert json.loads(out.read_text())["checks"] == r["checks"]
    assert r["n_unexpected_5xx"] == 0 and r["checks"]["no_5xx"], report
    assert r["checks"]["kv_idle"] and r["kv_idle"]["slots"] == {}, report
    assert r["kv_idle"]["prefix"] == r["cached_prefix_tokens"], report
    assert r["dropped_streams"] > 0 and r["checks"]["cancelled"], report
    assert r["checks"]["bursts"] and len(r["bursts"]) >= 2, report
    # the burst overflow went to the failing fallback: only the documented 502/504, in time
    assert r["fallback_errors"] and set(r["fallback_errors"]) <= {"502", "504"}, report
    assert r["checks"]["bounded"], report
    assert r["checks"]["rss_drift"], report
    assert r["checks"]["sigterm"] and r["sigterm"]["exit_code"] == 143, report
    seen = r["requests_by_status"]
    for endpoint in ("intent", "batch", "generate", "stream", "malformed"):
        assert seen.get(endpoint), (endpoint, report)
    assert set(seen["malformed"]) <= {"413", "422"}, report
    assert {"intent", "batch", "generate", "stream"} <= set(r["latency"]), report
    assert r["passed"], report
