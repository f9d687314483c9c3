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
    """Key/values (arrays as their length) and {tensor: type name} of a GGUF.

    A minimal reader of the GGUF layout: gguf.GGUFReader takes ~7 s on a 152k-token vocabulary."""
    import struct

    import gguf

    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    with open(path, "rb") as f:
        buf = f.read(64 << 20)  # header + kv + tensor infos are far smaller than this
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return v[0]

    def string():
        nonlocal pos
        n = take("Q")
        pos += n
        return buf[pos - n:pos].decode("utf-8")

    def value(t):
        if t == 8:
            return string()
        if t == 9:
            et, n = take("I"), take("Q")
            for _ in range(n):
                value(et)
            return n
        return take(scalar[t])

    assert buf[:4] == b"GGUF"
    pos = 4
    take("I")
    n_tensors, n_kv = take("Q"), take("Q")
    out = {}
    for _ in range(n_kv):
        key = string()
        out[key] = value(take("I"))
    tensors = {}
    for _ in range(n_tensors):
        name = string()
        for _ in range(take("I")):
            take("Q")
        tensors[name] = gguf.GGMLQuantizationType(take("I")).name
        take("Q")
    out["_tensors"] = tensors
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
