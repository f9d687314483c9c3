"""The conversion's files beside the output: a hidden temp folder, locked for the life of the
conversion and removed on any error, Ctrl-C, SIGTERM or SIGHUP; the folders of conversions killed
with SIGKILL, removed by the next conversion to the same output (never one whose lock a running
conversion holds); and the publication with os.replace, so a reader never sees a partial file.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from qwen_local.runtime.errors import UserError


def os_error(e: OSError, what: str) -> UserError:
    if e.errno == errno.ENOSPC:
        return UserError(f"disk full while {what}; nothing was written")
    return UserError(f"{what} failed: {e.strerror or e}")


def make_temp(out: Path) -> tuple[Path, int]:
    """(the hidden temp folder beside out, the fd holding its lock)."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise os_error(e, f"creating a temp folder in {out.parent}") from None
    try:
        return tmp, _lock_temp(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise os_error(e, f"creating a temp folder in {out.parent}") from None


def lora_name(out: Path) -> Path:
    """The LoRA file beside a base file `out`: X.gguf -> X.lora.gguf."""
    return out.with_name(out.name[:-len(".gguf")] + ".lora.gguf" if out.name.endswith(".gguf")
                         else out.name + ".lora.gguf")


def publish(report: dict, tmp: Path, gguf_tmp: Path, out: Path, lora_tmp: Path | None = None) -> None:
    """The sidecar, then the files into place with os.replace: a reader never sees a partial file,
    and a base file never appears before the LoRA file it names."""
    side_tmp = tmp / "model.gguf.json"
    try:
        side_tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if lora_tmp is not None:
            os.replace(lora_tmp, lora_name(out))
        os.replace(gguf_tmp, out)
        os.replace(side_tmp, str(out) + ".json")
    except OSError as e:
        raise os_error(e, f"publishing {out}") from None


LOCK_NAME = "lock"


def _lock_temp(tmp: Path) -> int:
    """Hold an exclusive flock on tmp/lock for the life of the conversion (the fd stays open). The
    kernel drops it when the process dies, even by SIGKILL, which is how the next conversion tells a
    leftover folder from one in use; the pid inside is for people."""
    import fcntl

    fd = os.open(tmp / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a folder this fresh cannot be locked by anyone
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def remove_stale_temps(out: Path, min_age_unlocked: float = 600.0) -> list[Path]:
    """Remove the temp folders of conversions to `out` that were killed (SIGKILL, power loss).

    A folder is stale when nobody holds the flock on its lock file. A folder without a lock file
    (a version before the lock, or a conversion killed between mkdtemp and the lock) is removed only
    when older than `min_age_unlocked` seconds: a live conversion creates its lock at once.
    """
    import fcntl

    removed = []
    for d in Path(out).parent.glob(f".{Path(out).name}.*.tmp"):
        if not d.is_dir() or d.is_symlink():
            continue
        try:
            fd = os.open(d / LOCK_NAME, os.O_RDWR)
        except FileNotFoundError:
            try:
                if time.time() - d.stat().st_mtime < min_age_unlocked:
                    continue
            except OSError:
                continue
            fd = None
        except OSError:
            continue
        try:
            if fd is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # held: a conversion still running
                    continue
            shutil.rmtree(d, ignore_errors=True)
            if not d.exists():
                removed.append(d)
        finally:
            if fd is not None:
                os.close(fd)
    return removed
