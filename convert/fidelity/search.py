"""The default search (`--quant auto`): within a size budget, the file that answers most like the
fine-tune.

The candidates (LADDER, smallest first): iq4_xs and q4_k_m with the importance matrix; the q4_k_m
base with the LoRA kept apart and applied at run time (convert.lora_file); q5_k_m; a measured mix
(q8_0 with the tensor groups that cost the labels least lowered, convert.fidelity.mixed); q6_k; q8_0.
Each is quantized (convert.quantize) from the float file its type needs (`Sources`) and measured
with runtime.measure.measure_gguf, serve's own one-pass intent path, against the fp reference
(convert.fidelity.calibration.Prepared).

Two policies (`max_size`):
- **A budget** (default 1.10: the 4-bit class), a multiple of the plain q4_k_m file. Candidates over
  it are not measured. Among the rest the smallest that meets `min_agreement` by its 95% lower bound
  wins; when none does, the most faithful one (fewest disagreements, then the least label KL) is
  written with a WARNING that says how faithful it is and what a larger file would buy. The likely
  winner is measured first and in full (the LoRA candidate when there is a LoRA to keep apart: on
  the shared real adapter it beat every merged file of its size), so every other candidate is
  measured only while it could still beat it. With a LoRA to keep apart the mix is not tried: its
  screen quantizes ~14 files, and on the real adapter it lost to the LoRA candidate (docs/
  quantization.md).
- **None** (`--max-size none`): fidelity first, the smallest candidate meeting the target, up to q8_0.
"""
from __future__ import annotations

import functools
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from qwen_local.convert.fidelity import mixed
from qwen_local.convert.fidelity.calibration import Prepared, float_type, log_default
from qwen_local.convert.staging import lora_name
from qwen_local.runtime import fidelity

# the default budget, and the size the mixed candidate is lowered to: a multiple of the plain
# q4_k_m file (the 4-bit class)
DEFAULT_MAX_SIZE = 1.10
MIX_SIZE = 1.10
# The least each type has measured against the plain q4_k_m file: the 0.5B real base, whose 896-wide
# tensors fall back to 32-wide blocks, shrinks the ratios (q5_k_m 1.063x, q6_k 1.32x, q8_0 1.375x;
# at 3B widths q5_k_m is ~1.15x and q8_0 1.70x). A type whose least size is over the budget is not
# even quantized; one quantized over it is dropped unmeasured.
MIN_RATIO = {"iq4_xs": 0.85, "q4_k_m": 1.0, "q5_k_m": 1.06, "q6_k": 1.3, "q8_0": 1.37}


@dataclass(frozen=True)
class Plan:
    """One candidate: base llama.cpp type, with or without the imatrix, the measured mix, and the
    LoRA kept apart (the base quantized, the LoRA applied at run time)."""
    name: str
    qtype: str
    imatrix: bool = False
    mixed: bool = False
    lora: bool = False


LADDER = (
    Plan("iq4_xs+imatrix", "iq4_xs", imatrix=True),
    Plan("q4_k_m+imatrix", "q4_k_m", imatrix=True),
    Plan("q4_k_m+imatrix+lora", "q4_k_m", imatrix=True, lora=True),
    Plan("q5_k_m+imatrix", "q5_k_m", imatrix=True),
    Plan("mixed+imatrix", "q8_0", imatrix=True, mixed=True),
    Plan("q6_k+imatrix", "q6_k", imatrix=True),
    Plan("q8_0", "q8_0"),
)


@dataclass
class Sources:
    """The float files candidates are quantized from. f16: the merged model (always there). f32:
    makes the merged model in f32 (q8_0 and the mix come from it, see convert.quantize.
    intermediate), or None when it cannot (no disk). lora: makes (the base file in f16, the LoRA
    file), or is None when the adapter has no LoRA to keep apart. Each is made once, when first
    wanted, so a search that never needs it never pays for it."""
    f16: Path
    f32: Callable[[], Path | None] | None = None
    lora: Callable[[], tuple[Path, Path]] | None = None

    def __post_init__(self):
        self._f32 = functools.cache(self.f32) if self.f32 else None
        self._lora = functools.cache(self.lora) if self.lora else None

    def float_for(self, plan: Plan) -> Path:
        from qwen_local.convert.quantize import intermediate

        if plan.lora:
            return self._lora()[0]
        if self._f32 and intermediate(plan.qtype) == "f32":
            return self._f32() or self.f16  # the f16 stands in when no f32 could be made
        return self.f16

    def lora_file(self) -> Path:
        return self._lora()[1]


def ladder(prep: Prepared, sources: Sources, max_size: float | None) -> list[Plan]:
    """The candidates this run tries, in the order it measures them."""
    plans = [p for p in LADDER if sources.lora or not p.lora]
    if prep.im_means is None:
        plans = [Plan(p.name.replace("+imatrix", ""), p.qtype, mixed=p.mixed, lora=p.lora)
                 for p in plans]
    if max_size is None:
        return plans
    if sources.lora:
        plans = [p for p in plans if not p.mixed]
    # the likely winner first, and a q4_k_m first in any case: its size is the budget's unit
    lead = next(p for p in plans if p.qtype == "q4_k_m" and p.lora == bool(sources.lora)
                and not p.mixed)
    return [lead] + [p for p in plans if p is not lead]


@dataclass
class _Run:
    """The state of one search."""
    prep: Prepared
    sources: Sources
    work: Path
    threads: int
    min_agreement: float
    max_size: float | None
    frontier: bool
    keep: dict | None
    log: Callable[[str], None]
    progress: bool
    measured: list = field(default_factory=list)     # fidelity.Candidate
    rows: dict = field(default_factory=dict)          # name -> measure_gguf row
    unit: int | None = None                           # bytes of the plain q4_k_m file
    sensitivity: dict = field(default_factory=dict)
    mix: dict | None = None
    skipped: list = field(default_factory=list)       # (name, why)

    @property
    def budget(self) -> int | None:
        return None if self.max_size is None or self.unit is None else int(self.max_size * self.unit)

    def fewest(self) -> int | None:
        """The fewest disagreements of a candidate measured in full, so far."""
        return min((fidelity.misses(c) for c in self.measured if c.complete), default=None)

    def over(self, plan: Plan) -> str | None:
        """Why a plan cannot be chosen, known before quantizing it (None: try it). Only with a
        budget: without one the search stops at the first file that meets the target. The
        frontier measures every file in the budget, the larger ones too."""
        if self.budget is None or plan.lora:
            return None
        ratio = min(MIX_SIZE, self.max_size) if plan.mixed else MIN_RATIO[plan.qtype]
        if ratio * self.unit > self.budget:
            return f"at least {ratio:.2f}x the q4_k_m file, over the budget"
        ok = [c for c in self.measured if fidelity.meets(c, self.min_agreement)]
        best = min(ok, key=lambda c: c.size_bytes, default=None)
        if best is not None and ratio * self.unit > best.size_bytes and not self.frontier:
            return f"larger than {best.name}, which meets the target"
        return None


def search(prep: Prepared, sources: Sources, dst: str | Path, *,
           min_agreement: float = fidelity.DEFAULT_MIN_AGREEMENT,
           max_size: float | None = DEFAULT_MAX_SIZE, threads: int = 2, keep: dict | None = None,
           log: Callable[[str], None] | None = None, progress: bool = True,
           frontier: bool = False, plans: list[Plan] | None = None) -> dict:
    """Quantize and measure the candidates; move the chosen file to `dst` (and its LoRA file, for
    a LoRA candidate, to dst with the suffix .lora.gguf); return the report (see `_report`).
    keep: a --keep mix, in place of the measured one. frontier: every candidate in the budget on
    every query, for the size/agreement table. plans: these candidates, in this order, instead of
    the ladder. The GGUF's metadata is not touched here."""
    log = log or log_default
    dst = Path(dst)
    t0 = time.perf_counter()
    run = _Run(prep, sources, Path(tempfile.mkdtemp(prefix=".search.", dir=dst.parent)), threads,
               min_agreement, max_size, frontier, keep, log, progress)
    try:
        for plan in plans or ladder(prep, sources, max_size):
            why = run.over(plan)
            if why:
                run.skipped.append((plan.name, why))
                continue
            cand = _try(run, plan)
            if cand is None:
                continue
            if max_size is None and not frontier and fidelity.meets(cand, min_agreement):
                break
            _drop_losers(run)
        chosen, reason, met = fidelity.select(run.measured, min_agreement)
        os.replace(chosen.path, dst)
        lora = lora_name(dst) if chosen.extra["lora"] else None
        if lora:
            shutil.copyfile(sources.lora_file(), lora)
    finally:
        shutil.rmtree(run.work, ignore_errors=True)
    report = _report(run, chosen, reason, met, lora, t0)
    log(report["warning"] if report["warning"] else reason)
    where = fidelity.margins_text(chosen.name, run.rows[chosen.name])
    if where:
        log(where)
    return report


def _try(run: _Run, plan: Plan):
    """Quantize one plan and measure it; None when it turns out over the budget."""
    from qwen_local.convert.quantize import quantize
    from qwen_local.runtime.measure import measure_gguf

    path = run.work / f"{plan.name.replace('+', '-')}.gguf"
    t = time.perf_counter()
    src = run.sources.float_for(plan)
    if plan.mixed:
        run.mix = run.keep or _screen(run, src)
    quantize(src, path, plan.qtype, run.threads, imatrix=run.prep.im_means if plan.imatrix else None,
             tensor_types=run.mix if plan.mixed else None)
    tq = time.perf_counter() - t
    if run.unit is None and plan.qtype == "q4_k_m" and not plan.mixed:
        run.unit = path.stat().st_size
    lora = run.sources.lora_file() if plan.lora else None
    size = path.stat().st_size + (lora.stat().st_size if lora else 0)
    if run.budget is not None and size > run.budget:
        run.skipped.append((plan.name, f"{fidelity.size_text(size)}, over the budget"))
        path.unlink()
        return None
    # a file that cannot meet the target is still measured while it could beat the most faithful
    # file so far (fewer disagreements): that one may be kept, and its figures must be whole
    fewest = run.fewest()
    stop = not run.frontier and fewest is not None
    row = measure_gguf(path, run.prep.data, run.prep.ref, cfg=run.prep.cfg, threads=run.threads,
                       stop_below=run.min_agreement if stop else None,
                       tolerate=fewest - 1 if stop else None, progress=run.progress,
                       name=plan.name, lora=lora, **run.prep.measure)
    row.pop("probs", None)
    run.rows[plan.name] = row
    cand = fidelity.Candidate(
        name=plan.name, qtype=plan.qtype, size_bytes=row["bytes"], agreement=row.get("agreement"),
        label_kl=row.get("label_kl"), accuracy=row.get("accuracy"),
        top1_agreement=row.get("next_token_top1"), next_token_kl=row.get("next_token_kl"),
        n=row.get("n_measured"), complete=row.get("complete", True), path=str(path),
        misses=len(row["disagreements"]),
        extra={"seconds": row.get("seconds"), "imatrix": plan.imatrix, "mixed": plan.mixed,
               "lora": plan.lora, "bits_per_weight": row.get("bits_per_weight"),
               "quantize_seconds": round(tq, 2), "source": float_type(src)})
    run.measured.append(cand)
    run.log(f"  {plan.name:<22} {fidelity.size_text(cand.size_bytes):>10}  {fidelity.outcome(cand)}")
    return cand


def _screen(run: _Run, q8_src: Path) -> dict:
    """The measured mix, lowered to MIX_SIZE x the q4_k_m file (or the budget, if smaller)."""
    if run.unit is None:  # the unit, from a q4_k_m quantized for its size alone
        from qwen_local.convert.quantize import quantize
        probe = run.work / "size-q4_k_m.gguf"
        quantize(run.sources.f16, probe, "q4_k_m", run.threads)
        run.unit = probe.stat().st_size
        probe.unlink()
    limit = int(min(MIX_SIZE, run.max_size or MIX_SIZE) * run.unit)
    overrides, run.sensitivity = mixed.screen(run.prep, q8_src, run.sources.f16, run.work,
                                              run.threads, limit, run.log)
    return overrides


def _drop_losers(run: _Run) -> None:
    """Disk: only the provisional choice can still be picked (a 3B candidate is ~2 GB)."""
    keep = fidelity.select(run.measured, run.min_agreement)[0]
    for c in run.measured:
        if c is not keep and c.path and Path(c.path).exists():
            Path(c.path).unlink()


def _report(run: _Run, chosen, reason: str, met: bool, lora: Path | None, t0: float) -> dict:
    """chosen, quant, reason, met_target, warning, min_agreement, max_size, budget {unit_bytes,
    bytes}, calibration, reference, reference_accuracy, imatrix, mixed, lora, sensitivity,
    skipped, candidates, figures, timings."""
    prep = run.prep
    timings = dict(prep.timings)
    timings["candidates"] = round(sum(c.extra["seconds"] + c.extra["quantize_seconds"]
                                      for c in run.measured), 2)
    timings["total"] = round(time.perf_counter() - t0 + sum(prep.timings.values()), 2)
    figures = {k: v for k, v in run.rows[chosen.name].items() if k not in ("model", "disagreements")}
    report = {
        "chosen": chosen.name, "quant": chosen.qtype + ("+lora" if lora else ""),
        "reason": reason, "met_target": met,
        "warning": None, "min_agreement": run.min_agreement, "max_size": run.max_size,
        "budget": {"unit": "q4_k_m", "unit_bytes": run.unit, "bytes": run.budget},
        "calibration": prep.calibration(), "reference": prep.ref.describe,
        "reference_accuracy": prep.reference_accuracy,
        "imatrix": prep.im_info if chosen.extra["imatrix"] else None,
        "mixed": mixed.describe(run.mix) if chosen.extra["mixed"] else None,
        "lora": {"file": str(lora), "bytes": lora.stat().st_size} if lora else None,
        "sensitivity": run.sensitivity or None,
        "skipped": [{"name": n, "why": w} for n, w in run.skipped],
        "candidates": [dict(c.as_dict(), path=None) for c in run.measured],
        "figures": figures, "timings": timings,
    }
    if not met:
        report["warning"] = _warning(run, chosen, figures)
    return report


def _warning(run: _Run, chosen, figures: dict) -> str:
    """What a file that misses the target is, plainly: its agreement and bound, how firmly the fp
    model decided the queries it answers otherwise, and what to ask for instead."""
    within = (f" within the size budget ({run.max_size:.2f}x the plain q4_k_m file, "
              f"{fidelity.size_text(run.budget)})" if run.budget else "")
    margins = figures.get("disagreement_margins") or []
    lines = [f"WARNING: no candidate{within} shows the {fidelity._pct(run.min_agreement)} "
             f"label-agreement target by its {fidelity.CONFIDENCE:.0%} lower bound. Wrote the most "
             f"faithful one, {chosen.name} ({fidelity.size_text(chosen.size_bytes)}): "
             f"{fidelity.describe_agreement(chosen.agreement, chosen.n)}, "
             f"{fidelity.misses(chosen)} of {chosen.n} calibration queries answered otherwise."]
    if margins:
        lines.append("  The fp model decides those queries by margins of "
                     + fidelity.margins_list(margins)
                     + " nats (log p1/p2; under 0.1 is a coin flip any rounding may turn).")
    larger = [c for c in run.measured if c.size_bytes > chosen.size_bytes and fidelity.meets(
        c, run.min_agreement)]
    if run.max_size is not None:
        seen = (f" (measured in this run: {larger[0].name}, "
                f"{fidelity.describe_agreement(larger[0].agreement, larger[0].n)})" if larger else "")
        lines.append("  For more fidelity in a larger file: --max-size none (fidelity first, up "
                     f"to q8_0){seen}, or --quant q8_0.")
    elif max(c.n or 0 for c in run.measured) < 400 or chosen.qtype == "q8_0":
        lines.append("  More or better calibration queries (--calib) can show more.")
    return "\n".join(lines)
