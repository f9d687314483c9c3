"""`qwen-local convert`: PEFT LoRA adapter (+ Qwen2 base) -> merged, verified, quantized GGUF."""
from __future__ import annotations

import argparse

from .quantize import QTYPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qwen-local convert",
        description="Merge a PEFT LoRA adapter into its Qwen2 base (streaming, float32), write a GGUF, "
                    "quantize it with llama.cpp and check the result against peft.")
    p.add_argument("--adapter", required=True, metavar="DIR|HUB_ID",
                   help="PEFT adapter folder (adapter_config.json + adapter_model.safetensors) or hub id")
    p.add_argument("--base", metavar="DIR|HUB_ID",
                   help="base model folder or hub id (default: the adapter's base_model_name_or_path)")
    p.add_argument("--quant", default="q4_k_m", metavar="TYPE",
                   help=f"output type: {', '.join(QTYPES)} (default q4_k_m)")
    p.add_argument("--out", metavar="PATH", help="output .gguf (default models/<adapter>-<quant>.gguf)")
    p.add_argument("--no-verify", action="store_true", help="skip the parity check against peft")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="threads (default: all cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    from .pipeline import final_line, run

    report = run(args.adapter, base=args.base, quant=args.quant, out=args.out, verify=not args.no_verify,
                 threads=args.threads, progress=not args.no_progress)
    print(final_line(report), flush=True)
    return 0
