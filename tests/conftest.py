"""Session-wide fixtures: the real Qwen2.5 tokenizer, tiny random Qwen2 bases, LoRA adapters, a GGUF.

Everything is built offline, once per test session, with real parts: the tokenizer from the
`dashscope` wheel's BPE ranks, bases with transformers, adapters with peft, the GGUF with our own
converter (convert.pipeline.run). Shapes are tiny (hidden 256, 2 layers) but keep the real 151,936-row
vocabulary, so tokenizer and embedding paths are the real ones.

Fixture names (import-free: pytest finds them here):
- qwen_tokenizer_dir: folder with tokenizer.json / tokenizer_config.json of Qwen2.5
- tiny_base:          tied-embedding tiny Qwen2ForCausalLM folder (like Qwen2.5-3B: tie_word_embeddings=true)
- tiny_base_untied:   the same with separate lm_head
- tiny_adapter:       PEFT LoRA (r=8, alpha=16, all seven projections, real non-zero A and B) on tiny_base
- tiny_gguf:          Path of a q8_0 GGUF converted from tiny_base + tiny_adapter (verify off)
- trained_adapter:    a real LoRA intent classifier trained on tiny_base (convert.dev.synthetic.
                      train_intent_adapter, ~30 s); its intent_training.json holds the held-out split
- trained_gguf:       Path of a q8_0 GGUF converted from tiny_base + trained_adapter (verify off)
- trained_f16:        the same as f16 (the task reference the gate uses)
- make_adapter:       factory: make_adapter(name, base=None, **LoraConfig kwargs) -> adapter folder
- engine:             a runtime Engine over tiny_gguf (2 threads, 4 slots), one per test module
- openai_server:      llama-cpp-python's OpenAI-compatible server over tiny_gguf, on 127.0.0.1 (its /v1 URL)
- small_calib:        a calibration JSONL of three packaged lines, one per label
- out_dir:            an empty output folder (a failed conversion must leave it empty)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def qwen_tokenizer_dir(tmp_path_factory) -> Path:
    from qwen_local.convert.dev.synthetic import build_qwen_tokenizer

    d = tmp_path_factory.mktemp("qwen-tokenizer")
    build_qwen_tokenizer(d)
    return d


def _quiet():
    warnings.filterwarnings("ignore")
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    from qwen_local.convert.dev.synthetic import make_base

    _quiet()
    return make_base(tmp_path_factory.mktemp("tiny-base") / "base", qwen_tokenizer_dir, "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_base_untied(tmp_path_factory, qwen_tokenizer_dir) -> Path:
    from qwen_local.convert.dev.synthetic import make_base

    _quiet()
    return make_base(tmp_path_factory.mktemp("tiny-base-untied") / "base", qwen_tokenizer_dir, "tiny",
                     seed=3, tie_word_embeddings=False)


@pytest.fixture(scope="session")
def make_adapter(tmp_path_factory, tiny_base):
    """Factory for PEFT adapters on a tiny base, cached by name for the session."""
    from qwen_local.convert.dev import synthetic

    root = tmp_path_factory.mktemp("adapters")
    made: dict[str, Path] = {}

    def make(name: str, base: Path | None = None, **kwargs) -> Path:
        if name not in made:
            _quiet()
            made[name] = synthetic.make_adapter(base or tiny_base, root / name, **kwargs)
        return made[name]

    return make


@pytest.fixture(scope="session")
def tiny_adapter(make_adapter) -> Path:
    return make_adapter("tiny-lora", r=8, alpha=16)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory, tiny_base, tiny_adapter) -> Path:
    """A q8_0 GGUF made by the converter from tiny_base + tiny_adapter (no verification), session-cached."""
    return _q8_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-q8_0.gguf", tiny_base, tiny_adapter)


@pytest.fixture(scope="session")
def trained_adapter(tmp_path_factory, tiny_base) -> Path:
    """A peaked intent classifier: LoRA trained on the packaged data set's 85% training split."""
    from qwen_local.convert.dev.synthetic import train_intent_adapter

    _quiet()
    # one thread: on a shared 2-core box the tiny matmuls run several times faster than with two
    return train_intent_adapter(tiny_base, tmp_path_factory.mktemp("trained") / "intent-lora",
                                seed=0, threads=1)


@pytest.fixture(scope="session")
def trained_gguf(tmp_path_factory, tiny_base, trained_adapter) -> Path:
    return _q8_gguf(tmp_path_factory.mktemp("trained-gguf") / "intent-q8_0.gguf", tiny_base,
                    trained_adapter)


@pytest.fixture(scope="session")
def trained_f16(tmp_path_factory, tiny_base, trained_adapter) -> Path:
    """The trained classifier's f16 GGUF: the conversion's intermediate, the task reference."""
    return _q8_gguf(tmp_path_factory.mktemp("trained-f16") / "intent-f16.gguf", tiny_base,
                    trained_adapter, quant="f16")


def _q8_gguf(out: Path, base: Path, adapter: Path, quant: str = "q8_0") -> Path:
    """adapter + base through the real converter (q8_0 unless told), without verification
    (fixtures only)."""
    pytest.importorskip("llama_cpp")
    from qwen_local.convert.pipeline import run

    run(str(adapter), base=str(base), quant=quant, out=out, verify=False,
        threads=min(2, os.cpu_count() or 1), log=lambda s: None, progress=False)
    return out


@pytest.fixture(scope="module")
def engine(tiny_gguf):
    from qwen_local.runtime.engine import Engine

    e = Engine(tiny_gguf, threads=2, n_ctx=4096, slots=4)  # the profile stored by convert
    yield e
    e.close()


@pytest.fixture(scope="module")
def openai_server(tiny_gguf):
    """A real OpenAI-compatible server on loopback: llama-cpp-python's own, over the tiny GGUF."""
    pytest.importorskip("llama_cpp.server.app", reason="needs llama-cpp-python[server]")
    import httpx

    from qwen_local.runtime.serve.runner import free_port

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(tiny_gguf), "--host", "127.0.0.1",
         "--port", str(port), "--n_ctx", "2048", "--n_threads", "1", "--verbose", "False"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        t0 = time.time()
        while True:
            if proc.poll() is not None:
                raise RuntimeError("llama_cpp.server exited: " + proc.stderr.read().decode()[-2000:])
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() - t0 > 60:
                raise RuntimeError("llama_cpp.server did not start in 60 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def small_calib(tmp_path_factory) -> Path:
    """Three labelled lines of the packaged calibration set (one per label)."""
    from qwen_local.runtime.dataset import default_data_path

    lines = default_data_path().read_text(encoding="utf-8").splitlines()
    picked, seen = [], set()
    for ln in lines:
        lab = json.loads(ln).get("label")
        if lab not in seen:
            seen.add(lab)
            picked.append(ln)
    p = tmp_path_factory.mktemp("calib") / "calib.jsonl"
    p.write_text("\n".join(picked) + "\n", encoding="utf-8")
    return p


@pytest.fixture
def out_dir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def reference(tiny_base, tiny_adapter):
    from qwen_local.convert.fidelity.peft_model import Reference

    return Reference(tiny_base, tiny_adapter, threads=2)


def _float_gguf(tmp_path_factory, base, adapter, quant: str):
    from qwen_local.convert.pipeline import run

    out = tmp_path_factory.mktemp(f"fid-{quant}") / f"tiny-{quant}.gguf"
    run(str(adapter), base=str(base), quant=quant, out=out, verify=False,
        threads=2, log=lambda s: None, progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_f16(tmp_path_factory, tiny_base, tiny_adapter):
    return _float_gguf(tmp_path_factory, tiny_base, tiny_adapter, "f16")


@pytest.fixture(scope="session")
def tiny_f32(tmp_path_factory, tiny_base, tiny_adapter):
    return _float_gguf(tmp_path_factory, tiny_base, tiny_adapter, "f32")
