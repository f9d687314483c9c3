"""What runs inside a worker process: one measured path each. `op_<name>` methods answer the
parent's requests (runtime.bench.process); timings are taken here, around the call measured."""
from __future__ import annotations

import time

from qwen_local.runtime.bench.cases import (BATCH_SIZES, INTENT_QUERIES, REPLY_CASES, intent_segments,
                                 reply_segments, segments_text)
from qwen_local.runtime.bench.memory import memory_snapshot
from qwen_local.runtime.bench.raw import RawLlama
from qwen_local.runtime.profile import load_profile


class LlamaWorker:
    """One GGUF served by qwen-local's engine (runtime/engine.py), plus raw llama.cpp on its weights."""

    def __init__(self, spec: dict):
        from qwen_local.runtime.engine import Engine

        self.threads = spec["threads"]
        self.temperature = spec.get("temperature", 0.7)
        self.cfg = load_profile()
        mem0 = memory_snapshot()
        t0 = time.perf_counter()
        # the server's configuration (qwen-local serve defaults: 8192-token context, 4 slots)
        self.engine = Engine(spec["model"], self.cfg, threads=self.threads, n_ctx=spec["n_ctx"],
                             slots=spec["slots"], flash_attn=spec.get("flash_attn", False))
        load_s = time.perf_counter() - t0
        mem_load = memory_snapshot()
        # one request of each kind, so that buffers allocated on first use are counted as serving RSS
        self.engine.intent(INTENT_QUERIES[0])
        self.engine.intents(INTENT_QUERIES[:max(BATCH_SIZES)])
        self.op_generate(0, 8)
        mem_served = memory_snapshot()
        self.kv_cache_bytes = self._kv_bytes()
        self.raw = RawLlama(self.engine.model, self._raw_params(), self.threads,
                            lora=self.engine.weights.lora)
        self.raw_prefix = None
        info = self.engine.describe()
        self.ready = {
            "load_s": load_s, "memory_before_load": mem0, "memory_after_load": mem_load,
            "memory": mem_served, "kv_cache_bytes": self.kv_cache_bytes,
            "gguf_bytes": info["bytes"], "engine": info,  # with the LoRA companion, if any
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
        cp.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if self.engine.flash_attn
                              else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
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
        from qwen_local.runtime.engine import GenerateResult

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
