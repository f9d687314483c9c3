"""`--quant auto`: the smallest GGUF that still answers like the user's model, or a plain warning.

    choose(reference, f16_gguf, out, candidates=DEFAULT_CANDIDATES, calib=None,
           min_agreement=0.99, threads=2) -> (path, report)
    check(reference, gguf, quant, calib=None, min_agreement=0.99, threads=2) -> report

`choose` collects an importance matrix from the calibration queries on the fp reference (the same
forward passes give the reference's label distributions), then tries the candidates in order, small
to large (DEFAULT_CANDIDATES): iq4_xs, q4_k_m, q5_k_m, a measured mix (q8_0 with the tensor
groups that cost the labels least lowered to ~6 or 4 bits, up to MIX_SIZE x the q4_k_m file;
convert/mixed.py), q6_k, all with the imatrix, then q8_0. Each is quantized with
convert.quantize.quantize (llama_model_quantize) from the float file convert.quantize.intermediate
names for its base type (q8_0 and the mix: f32, when the caller can make one; the rest: f16),
measured with runtime.evaluate.measure_gguf
(serve's own one-pass intent path) and dropped as soon as its disagreements make the target
unreachable. The first candidate meeting the target ends the search;
fidelity.select picks the smallest measured file that meets it, or, when none does, the closest one
with met_target=False and a loud reason. `check` measures one explicitly chosen quant and carries
fidelity.explicit_warning when it misses.

The figures go into the report (for the sidecar JSON) and, via `write_metadata`, into the GGUF as
`qwen_local.fidelity` (a JSON string; convert.fidelity_report).
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from qwen_local.convert import mixed
from qwen_local.convert.fidelity_report import metadata_value, summary_table, summary_table_one, table_head
from qwen_local.runtime import fidelity
from qwen_local.runtime.gguf_file import read_header, write_metadata

# Calibration budget. A 99% target is judged by the agreement's 95% lower bound, which 200
# queries cannot reach even with no disagreement (98.5%); 400 reach it with none (99.25%). The
# packaged set's calibration split has exactly 400. A failing candidate costs little: it is
# dropped at its first disagreement past the bound. Replies feed only the imatrix, where 64
# prompts already give tens of thousands of tokens per tensor.
DEFAULT_MAX_QUERIES = 400
DEFAULT_IMATRIX_REPLIES = 64
# the mixed candidate is lowered from q8_0 until it is no larger than this multiple of the plain
# q4_k_m file (the size a 4-bit-class file must stay within)
MIX_SIZE = 1.10
# queries each group's lowering is measured on (the screen measures up to 19 files). It keeps the
# 0.5B screen near 12 minutes but is noisy: the label KL of a group can rank differently on all 400
# queries, which is why the chosen mix is then measured like every other candidate
SENSITIVITY_QUERIES = 128
# types for which an importance matrix changes the result (q8_0 and float types ignore it)
IMATRIX_QTYPES = ("iq4_xs", "iq4_nl", "q4_k_m", "q5_k_m", "q6_k")


def uses_imatrix(quant: str, keep) -> bool:
    """Whether quantizing to `quant` (with the --keep mix `keep`) can use an importance matrix:
    auto always; a --keep mix may lower tensors to types it guides, whatever the base type."""
    return quant == "auto" or quant in IMATRIX_QTYPES or bool(keep)


@dataclass(frozen=True)
class Plan:
    """One candidate: base llama.cpp type, with or without the imatrix and the auto mix."""
    name: str
    qtype: str
    imatrix: bool = False
    mixed: bool = False


# smallest first: the search stops at the first candidate whose agreement bound meets the target
DEFAULT_CANDIDATES = (
    Plan("iq4_xs+imatrix", "iq4_xs", imatrix=True),
    Plan("q4_k_m+imatrix", "q4_k_m", imatrix=True),
    Plan("q5_k_m+imatrix", "q5_k_m", imatrix=True),
    # q8_0 with the groups whose lowering costs the labels least lowered, to MIX_SIZE x q4_k_m
    Plan("mixed+imatrix", "q8_0", imatrix=True, mixed=True),
    Plan("q6_k+imatrix", "q6_k", imatrix=True),
    Plan("q8_0", "q8_0"),
)


def _log_default(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _tqdm(desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda it: tqdm(it, desc=desc, unit="q", file=sys.stderr, leave=False, dynamic_ncols=True)


def _row_to_candidate(plan: Plan, row: dict, path: Path) -> fidelity.Candidate:
    return fidelity.Candidate(
        name=plan.name, qtype=plan.qtype, size_bytes=row["bytes"], agreement=row.get("agreement"),
        label_kl=row.get("label_kl"), accuracy=row.get("accuracy"),
        top1_agreement=row.get("next_token_top1"), next_token_kl=row.get("next_token_kl"),
        n=row.get("n_measured"), complete=row.get("complete", True), path=str(path),
        extra={"seconds": row.get("seconds"), "imatrix": plan.imatrix, "mixed": plan.mixed,
               "bits_per_weight": row.get("bits_per_weight")})


@dataclass
class Prepared:
    """Everything the candidates are measured against, computed on the fp reference in one go:
    after `prepare` the torch model is no longer needed (the convert pipeline frees it before
    llama.cpp loads any candidate)."""
    data: object                      # runtime.dataset.Dataset (capped at max_queries)
    ref: object                       # runtime.evaluate.ReferenceRun
    cfg: object                       # runtime.profile.Profile
    im_means: dict | None             # {GGUF tensor: float32 means} for llama_model_quantize
    im_info: dict | None              # {entries, tokens, prompts}
    timings: dict
    reference_accuracy: float | None = None   # the fp reference's own accuracy, on labelled data
    # runtime.evaluate.measure_gguf options: low memory, and the file's own error only
    measure: dict = field(default_factory=lambda: {"lean": True, "exact": True})


def load_calibration(calib: str | Path | None, labels, max_queries: int | None = DEFAULT_MAX_QUERIES):
    """The calibration set (default: the packaged set's calibration split, whose other queries
    stay held-out), capped; a bad file is a UserError."""
    from qwen_local.runtime.dataset import load_data, packaged

    data = packaged("calibration", labels) if calib is None else load_data(calib, labels,
                                                                           what="calibration file")
    return data.head(max_queries)


def prepare(reference, f16_gguf: str | Path | None, calib: str | Path | None = None, *,
            imatrix: bool = True, max_queries: int | None = DEFAULT_MAX_QUERIES,
            gen_prompts: int = 4, imatrix_replies: int | None = DEFAULT_IMATRIX_REPLIES,
            data=None, log: Callable[[str], None] | None = None, progress: bool = True,
            cfg=None, threads: int | None = None) -> Prepared:
    """The reference side: the reference label distributions, (imatrix=True) the importance
    matrix, and the next-token teacher on a few reply prompts.

    With f16_gguf (the conversion's f16/f32 intermediate) all of it comes from that file in
    llama.cpp (convert.gguf_reference: shared system-prompt KV, batched queries, the imatrix
    through the eval callback, no torch model); `reference` may then be None, or a
    convert.reference.PromptEncoder (a released Reference is one) whose HF tokenizer provides
    the ids for the per-query tokenizer check. Without f16_gguf the torch `reference` runs every
    pass (explicit `check` of a finished GGUF, which has no intermediate)."""
    from qwen_local.convert.evaluate import reference_run

    log = log or _log_default
    cfg = cfg or reference.cfg
    data = data if data is not None else load_calibration(calib, cfg.labels, max_queries)
    timings: dict[str, float] = {}
    im_means, im_info = None, None
    t = time.perf_counter()
    if f16_gguf is not None:
        from qwen_local.convert import gguf_reference
        from qwen_local.convert.imatrix import as_quantize_param
        from qwen_local.runtime.evaluate import _threads

        n_reply = min(len(data), imatrix_replies or len(data)) if imatrix else 0
        log(f"reference labels{' + imatrix' if imatrix else ''} on {Path(f16_gguf).name} "
            f"(llama.cpp): {len(data)} calibration queries"
            + (f", reply prompt for {n_reply}" if imatrix else ""))
        ref, im = gguf_reference.run(
            f16_gguf, data, cfg, threads=_threads(threads), imatrix=imatrix,
            reply_limit=imatrix_replies, gen_prompts=gen_prompts, encoder=reference,
            describe=f"{_float_type(f16_gguf)} GGUF (llama.cpp, f32 KV)",
            progress=_tqdm("reference (llama.cpp)", progress))
        if im is not None:
            im_means = as_quantize_param(im, f16_gguf)
            im_info = {"entries": len(im_means), "tokens": im.n_tokens, "prompts": im.n_prompts}
    else:
        from qwen_local.convert.imatrix import as_quantize_param, collect

        probs = None
        if imatrix:
            log(f"imatrix + reference labels: {len(data)} calibration queries (intent prompt each, "
                f"reply prompt for {min(len(data), imatrix_replies or len(data))})")
            im = collect(reference, data.queries, labels=data.labels, reply_limit=imatrix_replies,
                         progress=_tqdm("imatrix (torch)", progress))
            im_means = as_quantize_param(im)
            probs = im.ref_probs
            im_info = {"entries": len(im_means), "tokens": im.n_tokens, "prompts": im.n_prompts}
        ref = reference_run(reference, data, probs=probs, gen_prompts=gen_prompts,
                            progress=_tqdm("reference (torch)", progress))
    timings["reference"] = round(time.perf_counter() - t, 2)
    acc = None
    if data.labelled:
        from qwen_local.runtime.labels import decide
        acc = fidelity.accuracy(data.labels, [decide(p) for p in ref.probs])
    return Prepared(data=data, ref=ref, cfg=cfg, im_means=im_means,
                    im_info=im_info, timings=timings, reference_accuracy=acc)


def _float_type(path: str | Path) -> str:
    """'f16', 'bf16' or 'f32': the type of the intermediate's attention weights."""
    import gguf

    for n, _, ttype, _ in read_header(path).tensors:
        if n.endswith("attn_q.weight"):
            return gguf.GGMLQuantizationType(ttype).name.lower()
    return "fp"


def choose(reference, f16_gguf: str | Path, out: str | Path,
           candidates: Sequence[Plan] = DEFAULT_CANDIDATES, calib: str | Path | None = None, *,
           min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
           max_queries: int | None = DEFAULT_MAX_QUERIES, gen_prompts: int = 4,
           imatrix_replies: int | None = DEFAULT_IMATRIX_REPLIES,
           log: Callable[[str], None] | None = None, progress: bool = True,
           workdir: str | Path | None = None) -> tuple[Path, dict]:
    """Quantize and measure candidates; move the chosen file to `out`; return (out, report).

    report: chosen, reason, met_target, min_agreement, calibration {source, n, labelled},
    reference, imatrix {entries, tokens, prompts}, candidates [Candidate dicts], timings.
    The GGUF's metadata is not touched here: call write_metadata(out, report) if wanted.
    """
    prep = prepare(reference, f16_gguf, calib, imatrix=any(c.imatrix for c in candidates),
                   max_queries=max_queries, gen_prompts=gen_prompts, imatrix_replies=imatrix_replies,
                   log=log, progress=progress)
    return choose_prepared(prep, f16_gguf, out, candidates, min_agreement=min_agreement,
                           threads=threads, log=log, progress=progress, workdir=workdir)


def choose_prepared(prep: Prepared, f16_gguf: str | Path, out: str | Path,
                    candidates: Sequence[Plan] = DEFAULT_CANDIDATES, *,
                    min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
                    mix: dict[str, str] | None = None, log: Callable[[str], None] | None = None,
                    progress: bool = True, workdir: str | Path | None = None,
                    frontier: bool = False,
                    f32_source: Callable[[], Path | None] | None = None) -> tuple[Path, dict]:
    """The llama.cpp side of `choose` (no torch model needed). mix replaces the sensitivity-
    guided mix of the mixed candidate (the user's --keep). frontier: measure every candidate on
    every query (no early stop, no stop at the first pass) for the size/agreement table.
    f32_source: makes an f32 GGUF of the same model (None when it cannot, e.g. for want of disk);
    called once, when the first candidate quantize.intermediate sends to f32 (q8_0, the mix's
    base) comes up, so a search that ends at 4 bits never pays for it. Without it every
    candidate comes from f16_gguf."""
    from qwen_local.convert.quantize import intermediate, quantize
    from qwen_local.runtime.evaluate import measure_gguf

    log = log or _log_default
    t0 = time.perf_counter()
    out = Path(out)
    data, ref = prep.data, prep.ref
    user_mix = mix
    timings = dict(prep.timings)
    if any(c.imatrix for c in candidates) and prep.im_means is None:
        raise ValueError("candidates use the imatrix but none was prepared")
    work = Path(tempfile.mkdtemp(prefix=".autoquant.", dir=workdir or out.parent))
    # asked for once, when first wanted; the f16 stands in when it could not be made
    f32_file = functools.cache(lambda: f32_source() or Path(f16_gguf)) if f32_source else None

    def source(qtype: str) -> Path:
        return f32_file() if f32_file and intermediate(qtype) == "f32" else Path(f16_gguf)

    measured: list[fidelity.Candidate] = []
    rows: dict[str, dict] = {}
    sensitivity: dict = {}
    try:
        for plan in candidates:
            path = work / f"{plan.name.replace('+', '-')}.gguf"
            t = time.perf_counter()
            src = source(plan.qtype)
            if plan.mixed:
                mix = user_mix or _measured_mix(prep, src, f16_gguf, work, threads, log, measured,
                                                sensitivity)
            quantize(src, path, plan.qtype, threads,
                     imatrix=prep.im_means if plan.imatrix else None,
                     tensor_types=mix if plan.mixed else None)
            tq = time.perf_counter() - t
            # a file that cannot meet the target is still measured while it could beat the
            # closest file so far (fewer disagreements than it): when none meets the target, that
            # one is kept, and its figures must be whole, not cut off at the first disagreement
            fewest = min((len(rows[c.name]["disagreements"]) for c in measured if c.complete),
                         default=None)
            stop = not frontier and fewest is not None
            row = measure_gguf(path, data, ref, cfg=prep.cfg, threads=threads,
                               stop_below=min_agreement if stop else None,
                               tolerate=fewest - 1 if stop else None, progress=progress,
                               name=plan.name, **prep.measure)
            row.pop("probs", None)
            rows[plan.name] = row
            cand = _row_to_candidate(plan, row, path)
            cand.extra.update(quantize_seconds=round(tq, 2), source=_float_type(src))
            measured.append(cand)
            log(f"  {plan.name:<22} {fidelity.size_text(cand.size_bytes):>10}  agreement "
                f"{fidelity._pct(cand.agreement)}{'' if cand.complete else ' (at most; stopped early)'}")
            if fidelity.meets(cand, min_agreement) and not frontier:
                break
            # disk: only the provisional choice can still be picked (a 3B candidate is ~2 GB)
            keep = fidelity.select(measured, min_agreement)[0]
            for c in measured:
                if c is not keep and c.path and Path(c.path).exists():
                    Path(c.path).unlink()
        chosen, reason, met = fidelity.select(measured, min_agreement)
        os.replace(chosen.path, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    timings["candidates"] = round(sum(c.extra["seconds"] + c.extra["quantize_seconds"]
                                      for c in measured), 2)
    timings["total"] = round(time.perf_counter() - t0 + sum(prep.timings.values()), 2)
    (log if met else (lambda s: log("WARNING: " + s)))(reason)
    where = fidelity.margins_text(chosen.name, rows[chosen.name])
    if where:
        log(where)
    report = {
        "chosen": chosen.name, "quant": chosen.qtype, "reason": reason, "met_target": met,
        "min_agreement": min_agreement,
        "calibration": {"source": data.source, "n": len(data),
                        "labelled": sum(x is not None for x in data.labels)},
        "reference": ref.describe, "reference_accuracy": prep.reference_accuracy,
        "imatrix": prep.im_info if chosen.extra["imatrix"] else None,
        "mixed": mixed.describe(mix) if chosen.extra["mixed"] else None,
        "mix_size": MIX_SIZE, "sensitivity": sensitivity or None,
        "candidates": [dict(c.as_dict(), path=None) for c in measured],
        "figures": {k: v for k, v in rows[chosen.name].items() if k not in ("model", "disagreements")},
        "timings": timings,
    }
    return out, report


def _measured_mix(prep: Prepared, q8_src, f16_gguf, work: Path, threads: int, log,
                  measured: Sequence[fidelity.Candidate], record: dict) -> dict:
    """The mixed candidate's overrides (convert.mixed): q8_0, then every group alone one and two
    rungs down its ladder, each file's label KL on the first SENSITIVITY_QUERIES calibration
    queries; a rung's cost is its KL over q8_0's own. allocate() picks the cheapest rungs that
    bring the file to MIX_SIZE x the plain q4_k_m (quantized here if the ladder has not yet).
    The screened files come from q8_src, the float file the mix itself is quantized from.
    `record` gets the measured table, for the report."""
    from qwen_local.convert.quantize import quantize
    from qwen_local.runtime.evaluate import ReferenceRun, measure_gguf

    data = prep.data.head(SENSITIVITY_QUERIES)
    n = len(data)
    ref = ReferenceRun(probs=prep.ref.probs[:n], describe=prep.ref.describe)  # no teacher: labels only
    shapes = mixed.group_shapes(read_header(f16_gguf))
    path = work / "sensitivity.gguf"

    def size_and_kl(tensor_types: dict) -> tuple[int, float]:
        quantize(q8_src, path, "q8_0", threads, imatrix=prep.im_means, tensor_types=tensor_types)
        try:
            row = measure_gguf(path, data, ref, cfg=prep.cfg, threads=threads, **prep.measure)
            return path.stat().st_size, row["label_kl"]
        finally:
            path.unlink()

    t = time.perf_counter()
    q4 = next((c.size_bytes for c in measured if c.qtype == "q4_k_m"), None)
    if q4 is None:
        quantize(f16_gguf, path, "q4_k_m", threads, imatrix=prep.im_means)
        q4 = path.stat().st_size
        path.unlink()
    q8_size, q8_kl = size_and_kl({})
    limit = int(MIX_SIZE * q4)
    saved = mixed.savings(shapes)
    # a group whose lowest rung saves under 1% of the bytes to shed (attn_k/attn_v: ~1 MB of
    # 135 at 0.5B) cannot change the choice: it stays q8_0, unmeasured
    skipped = sorted(g for g in shapes if saved[g][-1] < (q8_size - limit) / 100)
    shapes = {g: v for g, v in shapes.items() if g not in skipped}
    costs = {g: [0.0] + [max(0.0, size_and_kl(mixed.rung_overrides(g, w, r))[1] - q8_kl)
                         for r in (1, 2)] for g, (w, _) in shapes.items()}
    rungs = mixed.allocate(costs, saved, q8_size - limit) or {g: 2 for g in shapes}
    groups = {g: {"types": list(mixed.ladder(w)), "label_kl_added": costs[g], "bytes_saved": saved[g],
                  "chosen": mixed.ladder(w)[rungs[g]]} for g, (w, _) in shapes.items()}
    record.update(queries=n, q8_0_label_kl=q8_kl, limit_bytes=limit, groups=groups, kept_q8_0=skipped,
                  seconds=round(time.perf_counter() - t, 2))
    log(f"  sensitivity on {n} queries ({record['seconds']:.0f} s): label KL added by lowering one "
        "group from q8_0, and the rung chosen\n" + "\n".join(
            f"    {g:<12}" + "".join(f"  {q} {k:.4f}"
                                      for q, k in zip(v["types"][1:], v["label_kl_added"][1:]))
            + f"  -> {v['chosen']}" for g, v in groups.items())
        + (f"\n    {', '.join(skipped)}: too small to matter, kept q8_0" if skipped else ""))
    return mixed.overrides(rungs, shapes)


def check(reference, gguf: str | Path, quant: str, calib: str | Path | None = None, *,
          min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
          max_queries: int | None = DEFAULT_MAX_QUERIES, gen_prompts: int = 4,
          progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """Task fidelity of one GGUF the user asked for by name; a loud warning when it misses."""
    prep = prepare(reference, None, calib, imatrix=False, max_queries=max_queries,
                   gen_prompts=gen_prompts, log=log, progress=progress)
    return check_prepared(prep, gguf, quant, min_agreement=min_agreement, threads=threads,
                          progress=progress, log=log)


def check_prepared(prep: Prepared, gguf: str | Path, quant: str, *,
                   min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
                   progress: bool = True, log: Callable[[str], None] | None = None) -> dict:
    """The llama.cpp side of `check`."""
    from qwen_local.runtime.evaluate import measure_gguf

    log = log or _log_default
    data, ref = prep.data, prep.ref
    t = time.perf_counter()
    row = measure_gguf(gguf, data, ref, cfg=prep.cfg, threads=threads, progress=progress, name=quant,
                       **prep.measure)
    row.pop("probs", None)
    warning = fidelity.explicit_warning(quant, row.get("agreement"), min_agreement, len(data))
    if warning:
        log(warning)
    where = fidelity.margins_text(quant, row)
    if where:
        log(where)
    return {"quant": quant, "min_agreement": min_agreement, "met_target": warning is None,
            "warning": warning, "reference": ref.describe,
            "reference_accuracy": prep.reference_accuracy,
            "calibration": {"source": data.source, "n": len(data),
                            "labelled": sum(x is not None for x in data.labels)},
            "figures": {k: v for k, v in row.items() if k not in ("model", "disagreements")},
            "timings": dict(prep.timings, measure=round(time.perf_counter() - t, 2))}


def finish(prep: Prepared, f16_gguf: str | Path, dst: str | Path, quant: str, *,
           min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
           use_imatrix: bool = False, keep: dict[str, str] | None = None,
           log: Callable[[str], None] | None = None, progress: bool = True,
           frontier: bool = False, f32_source: Callable[[], Path | None] | None = None) -> dict:
    """The llama.cpp side of convert_step: quantize (or choose), measure, write the metadata.

    quant == "auto": choose_prepared among DEFAULT_CANDIDATES (keep replaces the auto mix; the
    q8_0-based candidates come from f32_source's file when it gives one) and move the winner to
    dst. Otherwise quantize f16 -> dst as asked, with prep's imatrix when use_imatrix and keep's
    tensor types, measure it and warn loudly when it misses min_agreement; a float
    `quant` means dst is the f16_gguf itself or a copy of it (measured, nothing quantized).
    """
    from qwen_local.convert.quantize import FLOAT_QTYPES, quantize

    log = log or _log_default
    if quant == "auto":
        plans = DEFAULT_CANDIDATES if prep.im_means is not None else tuple(
            Plan(c.name.replace("+imatrix", ""), c.qtype, imatrix=False, mixed=c.mixed)
            for c in DEFAULT_CANDIDATES)
        log("trying " + ", ".join(c.name for c in plans) + (
            " (every one, on every query: --frontier)" if frontier else
            f" (smallest first, until one shows {fidelity._pct(min_agreement)} label agreement "
            f"by its {fidelity.CONFIDENCE:.0%} lower bound)"))
        _, report = choose_prepared(prep, f16_gguf, dst, plans, min_agreement=min_agreement,
                                    threads=threads, mix=keep, log=log, progress=progress,
                                    frontier=frontier, f32_source=f32_source)
        log(table_head(report) + "\n" + summary_table(report))
    else:
        im = prep.im_means if use_imatrix and uses_imatrix(quant, keep) else None
        if quant not in FLOAT_QTYPES:
            t = time.perf_counter()
            quantize(f16_gguf, dst, quant, threads, imatrix=im, tensor_types=keep or None)
            prep.timings["quantize"] = round(time.perf_counter() - t, 2)
        elif Path(f16_gguf) != Path(dst):
            shutil.copyfile(f16_gguf, dst)
        report = check_prepared(prep, dst, quant, min_agreement=min_agreement, threads=threads,
                                progress=progress, log=log)
        report["imatrix"] = prep.im_info if im is not None else None
        report["mixed"] = mixed.describe(keep) if keep else None
        log(summary_table_one(report))
    write_metadata(dst, metadata_value(report))
    return report


def convert_step(base_dir: str | Path, adapter_dir: str | Path | None, f16_gguf: str | Path,
                 dst: str | Path, quant: str, *, calib: str | Path | None = None,
                 min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT, threads: int = 2,
                 use_imatrix: bool = False, keep: dict[str, str] | None = None,
                 reference_dtype: str | None = None, reference=None,
                 max_queries: int | None = DEFAULT_MAX_QUERIES, log: Callable[[str], None] | None = None,
                 progress: bool = True) -> dict:
    """Everything after writing the f16 GGUF, in one call: prepare() on the reference (loaded
    here unless given), then finish(). The figures are written into dst's metadata
    (qwen_local.fidelity) and returned for the sidecar JSON. (convert.pipeline calls prepare and
    finish itself, to share its one reference with the logit-parity check and free it between.)"""
    from qwen_local.convert.reference import Reference

    t0 = time.perf_counter()
    if reference is None:
        dtype = reference_dtype or _reference_dtype(base_dir)
        reference = Reference(base_dir, adapter_dir, dtype=dtype, threads=threads)
    prep = prepare(reference, f16_gguf, calib,
                   imatrix=quant == "auto" or (use_imatrix and uses_imatrix(quant, keep)),
                   max_queries=max_queries, log=log, progress=progress)
    report = finish(prep, f16_gguf, dst, quant, min_agreement=min_agreement, threads=threads,
                    use_imatrix=use_imatrix, keep=keep, log=log, progress=progress)
    report.setdefault("timings", {})["fidelity_total"] = round(time.perf_counter() - t0, 2)
    return report


def _reference_dtype(base_dir: str | Path) -> str:
    """float32 when it fits comfortably in RAM (convert.verify's rule), else bfloat16."""
    try:
        cfg = json.loads((Path(base_dir) / "config.json").read_text())
        h, n, inter, v = (cfg["hidden_size"], cfg["num_hidden_layers"], cfg["intermediate_size"],
                          cfg["vocab_size"])
        n_params = v * h * (1 if cfg.get("tie_word_embeddings") else 2) + n * (4 * h * h + 3 * h * inter)
        from qwen_local.convert.verify import choose_reference_dtype
        return choose_reference_dtype(n_params)
    except Exception:  # noqa: BLE001 - unknown shape: the exact reference
        return "float32"
