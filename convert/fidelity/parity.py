"""Parity check: the same token ids through the fp reference (peft in torch) and the GGUF (llama.cpp).

llama.cpp runs with an f32 KV cache and flash attention off here: the check is about the file (merge,
export, quantization), and llama.cpp's default f16 KV cache is a runtime setting that adds its own
error (~3e-4 relative on the tiny test models, which flips argmax at near-ties of random weights).
So set, an f32 GGUF matches peft to ~1e-6.

Figures (all distinct positions of the fixed prompts):
- rel_err at one position = max_v |gguf_v - ref_v| / max_v |ref_v| (worst logit error relative to the
  largest reference logit); `max_rel_err` is its maximum over positions, `mean_rel_err` its mean;
- `top1_agreement`: share of positions where both argmaxes agree;
- `intent_agreement`: on the profile's intent prompts (runtime.profile), share where both pick the same
  label, by the runtime's one-pass rule (runtime.labels: softmax mass of each label's prefix tokens);
- `tokenizer_agreement`: share of Vietnamese/mixed strings (NFC) that HF and llama.cpp tokenize alike.

The reference is the conversion's one convert.fidelity.peft_model.Reference (`PeftModel` on the base, unmerged
LoRA, so it shares no code with the merge), loaded once and shared with the task-fidelity check and the
importance matrix; `reference_side` computes everything this check needs from it, so the torch model
can be freed before llama.cpp loads the GGUF (`check_gguf`). It runs in float32 when that fits comfortably in RAM, else in bfloat16 (a 3B model then needs ~7 GB instead of
~13 GB); with a bf16 reference the float bounds are loosened, since the reference itself is off by ~1e-2.
Bounds (float32 reference): f32 max_rel_err <= 1e-4 and top1 >= 99.5%; f16 <= 1e-2 and >= 98%;
bf16 <= 3e-2 and >= 95%. Quantized outputs are measured and reported, never failed. llama.cpp runs
with flash attention off (runtime.llama.context_params): with it on, an f32 file was off by up to
4.2e-3 for reasons of the context, not the file.
"""
from __future__ import annotations

from dataclasses import dataclass
import unicodedata
from pathlib import Path
from typing import Callable

import numpy as np

from qwen_local.runtime.errors import UserError
from qwen_local.runtime.scoring import Scorer

INTENT_QUERIES = (
    "Shop ơi, áo sơ mi trắng size M còn hàng không ạ?",
    "Hôm nay trời đẹp quá, bạn có khỏe không?",
)
TEXT_PROMPTS = (
    "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\nGợi ý cho mình một bộ trang phục đi dự tiệc cưới mùa hè nhé.<|im_end|>\n"
    "<|im_start|>assistant\nDạ, với tiệc cưới mùa hè, bạn có thể chọn váy lụa màu pastel",
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b  # 12345 ≈ 3.14",
)
TOKENIZER_TEXTS = (
    "Xin chào! Mình muốn đổi size áo khoác, đơn hàng #A1023 giao hôm thứ Hai.",
    "Người Việt Nam thường ăn phở vào buổi sáng; giá khoảng 45.000đ - 60.000đ.",
    "Thuế VAT 10%, tổng cộng: 1.250.000 VNĐ (đã bao gồm phí ship).",
    "  Nhiều   khoảng trắng\tvà\nxuống dòng\r\nở đây  ",
    "Emoji 😀👗 và chữ có dấu: ắ ằ ẳ ẵ ặ ế ề ể ễ ệ ố ồ ổ ỗ ộ ứ ừ ử ữ ự",
    "I'm sure they'll say it's fine; we've done it 1000 times. 中文也可以。",
)
# (max_rel_err, min top1) per output type, with a float32 reference. Measured on the six tiny test
# models (tests/test_verify.py PARITY_CASES and the tiny adapter; random weights, so near-ties
# abound): f32 at most 1.3e-6, top-1 100%; f16 5.9e-4 to 1.4e-3, top-1 >= 99.6%; bf16 5.2e-3 to
# 1.4e-2, top-1 >= 97.4%. A real model's rounding is its own, so f16 and bf16 keep room to spare;
# f32 has nothing to round and is held to what f32 arithmetic can show.
BOUNDS = {"f32": (1e-4, 0.995), "f16": (1e-2, 0.98), "bf16": (3e-2, 0.95)}
BOUNDS_BF16_REF = {"f32": (5e-2, 0.90), "f16": (5e-2, 0.90), "bf16": (6e-2, 0.90)}


def prompts(cfg) -> list[tuple[str, str]]:
    """(name, text): the profile's rendered intent prompts, then free text."""
    intents = ["".join(text for text, _ in cfg.intent_prompt(q)) for q in INTENT_QUERIES]
    return [(f"intent{i}", t) for i, t in enumerate(intents)] + [(f"text{i}", t) for i, t in enumerate(TEXT_PROMPTS)]


def choose_reference_dtype(n_params: int) -> str:
    """float32 if the fp32 model (+ peft, activations) fits in ~60% of available RAM, else bfloat16."""
    try:
        import psutil
        avail = psutil.virtual_memory().available
    except Exception:  # pragma: no cover
        return "float32"
    return "float32" if n_params * 4 * 1.3 <= 0.6 * avail else "bfloat16"


@dataclass
class ParityReference:
    """The reference side of the parity check, computed once while the torch model is loaded."""
    names: list[str]
    ids: list[list[int]]
    logits: list[np.ndarray]
    ref_labels: dict[str, str]              # intent prompt name -> reference label
    tokenizer_ids: list[list[int]]          # HF ids of TOKENIZER_TEXTS (NFC)
    groups: dict
    dtype: str


def reference_side(reference, log: Callable[[str], None] = print) -> ParityReference:
    """Token ids and logits of the fixed prompts through the shared convert.fidelity.peft_model.Reference
    (peft in torch, unmerged in the convert pipeline), plus HF's ids of the tokenizer texts."""
    from qwen_local.runtime.labels import decide, label_probs

    tok = reference.tokenizer
    named = prompts(reference.cfg)
    ids = [tok.encode(unicodedata.normalize("NFC", p), add_special_tokens=False) for _, p in named]
    if reference.dtype != "float32":
        log(f"verify: reference in {reference.dtype} (float32 would not fit comfortably in RAM); "
            "bounds loosened")
    log(f"verify: reference logits (peft, {reference.dtype}) on {len(named)} prompts, "
        f"{sum(map(len, ids))} positions")
    logits = reference.all_logits_many(ids)
    ref_labels = {name: decide(label_probs(r[-1], reference.groups))
                  for (name, _), r in zip(named, logits) if name.startswith("intent")}
    texts = [unicodedata.normalize("NFC", t) for t in TOKENIZER_TEXTS]
    return ParityReference(names=[n for n, _ in named], ids=ids, logits=logits, ref_labels=ref_labels,
                           tokenizer_ids=[tok.encode(t, add_special_tokens=False) for t in texts],
                           groups=reference.groups, dtype=reference.dtype)


class GGUFRunner(Scorer):
    """runtime.scoring.Scorer (llama.cpp logits at every position, and tokenization; lean: the
    convert pipeline's low-memory load) with a loading failure reported as a UserError."""

    def __init__(self, path: Path, n_ctx: int, threads: int, kv_f32: bool = False, lean: bool = False,
                 lora: Path | None = None):
        try:
            super().__init__(path, n_ctx, threads, kv_f32=kv_f32, lean=lean, lora=lora)
        except (ValueError, RuntimeError) as e:
            raise UserError(f"llama.cpp cannot load {Path(path).name}: {e}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare(ref: list[np.ndarray], got, ids: list[list[int]] | None = None) -> dict:
    """Figures over distinct positions: a prefix shared with an earlier prompt (the intent prompts'
    system turn) is counted once, since it is the very same computation."""
    rel, top1 = [], []
    for k, (r, g) in enumerate(zip(ref, got)):
        if r.shape != g.shape:
            raise UserError(f"logit shapes differ: reference {r.shape}, GGUF {g.shape}")
        start = max((_common_prefix(ids[k], ids[j]) for j in range(k)), default=0) if ids else 0
        for a in range(start, len(r), 32):  # row blocks: the temporaries stay small
            rb, gb = r[a:a + 32], g[a:a + 32]
            rel.append(np.abs(gb - rb).max(axis=1) / np.maximum(np.abs(rb).max(axis=1), 1e-30))
            top1.append(rb.argmax(axis=1) == gb.argmax(axis=1))
    rel_all, top1_all = np.concatenate(rel), np.concatenate(top1)
    return {"positions": int(rel_all.size), "max_rel_err": float(rel_all.max()),
            "mean_rel_err": float(rel_all.mean()), "top1_agreement": float(top1_all.mean())}


def check_gguf(pref: ParityReference, gguf_path: Path, quant: str, threads: int,
               log: Callable[[str], None] = print, lora: Path | None = None) -> dict:
    """Compare a GGUF with the precomputed reference side; returns the figures plus 'passed' and
    'failures' (list of reasons)."""
    from qwen_local.runtime.labels import decide, label_probs

    log(f"verify: llama.cpp logits on {Path(gguf_path).name}")
    runner = GGUFRunner(gguf_path, max(map(len, pref.ids)) + 8, threads, kv_f32=True, lean=True,
                        lora=lora)
    last: list[np.ndarray] = []

    def scored():  # one prompt's logits at a time: at 3B every 100 positions are 61 MB
        for s in pref.ids:
            g = runner.logits(s)
            last.append(g[-1].copy())
            yield g

    try:
        figures = compare(pref.logits, scored(), pref.ids)
        texts = [unicodedata.normalize("NFC", t) for t in TOKENIZER_TEXTS]
        tok_same = [hf == runner.tokenize(t) for hf, t in zip(pref.tokenizer_ids, texts)]
    finally:
        runner.close()

    agree = [pref.ref_labels[name] == decide(label_probs(g, pref.groups))
             for name, g in zip(pref.names, last) if name in pref.ref_labels]
    figures["intent_agreement"] = float(np.mean(agree)) if agree else None
    figures["tokenizer_agreement"] = float(np.mean(tok_same))
    figures["reference"] = f"peft {pref.dtype}"
    figures["kv_cache"] = "f32"
    figures["quant"] = quant

    failures = []
    if not all(tok_same):
        failures.append(f"tokenizer mismatch on {tok_same.count(False)} of {len(tok_same)} Vietnamese texts")
    bounds = (BOUNDS if pref.dtype == "float32" else BOUNDS_BF16_REF).get(quant)
    if bounds:
        max_rel, min_top1 = bounds
        figures["bounds"] = {"max_rel_err": max_rel, "top1_agreement": min_top1}
        if figures["max_rel_err"] > max_rel:
            failures.append(f"max relative logit error {figures['max_rel_err']:.2e} > {max_rel:.0e}")
        if figures["top1_agreement"] < min_top1:
            failures.append(f"top-1 agreement {figures['top1_agreement']:.2%} < {min_top1:.1%}")
    figures["passed"] = not failures
    figures["failures"] = failures
    return figures


def verify(reference, gguf_path: Path, quant: str, threads: int,
           log: Callable[[str], None] = print) -> dict:
    """The whole parity check with an already loaded convert.fidelity.peft_model.Reference."""
    return check_gguf(reference_side(reference, log), gguf_path, quant, threads, log)
