"""`qwen-local bench` (serving): parse the flags, check the inputs, measure, print the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_local.runtime.bench.measure import run
from qwen_local.runtime.bench.report import render
from qwen_local.runtime.errors import UserError
from qwen_local.runtime.serve.settings import ServeSettings


def main_serve(argv: list[str]) -> int:
    from qwen_local.runtime.options import (Parser, add_output_flags, add_threads, float_in, int_in,
                                            quiet)

    ap = Parser(
        prog="qwen-local bench",
        description="Speed and memory of qwen-local serving a GGUF, against raw llama.cpp on the same "
                    "weights and (optionally) the seed's transformers + PEFT path. Other subcommands: "
                    "'qwen-local bench make-model' and 'qwen-local bench convert'.")
    ap.add_argument("--model", required=True, help="GGUF to serve")
    ap.add_argument("--model2", action="append", default=[], help="another GGUF, measured interleaved")
    ap.add_argument("--baseline-base", help="base model folder for the seed path (transformers fp32)")
    ap.add_argument("--baseline-adapter", help="PEFT adapter folder for the seed path (unmerged)")
    ap.add_argument("--reps", type=int_in(1, 1000), default=5, help="rounds over all prompts")
    ap.add_argument("--baseline-reps", type=int_in(1, 1000), default=1,
                    help="times each intent prompt goes through the seed path; also its number of "
                         "replies (default 1: the seed path takes ~10 s per intent at 3B)")
    add_threads(ap)
    ap.add_argument("--ctx", type=int_in(512, 1 << 20), default=8192,
                    help="engine context (KV cache) in tokens, as qwen-local serve --ctx")
    ap.add_argument("--slots", type=int_in(1, 256), default=4,
                    help="engine sequences decoded together, as qwen-local serve --slots")
    served = ServeSettings.model_fields["flash_attn"].default
    ap.add_argument("--flash-attn", choices=("on", "off", "both"), default=served,
                    help="llama.cpp's flash attention, as qwen-local serve --flash-attn; both: every "
                         f"model is measured with it on and off, interleaved (default: {served}, "
                         "as serve)")
    ap.add_argument("--temperature", type=float_in(0, 2), default=0.7,
                    help="reply sampling temperature, as the server's default; raw llama.cpp is greedy")
    ap.add_argument("--json", help="write the full results here")
    add_output_flags(ap, progress=False)
    a = ap.parse_args(argv)
    quiet(a.verbose)
    models = [a.model, *a.model2]
    from qwen_local.runtime.gguf_file import gguf_problem
    for m in models:
        if not Path(m).is_file():
            raise UserError(f"no such GGUF: {m}")
        problem = gguf_problem(m)  # caught here: a worker's failure would come with a log tail
        if problem:
            raise UserError(f"cannot load {m}: {problem}")
    if bool(a.baseline_base) != bool(a.baseline_adapter):
        raise UserError("--baseline-base and --baseline-adapter go together")
    baseline = None
    if a.baseline_base:
        for d, what in ((a.baseline_base, "base"), (a.baseline_adapter, "adapter")):
            if not Path(d).is_dir():
                raise UserError(f"no such {what} folder: {d}")
        if not (Path(a.baseline_adapter) / "adapter_config.json").is_file():
            raise UserError(f"{a.baseline_adapter} has no adapter_config.json")
        baseline = (a.baseline_base, a.baseline_adapter)
    from qwen_local.runtime.llama import threads_or_default

    result = run(models, baseline, a.reps, a.baseline_reps, threads_or_default(a.threads),
                 n_ctx=a.ctx, slots=a.slots,
                 temperature=a.temperature,
                 flash_attn={"on": (True,), "off": (False,), "both": (True, False)}[a.flash_attn],
                 log=lambda m: print(m, file=sys.stderr, flush=True))
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2, ensure_ascii=False))
        print(f"\nJSON: {a.json}")
    return 0
