"""runtime.bench.stats: percentiles, summaries, ratios and the targets, on known inputs."""
from __future__ import annotations

import random

import numpy as np
import pytest

from qwen_local.runtime.bench import stats as B

GiB = 1024 ** 3


def test_percentile_known_values():
    assert B.percentile([1, 2, 3, 4], 50) == 2.5
    assert B.percentile([4, 1, 3, 2], 0) == 1
    assert B.percentile([4, 1, 3, 2], 100) == 4
    assert B.percentile(range(1, 101), 95) == pytest.approx(95.05)
    assert B.percentile([7.0], 95) == 7.0
    rng = random.Random(0)
    xs = [rng.random() for _ in range(37)]
    for q in (5, 50, 95, 99):
        assert B.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    with pytest.raises(ValueError):
        B.percentile([], 50)
    with pytest.raises(ValueError):
        B.percentile([1], 101)


def test_summarize_and_ratio():
    s = B.summarize([3, 1, 2, None])
    assert s == {"n": 3, "p50": 2.0, "p95": pytest.approx(2.9), "mean": 2.0, "min": 1.0, "max": 3.0}
    assert B.summarize([]) is None and B.summarize([None]) is None
    assert B.ratio(3, 2) == 1.5
    assert B.ratio(None, 2) is None and B.ratio(1, None) is None and B.ratio(1, 0) is None


def _summ(v):
    return B.summarize([v])


def _path(**over):
    p = {"kind": "qwen-local", "intent_warm_s": _summ(1.0), "raw_prefill_s": _summ(0.9),
         "intent_cold_s": _summ(5.0), "raw_prefill_cold_s": _summ(4.0),
         "decode_tps": _summ(9.5), "raw_decode_tps": _summ(10.0),
         "batch_throughput_qps": {"1": _summ(2.0), "2": _summ(2.5), "4": _summ(3.0), "8": _summ(3.2)},
         "memory": {"rss": 2.3 * GiB}, "gguf_bytes": 1.75 * GiB, "kv_cache_bytes": 0.25 * GiB,
         "ttft_s": _summ(2.0), "load_s": 3.0}
    p.update(over)
    return p


def test_path_ratios_and_targets_on_known_inputs():
    seed = {"intent_s": _summ(10.0), "ttft_s": _summ(20.0), "decode_tps": _summ(1.0), "load_s": 24.0,
            "memory": {"rss": 12.0 * GiB}}
    r = B.path_ratios(_path(), seed)
    assert r["intent_over_raw_prefill"] == pytest.approx(1 / 0.9)
    assert r["intent_cold_over_raw_prefill"] == pytest.approx(1.25)
    assert r["decode_vs_raw"] == pytest.approx(0.95)
    assert r["batch4_vs_sequential"] == pytest.approx(1.5)
    assert r["batch8_vs_sequential"] == pytest.approx(1.6)
    assert r["rss_over_gguf_plus_kv"] == pytest.approx(2.3 / 2.0, rel=1e-6)
    assert r["intent_speedup_vs_seed"] == pytest.approx(10.0)
    assert r["ttft_speedup_vs_seed"] == pytest.approx(10.0)
    assert r["decode_speedup_vs_seed"] == pytest.approx(9.5)
    assert r["load_speedup_vs_seed"] == pytest.approx(8.0)
    verdicts = {t["target"]: t["verdict"] for t in B.check_targets(r)}
    # boundaries count as met: 10x, 0.95, 1.5x; 1.11 > 1.1 misses; 1.15 is met (the ratio is 1.15)
    assert verdicts == {"intent_speedup_vs_seed": "PASS", "intent_over_raw_prefill": "MISS",
                        "decode_vs_raw": "PASS", "batch4_vs_sequential": "PASS",
                        "rss_over_gguf_plus_kv": "PASS"}


def test_targets_miss_and_not_measured():
    r = B.path_ratios(_path(decode_tps=_summ(9.0), memory={"rss": 3.0 * GiB},
                            batch_throughput_qps={"1": _summ(2.0), "4": _summ(2.9)}), None)
    t = {x["target"]: x for x in B.check_targets(r)}
    assert t["intent_speedup_vs_seed"]["verdict"] == "n/a"      # no seed path run
    assert t["intent_speedup_vs_seed"]["value"] is None
    assert t["decode_vs_raw"]["verdict"] == "MISS" and t["decode_vs_raw"]["value"] == pytest.approx(0.9)
    assert t["batch4_vs_sequential"]["verdict"] == "MISS"
    assert t["rss_over_gguf_plus_kv"]["verdict"] == "MISS"
    assert r["batch2_vs_sequential"] is None                     # not measured, not zero
    r = B.path_ratios(_path(raw_prefill_s=None), None)
    assert {x["target"]: x["verdict"] for x in B.check_targets(r)}["intent_over_raw_prefill"] == "n/a"
