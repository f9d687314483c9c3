"""`qwen-local demo` from its cache: serve the converted tiny model and ask over HTTP."""
from __future__ import annotations

import re
import shutil

import pytest

pytest.importorskip("llama_cpp")


@pytest.mark.slow
def test_demo_serves_cached_model_and_says_it_is_random(tiny_gguf, tmp_path, capsys):
    from qwen_local.convert.dev import demo

    shutil.copy(tiny_gguf, tmp_path / "demo-tiny-q8_0.gguf")
    sidecar = tiny_gguf.with_name(tiny_gguf.name + ".json")
    if sidecar.exists():
        shutil.copy(sidecar, tmp_path / "demo-tiny-q8_0.gguf.json")
    else:
        (tmp_path / "demo-tiny-q8_0.gguf.json").write_text("{}")
    (tmp_path / "adapter").mkdir()  # what training records next to the adapter
    (tmp_path / "adapter" / "intent_training.json").write_text('{"heldout": {"n": 84, "accuracy": 0.6428}}')
    assert demo.main(["--dir", str(tmp_path), "--threads", "2"]) == 0
    out = capsys.readouterr().out
    assert "cached demo model" in out
    assert "weak classifier (64% right on 84 held-out queries)" in out  # the measured figure, no claim
    assert re.search(r"demo took \d+ s here: model \d+ s, serve and ask \d+ s", out), out
    assert '"intent":' in out and '"message":' in out and '"source": "local"' in out
    assert "RANDOM weights" in out and "qwen-local convert --adapter" in out
