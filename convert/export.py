"""Write the merged model as a GGUF (architecture qwen2) with the `gguf` library, streaming.

GGUFWriter.add_tensor keeps every array until the end, so it is not used: all tensor infos are declared
first (add_tensor_info), header, key/values and tensor infos are written, then each tensor's data is
streamed block by block from the Merger. Anonymous memory stays at one block.

Key/values: hyperparameters from config.json, the tokenizer from the base's tokenizer.json (gpt2/BPE
tokens, token types, merges, pre-tokenizer "qwen2", eos <|im_end|> 151645, bos = pad <|endoftext|>
151643, add_bos false), the chat template, and provenance under `qwen_local.*`.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np

from qwen_local.runtime.errors import UserError, __version__
from qwen_local.runtime.lora import sha256

from qwen_local.convert.adapter import MergePlan
from qwen_local.convert.merge import Merger

F16_MAX = 65504.0
FLOAT_TYPES = ("f32", "f16", "bf16")


class _F16Overflow(Exception):
    def __init__(self, name: str):
        self.name = name


def gguf_name(hf_name: str, n_layers: int) -> str:
    import gguf

    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, n_layers)
    got = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
    if got is None:
        raise UserError(f"no GGUF name for tensor {hf_name!r} in a qwen2 model")
    return got[1]


def _natural_key(name: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def tensor_order(plan: MergePlan) -> list[tuple[str, str]]:
    """(gguf name, hf name): token_embd, blocks in numeric order, output_norm, output."""
    n = plan.base_config["num_hidden_layers"]
    pairs = [(gguf_name(hf, n), hf) for hf in plan.tensors]

    def rank(p):
        g = p[0]
        head = 0 if g.startswith("token_embd") else 2 if g.startswith("output") else 1
        return (head, _natural_key(g))
    return sorted(pairs, key=rank)


# ------------------------------------------------------------------------------------------- metadata

def _rope_theta(cfg: dict) -> float:
    rp = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or rp.get("rope_theta") or 10000.0)


def add_hparams(w, cfg: dict) -> None:
    import gguf

    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(int(cfg.get("max_position_embeddings", 32768)))
    w.add_embedding_length(hidden)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    w.add_rope_freq_base(_rope_theta(cfg))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    head_dim = cfg.get("head_dim")
    if head_dim and head_dim != hidden // heads:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    scaling = cfg.get("rope_scaling") or {}
    rp = cfg.get("rope_parameters") or {}
    rope_type = scaling.get("rope_type") or scaling.get("type") or rp.get("rope_type") or "default"
    src = scaling or rp
    if rope_type == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(src["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(src.get("original_max_position_embeddings", 32768)))
    elif rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(src["factor"]))
    elif rope_type != "default":
        raise UserError(f"rope scaling {rope_type!r} in the base config.json is not supported")


def add_tokenizer(w, base_dir: Path, n_vocab: int) -> dict:
    """Tokens, types, merges and special ids from tokenizer.json; returns a few facts for the report."""
    import gguf

    try:
        tj = json.loads((base_dir / "tokenizer.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read the base's tokenizer.json: {e}") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"base tokenizer is {model.get('type')!r}, expected byte-level BPE (Qwen2)")
    vocab: dict[str, int] = model["vocab"]
    added = {t["id"]: t for t in tj.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in vocab.items()}
    for i, t in added.items():
        by_id[i] = t["content"]
    if max(by_id) >= n_vocab:
        raise UserError(f"tokenizer has id {max(by_id)} but the model's vocabulary has only {n_vocab} rows")
    tokens, types = [], []
    for i in range(n_vocab):
        if i in added:
            tokens.append(added[i]["content"])
            types.append(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special(content: str) -> int:
        for i, t in added.items():
            if t["content"] == content:
                return i
        raise UserError(f"the base tokenizer lacks {content} (not a Qwen2.5 tokenizer?)")

    eos, bos = special("<|im_end|>"), special("<|endoftext|>")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_eos_token_id(eos)
    w.add_bos_token_id(bos)
    w.add_pad_token_id(bos)
    w.add_add_bos_token(False)
    template = chat_template(base_dir)
    if template:
        w.add_chat_template(template)
    return {"n_tokens": len(vocab) + len(added), "n_merges": len(merges), "eos": eos, "bos": bos,
            "chat_template": bool(template)}


def chat_template(base_dir: Path) -> str | None:
    p = base_dir / "chat_template.jinja"
    if p.is_file():
        return p.read_text(encoding="utf-8")
    tc = base_dir / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text(encoding="utf-8")).get("chat_template")
        except json.JSONDecodeError:
            return None
        if isinstance(t, list):  # named templates
            t = next((x.get("template") for x in t if x.get("name") == "default"), None)
        return t
    return None


def add_provenance(w, plan: MergePlan, quant: str, profile=None) -> None:
    name = Path(plan.adapter_ref.rstrip("/")).name or "adapter"
    w.add_name(f"{name} (LoRA merged into {plan.base_ref})")
    w.add_string("qwen_local.adapter", plan.adapter_ref)
    w.add_string("qwen_local.adapter_sha256", sha256(plan.adapter_file))
    w.add_string("qwen_local.base", plan.base_ref)
    w.add_string("qwen_local.version", __version__)
    w.add_string("qwen_local.quant", quant)
    if profile is not None:  # the prompts this file is verified with, and that serve will use
        from qwen_local.runtime.profile import METADATA_KEY
        w.add_string(METADATA_KEY, profile.to_json())
    c = plan.adapter_config
    w.add_string("qwen_local.lora", json.dumps({
        "r": c.get("r"), "lora_alpha": c.get("lora_alpha"), "use_rslora": bool(c.get("use_rslora")),
        "rank_pattern": c.get("rank_pattern") or {}, "alpha_pattern": c.get("alpha_pattern") or {},
        "modules_to_save": c.get("modules_to_save"), "bias": c.get("bias", "none"),
        "tensors_changed": len(plan.changed), "untied_output": plan.untie,
    }, sort_keys=True))


# --------------------------------------------------------------------------------------------- writing

def _ftype(out_type: str) -> int:
    import gguf
    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "bf16": gguf.LlamaFileType.MOSTLY_BF16}[out_type]


def _tensor_type(out_type: str, shape, force_f32: bool):
    import gguf
    if out_type == "f32" or len(shape) < 2 or force_f32:
        return gguf.GGMLQuantizationType.F32, 4
    if out_type == "f16":
        return gguf.GGMLQuantizationType.F16, 2
    return gguf.GGMLQuantizationType.BF16, 2


def _encode(block: np.ndarray, qtype, name: str) -> np.ndarray:
    import gguf
    if qtype == gguf.GGMLQuantizationType.F32:
        if not np.isfinite(block).all():
            raise UserError(f"merged tensor {name} has NaN/inf values (broken adapter or base?)")
        return block
    if qtype == gguf.GGMLQuantizationType.F16:
        with np.errstate(over="ignore"):
            h = block.astype(np.float16)
        if not np.isfinite(h).all():
            if not np.isfinite(block).all():
                raise UserError(f"merged tensor {name} has NaN/inf values (broken adapter or base?)")
            raise _F16Overflow(name)
        return h
    import torch  # bf16: round to nearest even, as torch does
    t = torch.from_numpy(block)
    if not torch.isfinite(t).all():
        raise UserError(f"merged tensor {name} has NaN/inf values (broken adapter or base?)")
    return t.to(torch.bfloat16).view(torch.int16).numpy()


def write_gguf(plan: MergePlan, path: Path, out_type: str, quant_label: str,
               progress: Callable[[int], None] | None = None, profile=None) -> dict:
    """Merge and write `path` (out_type f32/f16/bf16). Returns {'tensors', 'f32_kept', 'bytes'}."""
    force_f32: set[str] = set()
    while True:
        try:
            return _write_once(plan, path, out_type, quant_label, force_f32, progress, profile)
        except _F16Overflow as e:  # rare: restart with that tensor kept in f32, like llama.cpp does
            force_f32.add(e.name)


def _write_once(plan, path, out_type, quant_label, force_f32, progress, profile):
    import gguf

    cfg = plan.base_config
    order = tensor_order(plan)
    w = gguf.GGUFWriter(str(path), "qwen2")
    try:
        add_hparams(w, cfg)
        w.add_file_type(_ftype(out_type))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tok = add_tokenizer(w, plan.base_dir, plan.tensors["model.embed_tokens.weight"].shape[0])
        add_provenance(w, plan, quant_label, profile)
        types = {}
        for gname, hf in order:
            shape = plan.tensors[hf].shape
            qtype, size = _tensor_type(out_type, shape, gname in force_f32)
            types[gname] = qtype
            nbytes = int(np.prod(shape)) * size
            np_dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
            w.add_tensor_info(gname, shape, np.dtype(np_dtype), nbytes, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        total = 0
        with Merger(plan) as merger:
            for gname, hf in order:
                src = plan.tensors[hf]
                total += _stream_tensor(w, gname, (_encode(b, types[gname], gname) for b in merger.blocks(src)))
                if progress:
                    progress(int(np.prod(src.shape)))
        w.flush()
    finally:
        w.close()
    return {"tensors": len(order), "f32_kept": sorted(force_f32), "bytes": path.stat().st_size,
            "tokenizer": tok}


def _stream_tensor(w, name: str, blocks) -> int:
    """GGUFWriter.write_tensor_data for data that arrives in row blocks (same padding rules)."""
    fout = w.fout[0]
    first = next(iter(w.tensors[0]))
    if first != name:
        raise RuntimeError(f"GGUF tensor order mismatch: writer expects {first}, got {name}")
    ti = w.tensors[0].pop(first)
    w.write_padding(fout, fout.tell())
    written = 0
    for b in blocks:
        b.tofile(fout)
        written += b.nbytes
    if written != ti.nbytes:
        raise RuntimeError(f"{name}: wrote {written} bytes, declared {ti.nbytes}")
    w.write_padding(fout, written)
    return written
