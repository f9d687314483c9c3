"""The adapter audit (convert.adapter, convert.checkpoint): peft's pattern semantics, and every input it
refuses is one clear line from `qwen-local convert` that leaves nothing behind."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("llama_cpp")

from qwen_local.convert import adapter as A  # noqa: E402
from convert_checks import assert_clean_failure, convert_cli  # noqa: E402


@pytest.mark.slow
def test_pattern_key_semantics_match_peft():
    from peft.utils.other import get_pattern_key as peft_key

    patterns = {"q_proj": 4, r"layers\.1\.mlp\.down_proj": 16, "model.layers.0.self_attn.v_proj": 2, "proj": 3}
    for key in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.mlp.down_proj",
                "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj", "lm_head", "model.embed_tokens"):
        assert A.get_pattern_key(patterns.keys(), key) == peft_key(list(patterns.keys()), key)


@pytest.mark.slow
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


@pytest.mark.slow
def test_adapter_for_a_different_base(tmp_path_factory, qwen_tokenizer_dir, make_adapter, tiny_base, out_dir, capfd):
    from qwen_local.convert.dev.synthetic import make_base

    other = make_base(tmp_path_factory.mktemp("other") / "base", qwen_tokenizer_dir, "tiny", seed=5,
                      intermediate_size=768)
    ad = make_adapter("for-other-base", base=other)
    rc, _, err = convert_cli(["--adapter", str(ad), "--base", str(tiny_base), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "shape mismatch", "different base")


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
