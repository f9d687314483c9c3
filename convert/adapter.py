"""Read and audit a PEFT LoRA adapter against its Qwen2 base, before any heavy work.

The audit turns an adapter folder (or hub id) and a base folder (or hub id) into a `MergePlan`: for every
tensor of the merged model, where its values come from (base shard, a full replacement saved in the
adapter, plus at most one LoRA delta with its exact scaling). Every shape is checked here, so the merge
and the GGUF writer never meet a surprise. Anything this tool cannot reproduce exactly the way peft
does is refused with a message that names the feature.

Semantics follow peft 0.13-0.21 (checked against `PeftModel` forward in tests/test_merge.py):
- scaling = lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora;
- rank_pattern / alpha_pattern keys match a module name like peft's `get_pattern_key`: the first key K
  (in insertion order) for which `re.match(rf"(.*\\.)?({K})$", module_name)` succeeds;
- LoRA on nn.Linear: delta = B @ A (out, in); peft forces fan_in_fan_out=False on nn.Linear (all Qwen2
  projections are nn.Linear), so a true flag in the config is noted and disregarded, as peft does;
- LoRA on nn.Embedding: delta = (B @ A)^T (vocab, hidden);
- modules_to_save and saved biases (bias="all"/"lora_only") replace the base tensor;
- tied embeddings: peft only keeps lm_head and embed_tokens tied when `ensure_weight_tying` is set;
  otherwise a change to one of them leaves the other at the base value, so the GGUF gets a separate
  output.weight (untied). Nothing on either side is ever dropped.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from qwen_local.runtime.errors import UserError

from qwen_local.convert.checkpoint import base_shards, read_json, resolve, safetensors_header, same_tensor

PEFT_PREFIX = "base_model.model."
EMBED = "model.embed_tokens"
HEAD = "lm_head"
LINEAR_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Config switches of LoRA variants whose weights are not "W + scaling * B @ A": refuse, naming them.
REFUSED_FLAGS = {
    "use_dora": "DoRA (use_dora=true)",
    "lora_bias": "LoRA bias on lora_B (lora_bias=true)",
    "use_qalora": "QALoRA (use_qalora=true)",
    "layer_replication": "layer replication (layer_replication)",
    "trainable_token_indices": "trainable tokens (trainable_token_indices)",
    "target_parameters": "LoRA on nn.Parameter (target_parameters)",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
    "kasa_config": "KaSA (kasa_config)",
    "velora_config": "VeLoRA (velora_config)",
    "monteclora_config": "MonteCLoRA (monteclora_config)",
    "arrow_config": "Arrow routing (arrow_config)",
    "use_bdlora": "BD-LoRA (use_bdlora)",
    "megatron_config": "Megatron parallel LoRA (megatron_config)",
}
# init methods that rewrite the base weights: the adapter only makes sense against that modified base
REFUSED_INITS = ("pissa", "olora", "corda", "loftq")


@dataclass
class LoraDelta:
    module: str            # module name inside Qwen2ForCausalLM, e.g. "model.layers.0.self_attn.q_proj"
    kind: str              # "linear" or "embedding"
    a_key: str             # key of A in the adapter file (linear: (r, in); embedding: (r, vocab))
    b_key: str             # key of B (linear: (out, r); embedding: (hidden, r))
    r: int
    alpha: float
    scaling: float
    fan_in_fan_out: bool = False


@dataclass
class TensorSource:
    """Where one tensor of the merged model comes from."""
    name: str                       # HF parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    shape: tuple[int, ...]
    base_key: str | None = None     # key in the base shards (None if fully replaced)
    adapter_key: str | None = None  # full replacement from the adapter file (modules_to_save, bias)
    lora: LoraDelta | None = None

    @property
    def changed(self) -> bool:
        return self.adapter_key is not None or self.lora is not None


@dataclass
class MergePlan:
    adapter_ref: str
    adapter_dir: Path
    adapter_file: Path
    adapter_config: dict
    base_ref: str
    base_dir: Path
    base_config: dict
    base_shards: dict[str, Path]          # base tensor key -> shard file
    base_dtypes: dict[str, str]
    tensors: dict[str, TensorSource]      # merged tensor name -> source, in a stable order
    tied_base: bool
    untie: bool                           # write output.weight although the base ties it
    notes: list[str] = field(default_factory=list)

    @property
    def lora(self) -> list[LoraDelta]:
        return [t.lora for t in self.tensors.values() if t.lora is not None]

    @property
    def changed(self) -> list[str]:
        return [n for n, t in self.tensors.items() if t.changed]

    def n_params(self) -> int:
        return sum(math.prod(t.shape) for t in self.tensors.values())

    def summary(self) -> list[str]:
        """The short audit printed before the heavy work."""
        c = self.adapter_config
        ranks = sorted({d.r for d in self.lora})
        scalings = sorted({round(d.scaling, 6) for d in self.lora})
        modules = sorted({d.module.rsplit(".", 1)[-1] for d in self.lora})
        full = sorted({n for n, t in self.tensors.items() if t.adapter_key is not None})
        lines = [
            f"base      {self.base_ref} (Qwen2, {self.base_config['num_hidden_layers']} layers, hidden "
            f"{self.base_config['hidden_size']}, {self.n_params() / 1e9:.2f}B params, "
            f"{'tied' if self.tied_base else 'untied'} embeddings)",
            f"adapter   {self.adapter_ref} (LoRA r={c.get('r')} alpha={c.get('lora_alpha')}"
            f"{', rsLoRA' if c.get('use_rslora') else ''}"
            f"{', rank_pattern' if c.get('rank_pattern') else ''}"
            f"{', alpha_pattern' if c.get('alpha_pattern') else ''}, bias={c.get('bias', 'none')})",
            f"ranks     {', '.join(map(str, ranks)) or '-'}; scalings {', '.join(f'{s:g}' for s in scalings) or '-'}",
            f"modules   LoRA on {', '.join(modules) or '-'} ({len(self.lora)} layers)"
            + (f"; replaced: {_short_list(full)}" if full else ""),
            f"changes   {len(self.changed)} of {len(self.tensors)} tensors"
            + ("; lm_head untied from embed_tokens (output.weight written)" if self.tied_base and self.untie else ""),
        ]
        lines += [f"note      {n}" for n in self.notes]
        return lines


def _short_list(names: list[str], n: int = 4) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def get_pattern_key(pattern_keys, key_to_match: str) -> str:
    """peft's rank_pattern/alpha_pattern matching: the first pattern matching the end of the module name."""
    for key in pattern_keys:
        if re.match(rf"(.*\.)?({key})$", key_to_match):
            return key
    return key_to_match


def lora_scaling(module: str, config: dict) -> tuple[int, float, float]:
    """(r, alpha, scaling) that peft gives this module."""
    rank_pattern = config.get("rank_pattern") or {}
    alpha_pattern = config.get("alpha_pattern") or {}
    r = rank_pattern.get(get_pattern_key(rank_pattern.keys(), module), config.get("r", 8))
    alpha = alpha_pattern.get(get_pattern_key(alpha_pattern.keys(), module), config.get("lora_alpha", 8))
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"adapter_config.json: invalid rank {r!r} for {module}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise UserError(f"adapter_config.json: invalid lora_alpha {alpha!r} for {module}")
    scaling = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return r, float(alpha), float(scaling)


# ------------------------------------------------------------------------------------------------ audit

def audit(adapter: str, base: str | None = None) -> MergePlan:
    adapter_dir = resolve(adapter, "adapter", ["adapter_config.json", "adapter_model.safetensors", "*.json"])
    cfg = read_json(adapter_dir / "adapter_config.json", "adapter_config.json")
    _check_adapter_config(cfg, adapter_dir)
    base_ref = base or cfg.get("base_model_name_or_path")
    if not base_ref:
        raise UserError("no base model: adapter_config.json has no base_model_name_or_path; pass --base DIR|HUB_ID")
    base_dir = resolve(str(base_ref), "base", ["*.json", "*.safetensors", "*.jinja", "*.txt"])
    base_cfg = _base_config(base_dir, base_ref)
    adapter_file = _adapter_file(adapter_dir)
    adapter_tensors = safetensors_header(adapter_file)
    base_tensors, base_shard_of = _base_tensors(base_dir, base_ref)
    tied = bool(base_cfg.get("tie_word_embeddings", False))
    if not tied and f"{HEAD}.weight" not in base_tensors:
        raise UserError(f"base {base_ref} has untied embeddings but no {HEAD}.weight")

    targets, head = _merged_tensors(base_tensors, tied)
    lora_parts, full, base_copies = _group_adapter_tensors(adapter_tensors)
    targets[head.name] = head
    _check_base_copies(targets, base_copies, adapter_file, adapter_tensors, base_shard_of)
    _place_replacements(targets, full, adapter_tensors)
    notes: list[str] = []
    if cfg.get("fan_in_fan_out"):
        notes.append("fan_in_fan_out=true disregarded: Qwen2 projections are nn.Linear (peft does the same)")
    _place_lora(targets, lora_parts, adapter_tensors, cfg)
    untie = _untie(cfg, tied, head, targets[f"{EMBED}.weight"], adapter_file, notes)
    if not untie:
        targets.pop(head.name)
    if cfg.get("bias", "none") not in ("none", "all", "lora_only"):
        raise UserError(f"adapter_config.json: unknown bias setting {cfg.get('bias')!r}")
    if not any(t.changed for t in targets.values()):
        raise UserError("the adapter changes nothing in the base (no LoRA, modules_to_save or bias tensors)")

    plan = MergePlan(
        adapter_ref=adapter, adapter_dir=adapter_dir, adapter_file=adapter_file, adapter_config=cfg,
        base_ref=str(base_ref), base_dir=base_dir, base_config=base_cfg, base_shards=base_shard_of,
        base_dtypes={k: v[0] for k, v in base_tensors.items()},
        tensors=targets, tied_base=tied, untie=untie and tied, notes=notes,
    )
    _check_layers(plan)
    return plan


def _check_adapter_config(cfg: dict, adapter_dir: Path) -> None:
    """Refuse what cannot be merged as W + scaling * B @ A, and malformed numbers."""
    peft_type = str(cfg.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise UserError(f"adapter type {cfg.get('peft_type')!r} is not supported (only LoRA adapters): "
                        f"{adapter_dir / 'adapter_config.json'}")
    for key, feature in REFUSED_FLAGS.items():
        if cfg.get(key) not in (None, False, {}, [], ""):
            raise UserError(f"{feature} is not supported: it cannot be merged as W + scaling*B@A")
    init = cfg.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(REFUSED_INITS):
        raise UserError(f"init_lora_weights={init!r} is not supported: that init rewrites the base weights, "
                        "so the adapter only fits that modified base (convert it with peft's "
                        "path_initial_model_for_weight_conversion first)")
    for key in ("r", "lora_alpha"):
        if key in cfg and not isinstance(cfg[key], (int, float)):
            raise UserError(f"adapter_config.json: {key} must be a number, got {cfg[key]!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise UserError(f"adapter_config.json: {key} must be an object, got {cfg[key]!r}")


def _base_config(base_dir: Path, base_ref) -> dict:
    """The base's config.json, checked to be a Qwen2ForCausalLM with a tokenizer.json."""
    base_cfg = read_json(base_dir / "config.json", "base config.json")
    archs = base_cfg.get("architectures") or []
    if "Qwen2ForCausalLM" not in archs and not (not archs and base_cfg.get("model_type") == "qwen2"):
        raise UserError(f"base {base_ref} is {', '.join(archs) or base_cfg.get('model_type') or 'unknown'}, "
                        "not Qwen2ForCausalLM: only Qwen2/Qwen2.5 bases are supported")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size"):
        if not isinstance(base_cfg.get(key), int):
            raise UserError(f"base config.json lacks {key}")
    if not (base_dir / "tokenizer.json").is_file():
        raise UserError(f"base {base_ref} has no tokenizer.json (needed for the GGUF vocabulary)")
    return base_cfg


def _adapter_file(adapter_dir: Path) -> Path:
    adapter_file = adapter_dir / "adapter_model.safetensors"
    if not adapter_file.is_file():
        if (adapter_dir / "adapter_model.bin").is_file():
            raise UserError(f"{adapter_dir} holds adapter_model.bin only; save the adapter with "
                            "safe_serialization=True (adapter_model.safetensors)")
        raise UserError(f"adapter weights not found: {adapter_file}")
    return adapter_file


def _base_tensors(base_dir: Path, base_ref) -> tuple[dict[str, tuple[str, tuple[int, ...]]], dict[str, Path]]:
    """(name -> (dtype, shape), name -> shard file) over every shard of the base."""
    base_tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    base_shard_of: dict[str, Path] = {}
    for p in base_shards(base_dir).values():
        for k, v in safetensors_header(p).items():
            base_tensors[k] = v
            base_shard_of[k] = p
    if f"{EMBED}.weight" not in base_tensors:
        raise UserError(f"base {base_ref} has no {EMBED}.weight: not a Qwen2ForCausalLM checkpoint")
    return base_tensors, base_shard_of


def _merged_tensors(base_tensors: dict, tied: bool) -> tuple[dict[str, TensorSource], TensorSource]:
    """(the merged model's tensors but lm_head, in a stable order; lm_head, which for a tied base
    starts as the embedding)."""
    tensors: dict[str, TensorSource] = {}
    for k, (_, shape) in base_tensors.items():
        if k == f"{HEAD}.weight" and tied:
            continue
        if not k.startswith("model.") and k != f"{HEAD}.weight":
            raise UserError(f"base tensor {k!r} is not part of Qwen2ForCausalLM")
        tensors[k] = TensorSource(k, shape, base_key=k)
    emb_shape = base_tensors[f"{EMBED}.weight"][1]
    head = TensorSource(f"{HEAD}.weight", emb_shape, base_key=f"{EMBED}.weight") if tied else tensors.pop(f"{HEAD}.weight")
    return tensors, head


def _group_adapter_tensors(adapter_tensors: dict) -> tuple[dict[str, dict[str, str]], dict[str, str], dict[str, str]]:
    """(module -> {lora_A/B part: key}, merged tensor -> key of a full replacement,
    merged tensor -> key of a saved base_layer copy)."""
    lora_parts: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    base_copies: dict[str, str] = {}
    for key in adapter_tensors:
        name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        if ".lora_magnitude_vector" in name:
            raise UserError("DoRA (lora_magnitude_vector tensors) is not supported")
        m = re.fullmatch(r"(.+)\.(lora_A|lora_B)\.weight", name) or re.fullmatch(
            r"(.+)\.(lora_embedding_A|lora_embedding_B)", name)
        if m:
            lora_parts.setdefault(m.group(1), {})[m.group(2)] = key
            continue
        m = re.fullmatch(r"(.+)\.base_layer\.(weight|bias)", name)
        if m:
            target = f"{m.group(1)}.{m.group(2)}"
            if m.group(2) == "bias":
                full[target] = key          # bias="all"/"lora_only" saves the trained bias under base_layer
            else:
                base_copies[target] = key   # peft saves the base embedding when it targets embeddings
            continue
        m = re.fullmatch(r"(.+)\.modules_to_save\.[^.]+\.(weight|bias)", name)
        if m:
            full[f"{m.group(1)}.{m.group(2)}"] = key
            continue
        if re.fullmatch(r".+\.(weight|bias)", name):
            full[name] = key
            continue
        raise UserError(f"unsupported tensor in the adapter: {key!r} (not LoRA A/B, modules_to_save or bias)")
    return lora_parts, full, base_copies


def _base_shape(targets: dict[str, TensorSource], target: str, what: str) -> tuple[int, ...]:
    if target not in targets:
        raise UserError(f"the adapter changes {what} {target!r}, which the base does not have "
                        "(adapter made for a different model?)")
    return targets[target].shape


def _check_base_copies(targets, base_copies: dict[str, str], adapter_file: Path, adapter_tensors: dict,
                       base_shard_of: dict[str, Path]) -> None:
    """Saved base_layer copies must be the base itself (a resized or re-initialised vocabulary is refused)."""
    for target, key in base_copies.items():
        shape = _base_shape(targets, target, "base layer")
        if adapter_tensors[key][1] != shape:
            if target.endswith(("embed_tokens.weight", "lm_head.weight")):
                raise UserError(f"resized vocabulary is not supported: the adapter's {target} has "
                                f"{adapter_tensors[key][1][0]} rows, the base has {shape[0]}")
            raise UserError(f"shape mismatch: adapter {key} {adapter_tensors[key][1]} vs base {target} {shape} "
                            "(adapter made for a different base?)")
        src = targets[target].base_key
        if not same_tensor(adapter_file, key, base_shard_of[src], src):
            raise UserError(f"the adapter carries a modified copy of the base {target} "
                            "(resized or re-initialised vocabulary?): not supported")


def _place_replacements(targets, full: dict[str, str], adapter_tensors: dict) -> None:
    for target, key in full.items():
        shape = _base_shape(targets, target, "tensor")
        got = adapter_tensors[key][1]
        if got != shape:
            if target.endswith(("embed_tokens.weight", "lm_head.weight")) and got[1:] == shape[1:]:
                raise UserError(f"resized vocabulary is not supported: the adapter's {target} has {got[0]} rows, "
                                f"the base has {shape[0]}")
            raise UserError(f"shape mismatch: adapter {target} {got} vs base {shape} (adapter made for a different base?)")
        targets[target].adapter_key = key


def _place_lora(targets, lora_parts: dict[str, dict[str, str]], adapter_tensors: dict, cfg: dict) -> None:
    for module, parts in sorted(lora_parts.items()):
        embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
        a_key = parts.get("lora_embedding_A" if embedding else "lora_A")
        b_key = parts.get("lora_embedding_B" if embedding else "lora_B")
        if a_key is None or b_key is None:
            raise UserError(f"adapter has only one of LoRA A/B for {module}: the file is incomplete")
        target = f"{module}.weight"
        shape = _base_shape(targets, target, "module")
        if targets[target].adapter_key is not None:
            raise UserError(f"{module} has both LoRA weights and a full replacement in the adapter")
        a, b = adapter_tensors[a_key][1], adapter_tensors[b_key][1]
        r, alpha, scaling = lora_scaling(module, cfg)
        if embedding:
            ok = len(a) == 2 and len(b) == 2 and a[1] == shape[0] and b[0] == shape[1] and a[0] == b[1]
            if not ok and len(a) == 2 and a[1] != shape[0] and module.endswith("embed_tokens"):
                raise UserError(f"resized vocabulary is not supported: the adapter's embedding LoRA has "
                                f"{a[1]} rows, the base has {shape[0]}")
        else:
            ok = len(a) == 2 and len(b) == 2 and a[1] == shape[1] and b[0] == shape[0] and a[0] == b[1]
        if not ok:
            raise UserError(f"shape mismatch on {module}: LoRA A {a} and B {b} do not fit the base weight {shape} "
                            "(adapter made for a different base?)")
        if a[0] != r:
            raise UserError(f"{module}: adapter_config.json gives rank {r} but the tensors have rank {a[0]}")
        if len(shape) != 2:
            raise UserError(f"LoRA on {module} with weight shape {shape} is not supported")
        targets[target].lora = LoraDelta(module, "embedding" if embedding else "linear", a_key, b_key,
                                         r, alpha, scaling, fan_in_fan_out=False)


def _untie(cfg: dict, tied: bool, head: TensorSource, emb_src: TensorSource, adapter_file: Path,
           notes: list[str]) -> bool:
    """Whether lm_head gets its own output.weight: always for an untied base; for a tied one, when
    the adapter changes either side and peft would not keep them tied."""
    if not tied:
        return True
    if not (head.changed or emb_src.changed):
        return False
    if cfg.get("ensure_weight_tying") and not head.changed:
        # peft ties lm_head to the changed embedding: the GGUF's token_embd serves both
        notes.append("lm_head stays tied to the changed embed_tokens (ensure_weight_tying=true)")
    elif (head.adapter_key and emb_src.adapter_key and head.lora is None and emb_src.lora is None
          and same_tensor(adapter_file, head.adapter_key, adapter_file, emb_src.adapter_key)):
        notes.append("saved lm_head and embed_tokens are identical: kept tied")
    elif (cfg.get("ensure_weight_tying") and emb_src.lora is not None and head.lora is not None
          and head.adapter_key is None and emb_src.adapter_key is None
          and _tied_lora(adapter_file, emb_src.lora, head.lora)):
        notes.append("lm_head LoRA is the embedding LoRA transposed (ensure_weight_tying): kept tied")
    else:
        side = [n for n, t in ((HEAD, head), ("embed_tokens", emb_src)) if t.changed]
        notes.append(f"base ties lm_head to embed_tokens, the adapter changes {' and '.join(side)}: "
                     "untied, output.weight written")
        return True
    return False


def _check_layers(plan: MergePlan) -> None:
    n = plan.base_config["num_hidden_layers"]
    for name in plan.tensors:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        if m and int(m.group(1)) >= n:
            raise UserError(f"base tensor {name} is beyond num_hidden_layers={n}")


def _tied_lora(adapter_file: Path, emb: LoraDelta, head: LoraDelta) -> bool:
    import torch
    from safetensors import safe_open

    if abs(emb.scaling - head.scaling) > 0:
        return False
    with safe_open(str(adapter_file), framework="pt") as f:
        return (torch.equal(f.get_tensor(head.a_key).float(), f.get_tensor(emb.b_key).float().t())
                and torch.equal(f.get_tensor(head.b_key).float(), f.get_tensor(emb.a_key).float().t()))
