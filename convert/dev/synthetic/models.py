"""Random-weight Qwen2 checkpoints with real shapes (tiny for tests and the demo, the exact
0.5B/1.5B/3B shapes for benchmarks) and random LoRA adapters on them, saved like hub folders."""
from __future__ import annotations

import json
from pathlib import Path

from .tokenizer import FIRST_SPECIAL_ID, PADDED_VOCAB, qwen_tokenizer

SHAPES = {  # Qwen2.5 instruct checkpoints' exact shapes
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                 num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
               num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    # hidden and intermediate divisible by 256 so K-quants apply
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_base(dest: str | Path, tokenizer_dir: str | Path, shape: str = "tiny", *, seed: int = 0,
              dtype: str = "float32", **overrides) -> Path:
    """A random-weight Qwen2ForCausalLM checkpoint with the real tokenizer, saved like a hub folder."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    dest = Path(dest)
    tok = qwen_tokenizer(tokenizer_dir)
    cfg = dict(SHAPES[shape], vocab_size=PADDED_VOCAB, max_position_embeddings=32768,
               rope_theta=1000000.0, rms_norm_eps=1e-6, bos_token_id=FIRST_SPECIAL_ID,
               eos_token_id=151645, torch_dtype=dtype)
    cfg.update(overrides)
    torch.manual_seed(seed)
    config = Qwen2Config(**cfg)
    with torch.device("cpu"), _no_init_weights():  # _randomize sets every weight: skip the default init
        torch.set_default_dtype(getattr(torch, dtype))
        try:
            model = Qwen2ForCausalLM(config)
        finally:
            torch.set_default_dtype(torch.float32)
    model.tie_weights()
    _randomize(model, seed)
    model.save_pretrained(dest, safe_serialization=True, max_shard_size="2GB")
    tok.save_pretrained(dest)
    return dest


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights  # transformers >= 5
    except ImportError:
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _randomize(model, seed: int) -> None:
    """Give every tensor (norms and biases too) non-trivial values, so a missed tensor shows in logits.

    In place, with one float32 temporary at a time: a 3B bf16 model peaks at its size + 1.2 GB.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            x = torch.empty(p.shape, dtype=torch.float32).normal_(generator=g)  # = torch.randn(...)
            if name.endswith("norm.weight"):
                x.mul_(0.1).add_(1.0)
            elif name.endswith(".bias"):
                x.mul_(0.5)
            else:
                x.mul_(0.02).mul_(1.0 if p.ndim == 1 else 2.0)
            p.copy_(x)
            del x


def make_adapter(base_dir: str | Path, dest: str | Path, *, r: int = 8, alpha: float = 16,
                 targets=tuple(ALL_PROJECTIONS), seed: int = 1, scale: float = 1.0,
                 dtype: str = "float32", **lora_kwargs) -> Path:
    """A PEFT LoRA adapter on base_dir with real (non-zero) A and B, saved with peft itself.

    dtype is the one the base is loaded in: "bfloat16" halves the memory for big shapes (a 3B base
    is 12 GB in float32); peft keeps the adapter's own weights in float32 either way.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=getattr(torch, dtype))
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False,
                     task_type="CAUSAL_LM", **lora_kwargs)
    peft_model = get_peft_model(model, cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * 0.05 * torch.randn(p.shape, generator=g))
            elif "modules_to_save" in name:
                p.add_(0.02 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") and lora_kwargs.get("bias", "none") != "none" and p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    save_adapter(peft_model, base_dir, dest)
    return Path(dest)


def save_adapter(peft_model, base_dir: str | Path, dest: str | Path) -> None:
    """Save with peft, naming the local base folder, so that convert finds the base by itself."""
    peft_model.save_pretrained(dest)
    cfg_path = Path(dest) / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
