"""Mixed precision: keep chosen tensors at a higher type than the file's base quant.

Expressed as llama.cpp tensor type overrides ({regex on GGUF tensor name: ggml type name}), the
`tensor_types=` argument of convert.quantize.quantize (params.tt_overrides; the first matching
pattern wins; patterns are searched, not fully matched). Overrides apply to output.weight and
token_embd.weight too, so no separate output/embedding parameters are needed.

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
    """The `--quant auto` mixed-precision candidate on top of q4_k_m: the tensors whose error
    hurts a fine-tuned classifier most kept at q6_k (first and last blocks whole, every attn_v and
    ffn_down) and the output/embedding at q8_0 (the label decision is read off the output)."""
    mix = {block_pattern(0): "q6_k", block_pattern(n_layers - 1): "q6_k",
           GROUPS["attn_v"]: "q6_k", GROUPS["ffn_down"]: "q6_k",
           GROUPS["output"]: "q8_0", GROUPS["embd"]: "q8_0"}
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
        parts.append(f"{names.get(pattern, f'blk{m.group(1)}' if m else pattern)}={qtype}")
    return ",".join(parts)
