"""What the convert tests share: settings, a minimal GGUF reader, the CLI in-process with its
one-line-error check, and the adapter cases the parity tests run."""
from __future__ import annotations

import json
from pathlib import Path

import qwen_local

THREADS = 2
# max_queries: the task-fidelity part of verification on 2 calibration queries (the default is 200)
QUIET = dict(log=lambda s: None, progress=False, threads=THREADS, max_queries=2)



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


def gguf_fields(path: Path) -> dict:
    """Key/values (arrays as their length) and {tensor: type name} of a GGUF, through the
    project's one header reader (runtime.gguf_file)."""
    import gguf

    from qwen_local.runtime.gguf_file import read_header, read_values

    h = read_header(path)
    out = read_values(path, h)
    out["_tensors"] = {n: gguf.GGMLQuantizationType(t).name for n, _, t, _ in h.tensors}
    return out


def fidelity_meta(path: Path) -> dict:
    from qwen_local.convert.fidelity.report import METADATA_KEY

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


def gguf_tensors(path):
    """{name: (dims, type name, raw bytes)}, read with the fast header scanner (gguf.GGUFReader
    takes tens of seconds on the 152k-token vocabulary under load)."""
    import gguf

    from qwen_local.runtime.gguf_file import read_header, tensor_bytes

    h = read_header(path)
    return {n: (dims, gguf.GGMLQuantizationType(t).name, tensor_bytes(path, n, h)[1])
            for n, dims, t, _ in h.tensors}
