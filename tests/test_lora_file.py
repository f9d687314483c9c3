"""The LoRA kept apart (convert.lora_file): a base file plus a LoRA GGUF that llama.cpp applies at run
time is the fine-tune, against peft, on every adapter shape the merge handles; the base names its
LoRA companion, and serving refuses a missing or changed one."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp")

from convert_checks import PARITY_CASES, THREADS  # noqa: E402


def _split_files(plan, folder, out_type="f32"):
    from qwen_local.convert import lora_file
    from qwen_local.convert.export import write_gguf

    base_plan, deltas = lora_file.split(plan)
    base, lora = folder / "base.gguf", folder / "base.lora.gguf"
    write_gguf(base_plan, base, out_type, out_type)
    lora_file.write(plan, deltas, lora, out_type)
    return base, lora, deltas


def _rel_err(got, want) -> float:
    return float((np.abs(got - want).max(axis=1) / np.abs(want).max(axis=1)).max())


@pytest.mark.parametrize("case", list(PARITY_CASES))
def test_base_plus_runtime_lora_is_peft(case, request, make_adapter, tmp_path):
    """f32 base + f32 LoRA through llama.cpp against float32 peft (unmerged) on the same ids: what is
    carried (the blocks' projections) and what is merged (embedding and head LoRA, saved modules,
    biases) together give the fine-tune."""
    from qwen_local.convert.adapter import audit
    from qwen_local.convert.fidelity.peft_model import Reference
    from qwen_local.runtime.engine import Engine

    base_name, kwargs, _ = PARITY_CASES[case]
    base_dir = request.getfixturevalue(base_name)
    ad = make_adapter(case, base=base_dir, **kwargs)
    plan = audit(str(ad), str(base_dir))
    base, lora, deltas = _split_files(plan, tmp_path)
    assert {d.module.rsplit(".", 1)[-1] for _, d in deltas} <= {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    ref = Reference(base_dir, ad, merge=False, threads=THREADS)
    ids = ref.encode(ref.cfg.intent_prompt("Shop ơi, áo sơ mi trắng size M còn hàng không ạ?"))
    want = ref.all_logits(ids)
    engine = Engine(base, threads=THREADS, n_ctx=256, slots=1, n_batch=64, warmup=False,
                    prefixes=False, kv_f32=True, lora=lora if deltas else None)
    try:
        got = engine.score(ids)
        info = engine.describe()
    finally:
        engine.close()
    assert _rel_err(got, want) <= 1e-5, case  # f32 on both sides: measured 6.1e-7 to 1.4e-6
    assert (info["lora"] is not None) == bool(deltas)


def test_lora_is_needed_and_a_companion_is_checked(tiny_base, tiny_adapter, tmp_path):
    """Without its LoRA the base is another model; the base names its companion, which serve finds
    next to it and refuses when it is missing or changed."""
    from qwen_local.convert.adapter import audit
    from qwen_local.convert.lora_file import companion_meta
    from qwen_local.runtime.engine import Engine
    from qwen_local.runtime.gguf_file import write_metadata
    from qwen_local.runtime.lora import LORA_KEY, LoraError

    base, lora, _ = _split_files(audit(str(tiny_adapter), str(tiny_base)), tmp_path, "f16")
    ids = list(range(1000, 1040))

    def logits(**kw):
        e = Engine(base, threads=THREADS, n_ctx=128, slots=1, n_batch=64, warmup=False,
                   prefixes=False, **kw)
        try:
            return e.score(ids), e.describe()
        finally:
            e.close()

    alone, info = logits()
    assert info["lora"] is None
    explicit, _ = logits(lora=lora)
    assert _rel_err(alone, explicit) > 1e-3  # the adapter changes the model
    write_metadata(base, {LORA_KEY: companion_meta(lora)})
    named, info = logits()
    assert np.array_equal(named, explicit)
    assert info["lora"]["file"] == str(lora) and info["bytes"] == base.stat().st_size + lora.stat().st_size

    moved = tmp_path / "elsewhere"
    moved.mkdir()
    shutil.move(lora, moved / lora.name)
    with pytest.raises(LoraError, match="not next to it"):
        logits()
    shutil.copy(moved / lora.name, lora)
    with open(lora, "r+b") as f:  # same size, other bytes
        f.seek(-8, 2)
        f.write(b"\x01" * 8)
    with pytest.raises(LoraError, match="sha256"):
        logits()


def test_one_base_file_serves_another_adapter(tiny_base, make_adapter, tmp_path):
    """Two adapters of one base: the first conversion's base file with the second adapter's LoRA
    file is the second fine-tune, as its own base file with it is (serve --lora). The base files
    differ only where convert merged something, and these adapters carry everything."""
    from qwen_local.convert.adapter import audit
    from qwen_local.runtime.engine import Engine

    pairs = []
    for name, kw in (("share-a", dict(r=8, alpha=16)), ("share-b", dict(r=4, alpha=8, seed=7))):
        folder = tmp_path / name
        folder.mkdir()
        pairs.append(_split_files(audit(str(make_adapter(name, **kw)), str(tiny_base)), folder))
    ids = list(range(2000, 2040))

    def logits(base, lora):
        e = Engine(base, threads=THREADS, n_ctx=128, slots=1, n_batch=64, warmup=False,
                   prefixes=False, kv_f32=True, lora=lora)
        try:
            return e.score(ids)
        finally:
            e.close()

    (base_a, lora_a, _), (base_b, lora_b, _) = pairs
    b_alone = logits(base_b, lora_b)
    assert np.array_equal(logits(base_a, lora_b), b_alone)
    assert _rel_err(logits(base_a, lora_a), b_alone) > 1e-3  # and it is another model than a
