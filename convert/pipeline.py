"""The conversion as one Python call: audit -> streaming merge + GGUF -> reference -> quantize ->
task fidelity + parity -> publish.

    from qwen_local.convert.pipeline import run
    report = run("epoch_2_final", quant="auto")            # -> dict, also written to <out>.json
    report = run("epoch_2_final", quant="q8_0", calib="my_queries.jsonl", min_agreement=0.99)

With verification on (the default) no model is ever whole in memory. peft (convert.fidelity.
peft_model.Reference, unmerged LoRA, float32, streamed block by block from the base's shards)
computes only the logit-parity prompts (convert.fidelity.parity) and is freed. The task reference
(label distributions over the calibration queries, next-token teacher) and the importance matrix
come from the f16 intermediate (or the float output itself) in llama.cpp (convert.fidelity.
calibration). The llama.cpp side then quantizes: the type asked for, or the default search within
a size budget (convert.fidelity.search), whose candidates include the base quantized with the
LoRA kept apart in its own file (convert.lora_file). It measures task fidelity (printed table,
`qwen_local.fidelity` in the GGUF header, "fidelity" in the sidecar) and the logit parity
(convert.verified). --no-verify loads no reference at all: no imatrix, no fidelity, and `auto` is
refused.

Intermediates live in a hidden temp folder beside the output and are removed on any error, Ctrl-C,
SIGTERM or SIGHUP; a folder left by a conversion killed with SIGKILL is removed by the next
conversion to the same output (never one whose lock a running conversion holds). The GGUF, its
LoRA file (if any, first) and its sidecar JSON appear with os.replace, so a reader never sees a
partial file. An f32/f16/bf16 output that fails verification is not published (UserError). A
quantized output that misses the agreement target is published with a loud warning.
"""
from __future__ import annotations

import math
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from qwen_local.runtime.errors import UserError, __version__
from qwen_local.runtime.fidelity import size_text

from qwen_local.convert import adapter as adapter_mod
from qwen_local.convert.quantize import (FLOAT_QTYPES, LORA_SUFFIX, check_qtype, intermediate,
                                         split_lora)
from qwen_local.convert.fidelity.search import DEFAULT_MAX_SIZE
from qwen_local.convert.floats import short_of_disk, write_merged
from qwen_local.convert.staging import lora_name, make_temp, os_error, publish, remove_stale_temps
from qwen_local.convert.verified import Verified

AUTO = "auto"

REPORT_KEYS = ("output", "sidecar", "bytes", "lora", "quant", "adapter", "base", "version", "audit", "ranks",
               "scalings", "lora_modules", "tensors_changed", "tensors_total", "untied_output",
               "intermediate", "f32_kept", "threads", "verification", "requested_quant", "fidelity",
               "timings", "prompts")


def default_output(adapter_ref: str, quant: str) -> Path:
    name = Path(adapter_ref.rstrip("/")).name or "model"
    return Path("models") / f"{name}-{quant}.gguf"


def _files_at_once(quant: str, plan) -> tuple[str, ...]:
    """The largest set of files a conversion holds at once, by type, for the disk check."""
    from qwen_local.convert.lora_file import split

    if quant == AUTO:  # the f16 intermediate (and the LoRA candidate's f16 base), the provisional
        # choice and the candidate being measured (the f32 for q8_0 is checked for when wanted)
        return ("f16",) * (1 + bool(split(plan)[1])) + ("q8_0", "q8_0")
    base, apart = split_lora(quant)
    if base in FLOAT_QTYPES:
        return (base,)
    return (base, intermediate(base)) + (("f16",) if apart else ())


def _check_options(quant: str, verify: bool, calib, min_agreement: float, keep, max_size):
    """Option errors that need no file: one-line UserErrors before any work."""
    q = str(quant).strip().lower()
    if q != AUTO:
        base, apart = split_lora(q)
        try:
            q = check_qtype(base) + (LORA_SUFFIX if apart else "")
        except UserError as e:
            raise UserError(str(e).rstrip(")") + ", or auto; a quantized type + lora keeps the "
                            "LoRA apart)") from None
        if apart and base in FLOAT_QTYPES:
            raise UserError(f"--quant {q}: the LoRA is kept apart from a quantized base; {base} is "
                            "not quantized")
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
    return q, m, _max_size(max_size)


def _max_size(value) -> float | None:
    """--max-size: a multiple of the plain q4_k_m file (a number > 0), or none (no budget)."""
    if value is None or str(value).strip().lower() == "none":
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"--max-size must be a number > 0 (a multiple of the plain q4_k_m file, "
                        f"such as 1.10) or none, not {value!r}") from None
    if not math.isfinite(x) or x <= 0:
        raise UserError(f"--max-size must be a number > 0 or none, not {value!r}")
    return x




def run(adapter: str, base: str | None = None, quant: str = "q4_k_m", out: str | Path | None = None,
        verify: bool = True, threads: int | None = None, *, log: Callable[[str], None] | None = None,
        progress: bool = True, reference_dtype: str | None = None, calib: str | Path | None = None,
        min_agreement: float = 0.99, keep: str | dict | None = None, imatrix: bool = True,
        max_queries: int | None = None, prompts=None, frontier: bool = False,
        max_size: float | str | None = DEFAULT_MAX_SIZE) -> dict:
    """Convert a PEFT LoRA adapter (+ its Qwen2 base) into a GGUF; returns the report dict.

    quant: a type of convert.quantize.QTYPES, or "auto" (convert.fidelity.search: the most
    faithful file within max_size x the plain q4_k_m file, or with max_size None the smallest
    meeting min_agreement; needs verify). calib: JSONL of {"query", "label"?} (default: the
    packaged set's calibration split), capped at max_queries (default 400). keep: mixed precision,
    a convert.fidelity.mixed spec ("attn_v=q6_k,first=q8_0") or {regex: type}; with auto it
    replaces the measured mix. imatrix: use the calibration imatrix for q4_k_m/q5_k_m/q6_k/iq4
    and for a keep mix (only when verify is on: it comes from the same reference passes).
    prompts: the prompt profile (a runtime.profile.Profile, a file or a built-in name; default the
    built-in seed profile): every calibration and verification pass uses it, and it is stored in
    the GGUF for serve. The report's keys: see `_report`.
    """
    from qwen_local.convert.fidelity.calibration import (DEFAULT_MAX_QUERIES, load_calibration,
                                                         uses_imatrix)

    log = log or (lambda s: print(s, flush=True))
    t0 = time.perf_counter()
    requested, min_agreement, max_size = _check_options(quant, verify, calib, min_agreement, keep,
                                                        max_size)
    auto = requested == AUTO
    threads = _threads(threads)
    max_queries = DEFAULT_MAX_QUERIES if max_queries is None else int(max_queries)
    profile = _profile(prompts)

    plan = adapter_mod.audit(str(adapter), base)
    for line in plan.summary():
        log(line)
    if split_lora(requested)[1] and not _carried(plan):
        raise UserError(f"--quant {requested}: the adapter has no LoRA on the decoder blocks' "
                        "projections to keep apart; use a type without +lora")
    mix = _mix(keep, int(plan.base_config["num_hidden_layers"]))
    data = load_calibration(calib, profile.labels, max_queries) if verify else None
    use_imatrix = verify and imatrix and uses_imatrix(requested, keep)
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
        fid, figures = None, None
        if verify:
            first = gguf_tmp if inter is None else tmp / f"model-{inter}.gguf"
            written = write_merged(plan, first, inter or requested, requested, profile, threads,
                                   progress, timings, log=log)
            steps = Verified(plan, profile, threads, log, progress, timings)
            fid, figures = steps.run(first, gguf_tmp, out, reference_dtype, data, use_imatrix,
                                     dict(quant=requested, inter=inter, auto=auto, mix=mix,
                                          min_agreement=min_agreement, max_size=max_size,
                                          frontier=frontier))
            lora_tmp = Path(fid["lora"]["file"]) if fid.get("lora") else None
        else:
            written, lora_tmp = _unverified(plan, tmp, requested, profile, threads, progress, mix,
                                            log, timings)
        quant = fid["quant"] if fid else requested
        if auto and not named_by_user:
            out = out.with_name(default_output(plan.adapter_ref, quant).name)
        _stamp(gguf_tmp, fid, lora_tmp, out)
        report = _report(plan, out, gguf_tmp, lora_tmp, quant, requested, inter, written, threads,
                         figures, fid, timings, profile)
        timings["total"] = round(time.perf_counter() - t0, 2)
        publish(report, tmp, gguf_tmp, out, lora_tmp)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        os.close(lock)


def _carried(plan) -> bool:
    from qwen_local.convert.lora_file import split

    return bool(split(plan)[1])


def _stamp(gguf: Path, fid: dict | None, lora: Path | None, out: Path) -> None:
    """The figures (qwen_local.fidelity) and the LoRA file the base is served with, under the name
    it will have beside `out`, into the GGUF's header, in one rewrite."""
    from qwen_local.convert.fidelity.report import metadata_value
    from qwen_local.runtime.gguf_file import write_metadata

    if fid and lora is not None:  # the reports name the published file, not the temp one
        fid["lora"]["file"] = str(lora_name(out))
    values = metadata_value(fid) if fid else {}
    if lora is not None:
        from qwen_local.convert.lora_file import companion_meta
        from qwen_local.runtime.lora import LORA_KEY
        values[LORA_KEY] = companion_meta(lora, name=lora_name(out).name)
    if values:
        write_metadata(gguf, values)


def _threads(threads: int | None) -> int:
    from qwen_local.runtime.llama import threads_or_default

    if threads is not None and int(threads) < 1:
        raise UserError("--threads must be >= 1")
    return threads_or_default(threads)


def _mix(keep, n_layers: int) -> dict | None:
    """--keep as {regex: type}: a convert.fidelity.mixed spec string or a dict; None for no mix."""
    if isinstance(keep, str) and keep.strip():
        from qwen_local.convert.fidelity.mixed import parse_spec
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
    short = short_of_disk(plan, out.parent, *_files_at_once(requested, plan))
    if short:
        raise UserError(f"not enough free disk space in {out.parent}: {short}")
    return out


def _unverified(plan, tmp: Path, quant: str, profile, threads: int, progress: bool, mix, log,
                timings: dict) -> tuple[dict, Path | None]:
    """--no-verify: the float file (the output itself, or what is quantized), quantized as asked;
    with +lora, the base file quantized and the LoRA file beside it. (written, the LoRA file)."""
    from qwen_local.convert.floats import write_lora_pair
    from qwen_local.convert.quantize import quantize

    dst, inter = tmp / "model.gguf", intermediate(quant)
    base, apart = split_lora(quant)
    lora = None
    if apart:
        first, lora = write_lora_pair(plan, tmp, profile, threads, progress, timings, inter)
        written = {"f32_kept": []}
    else:
        first = dst if inter is None else tmp / f"model-{inter}.gguf"
        written = write_merged(plan, first, inter or quant, quant, profile, threads, progress,
                               timings, log=log)
    if inter:
        log(f"quantizing to {quant} ({threads} threads) ...")
        t = time.perf_counter()
        quantize(first, dst, base, threads, tensor_types=mix)
        first.unlink()
        timings["quantize"] = round(time.perf_counter() - t, 2)
    return written, lora


def _report(plan, out: Path, gguf: Path, lora_tmp: Path | None, quant: str, requested: str, inter,
            written: dict, threads: int, figures, fid, timings: dict, profile) -> dict:
    """Report keys: output, sidecar, bytes (with the LoRA file), lora (the LoRA file beside the
    output, or None), quant (the type written), requested_quant, adapter, base, version, audit
    (summary lines), ranks, scalings, lora_modules, tensors_changed, tensors_total, untied_output,
    intermediate ('f16' or None), f32_kept (tensors kept f32 for f16 overflow), threads,
    verification (logit-parity figures or None), fidelity (task fidelity, see convert.fidelity.
    search and check; or None), timings (seconds: audit, merge_export, reference_load and
    parity_reference (peft), reference_passes (llama.cpp on the f16), export_base and export_lora
    (the LoRA candidate), merge_export_f32 (a q8_0-based candidate), quantize or
    quantize_fidelity, verify, total)."""
    lora = plan.lora
    size = gguf.stat().st_size + (lora_tmp.stat().st_size if lora_tmp else 0)
    return {
        "output": str(out), "sidecar": str(out) + ".json", "bytes": size, "quant": quant,
        "lora": str(lora_name(out)) if lora_tmp else None,
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
    from qwen_local.runtime.profile import Profile, load_profile

    return prompts if isinstance(prompts, Profile) else load_profile(prompts)


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
    size = size_text(report["bytes"])
    if report.get("lora"):
        size += f" in all, with its LoRA file {Path(report['lora']).name}"
    return f"{report['output']}  {size}  {quant}  {fig}"


def warning_line(report: dict) -> str | None:
    """The loud warning to repeat after the final line when the task-fidelity target was missed."""
    f = report.get("fidelity")
    if not f or f["met_target"]:
        return None
    return f.get("warning") or ("WARNING: " + f["reason"])
