"""The llama.cpp plumbing on a tiny GGUF made by the converter: the scorer without an engine gives
the engine's own logits, bit for bit."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from qwen_local.runtime.engine import Engine  # noqa: E402
from qwen_local.runtime.scoring import Scorer  # noqa: E402


@pytest.mark.slow
def test_scorer_gives_the_engines_logits(tiny_gguf):
    """One batch fill: a bare model and context score a sequence exactly as the engine's worker
    does (f32 KV cache, 64-token batches, more tokens than one batch)."""
    text = "Xin chào, mình cần tư vấn áo khoác đi Đà Lạt tháng 12. " * 4
    scorer = Scorer(tiny_gguf, 256, 2, kv_f32=True, lean=True)
    try:
        ids = scorer.tokenize(text)
        assert len(ids) > 64
        got = scorer.logits(ids)
        tail = scorer.logits(ids, start=len(ids) - 3)
    finally:
        scorer.close()
    with Engine(tiny_gguf, threads=2, n_ctx=256, slots=1, n_batch=64, warmup=False, kv_f32=True,
                prefixes=False, mmap=True, repack=False) as e:
        assert e.tokenize(text, special=False) == ids
        want = e.score(ids)
    assert got.shape == (len(ids), e.n_vocab)
    assert np.array_equal(got, want)
    assert np.array_equal(tail, want[-3:])
