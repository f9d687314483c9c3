"""The command line as a newcomer meets it: range-checked options, one-line errors, defaults in
--help, quiet output, and a demo whose closing hint is the README's main job."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qwen_local

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("argv, option", [
    (["convert", "--adapter", "A", "--min-agreement", "5"], "--min-agreement"),
    (["convert", "--adapter", "A", "--min-agreement", "nan"], "--min-agreement"),
    (["convert", "--adapter", "A", "--threads", "-2"], "--threads"),
    (["serve", "--model", "M", "--port", "70000"], "--port"),
    (["serve", "--model", "M", "--timeout", "0"], "--timeout"),
    (["serve", "--model", "M", "--max-body", "10"], "--max-body"),
    (["serve", "--model", "M", "--slots", "0"], "--slots"),
    (["serve", "--model", "M", "--ctx", "16"], "--ctx"),
    (["serve", "--model", "M", "--max-queue", "0"], "--max-queue"),
    (["serve", "--model", "M", "--max-batch", "0"], "--max-batch"),
    (["serve", "--model", "M", "--gpu-layers", "-5"], "--gpu-layers"),
    (["eval", "--model", "M", "--min-agreement", "1.5"], "--min-agreement"),
    (["eval", "--model", "M", "--gen-prompts", "-1"], "--gen-prompts"),
    (["eval", "--model", "M", "--limit", "0"], "--limit"),
    (["bench", "--model", "M", "--reps", "0"], "--reps"),
    (["bench", "--model", "M", "--temperature", "9"], "--temperature"),
    (["bench", "make-model", "--out", "O", "--adapter-rank", "-1"], "--adapter-rank"),
    (["bench", "convert", "--base", "B", "--adapter", "A", "--threads", "0"], "--threads"),
    (["demo", "--port", "70000"], "--port"),
    (["demo", "--threads", "0"], "--threads"),
])
def test_out_of_range_options_fail_in_one_line_before_any_work(argv, option, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be created: no model folder, no output
    assert qwen_local.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"qwen-local {argv[0]}: error: argument {option}"), lines[0]
    assert "must be" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_missing_required_option_is_one_line(capsys):
    assert qwen_local.main(["serve"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model" in err[0]


@pytest.mark.parametrize("command, shown", [
    ("serve", ["(default: 8000)", "(default: 8192)", "(default: 1048576)", "(default: 60.0)"]),
    ("convert", ["default auto:", "(default 0.99)", "with --no-verify the default is q4_k_m"]),
    ("eval", ["(default: 4)"]),
    ("demo", ["(default: q8_0)", "(default: models/demo)"]),
])
def test_help_shows_defaults(command, shown, capsys):
    with pytest.raises(SystemExit) as e:
        qwen_local.main([command, "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    for s in shown:
        assert s in out, (s, out)


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from qwen_local.runtime.options import progress_enabled

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert progress_enabled(True) is True and progress_enabled(False) is False
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file or a pipe
    assert progress_enabled(None) is False
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert progress_enabled(None) is True


def _serve_stderr(model, *extra):
    p = subprocess.run([sys.executable, "-m", "qwen_local", "serve", "--model", str(model), *extra],
                       capture_output=True, text=True, cwd=REPO, timeout=120,
                       env={k: v for k, v in os.environ.items() if k != "QWEN_LOCAL_LLAMA_LOG"})
    assert p.returncode == 2 and p.stdout == ""
    return p.stderr.strip().splitlines()


@pytest.fixture
def foreign_gguf(tmp_path):
    """A whole GGUF header of an architecture llama.cpp does not know: only llama.cpp refuses it."""
    import gguf

    path = tmp_path / "foreign.gguf"
    w = gguf.GGUFWriter(str(path), "no-such-arch")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.mark.slow
def test_serve_on_a_file_that_is_not_a_gguf_prints_one_line(foreign_gguf):
    """A file that is not a GGUF is refused before llama.cpp sees it; one llama.cpp refuses keeps
    llama.cpp's own log off at load time: only our line, quoting llama.cpp's reason."""
    pytest.importorskip("llama_cpp")
    assert _serve_stderr("README.md") == ["qwen-local serve: error: cannot load README.md: "
                                          "README.md is not a GGUF file"]
    lines = _serve_stderr(foreign_gguf)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"qwen-local serve: error: llama.cpp could not load {foreign_gguf}")
    assert "no-such-arch" in lines[0]


def test_verbose_brings_llama_cpps_own_log_back(foreign_gguf):
    pytest.importorskip("llama_cpp")
    lines = _serve_stderr(foreign_gguf, "-v")
    assert len(lines) > 1, lines
    assert lines[-1].startswith(f"qwen-local serve: error: llama.cpp could not load {foreign_gguf}")


def test_demo_closing_hint_is_the_readme_main_job():
    from qwen_local.convert.dev.demo import WARNING

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    main_job = readme.split("## The main job", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    hint = [ln.strip() for ln in WARNING.splitlines() if ln.strip().startswith("qwen-local ")]
    assert hint == [ln.strip() for ln in main_job.strip().splitlines()]


def test_readme_blocks_are_what_ci_runs():
    """.ci/run runs the README's two marked blocks; both exist and install what the tests need."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = {}
    for name in ("install", "test"):
        after = readme.split(f"<!-- ci:{name} -->", 1)[1]
        blocks[name] = after.split("```bash", 1)[1].split("```", 1)[0]
    assert "python3 -m venv .venv" in blocks["install"]
    assert re.search(r"pip install torch==[\d.]+ --index-url https://download.pytorch.org/whl/cpu",
                     blocks["install"])
    assert 'pip install -e ".[test]"' in blocks["test"] and "python -m pytest -q" in blocks["test"]
    ci = (REPO / ".ci" / "run").read_text()
    assert "ci:$1" in ci and "rm -rf .venv" in ci and "python3 -m venv .venv" in ci
