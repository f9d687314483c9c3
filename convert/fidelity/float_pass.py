"""The task reference and the importance matrix from the f16 GGUF in llama.cpp, not from torch.

The conversion writes an f16 (or f32/bf16) GGUF anyway; this runs the calibration queries through
it with runtime.engine.Engine, the serving engine itself: each system prompt's KV is computed once
and shared by every query (unified KV cache, no copies), the queries go through in multi-sequence
batches, and the file is memory-mapped and not repacked, so the weights stay in the page cache and
anonymous memory holds only the KV cache and compute buffers (~0.2 GB at 3B, against ~7 GB for a
bf16 torch reference). The KV cache is f32 (the f16 default would add its own ~3e-4) and flash
attention is off (on the CPU it adds ~1e-3 that depends on the batch shape: runtime.llama).

One pass gives, together:
- the reference label distributions (the one-pass intent rule, runtime.labels), query by query;
- the importance matrix, through the context's eval callback (convert.fidelity.imatrix.GGMLCollector):
  the intent prompt of every query, the reply prompt of `reply_limit` of them (spread over the set)
  and both system prompts, as the torch collector did;
- then, with collection off, the next-token teacher: the greedy continuation of a few reply prompts
  and the logits of each step.

What it cannot check is our own merge: the f16 file is its product. The independent check against
peft (what was trained) stays the logit parity of convert.fidelity.parity on its fixed prompts.
"""
from __future__ import annotations

import queue
from collections.abc import Callable
from pathlib import Path

from qwen_local.runtime import labels as labels_mod
from qwen_local.runtime.dataset import Dataset
from qwen_local.runtime.measure import ReferenceRun

from qwen_local.convert.fidelity.imatrix import GGMLCollector, Imatrix, calibration_prompts
from qwen_local.convert.fidelity.peft_model import generation_prompts, spread

N_CTX = 2048       # the prefixes + up to `SLOTS` queries (reply prompts wait for room)
SLOTS = 8          # queries per decode: ~200 intent tokens, a matmul-friendly batch on the CPU
CHUNK = 32         # queries per submission (progress granularity)


def run(gguf: str | Path, data: Dataset, cfg, *, threads: int, imatrix: bool = True,
        reply_limit: int | None = None, gen_prompts: int = 4, steps: int = 4, encoder=None,
        describe: str = "f16 GGUF", progress: Callable | None = None) -> tuple[ReferenceRun, Imatrix | None]:
    """(ReferenceRun, Imatrix or None) for the calibration data on one GGUF.

    encoder: a convert.fidelity.peft_model.PromptEncoder (HF tokenizer); when given, the per-query token ids
    kept for the tokenizer check of every candidate are HF's, as with the torch reference;
    otherwise llama.cpp's own."""
    from qwen_local.runtime.engine import Engine

    collector = GGMLCollector() if imatrix else None
    engine = Engine(gguf, cfg, threads=threads, n_ctx=N_CTX, slots=SLOTS, warmup=False, kv_f32=True,
                    flash_attn=False, mmap=True, repack=False,
                    eval_callback=collector.callback if collector else None)
    try:
        probs = _intents(engine, data.queries, progress)
        n_reply = 0
        if collector is not None:
            n = len(data)
            n_reply = n if reply_limit is None else max(0, min(int(reply_limit), n))
            picks = sorted({int(i * n / n_reply) for i in range(n_reply)}) if n_reply else []
            _replies(engine, [(data.queries[i], data.labels[i] if data.labels[i] is not None
                               else labels_mod.decide(probs[i])) for i in picks])
            collector.check()
            collector.enabled = False
        teacher = []
        if gen_prompts > 0:
            chosen = spread(data.queries, [labels_mod.decide(p) for p in probs], gen_prompts)
            for segs in generation_prompts(cfg, [data.queries[i] for i in chosen],
                                           [labels_mod.decide(probs[i]) for i in chosen]):
                fed, rows = engine.greedy_steps(segs, steps)
                teacher.append((engine.tokenize_segments(segs), fed, rows))
        tok = encoder.encode if encoder is not None else engine.tokenize_segments
        intent_ids = [tok(cfg.intent_prompt(q)[1:]) for q in data.queries]
    finally:
        engine.close()
    ref = ReferenceRun(probs=probs, teacher=teacher, intent_ids=intent_ids, describe=describe)
    im = collector.result(n_prompts=len(data) + n_reply, ref_probs=probs) if collector else None
    return ref, im


def _intents(engine, queries: list[str], progress) -> list[dict]:
    chunks = [queries[i:i + CHUNK] for i in range(0, len(queries), CHUNK)]
    out: list[dict] = []
    for chunk in (progress(chunks) if progress else chunks):
        out += [r.probs for r in engine.intents(chunk)]
    return out


def _replies(engine, items: list[tuple[str, str]]) -> None:
    """Evaluate reply prompts (one sampled token each, never fed back): imatrix input only."""
    done: queue.Queue = queue.Queue()
    jobs = []
    for q, lab in items:
        _, segs = calibration_prompts(engine.cfg, q, lab)
        jobs.append(engine.prepare("generate", segs, sink=lambda kind, data: done.put((kind, data)),
                                   max_new=1, temperature=0.0))
    engine.submit(jobs)
    for _ in jobs:
        kind, data = done.get()
        if kind == "error":
            raise data
