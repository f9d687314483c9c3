"""The bench's arithmetic: percentiles, summaries, ratios of one path to another, and the targets
each path is judged by."""
from __future__ import annotations

import math

from qwen_local.runtime.bench.cases import BATCH_SIZES


def percentile(values, q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between order statistics (numpy's default)."""
    xs = sorted(float(v) for v in values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} outside 0-100")
    k = (len(xs) - 1) * q / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(values) -> dict | None:
    values = [float(v) for v in values if v is not None]
    if not values:
        return None
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def ratio(a, b) -> float | None:
    """a / b, or None when either side is missing or b is not positive."""
    if a is None or b is None or b <= 0:
        return None
    return a / b


def p50(summary: dict | None) -> float | None:
    return None if summary is None else summary["p50"]


# Targets for the 3B shape at q4_k_m: (key, what, op, threshold)
TARGETS = [
    ("intent_speedup_vs_seed", "intent p50 at least 10x faster than the seed path", ">=", 10.0),
    ("intent_over_raw_prefill", "intent p50 at most 1.1x raw llama.cpp prefill of the uncached tokens",
     "<=", 1.1),
    ("decode_vs_raw", "decode tok/s at least 95% of raw llama.cpp", ">=", 0.95),
    ("batch4_vs_sequential", "batch intent throughput at 4 concurrent at least 1.5x sequential", ">=", 1.5),
    ("rss_over_gguf_plus_kv", "serving RSS at most 1.15x (GGUF size + KV cache)", "<=", 1.15),
]


def check_targets(ratios: dict) -> list[dict]:
    """PASS/MISS for each target from a path's ratios; a ratio that could not be measured is n/a."""
    out = []
    for key, what, op, threshold in TARGETS:
        value = ratios.get(key)
        if value is None:
            verdict = "n/a"
        elif op == ">=":
            verdict = "PASS" if value >= threshold else "MISS"
        else:
            verdict = "PASS" if value <= threshold else "MISS"
        out.append({"target": key, "what": what, "op": op, "threshold": threshold, "value": value,
                    "verdict": verdict})
    return out


def path_ratios(path: dict, seed: dict | None) -> dict:
    """The headline ratios of one qwen-local path (against raw llama.cpp, and the seed path if run)."""
    tput = path.get("batch_throughput_qps", {})
    r = {
        "intent_over_raw_prefill": ratio(p50(path.get("intent_warm_s")), p50(path.get("raw_prefill_s"))),
        "intent_cold_over_raw_prefill": ratio(p50(path.get("intent_cold_s")),
                                              p50(path.get("raw_prefill_cold_s"))),
        "decode_vs_raw": ratio(p50(path.get("decode_tps")), p50(path.get("raw_decode_tps"))),
        "batch4_vs_sequential": ratio(p50(tput.get("4")), p50(tput.get("1"))),
        "rss_over_gguf_plus_kv": ratio(path.get("memory", {}).get("rss"),
                                       (path.get("gguf_bytes") or 0) + (path.get("kv_cache_bytes") or 0)
                                       if path.get("gguf_bytes") else None),
    }
    for k in BATCH_SIZES[1:]:
        r[f"batch{k}_vs_sequential"] = ratio(p50(tput.get(str(k))), p50(tput.get("1")))
    if seed is not None:
        r["intent_speedup_vs_seed"] = ratio(p50(seed.get("intent_s")), p50(path.get("intent_warm_s")))
        r["intent_cold_speedup_vs_seed"] = ratio(p50(seed.get("intent_s")), p50(path.get("intent_cold_s")))
        r["ttft_speedup_vs_seed"] = ratio(p50(seed.get("ttft_s")), p50(path.get("ttft_s")))
        r["decode_speedup_vs_seed"] = ratio(p50(path.get("decode_tps")), p50(seed.get("decode_tps")))
        r["load_speedup_vs_seed"] = ratio(seed.get("load_s"), path.get("load_s"))
        r["rss_vs_seed"] = ratio(path.get("memory", {}).get("rss"), seed.get("memory", {}).get("rss"))
    else:
        r["intent_speedup_vs_seed"] = None
    return r
