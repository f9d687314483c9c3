"""`qwen-local eval`: intent accuracy and fidelity of one or more GGUFs on labelled queries.

    qwen-local eval --model a-q4_k_m.gguf [b-q8_0.gguf ...] [--data FILE.jsonl]
                    [--reference-base DIR --reference-adapter DIR] [--json OUT] [--threads N]

Each GGUF is one row: accuracy, macro F1, and with a reference (the fp PEFT model in torch,
convert/reference.py) label agreement, the mean KL of the label distributions, next-token top-1
agreement and KL over a few reply prompts. Per-label P/R/F1 and the confusion matrix follow the
table; `--json` writes everything. The GGUF side is runtime.measure.measure_gguf over
runtime.engine's one-pass intent path, i.e. exactly what `serve` answers. Default data: the
packaged Vietnamese set runtime/data/intent_vi.jsonl (runtime.dataset).

The command lives here, above runtime/, because its reference is the torch model.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qwen_local.runtime import fidelity
from qwen_local.runtime.dataset import CALIBRATION_QUERIES, SPLITS, Dataset, exclude, load_data, packaged
from qwen_local.runtime.errors import UserError
from qwen_local.runtime.llama import threads_or_default
from qwen_local.runtime.measure import measure_gguf
from qwen_local.runtime.profile import load_profile

from qwen_local.convert.fidelity.peft_model import reference_run


COLUMNS = [("name", "model", "str"), ("quant", "quant", "str"), ("bytes", "size", "size"),
           ("accuracy", "accuracy", "pct"), ("macro_f1", "macro F1", "float"),
           ("agreement", "agreement", "pct"), ("label_kl", "label KL", "float"),
           ("next_token_top1", "next-tok top1", "pct"), ("next_token_kl", "next-tok KL", "float"),
           ("seconds", "s", "str")]


def render(report: dict) -> str:
    rows = report["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    src = report["data"]["source"]
    out = [f"eval on {src}: {report['data']['n']} queries"
           + (f", reference {report['reference']}" if report.get("reference") else "")]
    if src.startswith("packaged") and "heldout split" not in src:
        out.append(f"(not held-out: lines 1-{CALIBRATION_QUERIES} of the packaged set calibrate convert "
                   "by default; --split heldout measures only queries no conversion has seen)")
    out += ["", fidelity.format_table(rows, cols)]
    for r in rows:
        if "per_label" in r:
            out += ["", f"{r['name']}: per label"]
            out.append(fidelity.format_table(
                [{"label": k, **v} for k, v in r["per_label"].items()],
                [("label", "label", "str"), ("precision", "precision", "pct"),
                 ("recall", "recall", "pct"), ("f1", "F1", "pct"), ("support", "n", "str")]))
            out.append(fidelity.format_confusion(r["confusion"], r["labels"]))
        warn = fidelity.explicit_warning(r["name"], r.get("agreement"),
                                         report.get("min_agreement", fidelity.DEFAULT_MIN_AGREEMENT),
                                         r.get("n"), convert=False) if r.get("name") != "reference" else None
        if warn:
            out.append(warn)
        where = fidelity.margins_text(r["name"], r)
        if where:
            out.append(where)
        if r.get("tokenizer_mismatches"):
            out.append(f"{r['name']}: WARNING tokenization differs from the reference on "
                       f"{r['tokenizer_mismatches']} queries")
    return "\n".join(out)


def evaluate(models: list[str | Path], data: Dataset, *, reference=None, cfg=None,
             threads: int | None = None, gen_prompts: int = 4, progress: bool = True,
             http: bool = False, flash_attn: bool | None = None) -> dict:
    # one profile for every model and the reference: the given one, else the reference's; with
    # neither, each model is measured with the profile stored in it
    cfg = cfg or (reference.cfg if reference is not None else None)
    ref_run = None
    ref_row = None
    if reference is not None:
        from qwen_local.runtime.options import progress_wrap

        ref_run = reference_run(reference, data, gen_prompts=gen_prompts,
                                progress=progress_wrap("reference (torch)", progress))
        ref_row = {"name": "reference", "quant": ref_run.describe}
        ref_row.update(fidelity.intent_figures(reference.cfg.labels, ref_run.probs,
                                               data.labels if data.labelled else None))
    rows = [measure_gguf(m, data, ref_run, cfg=cfg, threads=threads, progress=progress, http=http,
                         flash_attn=flash_attn) for m in models]
    for r in rows:
        r.pop("probs", None)
    return {"data": {"source": data.source, "n": len(data),
                     "labelled": sum(x is not None for x in data.labels)},
            "reference": ref_run.describe if ref_run else None,
            "rows": ([ref_row] if ref_row else []) + rows}


def build_parser() -> argparse.ArgumentParser:
    from qwen_local.runtime.options import Parser, add_output_flags, add_threads, float_in, int_in

    p = Parser(prog="qwen-local eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, metavar="X.gguf", help="one or more GGUF files")
    p.add_argument("--data", help="JSONL of {query, label, tags}; default: the packaged Vietnamese set")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="part of the packaged set: all, calibration (what convert calibrates with by "
                        "default) or heldout (never seen by a conversion); default all")
    p.add_argument("--reference-base", metavar="DIR", help="base model folder for the fp reference")
    p.add_argument("--reference-adapter", metavar="DIR", help="PEFT adapter folder for the fp reference")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--gen-prompts", type=int_in(0, 64), default=4,
                   help="reply prompts for the next-token check (0: skip)")
    p.add_argument("--prompts", metavar="FILE|NAME",
                   help="prompt profile for every model and the reference (default: the one stored in "
                        "the first model by convert, else the built-in seed profile)")
    p.add_argument("--min-agreement", type=float_in(0, 1, lo_open=True),
                   default=fidelity.DEFAULT_MIN_AGREEMENT,
                   help="warn for models agreeing with the reference less than this share")
    add_threads(p)
    p.add_argument("--limit", type=int_in(1), help="only the first N queries")
    p.add_argument("--exclude", metavar="FILE.jsonl",
                   help="leave out the queries of this file (e.g. the adapter's training set: "
                        "held-out figures)")
    p.add_argument("--http", action="store_true",
                   help="read every label over HTTP from a real server on 127.0.0.1, as clients do")
    p.add_argument("--flash-attn", choices=("on", "off"),
                   help="llama.cpp's flash attention, as qwen-local serve --flash-attn "
                        "(default: serve's default)")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON here")
    add_output_flags(p)
    return p


def main(argv: list[str]) -> int:
    from qwen_local.runtime.options import parse_quietly

    args, progress = parse_quietly(build_parser(), argv)
    _check_models(args.model)  # before a reference is loaded for nothing
    cfg = _profile(args.prompts, args.model[0])
    data = _data(args, cfg.labels)
    reference = None
    if args.reference_base or args.reference_adapter:
        from qwen_local.convert.fidelity.peft_model import Reference
        try:
            reference = Reference(args.reference_base, args.reference_adapter, cfg=cfg,
                                  dtype=args.reference_dtype, threads=threads_or_default(args.threads))
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the reference: {e}") from None
    elif not data.labelled:
        raise UserError("the data has no labels and no reference was given: nothing to measure")
    report = evaluate(args.model, data, reference=reference, cfg=cfg, threads=args.threads,
                      gen_prompts=args.gen_prompts, progress=progress, http=args.http,
                      flash_attn=None if args.flash_attn is None else args.flash_attn == "on")
    report["min_agreement"] = args.min_agreement
    print(render(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror or e}") from None
    return 0


def _check_models(models: list[str]) -> None:
    from qwen_local.runtime.gguf_file import gguf_problem

    for m in models:
        if not Path(m).is_file():
            raise UserError(f"model file {m} not found")
        problem = gguf_problem(m)
        if problem:
            raise UserError(f"cannot load {m}: {problem}")


def _profile(prompts: str | None, first_model: str):
    """--prompts, else the profile stored in the first model by convert, else the seed profile."""
    from qwen_local.runtime.llama import read_profile

    try:
        stored = None if prompts else read_profile(first_model)
    except RuntimeError as e:  # llama.cpp could not read the file's header
        raise UserError(str(e)) from None
    return stored or load_profile(prompts)


def _data(args, labels) -> Dataset:
    if args.data and args.split != "all":
        raise UserError("--split picks a part of the packaged set; it cannot go with --data")
    data = load_data(args.data, labels) if args.data else packaged(args.split, labels)
    if args.exclude:
        data = exclude(data, args.exclude)
    return data.head(args.limit)
