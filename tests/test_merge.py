"""The merge (convert.merge over convert.adapter's plan) against peft's own merge and forward, on
tiny random Qwen2 bases."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from qwen_local.convert import adapter as A
from qwen_local.convert.merge import lora_delta_rows, merge_to_state_dict


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


@pytest.mark.slow
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
