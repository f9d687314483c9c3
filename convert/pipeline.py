"""The conversion as one Python call: audit -> streaming merge + GGUF -> reference -> quantize ->
task fidelity + parity -> publish.

    from qwen_local.convert.pipeline import run
    report = run("epoch_2_final", quant="q4_k_m")          # -> dict, also written to <out>.json
    report = run("epoch_2_final", quant="auto", calib="my_queries.jsonl", min_agreement=0.99)

With verification on (the default) no model is ever whole in memory. peft (convert.reference.
Reference, unmerged LoRA, float32, streamed block by block from the base's shards) computes only the
logit-parity prompts (convert.verify) and is freed. The task reference (label distributions over the
calibration queries, next-token teacher) and the importance matrix come from the f16 intermediate
(or the float output itself) in llama.cpp, memory-mapped, through the serving engine with shared
system-prompt KV and the eval callback (convert.gguf_reference, via convert.autoquant.prepare).
The llama.cpp side then quantizes (with the imatrix for k-quants, the --keep tensor types, or the
--quant auto search, whose q8_0-based candidates come from an f32 merged again when the search
reaches them, as --quant q8_0 comes from f32), measures task fidelity (printed table,
`qwen_local.fidelity` in the GGUF header, "fidelity" in the sidecar) and the logit parity. --no-verify loads no reference at all:
no imatrix, no fidelity, and `auto` is refused.

Intermediates live in a hidden temp folder beside the output and are removed on any error, Ctrl-C,
SIGTERM or SIGHUP; a folder left by a conversion killed with SIGKILL is removed by the next conversion
to the same output (never one whose lock a running conversion holds);
the GGUF and its sidecar JSON appear with os.replace, so a reader never sees a partial file. An f32/f16/
bf16 output that fails verification is not published (UserError). A quantized output that misses the
agreement target is published with a loud warning (explicit type), or, for auto, the closest candidate
is kept and the reason says plainly that none met the target.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

from qwen_local.runtime.errors import UserError, __version__
from qwen_local.runtime.fidelity import size_text

from . import adapter as adapter_mod
from .quantize import FLOAT_QTYPES, check_qtype, intermediate
from .staging import make_temp, os_error, publish, remove_stale_temps

AUTO = "auto"

# bytes per parameter of 2-D tensors, roughly, per output type (for the free-space check)
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72,
                   "q4_k_m": 0.62, "iq4_nl": 0.59, "iq4_xs": 0.56}
REPORT_KEYS = ("output", "sidecar", "bytes", "quant", "adapter", "base", "version", "audit", "ranks",
               "scalings", "lora_modules", "tensors_changed", "tensors_total", "untied_output",
               "intermediate", "f32_kept", "threads", "verification", "requested_quant", "fidelity",
               "timings", "prompts")


def default_output(adapter_ref: str, quant: str) -> Path:
    name = Path(adapter_ref.rstrip("/")).name or "model"
    return Path("models") / f"{name}-{quant}.gguf"


def _needed_bytes(plan, *types: str) -> int:
    """Disk for files of these types at once (1-D tensors stay f32), with some slack."""
    p2 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) >= 2)
    p1 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) < 2)
    return int(sum(p2 * BYTES_PER_PARAM[t] + p1 * 4 for t in types) * 1.05) + (32 << 20)


def _short_of_disk(plan, folder: Path, *types: str) -> str | None:
    """'X free, about Y needed' when `folder`'s disk cannot take files of these types at once."""
    need, free = _needed_bytes(plan, *types), shutil.disk_usage(folder).free
    return f"{size_text(free)} free, about {size_text(need)} needed" if free < need else None


def _files_at_once(quant: str) -> tuple[str, ...]:
    if quant == AUTO:  # f16 intermediate + the provisional choice + the candidate being measured
        return ("f16", "q8_0", "q8_0")  # (the f32 for q8_0 is checked for when it is wanted)
    return (quant,) if quant in FLOAT_QTYPES else (quant, intermediate(quant))


def _check_options(quant: str, verify: bool, calib, min_agreement: float, keep, imatrix: bool):
    """Option errors that need no file: one-line UserErrors before any work."""
    q = str(quant).strip().lower()
    if q != AUTO:
        try:
            q = check_qtype(q)
        except UserError as e:
            raise UserError(str(e).rstrip(")") + ", or auto)") from None
    if q == AUTO and not verify:
        raise UserError("--quant auto needs verification: it picks the type by measuring candidates "
                        "against the fp reference (drop --no-verify)")
    if calib is not None and not verify:
        raise UserError("--calib is used by the verification step; it cannot go with --no-verify")
    try:
        m = float(min_agreement)
    except (TypeError, ValueError):
        raise UserError(f"--min-agreement must be a number, not {min_agreement!r}") from None
    if not math.isfinite(m) or not 0 < m <= 1:  # a share: 5 would run for minutes, then miss "500%"
        raise UserError(f"--min-agreement must be a share in (0, 1] such as 0.99, not {min_agreement!r}")
    if keep and q in FLOAT_QTYPES:
        raise UserError(f"--keep keeps tensors above a quantized type; {q} is not quantized")
    return q, m


def run(adapter: str, base: str | None = None, quant: str = "q4_k_m", out: str | Path | None = None,
        verify: bool = True, threads: int | None = None, *, log: Callable[[str], None] | None = None,
        progress: bool = True, reference_dtype: str | None = None, calib: str | Path | None = None,
        min_agreement: float = 0.99, keep: str | dict | None = None, imatrix: bool = True,
        max_queries: int | None = None, prompts=None, frontier: bool = False) -> dict:
    """Convert a PEFT LoRA adapter (+ its Qwen2 base) into one GGUF; returns the report dict.

    quant: a type of convert.quantize.QTYPES, or "auto" (the smallest of autoquant.DEFAULT_CANDIDATES
    meeting min_agreement; needs verify). calib: JSONL of {"query", "label"?} (default: the packaged
    set's calibration split), capped at max_queries (default 400). keep: mixed precision, a
    convert.mixed spec ("attn_v=q6_k,first=q8_0") or {regex: type}; with auto it replaces the
    automatic mix. imatrix: use the calibration imatrix for q4_k_m/q5_k_m/q6_k/iq4 and for a keep
    mix (only when verify is on: it comes from the same reference passes).
    prompts: the prompt profile (a runtime.profile.Profile, a file or a built-in name; default the
    built-in seed profile): every calibration and verification pass uses it, and it is stored in
    the GGUF for serve.

    Report keys: output, sidecar, bytes, quant (the type written), requested_quant, adapter, base,
    version, audit (summary lines), ranks, scalings, lora_modules, tensors_changed, tensors_total,
    untied_output, intermediate ('f16' or None), f32_kept (tensors kept f32 for f16 overflow),
    threads, verification (logit-parity figures or None), fidelity (task fidelity: quant, chosen,
    reason, met_target, warning, min_agreement, calibration, reference, imatrix, mixed, candidates,
    figures, timings; or None), timings (seconds: audit, merge_export, reference_load and
    parity_reference (peft), reference_passes (llama.cpp on the f16), merge_export_f32 (auto, when
    it reached a q8_0-based candidate), quantize or quantize_fidelity, verify, total).
    """
    from . import autoquant

    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    requested, min_agreement = _check_options(quant, verify, calib, min_agreement, keep, imatrix)
    auto = requested == AUTO
    threads = _threads(threads)
    max_queries = autoquant.DEFAULT_MAX_QUERIES if max_queries is None else int(max_queries)
    profile = _profile(prompts)

    plan = adapter_mod.audit(str(adapter), base)
    for line in plan.summary():
        log(line)
    mix = _mix(keep, int(plan.base_config["num_hidden_layers"]))
    data = autoquant.load_calibration(calib, profile.labels, max_queries) if verify else None
    use_imatrix = verify and imatrix and autoquant.uses_imatrix(requested, keep)
    t_audit = time.perf_counter()

    # auto: the file is named after the choice unless the user named it
    named_by_user = out is not None and not Path(out).is_dir()
    out = _output_path(out, plan, requested)

    for stale in remove_stale_temps(out):
        log(f"removed {stale.name}, left behind by a conversion that was killed")
    tmp, lock = make_temp(out)
    timings = {"audit": round(t_audit - t0, 2)}
    try:
        gguf_tmp = tmp / "model.gguf"
        inter = intermediate(requested)
        first = gguf_tmp if inter is None else tmp / f"model-{inter}.gguf"
        written = _write_first(plan, first, inter or requested, requested, profile, threads, progress,
                               timings)
        if written["f32_kept"]:
            log(f"kept in f32 (beyond f16 range): {', '.join(written['f32_kept'])}")

        fid, figures = None, None
        if verify:
            steps = _Verified(plan, profile, threads, log, progress, timings)
            fid, figures = steps.run(first, gguf_tmp, out, reference_dtype, data, use_imatrix,
                                     dict(quant=requested, inter=inter, auto=auto, mix=mix,
                                          min_agreement=min_agreement, frontier=frontier))
        elif inter:
            _quantize_unverified(first, gguf_tmp, requested, threads, mix, log, timings)
        quant = fid["quant"] if fid else requested
        if auto and not named_by_user:
            out = out.with_name(default_output(plan.adapter_ref, quant).name)
        report = _report(plan, out, gguf_tmp.stat().st_size, quant, requested, inter, written, threads,
                         figures, fid, timings, profile)
        timings["total"] = round(time.perf_counter() - t0, 2)
        publish(report, tmp, gguf_tmp, out)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _threads(threads: int | None) -> int:
    threads = int(threads or os.cpu_count() or 1)
    if threads < 1:
        raise UserError("--threads must be >= 1")
    return threads


def _mix(keep, n_layers: int) -> dict | None:
    """--keep as {regex: type}: a convert.mixed spec string or a dict; None for no mix."""
    if isinstance(keep, str) and keep.strip():
        from .mixed import parse_spec
        try:
            return parse_spec(keep, n_layers)
        except ValueError as e:
            raise UserError(f"--keep: {e}") from None
    if isinstance(keep, dict) and keep:
        return dict(keep)
    return None


def _output_path(out, plan, requested: str) -> Path:
    """The output file (a folder gets the default name inside it), its folder made, and enough
    free disk space checked before any work."""
    out = Path(out) if out is not None else default_output(plan.adapter_ref, requested)
    if out.is_dir():
        out = out / default_output(plan.adapter_ref, requested).name
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise os_error(e, f"creating {out.parent}") from None
    short = _short_of_disk(plan, out.parent, *_files_at_once(requested))
    if short:
        raise UserError(f"not enough free disk space in {out.parent}: {short}")
    return out


def _write_first(plan, first: Path, out_type: str, meta_quant: str, profile, threads: int,
                 progress: bool, timings: dict, timing: str = "merge_export") -> dict:
    """The merge and the GGUF of the float type (the output itself, or the f16 intermediate).
    meta_quant is the provenance the exporter writes; auto's choice is in qwen_local.fidelity."""
    import torch  # the merge's matmuls

    from .export import write_gguf

    torch.set_num_threads(threads)

    bar = _bar(progress, plan.n_params(), f"merge + write {out_type}")
    t1 = time.perf_counter()
    try:
        written = write_gguf(plan, first, out_type, meta_quant,
                             progress=bar.update if bar else None, profile=profile)
    except OSError as e:
        raise os_error(e, f"writing {first.name}") from None
    finally:
        if bar:
            bar.close()
    timings[timing] = round(time.perf_counter() - t1, 2)
    return written


def _quantize_unverified(first: Path, dst: Path, quant: str, threads: int, mix, log, timings) -> None:
    from .quantize import quantize

    log(f"quantizing to {quant} ({threads} threads) ...")
    t2 = time.perf_counter()
    quantize(first, dst, quant, threads, tensor_types=mix)
    first.unlink()
    timings["quantize"] = round(time.perf_counter() - t2, 2)


class _Verified:
    """The verified path's steps, in order, each timed into `timings`."""

    def __init__(self, plan, profile, threads: int, log, progress: bool, timings: dict):
        self.plan, self.profile, self.threads = plan, profile, threads
        self.log, self.progress, self.timings = log, progress, timings

    def run(self, first: Path, dst: Path, out: Path, reference_dtype: str | None, data,
            use_imatrix: bool, quantize: dict) -> tuple[dict, dict]:
        """(task fidelity, logit parity): the peft reference is loaded, serves the parity prompts
        and is freed before llama.cpp runs the reference passes and the candidates."""
        reference, parity_ref = self.reference(reference_dtype)
        prep = self.reference_passes(reference, first, data, use_imatrix)
        del reference
        fid = self.quantize(prep, first, dst, use_imatrix=use_imatrix, **quantize)
        return fid, self.parity(parity_ref, dst, fid["quant"], out)

    def reference(self, reference_dtype: str | None):
        """(the peft reference, its logit-parity side): peft in torch serves only the parity
        prompts, then is freed; its tokenizer stays."""
        from .verify import reference_side

        t2 = time.perf_counter()
        # streamed from the shards: one block in memory at a time, so float32 fits at any size
        dtype = reference_dtype or "float32"
        reference = _load_reference(self.plan, dtype, self.threads, self.log, self.profile)
        self.timings["reference_load"] = round(time.perf_counter() - t2, 2)
        t2 = time.perf_counter()
        try:
            parity_ref = reference_side(reference, self.log)
        finally:
            reference.release()
        self.timings["parity_reference"] = round(time.perf_counter() - t2, 2)
        return reference, parity_ref

    def reference_passes(self, reference, first: Path, data, use_imatrix: bool):
        """Labels, imatrix and teacher: llama.cpp on the f16 intermediate (or the float output)."""
        from . import autoquant

        t2 = time.perf_counter()
        prep = autoquant.prepare(reference, first, data=data, imatrix=use_imatrix, log=self.log,
                                 progress=self.progress, cfg=self.profile, threads=self.threads)
        self.timings["reference_passes"] = round(time.perf_counter() - t2, 2)
        return prep

    def quantize(self, prep, first: Path, dst: Path, *, quant: str, inter, auto: bool, mix,
                 use_imatrix: bool, min_agreement: float, frontier: bool) -> dict:
        from . import autoquant

        t3 = time.perf_counter()
        if inter and not auto:
            self.log(f"quantizing to {quant}{' with the imatrix' if use_imatrix else ''}"
                     f"{' and --keep types' if mix else ''} ({self.threads} threads) ...")
        f32 = first.with_name("model-f32.gguf")
        fid = autoquant.finish(prep, first, dst, quant, min_agreement=min_agreement,
                               threads=self.threads, use_imatrix=use_imatrix, keep=mix, log=self.log,
                               progress=self.progress, frontier=frontier,
                               f32_source=(lambda: self.f32_intermediate(f32)) if auto else None)
        if inter:
            first.unlink()
            f32.unlink(missing_ok=True)
        self.timings["quantize_fidelity"] = round(time.perf_counter() - t3, 2)
        return fid

    def f32_intermediate(self, path: Path) -> Path | None:
        """auto's q8_0-based candidates are quantized from f32, as --quant q8_0 is: the merge runs
        again into `path`, once the search gets that far. Without the disk for it (the f32 next to
        the f16, the provisional choice and a q8_0 candidate) they come from the f16, and the log
        says so."""
        short = _short_of_disk(self.plan, path.parent, "f32", "q8_0")
        if short:
            self.log(f"not enough free disk for an f32 intermediate ({short}): q8_0 and the mix "
                     "are quantized from the f16")
            return None
        self.log("merging again into an f32 intermediate: q8_0 and the mix are quantized from it")
        _write_first(self.plan, path, "f32", AUTO, self.profile, self.threads, self.progress,
                     self.timings, timing="merge_export_f32")
        return path

    def parity(self, parity_ref, gguf: Path, quant: str, out: Path) -> dict:
        """The logit parity of the written file; a failure publishes nothing."""
        from .verify import check_gguf

        t3 = time.perf_counter()
        figures = check_gguf(parity_ref, gguf, quant, self.threads, self.log)
        self.timings["verify"] = round(time.perf_counter() - t3, 2)
        if not figures["passed"]:
            raise UserError(f"verification failed ({'; '.join(figures['failures'])}): "
                            f"{out.name} was not written")
        return figures


def _report(plan, out: Path, size: int, quant: str, requested: str, inter, written: dict,
            threads: int, figures, fid, timings: dict, profile) -> dict:
    lora = plan.lora
    return {
        "output": str(out), "sidecar": str(out) + ".json", "bytes": size, "quant": quant,
        "adapter": plan.adapter_ref, "base": plan.base_ref, "version": __version__,
        "audit": plan.summary(), "ranks": sorted({d.r for d in lora}),
        "scalings": sorted({d.scaling for d in lora}),
        "lora_modules": sorted({d.module.rsplit(".", 1)[-1] for d in lora}),
        "tensors_changed": len(plan.changed), "tensors_total": len(plan.tensors),
        "untied_output": plan.untie, "intermediate": inter, "f32_kept": written["f32_kept"],
        "threads": threads, "verification": figures, "requested_quant": requested,
        "fidelity": fid, "timings": timings, "prompts": profile.describe(),
    }


def _profile(prompts):
    from qwen_local.runtime.profile import Profile, ProfileError, load_profile

    if isinstance(prompts, Profile):
        return prompts
    try:
        return load_profile(prompts)
    except ProfileError as e:
        raise UserError(str(e)) from None


def _load_reference(plan, dtype: str, threads: int, log: Callable[[str], None], profile=None):
    """The fp reference (peft, unmerged LoRA: it follows the trained forward and shares no code
    with our merge), quietly."""
    import warnings

    from transformers.utils import logging as hf_logging

    from .reference import Reference

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    log(f"reference: peft {dtype} (base + unmerged adapter), streamed from the base's shards ...")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Reference(plan.base_dir, plan.adapter_dir, cfg=profile, dtype=dtype, merge=False,
                             threads=threads, stream=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot load the fp reference: {e}") from None


def _bar(enabled: bool, total: int, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="param", unit_scale=True, file=sys.stderr, leave=False,
                dynamic_ncols=True)


def final_line(report: dict) -> str:
    """path, size, type, bits per weight, label agreement (95% lower bound, n) and the logit
    parity figures in one line."""
    v = report.get("verification")
    if v:
        fig = (f"max rel logit err {v['max_rel_err']:.2e}, top-1 {v['top1_agreement']:.1%} "
               f"over {v['positions']} positions, intent {v['intent_agreement']:.0%}, "
               f"tokenizer {v['tokenizer_agreement']:.0%} ({v['reference']})")
    else:
        fig = "verification skipped"
    f = report.get("fidelity")
    if f:
        from qwen_local.runtime.fidelity import describe_agreement

        ff = f["figures"]
        tag = f"{f['chosen']} chosen by auto" if f.get("chosen") else report["quant"]
        bpw = f", {ff['bits_per_weight']:.2f} bpw" if ff.get("bits_per_weight") else ""
        quant = (f"{tag}{bpw}, label agreement {describe_agreement(ff.get('agreement'), ff.get('n'))}"
                 + ("" if f["met_target"] else f" (BELOW the {f['min_agreement']:.0%} target)"))
    else:
        quant = report["quant"]
    return f"{report['output']}  {size_text(report['bytes'])}  {quant}  {fig}"


def warning_line(report: dict) -> str | None:
    """The loud warning to repeat after the final line when the task-fidelity target was missed."""
    f = report.get("fidelity")
    if not f or f["met_target"]:
        return None
    return f.get("warning") or ("WARNING: " + f["reason"])
