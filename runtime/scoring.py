"""Verification passes on a llama.cpp context, one sequence at a time: the logits of a token
sequence (logit parity, teacher-forced next-token checks), a greedy continuation (the next-token
teacher) and grammar-constrained greedy decoding (the cross-check of the one-pass intent).

Each takes a `runtime.llama.Context` and a sequence id it may use alone, and leaves that sequence
empty; a prefix is a cached (sequence, length) whose cells the sequence shares, or (None, 0).
`Scorer` is a model and a context of its own for scoring a GGUF with no engine around it.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from qwen_local.runtime.llama import Context, DecodeError, EngineError, Model, context_params, threads_or_default


def score(context: Context, seq: int, tokens: list[int], start: int = 0) -> np.ndarray:
    """Logits ([n - start, vocab], float32) at positions start..n-1 of tokens evaluated from
    position 0."""
    out = np.empty((max(0, len(tokens) - start), context.n_vocab), np.float32)
    try:
        context.clear(seq)
        context.run(seq, 0, tokens, lambda i: i >= start,
                    lambda i, row: out.__setitem__(i - start, row))
    finally:
        context.clear(seq)
    return out


def greedy(context: Context, seq: int, prefix: tuple[int | None, int], rest: list[int],
           steps: int) -> tuple[list[int], np.ndarray]:
    """The greedy continuation of prefix + rest: (tokens fed after rest, the logits each step was
    chosen from). Stops early at the end-of-generation token, which is not fed."""
    L = context.L
    prefix_seq, pos = prefix
    rows: list[np.ndarray] = []
    fed: list[int] = []
    keep = lambda i, row: rows.append(row.copy())  # noqa: E731
    try:
        _start(context, seq, prefix_seq)
        context.run(seq, pos, rest, lambda i: i == len(rest) - 1, keep)
        pos += len(rest)
        while len(rows) < steps:
            tok = int(np.argmax(rows[-1]))
            if L.llama_vocab_is_eog(context.vocab, tok):
                break
            fed.append(tok)
            context.run(seq, pos, [tok], lambda i: True, keep)
            pos += 1
    finally:
        context.clear(seq)
    return fed, np.stack(rows)


def constrained(context: Context, seq: int, prefix: tuple[int | None, int], rest: list[int],
                grammar: str, limit: int = 64) -> list[int]:
    """The tokens that grammar-constrained greedy decoding writes after prefix + rest."""
    L = context.L
    chain = L.llama_sampler_chain_init(L.llama_sampler_chain_default_params())
    try:
        _start(context, seq, prefix[0])
        gram = L.llama_sampler_init_grammar(context.vocab, grammar.encode(), b"root")
        if not gram:
            raise ValueError("invalid grammar")
        L.llama_sampler_chain_add(chain, gram)
        L.llama_sampler_chain_add(chain, L.llama_sampler_init_greedy())
        pos = prefix[1]
        context.run(seq, pos, rest, lambda i: i == len(rest) - 1)
        pos += len(rest)
        out: list[int] = []
        for _ in range(limit):
            tok = L.llama_sampler_sample(chain, context.ctx, -1)
            if L.llama_vocab_is_eog(context.vocab, tok):
                break
            out.append(tok)
            context.decode([(tok, pos, seq, True)])
            pos += 1
        return out
    except DecodeError:
        raise EngineError("llama_decode failed") from None
    finally:
        L.llama_sampler_free(chain)
        context.clear(seq)


def _start(context: Context, seq: int, prefix_seq: int | None) -> None:
    context.clear(seq)
    if prefix_seq is not None:
        context.share(prefix_seq, seq)


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



class Scorer:
    """llama.cpp over one GGUF for scoring, with no engine around it: logits at every position
    of one token sequence, and tokenization. Flash attention is off: scoring is exact. n_ctx is rounded up to 64 tokens. n_batch 64: llama.cpp's output rows (vocabulary-wide)
    stay at 39 MB. lean: the file is memory-mapped and its quantized weights are not repacked, so
    anonymous memory holds only the KV cache and compute buffers (a repacked 3B q4_k_m alone takes
    ~1.4 GB of it)."""

    def __init__(self, path: str | Path, n_ctx: int, threads: int | None, *, kv_f32: bool = False,
                 lean: bool = False, n_batch: int = 64, lora: str | Path | None = None):
        n_ctx = max(64, int(math.ceil(n_ctx / 64) * 64))
        self.model = Model(path, lora=lora, **(dict(mmap=True, repack=False) if lean else {}))
        try:
            self.context = Context(self.model.ptr, context_params(
                n_ctx=n_ctx, n_batch=n_batch, seqs=1, threads=threads_or_default(threads),
                flash_attn=False, kv_f32=kv_f32), lora=self.model.lora)
        except BaseException:
            self.model.close()
            raise
        self.n_vocab = self.model.n_vocab

    def tokenize(self, text: str) -> list[int]:
        return self.model.tokenize(text, special=False)

    def logits(self, tokens: list[int], start: int = 0) -> np.ndarray:
        """Logits of positions start..len(tokens)-1 (only those rows are computed and copied)."""
        return score(self.context, 0, list(tokens), int(start))

    def close(self) -> None:
        self.context.close()
        self.model.close()
