"""qwen-local bench: the commands end to end on tiny models (serving, make-model, convert).

The end-to-end tests assert behaviour (exit codes, JSON shape, every target judged), never timings:
on a tiny random model and a shared CI box the figures mean nothing.
"""
from __future__ import annotations

import json

import pytest

from qwen_local.runtime.bench.cases import INTENT_QUERIES, REPLY_TOKENS
from qwen_local.runtime.bench.stats import TARGETS


def _run(argv, capsys):
    import qwen_local

    rc = qwen_local.main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.slow
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
    assert seed["intent_s"]["n"] == len(INTENT_QUERIES) and seed["load_s"] > 0
    assert seed["reply_tokens"] == [REPLY_TOKENS]              # min_new_tokens forces the full length
    assert seed["memory"]["rss"] > 0
    # the same prompts: HF's tokenization of the seed's text = the engine's cached prefix + the rest
    for k in ("min", "max"):
        assert seed["intent_prompt_tokens"][k] == q["intent_prefix_tokens"] + q["uncached_tokens"][k]
    targets = res["targets"][name]
    assert [t["target"] for t in targets] == [k for k, *_ in TARGETS]
    # every target judged on the ratio of the samples this run took (never on a constant)
    want = {"intent_speedup_vs_seed": seed["intent_s"]["p50"] / q["intent_warm_s"]["p50"],
            "intent_over_raw_prefill": q["intent_warm_s"]["p50"] / q["raw_prefill_s"]["p50"],
            "decode_vs_raw": q["decode_tps"]["p50"] / q["raw_decode_tps"]["p50"],
            "batch4_vs_sequential": (q["batch_throughput_qps"]["4"]["p50"]
                                     / q["batch_throughput_qps"]["1"]["p50"]),
            "rss_over_gguf_plus_kv": q["memory"]["rss"] / (q["gguf_bytes"] + q["kv_cache_bytes"])}
    for t in targets:
        assert t["value"] == pytest.approx(want[t["target"]], rel=1e-9), t
        met = t["value"] >= t["threshold"] if t["op"] == ">=" else t["value"] <= t["threshold"]
        assert t["verdict"] == ("PASS" if met else "MISS"), t
    assert set(res["headline"][name]) >= {k for k, *_ in TARGETS}
    for t in targets:
        assert f"{t['verdict']:<4}  {name}: {t['what']}" in out
    assert "Headline ratios" in out and f"JSON: {out_json}" in out


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_convert_bench_end_to_end(tiny_base, tiny_adapter, tmp_path, capsys):
    out_json = tmp_path / "c.json"
    rc, out, err = _run(["bench", "convert", "--base", str(tiny_base), "--adapter", str(tiny_adapter),
                         "--threads", "2", "--workdir", str(tmp_path), "--json", str(out_json)], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    kinds = sorted(r["kind"] for r in res["runs"].values())
    assert kinds == ["peft", "qwen-local", "qwen-local default", "qwen-local verified"]
    for r in res["runs"].values():
        assert r["exit_code"] == 0 and r["peak_rss"] > 0 and r["peak_anon_sampled"] > 0
        assert r["output_bytes"] > 0
    ours = next(r for r in res["runs"].values() if r["kind"] == "qwen-local")
    assert 0 < ours["timings"]["quantize"] < ours["wall_s"]
    # every goal judged on this run's own figures
    runs = {r["kind"]: r for r in res["runs"].values()}
    verified, default = runs["qwen-local verified"], runs["qwen-local default"]
    values = {
        "wall time <= fastest usual merge + quantization": ours["wall_s"],
        "peak anonymous RSS of qwen-local convert <= 1.5 GB": ours["peak_anon_sampled"],
        "peak anonymous RSS of the verified conversion <= 1.5 GB": verified["peak_anon_sampled"],
        "verified conversion wall time <= 2x --no-verify": verified["wall_s"] / ours["wall_s"],
        "default conversion wall time <= 2x the verified --quant one":
            default["wall_s"] / verified["wall_s"],
    }
    goals = res["summary"]["goals"]
    assert {g["goal"] for g in goals} == set(values)
    for g in goals:
        assert g["value"] == pytest.approx(values[g["goal"]], rel=1e-9), g
        assert g["verdict"] == ("PASS" if g["value"] <= g["limit"] else "MISS"), g
    assert "peak anonymous RSS" in out and "x --no-verify" in out
    gated = next(r for r in res["runs"].values() if r["kind"] == "qwen-local verified")
    assert gated["timings"]["reference_passes"] >= 0 and 0 <= gated["agreement"] <= 1
    assert list(tmp_path.glob("qwen-local-convert-bench-*")) == []   # outputs removed without --keep


@pytest.mark.slow
def test_bench_replicas_end_to_end(tiny_gguf, tmp_path, capsys, monkeypatch):
    """Two replicas, round-robin, then a burst on one whose overflow falls back to the other over
    /v1/completions: every request answered, every answer counted by where it came from. The model
    is named relative to the caller's folder, as a user types it (the replicas run elsewhere)."""
    out_json = tmp_path / "replicas.json"
    monkeypatch.chdir(tiny_gguf.parent)
    rc, out, err = _run(["bench", "replicas", "--model", tiny_gguf.name, "--requests", "12",
                         "--concurrency", "3", "--threads", "1", "--burst", "12", "--max-queue", "1",
                         "--log-dir", str(tmp_path), "--json", str(out_json)], capsys)
    assert rc == 0, err
    res = json.loads(out_json.read_text())
    assert json.loads(out) == res
    for key, replicas in (("one_replica", 1), ("round_robin", 2)):
        run = res[key]
        assert run["replicas"] == replicas and run["status"] == {"200": 12} and run["source"] == {"local": 12}
        assert run["requests_per_s"] > 0 and run["p95_s"] >= run["p50_s"] > 0
    burst = res["burst"]
    assert burst["status"] == {"200": 12} and sum(burst["source"].values()) == 12
    assert set(burst["source"]) <= {"local", "fallback"} and burst["max_queue"] == 1
    assert abs(sum(burst["share"].values()) - 1) < 1e-9
