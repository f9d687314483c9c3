"""Quantization (convert.quantize): every type loads and runs in llama.cpp; per-tensor overrides
and an importance matrix reach the file."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import qwen_local  # noqa: E402
from qwen_local.convert.pipeline import run  # noqa: E402
from qwen_local.convert.quantize import QTYPES  # noqa: E402
from convert_checks import QUIET, THREADS, gguf_fields  # noqa: E402


# f32/f16: parity tests (test_verify.py, test_export.py); q8_0: tiny_gguf; q4_k_m (the default): the CLI test (test_pipeline.py)
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["q5_k_m", "q6_k", "bf16"])
def test_quant_type_loads_and_runs(quant, tiny_base, tiny_adapter, tmp_path):
    from qwen_local.convert.fidelity.parity import GGUFRunner

    out = tmp_path / f"m-{quant}.gguf"
    report = run(str(tiny_adapter), base=str(tiny_base), quant=quant, out=out, verify=False, **QUIET)
    assert report["quant"] == quant and report["bytes"] == out.stat().st_size
    assert report["intermediate"] == (None if quant == "bf16" else "f16")
    f = gguf_fields(out)
    assert f["general.file_type"] == QTYPES[quant] and f["qwen_local.quant"] == quant
    runner = GGUFRunner(out, 64, THREADS)
    try:
        ids = runner.tokenize("Xin chào, mình cần tư vấn áo khoác.")
        logits = runner.logits(ids)
    finally:
        runner.close()
    assert logits.shape == (len(ids), 151936) and np.isfinite(logits).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, out.name + ".json"])


@pytest.mark.slow
def test_quantize_overrides_and_imatrix(tiny_base, tiny_adapter, tmp_path):
    """The hooks the mixed candidates build on: per-tensor type overrides and an importance matrix."""
    from qwen_local.convert.quantize import quantize

    f16 = tmp_path / "m-f16.gguf"
    run(str(tiny_adapter), base=str(tiny_base), quant="f16", out=f16, verify=False, **QUIET)
    out = tmp_path / "m-q4.gguf"
    imatrix = {f"blk.{i}.attn_q.weight": np.linspace(0.5, 2.0, 256, dtype=np.float32) for i in range(2)}
    quantize(f16, out, "q4_k_m", THREADS, imatrix=imatrix, tensor_types={r"blk\.1\.ffn_up": "q8_0"})
    t = gguf_fields(out)["_tensors"]
    assert t["blk.1.ffn_up.weight"] == "Q8_0" and t["blk.0.ffn_up.weight"] != "Q8_0"
    assert t["blk.0.attn_q.weight"] in ("Q4_K", "Q5_K", "Q6_K")
    with pytest.raises(qwen_local.UserError, match="unknown quant type"):
        quantize(f16, tmp_path / "x.gguf", "q2_k", THREADS)
    with pytest.raises(qwen_local.UserError, match="bad tensor type pattern"):
        quantize(f16, tmp_path / "x.gguf", "q8_0", THREADS, tensor_types={"blk.(": "q8_0"})


def test_tiny_gguf_fixture_is_q8_0_and_runs(tiny_gguf):
    from qwen_local.convert.fidelity.parity import GGUFRunner

    f = gguf_fields(tiny_gguf)
    assert f["qwen_local.quant"] == "q8_0" and f["general.architecture"] == "qwen2"
    assert f["general.file_type"] == QTYPES["q8_0"] and f["_tensors"]["blk.0.ffn_up.weight"] == "Q8_0"
    runner = GGUFRunner(tiny_gguf, 64, THREADS)
    try:
        logits = runner.logits(runner.tokenize("Chào shop"))
    finally:
        runner.close()
    assert np.isfinite(logits).all()
