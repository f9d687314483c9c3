"""Serving a converted GGUF: the lower layer (llama.cpp, FastAPI; no torch, never convert/).

    import runtime
    engine = runtime.Engine("models/epoch_2_final-q4_k_m.gguf")
    engine.intent("áo sơ mi trắng size M còn không shop").intent     # -> "fashion"
    app = runtime.create_app(engine)                                   # the FastAPI app `serve` runs
    row = runtime.measure_gguf("model.gguf", runtime.packaged("heldout"))  # accuracy, macro F1, ...

The names are imported on first use, so `import runtime` stays cheap (the CLI imports it for its
errors) and pulls in llama.cpp or FastAPI only when they are asked for.
"""
from __future__ import annotations

import importlib

from runtime.errors import UserError, __version__

_LAZY = {
    "Engine": "runtime.engine",
    "ServeSettings": "runtime.serve.settings",
    "create_app": "runtime.serve.app",
    "serving": "runtime.serve.runner",
    "Profile": "runtime.profile",
    "load_profile": "runtime.profile",
    "Dataset": "runtime.dataset",
    "load_data": "runtime.dataset",
    "packaged": "runtime.dataset",
    "measure_gguf": "runtime.evaluate",
}

__all__ = ["UserError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
