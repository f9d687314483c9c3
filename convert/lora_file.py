"""The LoRA kept apart: a base file that llama.cpp quantizes, and the adapter as a small GGUF that
llama.cpp applies at run time (`llama_adapter_lora_init`), unrounded by the base's quantization.

Why: a fine-tune's delta is small next to the base weights. Merged before 4-bit rounding, much of it
drowns in the rounding of the weights it was added to; kept apart in f16, it survives whole. On the
shared real 0.5B intent adapter, a plain q4_k_m base with the LoRA applied at run time agreed with
fp32 peft on 98.8% of 240 held-out queries, the merged plain q4_k_m on 86.7% (docs/figures.md).

The split (`split`): the LoRA on the decoder blocks' seven linear projections goes into the LoRA
file; every other change (LoRA on the embedding or the output projection, modules_to_save, biases)
is merged into the base file, where llama.cpp needs no adapter for it. The base file is the merged
model but for those deltas, so untying and every other rule of the merge stay the same.

The LoRA file (`write`): general.type "adapter", adapter.type "lora", the base's architecture, and
per projection `<tensor>.lora_a` (numpy (r, in): GGUF ne [in, r]) and `<tensor>.lora_b` (out, r),
exactly as llama.cpp's loader checks them. Each module's own scaling (alpha / r, rsLoRA,
rank_pattern and alpha_pattern) is folded into lora_b, and no adapter.lora.alpha is written, so
llama.cpp applies scale 1.0: one file-wide alpha could not express per-module scalings.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from qwen_local.runtime.errors import UserError, __version__

from qwen_local.convert.adapter import LoraDelta, MergePlan
from qwen_local.convert.export import gguf_name
from qwen_local.runtime.lora import sha256

LORA_TYPES = ("f16", "f32")
_BLOCK_LINEAR = re.compile(r"model\.layers\.\d+\.(self_attn|mlp)\.[a-z_]+_proj")


def carried(delta: LoraDelta) -> bool:
    """Whether a LoRA delta goes into the LoRA file (a block's linear projection) rather than into
    the base file."""
    return delta.kind == "linear" and not delta.fan_in_fan_out and bool(
        _BLOCK_LINEAR.fullmatch(delta.module))


def split(plan: MergePlan) -> tuple[MergePlan, list[tuple[str, LoraDelta]]]:
    """(the base file's plan, [(GGUF tensor name, delta)] for the LoRA file). The base plan is the
    merge plan without the carried deltas; an adapter with none to carry gives an empty list."""
    n_layers = plan.base_config["num_hidden_layers"]
    tensors, deltas = {}, []
    for name, src in plan.tensors.items():
        if src.lora is not None and carried(src.lora):
            deltas.append((gguf_name(name, n_layers), src.lora))
            src = dataclasses.replace(src, lora=None)
        tensors[name] = src
    return dataclasses.replace(plan, tensors=tensors), deltas


def write(plan: MergePlan, deltas: list[tuple[str, LoraDelta]], path: Path,
          out_type: str = "f16") -> dict:
    """Write the LoRA file; returns {'tensors', 'bytes', 'type'}. The factors are read from the
    adapter's safetensors one module at a time."""
    import gguf
    from safetensors import safe_open

    if out_type not in LORA_TYPES:
        raise UserError(f"LoRA file type must be one of {', '.join(LORA_TYPES)}, not {out_type!r}")
    dtype = np.float16 if out_type == "f16" else np.float32
    w = gguf.GGUFWriter(str(path), "qwen2")
    try:
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_name(f"{Path(plan.adapter_ref.rstrip('/')).name or 'adapter'} (LoRA for "
                   f"{plan.base_ref}, scaling folded into lora_b)")
        w.add_string("qwen_local.adapter", plan.adapter_ref)
        w.add_string("qwen_local.adapter_sha256", sha256(plan.adapter_file))
        w.add_string("qwen_local.version", __version__)
        with safe_open(str(plan.adapter_file), framework="pt") as f:
            for name, d in deltas:
                a = f.get_tensor(d.a_key).float().numpy()
                b = f.get_tensor(d.b_key).float().numpy() * np.float32(d.scaling)
                for suffix, arr in (("lora_a", a), ("lora_b", b)):
                    out = _encode(arr, dtype, f"{name}.{suffix}")
                    w.add_tensor(f"{name}.{suffix}", out)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    return {"tensors": len(deltas), "bytes": path.stat().st_size, "type": out_type}


def _encode(arr: np.ndarray, dtype, name: str) -> np.ndarray:
    if not np.isfinite(arr).all():
        raise UserError(f"LoRA factor {name} has NaN/inf values (broken adapter?)")
    with np.errstate(over="ignore"):
        out = np.ascontiguousarray(arr.astype(dtype))
    if not np.isfinite(out).all():  # beyond f16's range after folding the scaling in
        raise UserError(f"LoRA factor {name} exceeds the f16 range; write the LoRA file in f32")
    return out


def companion_meta(path: Path, name: str | None = None) -> str:
    """The base file's LORA_KEY value naming its LoRA file `path`, kept next to it as `name`
    (default: its own name)."""
    return json.dumps({"file": name or path.name, "bytes": path.stat().st_size,
                       "sha256": sha256(path)}, sort_keys=True)
