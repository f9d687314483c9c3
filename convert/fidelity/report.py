"""What a conversion reports about task fidelity: the candidates' table in the convert log, and the
compact figures stored in the GGUF header (the sidecar JSON keeps everything)."""
from __future__ import annotations

import json

from qwen_local.convert.quantize import split_lora
from qwen_local.runtime import fidelity

METADATA_KEY = fidelity.METADATA_KEY  # serve reads it back (runtime.fidelity.stored_figures)


def summary_table_one(report: dict) -> str:
    """The task-fidelity table of one explicitly chosen quant (for the convert log)."""
    fig = report["figures"]
    base, apart = split_lora(report["quant"])
    name = base + ("+imatrix" if report.get("imatrix") else "") + \
        ("+keep" if report.get("mixed") else "") + ("+lora" if apart else "")
    row = {"name": name, "size_bytes": fig.get("bytes"), "agreement": fig.get("agreement"),
           "label_kl": fig.get("label_kl"), "accuracy": fig.get("accuracy"),
           "top1_agreement": fig.get("next_token_top1"), "next_token_kl": fig.get("next_token_kl"),
           "complete": fig.get("complete", True), "n": fig.get("n"),
           "extra": {"bits_per_weight": fig.get("bits_per_weight")}}
    return table_head(report) + "\n" + summary_table(dict(report, candidates=[row]))


def table_head(report: dict) -> str:
    cal = report["calibration"]
    return (f"task fidelity vs {report['reference']} on {cal['n']} calibration queries "
            f"({cal['source']}, {cal['labelled']} labelled); target label agreement "
            f"{fidelity._pct(report['min_agreement'])}:")


def summary_table(report: dict) -> str:
    """The candidates as a text table (for the convert log); the fp reference's own accuracy first
    when the calibration data is labelled."""
    rows = [dict(c, bpw=c["extra"].get("bits_per_weight"),
                 bound=fidelity.bound(fidelity.Candidate(c["name"], "", agreement=c["agreement"],
                                                         n=c["n"], complete=c["complete"])))
            for c in report["candidates"]]
    if report.get("reference_accuracy") is not None:
        rows.insert(0, {"name": "fp reference", "accuracy": report["reference_accuracy"]})
    return fidelity.format_table(rows, [
        ("name", "candidate", "str"), ("size_bytes", "size", "size"), ("bpw", "bpw", "str"),
        ("agreement", "agreement", "pct"), ("bound", f"{fidelity.CONFIDENCE:.0%} low", "pct"),
        ("n", "n", "str"), ("label_kl", "label KL", "float"),
        ("accuracy", "accuracy", "pct"), ("top1_agreement", "next-tok top1", "pct"),
        ("next_token_kl", "next-tok KL", "float"), ("complete", "complete", "str")])


def metadata_value(report: dict) -> dict[str, str]:
    """The compact figures stored in the GGUF (the sidecar JSON has everything)."""
    keep = ("chosen", "quant", "met_target", "min_agreement", "reason", "reference", "calibration",
            "warning", "imatrix", "mixed", "max_size", "budget", "lora")
    fig = report.get("figures", {})
    compact = {k: report[k] for k in keep if k in report}
    compact.update({k: fig.get(k) for k in ("agreement", "label_kl", "accuracy", "macro_f1",
                                            "next_token_top1", "next_token_kl", "n",
                                            "complete")})
    return {METADATA_KEY: json.dumps(compact, ensure_ascii=False)}
