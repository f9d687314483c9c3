"""Mixed precision: keep chosen tensors at a higher type than the file's base quant.

Expressed as llama.cpp tensor type overrides ({regex on GGUF tensor name: ggml type name}), the
`tensor_types=` argument of convert.quantize.quantize (params.tt_overrides; the first matching
pattern wins; patterns are searched, not fully matched). Overrides apply to output.weight and
token_embd.weight too, so no separate output/embedding parameters are needed.

`--quant auto`'s mixed candidate is sensitivity-guided (`sensitive_mix`): after the base 4-bit file
is written, every tensor's quantization error is weighed by the importance matrix (the squared
activations its input columns see on the calibration prompts), relative to the same weighting of
the weights themselves: the share of the layer's output signal the quantization destroys. The
tensors that lose most per byte it would cost to raise them are raised first (q6_k, or q8_0 where
a width does not fit 256-wide K blocks), under a size budget (25% of the base file by default).

Spec syntax for users (e.g. `--keep-precision attn_v=q6_k,ffn_down=q6_k,first=q8_0`):
  output, embd, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down,
  first (every tensor of block 0), last (every tensor of the last block), blk<N> (block N),
  or re:<regex> for anything else; the type is a ggml type name (q4_k, q5_k, q6_k, q8_0, f16).
"""
from __future__ import annotations

import re

GROUPS = {
    "output": r"^output\.weight$",
    "embd": r"^token_embd\.weight$",
    "attn_q": r"\.attn_q\.weight$",
    "attn_k": r"\.attn_k\.weight$",
    "attn_v": r"\.attn_v\.weight$",
    "attn_output": r"\.attn_output\.weight$",
    "ffn_gate": r"\.ffn_gate\.weight$",
    "ffn_up": r"\.ffn_up\.weight$",
    "ffn_down": r"\.ffn_down\.weight$",
}
TYPES = ("q4_k", "q5_k", "q6_k", "q8_0", "f16", "bf16", "f32", "q4_0", "q5_0", "q5_1")


def block_pattern(i: int) -> str:
    return rf"^blk\.{int(i)}\."


def auto_mix(n_layers: int) -> dict[str, str]:
    """The `--quant auto` mixed candidate without an imatrix, on its 4-bit base: the tensors
    whose error hurts a fine-tuned classifier most kept at q6_k (first and last blocks whole, every attn_v and
    ffn_down) and the output/embedding at q8_0 (the label decision is read off the output)."""
    mix = {block_pattern(0): "q6_k", block_pattern(n_layers - 1): "q6_k",
           GROUPS["attn_v"]: "q6_k", GROUPS["ffn_down"]: "q6_k",
           GROUPS["output"]: "q8_0", GROUPS["embd"]: "q8_0"}
    return mix


def tensor_errors(f16_path, quant_path, imatrix: dict) -> list[dict]:
    """For each quantized 2-D tensor with an imatrix entry: its name, type, width, bytes and the
    imatrix-weighted relative error sum_c a_c * sum_r (W - Wq)^2 / sum_c a_c * sum_r W^2
    (one tensor in memory at a time)."""
    import gguf
    import numpy as np

    from runtime.gguf_file import read_header, tensor_bytes

    ref_h, q_h = read_header(f16_path), read_header(quant_path)
    ref_types = {n: t for n, _, t, _ in ref_h.tensors}
    out = []
    for name, dims, qtype, _ in q_h.tensors:
        a = imatrix.get(name)
        if a is None or len(dims) != 2 or ref_types.get(name, qtype) == qtype:
            continue
        width = int(dims[0])  # ne[0]: the input columns, which the imatrix weighs
        rtype, raw = tensor_bytes(f16_path, name, ref_h)
        w_all = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8),
                                       gguf.GGMLQuantizationType(rtype)).reshape(-1, width)
        _, raw = tensor_bytes(quant_path, name, q_h)
        q_all = gguf.quants.dequantize(np.frombuffer(raw, dtype=np.uint8),
                                       gguf.GGMLQuantizationType(qtype)).reshape(-1, width)
        n_bytes = len(raw)
        a = np.asarray(a, dtype=np.float64)
        err = sig = 0.0
        for start in range(0, w_all.shape[0], 4096):  # rows in chunks: the embedding is large
            w = w_all[start:start + 4096].astype(np.float64)
            d = w - q_all[start:start + 4096]
            err += float((d * d).sum(axis=0) @ a)
            sig += float((w * w).sum(axis=0) @ a)
        out.append({"name": name, "type": gguf.GGMLQuantizationType(qtype).name.lower(),
                    "width": width, "params": int(w_all.size), "bytes": n_bytes,
                    "rel_error": err / sig if sig > 0 else 0.0})
    return out


def raise_cost(tensor: dict) -> tuple[str, int]:
    """(type, extra bytes) for raising one tensor: q6_k, or q8_0 where the width does not fit
    K-quant blocks (llama.cpp would fall back there anyway)."""
    import gguf

    qtype = "q6_k" if tensor["width"] % 256 == 0 else "q8_0"
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    return qtype, max(0, tensor["params"] // block * size - tensor["bytes"])


def raisable(tensor: dict) -> bool:
    qtype, cost = raise_cost(tensor)
    return cost > 0 and tensor["type"] not in (qtype, "q8_0", "f16", "f32")


def sensitive_mix(errors: list[dict], budget_bytes: int) -> dict[str, str]:
    """Overrides raising the tensors with the most relative error per extra byte, within budget
    (greedy: one that does not fit is passed over for cheaper ones)."""
    ranked = sorted(filter(raisable, errors), key=lambda e: e["rel_error"] / raise_cost(e)[1],
                    reverse=True)
    mix, spent = {}, 0
    for e in ranked:
        qtype, cost = raise_cost(e)
        if spent + cost <= budget_bytes:
            mix["^" + re.escape(e["name"]) + "$"] = qtype
            spent += cost
    return mix


def parse_spec(spec: str, n_layers: int) -> dict[str, str]:
    """'attn_v=q6_k,first=q8_0,re:ffn_.*=q5_k' -> {regex: type}. Raises ValueError on bad input."""
    out: dict[str, str] = {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if "=" not in item:
            raise ValueError(f"keep-precision item {item!r} is not NAME=TYPE")
        name, qtype = (x.strip() for x in item.rsplit("=", 1))
        qtype = qtype.lower()
        if qtype not in TYPES:
            raise ValueError(f"unknown tensor type {qtype!r} (choose from {', '.join(TYPES)})")
        if name.startswith("re:"):
            pattern = name[3:]
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"bad regex {pattern!r}: {e}") from None
        elif name == "first":
            pattern = block_pattern(0)
        elif name == "last":
            pattern = block_pattern(n_layers - 1)
        elif re.fullmatch(r"blk\d+", name):
            i = int(name[3:])
            if not 0 <= i < n_layers:
                raise ValueError(f"{name}: the model has blocks 0..{n_layers - 1}")
            pattern = block_pattern(i)
        elif name in GROUPS:
            pattern = GROUPS[name]
        else:
            raise ValueError(f"unknown tensor group {name!r} (choose from "
                             f"{', '.join([*GROUPS, 'first', 'last', 'blk<N>', 're:<regex>'])})")
        out[pattern] = qtype
    return out


def describe(mix: dict[str, str]) -> str:
    names = {v: k for k, v in GROUPS.items()}
    parts = []
    for pattern, qtype in mix.items():
        m = re.fullmatch(r"\^blk\\\.(\d+)\\\.", pattern)
        one = re.fullmatch(r"\^((?:[\w]|\\\.)+)\$", pattern)  # one tensor, from sensitive_mix
        name = (names.get(pattern) or (f"blk{m.group(1)}" if m else None)
                or (one.group(1).replace("\\.", ".") if one else pattern))
        parts.append(f"{name}={qtype}")
    return ",".join(parts)
