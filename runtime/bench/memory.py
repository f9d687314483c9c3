"""Memory of a process as the kernel counts it (/proc/<pid>/status), psutil where there is no /proc."""
from __future__ import annotations

from pathlib import Path

GB = 1024 ** 3  # the tables print GiB (the kernel counts in KiB)
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmPeak", "VmSwap")


def parse_status(text: str) -> dict[str, int]:
    """The memory lines of a /proc/<pid>/status text, in bytes ("VmRSS:  123 kB" -> 125952)."""
    out = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        if key in STATUS_KEYS:
            parts = rest.split()
            if not parts:
                continue
            n = int(parts[0])
            unit = parts[1].lower() if len(parts) > 1 else "b"
            out[key] = n * {"b": 1, "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}[unit]
    return out


def read_status(pid: int | str = "self") -> dict[str, int]:
    try:
        return parse_status(Path(f"/proc/{pid}/status").read_text())
    except OSError:
        return {}


def memory_snapshot() -> dict:
    """This process's memory now: rss, anonymous rss, file-backed rss, peak rss (bytes)."""
    st = read_status()
    snap = {"rss": st.get("VmRSS"), "rss_anon": st.get("RssAnon"), "rss_file": st.get("RssFile"),
            "peak_rss": st.get("VmHWM")}
    if snap["rss"] is None:  # not Linux: psutil gives rss, and uss as the closest to anonymous memory
        import psutil
        info = psutil.Process().memory_full_info()
        snap.update(rss=info.rss, rss_anon=getattr(info, "uss", None), rss_file=None,
                    peak_rss=getattr(info, "peak_wset", None))
    return snap
