"""qwen-local bench: the metric arithmetic on known inputs, and the commands end to end on tiny models.

The end-to-end tests assert behaviour (exit codes, JSON shape, every target judged), never timings:
on a tiny random model and a shared CI box the figures mean nothing.
"""
from __future__ import annotations

import json
import random
import sys

import numpy as np
import pytest

from convert import bench as cbench
from runtime import bench as B

GiB = 1024 ** 3


# ------------------------------------------------------------------------------------------ arithmetic
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


STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Pid:\t4242
VmPeak:\t 4000000 kB
VmSize:\t 3900000 kB
VmHWM:\t 3500000 kB
VmRSS:\t 3300000 kB
RssAnon:\t 1440000 kB
RssFile:\t 1850000 kB
RssShmem:\t   10000 kB
VmSwap:\t       0 kB
Threads:\t5
"""


def test_parse_status():
    st = B.parse_status(STATUS)
    assert st["VmRSS"] == 3300000 * 1024
    assert st["VmHWM"] == 3500000 * 1024
    assert st["RssAnon"] == 1440000 * 1024
    assert st["RssFile"] == 1850000 * 1024
    assert st["VmSwap"] == 0
    assert "Threads" not in st and "Pid" not in st
    assert B.parse_status("Name:\tzombie\nState:\tZ\n") == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_memory_snapshot_of_this_process():
    snap = B.memory_snapshot()
    assert snap["rss"] > 0 and 0 < snap["rss_anon"] <= snap["rss"] <= snap["peak_rss"]


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
    # issue 13: the gated conversion against the --no-verify one
    runs["gated"] = {"kind": "qwen-local verified", "wall_s": 380.0, "peak_rss": 3e9,
                     "peak_anon_sampled": 1.4e9}
    s = cbench.summarize(runs)
    assert [g["verdict"] for g in s["goals"]][2:] == ["PASS", "PASS"]
    assert s["verified_vs_no_verify"] == pytest.approx(1.9)
    runs["gated"].update(wall_s=401.0, peak_anon_sampled=1.51e9)
    assert [g["verdict"] for g in cbench.summarize(runs)["goals"]][2:] == ["MISS", "MISS"]
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


# ------------------------------------------------------------------------------------------ commands
def _run(argv, capsys):
    import qwen_local

    rc = qwen_local.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_bench_end_to_end_with_seed_baseline(tiny_gguf, tiny_base, tiny_adapter, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    rc, out, err = _run(["bench", "--model", str(tiny_gguf), "--reps", "1", "--threads", "2",
                         "--baseline-base", str(tiny_base), "--baseline-adapter", str(tiny_adapter),
                         "--json", str(out_json)], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert {"meta", "paths", "headline", "targets"} <= set(res)
    name = next(n for n in res["paths"] if n.startswith("qwen-local"))
    assert set(res["paths"]) == {"seed", name}
    q, seed = res["paths"][name], res["paths"]["seed"]
    for key in ("intent_warm_s", "intent_cold_s", "raw_prefill_s", "raw_prefill_cold_s", "ttft_s",
                "decode_tps", "raw_decode_tps"):
        assert q[key]["n"] >= 1 and q[key]["p50"] > 0, key
    assert set(q["batch_throughput_qps"]) == {"1", "2", "4", "8"}
    assert all(v["p50"] > 0 for v in q["batch_throughput_qps"].values())
    assert q["memory"]["rss"] > 0 and q["memory"]["rss_anon"] > 0
    assert q["gguf_bytes"] == tiny_gguf.stat().st_size and q["kv_cache_bytes"] > 0
    assert q["uncached_tokens"]["min"] > 5                       # the query + the 5-token tail
    assert q["intent_prefix_tokens"] > 50                        # the cached system prompt
    assert seed["intent_s"]["n"] == len(B.INTENT_QUERIES) and seed["load_s"] > 0
    assert seed["reply_tokens"] == [B.REPLY_TOKENS]              # min_new_tokens forces the full length
    assert seed["memory"]["rss"] > 0
    # the same prompts: HF's tokenization of the seed's text = the engine's cached prefix + the rest
    for k in ("min", "max"):
        assert seed["intent_prompt_tokens"][k] == q["intent_prefix_tokens"] + q["uncached_tokens"][k]
    targets = res["targets"][name]
    assert [t["target"] for t in targets] == [k for k, *_ in B.TARGETS]
    assert all(t["verdict"] in ("PASS", "MISS") for t in targets)   # everything measurable was measured
    assert all(t["value"] is not None for t in targets)
    assert set(res["headline"][name]) >= {k for k, *_ in B.TARGETS}
    for t in targets:
        assert f"{t['verdict']:<4}  {name}: {t['what']}" in out
    assert "Headline ratios" in out and f"JSON: {out_json}" in out


def test_bench_two_models_without_baseline(tiny_gguf, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    rc, out, err = _run(["bench", "--model", str(tiny_gguf), "--model2", str(tiny_gguf), "--reps", "1",
                         "--json", str(out_json)], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert len(res["paths"]) == 2 and "seed" not in res["paths"]
    for name in res["paths"]:
        v = {t["target"]: t["verdict"] for t in res["targets"][name]}
        assert v["intent_speedup_vs_seed"] == "n/a"
    assert "n/a" in out


def test_bench_user_errors(tmp_path, tiny_gguf, capsys):
    rc, _, err = _run(["bench", "--model", str(tmp_path / "missing.gguf")], capsys)
    assert rc == 2 and "no such GGUF" in err and "Traceback" not in err
    rc, _, err = _run(["bench", "--model", str(tiny_gguf), "--baseline-base", str(tmp_path)], capsys)
    assert rc == 2 and "go together" in err
    rc, _, err = _run(["bench", "--model", str(tiny_gguf), "--baseline-base", str(tmp_path),
                       "--baseline-adapter", str(tmp_path)], capsys)
    assert rc == 2 and "adapter_config.json" in err


def test_make_model_tiny(tmp_path, qwen_tokenizer_dir, capsys):
    out = tmp_path / "m"
    rc, _, err = _run(["bench", "make-model", "--shape", "tiny", "--out", str(out), "--adapter-rank", "4",
                       "--tokenizer-cache", str(qwen_tokenizer_dir)], capsys)
    assert rc == 0, err
    cfg = json.loads((out / "base" / "config.json").read_text())
    assert cfg["hidden_size"] == 256 and cfg["vocab_size"] == 151936 and cfg["tie_word_embeddings"]
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"
    assert (out / "base" / "tokenizer.json").is_file()
    acfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert acfg["r"] == 4 and set(acfg["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    rc, _, err = _run(["bench", "make-model", "--shape", "tiny", "--out", str(out)], capsys)
    assert rc == 2 and "already holds" in err


def test_convert_bench_end_to_end(tiny_base, tiny_adapter, tmp_path, capsys):
    out_json = tmp_path / "c.json"
    rc, out, err = _run(["bench", "convert", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
                         "--threads", "2", "--workdir", str(tmp_path), "--json", str(out_json)], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    kinds = sorted(r["kind"] for r in res["runs"].values())
    assert kinds == ["peft", "qwen-local", "qwen-local verified"]
    for r in res["runs"].values():
        assert r["exit_code"] == 0 and r["peak_rss"] > 0 and r["peak_anon_sampled"] > 0
        assert r["output_bytes"] > 0
    ours = next(r for r in res["runs"].values() if r["kind"] == "qwen-local")
    assert ours["timings"]["quantize"] >= 0
    assert [g["verdict"] in ("PASS", "MISS") for g in res["summary"]["goals"]] == [True] * 4
    assert "peak anonymous RSS" in out and "x --no-verify" in out
    gated = next(r for r in res["runs"].values() if r["kind"] == "qwen-local verified")
    assert gated["timings"]["reference_passes"] >= 0 and 0 <= gated["agreement"] <= 1
    assert list(tmp_path.glob("qwen-local-convert-bench-*")) == []   # outputs removed without --keep
