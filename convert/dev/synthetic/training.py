"""A real LoRA intent classifier trained on a (tiny, random) base: what the demo and the tests
convert, so that labels mean something end to end."""
from __future__ import annotations

import json
from pathlib import Path

from .models import ALL_PROJECTIONS, save_adapter

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
    convert.fidelity.peft_model.PromptEncoder: the same ids as llama.cpp and the fp reference) with the first
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
    import time

    import torch

    from qwen_local.runtime.profile import load_profile

    t0 = time.perf_counter()
    cfg = cfg or load_profile()
    rows = _rows(data, cfg.labels)
    train_idx, held_idx = intent_split([lab for _, lab in rows], holdout, seed)
    prompts = _Prompts(base_dir, cfg, rows)
    torch.manual_seed(seed)
    model = _Classifier(base_dir, r, alpha, prompts)
    _fit(model, prompts.targets, train_idx, steps=steps, lr=lr, batch=batch, seed=seed, log=log, t0=t0)
    t_train = time.perf_counter() - t0
    figures = _figures(model, rows, {"train": train_idx, "heldout": held_idx})
    _save(model.peft_model, base_dir, dest,
          {"steps": steps, "batch": batch, "lr": lr, "r": r, "alpha": alpha, "seed": seed,
           "holdout": holdout, "train_seconds": round(t_train, 2), "rows": len(rows),
           "heldout_indices": held_idx, **figures})
    log(f"trained in {t_train:.1f} s: {json.dumps(figures)}")
    return Path(dest)


def _rows(data, labels) -> list[tuple[str, str]]:
    """(query, label) pairs from None (the packaged set), a JSONL path or the pairs themselves."""
    if data is None or isinstance(data, (str, Path)):
        from qwen_local.runtime.dataset import load_data

        ds = load_data(data, labels, require_labels=True)
        rows = list(zip(ds.queries, ds.labels))
    else:
        rows = [(q, lab) for q, lab in data]
    if any(lab not in labels for _, lab in rows):
        raise ValueError(f"every row needs one of the labels {labels}")
    return rows


class _Prompts:
    """The intent prompts as token ids: the shared system head, each row's user turn, and each
    row's target (the first token of its label, as the model writes it)."""

    def __init__(self, base_dir, cfg, rows):
        from transformers import AutoTokenizer

        from qwen_local.convert.fidelity.peft_model import PromptEncoder
        from qwen_local.runtime import labels as labels_mod

        enc = PromptEncoder(AutoTokenizer.from_pretrained(base_dir))
        first = [enc.encode_trusted(lab)[0] for lab in cfg.labels]
        self.groups = labels_mod.prefix_groups(cfg.labels, enc.token_pieces())
        self.head, _ = enc.split(cfg.intent_prompt(""))
        self.rests, self.targets = [], []
        for q, lab in rows:
            h, rest = enc.split(cfg.intent_prompt(q))
            assert h == self.head and rest, "the intent prompt's head must not depend on the query"
            self.rests.append(rest)
            self.targets.append(first[cfg.labels.index(lab)])
        self.pad = enc.tokenizer.pad_token_id or 0


class _Classifier:
    """peft's LoRA model on the base, read at the last prompt position of each row, with the
    system head's KV cache computed once per refresh and shared by the batch."""

    def __init__(self, base_dir, r, alpha, prompts: _Prompts):
        import inspect

        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(ALL_PROJECTIONS),
                          lora_dropout=0.0, task_type="CAUSAL_LM")
        self.peft_model = get_peft_model(model, lcfg)
        lm = self.peft_model.get_base_model()
        self.body, self.lm_head = lm.model, lm.get_output_embeddings()
        self.cache_kw = "cache" if "cache" in inspect.signature(type(self.body).forward).parameters \
            else "past_key_values"
        self.prompts = prompts
        self.head_t = torch.tensor([prompts.head], dtype=torch.long)
        self.prefix = None  # KV of the system head: refreshed every few steps, and for evaluation

    def refresh_prefix(self) -> None:
        import torch

        with torch.no_grad():
            pre = self.body(input_ids=self.head_t, use_cache=True)
        self.prefix = getattr(pre, "cache", None) or pre.past_key_values

    def last_hidden(self, idx: list[int]):
        """Hidden state at the last prompt position of each row: [len(idx), hidden]."""
        import copy

        import torch

        seqs = [self.prompts.rests[i] for i in idx]
        n = max(len(s) for s in seqs)
        pad, head = self.prompts.pad, self.prompts.head
        ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs], dtype=torch.long)
        mask = torch.tensor([[1] * (len(head) + len(s)) + [0] * (n - len(s)) for s in seqs])
        last = torch.tensor([len(s) - 1 for s in seqs])
        cache = copy.deepcopy(self.prefix)
        cache.batch_repeat_interleave(len(seqs))
        out = self.body(input_ids=ids, attention_mask=mask, use_cache=True, **{self.cache_kw: cache})
        return out.last_hidden_state[torch.arange(len(seqs)), last]  # right padding: causal-safe


def _fit(model: _Classifier, targets: list[int], train_idx: list[int], *, steps: int, lr: float,
         batch: int, seed: int, log, t0: float) -> None:
    """AdamW on the LoRA weights; the loss is the cross-entropy of the label's first token among
    the tokens that can start a label (see train_intent_adapter)."""
    import time

    import numpy as np
    import torch

    params = [p for p in model.peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / max(1, steps)))
    rng = np.random.default_rng(seed)
    log(f"prepared in {time.perf_counter() - t0:.1f} s")
    order: list[int] = []
    # the output rows of every token that can start a label (lm_head is frozen: peft trains only A, B)
    cand = sorted({int(t) for ids in model.prompts.groups.values() for t in ids})
    cand_w = model.lm_head.weight[torch.tensor(cand)].detach()
    tcand = torch.tensor([cand.index(t) for t in targets])
    model.peft_model.train()
    for step in range(steps):
        if len(order) < batch:
            order += [train_idx[j] for j in rng.permutation(len(train_idx))]
        idx, order = order[:batch], order[batch:]
        if step % 8 == 0:
            model.refresh_prefix()
        loss = torch.nn.functional.cross_entropy(model.last_hidden(idx) @ cand_w.T, tcand[idx])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step}: loss {loss.item():.3f}")


def _figures(model: _Classifier, rows, splits: dict[str, list[int]]) -> dict:
    """Accuracy and top-label mass per split, by the one-pass label arithmetic of runtime.labels."""
    import numpy as np
    import torch

    from qwen_local.runtime import labels as labels_mod

    model.peft_model.eval()
    model.refresh_prefix()
    figures = {}
    with torch.no_grad():
        for name, idx in splits.items():
            if not idx:
                continue
            correct, tops = 0, []
            for s in range(0, len(idx), 64):
                chunk = idx[s:s + 64]
                z = model.lm_head(model.last_hidden(chunk)).float().numpy()
                for i, row in zip(chunk, z):
                    probs = labels_mod.label_probs(row, model.prompts.groups)
                    correct += labels_mod.decide(probs) == rows[i][1]
                    tops.append(max(probs.values()))
            figures[name] = {"n": len(idx), "accuracy": correct / len(idx),
                             "mean_top_mass": float(np.mean(tops)), "min_top_mass": float(np.min(tops))}
    return figures


def _save(peft_model, base_dir, dest, report: dict) -> None:
    """The adapter as peft saves it, pointing at its local base, and the training report beside it."""
    save_adapter(peft_model, base_dir, dest)
    (Path(dest) / INTENT_REPORT).write_text(json.dumps(report, indent=2))
