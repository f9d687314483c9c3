"""One GGUF's intent and fidelity figures on a labelled query set: the llama.cpp side of `eval`.

The labels come from runtime.engine's one-pass intent path, i.e. exactly what `serve` answers
(or, with http, from a real server on 127.0.0.1). Against a ReferenceRun (what a reference model
said, computed once by the caller: the fp PEFT model for `eval`, the f16 GGUF for `convert`) the
row also holds the label agreement, the mean KL of the label distributions, the tokenizer check
and next-token top-1 agreement and KL on the reference's teacher-forced reply prompts.

The `eval` command (convert/evaluate.py) and `qwen-local convert --quant auto`
(convert/autoquant.py) both measure with measure_gguf.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from qwen_local.runtime import fidelity
from qwen_local.runtime.dataset import Dataset
from qwen_local.runtime.errors import UserError
from qwen_local.runtime.labels import decide
from qwen_local.runtime.llama import threads_or_default
from qwen_local.runtime.profile import Profile


@dataclass
class ReferenceRun:
    """What the reference said, computed once and compared with every GGUF."""
    probs: list[dict]                                   # label distribution per query
    teacher: list[tuple[list[int], list[int], np.ndarray]] = field(default_factory=list)
    # (prompt ids, greedy tokens fed after it, logits per step [n_steps, vocab])
    intent_ids: list[list[int]] = field(default_factory=list)   # user-turn ids, for parity
    describe: str = ""


def _engine_options(lean: bool, exact: bool, flash_attn: bool | None = None) -> dict:
    """lean: memory-mapped and not repacked, so the weights take no anonymous memory (a repacked
    3B q4_k_m takes ~1.4 GB). exact: an f32 KV cache and flash attention off, so a figure holds
    the file's own error and none of the context's; otherwise the file runs as `serve` runs it,
    with flash attention as given (None: serve's default)."""
    if exact:
        arithmetic = dict(kv_f32=True, flash_attn=False)
    else:
        if flash_attn is None:
            from qwen_local.runtime.serve.settings import ServeSettings
            flash_attn = ServeSettings.model_fields["flash_attn"].default == "on"
        arithmetic = dict(flash_attn=flash_attn)
    return dict(mmap=True, repack=False, **arithmetic) if lean else arithmetic


def measure_gguf(path: str | Path, data: Dataset, ref: ReferenceRun | None = None, *,
                 cfg: Profile | None = None, threads: int | None = None,
                 stop_below: float | None = None, tolerate: int | None = None, chunk: int = 8,
                 progress: bool = False, name: str | None = None, http: bool = False,
                 lean: bool = False, exact: bool = False, flash_attn: bool | None = None,
                 lora: str | Path | None = None) -> dict:
    """One row of figures for one GGUF. With stop_below (an agreement target) and a reference,
    measuring stops as soon as the disagreements make the target unreachable ("complete": False;
    "agreement" is then the best it could still have reached), but never before more than
    `tolerate` disagreements (a caller that still needs the figures of a file that misses). With
    http, the labels are read from a real server on 127.0.0.1 (/qwen/intent/batch), exactly as a
    client gets them.
    lean, exact, flash_attn: see `_engine_options` (convert measures its candidates lean and
    exact; `eval` measures a file as `serve` runs it). lora: a LoRA file to apply (default: the
    companion the file names); "bytes" and "bits_per_weight" count both files."""
    from qwen_local.runtime.engine import Engine

    threads = threads_or_default(threads)
    path = Path(path)
    t0 = time.perf_counter()
    # the target is judged by the agreement's lower confidence bound: stop at the first
    # disagreement past what still shows it (never, if n cannot show it at all)
    allowed = fidelity.max_misses(len(data), stop_below) if stop_below is not None and ref is not None \
        else None
    if allowed is not None and tolerate is not None:
        allowed = max(allowed, tolerate)
    try:
        engine = Engine(path, cfg, threads=threads, slots=4, n_ctx=4096, lora=lora,
                        **_engine_options(lean, exact, flash_attn))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot load {path}: {e}") from None
    cfg = engine.cfg  # the given profile, else the one stored in the GGUF
    bar = _bar(len(data), name or path.name) if progress else None  # after the load: one error line
    stack = contextlib.ExitStack()
    try:
        ask = _asker(engine, stack, chunk) if http else (lambda qs: [r.probs for r in engine.intents(qs)])
        desc = engine.describe()
        probs, complete = _label_probs(ask, data.queries, ref, allowed, chunk, bar)
        mismatched = _tokenizer_mismatches(engine, cfg, data.queries[:len(probs)], ref)
    finally:
        stack.close()
        engine.close()
        if bar:
            bar.close()
    m = len(probs)
    row: dict = {"model": str(path), "name": name or path.name, "bytes": desc["bytes"],
                 "bits_per_weight": round(8 * desc["bytes"] / desc["n_params"], 3),
                 "lora": desc["lora"]["file"] if desc["lora"] else None,
                 "flash_attn": desc["flash_attn"], "kv_cache": desc["kv_cache"],
                 "quant": desc.get("quant"), "complete": complete, "n_measured": m}
    gold = data.labels[:m] if data.labelled else None
    row.update(fidelity.intent_figures(cfg.labels, probs, gold,
                                       ref.probs[:m] if ref is not None else None))
    row["probs"] = probs
    if ref is not None:
        row["tokenizer_mismatches"] = int(mismatched)
        if not complete:
            n, d = len(data), len(row["disagreements"])
            row["agreement_measured"] = row["agreement"]
            row["agreement"] = (n - d) / n  # upper bound: every unmeasured query agreeing
        if ref.teacher and complete:
            nt = teacher_forced_figures(path, ref.teacher, threads, lean=lean, exact=exact,
                                        flash_attn=flash_attn, lora=lora)
            row["next_token_top1"] = nt["top1_agreement"]
            row["next_token_kl"] = nt["mean_kl"]
            row["next_token_positions"] = nt["n_positions"]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def _bar(total: int, desc: str):
    from qwen_local.runtime.options import progress_bar

    return progress_bar(True, total=total, desc=desc)


def _label_probs(ask, queries: list[str], ref: ReferenceRun | None, allowed: int | None,
                 chunk: int, bar) -> tuple[list[dict], bool]:
    """(label distributions, complete): chunk by chunk, stopping early once more than `allowed`
    labels disagree with the reference while queries remain."""
    probs: list[dict] = []
    for start in range(0, len(queries), chunk):
        batch = queries[start:start + chunk]
        probs += ask(batch)
        if bar:
            bar.update(len(batch))
        if allowed is not None:
            d = sum(decide(p) != decide(r) for p, r in zip(probs, ref.probs[:len(probs)]))
            if d > allowed and len(probs) < len(queries):
                return probs, False
    return probs, True


def _tokenizer_mismatches(engine, cfg: Profile, queries: list[str], ref: ReferenceRun | None) -> int:
    """Queries whose user turn llama.cpp tokenizes differently from the reference."""
    if ref is None or not ref.intent_ids:
        return 0
    return sum(engine.tokenize_segments(cfg.intent_prompt(q)[1:]) != ids
               for q, ids in zip(queries, ref.intent_ids))


def teacher_forced_figures(path: str | Path, teacher, threads: int, *, lean: bool = False,
                           exact: bool = False, flash_attn: bool | None = None,
                           lora: str | Path | None = None) -> dict:
    """Teacher-forced next-token figures of one GGUF: its logits after each teacher prompt's last
    token and after each fed token, against the teacher's rows (runtime.fidelity)."""
    from qwen_local.runtime.engine import Engine

    longest = max(len(p) + len(f) for p, f, _ in teacher) + 8
    n_ctx = max(64, int(math.ceil(longest / 64) * 64))
    try:
        # scoring only: no cached system prompt; 64-token batches keep the output rows small
        scorer = Engine(path, threads=threads, n_ctx=n_ctx, slots=1, n_batch=64, warmup=False,
                        prefixes=False, lora=lora, **_engine_options(lean, exact, flash_attn))
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp cannot load {Path(path).name}: {e}") from None
    try:
        got = [scorer.score(p + f, len(p) - 1) for p, f, _ in teacher]
    finally:
        scorer.close()
    return fidelity.next_token_figures(np.concatenate([r for _, _, r in teacher]), np.concatenate(got))


def _asker(engine, stack: contextlib.ExitStack, chunk: int):
    """Label distributions over HTTP from a real server on this engine (closed with the stack)."""
    import httpx

    from qwen_local.runtime.serve import ServeSettings, create_app, serving

    url = stack.enter_context(serving(create_app(engine, ServeSettings(max_batch=chunk))))
    client = stack.enter_context(httpx.Client(base_url=url, timeout=600))

    def ask(queries: list[str]) -> list[dict]:
        r = client.post("/qwen/intent/batch", json={"queries": queries})
        if r.status_code != 200:
            raise UserError(f"the server answered {r.status_code}: {r.text[:200]}")
        return [x["probs"] for x in r.json()["results"]]

    return ask
