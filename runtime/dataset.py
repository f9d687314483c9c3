"""The labelled query sets: the packaged Vietnamese intent set, its calibration / held-out split,
and user JSONL files of {"query", "label"?, "tags"?, "id"?} lines.

`eval` measures on them, `convert` calibrates on them and the synthetic intent adapter trains on
them; every problem with a file is one UserError naming the file and line.
"""
from __future__ import annotations

import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

from qwen_local.runtime.errors import UserError

ALLOWED_KEYS = {"query", "label", "tags", "id"}


@dataclass
class Dataset:
    queries: list[str]
    labels: list[str | None]           # None where the line has no label
    tags: list[list[str]]
    source: str

    @property
    def labelled(self) -> bool:
        return any(x is not None for x in self.labels)

    def __len__(self) -> int:
        return len(self.queries)

    def head(self, n: int | None) -> "Dataset":
        """The first n queries (all of them when n is None or 0)."""
        if not n:
            return self
        return Dataset(self.queries[:n], self.labels[:n], self.tags[:n], self.source)


# The packaged set is split once: its first CALIBRATION_QUERIES lines calibrate `convert` by
# default (imatrix, the reference labels that candidates are chosen by); the rest are never seen
# by a conversion, so figures on them are held-out.
CALIBRATION_QUERIES = 400
SPLITS = ("all", "calibration", "heldout")


def packaged(split: str = "all", labels=("fashion", "chitchat", "off_topic")) -> Dataset:
    """The packaged set, or its calibration / held-out split."""
    data = load_data(None, labels)
    if split == "all":
        return data
    sl = slice(0, CALIBRATION_QUERIES) if split == "calibration" else slice(CALIBRATION_QUERIES, None)
    first, last = (1, CALIBRATION_QUERIES) if split == "calibration" else (CALIBRATION_QUERIES + 1, len(data))
    return Dataset(data.queries[sl], data.labels[sl], data.tags[sl],
                   f"{data.source}, {split} split (lines {first}-{last})")


def default_data_path():
    return importlib.resources.files("qwen_local.runtime") / "data" / "intent_vi.jsonl"


def load_data(path: str | Path | None, labels=("fashion", "chitchat", "off_topic"), *,
              require_labels: bool = False, what: str = "data file") -> Dataset:
    """Read a JSONL file of {"query", "label"?, "tags"?, "id"?} lines; any problem is a one-line
    UserError naming the file and line."""
    if path is None:
        res = default_data_path()
        text, source = res.read_text(encoding="utf-8"), "packaged intent_vi.jsonl"
    else:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise UserError(f"{what} {p} not found" if not p.exists() else f"{what} {p} is not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{what} {p} is not UTF-8 text (expected JSONL)") from None
        except OSError as e:
            raise UserError(f"cannot read {what} {p}: {e.strerror or e}") from None
    labels = tuple(labels)
    qs, ls, ts = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{what} {source}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not JSON ({e.msg}); expected one "
                              '{"query": ..., "label": ...} object per line') from None
        if not isinstance(obj, dict):
            raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - ALLOWED_KEYS)
        if unknown:
            raise UserError(f"{where}: unknown keys {unknown} (allowed: {sorted(ALLOWED_KEYS)})")
        q = obj.get("query")
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"{where}: missing or empty \"query\" string")
        lab = obj.get("label")
        if lab is not None and lab not in labels:
            raise UserError(f"{where}: unknown label {lab!r} (labels: {', '.join(labels)})")
        if lab is None and require_labels:
            raise UserError(f"{where}: no \"label\" (this command needs labelled data)")
        tags = obj.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise UserError(f"{where}: \"tags\" must be a list of strings")
        qs.append(q)
        ls.append(lab)
        ts.append(tags)
    if not qs:
        raise UserError(f"{what} {source} holds no queries")
    return Dataset(qs, ls, ts, source)


def exclude(data: Dataset, path: str | Path) -> Dataset:
    """data without the queries of a JSONL file (its "query" or "text" fields, e.g. the adapter's
    training set), so that the figures are held-out."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
        seen = {_norm(o.get("query", o.get("text", ""))) for o in map(json.loads, filter(str.strip, lines))}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise UserError(f"cannot read --exclude file {path}: {e}") from None
    keep = [i for i, q in enumerate(data.queries) if _norm(q) not in seen]
    return Dataset([data.queries[i] for i in keep], [data.labels[i] for i in keep],
                   [data.tags[i] for i in keep], f"{data.source} without the {len(data) - len(keep)} "
                   f"queries of {Path(path).name}")


def _norm(q: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFC", q).strip().casefold()
