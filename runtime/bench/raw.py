"""Raw llama.cpp: the low-level API on a second context of the engine's loaded model, the floor the
engine's overhead is measured against."""
from __future__ import annotations

import time


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
