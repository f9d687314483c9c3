"""Task fidelity arithmetic: how far a quantized model's answers are from the fp reference's.

Pure numbers on lists, dicts and arrays (no torch, no llama.cpp), shared by `qwen-local eval`, the
verify step and `--quant auto`:

- intent: accuracy against gold labels, per-label precision/recall/F1, confusion matrix, label
  agreement with the reference and the mean KL(reference || candidate) of the label distributions;
- generation: next-token top-1 agreement and mean KL over full-vocabulary distributions;
- `select`: the `--quant auto` choice (smallest file meeting the agreement target) and
  `explicit_warning` for a quant the user named that misses it.

A target is met when the 95% one-sided Clopper-Pearson lower bound of the agreement reaches it,
not the point estimate: 200 queries without a single disagreement only show 98.5%, so a 99%
target needs at least 299 (the default calibration split has 400). Early stopping uses the same
bound: a candidate is dropped once its disagreements rule the target out (and, in convert's search,
once it can no longer beat the fewest disagreements of a whole run so far).

KL is always KL(reference || candidate) in nats, with probabilities clipped at 1e-12 so that a
candidate giving zero mass to a label the reference likes yields a large, finite number.
"""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from qwen_local.runtime.labels import decide

EPS = 1e-12
DEFAULT_MIN_AGREEMENT = 0.99
CONFIDENCE = 0.95


# ---------------------------------------------------------------------------- confidence bounds

def _binom_tail_ge(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (n up to a few thousand)."""
    import math

    if k <= 0:
        return 1.0
    if p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def lower_bound(agree: int, n: int, confidence: float = CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of a rate seen as agree successes out of n: the
    smallest rate under which seeing >= agree successes still has probability 1 - confidence."""
    if n <= 0 or agree <= 0:
        return 0.0
    alpha, lo, hi = 1.0 - confidence, 0.0, 1.0
    for _ in range(60):  # bisection: the tail grows with p
        mid = (lo + hi) / 2
        if _binom_tail_ge(agree, n, mid) < alpha:
            lo = mid
        else:
            hi = mid
    return lo


def max_misses(n: int, target: float, confidence: float = CONFIDENCE) -> int | None:
    """The most disagreements out of n that still show the target, or None if even none do."""
    d = None
    for misses in range(n + 1):
        if lower_bound(n - misses, n, confidence) < target:
            break
        d = misses
    return d


def kl_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """KL(p || q) in nats for two distributions over the same outcomes (renormalized, clipped)."""
    p = np.clip(np.asarray(p, dtype=np.float64), EPS, None)
    q = np.clip(np.asarray(q, dtype=np.float64), EPS, None)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum(p * (np.log(p) - np.log(q))))


def label_agreement(ref: Sequence[str], cand: Sequence[str]) -> float:
    """Share of items where the candidate picks the reference's label."""
    if len(ref) != len(cand):
        raise ValueError(f"{len(ref)} reference decisions but {len(cand)} candidate decisions")
    if not ref:
        return float("nan")
    return sum(a == b for a, b in zip(ref, cand)) / len(ref)


def mean_label_kl(ref: Sequence[Mapping[str, float]], cand: Sequence[Mapping[str, float]],
                  labels: Sequence[str]) -> float:
    """Mean over items of KL(reference label distribution || candidate label distribution)."""
    if len(ref) != len(cand):
        raise ValueError(f"{len(ref)} reference distributions but {len(cand)} candidate ones")
    if not ref:
        return float("nan")
    return float(np.mean([kl_divergence([r[lab] for lab in labels], [c[lab] for lab in labels])
                          for r, c in zip(ref, cand)]))


def accuracy(gold: Sequence[str | None], pred: Sequence[str]) -> float:
    """Share of labelled items predicted right (items whose gold label is None are skipped)."""
    pairs = [(g, p) for g, p in zip(gold, pred) if g is not None]
    if not pairs:
        return float("nan")
    return sum(g == p for g, p in pairs) / len(pairs)


def confusion_matrix(gold: Sequence[str | None], pred: Sequence[str],
                     labels: Sequence[str]) -> np.ndarray:
    """counts[i, j] = items whose gold label is labels[i] and prediction labels[j]."""
    index = {lab: i for i, lab in enumerate(labels)}
    m = np.zeros((len(labels), len(labels)), dtype=np.int64)
    for g, p in zip(gold, pred):
        if g is None:
            continue
        if g not in index or p not in index:
            raise ValueError(f"label outside {list(labels)}: gold {g!r}, predicted {p!r}")
        m[index[g], index[p]] += 1
    return m


def per_label_prf(gold: Sequence[str | None], pred: Sequence[str],
                  labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per label; an undefined ratio (0/0) is reported as 0."""
    m = confusion_matrix(gold, pred, labels)
    out = {}
    for i, lab in enumerate(labels):
        tp = float(m[i, i])
        predicted = float(m[:, i].sum())
        support = float(m[i, :].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out[lab] = {"precision": precision, "recall": recall, "f1": f1, "support": int(support)}
    return out


def intent_figures(labels: Sequence[str], probs: Sequence[Mapping[str, float]],
                   gold: Sequence[str | None] | None = None,
                   ref_probs: Sequence[Mapping[str, float]] | None = None) -> dict:
    """Every intent figure for one model: accuracy/P/R/F1/confusion when gold labels exist,
    agreement and label KL when reference distributions are given."""
    labels = list(labels)
    pred = [decide(p) for p in probs]
    out: dict = {"n": len(pred), "labels": labels}
    if gold is not None and any(g is not None for g in gold):
        out["n_labelled"] = sum(g is not None for g in gold)
        out["accuracy"] = accuracy(gold, pred)
        out["per_label"] = per_label_prf(gold, pred, labels)
        out["macro_f1"] = float(np.mean([v["f1"] for v in out["per_label"].values()]))
        out["confusion"] = confusion_matrix(gold, pred, labels).tolist()
    if ref_probs is not None:
        ref_pred = [decide(p) for p in ref_probs]
        out["agreement"] = label_agreement(ref_pred, pred)
        out["label_kl"] = mean_label_kl(ref_probs, probs, labels)
        out["disagreements"] = [i for i, (a, b) in enumerate(zip(ref_pred, pred)) if a != b]
        out["disagreement_margins"] = [round(margin(ref_probs[i]), 4) for i in out["disagreements"]]
    return out


def margin(probs: Mapping[str, float]) -> float:
    """How firmly a label distribution decides: log(p_first / p_second), in nats. 0.1 nats is a
    52:48 call, which any quantization may flip."""
    top = sorted((max(float(p), EPS) for p in probs.values()), reverse=True)
    return float(np.log(top[0] / top[1])) if len(top) > 1 else float("inf")


def margins_text(name: str, figures: Mapping) -> str | None:
    """Where a file's disagreements (its `intent_figures`) lie: on near-ties of the reference (a
    coin the reference itself barely tossed), or on labels it decided firmly. None when there is
    none."""
    m = figures.get("disagreement_margins") or []
    if not m:
        return None
    return (f"{name}: the fp reference decides its {len(m)} disagreeing "
            f"quer{'y' if len(m) == 1 else 'ies'} by margins of {margins_list(m)} nats "
            f"(log p1/p2; 0.1 nats is a 52:48 call)")


def margins_list(margins, most: int = 12) -> str:
    """Margins smallest first; a long list keeps its first ones and its largest (the firmest
    decision changed), so a file that misses hundreds of queries still prints one line."""
    m = sorted(margins)
    if len(m) <= most:
        return ", ".join(f"{x:.2f}" for x in m)
    return (", ".join(f"{x:.2f}" for x in m[:most - 2])
            + f", ... and {len(m) - (most - 2)} more, up to {m[-1]:.2f}")


# ---------------------------------------------------------------------------- next-token figures

def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def next_token_figures(ref_logits: np.ndarray, cand_logits: np.ndarray) -> dict:
    """Top-1 agreement and mean KL(ref || cand) over rows of next-token logits ([n, vocab] each).

    The candidate may have a larger vocabulary (padding rows); only the shared columns count.
    """
    ref = np.atleast_2d(np.asarray(ref_logits))
    cand = np.atleast_2d(np.asarray(cand_logits))
    if ref.shape[0] != cand.shape[0]:
        raise ValueError(f"{ref.shape[0]} reference positions but {cand.shape[0]} candidate ones")
    if ref.shape[0] == 0:
        return {"n_positions": 0, "top1_agreement": float("nan"), "mean_kl": float("nan")}
    v = min(ref.shape[1], cand.shape[1])
    lp, lq = _log_softmax(ref[:, :v]), _log_softmax(cand[:, :v])
    kl = np.sum(np.exp(lp) * (lp - lq), axis=-1)
    top1 = np.argmax(ref[:, :v], axis=-1) == np.argmax(cand[:, :v], axis=-1)
    return {"n_positions": int(ref.shape[0]), "top1_agreement": float(top1.mean()),
            "mean_kl": float(np.maximum(kl, 0.0).mean())}


# ---------------------------------------------------------------------------- --quant auto

@dataclass
class Candidate:
    """One quantization tried by --quant auto, with what was measured on it."""
    name: str                     # e.g. "q4_k_m+imatrix"
    qtype: str                    # base llama.cpp type: q4_k_m, q5_k_m, q6_k, ...
    size_bytes: int | None = None
    agreement: float | None = None
    label_kl: float | None = None
    accuracy: float | None = None
    top1_agreement: float | None = None
    next_token_kl: float | None = None
    n: int | None = None          # calibration items measured
    complete: bool = True         # False when the run stopped early because the target was out of reach
    misses: int | None = None     # disagreements found (default: from agreement and n)
    path: str | None = None
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def agreement_bound(agreement: float | None, n: int | None) -> float | None:
    """The 95% lower bound of a label agreement measured on n queries (None if unmeasured)."""
    if agreement is None or not n:
        return None
    return lower_bound(round(agreement * n), n)


def bound(c: Candidate) -> float | None:
    """The candidate's 95% lower bound of label agreement (None if unmeasured or stopped early)."""
    return agreement_bound(c.agreement, c.n) if c.complete else None


def misses(c: Candidate) -> int:
    return c.misses if c.misses is not None else round((1 - (c.agreement or 0)) * (c.n or 0))


def outcome(c: Candidate) -> str:
    """What a candidate measured; a stopped one's agreement is only what it could still reach."""
    if c.complete:
        return f"agreement {_pct(c.agreement)}"
    return (f"stopped after {c.n} queries, {misses(c)} answered otherwise "
            f"(at most {_pct(c.agreement)})")


def meets(c: Candidate, min_agreement: float) -> bool:
    b = bound(c)
    return b is not None and b >= min_agreement


def describe_agreement(agreement: float | None, n: int | None) -> str:
    """'99.8% (95% lower bound 99.1%, n=400)'."""
    low = agreement_bound(agreement, n)
    if low is None:
        return _pct(agreement)
    return f"{_pct(agreement)} ({CONFIDENCE:.0%} lower bound {_pct(low)}, n={n})"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def size_text(n: int | None) -> str:
    """Bytes in decimal units (MB = 10**6), as every size the conversion prints."""
    if n is None:
        return "? B"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def select(candidates: Sequence[Candidate],
           min_agreement: float = DEFAULT_MIN_AGREEMENT) -> tuple[Candidate, str, bool]:
    """The `--quant auto` choice among measured candidates: (chosen, reason, met_target).

    The smallest file whose agreement's lower bound reaches min_agreement wins. When none does,
    the most faithful one is returned with met_target=False: measured in full, then the fewest
    disagreements, then the least label KL, then the smaller. The reason says so plainly: the
    caller must warn, never pass it off as meeting the target.
    """
    measured = [c for c in candidates if c.agreement is not None]
    if not measured:
        raise ValueError("no candidate was measured")
    ok = [c for c in measured if meets(c, min_agreement)]
    target = _pct(min_agreement)
    if ok:
        best = min(ok, key=lambda c: (c.size_bytes if c.size_bytes is not None else float("inf")))
        missed = [c for c in measured if not meets(c, min_agreement)
                  and (c.size_bytes or 0) < (best.size_bytes or 0)]
        why = (f"chose {best.name} ({size_text(best.size_bytes)}): label agreement with the fp reference "
               f"{describe_agreement(best.agreement, best.n)} meets the {target} target")
        if missed:
            why += "; smaller candidates missed it: " + ", ".join(
                f"{c.name} {outcome(c)}"
                for c in missed)
        others = [c for c in ok if c is not best]
        if others:
            why += "; larger ones that also meet it: " + ", ".join(c.name for c in others)
        return best, why, True
    # an early-stopped file's agreement is only what it could still have reached: on a tie the
    # measured one wins
    best = min(measured, key=lambda c: (not c.complete, misses(c),
                                        c.label_kl if c.label_kl is not None else float("inf"),
                                        c.size_bytes if c.size_bytes is not None else 0))
    why = (f"NO candidate reached the {target} label-agreement target; kept {best.name} "
           f"({size_text(best.size_bytes)}), the most faithful: "
           f"{describe_agreement(best.agreement, best.n)}, {misses(best)} disagreements. Tried: "
           + ", ".join(f"{c.name} {outcome(c)}"
                       for c in measured) + ".")
    if max_misses(max(c.n or 0 for c in measured), min_agreement) is None:
        why += (f" ({max(c.n or 0 for c in measured)} calibration queries cannot show {target} with "
                f"{CONFIDENCE:.0%} confidence even without a disagreement: use a larger --calib.)")
    return best, why, False


def explicit_warning(name: str, agreement: float | None,
                     min_agreement: float = DEFAULT_MIN_AGREEMENT, n: int | None = None,
                     convert: bool = True) -> str | None:
    """The loud warning for an explicitly requested quant that misses the target (None if it
    meets it: by the lower bound when n is known). convert=False: eval's wording (the queries
    are the evaluation data, and there is no --quant to change)."""
    if agreement is None:
        return None
    low = lower_bound(round(agreement * n), n) if n else agreement
    if low >= min_agreement:
        return None
    if agreement >= min_agreement:
        return (f"WARNING: {name} agrees with the fp reference on {describe_agreement(agreement, n)}: "
                f"{n} {'calibration ' if convert else ''}queries are too few to show the "
                f"{_pct(min_agreement)} target with {CONFIDENCE:.0%} confidence"
                + ("; use a larger --calib." if convert else "."))
    return (f"WARNING: {name} agrees with the fp reference on only {describe_agreement(agreement, n)} "
            f"of the {'calibration ' if convert else ''}queries (target {_pct(min_agreement)}). "
            "This file does NOT answer like your model"
            + ("; try the default (no --quant): the most faithful file of its size class."
               if convert else "."))


def format_table(rows: Sequence[Mapping], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table: columns are (key, header, kind) with kind in {"str","pct","float","size"}."""
    def cell(v, kind):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "-"
        if kind == "pct":
            return f"{100 * v:.1f}%"
        if kind == "float":
            return f"{v:.4f}"
        if kind == "size":
            return size_text(int(v))
        return str(v)

    body = [[cell(r.get(k), kind) for k, _, kind in columns] for r in rows]
    heads = [h for _, h, _ in columns]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(heads, widths))),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(b, widths)))
              for b in body]
    return "\n".join(lines)


def format_confusion(matrix: Sequence[Sequence[int]], labels: Sequence[str]) -> str:
    """Confusion matrix as text: rows are gold labels, columns predictions."""
    w = max(len("gold\\pred"), *(len(x) for x in labels))
    cw = max(6, *(len(x) for x in labels))
    lines = ["gold\\pred".ljust(w) + "  " + "  ".join(lab.rjust(cw) for lab in labels)]
    for lab, row in zip(labels, matrix):
        lines.append(lab.ljust(w) + "  " + "  ".join(str(int(x)).rjust(cw) for x in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------- stored in the GGUF

METADATA_KEY = "qwen_local.fidelity"  # convert writes the chosen file's figures here (JSON)


def stored_figures(text: str | None) -> dict | None:
    """The figures convert stored in a GGUF (the METADATA_KEY value), with the agreement's 95% lower
    bound worked out here: the file keeps agreement and n, not the bound. None when the file has
    none (not made by a verified convert); {"error": ...} when the value is not a JSON object.

    A measurement stopped early (`complete`: false) stores an upper bound of the agreement, so it
    gets no lower bound; files written before convert stored `complete` are taken as complete."""
    if text is None:
        return None
    try:
        figures = json.loads(text)
    except ValueError:
        figures = None
    if not isinstance(figures, dict):
        return {"error": f"{METADATA_KEY} is not a JSON object"}
    complete = figures.get("complete", True) is not False
    agreement, n = figures.get("agreement"), figures.get("n")
    numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (agreement, n))
    figures["bound"] = agreement_bound(agreement, int(n)) if complete and numeric else None
    figures["confidence"] = CONFIDENCE
    return figures
