"""The float files a conversion writes, and the disk they need: the merged model (the output itself
when it is f32/f16/bf16, else the intermediate it is quantized from) and, for the LoRA kept apart,
the base file in f16 beside the LoRA file (convert.lora_file)."""
from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

from qwen_local.convert.staging import os_error
from qwen_local.runtime.fidelity import size_text
from qwen_local.runtime.options import progress_bar

# bytes per parameter of 2-D tensors, roughly, per output type (for the free-space check)
BYTES_PER_PARAM = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 1.07, "q6_k": 0.83, "q5_k_m": 0.72,
                   "q4_k_m": 0.62, "iq4_nl": 0.59, "iq4_xs": 0.56}


def needed_bytes(plan, *types: str) -> int:
    """Disk for files of these types at once (1-D tensors stay f32), with some slack."""
    p2 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) >= 2)
    p1 = sum(math.prod(t.shape) for t in plan.tensors.values() if len(t.shape) < 2)
    return int(sum(p2 * BYTES_PER_PARAM[t] + p1 * 4 for t in types) * 1.05) + (32 << 20)


def short_of_disk(plan, folder: Path, *types: str) -> str | None:
    """'X free, about Y needed' when `folder`'s disk cannot take files of these types at once."""
    need, free = needed_bytes(plan, *types), shutil.disk_usage(folder).free
    return f"{size_text(free)} free, about {size_text(need)} needed" if free < need else None


def write_merged(plan, path: Path, out_type: str, meta_quant: str, profile, threads: int,
                 progress: bool, timings: dict, timing: str = "merge_export", log=None) -> dict:
    """The merge and the GGUF of a float type (timed into timings[timing]). meta_quant is the
    provenance the exporter writes; auto's choice is in qwen_local.fidelity."""
    import torch  # the merge's matmuls

    from qwen_local.convert.export import write_gguf

    torch.set_num_threads(threads)
    bar = progress_bar(progress, total=plan.n_params(), desc=f"merge + write {out_type}",
                       unit="param", unit_scale=True)
    t = time.perf_counter()
    try:
        written = write_gguf(plan, path, out_type, meta_quant,
                             progress=bar.update if bar else None, profile=profile)
    except OSError as e:
        raise os_error(e, f"writing {path.name}") from None
    finally:
        if bar:
            bar.close()
    timings[timing] = round(time.perf_counter() - t, 2)
    if written["f32_kept"] and log:
        log(f"kept in f32 (beyond f16 range): {', '.join(written['f32_kept'])}")
    return written


def write_lora_pair(plan, folder: Path, profile, threads: int, progress: bool, timings: dict,
                    base_type: str = "f16") -> tuple[Path, Path]:
    """(the base file in base_type, the LoRA file in f16) for the LoRA kept apart, in `folder`."""
    from qwen_local.convert import lora_file

    base_plan, deltas = lora_file.split(plan)
    base, lora = folder / f"base-{base_type}.gguf", folder / "base.lora.gguf"
    write_merged(base_plan, base, base_type, "auto", profile, threads, progress, timings,
                 timing="export_base")
    t = time.perf_counter()
    try:
        lora_file.write(plan, deltas, lora, "f16")
    except OSError as e:
        raise os_error(e, f"writing {lora.name}") from None
    timings["export_lora"] = round(time.perf_counter() - t, 2)
    return base, lora
