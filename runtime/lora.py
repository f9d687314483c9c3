"""The LoRA file a base GGUF is served with (convert keeps a fine-tune's LoRA apart from a quantized
base): the base names it in its metadata, and it is found and checked here before llama.cpp
applies it (runtime.llama.Model)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from qwen_local.runtime.errors import UserError


class LoraError(UserError, RuntimeError):
    """A base file's LoRA file is missing or not the one it was converted with."""


# {"file", "bytes", "sha256"}: the LoRA file a base file is served with, kept next to it
LORA_KEY = "qwen_local.lora_companion"


def sha256(path: Path) -> str:
    """A file's sha256, read in 1 MiB chunks (GGUFs are gigabytes)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def companion(model_path: str | Path, meta: str | None) -> Path | None:
    """The LoRA file a base GGUF names in its metadata (LORA_KEY), checked: it must lie next to the
    base, whole and unchanged (size and sha256), since a base served without its LoRA, or with
    another one, is another model."""
    if not meta:
        return None
    try:
        want = json.loads(meta)
        path = Path(model_path).parent / Path(want["file"]).name
    except (ValueError, KeyError, TypeError):
        raise LoraError(f"{model_path}: unreadable {LORA_KEY} metadata") from None
    if not path.is_file():
        raise LoraError(f"{model_path} is served with the LoRA file {path.name}, which is not next "
                        f"to it (keep the two files together)")
    if path.stat().st_size != want.get("bytes") or sha256(path) != want.get("sha256"):
        raise LoraError(f"{path} is not the LoRA file {Path(model_path).name} was converted "
                        f"with (its size or sha256 differs)")
    return path
