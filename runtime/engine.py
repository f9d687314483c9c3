"""One llama.cpp model, one context, one worker thread: intent and replies, both warm.

Built on llama.cpp's low-level API rather than `llama_cpp.Llama` (docs/development.md, "The
engine"): one copy of the weights; both system prompts' KV cached in a unified cache and shared
with every request's slot (only the user turn is evaluated); continuous multi-sequence batching
(each step one `llama_decode` over every running request); intent in one forward pass
(runtime.labels); prompts tokenized as in training (runtime.llama); the profile stored in the GGUF
served by default.

The engine is thread-safe: any thread may `submit`; all llama.cpp calls happen on the worker thread.
Jobs (runtime.jobs) report through a `sink(kind, data)` callback called on the worker thread.
"""
from __future__ import annotations

import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from qwen_local.runtime import labels as labels_mod
from qwen_local.runtime.jobs import (Cancelled, GenerateResult, IntentResult, Job, TooLong, advance,
                                    plan_step, queue_sink, wait)
from qwen_local.runtime.llama import (Context, DecodeError, EngineError, Model, context_params,
                                     threads_or_default)
from qwen_local.runtime.profile import METADATA_KEY, Profile, Segment, load_profile, stored_profile
from qwen_local.runtime.scoring import constrained, greedy, label_grammar, score


class Engine:
    INTENT_SEQ = 0
    REPLY_SEQ = 1
    label_grammar = staticmethod(label_grammar)

    def __init__(self, model_path: str | Path, cfg: Profile | None = None, *,
                 threads: int | None = None, n_ctx: int = 8192, slots: int = 4,
                 n_batch: int = 512, n_gpu_layers: int | None = None, warmup: bool = True,
                 kv_f32: bool = False, flash_attn: bool = False, mmap: bool | None = None,
                 repack: bool = True, eval_callback=None, prefixes: bool = True,
                 lora: str | Path | None = None):
        """kv_f32, flash_attn, eval_callback: see `runtime.llama.context_params` (the default is
        exact arithmetic but for the f16 KV cache; serve chooses flash_attn by its setting);
        mmap, repack, lora: see `runtime.llama.Model` (by default a base file is served with the
        LoRA companion it names). prefixes=False: no system prompt is cached (scoring only)."""
        import llama_cpp as L

        self.L = L
        self.model_path = str(model_path)
        self.weights = Model(self.model_path, n_gpu_layers=n_gpu_layers, mmap=mmap, repack=repack,
                             lora=lora)
        self.model, self.vocab, self.n_vocab = self.weights.ptr, self.weights.vocab, self.weights.n_vocab
        self.gpu_offload, self.n_gpu_layers = self.weights.gpu_offload, self.weights.n_gpu_layers
        self.context: Context | None = None
        try:
            self.threads = threads_or_default(threads)
            self.slots = max(1, int(slots))
            self.n_batch = int(n_batch)
            if self.n_batch < self.slots + 2:  # llama.cpp aborts the process on fewer
                raise ValueError(f"n_batch ({n_batch}) must be at least the sequences, "
                                 f"{self.slots} slots + 2 cached prompts")
            self.stored_profile = stored_profile(self.weights.meta(METADATA_KEY), self.model_path)
            self.cfg = cfg or self.stored_profile or load_profile()
            self.context = Context(self.model, context_params(
                n_ctx=n_ctx, n_batch=self.n_batch, seqs=self.slots + 2, threads=self.threads,
                flash_attn=flash_attn, kv_f32=kv_f32, eval_callback=eval_callback),
                lora=self.weights.lora)
            self.flash_attn, self.kv_type = bool(flash_attn), "f32" if kv_f32 else "f16"
            self.ctx, self.mem, self.n_ctx = self.context.ctx, self.context.mem, self.context.n_ctx
            self._pieces = self.weights.pieces()
            self.piece_index = labels_mod.PieceIndex(enumerate(self._pieces))  # guided_choice's groups too
            self.groups = self.piece_index.groups(self.cfg.labels)
            self.grammar = label_grammar(self.cfg.labels)
            self.weights.validate_grammar(self.grammar)
            self.prefixes = self._warm_prefixes(prefixes)
        except BaseException:
            if self.context is not None:
                self.context.close()
            self.weights.close()
            raise
        self._prefix_cells = sum(n for _, n in self.prefixes.values())
        self._prefix_ids = [(seq, self.tokenize(text, special=True))
                            for text, (seq, _) in self.prefixes.items()]

        self.stats = {"requests": 0, "intent": 0, "generate": 0, "cancelled": 0, "errors": 0,
                      "decode_calls": 0, "max_seqs_per_batch": 0, "generated_tokens": 0,
                      "prompt_tokens": 0}
        self._lock = threading.Condition()
        self._waiting: deque[Job] = deque()
        self._active: list[Job] = []
        self._calls: deque[tuple[Callable, queue.Queue]] = deque()
        self._free_slots = list(range(2, 2 + self.slots))
        self._reserved = 0
        self._closed = False
        self._refresh_kv()
        self._thread = threading.Thread(target=self._run, name="qwen-local-engine", daemon=True)
        self._thread.start()
        if warmup:  # the first decode of a new batch shape allocates the graph: do it before serving
            self.intents(["xin chào", "áo"])
            for k in self.stats:
                self.stats[k] = 0

    def _warm_prefixes(self, enabled: bool) -> dict[str, tuple[int, int]]:
        """Each system prompt evaluated once into its own sequence: text -> (sequence, tokens)."""
        out: dict[str, tuple[int, int]] = {}
        for seq, kind in ((self.INTENT_SEQ, "intent"), (self.REPLY_SEQ, "reply"))[:2 * bool(enabled)]:
            text = self.cfg.head(kind)
            toks = self.tokenize(text, special=True)
            if len(toks) + 64 > self.n_ctx // 2:
                raise ValueError(f"the system prompt takes {len(toks)} tokens: too long for "
                                 f"a {self.n_ctx}-token context")
            self.context.clear(seq)
            try:
                self.context.run(seq, 0, toks)
            except DecodeError as e:
                raise EngineError(f"llama_decode failed on the system prompt (rc={e.rc})") from None
            out[text] = (seq, len(toks))
        return out

    # -------------------------------------------------------------- description
    def describe(self) -> dict:
        return {
            "model": self.model_path,
            **self.weights.describe(),  # description, quant, n_params, lora, bytes
            "threads": self.threads,
            "gpu_offload": self.gpu_offload,
            "n_gpu_layers": self.n_gpu_layers,
            "n_ctx": self.n_ctx,
            "slots": self.slots,
            "flash_attn": self.flash_attn,
            "kv_cache": self.kv_type,
            "labels": list(self.cfg.labels),
            # as_converted: the prompts that convert verified this file with (stored in the GGUF)
            "profile": {**self.cfg.describe(), "as_converted": self.stored_profile is not None
                        and self.stored_profile.sha256 == self.cfg.sha256},
            "cached_prefix_tokens": {k: self.prefixes.get(self.cfg.head(k), (None, 0))[1]
                                     for k in ("intent", "reply")},
        }

    # -------------------------------------------------------------- tokens
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        return self.weights.tokenize(text, special=special)

    def tokenize_segments(self, segments: list[Segment]) -> list[int]:
        """Trusted segments may contain special tokens; untrusted ones never do (and are NFC'd)."""
        return self.weights.tokenize_segments(segments)

    def is_control(self, token: int) -> bool:
        return self.weights.is_control(token)

    def piece(self, token: int) -> bytes:
        return self._pieces[token]

    def _split(self, segments: list[Segment], use_cache: bool = True) -> tuple[int | None, int, list[int]]:
        """(cached prefix sequence or None, its length, the tokens to evaluate after it). The whole
        prompt is tokenized, and it shares a cached system prompt's KV cells when its ids begin with
        that prompt's ids: exact whatever rendered the prompt (a profile, a chat template, a client)."""
        ids = self.tokenize_segments(segments)
        for seq, head in self._prefix_ids if use_cache else ():
            if len(ids) > len(head) and ids[:len(head)] == head:
                return seq, len(head), ids[len(head):]
        return None, 0, ids

    # -------------------------------------------------------------- public API
    def prepare(self, kind: str, segments: list[Segment], *, sink, max_new: int = 0,
                temperature: float = 0.0, top_p: float = 0.9, top_k: int = 40,
                seed: int | None = None, use_cache: bool = True, groups: dict | None = None,
                stop: tuple[str, ...] = ()) -> Job:
        """Tokenize and size a job (raises TooLong) without queuing it.

        With use_cache (the default), a prompt that begins with a cached system prefix shares that
        prefix's KV cells and evaluates only the rest; without it the whole prompt is evaluated.
        groups: an intent job's label groups (default: the profile's labels); stop: texts that end a
        generation (not included in it).
        """
        seq, n_prefix, rest = self._split(segments, use_cache)
        job = Job(kind=kind, prefix_seq=seq, prefix_len=n_prefix, tokens=rest, sink=sink,
                  max_new=int(max_new), temperature=float(temperature), top_p=float(top_p),
                  top_k=int(top_k), seed=int(seed if seed is not None else time.time_ns() & 0x7FFFFFFF),
                  groups=self.groups if groups is None else groups, stop=tuple(stop))
        budget = self.n_ctx - self._prefix_cells - 8
        if job.need_cells > budget:
            raise TooLong(f"the prompt needs {job.need_cells} tokens of context "
                          f"({len(rest)} prompt + {job.max_new} reply); this server has {budget}")
        return job

    def submit(self, jobs: list[Job]) -> None:
        with self._lock:
            if self._closed:
                raise EngineError("engine is closed")
            for j in jobs:
                j.t_submit = time.perf_counter()
                self._waiting.append(j)
                self.stats["requests"] += 1
            self._lock.notify()

    def intent_job(self, query: str, sink, use_cache: bool = True) -> Job:
        return self.prepare("intent", self.cfg.intent_prompt(query), sink=sink, use_cache=use_cache)

    def generate_job(self, query: str, intent: str | None, has_products: bool,
                     products: list[dict] | None, sink, *, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     top_k: int | None = None, seed: int | None = None) -> Job:
        """A reply job; sampling settings left None take the profile's generation defaults."""
        gen = self.cfg.reply
        segs = self.cfg.reply_prompt(query, intent, has_products, products)
        n = gen.max_tokens if max_tokens is None else max_tokens
        return self.prepare("generate", segs, sink=sink, max_new=max(1, n),
                            temperature=gen.temperature if temperature is None else temperature,
                            top_p=gen.top_p if top_p is None else top_p,
                            top_k=gen.top_k if top_k is None else top_k, seed=seed)

    def cancel_all(self) -> int:
        """Cancel every waiting and running job (shutdown after the grace period); returns how many."""
        with self._lock:
            jobs = list(self._waiting) + list(self._active)
            for j in jobs:
                j.cancel()
            self._lock.notify()
        return len(jobs)

    def kv_cells(self) -> dict:
        """KV cells held per sequence, as last seen by the worker (refreshed after every step).

        `prefix` are the cached system prompts (sequences 0 and 1); `slots` the request sequences
        that hold any cell. When no request runs, `slots` must be empty and `prefix` equal to
        `cached_prefix_tokens`: anything else is a slot leaked by a cancelled or failed request.
        """
        snap = dict(self._kv)
        names = {self.INTENT_SEQ: "intent", self.REPLY_SEQ: "reply"}
        prefix = {names[s]: n for s, n in snap.items() if s in names}
        slots = {str(s): n for s, n in snap.items() if s not in names and n}
        expected = {names[seq]: n for seq, n in self.prefixes.values()}
        return {"prefix": prefix, "slots": slots, "in_use": sum(snap.values()),
                "clean": not slots and prefix == expected}

    def _refresh_kv(self) -> None:  # worker thread only: it owns the context
        self._kv = {seq: self.context.cells(seq) for seq in range(2 + self.slots)}

    @property
    def depth(self) -> int:
        """Requests waiting or running in the engine."""
        return len(self._waiting) + len(self._active)

    # ---- synchronous conveniences (tests, eval, bench)
    def intent(self, query: str, timeout: float | None = None, use_cache: bool = True) -> IntentResult:
        return self.intents([query], timeout=timeout, use_cache=use_cache)[0]

    def intents(self, queries: list[str], timeout: float | None = None,
                use_cache: bool = True) -> list[IntentResult]:
        qs = [queue.Queue() for _ in queries]
        jobs = [self.intent_job(q, queue_sink(qq), use_cache) for q, qq in zip(queries, qs)]
        self.submit(jobs)
        return [wait(j, qq, timeout)[1] for j, qq in zip(jobs, qs)]

    def generate(self, query: str, intent: str | None = None, has_products: bool = False,
                 products: list[dict] | None = None, **kw) -> Iterator[str | GenerateResult]:
        """Yield text deltas, then the GenerateResult. Closing the iterator cancels the job."""
        qq: queue.Queue = queue.Queue()
        timeout = kw.pop("timeout", None)
        job = self.generate_job(query, intent, has_products, products, queue_sink(qq), **kw)
        self.submit([job])
        try:
            while True:
                kind, data = wait(job, qq, timeout)
                yield data
                if kind != "delta":
                    return
        finally:
            job.cancel()

    def call(self, fn: Callable[[], object], timeout: float | None = None):
        """Run fn on the worker thread once no request is running (exclusive use of the context)."""
        qq: queue.Queue = queue.Queue()
        with self._lock:
            self._calls.append((fn, qq))
            self._lock.notify()
        ok, value = qq.get(timeout=timeout)
        if not ok:
            raise value
        return value

    # ---- verification paths: exclusive calls on a free slot, left empty afterwards
    def grammar_intent(self, query: str) -> tuple[str, list[int]]:
        """The label that GBNF-constrained greedy decoding writes, and its tokens.

        Verification path only: the one-pass intent never samples. With the labels' first tokens
        in disjoint groups, greedy decoding's first token (the single most likely allowed token)
        fixes the label, so this equals `labels.greedy_first_label` on the same logits; the served
        `intent` is the argmax of the group *masses* (`labels.decide`), which agrees with it
        whenever the top label's mass is clearly ahead (a peaked, trained classifier) and may differ
        on flat distributions (random weights), where several small tokens can outweigh one large.
        """
        seq, n_prefix, rest = self._split(self.cfg.intent_prompt(query))

        def run():
            out = constrained(self.context, self._free_slots[0], (seq, n_prefix), rest, self.grammar)
            return b"".join(self._pieces[t] for t in out).decode("utf-8", "replace"), out

        return self.call(run)

    def score(self, tokens: list[int], start: int = 0) -> np.ndarray:
        """Logits ([n - start, vocab], float32) at positions start..n-1 of one token sequence
        evaluated from position 0 without any cached prefix (logit-parity and next-token checks)."""
        return self.call(lambda: score(self.context, self._free_slots[0], list(tokens), int(start)))

    def greedy_steps(self, segments: list[Segment], steps: int = 4) -> tuple[list[int], np.ndarray]:
        """A next-token teacher: the greedy continuation of a prompt (the cached system prefix is
        shared) and the logits each step was chosen from ([n, vocab]); returns (tokens fed after
        the prompt, rows). Stops early at the end-of-turn token, which is not fed."""
        seq, n_prefix, rest = self._split(segments)
        return self.call(lambda: greedy(self.context, self._free_slots[0], (seq, n_prefix), rest,
                                        int(steps)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)
        self.context.close()
        self.weights.close()
        self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- worker internals
    def _run(self) -> None:
        while True:
            with self._lock:
                while not (self._closed or self._waiting or self._active or
                           (self._calls and not self._active)):
                    self._lock.wait()
                if self._closed:
                    break
                calls = []
                if self._calls and not self._active:
                    calls = list(self._calls)
                    self._calls.clear()
            for fn, qq in calls:
                try:
                    qq.put((True, fn()))
                except BaseException as e:  # report, never kill the worker
                    qq.put((False, e))
            try:
                self._step()
            except Exception as e:  # llama.cpp failure: fail the running jobs, keep serving
                self.stats["errors"] += 1
                for j in list(self._active):
                    self._finish(j, "error", EngineError(str(e)))
            self._refresh_kv()
        # closing: fail whatever is left
        for j in list(self._active) + list(self._waiting):
            self._finish(j, "error", EngineError("engine closed"))

    def _admit(self) -> None:
        with self._lock:
            # drop cancelled jobs that never started
            for j in [j for j in self._waiting if j.cancelled]:
                self._waiting.remove(j)
                self.stats["cancelled"] += 1
                j.done = True
                j.sink("error", Cancelled("cancelled"))
            if self._calls:  # let exclusive calls run once the running jobs end
                return
            budget = self.n_ctx - self._prefix_cells - 8
            while self._waiting and self._free_slots:
                j = self._waiting[0]
                if self._reserved + j.need_cells > budget and self._active:
                    break
                self._waiting.popleft()
                j.start(self._free_slots.pop(0))
                self._reserved += j.need_cells
                self._active.append(j)
                self.context.clear(j.slot)
                if j.prefix_seq is not None:
                    self.context.share(j.prefix_seq, j.slot)

    def _step(self) -> None:
        self._admit()
        for j in [j for j in self._active if j.cancelled]:
            self._finish(j, "error", Cancelled("cancelled"))
        if not self._active:
            return
        items, outputs = plan_step(self._active, self.n_batch)
        if not items:
            return
        self.stats["decode_calls"] += 1
        self.stats["max_seqs_per_batch"] = max(self.stats["max_seqs_per_batch"],
                                               len({s for _, _, s, _ in items}))
        self.context.decode(items)
        self.stats["prompt_tokens"] += advance(self._active, items)
        for j, idx in outputs:
            if j.kind == "intent":
                self._finish_intent(j, idx)
            else:
                self._sample(j, idx)

    def _finish_intent(self, j: Job, idx: int) -> None:
        res = j.intent_result(self.context.row(idx).copy(), j.groups)
        self.stats["intent"] += 1
        self._finish(j, "result", res)

    def _sample(self, j: Job, idx: int) -> None:
        if j.t_gen_start is None:
            j.t_gen_start = time.perf_counter()
        tok = self.L.llama_sampler_sample(j.sampler, self.ctx, idx)
        if self.weights.is_control(tok):  # end of generation, or any other control token
            return self._finish_generate(j, "stop")
        j.out_tokens.append(tok)
        self.stats["generated_tokens"] += 1
        if j.emit(self._pieces[tok]):  # a stop text
            return self._finish_generate(j, "stop")
        if len(j.out_tokens) >= j.max_new:
            return self._finish_generate(j, "length")
        j.pending = tok

    def _finish_generate(self, j: Job, reason: str) -> None:
        res = j.generate_result(reason)
        self.stats["generate"] += 1
        self._finish(j, "done", res)

    def _finish(self, j: Job, kind: str, data) -> None:
        if j.done:
            return
        j.done = True
        with self._lock:
            if j in self._active:
                self._active.remove(j)
                self._reserved -= j.need_cells
                if j.slot is not None:
                    self.context.clear(j.slot)
                    self._free_slots.append(j.slot)
                    j.slot = None
            elif j in self._waiting:
                self._waiting.remove(j)
        j.release()
        if isinstance(data, Cancelled):
            self.stats["cancelled"] += 1
        try:
            j.sink(kind, data)
        except Exception:
            pass
