"""runtime.bench.memory: /proc/<pid>/status parsed to bytes, and this process's memory."""
from __future__ import annotations

import sys

import pytest

from qwen_local.runtime.bench import memory as B


STATUS = """Name:\tpython3
Umask:\t0022
State:\tS (sleeping)
Pid:\t4242
VmPeak:\t 4000000 kB
VmSize:\t 3900000 kB
VmHWM:\t 3500000 kB
VmRSS:\t 3300000 kB
RssAnon:\t 1440000 kB
RssFile:\t 1850000 kB
RssShmem:\t   10000 kB
VmSwap:\t       0 kB
Threads:\t5
"""


def test_parse_status():
    st = B.parse_status(STATUS)
    assert st["VmRSS"] == 3300000 * 1024
    assert st["VmHWM"] == 3500000 * 1024
    assert st["RssAnon"] == 1440000 * 1024
    assert st["RssFile"] == 1850000 * 1024
    assert st["VmSwap"] == 0
    assert "Threads" not in st and "Pid" not in st
    assert B.parse_status("Name:\tzombie\nState:\tZ\n") == {}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc")
def test_memory_snapshot_of_this_process():
    snap = B.memory_snapshot()
    assert snap["rss"] > 0 and 0 < snap["rss_anon"] <= snap["rss"] <= snap["peak_rss"]
