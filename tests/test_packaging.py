"""The built wheel: one import name (`qwen_local`), every package and data file of the repository,
and an install that works beside a user's own `runtime/` and `convert/` folders."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"qwen_local": "qwen_local", "runtime": "qwen_local/runtime", "convert": "qwen_local/convert"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    import shutil

    dist = tmp_path_factory.mktemp("dist")
    # built from a copy: setuptools builds in the source tree, and the checkout stays clean
    src = tmp_path_factory.mktemp("src") / "qwen-local"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "models", "*.egg-info", "__pycache__", ".pytest_cache"))
    # no build isolation: setuptools is in this environment, and the test needs no network
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "-q", "-w", str(dist), str(src)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return next(dist.glob("qwen_local-*.whl"))


def test_the_wheel_holds_one_import_name_and_every_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "qwen_local"}
    for folder, installed in FOLDERS.items():  # a new subpackage cannot be left out
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.relative_to(ROOT / folder).as_posix()
            assert f"{installed}/{rel}" in names, rel
    for data in ("runtime/data/intent_vi.jsonl", "runtime/data/profiles/seed.json",
                 "runtime/serve/page/index.html"):
        assert f"qwen_local/{data}" in names, data


@pytest.mark.slow
def test_installed_beside_folders_named_runtime_and_convert(wheel, tmp_path):
    """A fresh venv with the wheel, run from a folder that holds its own runtime/ and convert/
    packages: the project imports as qwen_local.*, the user's folders stay theirs, and
    `qwen-local --help` works."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()"
                                "['purelib'])"], capture_output=True, text=True,
                               check=True).stdout.strip())
    # the dependencies come from this environment's site-packages as a plain path: its .pth
    # files (this checkout's editable install among them) are not run from there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    user = tmp_path / "user-project"
    for name in ("runtime", "convert"):
        (user / name).mkdir(parents=True)
        (user / name / "__init__.py").write_text(f"WHOSE = 'the user {name}'\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    code = ("import runtime, convert, qwen_local.runtime, qwen_local.convert, qwen_local\n"
            "assert runtime.WHOSE == 'the user runtime' and convert.WHOSE == 'the user convert'\n"
            f"assert qwen_local.runtime.__file__.startswith({str(site)!r}), qwen_local.runtime.__file__\n"
            "from qwen_local.runtime.dataset import packaged\n"
            "assert len(packaged('all', ['fashion', 'chitchat', 'off_topic'])) == 557\n"
            "print(qwen_local.__version__)\n")
    done = subprocess.run([str(py), "-c", code], cwd=user, capture_output=True, text=True, env=env,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    for argv in (["--help"], ["convert", "--help"], ["serve", "--help"]):
        done = subprocess.run([str(venv / "bin" / "qwen-local"), *argv], cwd=user,
                              capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0 and "usage: qwen-local" in done.stdout, (argv, done.stderr)
