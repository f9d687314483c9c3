"""llama.cpp plumbing: a loaded GGUF (`Model`), a context on it with its batch (`Context`), tokens.

Everything here runs on the caller's thread and knows nothing of requests; the engine
(runtime.engine) schedules requests over one `Model` and one `Context`.

* **One batch fill.** Every evaluation goes through `Context.decode(items)`: each item is
  (token, position, sequence id, wants logits), so a single `llama_decode` can carry several
  sequences, and only the rows asked for are computed. `Context.run` evaluates one sequence's
  tokens in `n_batch` chunks on top of it; `Context.row(i)` is the logits of batch row i.
* **Tokenized as in training.** Prompts arrive as segments (text, trusted) from the prompt profile
  (runtime.profile): trusted ones are template text between special tokens, tokenized with
  `parse_special=True`; untrusted ones are whole runs holding user values, NFC-normalized and
  tokenized with `parse_special=False`. The ids equal HF `tokenizer(prompt)` on the rendered string,
  and a typed "<|im_end|>" stays plain text.
* **Quiet.** llama.cpp logs nothing unless QWEN_LOCAL_LLAMA_LOG is set (`-v` sets it); its error
  lines are kept, so a failed load is one line of ours that quotes llama.cpp's reason.
"""
from __future__ import annotations

import ctypes
import os
from collections import deque
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from qwen_local.runtime.profile import Segment, nfc

Item = tuple[int, int, int, bool]  # (token, position, sequence id, wants logits)


class EngineError(RuntimeError):
    """llama.cpp failed on a request (the server maps it to 503 or to the fallback)."""


class DecodeError(EngineError):
    """llama_decode returned non-zero (e.g. no room left in the KV cache)."""

    def __init__(self, rc: int):
        super().__init__(f"llama_decode returned {rc}")
        self.rc = rc


def default_threads() -> int:
    """The threads every command gives llama.cpp and torch unless told (--threads): the physical
    cores this process may run on. llama.cpp's matmuls gain nothing from a core's second hardware
    thread, and llama-cpp-python's own default (half the logical CPUs) gives 1 thread on 2 cores."""
    try:
        import psutil

        n = psutil.cpu_count(logical=False)
    except Exception:  # pragma: no cover - psutil is a dependency, but be robust
        n = None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS has no affinity mask
        usable = os.cpu_count() or 1
    return max(1, min(n or usable, usable))


def threads_or_default(threads: int | None) -> int:
    return int(threads) if threads else default_threads()


# ------------------------------------------------------------------------------------------------
# logging
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


def _backend():
    import llama_cpp

    _quiet_llama_logs()
    llama_cpp.llama_backend_init()
    return llama_cpp


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


def read_meta(model_path: str | Path, key: str) -> str | None:
    """One metadata value of a GGUF, loading only its header and vocabulary."""
    L = _backend()
    mp = L.llama_model_default_params()
    mp.vocab_only = True
    model = L.llama_model_load_from_file(str(model_path).encode(), mp)
    if not model:
        raise EngineError(f"llama.cpp could not load {model_path} (not a valid GGUF?)")
    try:
        return _meta_str(L, model, key)
    finally:
        L.llama_model_free(model)


def _gguf_problem(path) -> str | None:
    from qwen_local.runtime.gguf_file import gguf_problem

    return gguf_problem(path)


def read_profile(model_path: str | Path):
    """The prompt profile stored in a GGUF by convert (None if it has none), reading only the
    header and vocabulary."""
    from qwen_local.runtime.profile import METADATA_KEY, stored_profile

    return stored_profile(read_meta(model_path, METADATA_KEY), model_path)


def sampler(temperature: float, top_k: int, top_p: float, seed: int):
    """A sampler chain: greedy at temperature <= 0, else top-k, top-p, temperature, seeded draw."""
    import llama_cpp as L

    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    if temperature <= 0:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
    else:
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_k(top_k))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_top_p(top_p, 1))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_temp(temperature))
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_dist(seed))
    return chain


# ------------------------------------------------------------------------------------------------
# the model: weights and vocabulary
# ------------------------------------------------------------------------------------------------
class Model:
    """One GGUF loaded once (`ptr` is the llama_model), with its vocabulary, and the LoRA adapter
    applied at run time to every context on it (`lora`), if any."""

    def __init__(self, path: str | Path, *, n_gpu_layers: int | None = None,
                 mmap: bool | None = None, repack: bool = True, lora: str | Path | None = None):
        """mmap: map the file instead of reading it (default: only with GPU offload, see below);
        with repack=False as well, the weights stay in the page cache and anonymous memory holds
        only the KV cache and compute buffers. lora: a LoRA GGUF to apply (default: the companion
        the file names, see `companion`)."""
        import llama_cpp as L

        self.L = L
        self.path = str(path)
        if not Path(self.path).is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        self.gpu_offload = bool(L.llama_supports_gpu_offload())
        self.n_gpu_layers = (-1 if self.gpu_offload else 0) if n_gpu_layers is None else n_gpu_layers
        _backend()
        mp = L.llama_model_default_params()
        mp.n_gpu_layers = self.n_gpu_layers
        # On the CPU, llama.cpp repacks K-quant weights into anonymous memory; a memory-mapped file
        # would then stay resident beside that copy (3B Q4_K_M: RSS 3.57 GB mapped vs 2.29 GB read,
        # measured). Read the file instead. With GPU offload, mmap lets Metal use the pages directly.
        if mmap is None:
            mmap = self.n_gpu_layers != 0
        mp.load_mode = L.LLAMA_LOAD_MODE_MMAP if mmap else L.LLAMA_LOAD_MODE_NONE
        mp.use_extra_bufts = bool(repack)
        problem = _gguf_problem(self.path)  # llama.cpp would log several lines, or abort
        if problem:
            raise EngineError(f"cannot load {self.path}: {problem}")
        _log_errors.clear()
        self.ptr = L.llama_model_load_from_file(self.path.encode(), mp)
        if not self.ptr:
            raise EngineError(f"llama.cpp could not load {self.path} (not a valid GGUF?)"
                              f"{_llama_reason()}")
        self.vocab = L.llama_model_get_vocab(self.ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.lora_path, self.lora = None, None
        try:
            self._load_lora(lora)
        except BaseException:
            self.close()
            raise

    def _load_lora(self, lora) -> None:
        from qwen_local.runtime.lora import LORA_KEY, companion

        path = Path(lora) if lora is not None else companion(self.path, self.meta(LORA_KEY))
        if path is None:
            return
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file not found: {path}")
        problem = _gguf_problem(path)
        if problem:
            raise EngineError(f"cannot load {path}: {problem}")
        _log_errors.clear()
        # freed together with the model (llama.h)
        self.lora = self.L.llama_adapter_lora_init(self.ptr, str(path).encode())
        if not self.lora:
            raise EngineError(f"llama.cpp could not apply the LoRA file {path} to {self.path}"
                              f"{_llama_reason()}")
        self.lora_path = path

    def meta(self, key: str) -> str | None:
        return _meta_str(self.L, self.ptr, key)

    def describe(self) -> dict:
        buf = ctypes.create_string_buffer(256)
        self.L.llama_model_desc(self.ptr, buf, 256)
        ftype = self.meta("general.file_type")
        lora = self.lora_path
        return {"description": buf.value.decode("utf-8", "replace"),
                "quant": _ftype_name(int(ftype)) if ftype is not None and ftype.isdigit() else None,
                "n_params": int(self.L.llama_model_n_params(self.ptr)),
                "lora": {"file": str(lora), "bytes": lora.stat().st_size} if lora else None,
                "bytes": Path(self.path).stat().st_size + (lora.stat().st_size if lora else 0)}

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

    def is_eog(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_eog(self.vocab, token))

    def is_control(self, token: int) -> bool:
        return bool(self.L.llama_vocab_is_control(self.vocab, token)) or self.is_eog(token)

    def pieces(self) -> list[bytes]:
        """Byte string of every token as it appears in text (control tokens render as b"")."""
        L = self.L
        buf = ctypes.create_string_buffer(256)
        out = []
        for t in range(self.n_vocab):
            n = L.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            out.append(buf.raw[:n] if n > 0 else b"")
        return out

    def validate_grammar(self, grammar: str) -> None:
        """Parse the grammar with llama.cpp's own parser; NULL means invalid (never use it then)."""
        smpl = self.L.llama_sampler_init_grammar(self.vocab, grammar.encode(), b"root")
        if not smpl:
            raise ValueError(f"invalid GBNF grammar: {grammar!r}")
        self.L.llama_sampler_free(smpl)

    def close(self) -> None:
        if self.ptr:
            self.L.llama_model_free(self.ptr)
            self.ptr = None


# ------------------------------------------------------------------------------------------------
# the context: KV cache, batch, logits
# ------------------------------------------------------------------------------------------------
def context_params(*, n_ctx: int, n_batch: int, seqs: int, threads: int, flash_attn: bool,
                   kv_f32: bool = False, eval_callback=None):
    """flash_attn: llama.cpp's fused attention kernel, on or off, as the caller decides; never
    llama.cpp's default (AUTO), which turns it on for the CPU. On the CPU it is not exact: an f32
    GGUF of a tiny Qwen2 against float32 peft is off by 1.4e-3 to 4.2e-3 (relative logit error,
    depending on n_batch) with it, and by 1.2e-6 to 2.9e-6 without (tests/test_scoring.py).
    Every reference, parity, imatrix and fidelity pass runs with it off.
    kv_f32: an f32 KV cache (reference passes: the f16 default adds ~3e-4 of its own).
    eval_callback: a `ggml_backend_sched_eval_callback` (ctypes) called on graph nodes of every
    decode, e.g. to collect an importance matrix; the caller keeps it alive."""
    import llama_cpp as L

    cp = L.llama_context_default_params()
    cp.flash_attn_type = (L.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn
                          else L.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    cp.n_ctx = int(n_ctx)
    cp.n_batch = int(n_batch)
    cp.n_ubatch = int(n_batch)
    cp.n_seq_max = int(seqs)
    cp.kv_unified = True           # shared system-prompt cells across sequences, no copies
    cp.n_threads = threads
    cp.n_threads_batch = threads
    cp.no_perf = True
    if kv_f32:
        cp.type_k = cp.type_v = 0  # GGML_TYPE_F32
    if eval_callback is not None:
        cp.cb_eval = eval_callback
        cp.cb_eval_user_data = None
    return cp


class Context:
    """A llama_context on a loaded model (`model_ptr`: a llama_model) with the model's LoRA adapter
    (`lora`, from `Model.lora`) applied, and the batch that every evaluation fills. Not
    thread-safe: one thread at a time may use it."""

    def __init__(self, model_ptr, params, lora=None):
        import llama_cpp as L

        self.L = L
        self.ctx = L.llama_init_from_model(model_ptr, params)
        if not self.ctx:
            raise EngineError("llama.cpp could not create a context (n_ctx too large for memory?)")
        if lora:
            adapters = (L.llama_adapter_lora_p_ctypes * 1)(lora)
            if L.llama_set_adapters_lora(self.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)) != 0:
                L.llama_free(self.ctx)
                raise EngineError("llama.cpp could not apply the LoRA adapter to a context")
        self.n_ctx = L.llama_n_ctx(self.ctx)
        self.mem = L.llama_get_memory(self.ctx)
        self.vocab = L.llama_model_get_vocab(model_ptr)
        self.n_vocab = L.llama_vocab_n_tokens(self.vocab)
        self.n_batch = int(params.n_batch)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)

    def decode(self, items: Iterable[Item]) -> int:
        """Evaluate one batch of at most n_batch (token, position, sequence, wants logits) items;
        returns how many. Row i of the logits belongs to item i (if it asked for them)."""
        b = self.batch
        n = 0
        for tok, pos, seq, logits in items:
            b.token[n] = tok
            b.pos[n] = pos
            b.n_seq_id[n] = 1
            b.seq_id[n][0] = seq
            b.logits[n] = logits
            n += 1
        b.n_tokens = n
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise DecodeError(rc)
        return n

    def row(self, i: int) -> np.ndarray:
        """Logits of batch row i (-1: the last one asked for): a view of llama.cpp's buffer,
        valid until the next decode."""
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def run(self, seq: int, pos0: int, tokens: list[int], want: Callable[[int], bool] | None = None,
            put: Callable[[int, np.ndarray], None] | None = None) -> None:
        """Evaluate tokens on one sequence from position pos0, in n_batch chunks; for every index i
        with want(i), put(i, row) with the row's view (see `row`)."""
        for start in range(0, len(tokens), self.n_batch):
            chunk = tokens[start:start + self.n_batch]
            flags = [bool(want and want(start + i)) for i in range(len(chunk))]
            self.decode((t, pos0 + start + i, seq, f) for i, (t, f) in enumerate(zip(chunk, flags)))
            for i, f in enumerate(flags):
                if f and put is not None:
                    put(start + i, self.row(i))

    def clear(self, seq: int) -> None:
        self.L.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def share(self, src: int, dst: int) -> None:
        """dst sees src's cells (in a unified cache a metadata update: no copy, no evaluation)."""
        self.L.llama_memory_seq_cp(self.mem, src, dst, -1, -1)

    def cells(self, seq: int) -> int:
        hi = self.L.llama_memory_seq_pos_max(self.mem, seq)
        return 0 if hi < 0 else hi - self.L.llama_memory_seq_pos_min(self.mem, seq) + 1

    def close(self) -> None:
        if self.ctx:
            self.L.llama_batch_free(self.batch)
            self.L.llama_free(self.ctx)
            self.ctx = None
