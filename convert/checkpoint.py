"""Reading checkpoints without loading them: a local folder or a Hugging Face hub id, JSON configs,
safetensors headers (names, dtypes, shapes), the base's shard files, and tensor equality read in row
blocks. Every problem is a one-line UserError naming the file.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qwen_local.runtime.errors import UserError


def _looks_like_hub_id(ref: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", ref)) and not ref.startswith((".", "/", "~"))


def resolve(ref: str, what: str, allow_patterns: list[str]) -> Path:
    """A local folder, or a hub repo fetched/cached by huggingface_hub (honours HF_HOME, HF_HUB_OFFLINE)."""
    path = Path(os.path.expanduser(ref))
    if path.is_dir():
        return path
    if path.exists():
        raise UserError(f"{what} {ref!r} is a file; expected a folder or a Hugging Face hub id")
    if not _looks_like_hub_id(ref):
        raise UserError(f"{what} {ref!r} not found (neither a folder nor a hub id like 'Qwen/Qwen2.5-3B-Instruct')")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError as e:  # pragma: no cover - huggingface_hub is a dependency
        raise UserError(f"{what} {ref!r} is not a local folder and huggingface_hub is missing: {e}")
    try:
        return Path(snapshot_download(ref, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
        raise UserError(f"{what} {ref!r} is not in the local Hugging Face cache"
                        + (" and HF_HUB_OFFLINE is set" if offline else " and the hub cannot be reached")
                        + f" (cache: {os.environ.get('HF_HOME', '~/.cache/huggingface')})") from None
    except RepositoryNotFoundError:
        raise UserError(f"{what} {ref!r}: no such repository on the Hugging Face hub (or it is private)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise UserError(f"{what} {ref!r}: download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path.name} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}): {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} must hold a JSON object: {path}")
    return data


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype, shape) of a safetensors file; a truncated or corrupt file is a UserError."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for k in f.keys():
                sl = f.get_slice(k)
                out[k] = (sl.get_dtype(), tuple(sl.get_shape()))
            return out
    except Exception as e:  # SafetensorError, OSError: message is all the user needs
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"{path.name} is unreadable (truncated or corrupt?): {msg}: {path}") from None


def base_shards(base_dir: Path) -> dict[str, Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index, "safetensors index").get("weight_map") or {}
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in base_dir.glob("*.safetensors"))
    if not files:
        bins = list(base_dir.glob("*.bin")) + list(base_dir.glob("*.pt"))
        raise UserError(f"base {base_dir} has no .safetensors weights"
                        + (" (only PyTorch .bin files; re-save it with safe_serialization=True)" if bins else ""))
    shards = {}
    for fname in files:
        p = base_dir / fname
        if not p.is_file():
            raise UserError(f"base shard missing: {p}")
        shards[fname] = p
    return shards


def same_tensor(file_a: Path, key_a: str, file_b: Path, key_b: str, rows: int = 8192) -> bool:
    """Bitwise-equal values (after upcasting), compared in row blocks to keep memory flat."""
    import torch
    from safetensors import safe_open

    with safe_open(str(file_a), framework="pt") as fa, safe_open(str(file_b), framework="pt") as fb:
        sa, sb = fa.get_slice(key_a), fb.get_slice(key_b)
        if tuple(sa.get_shape()) != tuple(sb.get_shape()):
            return False
        n = sa.get_shape()[0]
        for r0 in range(0, n, rows):
            if not torch.equal(sa[r0:r0 + rows].float(), sb[r0:r0 + rows].float()):
                return False
    return True
