"""The conversion as one Python call: audit -> streaming merge + GGUF -> quantize -> verify -> publish.

    from convert.pipeline import run
    report = run("epoch_2_final", quant="q4_k_m")          # -> dict, also written to <out>.json

Intermediates live in a hidden temp folder beside the output and are removed on any error or Ctrl-C;
the GGUF and its sidecar JSON appear with os.replace, so a reader never sees a partial file. An f32/f16/
bf16 output that fails verification is not published (UserError).
"""
from __future__ import annotations

import errno
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from qwen_local import UserError, __version__

from . import adapter as adapter_mod
from .quantize import FLOAT_QTYPES, check_qtype

# bytes per parameter of 2-D tensors, roughly, per output type (for the free-space check)
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72,
                   "q4_k_m": 0.62}
REPORT_KEYS = ("output", "sidecar", "bytes", "quant", "adapter", "base", "version", "audit", "ranks",
               "scalings", "lora_modules", "tensors_changed", "tensors_total", "untied_output",
               "intermediate", "f32_kept", "threads", "verification", "timings")


def default_output(adapter_ref: str, quant: str) -> Path:
    name = Path(adapter_ref.rstrip("/")).name or "model"
    return Path("models") / f"{name}-{quant}.gguf"


def _needed_bytes(plan, quant: str) -> int:
    p2 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) >= 2)
    p1 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) < 2)
    final = p2 * BYTES_PER_PARAM[quant] + p1 * 4
    inter = 0 if quant in FLOAT_QTYPES else p2 * 2 + p1 * 4
    return int((final + inter) * 1.05) + (32 << 20)


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TB"


def _os_error(e: OSError, what: str) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while {what}; nothing was written")
    return UserError(f"{what} failed: {e.strerror or e}")


def run(adapter: str, base: str | None = None, quant: str = "q4_k_m", out: str | Path | None = None,
        verify: bool = True, threads: int | None = None, *, log: Callable[[str], None] | None = None,
        progress: bool = True, reference_dtype: str | None = None) -> dict:
    """Convert a PEFT LoRA adapter (+ its Qwen2 base) into one GGUF; returns the report dict.

    Report keys: output, sidecar, bytes, quant, adapter, base, version, audit (summary lines), ranks,
    scalings, lora_modules, tensors_changed, tensors_total, untied_output, intermediate ('f16' or None),
    f32_kept (tensors kept f32 for f16 overflow), threads, verification (figures dict or None),
    timings (seconds: audit, merge_export, quantize, verify, total).
    """
    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    quant = check_qtype(quant)
    threads = int(threads or os.cpu_count() or 1)
    if threads < 1:
        raise UserError("--threads must be >= 1")

    plan = adapter_mod.audit(str(adapter), base)
    for line in plan.summary():
        log(line)
    t_audit = time.perf_counter()

    out = Path(out) if out is not None else default_output(plan.adapter_ref, quant)
    if out.is_dir():
        out = out / default_output(plan.adapter_ref, quant).name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise _os_error(e, f"creating {out.parent}") from None
    need = _needed_bytes(plan, quant)
    free = shutil.disk_usage(out.parent).free
    if free < need:
        raise UserError(f"not enough free disk space in {out.parent}: {_fmt_bytes(free)} free, "
                        f"about {_fmt_bytes(need)} needed")

    import torch  # the merge's matmuls
    torch.set_num_threads(threads)
    from .export import write_gguf
    from .quantize import quantize

    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise _os_error(e, f"creating a temp folder in {out.parent}") from None
    timings = {"audit": round(t_audit - t0, 2)}
    try:
        gguf_tmp = tmp / "model.gguf"
        inter = None if quant in FLOAT_QTYPES else "f16"
        first = gguf_tmp if inter is None else tmp / "model-f16.gguf"
        bar = _bar(progress, plan.n_params(), f"merge + write {inter or quant}")
        t1 = time.perf_counter()
        try:
            written = write_gguf(plan, first, inter or quant, quant, progress=bar.update if bar else None)
        except OSError as e:
            raise _os_error(e, f"writing {first.name}") from None
        finally:
            if bar:
                bar.close()
        timings["merge_export"] = round(time.perf_counter() - t1, 2)
        if written["f32_kept"]:
            log(f"kept in f32 (beyond f16 range): {', '.join(written['f32_kept'])}")
        if inter:
            log(f"quantizing to {quant} ({threads} threads) ...")
            t2 = time.perf_counter()
            quantize(first, gguf_tmp, quant, threads)
            first.unlink()
            timings["quantize"] = round(time.perf_counter() - t2, 2)
        figures = None
        if verify:
            t3 = time.perf_counter()
            from .verify import verify as run_verify
            figures = run_verify(plan.base_dir, plan.adapter_dir, gguf_tmp, quant, plan.n_params(), threads,
                                 log=log, reference_dtype=reference_dtype)
            timings["verify"] = round(time.perf_counter() - t3, 2)
            if not figures["passed"]:
                raise UserError(f"verification failed ({'; '.join(figures['failures'])}): "
                                f"{out.name} was not written")
        size = gguf_tmp.stat().st_size
        lora = plan.lora
        report = {
            "output": str(out), "sidecar": str(out) + ".json", "bytes": size, "quant": quant,
            "adapter": plan.adapter_ref, "base": plan.base_ref, "version": __version__,
            "audit": plan.summary(), "ranks": sorted({d.r for d in lora}),
            "scalings": sorted({d.scaling for d in lora}),
            "lora_modules": sorted({d.module.rsplit(".", 1)[-1] for d in lora}),
            "tensors_changed": len(plan.changed), "tensors_total": len(plan.tensors),
            "untied_output": plan.untie, "intermediate": inter, "f32_kept": written["f32_kept"],
            "threads": threads, "verification": figures, "timings": timings,
        }
        timings["total"] = round(time.perf_counter() - t0, 2)
        side_tmp = tmp / "model.gguf.json"
        try:
            side_tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            os.replace(gguf_tmp, out)
            os.replace(side_tmp, str(out) + ".json")
        except OSError as e:
            raise _os_error(e, f"publishing {out}") from None
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def final_line(report: dict) -> str:
    """path, size and the verification figures in one line."""
    v = report.get("verification")
    if v:
        fig = (f"max rel logit err {v['max_rel_err']:.2e}, top-1 {v['top1_agreement']:.1%} "
               f"over {v['positions']} positions, intent {v['intent_agreement']:.0%}, "
               f"tokenizer {v['tokenizer_agreement']:.0%} ({v['reference']})")
    else:
        fig = "verification skipped"
    return f"{report['output']}  {_fmt_bytes(report['bytes'])}  {report['quant']}  {fig}"
