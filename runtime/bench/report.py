"""The serving bench's text report: one column per path, then the headline ratios and the targets."""
from __future__ import annotations

from qwen_local.runtime.bench.cases import BATCH_SIZES, REPLY_TOKENS
from qwen_local.runtime.bench.memory import GB
from qwen_local.runtime.bench.stats import p50


def _f(v, fmt="{:.3g}", none="-"):
    return none if v is None else fmt.format(v)


def _sub(a, b):
    return None if a is None or b is None else a - b


def gb(v):
    return "-" if v is None else f"{v / GB:.2f}"


def render(result: dict) -> str:
    paths = result["paths"]
    names = list(paths)
    rows = []

    def row(label, fn):
        rows.append([label] + [fn(paths[n]) for n in names])

    def s50(key):
        return lambda p: _f(p50(p.get(key)))

    def s95(key):
        return lambda p: _f(None if p.get(key) is None else p[key]["p95"])

    row("load, s", lambda p: _f(p.get("load_s")))
    row("RSS serving, GiB", lambda p: gb(p.get("memory", {}).get("rss")))
    row("  anonymous, GiB", lambda p: gb(p.get("memory", {}).get("rss_anon")))
    row("  file-backed (mmap), GB", lambda p: gb(p.get("memory", {}).get("rss_file")))
    row("  added by load + first requests, GB",
        lambda p: gb(_sub(p.get("memory", {}).get("rss"), p.get("memory_before_load", {}).get("rss"))))
    row("  peak (whole run), GB", lambda p: gb(p.get("peak_rss")))
    row("GGUF + KV cache, GB", lambda p: gb((p.get("gguf_bytes") or 0) + (p.get("kv_cache_bytes") or 0))
        if p["kind"] != "seed" else "-")
    row("intent p50 warm, s", lambda p: _f(p50(p.get("intent_warm_s" if p["kind"] != "seed" else "intent_s"))))
    row("intent p95 warm, s", lambda p: s95("intent_warm_s" if p["kind"] != "seed" else "intent_s")(p))
    row("intent p50 cold, s", s50("intent_cold_s"))
    row("intent p95 cold, s", s95("intent_cold_s"))
    row("raw prefill p50 (same tokens), s", s50("raw_prefill_s"))
    row("raw prefill p50 cold, s", s50("raw_prefill_cold_s"))
    for k in BATCH_SIZES:
        row(f"batch intent @{k}, queries/s",
            lambda p, k=k: _f(p50(p.get("batch_throughput_qps", {}).get(str(k)))))
    row("reply TTFT p50, s", s50("ttft_s"))
    row(f"reply decode, tok/s ({REPLY_TOKENS} tok)", s50("decode_tps"))
    row("raw llama.cpp decode, tok/s", s50("raw_decode_tps"))
    m = result["meta"]
    q = [paths[n] for n in names if paths[n]["kind"] != "seed"]
    unc = q[0].get("uncached_tokens") if q else None
    head = (f"qwen-local bench: {m['threads']} threads on {m['cpu']} ({m['cores']} cores), {m['reps']} rounds x "
            f"{m['intent_prompts']} intent prompts"
            + (f" (cached system prefix {q[0].get('intent_prefix_tokens')} tokens, "
               f"{unc['min']:.0f}-{unc['max']:.0f} uncached)" if unc else "")
            + f", {m['reply_tokens']}-token replies; engine ctx {m.get('n_ctx')}, {m.get('slots')} slots; "
            f"load average {_loadavg(m.get('load_avg_start'))} at start, {_loadavg(m.get('load_avg_end'))} at end")
    out = [head, "", table(["", *names], rows)]

    ratio_rows = []
    labels = [("intent_speedup_vs_seed", "intent p50: seed / qwen-local (warm)", "x"),
              ("intent_cold_speedup_vs_seed", "intent p50: seed / qwen-local (cold)", "x"),
              ("ttft_speedup_vs_seed", "reply TTFT: seed / qwen-local", "x"),
              ("decode_speedup_vs_seed", "decode tok/s: qwen-local / seed", "x"),
              ("load_speedup_vs_seed", "load: seed / qwen-local", "x"),
              ("rss_vs_seed", "RSS: qwen-local / seed", "x"),
              ("intent_over_raw_prefill", "intent warm / raw prefill", "x"),
              ("intent_cold_over_raw_prefill", "intent cold / raw prefill cold", "x"),
              ("decode_vs_raw", "decode / raw llama.cpp decode", "x"),
              ("batch2_vs_sequential", "batch throughput @2 / @1", "x"),
              ("batch4_vs_sequential", "batch throughput @4 / @1", "x"),
              ("batch8_vs_sequential", "batch throughput @8 / @1", "x"),
              ("rss_over_gguf_plus_kv", "RSS / (GGUF + KV cache)", "x")]
    qnames = [n for n in names if paths[n]["kind"] != "seed"]
    for key, label, unit in labels:
        vals = [paths[n]["ratios"].get(key) for n in qnames]
        if all(v is None for v in vals):
            continue
        ratio_rows.append([label] + [_f(v, "{:.2f}" + unit) for v in vals])
    out.append("\nHeadline ratios\n" + table(["", *qnames], ratio_rows))

    out.append("\nTargets (stated for the 3B shape at q4_k_m)")
    for n in qnames:
        for t in paths[n]["targets"]:
            v = _f(t["value"], "{:.2f}")
            out.append(f"  {t['verdict']:<4}  {n}: {t['what']} ({t['op']} {t['threshold']:g}): measured {v}")
    return "\n".join(out)


def _loadavg(v) -> str:
    return "-" if not v else f"{v[0]:.1f}"


def table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
