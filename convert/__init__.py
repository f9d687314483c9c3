"""Converting a LoRA fine-tune of Qwen2.5 to a verified GGUF: the upper layer (torch, peft, GGUF
writing); it builds on runtime/ and is never imported by it.

    from qwen_local.convert import Reference, audit, convert, final_line
    report = convert("epoch_2_final", quant="q4_k_m")   # -> dict, also <out>.json
    print(final_line(report))
    plan = audit("epoch_2_final")                        # what the merge will do, no weights read
    ref = Reference("base/", "epoch_2_final")            # the fp PEFT model in torch

The names are imported on first use: importing this package loads neither torch nor peft.
"""
from __future__ import annotations

import importlib

_LAZY = {
    "convert": (".pipeline", "run"),
    "final_line": (".pipeline", "final_line"),
    "audit": (".adapter", "audit"),
    "Reference": (".fidelity.peft_model", "Reference"),
    "reference_run": (".fidelity.peft_model", "reference_run"),
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen_local.convert' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
