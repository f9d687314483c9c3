"""Fidelity arithmetic on known inputs, and the --quant auto choice on fed figures."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from qwen_local.convert.fidelity import mixed
from qwen_local.runtime import fidelity
from qwen_local.runtime.fidelity import Candidate

LABELS = ("fashion", "chitchat", "off_topic")


def test_kl_known_value_and_zero():
    assert fidelity.kl_divergence([0.5, 0.5], [0.9, 0.1]) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1))
    assert fidelity.kl_divergence([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]) == pytest.approx(0.0, abs=1e-15)
    # zero candidate mass: large but finite
    assert 20 < fidelity.kl_divergence([1.0, 0.0], [0.0, 1.0]) < 30


def test_agreement_accuracy_and_label_kl():
    ref = ["fashion", "chitchat", "off_topic", "fashion"]
    cand = ["fashion", "off_topic", "off_topic", "fashion"]
    assert fidelity.label_agreement(ref, cand) == 0.75
    gold = ["fashion", "chitchat", None, "chitchat"]
    assert fidelity.accuracy(gold, cand) == pytest.approx(1 / 3)  # None is skipped
    p = [{"fashion": 0.5, "chitchat": 0.5, "off_topic": 0.0}]
    q = [{"fashion": 0.9, "chitchat": 0.1, "off_topic": 0.0}]
    assert fidelity.mean_label_kl(p, q, LABELS) == pytest.approx(
        0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-6)
    with pytest.raises(ValueError):
        fidelity.label_agreement(["a"], [])


def test_confusion_and_per_label_prf():
    gold = ["fashion", "fashion", "fashion", "chitchat", "chitchat", "off_topic"]
    pred = ["fashion", "fashion", "chitchat", "chitchat", "fashion", "chitchat"]
    m = fidelity.confusion_matrix(gold, pred, LABELS)
    assert m.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    prf = fidelity.per_label_prf(gold, pred, LABELS)
    # fashion: tp 2, predicted 3, support 3
    assert prf["fashion"]["precision"] == pytest.approx(2 / 3)
    assert prf["fashion"]["recall"] == pytest.approx(2 / 3)
    assert prf["fashion"]["f1"] == pytest.approx(2 / 3)
    # chitchat: tp 1, predicted 3, support 2
    assert prf["chitchat"]["precision"] == pytest.approx(1 / 3)
    assert prf["chitchat"]["recall"] == pytest.approx(1 / 2)
    assert prf["chitchat"]["f1"] == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    # off_topic: never predicted -> 0/0 reported as 0
    assert prf["off_topic"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}


def test_intent_figures_bundle():
    probs = [{"fashion": 0.7, "chitchat": 0.2, "off_topic": 0.1},
             {"fashion": 0.1, "chitchat": 0.2, "off_topic": 0.7}]
    ref = [{"fashion": 0.6, "chitchat": 0.3, "off_topic": 0.1},
           {"fashion": 0.1, "chitchat": 0.6, "off_topic": 0.3}]
    f = fidelity.intent_figures(LABELS, probs, ["fashion", "chitchat"], ref)
    assert f["accuracy"] == 0.5 and f["agreement"] == 0.5 and f["disagreements"] == [1]
    assert f["confusion"] == [[1, 0, 0], [0, 0, 1], [0, 0, 0]]
    assert f["label_kl"] > 0
    assert f["disagreement_margins"] == [pytest.approx(math.log(0.6 / 0.3), abs=1e-4)]
    unlabelled = fidelity.intent_figures(LABELS, probs, [None, None], ref)
    assert "accuracy" not in unlabelled and unlabelled["agreement"] == 0.5


def test_margin_says_how_firmly_the_reference_decided():
    assert fidelity.margin({"fashion": 0.52, "chitchat": 0.46, "off_topic": 0.02}) == pytest.approx(
        math.log(0.52 / 0.46))
    assert fidelity.margin({"fashion": 1.0, "chitchat": 0.0, "off_topic": 0.0}) == pytest.approx(
        -math.log(fidelity.EPS))  # a certain label: large, finite
    assert fidelity.margins_text("m.gguf", {"disagreement_margins": []}) is None
    assert fidelity.margins_text("m.gguf", {}) is None  # no reference: no margins
    text = fidelity.margins_text("m.gguf", {"disagreement_margins": [0.4, 0.07, 0.09]})
    assert text.startswith("m.gguf: the fp reference decides its 3 disagreeing queries by margins of "
                           "0.07, 0.09, 0.40 nats")
    assert "1 disagreeing query by margins of 0.07" in fidelity.margins_text("m", {"disagreement_margins": [0.07]})
    # 195 misses (a random-weight 3B file) print one line: the first ten and the largest
    many = fidelity.margins_list([i / 50 for i in range(195, 0, -1)])
    assert many == "0.02, 0.04, 0.06, 0.08, 0.10, 0.12, 0.14, 0.16, 0.18, 0.20, ... and 185 more, up to 3.90"
    assert fidelity.margins_list([0.3, 0.1] * 6) == ", ".join(["0.10"] * 6 + ["0.30"] * 6)


def test_next_token_figures():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(5, 50)).astype(np.float32)
    same = fidelity.next_token_figures(ref, ref)
    assert same == {"n_positions": 5, "top1_agreement": 1.0, "mean_kl": pytest.approx(0.0, abs=1e-12)}
    cand = ref.copy()
    cand[0, np.argmax(ref[0])] -= 100.0  # moves the argmax of one row
    f = fidelity.next_token_figures(ref, cand)
    assert f["top1_agreement"] == pytest.approx(0.8) and f["mean_kl"] > 0
    # a padded candidate vocabulary: only shared columns count
    padded = np.concatenate([ref, np.full((5, 7), 50.0, np.float32)], axis=1)
    assert fidelity.next_token_figures(ref, padded)["top1_agreement"] == 1.0


def _cands(*figs, n=400):
    return [Candidate(name=name, qtype=name.split("+")[0], size_bytes=s, agreement=a, n=n, complete=c)
            for name, s, a, c in figs]


def test_lower_bound_is_clopper_pearson():
    # no disagreement: the bound is alpha ** (1 / n); 200 queries cannot show 99%
    assert fidelity.lower_bound(200, 200) == pytest.approx(0.05 ** (1 / 200), abs=1e-9)
    assert fidelity.lower_bound(200, 200) < 0.99 < fidelity.lower_bound(400, 400)
    assert fidelity.lower_bound(0, 10) == 0.0 and fidelity.lower_bound(5, 0) == 0.0
    # one disagreement in 557: the Poisson-like limit 1 - 4.74/557 (exact: 0.99151)
    assert fidelity.lower_bound(556, 557) == pytest.approx(0.99151, abs=1e-4)
    assert fidelity.max_misses(557, 0.99) == 1 and fidelity.max_misses(400, 0.99) == 0
    assert fidelity.max_misses(200, 0.99) is None
    assert "95% lower bound 99.3%, n=400" in fidelity.describe_agreement(1.0, 400)


def test_stored_figures_get_their_bound_here():
    """serve shows the figures convert stored in the GGUF; the file keeps agreement and n, and the
    bound comes from the same arithmetic as convert's, for complete runs only."""
    stored = json.dumps({"chosen": "q8_0", "agreement": 1.0, "n": 400, "complete": True})
    figs = fidelity.stored_figures(stored)
    assert figs["bound"] == fidelity.lower_bound(400, 400) and 0.992 < figs["bound"] < 0.993
    assert figs["chosen"] == "q8_0" and figs["confidence"] == 0.95
    stopped = fidelity.stored_figures(json.dumps({"agreement": 0.98, "n": 160, "complete": False}))
    assert stopped["bound"] is None and stopped["agreement"] == 0.98  # an upper bound: no lower one
    assert fidelity.stored_figures(json.dumps({"agreement": 0.5}))["bound"] is None
    assert fidelity.stored_figures(None) is None
    assert "error" in fidelity.stored_figures("[1, 2]") and "error" in fidelity.stored_figures("{oops")


def test_select_smallest_meeting_target():
    cands = _cands(("q4_k_m+imatrix", 1_900, 0.975, True),
                   ("q4_k_m+imatrix+mixed", 2_000, 1.0, True),
                   ("q5_k_m", 2_200, 1.0, True),
                   ("q6_k", 2_500, 1.0, True))
    chosen, why, met = fidelity.select(cands, 0.99)
    assert chosen.name == "q4_k_m+imatrix+mixed" and met
    assert "meets the 99.0% target" in why and "q4_k_m+imatrix agreement 97.5%" in why
    assert "lower bound 99.3%, n=400" in why
    # the order given does not matter: the smallest meeting file wins
    chosen, _, _ = fidelity.select(list(reversed(cands)), 0.99)
    assert chosen.name == "q4_k_m+imatrix+mixed"
    # a lower target lets the plain imatrix file through (390/400: bound 95.8%)
    assert fidelity.select(cands, 0.95)[0].name == "q4_k_m+imatrix"
    assert fidelity.select(cands, 0.97)[0].name == "q4_k_m+imatrix+mixed"  # 97.5% point, bound below


def test_select_judges_by_the_bound_not_the_point_estimate():
    # 100% of 200 queries shows only 98.5%: not a pass at 99%, and the reason says why
    cands = _cands(("q4_k_m+imatrix", 1_900, 1.0, True), n=200)
    chosen, why, met = fidelity.select(cands, 0.99)
    assert not met and chosen.name == "q4_k_m+imatrix"
    assert "cannot show 99.0%" in why and "larger --calib" in why
    w = fidelity.explicit_warning("q8_0", 1.0, 0.99, n=200)
    assert w.startswith("WARNING: q8_0") and "too few" in w
    assert fidelity.explicit_warning("q8_0", 1.0, 0.99, n=400) is None


def test_select_none_meets_target_is_loud():
    cands = _cands(("q4_k_m+imatrix", 1_900, 0.80, False),  # stopped early
                   ("q4_k_m+imatrix+mixed", 2_000, 0.95, True),
                   ("q5_k_m", 2_200, 0.97, True),
                   ("q6_k", 2_500, 0.97, True))
    chosen, why, met = fidelity.select(cands, 0.99)
    assert not met
    assert chosen.name == "q5_k_m"  # best bound, smaller on a tie
    assert why.startswith("NO candidate reached the 99.0%")
    assert "q4_k_m+imatrix stopped after 400 queries, 80 answered otherwise (at most 80.0%)" in why
    assert "q5_k_m agreement 97.0%" in why


def test_select_prefers_a_measured_file_to_a_stopped_one_on_a_tie():
    # all stopped at their first disagreement of 400 look like 399/400: only the whole run is
    # known to be that good, so the smallest of them must not win by the tie
    cands = _cands(("iq4_xs+imatrix", 1_700, 0.9975, False), ("mixed+imatrix", 2_100, 0.9975, True),
                   ("q8_0", 2_700, 0.9975, False))
    chosen, _, met = fidelity.select(cands, 0.99)
    assert chosen.name == "mixed+imatrix" and not met


def test_select_never_counts_incomplete_runs():
    # stopped early with an upper bound above the target: still not a pass
    cands = _cands(("q4_k_m+imatrix", 1_900, 0.995, False), ("q6_k", 2_500, 1.0, True))
    chosen, _, met = fidelity.select(cands, 0.99)
    assert chosen.name == "q6_k" and met
    with pytest.raises(ValueError):
        fidelity.select([Candidate("x", "q4_k_m")], 0.99)


def test_explicit_warning():
    assert fidelity.explicit_warning("q4_k_m", 0.995, 0.99) is None
    w = fidelity.explicit_warning("q4_k_m", 0.775, 0.99, n=120)
    assert w.startswith("WARNING: q4_k_m") and "77.5%" in w and "n=120" in w and "99.0%" in w


def test_tables_render():
    t = fidelity.format_table([{"name": "a", "agreement": 0.5, "bytes": 2_000_000}],
                              [("name", "model", "str"), ("agreement", "agree", "pct"),
                               ("bytes", "size", "size")])
    assert "50.0%" in t and "2.00 MB" in t
    c = fidelity.format_confusion([[1, 2, 0], [0, 3, 0], [0, 0, 4]], LABELS)
    assert c.splitlines()[0].split()[1:] == list(LABELS)


def test_mixed_patterns_hit_the_intended_tensors():
    # Qwen2.5-0.5B's widths: 896 fits no K-quant, ffn_down's 4864 does
    shapes = {"attn_v": (896, 2_752_512), "ffn_down": (4864, 104_595_456), "output": (896, 136_134_656)}
    mix = mixed.overrides({"attn_v": 1, "ffn_down": 2, "output": 0}, shapes)

    def first_match(name):
        for pat, t in mix.items():
            if re.search(pat, name):
                return t
        return None

    assert mixed.ladder(896) == ("q8_0", "q5_1", "iq4_nl")
    assert mixed.ladder(2048) == ("q8_0", "q6_k", "iq4_xs")
    assert first_match("blk.2.attn_v.weight") == "q5_1"
    assert first_match("blk.0.ffn_down.weight") == "iq4_xs"
    assert first_match("output.weight") is None  # rung 0: the q8_0 base itself
    assert first_match("token_embd.weight") is None and first_match("blk.1.attn_q.weight") is None
    mix = mixed.parse_spec("last=q6_k", 4)
    assert first_match("blk.3.attn_q.weight") == "q6_k"
    assert first_match("blk.30.attn_q.weight") is None  # ^blk\.3\. must not catch block 30
    spec = mixed.parse_spec("attn_v=q8_0, last=q6_k, blk2=q5_k, re:ffn_(up|gate)=q5_k", 4)
    assert spec == {r"\.attn_v\.weight$": "q8_0", r"^blk\.3\.": "q6_k", r"^blk\.2\.": "q5_k",
                    "ffn_(up|gate)": "q5_k"}
    assert mixed.describe(spec).startswith("attn_v=q8_0,blk3=q6_k,blk2=q5_k")
    for bad in ("attn_v", "attn_v=q3", "nope=q6_k", "blk9=q6_k", "re:(=q6_k"):
        with pytest.raises(ValueError):
            mixed.parse_spec(bad, 4)


def test_allocate_finds_the_cheapest_rungs_that_save_enough():
    """The mix is the least summed label cost among the rung choices that save the bytes asked
    for: here one group at its 4-bit rung is cheaper than the two 6-bit rungs a byte-greedy
    choice would take; a tie goes to the larger saving; an impossible saving gives None."""
    costs = {"embd": [0, 0.002, 0.010], "output": [0, 0.001, 0.0015], "ffn_up": [0, 0.003, 0.004]}
    saved = {"embd": [0, 40, 60], "output": [0, 40, 60], "ffn_up": [0, 30, 50]}
    assert mixed.allocate(costs, saved, 60) == {"embd": 0, "output": 2, "ffn_up": 0}
    assert mixed.allocate(costs, saved, 90) == {"embd": 1, "output": 2, "ffn_up": 0}
    assert mixed.allocate(costs, saved, 0) == {"embd": 0, "output": 0, "ffn_up": 0}
    assert mixed.allocate(costs, saved, 171) is None
    tie = mixed.allocate({"a": [0, 0.0, 0.0]}, {"a": [0, 10, 20]}, 5)
    assert tie == {"a": 2}
    # the brute force agrees with every feasible alternative
    import itertools
    best = mixed.allocate(costs, saved, 75)
    total = lambda r: sum(costs[g][i] for g, i in r.items())  # noqa: E731
    for rungs in itertools.product(range(3), repeat=3):
        r = dict(zip(costs, rungs))
        if sum(saved[g][i] for g, i in r.items()) >= 75:
            assert total(best) <= total(r)


def test_convert_table_has_reference_row_and_explicit_row():
    """The table `qwen-local convert` prints for an explicit quant: the fp reference's accuracy,
    then the measured file named after its imatrix/--keep options."""
    from qwen_local.convert.fidelity.report import summary_table_one

    report = {"quant": "q4_k_m", "imatrix": {"entries": 15}, "mixed": "attn_v=q8_0",
              "reference": "peft float32", "reference_accuracy": 0.9, "min_agreement": 0.99,
              "calibration": {"n": 10, "source": "c.jsonl", "labelled": 10},
              "figures": {"bytes": 2_000_000, "agreement": 0.8, "label_kl": 0.01, "accuracy": 0.7,
                          "next_token_top1": 0.75, "next_token_kl": 0.1, "complete": True, "n": 10,
                          "bits_per_weight": 4.85}}
    lines = summary_table_one(report).splitlines()
    assert lines[0] == ("task fidelity vs peft float32 on 10 calibration queries (c.jsonl, 10 labelled); "
                        "target label agreement 99.0%:")
    assert lines[1].split()[:6] == ["candidate", "size", "bpw", "agreement", "95%", "low"]
    assert lines[3].split() == ["fp", "reference", "-", "-", "-", "-", "-", "-", "90.0%", "-", "-", "-"]
    # 8 of 10 agreeing: the 95% lower bound is 49.3%
    assert lines[4].split() == ["q4_k_m+imatrix+keep", "2.00", "MB", "4.85", "80.0%", "49.3%", "10", "0.0100",
                                "70.0%", "75.0%", "0.1000", "True"]
