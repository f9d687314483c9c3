"""qwen-local bench: speed and memory of the served GGUF against raw llama.cpp and the seed's path.

    qwen-local bench --model X.gguf [--model2 Y.gguf] [--baseline-base DIR --baseline-adapter DIR]
                     [--reps N] [--baseline-reps N] [--threads N] [--json OUT]
    qwen-local bench make-model --shape 3b --out DIR [--adapter-rank 16]
    qwen-local bench convert --base DIR --adapter DIR [--json OUT]        (see convert/bench.py)
    qwen-local bench soak --model X.gguf [--minutes 30] [--concurrency 8]  (see runtime/soak.py)

How it measures
- Every path runs in its own worker process (one per GGUF, one for the seed's transformers path), so
  load time, RSS and anonymous RSS belong to that path alone. The parent only orchestrates: it sends
  one request at a time, so two workloads never share the cores, and it alternates the paths request
  by request (and flips the order every round) so that drift on the machine hits all of them.
- Timings are taken inside the workers, around the call being measured.
- "raw llama.cpp" is the low-level API on a second context of the *same* loaded model, created with
  the engine's own context parameters: llama_decode of exactly the tokens the engine has to process
  (the uncached tail after the system prefix), and a greedy argmax decode loop. The ratio of the
  engine to it is the engine's overhead.
- The seed's path is transformers float32 + an unmerged PeftModel: generate(max_new_tokens=4) for an
  intent, 120 new tokens (min_new_tokens=120, greedy) for a reply, on the same prompt text.
"""
from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from runtime.errors import UserError
from runtime.profile import Profile, load_profile

GB = 1024 ** 3
BATCH_SIZES = (1, 2, 4, 8)
REPLY_TOKENS = 120

# ---------------------------------------------------------------------------------------------
# prompts: the same for every path

INTENT_QUERIES = [
    "ao so mi trang nam size L con hang ko shop",
    "Chào shop, hôm nay bạn khỏe không?",
    "Thời tiết Hà Nội tuần này lạnh quá, mặc gì đi làm cho ấm mà vẫn lịch sự?",
    "Giải giúp mình phương trình x^2 - 5x + 6 = 0 với",
    "Váy maxi hoa nhí dưới 500k có màu xanh không ạ?",
    "cảm ơn bạn nhiều nha, tư vấn nhiệt tình ghê",
    "Đơn hàng mình đặt hôm thứ 2 mà giờ chưa thấy giao, kiểm tra giúp mình được không?",
    "Ai là tác giả của Truyện Kiều vậy?",
]

REPLY_CASES = [
    dict(query="Mình cần một chiếc váy đi dự tiệc cưới, tầm 800k, màu pastel, có mẫu nào không shop?",
         intent="fashion",
         products=[{"name": "Váy midi lụa xếp ly", "price": "790.000đ", "color": "hồng pastel",
                    "sizes": "S, M, L"},
                   {"name": "Đầm suông cổ vuông", "price": "650.000đ", "color": "xanh mint",
                    "sizes": "M, L"},
                   {"name": "Váy hai dây voan hoa", "price": "720.000đ", "color": "vàng kem",
                    "sizes": "S, M"}]),
    dict(query="Áo khoác gió nam có size XL không, giao về Đà Nẵng mất mấy ngày vậy?",
         intent="fashion",
         products=[{"name": "Áo khoác gió hai lớp chống nước", "price": "459.000đ",
                    "color": "đen, xanh navy", "sizes": "M, L, XL"},
                   {"name": "Áo khoác dù có mũ", "price": "399.000đ", "color": "xám",
                    "sizes": "L, XL, XXL"}]),
]


def intent_segments(cfg: Profile, query: str):
    return cfg.intent_prompt(query)


def reply_segments(cfg: Profile, case: dict):
    return cfg.reply_prompt(case["query"], case["intent"], bool(case["products"]), case["products"])


def segments_text(segments) -> str:
    return "".join(text for text, _ in segments)


# ---------------------------------------------------------------------------------------------
# arithmetic

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


# Targets of issue 4 (3B shape, q4_k_m): (key, what, op, threshold)
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


# ---------------------------------------------------------------------------------------------
# memory

STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmPeak", "VmSwap")


def parse_status(text: str) -> dict[str, int]:
    """The memory lines of a /proc/<pid>/status text, in bytes ("VmRSS:  123 kB" -> 125952)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            parts = rest.split()
            if not parts:
                continue
            n = int(parts[0])
            unit = parts[1].lower() if len(parts) > 1 else "b"
            out[key] = n * {"b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}[unit]
    return out


def read_status(pid: int | str = "self") -> dict[str, int]:
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return {}


def memory_snapshot() -> dict:
    """This process's memory now: rss, anonymous rss, file-backed rss, peak rss (bytes)."""
    st = read_status()
    snap = {"rss": st.get("VmRSS"), "rss_anon": st.get("RssAnon"), "rss_file": st.get("RssFile"),
            "peak_rss": st.get("VmHWM")}
    if snap["rss"] is None:  # not Linux: psutil gives rss, and uss as the closest to anonymous memory
        import psutil
        info = psutil.Process().memory_full_info()
        snap.update(rss=info.rss, rss_anon=getattr(info, "uss", None), rss_file=None,
                    peak_rss=getattr(info, "peak_wset", None))
    return snap


# ---------------------------------------------------------------------------------------------
# worker processes: one per path, JSON lines on a private pipe

class Worker:
    def __init__(self, name: str, spec: dict, log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self._log = open(self.log_path, "w")
        root = str(Path(__file__).resolve().parent.parent)
        full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [root] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.bench", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=full_env, text=True,
            encoding="utf-8")
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench worker {self.name} died (exit {self.proc.returncode}); "
                               f"log tail:\n{self.log_tail()}")
        msg = json.loads(line)
        if msg.get("user_error"):  # e.g. a GGUF llama.cpp refuses: one line, as everywhere else
            raise UserError(msg["user_error"])
        if "error" in msg:
            raise RuntimeError(f"bench worker {self.name}: {msg['error']}\nlog tail:\n{self.log_tail()}")
        return msg

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def worker_main(spec_json: str) -> int:
    """Entry point of a worker process: load the path, say ready, then answer requests."""
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything a library prints goes to the log, never into the protocol
    spec = json.loads(spec_json)
    try:
        impl = {"llama": LlamaWorker, "seed": SeedWorker}[spec["kind"]](spec)
        proto.write(json.dumps(impl.ready) + "\n")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        import traceback
        traceback.print_exc()
        from runtime.engine import EngineError
        msg = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(e, (EngineError, FileNotFoundError)):
            msg["user_error"] = str(e)
        proto.write(json.dumps(msg) + "\n")
        return 1
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            res = getattr(impl, "op_" + req.pop("op"))(**req)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(res) + "\n")
    return 0


# ---------------------------------------------------------------------------------------------
# the qwen-local path (helper-3's engine) and raw llama.cpp on the same loaded model

class RawLlama:
    """Low-level llama.cpp on a second context of an already-loaded model: no Python layers at all."""

    def __init__(self, model_ptr, ctx_params, threads: int):
        import ctypes

        import llama_cpp as L
        import numpy as np

        self.L, self.np, self.ctypes = L, np, ctypes
        params = ctx_params
        params.n_threads = params.n_threads_batch = threads
        self.ctx = L.llama_init_from_model(model_ptr, params)
        if not self.ctx:
            raise RuntimeError("could not create the raw llama.cpp context")
        self.mem = L.llama_get_memory(self.ctx)
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model_ptr))
        self.n_batch = int(params.n_batch)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def _decode(self, tokens: list[int], pos0: int) -> None:
        L, b = self.L, self.batch
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            b.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                b.token[i] = t
                b.pos[i] = pos0 + start + i
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = 0
                b.logits[i] = 0
            b.logits[len(chunk) - 1] = 1
            rc = L.llama_decode(self.ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    def _argmax(self) -> int:
        ptr = self.L.llama_get_logits_ith(self.ctx, -1)
        return int(self.np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def set_prefix(self, tokens: list[int]) -> None:
        self.L.llama_memory_clear(self.mem, True)
        if tokens:
            self._decode(tokens, 0)
        self.prefix_len = len(tokens)

    def prefill(self, tokens: list[int]) -> float:
        """Seconds to decode `tokens` right after the cached prefix, up to the last token's logits."""
        self.L.llama_memory_seq_rm(self.mem, 0, self.prefix_len, -1)
        t0 = time.perf_counter()
        self._decode(tokens, self.prefix_len)
        self._argmax()
        return time.perf_counter() - t0

    def generate(self, tokens: list[int], n: int) -> dict:
        """Prefill `tokens` after the prefix, then a greedy loop of n tokens (end-of-text ignored)."""
        L = self.L
        self.L.llama_memory_seq_rm(self.mem, 0, self.prefix_len, -1)
        t0 = time.perf_counter()
        self._decode(tokens, self.prefix_len)
        tok = self._argmax()
        t_first = time.perf_counter()
        pos = self.prefix_len + len(tokens)
        one = (L.llama_token * 1)()
        for _ in range(n - 1):
            one[0] = tok
            rc = L.llama_decode(self.ctx, L.llama_batch_get_one(one, 1))
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
            pos += 1
            tok = self._argmax()
        t_last = time.perf_counter()
        return {"ttft_s": t_first - t0, "tokens": n,
                "decode_tps": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else None}


class LlamaWorker:
    """One GGUF served by qwen-local's engine (runtime/engine.py), plus raw llama.cpp on its weights."""

    def __init__(self, spec: dict):
        from runtime.engine import Engine

        self.threads = spec["threads"]
        self.temperature = spec.get("temperature", 0.7)
        self.cfg = load_profile()
        mem0 = memory_snapshot()
        t0 = time.perf_counter()
        # the server's configuration (qwen-local serve defaults: 8192-token context, 4 slots)
        self.engine = Engine(spec["model"], self.cfg, threads=self.threads, n_ctx=spec["n_ctx"],
                             slots=spec["slots"])
        load_s = time.perf_counter() - t0
        mem_load = memory_snapshot()
        # one request of each kind, so that buffers allocated on first use are counted as serving RSS
        self.engine.intent(INTENT_QUERIES[0])
        self.engine.intents(INTENT_QUERIES[:max(BATCH_SIZES)])
        self.op_generate(0, 8)
        mem_served = memory_snapshot()
        self.kv_cache_bytes = self._kv_bytes()
        self.raw = RawLlama(self.engine.model, self._raw_params(), self.threads)
        self.raw_prefix = None
        info = self.engine.describe()
        self.ready = {
            "load_s": load_s, "memory_before_load": mem0, "memory_after_load": mem_load,
            "memory": mem_served, "kv_cache_bytes": self.kv_cache_bytes,
            "gguf_bytes": os.path.getsize(spec["model"]), "engine": info,
            "intent_prefix_tokens": info["cached_prefix_tokens"]["intent"],
        }

    def _raw_params(self):
        """The engine's context parameters, for one sequence: same batch sizes, threads, attention."""
        L = self.engine.L
        cp = L.llama_context_default_params()
        cp.n_ctx = 2048
        cp.n_batch = cp.n_ubatch = self.engine.n_batch
        cp.n_seq_max = 1
        cp.no_perf = True
        return cp

    def _kv_bytes(self) -> int:
        """Size of the engine's K and V caches (f16): n_ctx x layers x KV heads x head dim x 2 x 2 bytes."""
        L, model = self.engine.L, self.engine.model
        head_dim = L.llama_model_n_embd(model) // L.llama_model_n_head(model)
        per_pos = 2 * L.llama_model_n_layer(model) * L.llama_model_n_head_kv(model) * head_dim * 2
        return int(self.engine.n_ctx) * per_pos

    def _split(self, segments):
        """(cached system prefix tokens, the tokens evaluated per request), as the engine tokenizes."""
        head = self.engine.tokenize(segments[0][0], special=True)
        return head, self.engine.tokenize_segments(segments[1:])

    # -- operations ------------------------------------------------------------------------
    def op_intent(self, i: int, cold: bool = False) -> dict:
        t0 = time.perf_counter()
        res = self.engine.intent(INTENT_QUERIES[i], use_cache=not cold)
        dt = time.perf_counter() - t0
        return {"s": dt, "label": res.intent, "tokens": res.n_prompt_tokens}

    def op_raw_prefill(self, i: int, cold: bool = False) -> dict:
        prefix, rest = self._split(intent_segments(self.cfg, INTENT_QUERIES[i]))
        if cold:
            self.raw.set_prefix([])
            self.raw_prefix = None
            return {"s": self.raw.prefill(prefix + rest), "tokens": len(prefix) + len(rest)}
        if self.raw_prefix != prefix:
            self.raw.set_prefix(prefix)
            self.raw_prefix = prefix
        return {"s": self.raw.prefill(rest), "tokens": len(rest)}

    def op_batch(self, start: int, k: int) -> dict:
        qs = [INTENT_QUERIES[(start + j) % len(INTENT_QUERIES)] for j in range(k)]
        t0 = time.perf_counter()
        res = self.engine.intents(qs)
        dt = time.perf_counter() - t0
        if len(res) != k:
            raise RuntimeError(f"intents returned {len(res)} results for {k} queries")
        return {"s": dt, "qps": k / dt}

    def op_generate(self, i: int, n: int, seed: int = 0) -> dict:
        """Streamed reply as a client sees it: TTFT = first text delta; rate over the rest."""
        from runtime.engine import GenerateResult

        case = REPLY_CASES[i]
        t0 = time.perf_counter()
        t_first = None
        result = None
        for item in self.engine.generate(case["query"], case["intent"], bool(case["products"]),
                                         case["products"], max_tokens=n, temperature=self.temperature,
                                         seed=seed):
            if isinstance(item, GenerateResult):
                result = item
            elif t_first is None:
                t_first = time.perf_counter()
        t_end = time.perf_counter()
        n_tok = result.n_tokens if result else 0
        return {"ttft_s": None if t_first is None else t_first - t0, "tokens": n_tok,
                "finish_reason": result.finish_reason if result else None,
                "decode_tps": (n_tok - 1) / (t_end - t_first) if t_first and n_tok > 1 and t_end > t_first
                else None,
                "engine_tps": result.tokens_per_s if result else None, "total_s": t_end - t0}

    def op_raw_generate(self, i: int, n: int, seed: int = 0) -> dict:  # noqa: ARG002
        prefix, rest = self._split(reply_segments(self.cfg, REPLY_CASES[i]))
        self.raw.set_prefix(prefix)
        self.raw_prefix = None
        return self.raw.generate(rest, n)

    def op_memory(self) -> dict:
        return memory_snapshot()


# ---------------------------------------------------------------------------------------------
# the seed's path: transformers float32 + unmerged PeftModel

class SeedWorker:
    def __init__(self, spec: dict):
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(spec["threads"])
        self.torch = torch
        self.cfg = load_profile()
        mem0 = memory_snapshot()
        t0 = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(spec["base"])
        base = AutoModelForCausalLM.from_pretrained(spec["base"], torch_dtype=torch.float32)
        self.model = PeftModel.from_pretrained(base, spec["adapter"]).eval()
        load_s = time.perf_counter() - t0
        self.pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        self.ready = {"load_s": load_s, "memory_before_load": mem0, "memory": memory_snapshot()}

    def _ids(self, segments):
        enc = self.tok(segments_text(segments), return_tensors="pt", add_special_tokens=False)
        return enc["input_ids"], enc["attention_mask"]

    def op_intent(self, i: int) -> dict:
        ids, mask = self._ids(intent_segments(self.cfg, INTENT_QUERIES[i]))
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                      do_sample=False, pad_token_id=self.pad)
            dt = time.perf_counter() - t0
        text = self.tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
        return {"s": dt, "label": text, "tokens": int(ids.shape[1])}

    def op_generate(self, i: int, n: int) -> dict:
        from transformers.generation.streamers import BaseStreamer

        class Stamps(BaseStreamer):
            def __init__(self):
                self.times, self.calls = [], 0

            def put(self, value):  # the first call carries the prompt, then one call per new token
                self.calls += 1
                if self.calls > 1:
                    self.times.append(time.perf_counter())

            def end(self):
                pass

        ids, mask = self._ids(reply_segments(self.cfg, REPLY_CASES[i]))
        st = Stamps()
        with self.torch.inference_mode():
            t0 = time.perf_counter()
            self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, pad_token_id=self.pad, streamer=st)
            total = time.perf_counter() - t0
        ts = st.times
        return {"ttft_s": ts[0] - t0 if ts else None, "tokens": len(ts), "total_s": total,
                "decode_tps": (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 else None}

    def op_memory(self) -> dict:
        return memory_snapshot()


# ---------------------------------------------------------------------------------------------
# orchestration

def _quant_name(path: str) -> str:
    stem = Path(path).name.lower()
    for q in ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "bf16", "f16", "f32"):
        if q in stem:
            return q
    return Path(path).stem


def run(models: list[str], baseline: tuple[str, str] | None, reps: int, baseline_reps: int,
        threads: int, *, n_ctx: int = 8192, slots: int = 4, temperature: float = 0.7, log=print) -> dict:
    log_dir = Path(tempfile.mkdtemp(prefix="qwen-local-bench-"))
    workers: dict[str, Worker] = {}
    names = []
    for m in models:
        name = f"qwen-local {_quant_name(m)}"
        while name in names:
            name += "'"
        names.append(name)
    result = {"meta": dict(_meta(threads, reps, baseline_reps), n_ctx=n_ctx, slots=slots,
                           temperature=temperature),
              "paths": {}, "log_dir": str(log_dir)}
    seed = None
    try:
        # the seed loads first: its load peak is the largest, and it should not coincide with others
        _memory_warning(models, baseline, log)
        if baseline:
            log(f"loading the seed path (transformers float32 + PeftModel) from {baseline[0]} ...")
            seed = Worker("seed", {"kind": "seed", "base": baseline[0], "adapter": baseline[1],
                                   "threads": threads}, log_dir,
                          env={"OMP_WAIT_POLICY": "PASSIVE"})  # idle torch threads must not spin
            result["paths"]["seed"] = dict(kind="seed", base=baseline[0], adapter=baseline[1],
                                           load_s=seed.ready["load_s"], memory=seed.ready["memory"],
                                           memory_before_load=seed.ready["memory_before_load"])
        for name, m in zip(names, models):
            log(f"loading {name} ({m}) ...")
            w = Worker(name, {"kind": "llama", "model": m, "threads": threads, "n_ctx": n_ctx,
                              "slots": slots, "temperature": temperature}, log_dir)
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
        log(f"warning: these paths may need ~{need / GB:.1f} GB together and {avail / GB:.1f} GB is "
            "available; run the GGUFs one at a time or without the baseline if the machine swaps")


def _interleave(workers: dict, seed, reps: int, baseline_reps: int, log) -> dict:
    """All measurements, path after path within each request, order flipped every round."""
    s: dict = {name: {} for name in workers}
    s["seed"] = {}
    add = lambda path, key, v: s[path].setdefault(key, []).append(v)  # noqa: E731
    n = len(INTENT_QUERIES)
    # seed samples: each prompt baseline_reps times, spread over the rounds
    seed_slots: dict = {}
    stride = max(1, reps // max(1, baseline_reps))
    for i in range(n):
        for k in range(baseline_reps):
            r = (i + k * stride) % reps
            seed_slots[(r, i)] = seed_slots.get((r, i), 0) + 1
    seed_gen_rounds = {(k * stride) % reps for k in range(baseline_reps)}
    last = [None]

    def settle(who):  # let the previous path's threads go idle before another one starts
        if last[0] is not None and last[0] != who:
            time.sleep(0.02)
        last[0] = who

    t_start = time.perf_counter()
    for r in range(reps):
        order = list(workers) if r % 2 == 0 else list(workers)[::-1]
        for i in range(n):
            for name in order:
                w = workers[name]
                steps = [("intent", dict(i=i)), ("raw_prefill", dict(i=i))]
                if r % 2:
                    steps.reverse()
                for op, kw in steps:
                    settle(name)
                    res = w.call(op, **kw)
                    add(name, "intent_warm_s" if op == "intent" else "raw_prefill_s", res["s"])
                    if op == "raw_prefill":
                        add(name, "uncached_tokens", res["tokens"])
                if i % 4 == r % 4:  # cold: a quarter of the prompts each round (it is slow)
                    for op in (["intent", "raw_prefill"] if r % 2 == 0 else ["raw_prefill", "intent"]):
                        settle(name)
                        res = w.call(op, i=i, cold=True)
                        add(name, "intent_cold_s" if op == "intent" else "raw_prefill_cold_s", res["s"])
            for _ in range(seed_slots.get((r, i), 0) if seed else 0):
                settle("seed")
                res = seed.call("intent", i=i)
                add("seed", "intent_s", res["s"])
                add("seed", "prompt_tokens", res["tokens"])
        for k in BATCH_SIZES:
            for name in order:
                settle(name)
                res = workers[name].call("batch", start=r + k, k=k)
                add(name, f"batch{k}_qps", res["qps"])
        case = r % len(REPLY_CASES)
        for name in order:
            steps = [("generate", "gen"), ("raw_generate", "raw")]
            if r % 2:
                steps.reverse()
            for op, tag in steps:
                settle(name)
                res = workers[name].call(op, i=case, n=REPLY_TOKENS, seed=r)
                add(name, f"{tag}_ttft_s", res["ttft_s"])
                add(name, f"{tag}_decode_tps", res["decode_tps"])
                add(name, f"{tag}_tokens", res["tokens"])
        if seed and r in seed_gen_rounds:
            settle("seed")
            res = seed.call("generate", i=case, n=REPLY_TOKENS)
            add("seed", "ttft_s", res["ttft_s"])
            add("seed", "decode_tps", res["decode_tps"])
            add("seed", "tokens", res["tokens"])
        log(f"  round {r + 1}/{reps} done ({time.perf_counter() - t_start:.0f} s)")
    for name, w in workers.items():
        s[name]["memory_end"] = w.call("memory")
    if seed:
        s["seed"]["memory_end"] = seed.call("memory")
    return s


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
    from runtime.errors import __version__
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


# ---------------------------------------------------------------------------------------------
# report

def _f(v, fmt="{:.3g}", none="-"):
    return none if v is None else fmt.format(v)


def _sub(a, b):
    return None if a is None or b is None else a - b


def _gb(v):
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
    row("RSS serving, GB", lambda p: _gb(p.get("memory", {}).get("rss")))
    row("  anonymous, GB", lambda p: _gb(p.get("memory", {}).get("rss_anon")))
    row("  file-backed (mmap), GB", lambda p: _gb(p.get("memory", {}).get("rss_file")))
    row("  added by load + first requests, GB",
        lambda p: _gb(_sub(p.get("memory", {}).get("rss"), p.get("memory_before_load", {}).get("rss"))))
    row("  peak (whole run), GB", lambda p: _gb(p.get("peak_rss")))
    row("GGUF + KV cache, GB", lambda p: _gb((p.get("gguf_bytes") or 0) + (p.get("kv_cache_bytes") or 0))
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
    out = [head, "", _table(["", *names], rows)]

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
    out.append("\nHeadline ratios\n" + _table(["", *qnames], ratio_rows))

    out.append("\nTargets (stated for the 3B shape at q4_k_m)")
    for n in qnames:
        for t in paths[n]["targets"]:
            v = _f(t["value"], "{:.2f}")
            out.append(f"  {t['verdict']:<4}  {n}: {t['what']} ({t['op']} {t['threshold']:g}): measured {v}")
    return "\n".join(out)


def _loadavg(v) -> str:
    return "-" if not v else f"{v[0]:.1f}"


def _table(header, rows) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                               for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# ---------------------------------------------------------------------------------------------
# commands


def _default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main_serve(argv: list[str]) -> int:
    from runtime.options import Parser, add_output_flags, float_in, int_in, quiet

    ap = Parser(
        prog="qwen-local bench",
        description="Speed and memory of qwen-local serving a GGUF, against raw llama.cpp on the same "
                    "weights and (optionally) the seed's transformers + PEFT path. Other subcommands: "
                    "'qwen-local bench make-model' and 'qwen-local bench convert'.")
    ap.add_argument("--model", required=True, help="GGUF to serve")
    ap.add_argument("--model2", action="append", default=[], help="another GGUF, measured interleaved")
    ap.add_argument("--baseline-base", help="base model folder for the seed path (transformers fp32)")
    ap.add_argument("--baseline-adapter", help="PEFT adapter folder for the seed path (unmerged)")
    ap.add_argument("--reps", type=int_in(1, 1000), default=5, help="rounds over all prompts")
    ap.add_argument("--baseline-reps", type=int_in(1, 1000), default=1,
                    help="times each intent prompt goes through the seed path; also its number of "
                         "replies (default 1: the seed path takes ~10 s per intent at 3B)")
    ap.add_argument("--threads", type=int_in(1, 1024), default=_default_threads(),
                    help="threads for llama.cpp and torch (default: all usable cores)")
    ap.add_argument("--ctx", type=int_in(512, 1 << 20), default=8192,
                    help="engine context (KV cache) in tokens, as qwen-local serve --ctx")
    ap.add_argument("--slots", type=int_in(1, 256), default=4,
                    help="engine sequences decoded together, as qwen-local serve --slots")
    ap.add_argument("--temperature", type=float_in(0, 2), default=0.7,
                    help="reply sampling temperature, as the server's default; raw llama.cpp is greedy")
    ap.add_argument("--json", help="write the full results here")
    add_output_flags(ap, progress=False)
    a = ap.parse_args(argv)
    quiet(a.verbose)
    models = [a.model, *a.model2]
    from runtime.gguf_file import gguf_problem
    for m in models:
        if not Path(m).is_file():
            raise UserError(f"no such GGUF: {m}")
        problem = gguf_problem(m)  # caught here: a worker's failure would come with a log tail
        if problem:
            raise UserError(f"cannot load {m}: {problem}")
    if bool(a.baseline_base) != bool(a.baseline_adapter):
        raise UserError("--baseline-base and --baseline-adapter go together")
    baseline = None
    if a.baseline_base:
        for d, what in ((a.baseline_base, "base"), (a.baseline_adapter, "adapter")):
            if not Path(d).is_dir():
                raise UserError(f"no such {what} folder: {d}")
        if not (Path(a.baseline_adapter) / "adapter_config.json").is_file():
            raise UserError(f"{a.baseline_adapter} has no adapter_config.json")
        baseline = (a.baseline_base, a.baseline_adapter)
    if a.reps < 1 or a.baseline_reps < 1 or a.threads < 1:
        raise UserError("--reps, --baseline-reps and --threads must be at least 1")
    result = run(models, baseline, a.reps, a.baseline_reps, a.threads, n_ctx=a.ctx, slots=a.slots,
                 temperature=a.temperature, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"\nJSON: {a.json}")
    return 0


if __name__ == "__main__":  # a measuring worker, started by main_serve
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
