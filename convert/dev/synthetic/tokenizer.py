"""The real Qwen2.5 tokenizer, rebuilt offline from the BPE ranks that the official `dashscope`
wheel ships (`dashscope/resources/qwen.tiktoken`); the file is read, the SDK is never imported."""
from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from qwen_local.convert.fidelity.peft_model import bytes_to_unicode

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

def tiktoken_ranks_path() -> Path:
    spec = importlib.util.find_spec("dashscope")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the Qwen BPE ranks come from the 'dashscope' wheel: pip install dashscope")
    return Path(list(spec.submodule_search_locations)[0]) / "resources" / "qwen.tiktoken"


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
    byte_char = bytes_to_unicode()
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
