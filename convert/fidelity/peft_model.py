"""The fp reference in torch: the user's fine-tune as trained, to measure every GGUF against.

Base + adapter are loaded with peft (float32 by default: exact enough to be the yardstick; bfloat16
on request for models too big for RAM in float32, and the figures then say so) and merged with
peft's own merge_and_unload, independently of our converter's merge.

Prompts come from the prompt profile (runtime.profile) as segments and are turned into token ids
exactly as llama.cpp sees them, which is also HF `tokenizer(prompt)` on the rendered string:
trusted segments may contain special tokens; untrusted runs are NFC-normalized and tokenized with
special tokens off, except that user-defined added tokens (<tool_call>, which is not "special")
are still matched, as llama.cpp does with parse_special=false.

The intent decision is the one-pass arithmetic of runtime.labels on the last position's logits.
The fixed system prefix of each prompt is computed once and its KV cache reused, which makes the
calibration set cheap even on the 3B model.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

from qwen_local.runtime import labels as labels_mod
from qwen_local.runtime.dataset import Dataset
from qwen_local.runtime.measure import ReferenceRun
from qwen_local.runtime.profile import Profile, Segment, load_profile, nfc

# Products shown in the reply prompts used for calibration and next-token checks.
SAMPLE_PRODUCTS = [
    {"name": "Áo sơ mi linen trắng", "price": "390.000đ", "sizes": "S, M, L", "color": "trắng"},
    {"name": "Quần tây ống suông", "price": "450.000đ", "sizes": "28-32", "color": "be"},
    {"name": "Váy midi hoa nhí", "price": "520.000đ", "sizes": "S, M", "color": "xanh"},
]


def resolve_base(base: str | Path | None, adapter: str | Path | None) -> Path:
    """The base model folder: given, or the adapter's base_model_name_or_path when it is local."""
    if base is not None:
        return Path(base)
    if adapter is None:
        raise ValueError("the reference needs a base model folder or an adapter naming one")
    cfg = Path(adapter) / "adapter_config.json"
    try:
        name = json.loads(cfg.read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot find the adapter's base model in {cfg}: {e}") from None
    if not name or not Path(name).is_dir():
        raise ValueError(f"the adapter's base model {name!r} is not a local folder: pass the base")
    return Path(name)


def bytes_to_unicode() -> dict[int, str]:
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


class PromptEncoder:
    """Prompt segments to token ids exactly as llama.cpp tokenizes them (see the module docstring).

    The one tokenization rule of the torch side: the fp reference and the intent-adapter training
    (convert/synthetic/training.py) both use it, so training, reference and serving see the same ids.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._user_defined = self._user_defined_tokens()

    def _user_defined_tokens(self) -> dict[str, int]:
        """Added tokens that are not special: llama.cpp matches them even with parse_special off."""
        return {t.content: i for i, t in self.tokenizer.added_tokens_decoder.items() if not t.special}

    def token_pieces(self) -> list[tuple[int, bytes]]:
        """(id, bytes) for every token of the HF vocabulary (byte-level BPE decoded to raw bytes)."""
        char_byte = {c: b for b, c in bytes_to_unicode().items()}
        added = {i for i in self.tokenizer.added_tokens_decoder}
        out = []
        vocab = self.tokenizer.get_vocab()
        for text, tid in vocab.items():
            if tid in added:
                out.append((tid, text.encode("utf-8")))
            else:
                try:
                    out.append((tid, bytes(char_byte[c] for c in text)))
                except KeyError:  # not a byte-level token: keep its text
                    out.append((tid, text.encode("utf-8")))
        return sorted(out)

    def encode_trusted(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode_untrusted(self, text: str) -> list[int]:
        text = nfc(text)
        if not text:
            return []
        ids: list[int] = []
        parts = [text]
        if self._user_defined:
            pattern = "(" + "|".join(re.escape(t) for t in sorted(self._user_defined, key=len,
                                                                        reverse=True)) + ")"
            parts = re.split(pattern, text)
        for part in parts:
            if not part:
                continue
            if part in self._user_defined:
                ids.append(self._user_defined[part])
            else:
                ids += self.tokenizer(part, add_special_tokens=False,
                                      split_special_tokens=True).input_ids
        return ids

    def encode(self, segments: Sequence[Segment]) -> list[int]:
        """Token ids of a prompt, segment by segment, as llama.cpp tokenizes it."""
        ids: list[int] = []
        for text, trusted in segments:
            ids += self.encode_trusted(text) if trusted else self.encode_untrusted(text)
        return ids

    def split(self, segments: Sequence[Segment]) -> tuple[list[int], list[int]]:
        """(cacheable head, rest): the head is the first trusted segment (system turn + user header)."""
        if segments and segments[0][1]:
            return self.encode_trusted(segments[0][0]), self.encode(segments[1:])
        return [], self.encode(segments)


class Reference(PromptEncoder):
    """A float32 (or bf16) PEFT model with the project's prompt, label and tokenization rules."""

    loads = 0  # models loaded by this process (the convert pipeline loads exactly one per conversion)

    def __init__(self, base: str | Path | None = None, adapter: str | Path | None = None, *,
                 cfg: Profile | None = None, dtype: str = "float32", merge: bool = True,
                 threads: int | None = None, stream: bool = False):
        """stream: keep the base weights on disk (memory-mapped shards) and load each block only
        while it runs (see streamed_peft_model): the convert pipeline's parity reference, whose
        anonymous memory is then one block and the logits instead of the whole model."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"reference dtype must be float32 or bfloat16, not {dtype!r}")
        if threads:
            torch.set_num_threads(int(threads))
        self.cfg = cfg or load_profile()
        self.base = resolve_base(base, adapter)
        self.adapter = Path(adapter) if adapter is not None else None
        self.dtype = dtype
        tok_dir = self.base if (self.base / "tokenizer.json").exists() or self.adapter is None \
            else self.adapter
        PromptEncoder.__init__(self, AutoTokenizer.from_pretrained(tok_dir))
        if stream:
            from qwen_local.convert.fidelity.streamed import streamed_peft_model

            model = streamed_peft_model(self.base, self.adapter, getattr(torch, dtype))
            merge = False
        else:
            model = AutoModelForCausalLM.from_pretrained(self.base, dtype=getattr(torch, dtype))
        Reference.loads += 1
        if self.adapter is not None and not stream:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, self.adapter)
            if merge:
                model = model.merge_and_unload()
        model.eval()
        self.model = model
        self._streamed = getattr(model, "_qwen_local_weights", None)
        self.merged = merge or self.adapter is None
        import inspect
        fwd = inspect.signature(type(self._causal_lm()).forward).parameters
        # transformers 5.x renamed past_key_values to cache; accept both
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"
        # only the last position's logits are ever used: skip the vocab projection of the others
        self._keep_last = {"logits_to_keep": 1} if "logits_to_keep" in fwd else {}
        self.n_layers = int(self._config().num_hidden_layers)
        # tied = the output projection *is* the embedding (an adapter training lm_head unties it)
        lm = self._causal_lm()
        out_w, in_w = lm.get_output_embeddings(), lm.get_input_embeddings()
        self.tied = (out_w is not None and in_w is not None
                     and out_w.weight.data_ptr() == in_w.weight.data_ptr())
        self.groups = labels_mod.prefix_groups(self.cfg.labels, self.token_pieces())
        self._prefix_cache: dict[tuple[int, ...], tuple] = {}

    # ------------------------------------------------------------------ model internals

    def _causal_lm(self):
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _config(self):
        m = self.model
        return getattr(m, "config", None) or m.get_base_model().config

    # ------------------------------------------------------------------ forward passes

    def _forward(self, ids: list[int], cache=None):
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long),
                             use_cache=True, **{self._cache_kw: cache}, **self._keep_last)
        new_cache = getattr(out, "cache", None)
        if new_cache is None:
            new_cache = out.past_key_values
        return out.logits[0, -1].float().numpy().copy(), new_cache

    def all_logits(self, ids: list[int]) -> np.ndarray:
        """Logits at every position of one token sequence ([n, vocab], float32), no cache: the
        logit-parity check of convert.fidelity.parity compares them position by position."""
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        return out.logits[0].float().numpy().copy()

    def all_logits_many(self, seqs: list[list[int]]) -> list[np.ndarray]:
        """all_logits of several sequences. A streamed model runs them as one right-padded batch,
        so each block's weights are loaded once, and projects each sequence's own rows only
        (the padding would cost a [batch, longest, vocab] tensor); padding after a sequence
        changes none of its positions."""
        if self._streamed is None:
            return [self.all_logits(s) for s in seqs]
        import torch

        n = max(map(len, seqs))
        ids = torch.zeros((len(seqs), n), dtype=torch.long)
        mask = torch.zeros((len(seqs), n), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        lm = self._causal_lm()
        with torch.inference_mode():
            hidden = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            return [lm.lm_head(hidden[i, :len(s)]).float().numpy().copy() for i, s in enumerate(seqs)]

    def release(self) -> None:
        """Free the torch model (the tokenizer, label groups and figures already computed stay):
        the convert pipeline calls this once every reference-side pass is done, before llama.cpp
        loads candidate GGUFs, so the two never sit in memory together."""
        import gc

        self.model = None
        self._prefix_cache.clear()
        if self._streamed is not None:
            self._streamed.close()
            self._streamed = None
        gc.collect()
        _trim_heap()

    def last_logits(self, segments: Sequence[Segment]) -> np.ndarray:
        """Next-token logits after the whole prompt (float32, full padded vocabulary)."""
        head, rest = self.split(segments)
        if not head:
            return self._forward(rest)[0]
        logits, cache = self._with_head(head)
        if not rest:
            return logits
        cache = self._fork(cache, len(head))
        return self._forward(rest, cache)[0]

    def _with_head(self, head: list[int]):
        key = tuple(head)
        if key not in self._prefix_cache:
            if len(self._prefix_cache) >= 4:
                self._prefix_cache.pop(next(iter(self._prefix_cache)))
            self._prefix_cache[key] = self._forward(head)
        return self._prefix_cache[key]

    @staticmethod
    def _fork(cache, length: int):
        """A private copy of a cached prefix (the forward pass extends caches in place)."""
        import copy

        forked = copy.deepcopy(cache)
        if hasattr(forked, "crop") and forked.get_seq_length() > length:
            forked.crop(length)
        return forked

    def forget_prefixes(self) -> None:
        self._prefix_cache.clear()

    # ------------------------------------------------------------------ task outputs

    def intent_probs(self, query: str) -> dict[str, float]:
        return labels_mod.label_probs(self.last_logits(self.cfg.intent_prompt(query)), self.groups)

    def intents(self, queries: Iterable[str], progress: Callable | None = None) -> list[dict]:
        """Label distributions for each query (progress: an optional tqdm-like wrapper)."""
        queries = list(queries)
        it = progress(queries) if progress else queries
        return [self.intent_probs(q) for q in it]

    def greedy_steps(self, segments: Sequence[Segment], steps: int = 4) -> tuple[list[int], np.ndarray]:
        """Teacher for next-token checks: the reference's greedy continuation and, for each step,
        the logits it was chosen from ([n, vocab]). The candidate is fed the same tokens."""
        head, rest = self.split(segments)
        cache = None
        if head:
            logits, cache = self._with_head(head)
            cache = self._fork(cache, len(head))
        if rest:
            logits, cache = self._forward(rest, cache)
        rows, chosen = [logits], []
        eos = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        for _ in range(steps - 1):
            t = int(np.argmax(rows[-1]))
            chosen.append(t)
            if t == eos:
                break
            logits, cache = self._forward([t], cache)
            rows.append(logits)
        return chosen[:len(rows) - 1], np.stack(rows)


def _trim_heap() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise, and they count as
    anonymous memory while llama.cpp runs next)."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


# ---------------------------------------------------------------------- prompt sets

def generation_prompts(cfg: Profile, queries: Sequence[str],
                       labels: Sequence[str]) -> list[list[Segment]]:
    """Reply prompts in the serving format: products attached for fashion, none otherwise."""
    out = []
    for q, lab in zip(queries, labels):
        products = SAMPLE_PRODUCTS if lab == "fashion" else None
        out.append(cfg.reply_prompt(q, lab, bool(products), products))
    return out


def spread(queries: Sequence[str], labels: Sequence[str | None], n: int) -> list[int]:
    """Indices of up to n items taking labels in turn (round robin), so every label is represented."""
    by: dict = {}
    for i, lab in enumerate(labels):
        by.setdefault(lab, []).append(i)
    out: list[int] = []
    while len(out) < min(n, len(queries)):
        for lab in list(by):
            if by[lab] and len(out) < n:
                out.append(by[lab].pop(0))
    return out


def reference_run(reference, data: Dataset, *, probs: list[dict] | None = None,
                  gen_prompts: int = 4, steps: int = 4, progress=None) -> ReferenceRun:
    """What the torch reference (`Reference`) says on data, computed once: its
    label distributions (unless given), the greedy next-token teacher on `gen_prompts` reply
    prompts spread over its labels, and the user-turn token ids for the tokenizer check."""
    if probs is None:
        probs = reference.intents(data.queries, progress=progress)
    teacher = []
    if gen_prompts > 0:
        picks = spread(data.queries, [labels_mod.decide(p) for p in probs], gen_prompts)
        prompts = generation_prompts(reference.cfg, [data.queries[i] for i in picks],
                                     [labels_mod.decide(probs[i]) for i in picks])
        for segs in prompts:
            fed, rows = reference.greedy_steps(segs, steps)
            teacher.append((reference.encode(segs), fed, rows))
    intent_ids = [reference.encode(reference.cfg.intent_prompt(q)[1:]) for q in data.queries]
    desc = f"peft {reference.dtype}" + (" merged" if reference.merged else "")
    return ReferenceRun(probs=probs, teacher=teacher, intent_ids=intent_ids, describe=desc)
