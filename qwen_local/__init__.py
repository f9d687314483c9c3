"""qwen-local: a LoRA fine-tune of Qwen2.5 as a fast, private, local GGUF server.

    from qwen_local import convert, runtime
    report = convert.convert("epoch_2_final")                      # -> the report dict
    with runtime.Engine(report["output"]) as engine:
        engine.intent("áo sơ mi trắng size M còn không shop").intent   # -> "fashion"

Two packages, one direction: `qwen_local.runtime` serves a GGUF (llama.cpp, FastAPI; no torch)
and never imports `qwen_local.convert`, which merges, exports, quantizes and checks (torch, peft,
gguf). `qwen_local.cli` is the `qwen-local` command. Nothing here is imported until it is used.
"""
from __future__ import annotations

import importlib

_LAZY = {"main": "cli", "UserError": "runtime.errors", "__version__": "runtime.errors"}

__all__ = ["convert", "runtime", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    elif name in ("convert", "runtime"):
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module 'qwen_local' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
