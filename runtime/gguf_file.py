"""A GGUF file's header, read and rewritten without the gguf library's per-element objects.

`gguf.GGUFReader` builds Python objects for every element of the 152k-token vocabulary arrays
(seconds per file, tens of seconds on a loaded box); these functions only find byte ranges:
- `read_header`: key/value and tensor-info byte ranges, tensor names, shapes, types and offsets;
- `read_values`: the key/values (arrays as their length);
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


class _Cursor:
    """Reads a GGUF header front to back, loading the file in growing chunks only as far as the
    header goes (the tensor data after it is never read)."""

    def __init__(self, f, path, head: bytes):
        self.f, self.path = f, path
        self.data = bytearray(head)
        self.pos = len(head)

    def need(self, n: int) -> None:
        while len(self.data) < self.pos + n:
            chunk = self.f.read(max(1 << 20, n))
            if not chunk:
                raise ValueError(f"{self.path}: truncated GGUF header")
            self.data.extend(chunk)

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        self.need(size)
        v = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += size
        return v

    def u32(self) -> int:
        return self.take("<I")

    def u64(self) -> int:
        return self.take("<Q")

    def string(self) -> str:
        n = self.u64()
        self.need(n)
        v = bytes(self.data[self.pos:self.pos + n]).decode("utf-8", "replace")
        self.pos += n
        return v

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def skip_value(self, t: int) -> None:
        if t in _SCALAR:
            self.skip(_SCALAR[t])
        elif t == _STRING:
            self.skip(self.u64())
        elif t == _ARRAY:
            et, n = self.u32(), self.u64()
            if et in _SCALAR:
                self.skip(_SCALAR[et] * n)
            else:
                for _ in range(n):
                    self.skip_value(et)
        else:
            raise ValueError(f"{self.path}: unknown GGUF value type {t}")


def read_header(path: str | Path) -> Header:
    """Byte layout of a GGUF (v2/v3) header, skipping values without decoding them: fast even
    with the 152k-token vocabulary arrays (gguf.GGUFReader builds objects for every element)."""
    with open(path, "rb") as f:
        head = f.read(24)
        magic, version, n_tensors, n_kv = struct.unpack("<IIQQ", head)
        if magic != 0x46554747:
            raise ValueError(f"{path} is not a GGUF file")
        c = _Cursor(f, path, head)
        kvs, alignment = [], 32
        for _ in range(n_kv):
            start = c.pos
            key = c.string()
            t = c.u32()
            if key == "general.alignment" and t == 4:
                c.need(4)
                alignment = struct.unpack_from("<I", c.data, c.pos)[0]
            c.skip_value(t)
            kvs.append((key, start, c.pos))
        infos_start = c.pos
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            dims = tuple(c.u64() for _ in range(c.u32()))
            ttype = c.u32()
            tensors.append((name, dims, ttype, c.u64()))
    pos = c.pos
    h = Header(version, kvs, tensors, (infos_start, pos), alignment, pos + (-pos) % alignment)
    h._bytes = bytes(c.data[:pos])  # type: ignore[attr-defined]
    return h


_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
           12: "<d"}


def read_values(path: str | Path, header: Header | None = None) -> dict[str, object]:
    """Each key's value: numbers, bools and strings as such, an array as its length (decoding the
    vocabulary's elements is what makes gguf.GGUFReader slow)."""
    h = header or read_header(path)
    raw = h._bytes  # type: ignore[attr-defined]
    out: dict[str, object] = {}
    for key, start, end in h.kvs:
        pos = start + 8 + len(key.encode("utf-8"))
        t = struct.unpack_from("<I", raw, pos)[0]
        pos += 4
        if t in _FORMAT:
            out[key] = struct.unpack_from(_FORMAT[t], raw, pos)[0]
        elif t == _STRING:
            n = struct.unpack_from("<Q", raw, pos)[0]
            out[key] = raw[pos + 8:pos + 8 + n].decode("utf-8", "replace")
        else:  # array: element type, then its length
            out[key] = struct.unpack_from("<Q", raw, pos + 4)[0]
    return out


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
