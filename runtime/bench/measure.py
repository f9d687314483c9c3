"""The serving measurement: every path in its own worker process, requests sent one at a time and
alternated path by path (order flipped every round), so that drift on the machine hits all of them."""
from __future__ import annotations

import os
import platform
import tempfile
import time
from pathlib import Path

from qwen_local.runtime.bench.cases import BATCH_SIZES, INTENT_QUERIES, REPLY_CASES, REPLY_TOKENS
from qwen_local.runtime.bench.memory import GB, parse_status
from qwen_local.runtime.bench.process import Worker
from qwen_local.runtime.bench.stats import check_targets, path_ratios, summarize


def _quant_name(path: str) -> str:
    stem = Path(path).name.lower()
    for q in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "bf16", "f16", "f32"):
        if q in stem:
            return q
    return Path(path).stem


def run(models: list[str], baseline: tuple[str, str] | None, reps: int, baseline_reps: int,
        threads: int, *, n_ctx: int = 8192, slots: int = 4, temperature: float = 0.7,
        flash_attn: tuple[bool, ...] = (False,), log=print) -> dict:
    """flash_attn: each model is measured once per setting given (as serve --flash-attn)."""
    log_dir = Path(tempfile.mkdtemp(prefix="qwen-local-bench-"))
    workers: dict[str, Worker] = {}
    names, runs = [], []
    for m in models:
        for fa in flash_attn:
            name = f"qwen-local {_quant_name(m)}" + (f" fa-{'on' if fa else 'off'}"
                                                     if len(flash_attn) > 1 else "")
            while name in names:
                name += "'"
            names.append(name)
            runs.append((m, fa))
    result = {"meta": dict(_meta(threads, reps, baseline_reps), n_ctx=n_ctx, slots=slots,
                           temperature=temperature),
              "paths": {}, "log_dir": str(log_dir)}
    seed = None
    try:
        # the seed loads first: its load peak is the largest, and it should not coincide with others
        _memory_warning([m for m, _ in runs], baseline, log)
        if baseline:
            log(f"loading the seed path (transformers float32 + PeftModel) from {baseline[0]} ...")
            seed = Worker("seed", {"kind": "seed", "base": baseline[0], "adapter": baseline[1],
                                   "threads": threads}, log_dir,
                          env={"OMP_WAIT_POLICY": "PASSIVE"})  # idle torch threads must not spin
            result["paths"]["seed"] = dict(kind="seed", base=baseline[0], adapter=baseline[1],
                                           load_s=seed.ready["load_s"], memory=seed.ready["memory"],
                                           memory_before_load=seed.ready["memory_before_load"])
        for name, (m, fa) in zip(names, runs):
            log(f"loading {name} ({m}) ...")
            w = Worker(name, {"kind": "llama", "model": m, "threads": threads, "n_ctx": n_ctx,
                              "slots": slots, "temperature": temperature, "flash_attn": fa},
                       log_dir)
            workers[name] = w
            r = w.ready
            result["paths"][name] = dict(kind="qwen-local", model=str(m), quant=_quant_name(m),
                                         engine=r["engine"], load_s=r["load_s"], memory=r["memory"],
                                         memory_before_load=r["memory_before_load"],
                                         memory_after_load=r["memory_after_load"],
                                         gguf_bytes=r["gguf_bytes"], kv_cache_bytes=r["kv_cache_bytes"],
                                         intent_prefix_tokens=r["intent_prefix_tokens"])
        samples = _interleave(workers, seed, reps, baseline_reps, log)
    finally:
        for w in workers.values():
            w.close()
        if seed is not None:
            seed.close()
    _fold(result, samples, names)
    result["meta"]["load_avg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result["headline"] = {n: result["paths"][n]["ratios"] for n in names}
    result["targets"] = {n: result["paths"][n]["targets"] for n in names}
    return result


def _memory_warning(models, baseline, log) -> None:
    """Say so up front when the paths will not fit in RAM together (they are all loaded at once)."""
    try:
        avail = parse_status(Path("/proc/meminfo").read_text().replace("MemAvailable", "VmRSS")).get("VmRSS")
    except OSError:
        return
    need = sum(2.2 * os.path.getsize(m) for m in models)  # file pages + repacked weights, roughly
    if baseline:  # float32 weights, whatever the checkpoint's dtype; loading peaks ~1.5x
        st = list(Path(baseline[0]).glob("*.safetensors"))
        cfg = Path(baseline[0]) / "config.json"
        text = cfg.read_text() if cfg.is_file() else ""
        width = 2 if ('"bfloat16"' in text or '"float16"' in text) else 4
        need += 1.5 * sum(f.stat().st_size for f in st) * 4 / width
    if avail and need > avail:
        log(f"warning: these paths may need ~{need / GB:.1f} GiB together and {avail / GB:.1f} GiB is "
            "available; run the GGUFs one at a time or without the baseline if the machine swaps")


class _Samples:
    """The measurements of every path, as lists per key."""

    def __init__(self, names):
        self.by_path: dict = {name: {} for name in names}
        self.by_path["seed"] = {}
        self._last = None

    def add(self, path: str, key: str, value) -> None:
        self.by_path[path].setdefault(key, []).append(value)

    def settle(self, who: str) -> None:
        """Let the previous path's threads go idle before another one starts."""
        if self._last is not None and self._last != who:
            time.sleep(0.02)
        self._last = who


def _seed_schedule(n: int, reps: int, baseline_reps: int) -> tuple[dict, set]:
    """Seed samples: each of the n prompts baseline_reps times, spread over the rounds. Returns how
    many times the seed asks prompt i in round r, and the rounds in which it also replies."""
    seed_slots: dict = {}
    stride = max(1, reps // max(1, baseline_reps))
    for i in range(n):
        for k in range(baseline_reps):
            r = (i + k * stride) % reps
            seed_slots[(r, i)] = seed_slots.get((r, i), 0) + 1
    return seed_slots, {(k * stride) % reps for k in range(baseline_reps)}


def _intent_steps(sm: _Samples, name: str, w, r: int, i: int) -> None:
    """One prompt on one path: warm intent and raw prefill, and cold for a quarter of the prompts."""
    steps = [("intent", dict(i=i)), ("raw_prefill", dict(i=i))]
    if r % 2:
        steps.reverse()
    for op, kw in steps:
        sm.settle(name)
        res = w.call(op, **kw)
        sm.add(name, "intent_warm_s" if op == "intent" else "raw_prefill_s", res["s"])
        if op == "raw_prefill":
            sm.add(name, "uncached_tokens", res["tokens"])
    if i % 4 == r % 4:  # cold: a quarter of the prompts each round (it is slow)
        for op in (["intent", "raw_prefill"] if r % 2 == 0 else ["raw_prefill", "intent"]):
            sm.settle(name)
            res = w.call(op, i=i, cold=True)
            sm.add(name, "intent_cold_s" if op == "intent" else "raw_prefill_cold_s", res["s"])


def _intent_round(sm: _Samples, workers: dict, seed, order: list, r: int, seed_slots: dict) -> None:
    for i in range(len(INTENT_QUERIES)):
        for name in order:
            _intent_steps(sm, name, workers[name], r, i)
        for _ in range(seed_slots.get((r, i), 0) if seed else 0):
            sm.settle("seed")
            res = seed.call("intent", i=i)
            sm.add("seed", "intent_s", res["s"])
            sm.add("seed", "prompt_tokens", res["tokens"])


def _batch_round(sm: _Samples, workers: dict, order: list, r: int) -> None:
    for k in BATCH_SIZES:
        for name in order:
            sm.settle(name)
            res = workers[name].call("batch", start=r + k, k=k)
            sm.add(name, f"batch{k}_qps", res["qps"])


def _reply_round(sm: _Samples, workers: dict, seed, order: list, r: int, seed_replies: bool) -> None:
    case = r % len(REPLY_CASES)
    for name in order:
        steps = [("generate", "gen"), ("raw_generate", "raw")]
        if r % 2:
            steps.reverse()
        for op, tag in steps:
            sm.settle(name)
            res = workers[name].call(op, i=case, n=REPLY_TOKENS, seed=r)
            sm.add(name, f"{tag}_ttft_s", res["ttft_s"])
            sm.add(name, f"{tag}_decode_tps", res["decode_tps"])
            sm.add(name, f"{tag}_tokens", res["tokens"])
    if seed and seed_replies:
        sm.settle("seed")
        res = seed.call("generate", i=case, n=REPLY_TOKENS)
        sm.add("seed", "ttft_s", res["ttft_s"])
        sm.add("seed", "decode_tps", res["decode_tps"])
        sm.add("seed", "tokens", res["tokens"])


def _interleave(workers: dict, seed, reps: int, baseline_reps: int, log) -> dict:
    """All measurements, path after path within each request, order flipped every round."""
    sm = _Samples(workers)
    seed_slots, seed_gen_rounds = _seed_schedule(len(INTENT_QUERIES), reps, baseline_reps)
    t_start = time.perf_counter()
    for r in range(reps):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        _intent_round(sm, workers, seed, order, r, seed_slots)
        _batch_round(sm, workers, order, r)
        _reply_round(sm, workers, seed, order, r, r in seed_gen_rounds)
        log(f"  round {r + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s)")
    for name, w in workers.items():
        sm.by_path[name]["memory_end"] = w.call("memory")
    if seed:
        sm.by_path["seed"]["memory_end"] = seed.call("memory")
    return sm.by_path


def _fold(result: dict, samples: dict, names: list[str]) -> None:
    seed = result["paths"].get("seed")
    if seed is not None:
        sm = samples["seed"]
        seed.update(intent_s=summarize(sm.get("intent_s", [])), ttft_s=summarize(sm.get("ttft_s", [])),
                    decode_tps=summarize(sm.get("decode_tps", [])), reply_tokens=sm.get("tokens"),
                    intent_prompt_tokens=summarize(sm.get("prompt_tokens", [])),
                    peak_rss=sm.get("memory_end", {}).get("peak_rss"))
    for name in names:
        path, sm = result["paths"][name], samples[name]
        path.update(
            intent_warm_s=summarize(sm.get("intent_warm_s", [])),
            intent_cold_s=summarize(sm.get("intent_cold_s", [])),
            raw_prefill_s=summarize(sm.get("raw_prefill_s", [])),
            raw_prefill_cold_s=summarize(sm.get("raw_prefill_cold_s", [])),
            uncached_tokens=summarize(sm.get("uncached_tokens", [])),
            batch_throughput_qps={str(k): summarize(sm.get(f"batch{k}_qps", [])) for k in BATCH_SIZES},
            ttft_s=summarize(sm.get("gen_ttft_s", [])), decode_tps=summarize(sm.get("gen_decode_tps", [])),
            reply_tokens=sm.get("gen_tokens"),
            raw_ttft_s=summarize(sm.get("raw_ttft_s", [])),
            raw_decode_tps=summarize(sm.get("raw_decode_tps", [])),
            peak_rss=sm.get("memory_end", {}).get("peak_rss"),
        )
        path["ratios"] = path_ratios(path, seed)
        path["targets"] = check_targets(path["ratios"])


def _version():
    from qwen_local.runtime.errors import __version__
    return __version__


def _meta(threads: int, reps: int, baseline_reps: int) -> dict:
    import importlib.metadata as md

    def ver(pkg):
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "cpu": cpu, "cores": os.cpu_count(),
            "threads": threads, "reps": reps, "baseline_reps": baseline_reps, "python": platform.python_version(),
            "llama_cpp_python": ver("llama-cpp-python"), "torch": ver("torch"),
            "transformers": ver("transformers"), "peft": ver("peft"), "qwen_local": _version(),
            "intent_prompts": len(INTENT_QUERIES), "reply_tokens": REPLY_TOKENS,
            "load_avg_start": os.getloadavg() if hasattr(os, "getloadavg") else None}
