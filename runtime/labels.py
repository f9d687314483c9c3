"""Intent in one forward pass: label probabilities from the next-token distribution.

Under a grammar that only admits the labels, the first generated token fixes the label, because
the labels' prefix-token groups are disjoint (f|fa|fas vs c|ch|chi vs o|of|off). So the probability
that constrained decoding yields a label is the softmax mass of its group; no decoding is needed.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np


class PieceIndex:
    """The vocabulary by token bytes, so that any list of labels finds its prefix groups in time
    proportional to the labels' length (a request's guided_choice), not the vocabulary's."""

    def __init__(self, pieces: Iterable[tuple[int, bytes]]):
        self.ids: dict[bytes, list[int]] = {}
        for tid, piece in pieces:
            if piece:
                self.ids.setdefault(piece, []).append(tid)

    def groups(self, labels: Iterable[str]) -> dict[str, np.ndarray]:
        """For each label, the ids of every token whose bytes are a non-empty prefix of that label.
        ValueError when a label has no such token, or two labels share one."""
        groups: dict[str, list[int]] = {}
        for lab in labels:
            b = lab.encode("utf-8")
            groups[lab] = sorted(t for n in range(1, len(b) + 1) for t in self.ids.get(b[:n], ()))
            if not groups[lab]:
                raise ValueError(f"no token of this vocabulary starts the label {lab!r}")
        seen: dict[int, str] = {}
        for lab, ids in groups.items():
            for t in ids:
                if t in seen:
                    raise ValueError(f"labels {seen[t]!r} and {lab!r} share a first token (id {t}); "
                                     "labels must start differently")
                seen[t] = lab
        return {lab: np.asarray(ids, dtype=np.int64) for lab, ids in groups.items()}


def prefix_groups(labels: Iterable[str], pieces: Iterable[tuple[int, bytes]]) -> dict[str, np.ndarray]:
    """For each label, the ids of every token whose bytes are a non-empty prefix of that label."""
    return PieceIndex(pieces).groups(labels)


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
