"""A GGUF file's header, read and rewritten without the gguf library's per-element objects.

`gguf.GGUFReader` builds Python objects for every element of the 152k-token vocabulary arrays
(seconds per file, tens of seconds on a loaded box); these functions only find byte ranges:
- `read_header`: key/value and tensor-info byte ranges, tensor names, shapes, types and offsets;
- `tensor_bytes`: one tensor's raw data;
- `gguf_problem`: why a file is not a whole GGUF (a cut-off download, a quantize that hit a full
  disk), checked before llama.cpp sees it;
- `write_metadata`: add or replace string keys in place of the old header, data copied as bytes,
  atomically (temp file + rename).
"""
from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path


def _gguf_string(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


# fixed sizes of GGUF scalar value types (gguf.GGUFValueType ids)
_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9


@dataclass
class Header:
    version: int
    kvs: list[tuple[str, int, int]]              # (key, start, end) byte ranges of each key/value
    tensors: list[tuple[str, tuple[int, ...], int, int]]  # (name, dims, ggml type, data offset)
    infos: tuple[int, int]                       # byte range of the tensor infos
    alignment: int
    data_offset: int


def read_header(path: str | Path) -> Header:
    """Byte layout of a GGUF (v2/v3) header, skipping values without decoding them: fast even
    with the 152k-token vocabulary arrays (gguf.GGUFReader builds objects for every element)."""
    with open(path, "rb") as f:
        buf = f.read(24)
        magic, version, n_tensors, n_kv = struct.unpack("<IIQQ", buf)
        if magic != 0x46554747:
            raise ValueError(f"{path} is not a GGUF file")
        # read the header region in growing chunks
        data = bytearray(buf)
        pos = 24

        def need(n):
            while len(data) < pos + n:
                chunk = f.read(max(1 << 20, n))
                if not chunk:
                    raise ValueError(f"{path}: truncated GGUF header")
                data.extend(chunk)

        def take(fmt):
            nonlocal pos
            size = struct.calcsize(fmt)
            need(size)
            v = struct.unpack_from(fmt, data, pos)[0]
            pos += size
            return v

        def u64():
            return take("<Q")

        def u32():
            return take("<I")

        def string():
            nonlocal pos
            n = u64()
            need(n)
            v = bytes(data[pos:pos + n]).decode("utf-8", "replace")
            pos += n
            return v

        def skip_value(t):
            nonlocal pos
            if t in _SCALAR:
                need(_SCALAR[t])
                pos += _SCALAR[t]
            elif t == _STRING:
                n = u64()
                need(n)
                pos += n
            elif t == _ARRAY:
                et, n = u32(), u64()
                if et in _SCALAR:
                    need(_SCALAR[et] * n)
                    pos += _SCALAR[et] * n
                else:
                    for _ in range(n):
                        skip_value(et)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {t}")

        kvs, alignment = [], 32
        for _ in range(n_kv):
            start = pos
            key = string()
            t = u32()
            if key == "general.alignment" and t == 4:
                need(4)
                alignment = struct.unpack_from("<I", data, pos)[0]
            skip_value(t)
            kvs.append((key, start, pos))
        infos_start = pos
        tensors = []
        for _ in range(n_tensors):
            name = string()
            nd = u32()
            dims = tuple(u64() for _ in range(nd))
            ttype = u32()
            off = u64()
            tensors.append((name, dims, ttype, off))
        infos = (infos_start, pos)
        data_offset = pos + (-pos) % alignment
        header_bytes = bytes(data[:pos])
    h = Header(version, kvs, tensors, infos, alignment, data_offset)
    h._bytes = header_bytes  # type: ignore[attr-defined]
    return h


def gguf_problem(path: str | Path) -> str | None:
    """Why a file cannot be a whole GGUF (not one, truncated header, tensor data past the end,
    unknown tensor type), or None. Reads the header only: a cut-off download or a quantize that
    hit a full disk is caught before llama.cpp sees it."""
    import gguf

    try:
        h = read_header(path)
    except (ValueError, struct.error, UnicodeDecodeError) as e:
        return str(e) if "GGUF" in str(e) else f"not a valid GGUF ({e})"
    except OSError as e:
        return e.strerror or str(e)
    end = h.data_offset
    for name, dims, ttype, off in h.tensors:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            return f"tensor {name!r} has unknown type {ttype} (corrupt GGUF?)"
        count = 1
        for d in dims:
            count *= d
        end = max(end, h.data_offset + off + count // block * size)
    have = os.path.getsize(path)
    if have < end:
        return f"truncated GGUF: {have} bytes, its header describes {end}"
    return None


def tensor_bytes(path: str | Path, name: str, header: Header | None = None) -> tuple[int, bytes]:
    """(ggml type, raw bytes) of one tensor, read straight from the file."""
    import gguf

    h = header or read_header(path)
    for n, dims, ttype, off in h.tensors:
        if n == name:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
            count = 1
            for d in dims:
                count *= d
            with open(path, "rb") as f:
                f.seek(h.data_offset + off)
                return ttype, f.read(count // block * size)
    raise KeyError(name)


def write_metadata(path: str | Path, values: dict[str, str]) -> None:
    """Add (or replace) string key/values in a GGUF's header without touching the tensor data.

    GGUF: header (magic, version, n_tensors, n_kv), key/values, tensor infos, padding to the
    alignment, then the data, whose offsets are relative to the data section. The new file is the
    old header with the keys spliced in, re-padded, followed by a byte copy of the data section.
    """
    path = Path(path)
    h = read_header(path)
    raw = h._bytes  # type: ignore[attr-defined]
    kept = [(k, a, b) for k, a, b in h.kvs if k not in values]
    kv = b"".join(raw[a:b] for _, a, b in kept)
    for k, v in values.items():
        kv += _gguf_string(k) + struct.pack("<I", _STRING) + _gguf_string(v)
    head = (struct.pack("<IIQQ", 0x46554747, h.version, len(h.tensors), len(kept) + len(values))
            + kv + raw[h.infos[0]:h.infos[1]])
    head += b"\0" * ((-len(head)) % h.alignment)
    tmp = path.with_name(path.name + ".meta.tmp")
    try:
        with open(path, "rb") as src, open(tmp, "wb") as dst:
            dst.write(head)
            src.seek(h.data_offset)
            shutil.copyfileobj(src, dst, 16 << 20)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
