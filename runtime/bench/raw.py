"""Raw llama.cpp: the low-level API on a second context of the engine's loaded model, the floor the
engine's overhead is measured against."""
from __future__ import annotations

import time


class RawLlama:
    """Low-level llama.cpp on a second context of an already-loaded model: no Python layers at all."""

    def __init__(self, model_ptr, ctx_params, threads: int, lora=None):
        import llama_cpp as L

        from qwen_local.runtime.llama import Context

        self.L = L
        params = ctx_params
        params.n_threads = params.n_threads_batch = threads
        # the engine's own batch fill (runtime.llama.Context), without the engine's scheduler
        self.context = Context(model_ptr, params, lora=lora)
        self.ctx, self.mem = self.context.ctx, self.context.mem

    def _decode(self, tokens: list[int], pos0: int) -> None:
        n, last = self.context.n_batch, len(tokens) - 1
        # logits at each chunk's last row only, as a plain llama.cpp caller would ask
        self.context.run(0, pos0, tokens, want=lambda i: (i + 1) % n == 0 or i == last)

    def _argmax(self) -> int:
        return int(self.context.row(-1).argmax())

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
        self.L.llama_memory_seq_rm(self.mem, 0, self.prefix_len, -1)
        t0 = time.perf_counter()
        self._decode(tokens, self.prefix_len)
        tok = self._argmax()
        t_first = time.perf_counter()
        pos = self.prefix_len + len(tokens)
        for _ in range(n - 1):
            self.context.decode([(tok, pos, 0, True)])
            pos += 1
            tok = self._argmax()
        t_last = time.perf_counter()
        return {"ttft_s": t_first - t0, "tokens": n,
                "decode_tps": (n - 1) / (t_last - t_first) if n > 1 and t_last > t_first else None}
