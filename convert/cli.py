"""`qwen-local convert`: PEFT LoRA adapter (+ Qwen2 base) -> merged, verified, quantized GGUF."""
from __future__ import annotations

import argparse
import sys

from qwen_local.runtime.options import Parser, add_output_flags, add_threads, float_in, parse_quietly

from qwen_local.convert.quantize import QTYPES


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="qwen-local convert",
        description="Merge a PEFT LoRA adapter into its Qwen2 base (streaming, float32), write a GGUF, "
                    "quantize it with llama.cpp and check the result against peft: logit parity and "
                    "task fidelity (intent-label agreement) on calibration queries.")
    p.add_argument("--adapter", required=True, metavar="DIR|HUB_ID",
                   help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or hub id")
    p.add_argument("--base", metavar="DIR|HUB_ID",
                   help="base model folder or hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--quant", default=None, metavar="TYPE",
                   help="default auto: within --max-size, the smallest file whose label agreement "
                        "with the fine-tune meets --min-agreement by its 95%% lower bound, else the "
                        "most faithful one, with a warning. Candidates: iq4_xs, q4_k_m, the q4_k_m "
                        "base with the LoRA kept apart in its own file (applied at run time), "
                        "q5_k_m, a measured mix, q6_k (each with the imatrix) and q8_0. Or one "
                        f"type, written as asked: {', '.join(QTYPES)} (with --no-verify the "
                        "default is q4_k_m)")
    p.add_argument("--max-size", default="1.10", metavar="X|none",
                   help="with auto: the size budget, a multiple of the plain q4_k_m file (default "
                        "1.10: the 4-bit class); none: fidelity first, up to q8_0")
    p.add_argument("--out", metavar="PATH", help="output .gguf (default models/<adapter>-<quant>.gguf)")
    p.add_argument("--calib", metavar="FILE.jsonl",
                   help='calibration queries, one {"query": ..., "label": ...} per line (label optional); '
                        "first 400 used (default: the packaged Vietnamese set's calibration split, its "
                        "first 400 lines; the rest stay held-out for eval --split heldout)")
    p.add_argument("--min-agreement", type=float_in(0, 1, lo_open=True), default=0.99, metavar="X",
                   help="label-agreement target with the fp reference (default 0.99): auto picks the "
                        "smallest candidate meeting it; an explicit type that misses it gets a warning")
    p.add_argument("--keep", metavar="SPEC",
                   help="mixed precision: keep tensors above the base type, e.g. "
                        "'attn_v=q6_k,ffn_down=q6_k,first=q8_0,output=q8_0' (groups: output, embd, attn_q, "
                        "attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down, first, last, blk<N>, "
                        "re:<regex>); with auto it replaces the automatic mix")
    p.add_argument("--prompts", metavar="FILE|NAME", default=None,
                   help="prompt profile the adapter was trained with: a JSON file, or a built-in name "
                        "(seed, catalog); used by every calibration and verification pass and stored in "
                        "the GGUF, where serve finds it (default: seed, the shop's integration-guide "
                        "prompts)")
    p.add_argument("--frontier", action="store_true",
                   help="with auto: measure every candidate on every calibration query and print the "
                        "size/agreement table (slower; the smallest meeting the target is still chosen)")
    p.add_argument("--no-imatrix", action="store_true",
                   help="do not use the importance matrix from the calibration queries for k-quants")
    p.add_argument("--no-verify", action="store_true",
                   help="skip the checks against peft (fast: no reference, so no imatrix and no auto)")
    add_threads(p)
    add_output_flags(p)
    return p


def main(argv: list[str]) -> int:
    args, progress = parse_quietly(build_parser(), argv)
    from qwen_local.convert.pipeline import final_line, run, warning_line

    quant = args.quant or ("q4_k_m" if args.no_verify else "auto")
    report = run(args.adapter, base=args.base, quant=quant, out=args.out, verify=not args.no_verify,
                 threads=args.threads, progress=progress, calib=args.calib,
                 min_agreement=args.min_agreement, keep=args.keep, imatrix=not args.no_imatrix,
                 prompts=args.prompts, frontier=args.frontier, max_size=args.max_size)
    print(final_line(report), flush=True)
    warning = warning_line(report)
    if warning:
        print(f"qwen-local convert: {warning}", file=sys.stderr, flush=True)
    return 0
