"""The fidelity step of a conversion, after the reference side is prepared: the default search, or
the one type the user asked for, quantized and measured (`finish`). Its report goes into the sidecar
and, compact, into the GGUF (convert.fidelity.report), which the pipeline writes.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

from qwen_local.convert.fidelity import mixed
from qwen_local.convert.fidelity.calibration import Prepared, log_default, uses_imatrix
from qwen_local.convert.fidelity.report import summary_table, summary_table_one, table_head
from qwen_local.convert.fidelity.search import DEFAULT_MAX_SIZE, Plan, Sources, search
from qwen_local.convert.quantize import split_lora
from qwen_local.convert.staging import lora_name
from qwen_local.runtime import fidelity


def finish(prep: Prepared, sources: Sources, dst: str | Path, quant: str, *,
           min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT,
           max_size: float | None = DEFAULT_MAX_SIZE, threads: int = 2, use_imatrix: bool = False,
           keep: dict[str, str] | None = None, log: Callable[[str], None] | None = None,
           progress: bool = True, frontier: bool = False) -> dict:
    """quant "auto": convert.fidelity.search within max_size (keep replaces the measured mix), the
    winner moved to dst (a LoRA candidate's LoRA file beside it). Otherwise sources.f16 quantized to
    dst as asked, with the imatrix when use_imatrix and keep's tensor types, measured, with a loud
    warning when it misses min_agreement; a float `quant` means dst is the float file itself or a
    copy of it (measured, nothing quantized)."""
    from qwen_local.convert.quantize import FLOAT_QTYPES, quantize

    log = log or log_default
    if quant == "auto":
        budget = (f" within {max_size:.2f}x the plain q4_k_m file" if max_size is not None
                  else ", fidelity first,")
        log(f"searching{budget} for the file that answers most like the fine-tune (target "
            f"{fidelity._pct(min_agreement)} label agreement by its {fidelity.CONFIDENCE:.0%} lower "
            f"bound{'; every candidate on every query: --frontier' if frontier else ''})")
        report = search(prep, sources, dst, min_agreement=min_agreement, max_size=max_size,
                        threads=threads, keep=keep, log=log, progress=progress, frontier=frontier)
        log(table_head(report) + "\n" + summary_table(report))
        return report
    base, apart = split_lora(quant)
    im = prep.im_means if use_imatrix and uses_imatrix(base, keep) else None
    lora = lora_name(Path(dst)) if apart else None
    if base not in FLOAT_QTYPES:
        t = time.perf_counter()
        src = sources.float_for(Plan(quant, base, lora=apart))
        quantize(src, dst, base, threads, imatrix=im, tensor_types=keep or None)
        if lora:
            shutil.copyfile(sources.lora_file(), lora)
        prep.timings["quantize"] = round(time.perf_counter() - t, 2)
    elif Path(sources.f16) != Path(dst):
        shutil.copyfile(sources.f16, dst)
    report = measure_explicit(prep, dst, quant, min_agreement=min_agreement, threads=threads,
                              progress=progress, log=log, lora=lora)
    report["imatrix"] = prep.im_info if im is not None else None
    report["mixed"] = mixed.describe(keep) if keep else None
    log(summary_table_one(report))
    return report


def measure_explicit(prep: Prepared, gguf: str | Path, quant: str, *,
                     min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
                     progress: bool = True, log: Callable[[str], None] | None = None,
                     lora: Path | None = None) -> dict:
    """Task fidelity of one GGUF the user asked for by name (with its LoRA file, if any); a loud
    warning when it misses."""
    from qwen_local.runtime.measure import measure_gguf

    log = log or log_default
    t = time.perf_counter()
    row = measure_gguf(gguf, prep.data, prep.ref, cfg=prep.cfg, threads=threads, progress=progress,
                       name=quant, lora=lora, **prep.measure)
    row.pop("probs", None)
    warning = fidelity.explicit_warning(quant, row.get("agreement"), min_agreement, len(prep.data))
    if warning:
        log(warning)
    where = fidelity.margins_text(quant, row)
    if where:
        log(where)
    return {"quant": quant, "min_agreement": min_agreement, "met_target": warning is None,
            "warning": warning, "reference": prep.ref.describe,
            "reference_accuracy": prep.reference_accuracy, "calibration": prep.calibration(),
            "figures": {k: v for k, v in row.items() if k not in ("model", "disagreements")},
            "lora": {"file": str(lora), "bytes": lora.stat().st_size} if lora else None,
            "timings": dict(prep.timings, measure=round(time.perf_counter() - t, 2))}
