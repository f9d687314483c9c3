"""The task reference from the f16 GGUF in llama.cpp stands in for peft: same labels, same figures.

The trained tiny intent classifier of tests/conftest.py (a real LoRA fine-tune, peaked labels),
its f16 GGUF written by our converter, a q4_k_m candidate quantized from it, and peft in torch
(unmerged LoRA) as the yardstick the gate used before.
"""
from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp")

THREADS = min(2, os.cpu_count() or 1)


@pytest.fixture(scope="module")
def heldout(trained_adapter):
    from qwen_local.convert.dev.synthetic import INTENT_REPORT
    from qwen_local.runtime.dataset import Dataset, load_data

    data = load_data(None)
    idx = json.loads((trained_adapter / INTENT_REPORT).read_text())["heldout_indices"]
    return Dataset([data.queries[i] for i in idx], [data.labels[i] for i in idx],
                   [data.tags[i] for i in idx], "held-out split")


def test_agreement_against_f16_gguf_equals_agreement_against_peft(heldout, trained_f16, tiny_base,
                                                                  trained_adapter, tmp_path):
    """A q4_k_m candidate measured against the f16 GGUF's labels disagrees on exactly the queries
    where it disagrees with peft's; the label distributions themselves nearly coincide."""
    from qwen_local.convert.quantize import quantize
    from qwen_local.convert.fidelity.peft_model import Reference
    from qwen_local.convert.fidelity import float_pass
    from qwen_local.runtime.fidelity import intent_figures
    from qwen_local.convert.fidelity.peft_model import reference_run
    from qwen_local.runtime.measure import measure_gguf
    from qwen_local.runtime.labels import decide

    peft = Reference(tiny_base, trained_adapter, merge=False, threads=THREADS)
    by_peft = reference_run(peft, heldout, gen_prompts=0)
    by_f16, _ = float_pass.run(trained_f16, heldout, peft.cfg, threads=THREADS, imatrix=False,
                                   gen_prompts=0, encoder=peft)
    assert len(heldout) >= 60
    assert [decide(p) for p in by_f16.probs] == [decide(p) for p in by_peft.probs]
    worst = max(abs(p[k] - q[k]) for p, q in zip(by_f16.probs, by_peft.probs) for k in p)
    assert worst < 2e-3, worst  # f16 weights against float32: measured 5.7e-4
    assert by_f16.intent_ids == by_peft.intent_ids  # HF's ids for the tokenizer check, as before

    q4 = tmp_path / "q4.gguf"
    quantize(trained_f16, q4, "q4_k_m", THREADS)
    row = measure_gguf(q4, heldout, by_f16, cfg=peft.cfg, threads=THREADS, lean=True)
    assert row["complete"] and row["tokenizer_mismatches"] == 0
    # the same candidate answers, figured against peft's labels instead
    vs_peft = intent_figures(peft.cfg.labels, row["probs"], None, by_peft.probs)
    assert row["disagreements"] == vs_peft["disagreements"]
    assert row["agreement"] == vs_peft["agreement"]
    # two references 5.7e-4 apart at most: the KLs measured 1.5e-6 apart
    assert row["label_kl"] == pytest.approx(vs_peft["label_kl"], abs=1e-4)
