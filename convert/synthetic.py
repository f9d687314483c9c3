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


# ---------------------------------------------------------------------------- a trained classifier

INTENT_REPORT = "intent_training.json"  # written next to the adapter: split, timing, held-out figures


def intent_split(labels, holdout: float = 0.15, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train, held-out) row indices: per label, a seeded shuffle and the first `holdout` share held out."""
    import numpy as np

    rng = np.random.default_rng(seed)
    by: dict = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    train, held = [], []
    for lab in sorted(by, key=str):
        idx = [by[lab][j] for j in rng.permutation(len(by[lab]))]
        k = int(round(holdout * len(idx)))
        held += idx[:k]
        train += idx[k:]
    return sorted(train), sorted(held)


def train_intent_adapter(base_dir: str | Path, dest: str | Path, *, data=None, steps: int = 600,
                         r: int = 8, alpha: float = 16, seed: int = 0, lr: float = 3e-3,
                         batch: int = 8, holdout: float = 0.15, cfg=None, threads: int | None = None,
                         log=None) -> Path:
    """Train a real LoRA intent classifier on base_dir and save it with peft into dest.

    The model learns to answer the intent prompt (the profile's intent prompt, tokenized by
    convert.reference.PromptEncoder: the same ids as llama.cpp and the fp reference) with the first
    token of the right label. Training is cheap by construction:
    - the loss is at the last prompt position only: cross-entropy of the label's first token among
      the tokens that can start a label (runtime.labels.prefix_groups, ~20 rows of lm_head), which
      is exactly what the one-pass intent and grammar-greedy read. (A full-vocabulary loss does
      not train on a random base: with lm_head tied to random embeddings and a fixed final norm,
      no token can get much above p = 0.15, and the runs collapsed onto one label.)
    - the system prefix (164 of ~180 tokens) is recomputed with the current weights every 8 steps,
      without gradient, and its KV cache shared by the batch; only the ~15 user-turn tokens per
      row are trained through.
    On 2 busy cores with threads=1, 600 steps of 8 take ~30 s for the tiny shape.

    data: None (the packaged runtime/data/intent_vi.jsonl), a JSONL path, or (query, label) pairs.
    A stratified `holdout` share (intent_split with `seed`) is never trained on; the figures on it
    (accuracy and mean top-label mass, from the one-pass label arithmetic of runtime.labels) are
    written to dest/intent_training.json along with the split and the training time.
    """
    import torch

    prev = torch.get_num_threads()
    if threads:  # tiny matrices on a busy box: 1 thread is often several times faster than 2
        torch.set_num_threads(int(threads))
    try:
        return _train_intent(base_dir, dest, data, steps, r, alpha, seed, lr, batch, holdout, cfg,
                             log or (lambda s: None))
    finally:
        torch.set_num_threads(prev)


def _train_intent(base_dir, dest, data, steps, r, alpha, seed, lr, batch, holdout, cfg, log) -> Path:
    import copy
    import inspect
    import time

    import numpy as np
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from convert.reference import PromptEncoder
    from runtime import labels as labels_mod
    from runtime.profile import load_profile

    t0 = time.perf_counter()
    cfg = cfg or load_profile()
    if data is None or isinstance(data, (str, Path)):
        from runtime.dataset import load_data

        ds = load_data(data, cfg.labels, require_labels=True)
        rows = list(zip(ds.queries, ds.labels))
    else:
        rows = [(q, lab) for q, lab in data]
    if any(lab not in cfg.labels for _, lab in rows):
        raise ValueError(f"every row needs one of the labels {cfg.labels}")
    train_idx, held_idx = intent_split([lab for _, lab in rows], holdout, seed)

    enc = PromptEncoder(AutoTokenizer.from_pretrained(base_dir))
    first = [enc.encode_trusted(lab)[0] for lab in cfg.labels]  # the label as the model writes it
    groups = labels_mod.prefix_groups(cfg.labels, enc.token_pieces())
    head, _ = enc.split(cfg.intent_prompt(""))
    rests, targets = [], []
    for q, lab in rows:
        h, rest = enc.split(cfg.intent_prompt(q))
        assert h == head and rest, "the intent prompt's head must not depend on the query"
        rests.append(rest)
        targets.append(first[cfg.labels.index(lab)])
    pad = enc.tokenizer.pad_token_id or 0

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(ALL_PROJECTIONS),
                      lora_dropout=0.0, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, lcfg)
    lm = peft_model.get_base_model()
    body, lm_head = lm.model, lm.get_output_embeddings()
    cache_kw = "cache" if "cache" in inspect.signature(type(body).forward).parameters \
        else "past_key_values"
    head_t = torch.tensor([head], dtype=torch.long)

    prefix: list = []  # [KV of the system prefix]: refreshed every few steps, and for evaluation

    def refresh_prefix() -> None:
        with torch.no_grad():
            pre = body(input_ids=head_t, use_cache=True)
        prefix[:] = [getattr(pre, "cache", None) or pre.past_key_values]

    def last_hidden(idx: list[int]) -> torch.Tensor:
        """Hidden state at the last prompt position of each row: [len(idx), hidden]."""
        seqs = [rests[i] for i in idx]
        n = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)
        mask = torch.tensor([[1] * (len(head) + len(s)) + [0] * (n - len(s)) for s in seqs])
        last = torch.tensor([len(s) - 1 for s in seqs])
        cache = copy.deepcopy(prefix[0])
        cache.batch_repeat_interleave(len(seqs))
        out = body(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kw: cache})
        return out.last_hidden_state[torch.arange(len(seqs)), last]  # right padding: causal-safe

    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / max(1, steps)))
    rng = np.random.default_rng(seed)
    log(f"prepared in {time.perf_counter() - t0:.1f} s")
    order: list[int] = []
    # the output rows of every token that can start a label (lm_head is frozen: peft trains only A, B)
    cand = sorted({int(t) for ids in groups.values() for t in ids})
    cand_w = lm_head.weight[torch.tensor(cand)].detach()
    tcand = torch.tensor([cand.index(t) for t in targets])
    peft_model.train()
    for step in range(steps):
        if len(order) < batch:
            order += [train_idx[j] for j in rng.permutation(len(train_idx))]
        idx, order = order[:batch], order[batch:]
        if step % 8 == 0:
            refresh_prefix()
        loss = torch.nn.functional.cross_entropy(last_hidden(idx) @ cand_w.T, tcand[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")
    t_train = time.perf_counter() - t0

    peft_model.eval()
    refresh_prefix()
    figures = {}
    with torch.no_grad():
        for name, idx in (("train", train_idx), ("heldout", held_idx)):
            if not idx:
                continue
            correct, tops = 0, []
            for s in range(0, len(idx), 64):
                chunk = idx[s:s + 64]
                z = lm_head(last_hidden(chunk)).float().numpy()
                for i, row in zip(chunk, z):
                    probs = labels_mod.label_probs(row, groups)
                    correct += labels_mod.decide(probs) == rows[i][1]
                    tops.append(max(probs.values()))
            figures[name] = {"n": len(idx), "accuracy": correct / len(idx),
                             "mean_top_mass": float(np.mean(tops)), "min_top_mass": float(np.min(tops))}

    dest = Path(dest)
    peft_model.save_pretrained(dest)
    cfg_path = dest / "adapter_config.json"
    meta = json.loads(cfg_path.read_text())
    meta["base_model_name_or_path"] = str(base_dir)
    cfg_path.write_text(json.dumps(meta, indent=2))
    report = {"steps": steps, "batch": batch, "lr": lr, "r": r, "alpha": alpha, "seed": seed,
              "holdout": holdout, "train_seconds": round(t_train, 2), "rows": len(rows),
              "heldout_indices": held_idx, **figures}
    (dest / INTENT_REPORT).write_text(json.dumps(report, indent=2))
    log(f"trained in {t_train:.1f} s: {json.dumps(figures)}")
    return dest
