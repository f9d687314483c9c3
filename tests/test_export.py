"""The GGUF writer (convert.export): metadata, tokenizer and tensor types of converted files."""
from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")

import qwen_local  # noqa: E402
from qwen_local.convert.pipeline import run  # noqa: E402
from convert_checks import QUIET, gguf_fields  # noqa: E402


@pytest.mark.slow
def test_f16_parity_and_metadata(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "m-f16.gguf"
    report = run(str(tiny_adapter), base=str(tiny_base), quant="f16", out=out, verify=True, **QUIET)
    v = report["verification"]
    # f16 rounding of the weights alone (f32 KV, flash attention off): measured 7.6e-4, top-1 99.6%
    assert v["passed"] and v["max_rel_err"] <= 2e-3 and v["top1_agreement"] >= 0.99, v
    f = gguf_fields(out)
    assert f["general.architecture"] == "qwen2"
    assert f["qwen2.block_count"] == 2 and f["qwen2.embedding_length"] == 256
    assert f["qwen2.attention.head_count"] == 4 and f["qwen2.attention.head_count_kv"] == 2
    assert f["qwen2.rope.freq_base"] == pytest.approx(1e6)
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    assert f["tokenizer.ggml.tokens"] == 151936 and f["tokenizer.ggml.merges"] == 151387
    assert f["tokenizer.ggml.eos_token_id"] == 151645
    assert f["tokenizer.ggml.bos_token_id"] == 151643 == f["tokenizer.ggml.padding_token_id"]
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert "<|im_start|>" in f["tokenizer.chat_template"]
    assert f["qwen_local.adapter"] == str(tiny_adapter) and f["qwen_local.base"] == str(tiny_base)
    assert f["qwen_local.quant"] == "f16" and f["qwen_local.version"] == qwen_local.__version__
    t = f["_tensors"]
    assert "output.weight" not in t  # tied base, adapter leaves embeddings alone: stays tied
    assert t["token_embd.weight"] == "F16" and t["blk.0.attn_q.weight"] == "F16"
    assert t["blk.0.attn_q.bias"] == "F32" and t["output_norm.weight"] == "F32"


@pytest.mark.slow
def test_f16_keeps_out_of_range_tensor_in_f32(tiny_base, tiny_adapter, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    base = tmp_path / "base"
    shutil.copytree(tiny_base, base)
    sd = load_file(str(base / "model.safetensors"))
    sd["model.layers.1.self_attn.o_proj.weight"][3, 5] = 1e5  # beyond f16's 65504
    save_file(sd, str(base / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.gguf"
    report = run(str(tiny_adapter), base=str(base), quant="f16", out=out, verify=False, **QUIET)
    assert report["f32_kept"] == ["blk.1.attn_output.weight"]
    t = gguf_fields(out)["_tensors"]
    assert t["blk.1.attn_output.weight"] == "F32" and t["blk.0.attn_output.weight"] == "F16"
