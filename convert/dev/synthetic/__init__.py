"""Offline stand-ins for real checkpoints: the real Qwen2.5 tokenizer, random-weight Qwen2 models
and LoRA adapters, and a trained LoRA intent classifier on them. Nothing is ever downloaded.

    from qwen_local.convert.dev import synthetic
    base = synthetic.make_base("models/tiny", "models/tokenizer", "tiny")
    adapter = synthetic.train_intent_adapter(base, "models/tiny-intent")
"""
from __future__ import annotations

from .models import ALL_PROJECTIONS, SHAPES, make_adapter, make_base
from .tokenizer import build_qwen_tokenizer, qwen_tokenizer, tiktoken_ranks_path
from .training import INTENT_REPORT, intent_split, train_intent_adapter

__all__ = ["ALL_PROJECTIONS", "INTENT_REPORT", "SHAPES", "build_qwen_tokenizer", "intent_split",
           "make_adapter", "make_base", "qwen_tokenizer", "tiktoken_ranks_path", "train_intent_adapter"]
