"""One llama.cpp model, one context, one worker thread: intent and replies, both warm.

Design (why it is built on llama.cpp's low-level API rather than `llama_cpp.Llama`):

* **One copy of the weights.** One `llama_model` is loaded once (Q4_K weights are repacked into
  anonymous memory per model: a second `Llama` would double that) and one `llama_context` serves
  both prompts.
* **Both system prompts stay warm.** The context's KV cache is *unified* (`kv_unified=True`) and
  holds several sequences. Sequence 0 keeps the intent system prompt's KV, sequence 1 the reply
  system prompt's, each evaluated once at start-up. A request gets a working sequence ("slot") and
  `llama_memory_seq_cp(prefix, slot)` shares the prefix cells with it, which in a unified cache is a
  metadata update: no copy, no re-evaluation. Only the user turn is evaluated, and when the request
  ends `llama_memory_seq_rm(slot)` drops only the slot's own cells. `Llama.generate`'s single
  longest-common-prefix slot, by contrast, evicts one system prompt whenever the other is used.
* **Continuous multi-sequence batching.** The worker runs steps: each step puts the next token of
  every generating slot and the pending prompt tokens of newly admitted requests (intent or reply)
  into one `llama_batch` with per-token sequence ids, calls `llama_decode` once, and reads each
  output row with `llama_get_logits_ith`. Concurrent intent requests, the batch endpoint's queries
  and running generations therefore share decode calls (NOTES: 4 sequences ~2x the throughput of 1).
* **Intent in one forward pass.** The logits after the user turn give the label probabilities
  (`labels.label_probs`); no token is sampled. See `grammar_intent` for the constrained-decoding
  cross-check.
* **Tokenized as in training.** Prompts arrive as segments (text, trusted) from the prompt profile
  (runtime.profile): trusted ones are template text between special tokens, tokenized with
  `parse_special=True`; untrusted ones are whole runs holding user values, NFC-normalized and
  tokenized with `parse_special=False`. The ids equal HF `tokenizer(prompt)` on the rendered string,
  and a typed "<|im_end|>" stays plain text.
* **The profile travels with the model.** With no profile given, the one that `convert` stored in
  the GGUF (`qwen_local.prompts`) is served; a GGUF without one gets the built-in default.

The engine is thread-safe: any thread may `submit`; all llama.cpp calls happen on the worker thread.
Jobs report through a `sink(kind, data)` callback called on the worker thread.
"""
from __future__ import annotations

import codecs
import ctypes
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from runtime import labels as labels_mod
from runtime.profile import METADATA_KEY, Profile, ProfileError, Segment, from_json, load_profile, nfc


class EngineError(RuntimeError):
    """llama.cpp failed on a request (the server maps it to 503 or to the fallback)."""


class Cancelled(EngineError):
    """The request was cancelled (client gone or timed out) before it finished."""


class TooLong(ValueError):
    """The request cannot fit in the context (the server maps it to 413)."""


def physical_cores() -> int:
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but be robust
        n = None
    return max(1, n or os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------
# llama.cpp logging: silent unless QWEN_LOCAL_LLAMA_LOG is set (`-v` sets it). Its error lines are
# kept, not printed, so a failed load can be one line of ours that quotes llama.cpp's reason.
# ------------------------------------------------------------------------------------------------
_log_cb = None
_log_errors: deque[str] = deque(maxlen=8)


def _quiet_llama_logs() -> None:
    global _log_cb
    import llama_cpp

    if _log_cb is not None or os.environ.get("QWEN_LOCAL_LLAMA_LOG"):
        return

    @llama_cpp.llama_log_callback
    def _cb(level, text, user_data):  # noqa: ARG001
        if level == 4:  # GGML_LOG_LEVEL_ERROR
            line = text.decode("utf-8", "replace").strip()
            if line:
                _log_errors.append(line)

    _log_cb = _cb  # keep a reference: llama.cpp holds the pointer
    llama_cpp.llama_log_set(_log_cb, ctypes.c_void_p(0))


def _llama_reason() -> str:
    """The first error llama.cpp logged since the last call (its first line names the cause)."""
    reason = _log_errors[0] if _log_errors else ""
    _log_errors.clear()
    return f": {reason}" if reason else ""


_FTYPE_NAMES: dict[int, str] | None = None


def _ftype_name(ftype: int) -> str:
    global _FTYPE_NAMES
    if _FTYPE_NAMES is None:
        import llama_cpp

        _FTYPE_NAMES = {}
        for k in dir(llama_cpp):
            if k.startswith("LLAMA_FTYPE_"):
                v = getattr(llama_cpp, k)
                if isinstance(v, int):
                    _FTYPE_NAMES.setdefault(v, k.replace("LLAMA_FTYPE_MOSTLY_", "").replace(
                        "LLAMA_FTYPE_", ""))
    return _FTYPE_NAMES.get(ftype, str(ftype))


def read_profile(model_path: str | Path) -> Profile | None:
    """The prompt profile stored in a GGUF by convert (None if it has none), reading only the
    header and vocabulary."""
    import llama_cpp as L

    _quiet_llama_logs()
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise EngineError(f"llama.cpp could not load {model_path} (not a valid GGUF?)")
    try:
        text = _meta_str(L, model, METADATA_KEY)
    finally:
        L.llama_model_free(model)
    return from_json(text, f"the prompt profile stored in {model_path}") if text else None


def _meta_str(L, model, key: str) -> str | None:
    """A GGUF metadata value as text, however long (the stored profile is a few KB)."""
    size = 256
    while True:
        buf = ctypes.create_string_buffer(size)
        n = L.llama_model_meta_val_str(model, key.encode(), buf, size)
        if n < 0:
            return None
        if n < size:
            return buf.raw[:n].decode("utf-8", "replace")
        size = n + 1


# ------------------------------------------------------------------------------------------------
# results and jobs
# ------------------------------------------------------------------------------------------------
@dataclass
class IntentResult:
    intent: str                 # argmax of the normalized label masses (labels.decide)
    probs: dict[str, float]     # normalized label probabilities
    greedy: str                 # grammar-greedy's first choice (labels.greedy_first_label)
    n_prompt_tokens: int        # tokens evaluated for this request (the user turn + tail)
    latency_ms: float = 0.0


@dataclass
class GenerateResult:
    message: str
    finish_reason: str          # "stop" | "length"
    n_prompt_tokens: int
    n_tokens: int               # generated tokens
    latency_ms: float
    tokens_per_s: float


@dataclass
class _Job:
    kind: str                            # "intent" | "generate"
    prefix_seq: int | None               # cached prefix sequence to share, or None
    prefix_len: int
    tokens: list[int]                    # to evaluate after the prefix
    sink: Callable[[str, object], None]
    max_new: int = 0
    temperature: float = 0.0
    top_p: float = 0.9
    top_k: int = 40
    seed: int = 0
    # worker state
    slot: int | None = None
    n_eval: int = 0                      # of `tokens`, how many are in the KV cache
    pos: int = 0
    pending: int | None = None           # sampled token not yet evaluated
    out_tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    decoder: object = None
    sampler: object = None
    cancelled: bool = False
    done: bool = False
    t_submit: float = field(default_factory=time.perf_counter)
    t_first_eval: float | None = None
    t_gen_start: float | None = None

    @property
    def need_cells(self) -> int:
        return len(self.tokens) + self.max_new + 1

    def cancel(self) -> None:
        """Ask the worker to drop this job at its next step (safe from any thread)."""
        self.cancelled = True


# ------------------------------------------------------------------------------------------------
# the engine
# ------------------------------------------------------------------------------------------------
class Engine:
    INTENT_SEQ = 0
    REPLY_SEQ = 1

    def __init__(self, model_path: str | Path, cfg: Profile | None = None, *,
                 threads: int | None = None, n_ctx: int = 8192, slots: int = 4,
                 n_batch: int = 512, n_gpu_layers: int | None = None, warmup: bool = True,
                 kv_f32: bool = False, mmap: bool | None = None, repack: bool = True,
                 eval_callback=None, prefixes: bool = True):
        """kv_f32: an f32 KV cache (reference passes: the f16 default adds ~3e-4 of its own).
        mmap: map the file instead of reading it (default: only with GPU offload, see below); with
        repack=False as well, the weights stay in the page cache and anonymous memory holds only
        the KV cache and compute buffers. eval_callback: a `ggml_backend_sched_eval_callback`
        (ctypes) called on graph nodes of every decode, e.g. to collect an importance matrix;
        the caller keeps it alive. prefixes=False: no system prompt is cached (scoring only)."""
        import llama_cpp as L

        self.L = L
        self.model_path = str(model_path)
        if not Path(self.model_path).is_file():
            raise FileNotFoundError(f"model file not found: {self.model_path}")
        self.threads = int(threads or physical_cores())
        self.gpu_offload = bool(L.llama_supports_gpu_offload())
        self.n_gpu_layers = (-1 if self.gpu_offload else 0) if n_gpu_layers is None else n_gpu_layers
        self.slots = max(1, int(slots))
        self.n_batch = int(n_batch)

        _quiet_llama_logs()
        L.llama_backend_init()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers
        # On the CPU, llama.cpp repacks K-quant weights into anonymous memory; a memory-mapped file
        # would then stay resident beside that copy (3B Q4_K_M: RSS 3.57 GB mapped vs 2.29 GB read,
        # measured). Read the file instead. With GPU offload, mmap lets Metal use the pages directly.
        if mmap is None:
            mmap = self.n_gpu_layers != 0
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = bool(repack)
        from runtime.gguf_file import gguf_problem

        problem = gguf_problem(self.model_path)  # llama.cpp would log several lines, or abort
        if problem:
            raise EngineError(f"cannot load {self.model_path}: {problem}")
        _log_errors.clear()
        self.model = L.llama_model_load_from_file(self.model_path.encode(), mp)
        if not self.model:
            raise EngineError(f"llama.cpp could not load {self.model_path} (not a valid GGUF?)"
                              f"{_llama_reason()}")
        self.vocab = L.llama_model_get_vocab(self.model)
        try:
            self.stored_profile = self._stored_profile()
            self.cfg = cfg or self.stored_profile or load_profile()
        except ProfileError:
            L.llama_model_free(self.model)
            raise
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)

        cp = L.llama_context_default_params()
        cp.n_ctx = int(n_ctx)
        cp.n_batch = self.n_batch
        cp.n_ubatch = self.n_batch
        cp.n_seq_max = self.slots + 2
        cp.kv_unified = True           # shared system-prompt cells across sequences, no copies
        cp.n_threads = self.threads
        cp.n_threads_batch = self.threads
        cp.no_perf = True
        if kv_f32:
            cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
        if eval_callback is not None:
            cp.cb_eval = eval_callback
            cp.cb_eval_user_data = None
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            L.llama_model_free(self.model)
            raise EngineError("llama.cpp could not create a context (n_ctx too large for memory?)")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.mem = L.llama_get_memory(self.ctx)
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        try:
            self._pieces = self._all_pieces()
            self.groups = labels_mod.prefix_groups(self.cfg.labels, enumerate(self._pieces))
            self.grammar = self.label_grammar(self.cfg.labels)
            self._validate_grammar(self.grammar)

            # warm both system prompts, once
            self.prefixes: dict[str, tuple[int, int]] = {}
            for seq, kind in ((self.INTENT_SEQ, "intent"), (self.REPLY_SEQ, "reply"))[:2 * prefixes]:
                text = self.cfg.head(kind)
                toks = self.tokenize(text, special=True)
                if len(toks) + 64 > self.n_ctx // 2:
                    raise ValueError(f"the system prompt takes {len(toks)} tokens: too long for "
                                     f"a {self.n_ctx}-token context")
                self._eval_prefix(seq, toks)
                self.prefixes[text] = (seq, len(toks))
            self._prefix_cells = sum(n for _, n in self.prefixes.values())
        except BaseException:
            L.llama_batch_free(self._batch)
            L.llama_free(self.ctx)
            L.llama_model_free(self.model)
            raise

        self.stats = {"requests": 0, "intent": 0, "generate": 0, "cancelled": 0, "errors": 0,
                      "decode_calls": 0, "max_seqs_per_batch": 0, "generated_tokens": 0,
                      "prompt_tokens": 0}
        self._lock = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._active: list[_Job] = []
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

    # -------------------------------------------------------------- description
    def describe(self) -> dict:
        L = self.L
        buf = ctypes.create_string_buffer(256)
        L.llama_model_desc(self.model, buf, 256)
        ftype = self._meta("general.file_type")
        return {
            "model": self.model_path,
            "description": buf.value.decode("utf-8", "replace"),
            "quant": _ftype_name(int(ftype)) if ftype is not None and ftype.isdigit() else None,
            "n_params": int(L.llama_model_n_params(self.model)),
            "threads": self.threads,
            "gpu_offload": self.gpu_offload,
            "n_gpu_layers": self.n_gpu_layers,
            "n_ctx": self.n_ctx,
            "slots": self.slots,
            "labels": list(self.cfg.labels),
            # as_converted: the prompts that convert verified this file with (stored in the GGUF)
            "profile": {**self.cfg.describe(), "as_converted": self.stored_profile is not None
                        and self.stored_profile.sha256 == self.cfg.sha256},
            "cached_prefix_tokens": {k: self.prefixes.get(self.cfg.head(k), (None, 0))[1]
                                     for k in ("intent", "reply")},
        }

    def _meta(self, key: str) -> str | None:
        return _meta_str(self.L, self.model, key)

    def _stored_profile(self) -> Profile | None:
        text = self._meta(METADATA_KEY)
        return from_json(text, f"the prompt profile stored in {self.model_path}") if text else None

    # -------------------------------------------------------------- tokens
    def tokenize(self, text: str, *, special: bool) -> list[int]:
        L = self.L
        data = text.encode("utf-8")
        n_max = len(data) + 16
        arr = (L.llama_token * n_max)()
        n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, False, special)
        if n < 0:
            n_max = -n
            arr = (L.llama_token * n_max)()
            n = L.llama_tokenize(self.vocab, data, len(data), arr, n_max, False, special)
        if n < 0:
            raise EngineError("tokenization failed")
        return list(arr[:n])

    def tokenize_segments(self, segments: list[Segment]) -> list[int]:
        """Trusted segments may contain special tokens; untrusted ones never do (and are NFC'd)."""
        out: list[int] = []
        for text, trusted in segments:
            out += self.tokenize(text if trusted else nfc(text), special=trusted)
        return out

    def is_control(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_control(self.vocab, token)) or bool(
            self.L.llama_vocab_is_eog(self.vocab, token))

    def piece(self, token: int) -> bytes:
        return self._pieces[token]

    def _all_pieces(self) -> list[bytes]:
        """Byte string of every token as it appears in text (control tokens render as b"")."""
        L = self.L
        buf = ctypes.create_string_buffer(256)
        out = []
        for t in range(self.n_vocab):
            n = L.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            out.append(buf.raw[:n] if n > 0 else b"")
        return out

    # -------------------------------------------------------------- grammar (verification only)
    @staticmethod
    def label_grammar(labels) -> str:
        """GBNF admitting exactly one label: root ::= "fashion" | "chitchat" | "off_topic"."""
        def lit(s: str) -> str:
            out = []
            for ch in s:
                if ch in '"\\':
                    out.append("\\" + ch)
                elif ch == "\n":
                    out.append("\\n")
                elif ord(ch) < 0x20 or ord(ch) > 0x7E:
                    out.append(f"\\u{ord(ch):04x}" if ord(ch) <= 0xFFFF else f"\\U{ord(ch):08x}")
                else:
                    out.append(ch)
            return '"' + "".join(out) + '"'

        return "root ::= " + " | ".join(lit(x) for x in labels)

    def _validate_grammar(self, grammar: str) -> None:
        """Parse the grammar with llama.cpp's own parser; NULL means invalid (never use it then)."""
        smpl = self.L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not smpl:
            raise ValueError(f"invalid GBNF grammar: {grammar!r}")
        self.L.llama_sampler_free(smpl)

    # -------------------------------------------------------------- public API
    def prepare(self, kind: str, segments: list[Segment], *, sink, max_new: int = 0,
                temperature: float = 0.0, top_p: float = 0.9, top_k: int = 40,
                seed: int | None = None, use_cache: bool = True) -> _Job:
        """Tokenize and size a job (raises TooLong) without queuing it.

        With use_cache (the default), a prompt whose first segment is a cached system prefix shares
        that prefix's KV cells and evaluates only the rest; without it the whole prompt is evaluated.
        """
        head = segments[0][0] if segments and segments[0][1] else None
        if use_cache and head in self.prefixes:
            seq, n_prefix = self.prefixes[head]
            rest = self.tokenize_segments(segments[1:])
        else:
            seq, n_prefix, rest = None, 0, self.tokenize_segments(segments)
        job = _Job(kind=kind, prefix_seq=seq, prefix_len=n_prefix, tokens=rest, sink=sink,
                   max_new=int(max_new), temperature=float(temperature), top_p=float(top_p),
                   top_k=int(top_k), seed=int(seed if seed is not None else time.time_ns() & 0x7FFFFFFF))
        budget = self.n_ctx - self._prefix_cells - 8
        if job.need_cells > budget:
            raise TooLong(f"the prompt needs {job.need_cells} tokens of context "
                          f"({len(rest)} prompt + {job.max_new} reply); this server has {budget}")
        return job

    def submit(self, jobs: list[_Job]) -> None:
        with self._lock:
            if self._closed:
                raise EngineError("engine is closed")
            for j in jobs:
                j.t_submit = time.perf_counter()
                self._waiting.append(j)
                self.stats["requests"] += 1
            self._lock.notify()

    def intent_job(self, query: str, sink, use_cache: bool = True) -> _Job:
        return self.prepare("intent", self.cfg.intent_prompt(query), sink=sink, use_cache=use_cache)

    def generate_job(self, query: str, intent: str | None, has_products: bool,
                     products: list[dict] | None, sink, *, max_tokens: int | None = None,
                     temperature: float | None = None, top_p: float | None = None,
                     top_k: int | None = None, seed: int | None = None) -> _Job:
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
        L = self.L
        out = {}
        for seq in range(2 + self.slots):
            hi = L.llama_memory_seq_pos_max(self.mem, seq)
            out[seq] = 0 if hi < 0 else hi - L.llama_memory_seq_pos_min(self.mem, seq) + 1
        self._kv = out

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
        jobs = [self.intent_job(q, self._queue_sink(qq), use_cache) for q, qq in zip(queries, qs)]
        self.submit(jobs)
        out = []
        for j, qq in zip(jobs, qs):
            kind, data = self._wait(j, qq, timeout)
            out.append(data)
        return out

    def generate(self, query: str, intent: str | None = None, has_products: bool = False,
                 products: list[dict] | None = None, **kw) -> Iterator[str | GenerateResult]:
        """Yield text deltas, then the GenerateResult. Closing the iterator cancels the job."""
        qq: queue.Queue = queue.Queue()
        timeout = kw.pop("timeout", None)
        job = self.generate_job(query, intent, has_products, products, self._queue_sink(qq), **kw)
        self.submit([job])
        try:
            while True:
                kind, data = self._wait(job, qq, timeout)
                if kind == "delta":
                    yield data
                else:
                    yield data
                    return
        finally:
            job.cancel()

    @staticmethod
    def _queue_sink(qq: queue.Queue):
        return lambda kind, data: qq.put((kind, data))

    @staticmethod
    def _wait(job: _Job, qq: queue.Queue, timeout: float | None):
        try:
            kind, data = qq.get(timeout=timeout)
        except queue.Empty:
            job.cancel()
            raise TimeoutError("engine timeout") from None
        if kind == "error":
            raise data
        return kind, data

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

    def grammar_intent(self, query: str) -> tuple[str, list[int]]:
        """The label that GBNF-constrained greedy decoding writes, and its tokens.

        Verification path only: the one-pass intent never samples. With the labels' first tokens
        in disjoint groups, greedy decoding's first token (the single most likely allowed token)
        fixes the label, so this equals `labels.greedy_first_label` on the same logits; the served
        `intent` is the argmax of the group *masses* (`labels.decide`), which agrees with it
        whenever the top label's mass is clearly ahead (a peaked, trained classifier) and may differ
        on flat distributions (random weights), where several small tokens can outweigh one large.
        """
        segs = self.cfg.intent_prompt(query)
        head, n_prefix = self.prefixes[segs[0][0]]
        rest = self.tokenize_segments(segs[1:])
        return self.call(lambda: self._grammar_decode(head, n_prefix, rest))

    def score(self, tokens: list[int], start: int = 0) -> np.ndarray:
        """Logits ([n - start, vocab], float32) at positions start..n-1 of one token sequence
        evaluated from position 0 without any cached prefix (logit-parity and next-token checks)."""
        return self.call(lambda: self._score(list(tokens), int(start)))

    def greedy_steps(self, segments: list[Segment], steps: int = 4) -> tuple[list[int], np.ndarray]:
        """A next-token teacher: the greedy continuation of a prompt (the cached system prefix is
        shared) and the logits each step was chosen from ([n, vocab]); returns (tokens fed after
        the prompt, rows). Stops early at the end-of-turn token, which is not fed."""
        head = segments[0][0] if segments and segments[0][1] else None
        if head in self.prefixes:
            seq, n_prefix = self.prefixes[head]
            rest = self.tokenize_segments(segments[1:])
        else:
            seq, n_prefix, rest = None, 0, self.tokenize_segments(segments)
        return self.call(lambda: self._greedy(seq, n_prefix, rest, int(steps)))

    def _score(self, tokens: list[int], start: int) -> np.ndarray:
        slot = self._free_slots[0]
        out = np.empty((max(0, len(tokens) - start), self.n_vocab), np.float32)
        try:
            self.L.llama_memory_seq_rm(self.mem, slot, -1, -1)
            self._decode_run(slot, 0, tokens, lambda i: i >= start,
                             lambda i, row: out.__setitem__(i - start, row))
        finally:
            self.L.llama_memory_seq_rm(self.mem, slot, -1, -1)
        return out

    def _greedy(self, prefix_seq: int | None, n_prefix: int, rest: list[int], steps: int):
        L = self.L
        slot = self._free_slots[0]
        rows: list[np.ndarray] = []
        fed: list[int] = []
        try:
            L.llama_memory_seq_rm(self.mem, slot, -1, -1)
            if prefix_seq is not None:
                L.llama_memory_seq_cp(self.mem, prefix_seq, slot, -1, -1)
            keep = lambda i, row: rows.append(row.copy())  # noqa: E731
            self._decode_run(slot, n_prefix, rest, lambda i: i == len(rest) - 1, keep)
            pos = n_prefix + len(rest)
            while len(rows) < steps:
                tok = int(np.argmax(rows[-1]))
                if L.llama_vocab_is_eog(self.vocab, tok):
                    break
                fed.append(tok)
                self._decode_run(slot, pos, [tok], lambda i: True, keep)
                pos += 1
        finally:
            L.llama_memory_seq_rm(self.mem, slot, -1, -1)
        return fed, np.stack(rows)

    def _decode_run(self, slot: int, pos0: int, tokens: list[int], want, put) -> None:
        """Evaluate tokens on one sequence in n_batch chunks; for every index i with want(i),
        put(i, logits) with a view of llama.cpp's row, valid until the next decode (worker
        thread only)."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            flags = [bool(want(start + i)) for i in range(len(chunk))]
            self._fill((t, pos0 + start + i, slot, f) for i, (t, f) in enumerate(zip(chunk, flags)))
            rc = self.L.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise EngineError(f"llama_decode returned {rc}")
            for i, f in enumerate(flags):
                if f:
                    ptr = self.L.llama_get_logits_ith(self.ctx, i)
                    put(start + i, np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)))

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout=30)
        L = self.L
        L.llama_batch_free(self._batch)
        L.llama_free(self.ctx)
        L.llama_model_free(self.model)
        self.ctx = self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -------------------------------------------------------------- worker internals
    def _eval_prefix(self, seq: int, toks: list[int]) -> None:
        L = self.L
        L.llama_memory_seq_rm(self.mem, seq, -1, -1)
        for start in range(0, len(toks), self.n_batch):
            chunk = toks[start:start + self.n_batch]
            self._fill(((t, start + i, seq, False) for i, t in enumerate(chunk)))
            rc = L.llama_decode(self.ctx, self._batch)
            if rc != 0:
                raise EngineError(f"llama_decode failed on the system prompt (rc={rc})")

    def _fill(self, items) -> int:
        b = self._batch
        n = 0
        for tok, pos, seq, logits in items:
            b.token[n] = tok
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = logits
            n += 1
        b.n_tokens = n
        return n

    def _grammar_decode(self, prefix_seq: int, n_prefix: int, rest: list[int]):
        L = self.L
        slot = self._free_slots[0]
        L.llama_memory_seq_rm(self.mem, slot, -1, -1)
        L.llama_memory_seq_cp(self.mem, prefix_seq, slot, -1, -1)
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        gram = L.llama_sampler_init_grammar(self.vocab, self.grammar.encode(), b"root")
        if not gram:
            raise ValueError("invalid grammar")
        L.llama_sampler_chain_add(chain, gram)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        try:
            pos = n_prefix
            for start in range(0, len(rest), self.n_batch):
                chunk = rest[start:start + self.n_batch]
                last = start + len(chunk) == len(rest)
                self._fill((t, pos + i, slot, last and i == len(chunk) - 1)
                           for i, t in enumerate(chunk))
                if L.llama_decode(self.ctx, self._batch) != 0:
                    raise EngineError("llama_decode failed")
                pos += len(chunk)
            out: list[int] = []
            for _ in range(64):
                tok = L.llama_sampler_sample(chain, self.ctx, -1)
                if L.llama_vocab_is_eog(self.vocab, tok):
                    break
                out.append(tok)
                self._fill([(tok, pos, slot, True)])
                if L.llama_decode(self.ctx, self._batch) != 0:
                    raise EngineError("llama_decode failed")
                pos += 1
            text = b"".join(self._pieces[t] for t in out).decode("utf-8", "replace")
            return text, out
        finally:
            L.llama_sampler_free(chain)
            L.llama_memory_seq_rm(self.mem, slot, -1, -1)

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
        L = self.L
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
                j.slot = self._free_slots.pop(0)
                self._reserved += j.need_cells
                self._active.append(j)
                L.llama_memory_seq_rm(self.mem, j.slot, -1, -1)
                if j.prefix_seq is not None:
                    L.llama_memory_seq_cp(self.mem, j.prefix_seq, j.slot, -1, -1)
                j.pos = j.prefix_len
                if j.kind == "generate":
                    j.decoder = codecs.getincrementaldecoder("utf-8")("replace")
                    j.sampler = self._make_sampler(j)

    def _make_sampler(self, j: _Job):
        L = self.L
        chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
        if j.temperature <= 0:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        else:
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(j.top_k))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(j.top_p, 1))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(j.temperature))
            L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(j.seed))
        return chain

    def _step(self) -> None:
        L = self.L
        self._admit()
        for j in [j for j in self._active if j.cancelled]:
            self._finish(j, "error", Cancelled("cancelled"))
        if not self._active:
            return
        items: list[tuple[int, int, int, bool]] = []
        outputs: list[tuple[_Job, int]] = []   # (job, batch index)
        budget = self.n_batch
        for j in self._active:                 # generating slots first: one token each
            if j.pending is not None and budget > 0:
                items.append((j.pending, j.pos, j.slot, True))
                outputs.append((j, len(items) - 1))
                budget -= 1
        for j in self._active:                 # then prompt tokens, FIFO, chunked
            if j.pending is None and j.n_eval < len(j.tokens) and budget > 0:
                take = min(budget, len(j.tokens) - j.n_eval)
                for i in range(take):
                    last = j.n_eval + i == len(j.tokens) - 1
                    items.append((j.tokens[j.n_eval + i], j.pos + i, j.slot, last))
                if j.n_eval + take == len(j.tokens):
                    outputs.append((j, len(items) - 1))
                if j.t_first_eval is None:
                    j.t_first_eval = time.perf_counter()
                budget -= take
        if not items:
            return
        self._fill(items)
        rc = L.llama_decode(self.ctx, self._batch)
        self.stats["decode_calls"] += 1
        self.stats["max_seqs_per_batch"] = max(self.stats["max_seqs_per_batch"],
                                               len({s for _, _, s, _ in items}))
        if rc != 0:
            raise EngineError(f"llama_decode returned {rc}")
        # advance positions
        for j in self._active:
            if j.pending is not None:
                j.pos += 1
                j.pending = None
        counted: dict[int, int] = {}
        for tok, pos, slot, _ in items:
            counted[slot] = counted.get(slot, 0) + 1
        for j in self._active:
            if j.n_eval < len(j.tokens) and j.slot in counted:
                n = counted[j.slot]
                j.n_eval += n
                j.pos += n
                self.stats["prompt_tokens"] += n
        for j, idx in outputs:
            if j.kind == "intent":
                self._finish_intent(j, idx)
            else:
                self._sample(j, idx)

    def _logits(self, idx: int) -> np.ndarray:
        ptr = self.L.llama_get_logits_ith(self.ctx, idx)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def _finish_intent(self, j: _Job, idx: int) -> None:
        logits = self._logits(idx)
        probs = labels_mod.label_probs(logits, self.groups)
        res = IntentResult(intent=labels_mod.decide(probs), probs=probs,
                           greedy=labels_mod.greedy_first_label(logits, self.groups),
                           n_prompt_tokens=len(j.tokens),
                           latency_ms=(time.perf_counter() - j.t_submit) * 1000)
        self.stats["intent"] += 1
        self._finish(j, "result", res)

    def _sample(self, j: _Job, idx: int) -> None:
        L = self.L
        if j.t_gen_start is None:
            j.t_gen_start = time.perf_counter()
        tok = L.llama_sampler_sample(j.sampler, self.ctx, idx)
        if L.llama_vocab_is_eog(self.vocab, tok) or L.llama_vocab_is_control(self.vocab, tok):
            return self._finish_generate(j, "stop")
        j.out_tokens.append(tok)
        self.stats["generated_tokens"] += 1
        delta = j.decoder.decode(self._pieces[tok])
        if delta:
            j.text.append(delta)
            j.sink("delta", delta)
        if len(j.out_tokens) >= j.max_new:
            return self._finish_generate(j, "length")
        j.pending = tok

    def _finish_generate(self, j: _Job, reason: str) -> None:
        tail = j.decoder.decode(b"", final=True)
        if tail:
            j.text.append(tail)
            j.sink("delta", tail)
        now = time.perf_counter()
        dt = now - (j.t_gen_start or now)
        n = len(j.out_tokens)
        res = GenerateResult(message="".join(j.text), finish_reason=reason,
                             n_prompt_tokens=len(j.tokens), n_tokens=n,
                             latency_ms=(now - j.t_submit) * 1000,
                             tokens_per_s=(n / dt) if dt > 0 and n > 1 else 0.0)
        self.stats["generate"] += 1
        self._finish(j, "done", res)

    def _finish(self, j: _Job, kind: str, data) -> None:
        L = self.L
        if j.done:
            return
        j.done = True
        with self._lock:
            if j in self._active:
                self._active.remove(j)
                self._reserved -= j.need_cells
                if j.slot is not None:
                    L.llama_memory_seq_rm(self.mem, j.slot, -1, -1)
                    self._free_slots.append(j.slot)
                    j.slot = None
            elif j in self._waiting:
                self._waiting.remove(j)
        if j.sampler is not None:
            L.llama_sampler_free(j.sampler)
            j.sampler = None
        if isinstance(data, Cancelled):
            self.stats["cancelled"] += 1
        try:
            j.sink(kind, data)
        except Exception:
            pass

