"""What the engine queues and what it answers: jobs, their results, the request errors, and how
one decode step's batch is drawn from the running jobs.

A job is created (tokenized and sized) by `Engine.prepare`, queued by `Engine.submit`, and then
owned by the engine's worker thread, which reports through the job's `sink(kind, data)`:
"result" (IntentResult), "delta" (text) then "done" (GenerateResult), or "error" (an exception).
"""
from __future__ import annotations

import codecs
import queue
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from qwen_local.runtime import labels as labels_mod
from qwen_local.runtime.llama import EngineError, Item, sampler


class Cancelled(EngineError):
    """The request was cancelled (client gone or timed out) before it finished."""


class TooLong(ValueError):
    """The request cannot fit in the context (the server maps it to 413)."""


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
class Job:
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
    groups: dict | None = None           # an intent job's label groups (labels.prefix_groups)
    stop: tuple[str, ...] = ()           # texts that end a generation
    # worker state
    slot: int | None = None
    n_eval: int = 0                      # of `tokens`, how many are in the KV cache
    pos: int = 0
    pending: int | None = None           # sampled token not yet evaluated
    out_tokens: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    held: str = ""                       # decoded text that may be the start of a stop text
    cut: bool = False                    # a stop text ended the text
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

    def start(self, slot: int) -> None:
        """Admitted: the job evaluates on `slot` (from position prefix_len, after the shared prefix)."""
        self.slot = slot
        self.pos = self.prefix_len
        if self.kind == "generate":
            self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
            self.sampler = sampler(self.temperature, self.top_k, self.top_p, self.seed)

    def release(self) -> None:
        if self.sampler is not None:
            import llama_cpp

            llama_cpp.llama_sampler_free(self.sampler)
            self.sampler = None

    def prompt_items(self, budget: int) -> list[Item]:
        """The next at most `budget` prompt tokens as batch items; only the prompt's very last
        token asks for logits (the intent's distribution, or the first reply token's)."""
        take = min(budget, len(self.tokens) - self.n_eval)
        last = len(self.tokens) - 1
        if self.t_first_eval is None:
            self.t_first_eval = time.perf_counter()
        return [(self.tokens[self.n_eval + i], self.pos + i, self.slot, self.n_eval + i == last)
                for i in range(take)]

    def intent_result(self, logits: np.ndarray, groups: dict) -> IntentResult:
        probs = labels_mod.label_probs(logits, groups)
        return IntentResult(intent=labels_mod.decide(probs), probs=probs,
                            greedy=labels_mod.greedy_first_label(logits, groups),
                            n_prompt_tokens=len(self.tokens),
                            latency_ms=(time.perf_counter() - self.t_submit) * 1000)

    def emit(self, piece: bytes) -> bool:
        """Stream a generated token's bytes as text once they complete a UTF-8 character; True
        when the text now holds a stop text (the text before it is streamed, the rest dropped)."""
        return self._put(self.decoder.decode(piece))

    def _put(self, delta: str) -> bool:
        if self.stop:
            # only `held` can start a stop text: it is the longest tail that begins one
            delta, self.held = self.held + delta, ""
            cut = min((i for i in (delta.find(s) for s in self.stop) if i >= 0), default=-1)
            if cut >= 0:
                self._send(delta[:cut])
                self.cut = True
                return True
            keep = max((n for s in self.stop for n in range(1, len(s)) if delta.endswith(s[:n])), default=0)
            delta, self.held = delta[:len(delta) - keep], delta[len(delta) - keep:]
        self._send(delta)
        return False

    def _send(self, delta: str) -> None:
        if delta:
            self.text.append(delta)
            self.sink("delta", delta)

    def generate_result(self, reason: str) -> GenerateResult:
        if not self.cut:  # a stop text ends the text where it began: nothing after it is sent
            self._send(self.held + self.decoder.decode(b"", final=True))
        now = time.perf_counter()
        dt = now - (self.t_gen_start or now)
        n = len(self.out_tokens)
        return GenerateResult(message="".join(self.text), finish_reason=reason,
                              n_prompt_tokens=len(self.tokens), n_tokens=n,
                              latency_ms=(now - self.t_submit) * 1000,
                              tokens_per_s=(n / dt) if dt > 0 and n > 1 else 0.0)


def plan_step(active: list[Job], n_batch: int) -> tuple[list[Item], list[tuple[Job, int]]]:
    """One step's batch items (at most n_batch) and the (job, batch row) pairs it answers."""
    items: list[Item] = []
    outputs: list[tuple[Job, int]] = []
    for j in active:                 # generating slots first: one token each
        if j.pending is not None and len(items) < n_batch:
            items.append((j.pending, j.pos, j.slot, True))
            outputs.append((j, len(items) - 1))
    for j in active:                 # then prompt tokens, FIFO, chunked
        if j.pending is None and j.n_eval < len(j.tokens) and len(items) < n_batch:
            chunk = j.prompt_items(n_batch - len(items))
            items += chunk
            if j.n_eval + len(chunk) == len(j.tokens):
                outputs.append((j, len(items) - 1))
    return items, outputs


def advance(active: list[Job], items: list[Item]) -> int:
    """After the step's decode: a generating slot moved one token, a prompt by its chunk.
    Returns how many prompt tokens were evaluated."""
    for j in active:
        if j.pending is not None:
            j.pos += 1
            j.pending = None
    counted = Counter(slot for _, _, slot, _ in items)
    n_prompt = 0
    for j in active:
        if j.n_eval < len(j.tokens) and j.slot in counted:
            n = counted[j.slot]
            j.n_eval += n
            j.pos += n
            n_prompt += n
    return n_prompt


def queue_sink(qq: queue.Queue) -> Callable[[str, object], None]:
    """A job sink that hands every report to a waiting thread."""
    return lambda kind, data: qq.put((kind, data))


def wait(job: Job, qq: queue.Queue, timeout: float | None) -> tuple[str, object]:
    """The job's next report from its queue sink; an error report is raised, a timeout cancels."""
    try:
        kind, data = qq.get(timeout=timeout)
    except queue.Empty:
        job.cancel()
        raise TimeoutError("engine timeout") from None
    if kind == "error":
        raise data
    return kind, data
