"""The default search (convert.fidelity.search) and the explicit-type check (convert.fidelity.check)
on real files: the tiny model's candidates quantized by llama.cpp and measured through serve's
intent path, the LoRA kept apart, the size budget, the choice within it and its warning."""
from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp")

from convert_checks import THREADS, gguf_tensors  # noqa: E402

QUIET = dict(threads=THREADS, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def prep(reference, tiny_f16):
    """The reference side on 16 calibration queries (16 cannot show 99% by the 95% bound)."""
    from qwen_local.convert.fidelity.calibration import prepare

    return prepare(reference, tiny_f16, max_queries=16, gen_prompts=1, imatrix_replies=2,
                   threads=THREADS, progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def lora_pair(tmp_path_factory, tiny_base, tiny_adapter):
    """(the base in f16, the LoRA file): what the pipeline writes for the LoRA candidate."""
    from qwen_local.convert.adapter import audit
    from qwen_local.convert.floats import write_lora_pair
    from qwen_local.runtime.profile import load_profile

    folder = tmp_path_factory.mktemp("lora-pair")
    return write_lora_pair(audit(str(tiny_adapter), str(tiny_base)), folder, load_profile(), THREADS,
                           False, {})


def _sources(tiny_f16, tiny_f32=None, lora_pair=None, asked=None):
    from qwen_local.convert.fidelity.search import Sources

    def f32():
        if asked is not None:
            asked.append("f32")
        return tiny_f32

    def lora():
        if asked is not None:
            asked.append("lora")
        return lora_pair

    return Sources(tiny_f16, f32=f32 if tiny_f32 else None, lora=lora if lora_pair else None)


def test_fidelity_first_tries_every_candidate_up_to_q8_0(prep, tiny_f16, tiny_f32, lora_pair,
                                                         tmp_path):
    """--max-size none: smallest first until one meets the target; 16 queries cannot, so every
    candidate is measured, q8_0 last, and the most faithful is kept with the loud reason."""
    from qwen_local.convert.fidelity.search import LADDER, MIX_SIZE, search

    asked = []
    rep = search(prep, _sources(tiny_f16, tiny_f32, lora_pair, asked), tmp_path / "auto.gguf",
                 max_size=None, **QUIET)
    names = [c["name"] for c in rep["candidates"]]
    assert names == [p.name for p in LADDER] and names[-1] == "q8_0"
    assert asked == ["lora", "f32"]  # each made once, when first wanted
    assert not rep["met_target"] and rep["reason"].startswith("NO candidate")
    assert "16 calibration queries cannot show 99.0%" in rep["reason"]
    assert rep["warning"].startswith("WARNING: no candidate shows the 99.0%")
    sizes = {c["name"]: c["size_bytes"] for c in rep["candidates"]}
    assert sizes["iq4_xs+imatrix"] < sizes["q4_k_m+imatrix"] < sizes["q4_k_m+imatrix+lora"]
    # the LoRA candidate is the q4_k_m file's size (but for the header) plus its LoRA file
    lora_bytes = lora_pair[1].stat().st_size
    assert abs(sizes["q4_k_m+imatrix+lora"] - sizes["q4_k_m+imatrix"] - lora_bytes) < 4096
    assert sizes["mixed+imatrix"] <= sizes["q4_k_m+imatrix"] * MIX_SIZE + 4096
    sens = rep["sensitivity"]
    assert sens["queries"] == 16 and "embd" in sens["groups"]
    # the most faithful: measured in full, fewest disagreements, then least label KL
    full = [c for c in rep["candidates"] if c["complete"]]
    best = min(full, key=lambda c: (c["misses"], c["label_kl"], c["size_bytes"]))
    assert rep["chosen"] == best["name"]
    assert (tmp_path / "auto.gguf").stat().st_size + (
        lora_pair[1].stat().st_size if best["extra"]["lora"] else 0) == best["size_bytes"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["auto.gguf"] + (["auto.lora.gguf"] if best["extra"]["lora"] else []))


def test_budget_measures_the_lora_candidate_first_and_keeps_the_most_faithful(
        prep, tiny_f16, tiny_f32, lora_pair, tmp_path):
    """The default budget (1.10x the plain q4_k_m file): nothing over it is quantized or measured;
    the LoRA candidate is measured first and in full, the rest only while they could still beat
    it; none meets an impossible target, so the most faithful within the budget is written, and the
    warning says how faithful, where the misses lie and what to ask for instead."""
    from qwen_local.convert.fidelity.search import search

    asked = []
    dst = tmp_path / "auto.gguf"
    rep = search(prep, _sources(tiny_f16, tiny_f32, lora_pair, asked), dst, max_size=1.10,
                 min_agreement=1.0, **QUIET)
    cands = rep["candidates"]
    assert cands[0]["name"] == "q4_k_m+imatrix+lora" and cands[0]["complete"]
    assert "f32" not in asked and "mixed+imatrix" not in [c["name"] for c in cands]
    budget = rep["budget"]
    assert budget["unit"] == "q4_k_m" and budget["bytes"] == int(1.10 * budget["unit_bytes"])
    assert all(c["size_bytes"] <= budget["bytes"] for c in cands)
    skipped = {s["name"] for s in rep["skipped"]}
    assert {"q6_k+imatrix", "q8_0"} <= skipped  # over the budget: never quantized
    lead = cands[0]
    for c in cands[1:]:  # stopped once they could no longer beat the lead
        assert c["complete"] or c["misses"] >= lead["misses"]
    chosen = next(c for c in cands if c["name"] == rep["chosen"])
    assert chosen["misses"] == min(c["misses"] for c in cands if c["complete"])
    w = rep["warning"]
    assert w.startswith("WARNING: no candidate within the size budget (1.10x the plain q4_k_m file")
    assert f"Wrote the most faithful one, {rep['chosen']}" in w
    assert "--max-size none" in w and "--quant q8_0" in w
    if chosen["misses"]:
        assert "The fp model decides those queries by margins of" in w
    if chosen["extra"]["lora"]:
        assert rep["lora"]["bytes"] == lora_pair[1].stat().st_size
        assert dst.with_name("auto.lora.gguf").is_file()


def test_a_candidate_that_meets_the_target_ends_the_budgeted_search_above_it(
        prep, tiny_f16, lora_pair, tmp_path):
    """With a target the LoRA candidate meets, no larger file is tried, and a smaller one wins
    only by meeting it too."""
    from qwen_local.convert.fidelity.search import search

    rep = search(prep, _sources(tiny_f16, None, lora_pair), tmp_path / "a.gguf", max_size=1.10,
                 min_agreement=0.05, **QUIET)
    assert rep["met_target"] and rep["warning"] is None
    names = [c["name"] for c in rep["candidates"]]
    assert names[0] == "q4_k_m+imatrix+lora" and "q5_k_m+imatrix" not in names
    assert rep["chosen"] == min(rep["candidates"], key=lambda c: c["size_bytes"])["name"]


def test_q8_0_comes_from_the_f32_it_asks_for_once(prep, tiny_f16, tiny_f32, tmp_path):
    """The q8_0 candidate is quantized from the f32 file, which the search asks for once and only
    when it reaches q8_0; coarser candidates keep the f16, and with no f32 to be had q8_0 does
    too. The bytes show it: q8_0 after f16's rounding is another file."""
    from qwen_local.convert.fidelity.search import Plan, Sources, search
    from qwen_local.convert.quantize import quantize

    q4, q8 = Plan("q4_k_m+imatrix", "q4_k_m", imatrix=True), Plan("q8_0", "q8_0")
    asked = []

    def run(name, plans, f32):  # 1.01: nothing meets it, so every plan is measured
        return search(prep, Sources(tiny_f16, f32=f32), tmp_path / name, max_size=None,
                      min_agreement=1.01, plans=plans, **QUIET)

    def f32():
        asked.append(True)
        return tiny_f32

    rep = run("q4.gguf", [q4], f32)
    assert not asked and rep["candidates"][0]["extra"]["source"] == "f16"
    rep = run("q8.gguf", [q8], f32)
    assert asked == [True] and rep["candidates"][0]["extra"]["source"] == "f32"
    quantize(tiny_f32, tmp_path / "want.gguf", "q8_0", THREADS)
    quantize(tiny_f16, tmp_path / "double.gguf", "q8_0", THREADS)
    want, double = gguf_tensors(tmp_path / "want.gguf"), gguf_tensors(tmp_path / "double.gguf")
    assert gguf_tensors(tmp_path / "q8.gguf") == want != double
    rep = run("fallback.gguf", [q8], lambda: None)
    assert rep["candidates"][0]["extra"]["source"] == "f16"
    assert gguf_tensors(tmp_path / "fallback.gguf") == double


def test_explicit_type_is_kept_and_warns(prep, tiny_f16, tmp_path):
    """An explicit quant is kept as asked; missing the target gives the loud warning."""
    from qwen_local.convert.fidelity.check import finish
    from qwen_local.convert.fidelity.search import Sources

    seen = []
    dst = tmp_path / "q4.gguf"
    rep = finish(prep, Sources(tiny_f16), dst, "q4_k_m", min_agreement=1.01, threads=THREADS,
                 progress=False, log=seen.append)
    assert rep["quant"] == "q4_k_m" and not rep["met_target"] and rep["lora"] is None
    assert rep["warning"].startswith("WARNING: q4_k_m") and rep["warning"] in seen
    assert gguf_tensors(dst)["blk.0.attn_q.weight"][1] == "Q4_K"


def test_a_keep_mix_lowered_below_q8_0_uses_the_imatrix(prep, tiny_f16, tmp_path):
    """--quant q8_0 --keep attn_q=iq4_xs: the lowered tensors are quantized with the importance
    matrix, though q8_0 itself ignores it."""
    from qwen_local.convert.fidelity import mixed
    from qwen_local.convert.fidelity.check import finish
    from qwen_local.convert.fidelity.search import Sources

    dst = tmp_path / "mix.gguf"
    rep = finish(prep, Sources(tiny_f16), dst, "q8_0", keep={mixed.GROUPS["attn_q"]: "iq4_xs"},
                 use_imatrix=True, **QUIET)
    assert rep["imatrix"] and rep["imatrix"]["entries"] > 0 and rep["mixed"] == "attn_q=iq4_xs"
    types = {n: t[1] for n, t in gguf_tensors(dst).items()}
    assert types["blk.0.attn_q.weight"] == "IQ4_XS" and types["blk.0.ffn_up.weight"] == "Q8_0"


def test_the_report_reaches_the_gguf(prep, tiny_f16, lora_pair, tmp_path):
    """The compact figures and the budget land in the GGUF header, and the sidecar-ready report
    is plain JSON."""
    from qwen_local.convert.fidelity.report import METADATA_KEY, metadata_value
    from qwen_local.convert.fidelity.search import search

    rep = search(prep, _sources(tiny_f16, None, lora_pair), tmp_path / "a.gguf", **QUIET)
    json.dumps(rep)
    stored = json.loads(metadata_value(rep)[METADATA_KEY])
    assert stored["chosen"] == rep["chosen"] and stored["max_size"] == 1.10
    assert stored["budget"] == rep["budget"] and stored["reason"] == rep["reason"]
    assert stored["complete"] is rep["figures"]["complete"]  # serve bounds complete runs only
