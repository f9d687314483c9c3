"""Intent in one forward pass: label probabilities from the next-token distribution.

Under a grammar that only admits the labels, the first generated token fixes the label, because
the labels' prefix-token groups are disjoint (f|fa|fas vs c|ch|chi vs o|of|off). So the probability
that constrained decoding yields a label is the softmax mass of its group; no decoding is needed.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


def prefix_groups(labels: Iterable[str], pieces: Iterable[tuple[int, bytes]]) -> dict[str, np.ndarray]:
    """For each label, the ids of every token whose bytes are a non-empty prefix of that label."""
    labels = list(labels)
    encoded = {lab: lab.encode("utf-8") for lab in labels}
    groups: dict[str, list[int]] = {lab: [] for lab in labels}
    for tid, piece in pieces:
        if not piece:
            continue
        for lab, b in encoded.items():
            if b.startswith(piece):
                groups[lab].append(tid)
    for lab, ids in groups.items():
        if not ids:
            raise ValueError(f"no token of this vocabulary starts the label {lab!r}")
    seen: dict[int, str] = {}
    for lab, ids in groups.items():
        for t in ids:
            if t in seen:
                raise ValueError(f"labels {seen[t]!r} and {lab!r} share a first token (id {t}); "
                                 "labels must start differently")
            seen[t] = lab
    return {lab: np.asarray(ids, dtype=np.int64) for lab, ids in groups.items()}


def label_probs(logits: np.ndarray, groups: dict[str, np.ndarray]) -> dict[str, float]:
    """Normalized probability of each label from one row of next-token logits."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max()
    p = np.exp(z)
    mass = {lab: float(p[ids].sum()) for lab, ids in groups.items()}
    total = sum(mass.values())
    if total == 0.0 or not np.isfinite(total):  # all label tokens underflowed: fall back to logits
        best = {lab: float(z[ids].max()) for lab, ids in groups.items()}
        top = max(best, key=best.get)
        return {lab: float(lab == top) for lab in groups}
    return {lab: m / total for lab, m in mass.items()}


def decide(probs: dict[str, float]) -> str:
    return max(probs, key=probs.get)


def greedy_first_label(logits: np.ndarray, groups: dict[str, np.ndarray]) -> str:
    """The label whose group holds the single most likely allowed token: grammar-greedy's choice."""
    return max(groups, key=lambda lab: float(np.max(np.asarray(logits)[groups[lab]])))
