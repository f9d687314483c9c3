"""`qwen-local convert` end to end (convert.pipeline, convert.staging): the console script, --quant
auto, option errors, and nothing partial left behind on a failure, Ctrl-C or a full disk."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from qwen_local.convert.pipeline import run  # noqa: E402
from qwen_local.convert.quantize import QTYPES  # noqa: E402
from convert_checks import (QUIET, THREADS, assert_clean_failure, convert_cli, fidelity_meta,  # noqa: E402
                            gguf_fields)

REPO = Path(__file__).resolve().parents[1]


def test_unknown_quant_type(tiny_adapter, out_dir, capfd):
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--quant", "q3_xx", "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "unknown quant type", "q4_k_m")


def test_not_enough_disk(tiny_adapter, out_dir, capfd, monkeypatch):
    """A disk that cannot hold the conversion's files is refused before any work: one line that
    says how much is free and how much is needed, nothing written."""
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 30, 10 << 30, 1 << 20))
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "not enough free disk space", "1.05 MB free, about",
                         "needed")


@pytest.mark.slow
def test_ctrl_c_leaves_nothing(tiny_adapter, out_dir, capfd, monkeypatch):
    from qwen_local.convert import export

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


@pytest.mark.slow
def test_failed_verification_publishes_nothing(tiny_adapter, out_dir, small_calib, capfd, monkeypatch):
    from qwen_local.convert.fidelity import parity

    # the real check is exercised by the parity tests; here only the outcome of a failing one matters
    monkeypatch.setattr(parity, "check_gguf", lambda *a, **k: {"passed": False, "failures": ["forced failure"]})
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--quant", "f32", "--calib", str(small_calib),
                              "--out", str(out_dir / "m.gguf")], capfd)
    assert_clean_failure(rc, err, out_dir, "verification failed", "was not written")


CONSOLE_SCRIPT = "import sys; from qwen_local import main; sys.exit(main())"  # what `qwen-local` runs


@pytest.mark.slow
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
    meta = fidelity_meta(out)
    assert meta["met_target"] is fid["met_target"] and meta.get("warning") == fid.get("warning")
    assert meta["agreement"] == fid["figures"]["agreement"]

    p = subprocess.run([sys.executable, "-c", CONSOLE_SCRIPT, "convert", "--adapter", str(tmp_path / "nope"),
                        "--out", str(tmp_path / "x.gguf")], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.slow
def test_auto_end_to_end_one_reference_load(tiny_base, tiny_adapter, small_calib, tmp_path, capfd):
    """--quant auto picks a candidate, names the file after it, and the figures reach the sidecar
    and the GGUF header; the fp reference is loaded once for parity, imatrix and fidelity."""
    from qwen_local.convert.fidelity.peft_model import Reference

    out_dir = tmp_path / "models"
    out_dir.mkdir()
    loads = Reference.loads
    rc, out, err = convert_cli(["--adapter", str(tiny_adapter), "--base", str(tiny_base), "--quant", "auto",
                                "--calib", str(small_calib), "--out", str(out_dir)], capfd)
    assert rc == 0, err
    assert Reference.loads == loads + 1
    side_file = next(out_dir.glob("*.gguf.json"))
    side = json.loads(side_file.read_text())
    fid = side["fidelity"]
    gguf = Path(side["output"])
    assert side["requested_quant"] == "auto" and side["quant"] == fid["quant"]
    assert gguf.name == f"{tiny_adapter.name}-{fid['quant']}.gguf"
    assert sorted(p.name for p in out_dir.iterdir()) == sorted(
        [gguf.name, side_file.name] + ([Path(side["lora"]).name] if side["lora"] else []))
    names = [c["name"] for c in fid["candidates"]]
    # the default budget: the LoRA candidate first, nothing over 1.10x the q4_k_m file
    assert names[0] == "q4_k_m+imatrix+lora" and fid["chosen"] in names
    assert {"mixed+imatrix", "q6_k+imatrix", "q8_0"}.isdisjoint(names)
    assert fid["max_size"] == 1.10 and fid["budget"]["bytes"] >= max(
        c["size_bytes"] for c in fid["candidates"])
    assert fid["calibration"]["n"] == 3
    assert fid["imatrix"] is None or fid["imatrix"]["entries"] >= 14
    # 3 queries cannot show 99%: the most faithful file is written, with the warning
    assert not fid["met_target"] and fid["warning"] in err and "--max-size none" in err
    assert "candidate" in out and "fp reference" in out  # the printed table
    assert set(side["timings"]) >= {"reference_load", "parity_reference", "reference_passes",
                                    "export_base", "export_lora", "quantize_fidelity", "verify"}
    assert "merge_export_f32" not in side["timings"]  # no q8_0-based candidate in the budget
    sources = {c["name"]: c["extra"]["source"] for c in fid["candidates"]}
    assert set(sources.values()) == {"f16"}
    meta = fidelity_meta(gguf)
    assert meta["chosen"] == fid["chosen"] and meta["agreement"] == fid["figures"]["agreement"]
    assert meta["met_target"] == fid["met_target"] and meta["budget"] == fid["budget"]
    assert side["bytes"] == gguf.stat().st_size + (Path(side["lora"]).stat().st_size
                                                   if side["lora"] else 0)


@pytest.mark.slow
def test_auto_publishes_the_lora_pair(tiny_base, tiny_adapter, small_calib, tmp_path, capfd,
                                      monkeypatch):
    """When the LoRA candidate is chosen (here the only one), the base and its LoRA file appear
    together: the base names the LoRA file by its published name and sha256, the final line gives
    the size of both, the parity check ran with the LoRA, and serve's engine loads the pair."""
    from qwen_local.convert.fidelity import search
    from qwen_local.runtime.engine import Engine
    from qwen_local.runtime.lora import LORA_KEY

    monkeypatch.setattr(search, "LADDER", tuple(p for p in search.LADDER if p.lora))
    out = tmp_path / "m.gguf"
    rc, stdout, err = convert_cli(["--adapter", str(tiny_adapter), "--base", str(tiny_base),
                                   "--calib", str(small_calib), "--out", str(out)], capfd)
    assert rc == 0, err
    lora = tmp_path / "m.lora.gguf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "m.gguf.json", "m.lora.gguf"]
    side = json.loads((tmp_path / "m.gguf.json").read_text())
    assert side["lora"] == str(lora) and side["fidelity"]["lora"]["file"] == str(lora)
    assert side["bytes"] == out.stat().st_size + lora.stat().st_size
    named = json.loads(gguf_fields(out)[LORA_KEY])
    assert named["file"] == "m.lora.gguf" and named["bytes"] == lora.stat().st_size
    assert "in all, with its LoRA file m.lora.gguf" in stdout.strip().splitlines()[-1]
    assert side["verification"]["passed"] and side["verification"]["positions"] > 250
    with Engine(out, threads=THREADS, n_ctx=1024, slots=1) as engine:
        info = engine.describe()
    assert info["lora"]["file"] == str(lora) and info["bytes"] == side["bytes"]


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
    (["--max-size", "0"], ["--max-size", "> 0"]),
    (["--quant", "f16+lora"], ["f16 is not quantized"]),
    (["--quant", "q3+lora"], ["unknown quant type", "+ lora"]),
    (["--max-size", "big"], ["--max-size", "none"]),
    (["--threads", "0"], ["--threads", "from 1 to 1024"]),
])
def test_bad_fidelity_options(args, needles, tiny_adapter, tmp_path, out_dir, capfd):
    (tmp_path / "bad.jsonl").write_text('{"query": "chào shop", "label": "chitchat"}\n{"query": oops}\n')
    (tmp_path / "badlabel.jsonl").write_text('{"query": "chào", "label": "greeting"}\n')
    args = [a.format(missing=tmp_path / "none.jsonl", bad=tmp_path / "bad.jsonl",
                     badlabel=tmp_path / "badlabel.jsonl") for a in args]
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--out", str(out_dir / "m.gguf"), *args], capfd)
    assert_clean_failure(rc, err, out_dir, *needles)


@pytest.mark.slow
def test_no_verify_loads_no_reference(tiny_adapter, tmp_path):
    from qwen_local.convert.fidelity.peft_model import Reference

    loads = Reference.loads
    out = tmp_path / "m.gguf"
    report = run(str(tiny_adapter), quant="q8_0", out=out, verify=False, **QUIET)
    assert Reference.loads == loads and report["fidelity"] is None and report["verification"] is None
    assert "qwen_local.fidelity" not in gguf_fields(out)
    # q8_0 is quantized from f32 (one rounding, not f16's and then q8_0's)
    assert report["intermediate"] == "f32" and report["quant"] == "q8_0"


@pytest.mark.slow
def test_an_explicit_type_with_the_lora_apart(tiny_base, tiny_adapter, make_adapter, small_calib,
                                              tmp_path, capfd):
    """--quant T+lora: the base quantized to T and the LoRA file beside it, verified or not; an
    adapter with no LoRA on the blocks' projections has nothing to keep apart."""
    from qwen_local.runtime.lora import LORA_KEY

    fast = tmp_path / "fast.gguf"
    rc, _, err = convert_cli(["--adapter", str(tiny_adapter), "--base", str(tiny_base), "--quant",
                              "q4_k_m+lora", "--no-verify", "--out", str(fast)], capfd)
    assert rc == 0, err
    assert json.loads(gguf_fields(fast)[LORA_KEY])["file"] == "fast.lora.gguf"
    assert gguf_fields(fast)["_tensors"]["blk.0.attn_q.weight"] == "Q4_K"
    out = tmp_path / "q8.gguf"
    rc, stdout, err = convert_cli(["--adapter", str(tiny_adapter), "--base", str(tiny_base),
                                   "--quant", "q8_0+lora", "--calib", str(small_calib),
                                   "--out", str(out)], capfd)
    assert rc == 0, err
    side = json.loads(Path(str(out) + ".json").read_text())
    assert side["quant"] == "q8_0+lora" and side["lora"] == str(tmp_path / "q8.lora.gguf")
    assert side["verification"]["passed"] and side["fidelity"]["lora"]["file"] == side["lora"]
    assert "q8_0+lora " in stdout  # the fidelity table's row
    embedding_only = make_adapter("embedding-only", targets=["embed_tokens"])
    rc, _, err = convert_cli(["--adapter", str(embedding_only), "--base", str(tiny_base), "--quant",
                              "q4_k_m+lora", "--out", str(tmp_path / "x.gguf")], capfd)
    assert rc == 2 and "no LoRA on the decoder blocks" in err
    assert not (tmp_path / "x.gguf").exists()
