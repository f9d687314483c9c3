"""convert.dev.bench: the conversion bench's goals on known runs, and its memory sampling of a child."""
from __future__ import annotations

import sys

import pytest

from qwen_local.convert.dev import bench as cbench

GiB = 1024 ** 3


def test_convert_goals_on_known_runs():
    runs = {"peft bf16": {"kind": "peft", "wall_s": 67.0, "peak_rss": 6.5 * GiB, "peak_anon_sampled": 6.4 * GiB},
            "peft f32": {"kind": "peft", "wall_s": 90.0, "peak_rss": 13 * GiB, "peak_anon_sampled": 12.9 * GiB},
            "ours": {"kind": "qwen-local", "wall_s": 190.0, "peak_rss": 1.6e9, "peak_anon_sampled": 1.2e9,
                     "timings": {"merge_export": 50.0, "quantize": 130.0}}}
    s = cbench.summarize(runs)
    assert s["quantize_s"] == 130.0
    assert s["vs"]["peft bf16"]["time"] == pytest.approx(190 / 67)
    assert s["vs"]["peft bf16"]["time_vs_merge_plus_quantize"] == pytest.approx(190 / 197)
    assert s["vs"]["peft f32"]["peak_anon"] == pytest.approx(1.2e9 / (12.9 * GiB))
    goals = {g["goal"]: g for g in s["goals"]}
    assert [g["verdict"] for g in s["goals"]] == ["PASS", "PASS"]
    assert goals["wall time <= fastest usual merge + quantization"]["limit"] == 197.0
    runs["ours"].update(wall_s=200.0, peak_anon_sampled=1.6e9)
    assert [g["verdict"] for g in cbench.summarize(runs)["goals"]] == ["MISS", "MISS"]
    # the gated conversion against the --no-verify one
    runs["gated"] = {"kind": "qwen-local verified", "wall_s": 380.0, "peak_rss": 3e9,
                     "peak_anon_sampled": 1.4e9}
    s = cbench.summarize(runs)
    assert [g["verdict"] for g in s["goals"]][2:] == ["PASS", "PASS"]
    assert s["verified_vs_no_verify"] == pytest.approx(1.9)
    runs["gated"].update(wall_s=401.0, peak_anon_sampled=1.51e9)
    assert [g["verdict"] for g in cbench.summarize(runs)["goals"]][2:] == ["MISS", "MISS"]
    # the default search against one checked candidate
    runs["default"] = {"kind": "qwen-local default", "wall_s": 780.0, "peak_rss": 3e9,
                       "peak_anon_sampled": 1.4e9}
    s = cbench.summarize(runs)
    assert s["default_vs_verified"] == pytest.approx(780 / 401)
    assert s["goals"][-1]["verdict"] == "PASS"
    runs["default"]["wall_s"] = 803.0
    assert cbench.summarize(runs)["goals"][-1]["verdict"] == "MISS"
    runs["gated"].update(wall_s=380.0, peak_anon_sampled=1.4e9)
    del runs["default"]
    s = cbench.summarize(runs)
    text = cbench.render({"meta": {"threads": 2, "base": "b", "adapter": "a", "load_avg_start": (0, 0, 0),
                                   "load_avg_end": (0, 0, 0)}, "runs": runs, "summary": s})
    assert "verified conversion wall time <= 2x --no-verify: measured 1.90x (limit 2.00x)" in text


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_measure_sees_a_child_allocation(tmp_path):
    code = "import time; b = bytearray(300 * 1024 * 1024); time.sleep(0.6)"
    r = cbench.measure([sys.executable, "-c", code], tmp_path / "log")
    assert r["exit_code"] == 0
    assert r["peak_anon_sampled"] > 250 * 1024 * 1024
    assert r["peak_rss_kernel"] >= r["peak_anon_sampled"] * 0.9
    assert r["samples"] >= 2
    r = cbench.measure([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "log2")
    assert r["exit_code"] == 3
