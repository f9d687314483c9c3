"""`qwen-local eval` end to end on a tiny GGUF, and clear one-line errors for bad data files."""
from __future__ import annotations

import json
import math
import os

import pytest

import qwen_local
from qwen_local.runtime import dataset, measure as evaluate

THREADS = str(min(2, os.cpu_count() or 1))


@pytest.mark.slow
def test_eval_cli_end_to_end(tiny_gguf, tiny_base, tiny_adapter, tmp_path, capsys):
    data = tmp_path / "mini.jsonl"
    rows = [("áo sơ mi trắng size M còn không shop", "fashion"), ("chào bạn nha", "chitchat"),
            ("thủ đô của Pháp là gì", "off_topic"), ("ao khoac bomber nam mau reu", "fashion"),
            ("cảm ơn shop nhiều", "chitchat"), ("giá vàng hôm nay", "off_topic")]
    data.write_text("".join(json.dumps({"query": q, "label": lab, "tags": []}, ensure_ascii=False) + "\n"
                            for q, lab in rows), encoding="utf-8")
    out = tmp_path / "eval.json"
    rc = qwen_local.main(["eval", "--model", str(tiny_gguf), str(tiny_gguf), "--data", str(data),
                          "--reference-base", str(tiny_base), "--reference-adapter", str(tiny_adapter),
                          "--threads", THREADS, "--gen-prompts", "1", "--json", str(out),
                          "--no-progress", "--min-agreement", "1"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "agreement" in text and "gold\\pred" in text and "reference" in text
    report = json.loads(out.read_text())
    # a 100% target: 6 queries cannot show it by the 95% bound, so each row warns, saying why
    assert text.count("WARNING: tiny-q8_0.gguf agrees with the fp reference") == 2
    assert "--calib" not in text  # eval's wording: no convert advice
    assert report["data"] == {"source": str(data), "n": 6, "labelled": 6}
    ref_row, a, b = report["rows"]
    assert ref_row["name"] == "reference" and ref_row["n"] == 6
    for r in (a, b):  # two GGUFs -> two rows, same figures (same file)
        assert r["quant"] == "Q8_0" and r["n"] == 6 and r["complete"]
        assert sum(map(sum, r["confusion"])) == 6
        assert 0.0 <= r["accuracy"] <= 1.0 and set(r["per_label"]) == {"fashion", "chitchat", "off_topic"}
        # q8_0 of the same weights: the labels agree with the fp reference
        assert r["agreement"] >= 5 / 6 and r["label_kl"] < 0.05
        assert r["next_token_top1"] >= 0.5 and r["next_token_positions"] >= 1
        assert r["tokenizer_mismatches"] == 0
    assert a["accuracy"] == b["accuracy"] and a["agreement"] == b["agreement"]


@pytest.mark.slow
def test_eval_without_reference_uses_labels(tiny_gguf, tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "váy hoa đi biển", "label": "fashion"}\n'
                    '{"query": "hello shop", "label": "chitchat"}\n', encoding="utf-8")
    assert qwen_local.main(["eval", "--model", str(tiny_gguf), "--data", str(data),
                            "--threads", THREADS, "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "accuracy" in out and "agreement" not in out.split("\n\n")[1].splitlines()[0]


@pytest.mark.slow
def test_eval_over_http_gives_the_engines_labels_and_excludes_training_queries(trained_gguf, tmp_path):
    """--http reads every label from a real server on 127.0.0.1; its figures equal the in-process
    engine's, and --exclude leaves out the queries of a training file (matched as typed, NFC)."""
    import unicodedata

    data = dataset.load_data(None)
    data = dataset.Dataset(data.queries[:24], data.labels[:24], data.tags[:24], data.source)
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"text": unicodedata.normalize("NFD", q) + " ", "label": lab},
                                        ensure_ascii=False) + "\n"
                             for q, lab in zip(data.queries[:5], data.labels[:5])), encoding="utf-8")
    held = dataset.exclude(data, train)
    assert held.queries == data.queries[5:] and "without the 5 queries of train.jsonl" in held.source
    local = evaluate.measure_gguf(trained_gguf, held, threads=int(THREADS))
    remote = evaluate.measure_gguf(trained_gguf, held, threads=int(THREADS), http=True)
    assert remote["n"] == local["n"] == 19
    assert [max(p, key=p.get) for p in remote["probs"]] == [max(p, key=p.get) for p in local["probs"]]
    assert remote["accuracy"] == local["accuracy"]


@pytest.mark.slow
def test_progress_bars_follow_the_terminal_unless_forced(tiny_gguf, tmp_path, capsys):
    """stderr is captured here, as in a log: no bar by default; --progress forces one."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"query": "váy hoa đi biển", "label": "fashion"}\n', encoding="utf-8")
    base = ["eval", "--model", str(tiny_gguf), "--data", str(data), "--threads", THREADS]
    assert qwen_local.main(base) == 0
    assert "\r" not in capsys.readouterr().err
    assert qwen_local.main(base + ["--progress"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and tiny_gguf.name in err


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    ("this is not json\n", "line 1: not JSON"),
    ('["query", "label"]\n', "expected a JSON object"),
    ('{"query": "áo", "label": "fashion"}\n{"text": "áo", "label": "fashion"}\n', "line 2: unknown keys ['text']"),
    ('{"query": "áo", "label": "shopping"}\n', "unknown label 'shopping'"),
    ('{"label": "fashion"}\n', 'missing or empty "query"'),
    ('{"query": "áo", "tags": "x"}\n', '"tags" must be a list'),
    ("\n\n", "holds no queries"),
])
def test_bad_data_file_is_one_clear_line(tmp_path, capsys, tiny_gguf, content, message):
    path = tmp_path / "bad.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    rc = qwen_local.main(["eval", "--model", str(tiny_gguf), "--data", str(path), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("qwen-local eval: error:")
    assert message in err and "Traceback" not in err


def test_unlabelled_data_without_reference_is_an_error(tiny_gguf, tmp_path, capsys):
    path = tmp_path / "u.jsonl"
    path.write_text('{"query": "áo"}\n', encoding="utf-8")
    assert qwen_local.main(["eval", "--model", str(tiny_gguf), "--data", str(path)]) == 2
    assert "no labels and no reference" in capsys.readouterr().err


def test_missing_model_is_an_error(tmp_path, capsys):
    assert qwen_local.main(["eval", "--model", str(tmp_path / "nope.gguf")]) == 2
    assert "nope.gguf not found" in capsys.readouterr().err


@pytest.mark.slow
def test_measure_stops_once_the_target_is_out_of_reach(tiny_gguf):
    """A reference that disagrees everywhere: after the first chunk a 60% target is gone (8 queries
    with no disagreement show 68.8% by the 95% bound; one disagreement shows less than 60%)."""
    data = dataset.load_data(None)
    data = dataset.Dataset(data.queries[:8], data.labels[:8], data.tags[:8], "first 8")
    plain = evaluate.measure_gguf(tiny_gguf, data, threads=int(THREADS))
    labels = ("fashion", "chitchat", "off_topic")
    flipped = []
    for p in plain["probs"]:
        top = max(p, key=p.get)
        other = labels[(labels.index(top) + 1) % 3]
        flipped.append({lab: 0.9 if lab == other else 0.05 for lab in labels})
    ref = evaluate.ReferenceRun(probs=flipped)
    row = evaluate.measure_gguf(tiny_gguf, data, ref, threads=int(THREADS), stop_below=0.6, chunk=2)
    assert not row["complete"] and row["n_measured"] == 2
    assert row["agreement"] == pytest.approx(6 / 8)  # the best it could still have reached
    assert row["agreement_measured"] == 0.0
    # tolerate: a file that misses is still measured while it could beat the closest one so far
    later = evaluate.measure_gguf(tiny_gguf, data, ref, threads=int(THREADS), stop_below=0.6,
                                  tolerate=3, chunk=2)
    assert not later["complete"] and later["n_measured"] == 4
    full = evaluate.measure_gguf(tiny_gguf, data, ref, threads=int(THREADS), chunk=2)
    assert full["complete"] and full["agreement"] == 0.0 and full["n_measured"] == 8
    # every disagreement is on a label the reference decided firmly: 0.9 against 0.05
    assert full["disagreement_margins"] == [pytest.approx(math.log(18), abs=1e-4)] * 8
    # a target 8 queries cannot show at all stops nothing: the run measures everything
    unshowable = evaluate.measure_gguf(tiny_gguf, data, ref, threads=int(THREADS), stop_below=0.99, chunk=2)
    assert unshowable["complete"] and unshowable["n_measured"] == 8


def test_eval_text_says_where_the_disagreements_lie():
    """A row that disagrees gets one line with the reference's margins on those queries; one that
    agrees everywhere gets none."""
    from qwen_local.convert.dev.evaluate import render

    row = {"name": "m.gguf", "n": 400, "agreement": 0.9925, "disagreements": [3, 9, 40],
           "disagreement_margins": [0.09, 0.07, 0.4]}
    text = render({"rows": [row, dict(row, name="n.gguf", agreement=1.0, disagreements=[],
                                      disagreement_margins=[])],
                   "data": {"source": "c.jsonl", "n": 400}})
    assert ("m.gguf: the fp reference decides its 3 disagreeing queries by margins of "
            "0.07, 0.09, 0.40 nats") in text
    assert "n.gguf: the fp reference" not in text
