"""Offline stand-ins for real checkpoints: the real Qwen2.5 tokenizer and random-weight Qwen2 models.

The tokenizer is rebuilt from the BPE ranks that the official `dashscope` wheel ships
(`dashscope/resources/qwen.tiktoken`); the file is read, the SDK is never imported. Models have real
Qwen2 shapes (tiny for tests and the demo, exact 0.5B/1.5B/3B shapes for benchmarks) and random
weights, so nothing is ever downloaded.
"""
from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
]
NOT_SPECIAL = {"<tool_call>", "</tool_call>"}
FIRST_SPECIAL_ID = 151643
PADDED_VOCAB = 151936
PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# ChatML as Qwen2.5 uses it (without the tool-calling branches, which this project never uses).
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

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


def tiktoken_ranks_path() -> Path:
    spec = importlib.util.find_spec("dashscope")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen BPE ranks come from the 'dashscope' wheel: pip install dashscope")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _merges_from_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """Recover the merge list: BPE each token with strictly lower ranks; it ends in exactly two parts."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) < 2:
            continue
        parts = [token[i:i + 1] for i in range(len(token))]
        while len(parts) > 2:
            best, best_i = None, -1
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < rank and (best is None or r < best):
                    best, best_i = r, i
            if best is None:
                break
            parts[best_i:best_i + 2] = [parts[best_i] + parts[best_i + 1]]
        if len(parts) != 2:
            raise ValueError(f"rank table is not a BPE table: token {token!r} does not split in two")
        merges.append((parts[0], parts[1]))
    return merges


def build_qwen_tokenizer(dest: str | Path):
    """Write Qwen2.5's tokenizer (tokenizer.json + tokenizer_config.json) into dest and return it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    ranks = {}
    for line in tiktoken_ranks_path().read_text().splitlines():
        if line:
            tok, rank = line.split()
            ranks[base64.b64decode(tok)] = int(rank)
    byte_char = _bytes_to_unicode()
    as_text = lambda b: "".join(byte_char[x] for x in b)  # noqa: E731
    vocab = {as_text(b): r for b, r in ranks.items()}
    merges = [(as_text(a), as_text(b)) for a, b in _merges_from_ranks(ranks)]

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    tok.add_special_tokens([AddedToken(t, special=t not in NOT_SPECIAL, normalized=False)
                            for t in SPECIAL_TOKENS])
    assert tok.token_to_id("<|endoftext|>") == FIRST_SPECIAL_ID
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token=None, bos_token=None, model_max_length=32768, clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return fast


def qwen_tokenizer(cache_dir: str | Path):
    """The tokenizer from cache_dir, built there first if absent (building takes ~10 s)."""
    from transformers import AutoTokenizer

    cache_dir = Path(cache_dir)
    if not (cache_dir / "tokenizer.json").exists():
        build_qwen_tokenizer(cache_dir)
    return AutoTokenizer.from_pretrained(cache_dir)


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
    peft_model.save_pretrained(dest)
    cfg_path = Path(dest) / "adapter_config.json"
    data = json.loads(cfg_path.read_text())
    data["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(data, indent=2))
    return Path(dest)
