"""Mixed precision: tensor groups kept at, or lowered from, the file's base quant.

Expressed as llama.cpp tensor type overrides ({regex on GGUF tensor name: ggml type name}), the
`tensor_types=` argument of convert.quantize.quantize (params.tt_overrides; the first matching
pattern wins; patterns are searched, not fully matched). Overrides apply to output.weight and
token_embd.weight too, so no separate output/embedding parameters are needed.

`--quant auto`'s mixed candidate is measured, not guessed. It starts from q8_0, which answers like
the reference, and lowers whole tensor groups (GROUPS: the output, the embedding and each
projection type) one rung down their `ladder` at a time. What each rung costs the labels is measured
on the calibration queries (`screen`: one file per group and rung, that group alone
lowered, its label KL against the reference over the q8_0 file's own), and `allocate` then picks
the rungs with the least summed cost that bring the file under its size budget. On the real
0.5B fine-tune the cost is anything but proportional to quantization error: the input embedding,
which no importance matrix covers, moved the labels three times as much at 4 bits as the output
matrix of the same size (README, "The default search").

Spec syntax for users (e.g. `--keep attn_v=q6_k,ffn_down=q6_k,first=q8_0`):
  output, embd, attn_q, attn_k, attn_v, attn_output, ffn_gate, ffn_up, ffn_down,
  first (every tensor of block 0), last (every tensor of the last block), blk<N> (block N),
  or re:<regex> for anything else; the type is a ggml type name (q4_k, q5_k, q6_k, q8_0, f16).
"""
from __future__ import annotations

import itertools
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
TYPES = ("q4_k", "q5_k", "q6_k", "q8_0", "f16", "bf16", "f32", "q4_0", "q5_0", "q5_1", "iq4_nl",
         "iq4_xs")


def ladder(width: int) -> tuple[str, str, str]:
    """The rungs a group of this row width may take, from q8_0 down: ~6 bits, then 4. Widths that
    are not a multiple of 256 (896 in Qwen2.5-0.5B) fit no K-quant or IQ4_XS block, so nothing
    lies between q5_1 (6.0 bpw) and q8_0 (8.5 bpw) there."""
    return ("q8_0", "q6_k", "iq4_xs") if width % 256 == 0 else ("q8_0", "q5_1", "iq4_nl")


def type_bytes(qtype: str, n_params: int) -> int:
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype.upper()]]
    return n_params // block * size


def group_shapes(header) -> dict[str, tuple[int, int]]:
    """{group: (row width, parameters)} of the GROUPS present in a GGUF header (runtime.gguf_file);
    every tensor of a group has the same width in Qwen2 (and a group of mixed widths is skipped)."""
    out: dict[str, tuple[int, int]] = {}
    widths: dict[str, set] = {}
    for name, dims, _, _ in header.tensors:
        if len(dims) != 2:
            continue
        for g, pat in GROUPS.items():
            if re.search(pat, name):
                w, n = out.get(g, (int(dims[0]), 0))
                out[g] = (w, n + int(dims[0]) * int(dims[1]))
                widths.setdefault(g, set()).add(int(dims[0]))
    return {g: v for g, v in out.items() if len(widths[g]) == 1}


def block_pattern(i: int) -> str:
    return rf"^blk\.{int(i)}\."


def rung_overrides(group: str, width: int, rung: int) -> dict[str, str]:
    return {GROUPS[group]: ladder(width)[rung]} if rung else {}


def savings(shapes: dict[str, tuple[int, int]]) -> dict[str, list[int]]:
    """Bytes each rung saves against q8_0, per group."""
    return {g: [type_bytes("q8_0", n) - type_bytes(t, n) for t in ladder(w)]
            for g, (w, n) in shapes.items()}


def allocate(costs: dict[str, list[float]], saved: dict[str, list[int]], need: int) -> dict[str, int] | None:
    """The rung per group with the least summed cost whose savings reach `need` bytes (ties: the
    larger saving); None if even every group at its lowest rung saves too little. Exhaustive:
    3 rungs of 9 groups are 19,683 combinations."""
    groups = list(costs)
    best, best_key = None, None
    for rungs in itertools.product(*(range(len(costs[g])) for g in groups)):
        s = sum(saved[g][r] for g, r in zip(groups, rungs))
        if s < need:
            continue
        key = (sum(costs[g][r] for g, r in zip(groups, rungs)), -s)
        if best_key is None or key < best_key:
            best, best_key = dict(zip(groups, rungs)), key
    return best


def overrides(rungs: dict[str, int], shapes: dict[str, tuple[int, int]]) -> dict[str, str]:
    mix: dict[str, str] = {}
    for g, r in rungs.items():
        mix.update(rung_overrides(g, shapes[g][0], r))
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
        one = re.fullmatch(r"\^((?:[\w]|\\\.)+)\$", pattern)  # one tensor, a user's re:
        name = (names.get(pattern) or (f"blk{m.group(1)}" if m else None)
                or (one.group(1).replace("\\.", ".") if one else pattern))
        parts.append(f"{name}={qtype}")
    return ",".join(parts)


# queries each group's lowering is measured on (the screen measures up to 19 files). It keeps the
# 0.5B screen near 12 minutes but is noisy: the label KL of a group can rank differently on all 400
# queries, which is why the chosen mix is then measured like every other candidate
SCREEN_QUERIES = 128


def screen(prep, q8_src, f16_gguf, work, threads: int, limit: int, log) -> tuple[dict, dict]:
    """The mixed candidate's overrides, measured: q8_0, then every group alone one and two rungs
    down its ladder, each file's label KL on the first SCREEN_QUERIES calibration queries (prep: a
    convert.fidelity.calibration.Prepared); a rung's cost is its KL over q8_0's own. allocate()
    picks the cheapest rungs that bring the file to `limit` bytes. The screened files come from
    q8_src, the float file the mix itself is quantized from. Returns (overrides, the measured
    table for the report)."""
    import time

    from qwen_local.convert.quantize import quantize
    from qwen_local.runtime.gguf_file import read_header
    from qwen_local.runtime.measure import ReferenceRun, measure_gguf

    data = prep.data.head(SCREEN_QUERIES)
    n = len(data)
    ref = ReferenceRun(probs=prep.ref.probs[:n], describe=prep.ref.describe)  # labels only
    shapes = group_shapes(read_header(f16_gguf))
    path = work / "sensitivity.gguf"

    def size_and_kl(tensor_types: dict) -> tuple[int, float]:
        quantize(q8_src, path, "q8_0", threads, imatrix=prep.im_means, tensor_types=tensor_types)
        try:
            row = measure_gguf(path, data, ref, cfg=prep.cfg, threads=threads, **prep.measure)
            return path.stat().st_size, row["label_kl"]
        finally:
            path.unlink()

    t = time.perf_counter()
    q8_size, q8_kl = size_and_kl({})
    saved = savings(shapes)
    # a group whose lowest rung saves under 1% of the bytes to shed (attn_k/attn_v: ~1 MB of
    # 135 at 0.5B) cannot change the choice: it stays q8_0, unmeasured
    skipped = sorted(g for g in shapes if saved[g][-1] < (q8_size - limit) / 100)
    shapes = {g: v for g, v in shapes.items() if g not in skipped}
    costs = {g: [0.0] + [max(0.0, size_and_kl(rung_overrides(g, w, r))[1] - q8_kl)
                         for r in (1, 2)] for g, (w, _) in shapes.items()}
    rungs = allocate(costs, saved, q8_size - limit) or {g: 2 for g in shapes}
    groups = {g: {"types": list(ladder(w)), "label_kl_added": costs[g], "bytes_saved": saved[g],
                  "chosen": ladder(w)[rungs[g]]} for g, (w, _) in shapes.items()}
    record = dict(queries=n, q8_0_label_kl=q8_kl, limit_bytes=limit, groups=groups,
                  kept_q8_0=skipped, seconds=round(time.perf_counter() - t, 2))
    log(f"  sensitivity on {n} queries ({record['seconds']:.0f} s): label KL added by lowering one "
        "group from q8_0, and the rung chosen\n" + "\n".join(
            f"    {g:<12}" + "".join(f"  {q} {k:.4f}"
                                      for q, k in zip(v["types"][1:], v["label_kl_added"][1:]))
            + f"  -> {v['chosen']}" for g, v in groups.items())
        + (f"\n    {', '.join(skipped)}: too small to matter, kept q8_0" if skipped else ""))
    return overrides(rungs, shapes), record
