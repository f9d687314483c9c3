"""Serving a converted GGUF: the lower layer (llama.cpp, FastAPI; no torch, never convert/).

    from qwen_local.runtime import Engine, create_app, measure_gguf, packaged
    engine = Engine("models/epoch_2_final-q4_k_m.gguf")
    engine.intent("áo sơ mi trắng size M còn không shop").intent     # -> "fashion"
    app = create_app(engine)                                           # the FastAPI app `serve` runs
    row = measure_gguf("model.gguf", packaged("heldout"))  # accuracy, macro F1, ...

The names are imported on first use, so importing this package stays cheap (the CLI imports it for its
errors) and pulls in llama.cpp or FastAPI only when they are asked for.
"""
from __future__ import annotations

import importlib

from qwen_local.runtime.errors import UserError, __version__

_LAZY = {
    "Engine": ".engine",
    "ServeSettings": ".serve.settings",
    "create_app": ".serve.app",
    "serving": ".serve.runner",
    "Profile": ".profile",
    "load_profile": ".profile",
    "Dataset": ".dataset",
    "load_data": ".dataset",
    "packaged": ".dataset",
    "measure_gguf": ".measure",
}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qwen_local.runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
