"""Conversion under faults: SIGTERM/SIGHUP, SIGKILL leftovers, a full disk.

Each test runs the real `qwen-local convert` as a process (tiny base + LoRA, --no-verify, q6_k through
the f16 intermediate; q8_0 would go through f32) and catches it with SIGSTOP at a chosen stage: the moment a file appears in its
hidden temp folder. The stop makes the stage deterministic; what happens next is the real code path.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def convert_cmd(adapter, base, out) -> list[str]:
    return [sys.executable, "-m", "qwen_local", "convert", "--adapter", str(adapter), "--base", str(base),
            "--quant", "q6_k", "--no-verify", "--no-progress", "--threads", "1", "--out", str(out)]


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.*.tmp"))


def start_and_catch(cmd, out: Path, stage: str, limit: float = 180):
    """Start a conversion and SIGSTOP it as soon as its temp folder holds `stage`."""
    # SIGHUP at its default, as in a user's terminal: a test run under nohup (or a CI runner that
    # ignores SIGHUP) passes SIG_IGN on, and the command rightly leaves an ignored signal ignored
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    known = set(temps(out))
    end = time.monotonic() + limit
    while time.monotonic() < end:
        for d in set(temps(out)) - known:
            if (d / stage).exists():
                proc.send_signal(signal.SIGSTOP)
                return proc, d
        if proc.poll() is not None:
            raise AssertionError(f"conversion ended before {stage} (rc {proc.returncode}): "
                                 f"{proc.stderr.read().decode()[-1500:]}")
        time.sleep(0.003)
    proc.kill()
    raise AssertionError(f"{stage} never appeared")


def finish(proc, limit: float = 120) -> tuple[int, str]:
    """Resume a stopped conversion and wait for it: (exit code, stderr); stdout in proc.out."""
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=limit)
    proc.out = out.decode()
    return proc.returncode, err.decode()


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_sigterm_and_sighup_leave_nothing(tiny_base, tiny_adapter, tmp_path, sig, code):
    out = tmp_path / "m.gguf"
    proc, d = start_and_catch(convert_cmd(tiny_adapter, tiny_base, out), out, "model-f16.gguf")
    proc.send_signal(sig)  # delivered on SIGCONT, in the middle of writing the f16 intermediate
    rc, err = finish(proc)
    assert rc == code, err
    assert f"{signal.Signals(sig).name}, stopped cleanly" in err
    assert not d.exists() and temps(out) == [] and not out.exists()
    assert not Path(str(out) + ".json").exists()


@pytest.mark.slow
def test_sigkill_leftover_is_cleaned_next_time_but_not_a_running_one(tiny_base, tiny_adapter, tmp_path):
    from qwen_local.convert.pipeline import run

    out = tmp_path / "m.gguf"
    cmd = convert_cmd(tiny_adapter, tiny_base, out)
    killed, dead_dir = start_and_catch(cmd, out, "model-f16.gguf")
    killed.kill()  # SIGKILL: no handler runs, the folder stays
    killed.communicate(timeout=30)
    assert dead_dir.exists() and (dead_dir / "lock").exists()

    # the next conversion removes the leftover first thing; it is then stopped with its lock held
    running, live_dir = start_and_catch(cmd, out, "model-f16.gguf")
    try:
        assert not dead_dir.exists(), "the SIGKILL leftover was not removed"
        assert str(running.pid) == (live_dir / "lock").read_text().strip()
        # a third conversion to the same output, while the second is still running
        logs: list[str] = []
        report = run(str(tiny_adapter), base=str(tiny_base), quant="q8_0", out=out, verify=False,
                     threads=1, log=logs.append, progress=False)
        assert Path(report["output"]) == out and out.exists()
        assert live_dir.exists(), "the folder of a running conversion was removed"
        assert not any("removed" in line for line in logs), logs
    finally:
        rc, err = finish(running)
    assert rc == 0, err  # the stopped conversion resumes and finishes normally
    assert f"removed {dead_dir.name}, left behind by a conversion that was killed" in running.out
    assert temps(out) == []


@pytest.fixture
def small_fs(tmp_path):
    """A 300 MB tmpfs (needs root and mount rights; skipped otherwise)."""
    mnt = tmp_path / "fs"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mnt)],
                       capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def fill(fs: Path) -> None:
    """Write until the file system is full (bounded by its size), in shrinking blocks so that
    not even a page is left."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["model-f16.gguf", "model.gguf"])
def test_full_disk_leaves_nothing(tiny_base, tiny_adapter, small_fs, stage):
    """The disk fills up while the f16 intermediate is written (model-f16.gguf) or while
    llama.cpp quantizes (model.gguf): one error line, exit 2, nothing partial left."""
    out = small_fs / "m.gguf"
    proc, d = start_and_catch(convert_cmd(tiny_adapter, tiny_base, out), out, stage)
    fill(small_fs)
    rc, err = finish(proc)
    assert rc == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("qwen-local convert: error:"), err
    assert "disk full" in lines[0], err
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"]


@pytest.mark.slow
def test_auto_makes_its_f32_intermediate_only_when_the_disk_holds_it(tiny_base, tiny_adapter,
                                                                      small_fs):
    """--quant auto's f32 for q8_0 is merged mid-search; on a disk without room for it (and a
    q8_0 candidate beside it) the search goes on from the f16 and says so, writing nothing."""
    from qwen_local.convert import adapter
    from qwen_local.convert.fidelity.calibration import float_type
    from qwen_local.convert.verified import Verified
    from qwen_local.runtime.profile import load_profile

    plan = adapter.audit(str(tiny_adapter), str(tiny_base))
    seen, timings = [], {}
    steps = Verified(plan, load_profile(None), 1, seen.append, False, timings)
    f32 = small_fs / "model-f32.gguf"
    with open(small_fs / "filler", "wb") as f:  # leaves ~100 MB: the tiny f32 alone is ~160 MB
        for _ in range(200):
            f.write(b"\0" * (1 << 20))
    assert steps.f32_intermediate(f32) is None
    assert seen[-1].startswith("not enough free disk for an f32 intermediate"), seen
    assert sorted(p.name for p in small_fs.iterdir()) == ["filler"] and not timings
    (small_fs / "filler").unlink()
    assert steps.f32_intermediate(f32) == f32 and float_type(f32) == "f32"
    assert "merge_export_f32" in timings
