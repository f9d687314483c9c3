"""The reference side of the fidelity check, computed once before any candidate is measured: the
calibration queries, what the fp fine-tune answers on them, the importance matrix and the next-token
teacher (`prepare` -> `Prepared`).

With the conversion's float GGUF (its f16 or f32 intermediate) all of it comes from that file in
llama.cpp (convert.fidelity.float_pass: shared system-prompt KV, batched queries, the imatrix
through the eval callback, exact arithmetic, no torch model). peft stays the independent check of
that file (convert.fidelity.parity). Without a float file the torch reference runs every pass.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen_local.runtime import fidelity
from qwen_local.runtime.gguf_file import read_header
from qwen_local.runtime.options import progress_wrap

# Calibration budget. A 99% target is judged by the agreement's 95% lower bound, which 200
# queries cannot reach even with no disagreement (98.5%); 400 reach it with none (99.25%). The
# packaged set's calibration split has exactly 400. Replies feed only the imatrix, where 64
# prompts already give tens of thousands of tokens per tensor.
DEFAULT_MAX_QUERIES = 400
DEFAULT_IMATRIX_REPLIES = 64
# types for which an importance matrix changes the result (q8_0 and float types ignore it)
IMATRIX_QTYPES = ("iq4_xs", "iq4_nl", "q4_k_m", "q5_k_m", "q6_k")


def uses_imatrix(quant: str, keep) -> bool:
    """Whether quantizing to `quant` (with the --keep mix `keep`) can use an importance matrix:
    auto always; a --keep mix may lower tensors to types it guides, whatever the base type."""
    return quant == "auto" or quant in IMATRIX_QTYPES or bool(keep)


@dataclass
class Prepared:
    """Everything the candidates are measured against, computed on the fp reference in one go:
    after `prepare` the torch model is no longer needed (the convert pipeline frees it before
    llama.cpp loads any candidate)."""
    data: object                      # runtime.dataset.Dataset (capped at max_queries)
    ref: object                       # runtime.measure.ReferenceRun
    cfg: object                       # runtime.profile.Profile
    im_means: dict | None             # {GGUF tensor: float32 means} for llama_model_quantize
    im_info: dict | None              # {entries, tokens, prompts}
    timings: dict
    reference_accuracy: float | None = None   # the fp reference's own accuracy, on labelled data
    # runtime.measure.measure_gguf options: low memory, and the file's own error only
    measure: dict = field(default_factory=lambda: {"lean": True, "exact": True})

    def calibration(self) -> dict:
        """The calibration set as the report records it."""
        return {"source": self.data.source, "n": len(self.data),
                "labelled": sum(x is not None for x in self.data.labels)}


def log_default(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def load_calibration(calib: str | Path | None, labels, max_queries: int | None = DEFAULT_MAX_QUERIES):
    """The calibration set (default: the packaged set's calibration split, whose other queries
    stay held-out), capped; a bad file is a UserError."""
    from qwen_local.runtime.dataset import load_data, packaged

    data = packaged("calibration", labels) if calib is None else load_data(calib, labels,
                                                                           what="calibration file")
    return data.head(max_queries)


def float_type(path: str | Path) -> str:
    """'f16', 'bf16' or 'f32': the type of a float GGUF's attention weights."""
    import gguf

    for n, _, ttype, _ in read_header(path).tensors:
        if n.endswith("attn_q.weight"):
            return gguf.GGMLQuantizationType(ttype).name.lower()
    return "fp"


def prepare(reference, float_gguf: str | Path | None, calib: str | Path | None = None, *,
            imatrix: bool = True, max_queries: int | None = DEFAULT_MAX_QUERIES,
            gen_prompts: int = 4, imatrix_replies: int | None = DEFAULT_IMATRIX_REPLIES,
            data=None, log: Callable[[str], None] | None = None, progress: bool = True,
            cfg=None, threads: int | None = None) -> Prepared:
    """The reference label distributions, (imatrix=True) the importance matrix, and the
    next-token teacher on a few reply prompts.

    With float_gguf, llama.cpp runs every pass on it; `reference` may then be None, or a
    convert.fidelity.peft_model.PromptEncoder (a released Reference is one) whose HF tokenizer
    gives the ids for the per-query tokenizer check. Without it the torch `reference` runs them."""
    from qwen_local.convert.fidelity.imatrix import as_quantize_param

    log = log or log_default
    cfg = cfg or reference.cfg
    data = data if data is not None else load_calibration(calib, cfg.labels, max_queries)
    n_reply = min(len(data), imatrix_replies or len(data)) if imatrix else 0
    t = time.perf_counter()
    if float_gguf is not None:
        from qwen_local.convert.fidelity import float_pass
        from qwen_local.runtime.llama import threads_or_default

        log(f"reference labels{' + imatrix' if imatrix else ''} on {Path(float_gguf).name} "
            f"(llama.cpp): {len(data)} calibration queries"
            + (f", reply prompt for {n_reply}" if imatrix else ""))
        ref, im = float_pass.run(
            float_gguf, data, cfg, threads=threads_or_default(threads), imatrix=imatrix,
            reply_limit=imatrix_replies, gen_prompts=gen_prompts, encoder=reference,
            describe=f"{float_type(float_gguf)} GGUF (llama.cpp, f32 KV)",
            progress=progress_wrap("reference (llama.cpp)", progress))
        im_means = as_quantize_param(im, float_gguf) if im is not None else None
    else:
        from qwen_local.convert.fidelity.imatrix import collect
        from qwen_local.convert.fidelity.peft_model import reference_run

        im, probs, im_means = None, None, None
        if imatrix:
            log(f"imatrix + reference labels: {len(data)} calibration queries (intent prompt each, "
                f"reply prompt for {n_reply})")
            im = collect(reference, data.queries, labels=data.labels, reply_limit=imatrix_replies,
                         progress=progress_wrap("imatrix (torch)", progress))
            im_means, probs = as_quantize_param(im), im.ref_probs
        ref = reference_run(reference, data, probs=probs, gen_prompts=gen_prompts,
                            progress=progress_wrap("reference (torch)", progress))
    im_info = ({"entries": len(im_means), "tokens": im.n_tokens, "prompts": im.n_prompts}
               if im_means is not None else None)
    timings = {"reference": round(time.perf_counter() - t, 2)}
    acc = None
    if data.labelled:
        from qwen_local.runtime.labels import decide
        acc = fidelity.accuracy(data.labels, [decide(p) for p in ref.probs])
    return Prepared(data=data, ref=ref, cfg=cfg, im_means=im_means, im_info=im_info,
                    timings=timings, reference_accuracy=acc)
