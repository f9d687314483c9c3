"""Quantize a GGUF with llama-cpp-python's `llama_model_quantize` (no compiled llama.cpp tools needed).

`quantize(src, dst, qtype, nthread, imatrix=None, tensor_types=None)` is the single entry point; the
optional arguments map onto llama_model_quantize_params:
- imatrix: {gguf tensor name: float32 array of per-column importances} -> params.imatrix
  (null-terminated array of llama_model_imatrix_data);
- tensor_types: {regex pattern on tensor names: type name like "q8_0" or ggml type id} -> params.tt_overrides
  (null-terminated array of llama_model_tensor_override; first match wins, as in llama-quantize --tensor-type).
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Mapping

from qwen_local.runtime.errors import UserError

# name -> llama_ftype (llama.h)
QTYPES = {
    "iq4_xs": 30,   # 4.25 bpw; 256-wide blocks (falls back to iq4_nl where a width is not a multiple)
    "iq4_nl": 25,   # 4.5 bpw; 32-wide blocks: no fallback on widths like 896
    "q4_k_m": 15,
    "q5_k_m": 17,
    "q6_k": 18,
    "q8_0": 7,
    "f16": 1,
    "bf16": 32,
    "f32": 0,
}
FLOAT_QTYPES = ("f32", "f16", "bf16")
# The float file a type is quantized from. q8_0's step is fine enough that the f16 rounding before
# it shows: on a real fine-tune, q8_0 from f16 moved 3 of 557 near-tie labels, q8_0 from f32 none.
# Coarser types keep the half-size f16, whose rounding is far below their own.
INTERMEDIATE = {"q8_0": "f32"}
MAX_BUF_SIZE = 256 << 20  # rows kept in memory at once by llama_model_quantize (default would be 8 GiB)


def check_qtype(qtype: str) -> str:
    q = str(qtype).strip().lower()
    if q not in QTYPES:
        raise UserError(f"unknown quant type {qtype!r} (choose from {', '.join(QTYPES)})")
    return q


# T+lora: the base quantized to T, the LoRA kept apart in its own file (convert.lora_file)
LORA_SUFFIX = "+lora"


def split_lora(quant: str) -> tuple[str, bool]:
    """("q4_k_m", True) for "q4_k_m+lora"; (quant, False) otherwise."""
    return (quant[:-len(LORA_SUFFIX)], True) if quant.endswith(LORA_SUFFIX) else (quant, False)


def intermediate(quant: str) -> str | None:
    """The float type a quantized output is made from (None: the output is the float file)."""
    quant = split_lora(quant)[0]
    return None if quant in FLOAT_QTYPES else INTERMEDIATE.get(quant, "f16")


def _ggml_type(value) -> int:
    import gguf
    if isinstance(value, int):
        return value
    try:
        return int(gguf.GGMLQuantizationType[str(value).upper()])
    except KeyError:
        raise UserError(f"unknown tensor type {value!r} in a tensor type override") from None


def quantize(src: str | Path, dst: str | Path, qtype: str, nthread: int,
             imatrix: Mapping[str, "object"] | None = None,
             tensor_types: Mapping[str, "str | int"] | None = None,
             max_buf_size: int = MAX_BUF_SIZE) -> None:
    """Write `dst` as `qtype` from the (f16/f32) GGUF `src`. Raises UserError on failure."""
    import numpy as np
    import llama_cpp
    from llama_cpp import _logger

    qtype = check_qtype(qtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = int(nthread)
    params.ftype = QTYPES[qtype]
    params.max_buf_size = int(max_buf_size)
    keep = []  # ctypes buffers must outlive the call

    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(arr)
            name_b = name.encode()
            keep.append(name_b)
            entries[i].name = name_b
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if tensor_types:
        import re
        for pattern in tensor_types:  # std::regex would abort the process on a bad pattern
            try:
                re.compile(pattern)
            except re.error as e:
                raise UserError(f"bad tensor type pattern {pattern!r}: {e}") from None
        overrides = (llama_cpp.llama_model_tensor_override * (len(tensor_types) + 1))()
        for i, (pattern, t) in enumerate(tensor_types.items()):
            pat_b = pattern.encode()
            keep.append(pat_b)
            overrides[i].pattern = pat_b
            overrides[i].type = _ggml_type(t)
        overrides[len(tensor_types)].pattern = None
        keep.append(overrides)
        params.tt_overrides = ctypes.cast(overrides, ctypes.POINTER(llama_cpp.llama_model_tensor_override))

    _logger.set_verbose(False)  # llama.cpp would print one line per tensor on stderr
    # tensor type overrides print one "applying manual override" line per tensor straight to fd 2
    from llama_cpp._utils import suppress_stdout_stderr
    with suppress_stdout_stderr(disable=not tensor_types):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    import shutil

    # llama.cpp says only "failed" on a full disk (or, if a write goes unchecked, returns 0 with a
    # cut-off file): name the cause when the disk is full, and never accept a cut-off file
    full = shutil.disk_usage(Path(dst).parent).free < (1 << 20)
    if rc != 0:
        raise UserError(f"disk full while quantizing {Path(src).name} into {qtype}; nothing was written"
                        if full else
                        f"llama_model_quantize failed (code {rc}) turning {Path(src).name} into {qtype}")
    from qwen_local.runtime.gguf_file import gguf_problem

    problem = gguf_problem(dst)
    if problem:
        raise UserError(f"{'disk full while quantizing' if full else 'llama_model_quantize wrote a broken file'}"
                        f" ({problem}); nothing was written")
