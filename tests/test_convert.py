"""`qwen-local convert` with real parts: peft adapters on tiny random Qwen2 bases, our merge and GGUF
writer, llama.cpp for quantization and inference, peft's own forward/merge as the reference."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

import qwen_local  # noqa: E402
from convert import adapter as A  # noqa: E402
from convert.merge import lora_delta_rows, merge_to_state_dict  # noqa: E402
from convert.pipeline import run  # noqa: E402
from convert.quantize import QTYPES  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
THREADS = 2
# max_queries: the task-fidelity part of verification on 2 calibration queries (the default is 200)
QUIET = dict(log=lambda s: None, progress=False, threads=THREADS, max_queries=2)


# ------------------------------------------------------------------------------------------ helpers

def peft_merged_state(base: Path, adapter: Path) -> dict:
    """peft's own merge_and_unload, float32 (reference for the merge math)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_merge_matches_peft(base: Path, adapter: Path):
    import torch

    plan = A.audit(str(adapter), str(base))
    ours = merge_to_state_dict(plan)
    ref = peft_merged_state(base, adapter)
    for name, t in ours.items():
        torch.testing.assert_close(t, ref[name], rtol=0, atol=2e-6, msg=lambda m: f"{name}: {m}")
    return plan, ours, ref


def gguf_fields(path: Path) -> dict:
    """Key/values (arrays as their length) and {tensor: type name} of a GGUF.

    A minimal reader of the GGUF layout: gguf.GGUFReader takes ~7 s on a 152k-token vocabulary."""
    import struct

    import gguf

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # header + kv + tensor infos are far smaller than this
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            for _ in range(n):
                value(et)
            return n
        return take(scalar[t])

    assert buf[:4] == b"GGUF"
    pos = 4
    take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    out = {}
    for _ in range(n_kv):
        key = string()
        out[key] = value(take("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        for _ in range(take("I")):
            take("Q")
        tensors[name] = gguf.GGMLQuantizationType(take("I")).name
        take("Q")
    out["_tensors"] = tensors
    return out


def _fidelity_meta(path: Path) -> dict:
    from convert.autoquant import METADATA_KEY

    return json.loads(gguf_fields(path)[METADATA_KEY])


def convert_cli(args: list[str], capfd) -> tuple[int, str, str]:
    """The real dispatcher in-process: exit code, stdout, stderr (C-level output included)."""
    rc = qwen_local.main(["convert", "--no-progress", "--threads", str(THREADS), *args])
    out, err = capfd.readouterr()
    return rc, out, err


def assert_clean_failure(rc: int, err: str, out_dir: Path, *needles: str):
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
    assert lines[0].startswith("qwen-local convert: error: "), lines[0]
    assert "Traceback" not in err
    for n in needles:
        assert n.lower() in lines[0].lower(), lines[0]
    assert list(out_dir.iterdir()) == [], f"left behind: {list(out_dir.iterdir())}"


# ---------------------------------------------------------------------- merge semantics vs peft

def test_pattern_key_semantics_match_peft():
    from peft.utils.other import get_pattern_key as peft_key

    patterns = {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 16, "model.layers.0.self_attn.v_proj": 2, "proj": 3}
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj",
                "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "lm_head", "model.embed_tokens"):
        assert A.get_pattern_key(patterns.keys(), key) == peft_key(list(patterns.keys()), key)


def test_fan_in_fan_out_transposition():
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 6, generator=g), torch.randn(10, 4, generator=g)
    full = (b @ a) * 0.5                                     # (out=10, in=6), nn.Linear layout
    assert torch.allclose(lora_delta_rows(a, b, 0.5, 2, 7), full[2:7])
    # Conv1D layout: the base weight is (in=6, out=10): rows 2:5 of the transposed delta
    assert torch.allclose(lora_delta_rows(a, b, 0.5, 2, 5, fan_in_fan_out=True), full.t()[2:5])
    # embedding: A (r, vocab), B (hidden, r) -> (vocab, hidden)
    ea, eb = torch.randn(4, 12, generator=g), torch.randn(6, 4, generator=g)
    assert torch.allclose(lora_delta_rows(ea, eb, 2.0, 3, 9, kind="embedding"), ((eb @ ea).t() * 2.0)[3:9])


def test_merge_matches_peft_rslora_patterns_bias(make_adapter, tiny_base):
    ad = make_adapter("rslora-patterns", r=8, alpha=16, use_rslora=True, bias="all",
                      rank_pattern={"q_proj": 4, r"layers\.1\.mlp\.down_proj": 16},
                      alpha_pattern={"v_proj": 32, "gate_proj": 5})
    plan, _, _ = assert_merge_matches_peft(tiny_base, ad)
    d = {x.module: x for x in plan.lora}
    assert d["model.layers.0.self_attn.q_proj"].r == 4
    assert d["model.layers.1.mlp.down_proj"].r == 16 and d["model.layers.0.mlp.down_proj"].r == 8
    assert d["model.layers.0.self_attn.q_proj"].scaling == pytest.approx(16 / 2)     # alpha/sqrt(4)
    assert d["model.layers.0.self_attn.v_proj"].scaling == pytest.approx(32 / 8**0.5)
    assert d["model.layers.1.mlp.gate_proj"].scaling == pytest.approx(5 / 8**0.5)
    assert "model.layers.0.self_attn.q_proj.bias" in plan.changed


def test_merge_matches_peft_fan_in_fan_out_flag(make_adapter, tiny_base, tmp_path):
    """peft disregards fan_in_fan_out on nn.Linear (Qwen2's projections); so does the converter."""
    import shutil

    src = make_adapter("fifo-src", targets=["q_proj", "down_proj"])
    ad = tmp_path / "fifo"
    shutil.copytree(src, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = True
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    plan, _, _ = assert_merge_matches_peft(tiny_base, ad)
    assert any("fan_in_fan_out" in n for n in plan.notes)


def test_embedding_lora_on_tied_base_follows_peft_forward(make_adapter, tiny_base):
    """LoRA on embed_tokens of a tied base: peft's forward changes the input embedding only (lm_head
    keeps reading the base weight), while merge_and_unload writes the delta into the shared tensor and
    so changes lm_head too. The converter follows the forward (what was trained): untied output.weight."""
    import torch
    from safetensors.torch import load_file

    ad = make_adapter("embed-lora", targets=["q_proj", "embed_tokens"])
    plan = A.audit(str(ad), str(tiny_base))
    ours = merge_to_state_dict(plan)
    ref = peft_merged_state(tiny_base, ad)
    base_embed = load_file(str(tiny_base / "model.safetensors"))["model.embed_tokens.weight"].float()
    assert plan.untie and "lm_head.weight" in ours
    torch.testing.assert_close(ours["model.embed_tokens.weight"], ref["model.embed_tokens.weight"], rtol=0, atol=2e-6)
    torch.testing.assert_close(ours["lm_head.weight"], base_embed, rtol=0, atol=0)
    for name in ours:
        if "embed_tokens" not in name and name != "lm_head.weight":
            torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=2e-6)


# ------------------------------------------------------------------ f32 parity through llama.cpp

PARITY_CASES = {
    # name: (base fixture, LoraConfig kwargs, expect untied output.weight)
    "tied-rslora-patterns": ("tiny_base", dict(r=8, alpha=16, use_rslora=True,
                                                rank_pattern={"q_proj": 4, "down_proj": 16},
                                                alpha_pattern={"v_proj": 32}), False),
    "tied-lm_head-saved": ("tiny_base", dict(modules_to_save=["lm_head"]), True),
    "tied-embed-lm_head-lora": ("tiny_base", dict(targets=["q_proj", "up_proj", "embed_tokens", "lm_head"]), True),
    "tied-embed-saved-tying": ("tiny_base", dict(targets=["k_proj", "o_proj"], modules_to_save=["embed_tokens"],
                                                  ensure_weight_tying=True), False),
    "untied-bias-lm_head": ("tiny_base_untied", dict(bias="all", modules_to_save=["lm_head"]), True),
}


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_f32_parity_with_peft(case, request, make_adapter, tmp_path):
    base_name, kwargs, untied = PARITY_CASES[case]
    base = request.getfixturevalue(base_name)
    ad = make_adapter(case, base=base, **kwargs)
    out = tmp_path / "m.gguf"
    report = run(str(ad), base=str(base), quant="f32", out=out, verify=True, **QUIET)
    v = report["verification"]
    assert v["max_rel_err"] <= 3e-3, v
    assert v["top1_agreement"] >= 0.995, v
    assert v["tokenizer_agreement"] == 1.0 and v["intent_agreement"] == 1.0, v
    assert v["reference"] == "peft float32" and v["kv_cache"] == "f32" and v["positions"] > 250
    tensors = gguf_fields(out)["_tensors"]
    assert ("output.weight" in tensors) is untied
    assert set(tensors.values()) == {"F32"}
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["verification"]["max_rel_err"] == v["max_rel_err"]
    assert side["fidelity"]["calibration"]["n"] == 2 and side["fidelity"]["imatrix"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.json"]


def test_streamed_reference_is_peft(request, make_adapter):
    """The pipeline's parity reference keeps the base weights in the shards and loads one block
    at a time (embedding rows and vocabulary slices straight from the file when the adapter does
    not touch them): its logits are peft's, in a padded batch too, for adapters that touch the
    embedding, the output projection, biases, and an untied base."""
    from convert.reference import Reference

    for case in ("tied-embed-lm_head-lora", "tied-embed-saved-tying", "untied-bias-lm_head"):
        base_name, kwargs, _ = PARITY_CASES[case]
        base = request.getfixturevalue(base_name)
        ad = make_adapter(case, base=base, **kwargs)
        full = Reference(base, ad, merge=False, threads=THREADS)
        streamed = Reference(base, ad, merge=False, threads=THREADS, stream=True)
        assert not any(p.is_meta for n, p in full.model.named_parameters())
        seqs = [full.encode(full.cfg.intent_prompt(q)) for q in ("chào shop", "áo sơ mi trắng size M?")]
        for s, got in zip(seqs, streamed.all_logits_many(seqs)):
            want = full.all_logits(s)
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max(), case
        streamed.release()


def test_f16_parity_and_metadata(tiny_base, tiny_adapter, tmp_path):
    out = tmp_path / "m-f16.gguf"
    report = run(str(tiny_adapter), base=str(tiny_base), quant="f16", out=out, verify=True, **QUIET)
    v = report["verification"]
    assert v["passed"] and v["max_rel_err"] <= 1e-2 and v["top1_agreement"] >= 0.98, v
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


# --------------------------------------------------------------------------- every quant type

# f32/f16: parity tests above; q8_0: tiny_gguf; q4_k_m (the default): the CLI test below
@pytest.mark.parametrize("quant", ["q5_k_m", "q6_k", "bf16"])
def test_quant_type_loads_and_runs(quant, tiny_base, tiny_adapter, tmp_path):
    from convert.verify import GGUFRunner

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


def test_quantize_overrides_and_imatrix(tiny_base, tiny_adapter, tmp_path):
    """The hooks issue 5 builds on: per-tensor type overrides and an importance matrix."""
    from convert.quantize import quantize

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
    from convert.verify import GGUFRunner

    f = gguf_fields(tiny_gguf)
    assert f["qwen_local.quant"] == "q8_0" and f["general.architecture"] == "qwen2"
    assert f["general.file_type"] == QTYPES["q8_0"] and f["_tensors"]["blk.0.ffn_up.weight"] == "Q8_0"
    runner = GGUFRunner(tiny_gguf, 64, THREADS)
    try:
        logits = runner.logits(runner.tokenize("Chào shop"))
    finally:
        runner.close()
    assert np.isfinite(logits).all()


# ------------------------------------------------------------------------- bad inputs, cleanly

@pytest.fixture(scope="module")
def small_calib(tmp_path_factory) -> Path:
    """Three labelled lines of the packaged calibration set (one per label)."""
    from runtime.dataset import default_data_path

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


def test_missing_adapter_config(tmp_path, out_dir, tiny_base, capfd):
    (tmp_path / "empty").mkdir()
    rc, _, err = convert_cli(["--adapter", str(tmp_path / "empty"), "--base", str(tiny_base),
                              "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "adapter_config.json not found")


def test_malformed_adapter_config(tmp_path, out_dir, tiny_adapter, capfd):
    import shutil

    ad = tmp_path / "bad"
    shutil.copytree(tiny_adapter, ad)
    (ad / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8,')
    rc, _, err = convert_cli(["--adapter", str(ad), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "not valid JSON")


@pytest.mark.parametrize("which", ["adapter", "base"])
def test_truncated_safetensors(which, tmp_path, out_dir, tiny_base, tiny_adapter, capfd):
    import shutil

    base, ad = tmp_path / "base", tmp_path / "ad"
    if which == "base":
        shutil.copytree(tiny_base, base)
        target = base / "model.safetensors"
    else:
        shutil.copytree(tiny_adapter, ad)
        target = ad / "adapter_model.safetensors"
    with open(target, "r+b") as f:
        f.truncate(target.stat().st_size // 2)
    rc, _, err = convert_cli(["--adapter", str(ad if which == "adapter" else tiny_adapter),
                              "--base", str(base if which == "base" else tiny_base),
                              "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "truncated or corrupt")


def test_adapter_for_a_different_base(tmp_path_factory, qwen_tokenizer_dir, make_adapter, tiny_base, out_dir, capfd):
    from convert.synthetic import make_base

    other = make_base(tmp_path_factory.mktemp("other") / "base", qwen_tokenizer_dir, "tiny", seed=5,
                      intermediate_size=768)
    ad = make_adapter("for-other-base", base=other)
    rc, _, err = convert_cli(["--adapter", str(ad), "--base", str(tiny_base), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "shape mismatch", "different base")


def test_unknown_quant_type(tiny_adapter, out_dir, capfd):
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--quant", "q3_xx", "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "unknown quant type", "q4_k_m")


def test_dora_refused(make_adapter, out_dir, capfd):
    ad = make_adapter("dora", targets=["q_proj", "v_proj"], use_dora=True)
    rc, _, err = convert_cli(["--adapter", str(ad), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "DoRA")


@pytest.mark.parametrize("edit,needle", [
    ({"peft_type": "LOHA"}, "adapter type 'LOHA'"),
    ({"trainable_token_indices": [151650]}, "trainable tokens"),
    ({"alpha_pattern": {"q_proj": "big"}}, "invalid lora_alpha"),
    ({"r": "eight"}, "r must be a number"),
])
def test_other_peft_features_refused(edit, needle, tmp_path, tiny_adapter, out_dir, capfd):
    import shutil

    ad = tmp_path / "ad"
    shutil.copytree(tiny_adapter, ad)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg.update(edit)
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    rc, _, err = convert_cli(["--adapter", str(ad), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, needle)


def test_resized_vocabulary_refused(tmp_path, make_adapter, out_dir, capfd):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    src = make_adapter("embed-saved", targets=["q_proj"], modules_to_save=["embed_tokens"])
    ad = tmp_path / "resized"
    shutil.copytree(src, ad)
    sd = load_file(str(ad / "adapter_model.safetensors"))
    key = next(k for k in sd if k.endswith("embed_tokens.weight"))
    sd[key] = torch.cat([sd[key], torch.zeros(64, sd[key].shape[1])])
    save_file(sd, str(ad / "adapter_model.safetensors"))
    rc, _, err = convert_cli(["--adapter", str(ad), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "resized vocabulary")


def test_missing_base(tiny_adapter, tmp_path, out_dir, capfd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--base", "nobody/no-such-model",
                              "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "not in the local Hugging Face cache", "HF_HUB_OFFLINE")


def test_not_enough_disk(tiny_adapter, out_dir, capfd, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("convert.pipeline.shutil.disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "not enough free disk space")
    assert shutil  # noqa


def test_ctrl_c_leaves_nothing(tiny_adapter, out_dir, capfd, monkeypatch):
    from convert import export

    real = export._stream_tensor
    calls = []

    def interrupted(w, name, blocks):
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(w, name, blocks)

    monkeypatch.setattr(export, "_stream_tensor", interrupted)
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--quant", "q8_0", "--out", str(out_dir / "m.gguf")], capfd)
    assert rc == 130 and "interrupted" in err and "Traceback" not in err
    assert list(out_dir.iterdir()) == []


def test_failed_verification_publishes_nothing(tiny_adapter, out_dir, small_calib, capfd, monkeypatch):
    from convert import verify

    # the real check is exercised by the parity tests; here only the outcome of a failing one matters
    monkeypatch.setattr(verify, "check_gguf", lambda *a, **k: {"passed": False, "failures": ["forced failure"]})
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--quant", "f32", "--calib", str(small_calib),
                              "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "verification failed", "was not written")


CONSOLE_SCRIPT = "import sys; from qwen_local import main; sys.exit(main())"  # what `qwen-local` runs


def test_cli_subprocess_end_to_end(tiny_base, tiny_adapter, small_calib, tmp_path):
    """The console script as a user runs it, an explicit q4_k_m and verification on: audit summary,
    task-fidelity table, final line, sidecar; an explicit q4_k_m stays q4_k_m, and the loud warning
    appears exactly when the (strictest possible, 100%) target is missed; --keep types are visible in
    the GGUF. stderr is not a terminal: no progress bars, no third-party warnings. Then a bad input."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "cli.gguf"
    p = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "convert", "--adapter", str(tiny_adapter),
                        "--out", str(out), "--threads", str(THREADS), "--calib", str(small_calib),
                        "--quant", "q4_k_m", "--min-agreement", "1", "--keep", "attn_v=q8_0,first=q6_k"],
                       capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "\r" not in p.stderr and "it/s" not in p.stderr, p.stderr  # no progress bars in a log
    assert "Warning" not in p.stderr, p.stderr  # transformers/peft/torch warnings are silenced
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("base") and any(ln.startswith("changes") for ln in lines)
    assert lines[-1].startswith(str(out)) and "top-1" in lines[-1] and "max rel logit err" in lines[-1]
    side = json.loads(Path(str(out) + ".json").read_text())
    fid = side["fidelity"]
    # 3 queries cannot show 100% by a 95% lower bound: the target is missed whatever they say
    assert not fid["met_target"]
    assert "label agreement" in lines[-1] and "BELOW the 100% target" in lines[-1] and "n=3" in lines[-1]
    # the task reference is the f16 intermediate in llama.cpp (peft only checks logit parity)
    assert any(ln.startswith("task fidelity vs f16 GGUF (llama.cpp, f32 KV) on 3 calibration queries")
               for ln in lines)
    assert "verify: reference logits (peft, float32)" in p.stdout
    assert any(ln.startswith("q4_k_m+imatrix+keep ") for ln in lines)  # the table row: imatrix by default
    assert "applying manual override" not in p.stderr  # llama.cpp's per-tensor chatter is silenced
    assert p.stderr.strip().splitlines()[-1].startswith("qwen-local convert: WARNING: q4_k_m agrees")
    assert fid["warning"].startswith("WARNING: q4_k_m")
    assert side["quant"] == "q4_k_m" and side["verification"]["tokenizer_agreement"] == 1.0
    assert fid["quant"] == "q4_k_m" and fid["calibration"]["n"] == 3
    assert fid["imatrix"]["entries"] >= 14
    assert fid["mixed"] == "attn_v=q8_0,blk0=q6_k"
    f = gguf_fields(out)
    assert f["general.file_type"] == QTYPES["q4_k_m"]
    t = f["_tensors"]
    assert t["blk.0.attn_v.weight"] == t["blk.1.attn_v.weight"] == "Q8_0"  # attn_v listed first: wins
    assert t["blk.0.ffn_up.weight"] == "Q6_K" and t["blk.1.ffn_up.weight"] == "Q4_K"
    meta = _fidelity_meta(out)
    assert meta["met_target"] is fid["met_target"] and meta.get("warning") == fid.get("warning")
    assert meta["agreement"] == fid["figures"]["agreement"]

    p = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "convert", "--adapter", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "x.gguf").exists()


# ------------------------------------------------------------- issue 5: task fidelity in convert

def test_auto_end_to_end_one_reference_load(tiny_base, tiny_adapter, small_calib, tmp_path, capfd):
    """--quant auto picks a candidate, names the file after it, and the figures reach the sidecar
    and the GGUF header; the fp reference is loaded once for parity, imatrix and fidelity."""
    from convert.reference import Reference

    out_dir = tmp_path / "models"
    out_dir.mkdir()
    loads = Reference.loads
    rc, out, err = convert_cli(["--adapter", str(tiny_adapter), "--base", str(tiny_base), "--quant", "auto",
                                "--calib", str(small_calib), "--out", str(out_dir)], capfd)
    assert rc == 0, err
    assert Reference.loads == loads + 1
    files = sorted(p.name for p in out_dir.iterdir())
    assert len(files) == 2, files
    gguf = out_dir / files[0]
    side = json.loads((out_dir / files[1]).read_text())
    fid = side["fidelity"]
    assert side["requested_quant"] == "auto" and side["quant"] == fid["quant"]
    assert gguf.name == f"{tiny_adapter.name}-{fid['quant']}.gguf"
    names = [c["name"] for c in fid["candidates"]]
    assert names[0] == "iq4_xs+imatrix" and fid["chosen"] in names
    assert fid["calibration"]["n"] == 3
    assert fid["imatrix"] is None or fid["imatrix"]["entries"] >= 14
    assert fid["reason"] in out and ("chose " in fid["reason"] or "NO candidate" in fid["reason"])
    assert "candidate" in out and "fp reference" in out  # the printed table
    assert set(side["timings"]) >= {"reference_load", "parity_reference", "reference_passes",
                                    "quantize_fidelity", "verify"}
    meta = _fidelity_meta(gguf)
    assert meta["chosen"] == fid["chosen"] and meta["agreement"] == fid["figures"]["agreement"]
    assert meta["met_target"] == fid["met_target"]
    assert gguf.stat().st_size == side["bytes"] >= fid["figures"]["bytes"]  # + the metadata


@pytest.mark.parametrize("args,needles", [
    (["--calib", "{missing}"], ["calibration file", "not found"]),
    (["--calib", "{bad}"], ["calibration file", "line 2", "not JSON"]),
    (["--calib", "{badlabel}"], ["line 1", "unknown label"]),
    (["--quant", "auto", "--no-verify"], ["auto needs verification"]),
    (["--calib", "{bad}", "--no-verify"], ["--calib", "--no-verify"]),
    (["--keep", "attn_z=q8_0"], ["--keep", "unknown tensor group"]),
    (["--keep", "attn_v=q8_0", "--quant", "f16"], ["--keep", "not quantized"]),
    (["--min-agreement", "0"], ["--min-agreement"]),
    (["--min-agreement", "5"], ["--min-agreement", "(0, 1]"]),  # a share, not a percentage
    (["--threads", "0"], ["--threads", "from 1 to 1024"]),
])
def test_bad_fidelity_options(args, needles, tiny_adapter, tmp_path, out_dir, capfd):
    (tmp_path / "bad.jsonl").write_text('{"query": "chào shop", "label": "chitchat"}\n{"query": oops}\n')
    (tmp_path / "badlabel.jsonl").write_text('{"query": "chào", "label": "greeting"}\n')
    args = [a.format(missing=tmp_path / "none.jsonl", bad=tmp_path / "bad.jsonl",
                     badlabel=tmp_path / "badlabel.jsonl") for a in args]
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--out", str(out_dir / "m.gguf"), *args], capfd)
    assert_clean_failure(rc, err, out_dir, *needles)


def test_no_verify_loads_no_reference(tiny_adapter, tmp_path):
    from convert.reference import Reference

    loads = Reference.loads
    out = tmp_path / "m.gguf"
    report = run(str(tiny_adapter), quant="q8_0", out=out, verify=False, **QUIET)
    assert Reference.loads == loads and report["fidelity"] is None and report["verification"] is None
    assert "qwen_local.fidelity" not in gguf_fields(out)
