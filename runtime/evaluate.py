"""`qwen-local eval`: intent accuracy and fidelity of one or more GGUFs on labelled queries.

    qwen-local eval --model a-q4_k_m.gguf [b-q8_0.gguf ...] [--data FILE.jsonl]
                    [--reference-base DIR --reference-adapter DIR] [--json OUT] [--threads N]

Each GGUF is one row: accuracy, macro F1, and with a reference (the fp PEFT model in torch,
convert/reference.py) label agreement, the mean KL of the label distributions, next-token top-1
agreement and KL over a few reply prompts. Per-label P/R/F1 and the confusion matrix follow the
table; `--json` writes everything. The GGUF side is runtime.engine's one-pass intent path, i.e.
exactly what `serve` answers. Default data: the packaged Vietnamese set runtime/data/intent_vi.jsonl.

The same functions measure candidates for `qwen-local convert --quant auto` (convert/autoquant.py).
"""
from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from convert import fidelity
from runtime.profile import Profile, ProfileError, load_profile

ALLOWED_KEYS = {"query", "label", "tags", "id"}


def _user_error(msg: str):
    from qwen_local import UserError

    return UserError(msg)


# ---------------------------------------------------------------------------- data

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


def default_data_path():
    return importlib.resources.files("runtime") / "data" / "intent_vi.jsonl"


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
            raise _user_error(f"{what} {p} not found" if not p.exists() else f"{what} {p} is not a file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise _user_error(f"{what} {p} is not UTF-8 text (expected JSONL)") from None
        except OSError as e:
            raise _user_error(f"cannot read {what} {p}: {e.strerror or e}") from None
    labels = tuple(labels)
    qs, ls, ts = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{what} {source}, line {n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _user_error(f"{where}: not JSON ({e.msg}); expected one "
                              '{"query": ..., "label": ...} object per line') from None
        if not isinstance(obj, dict):
            raise _user_error(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - ALLOWED_KEYS)
        if unknown:
            raise _user_error(f"{where}: unknown keys {unknown} (allowed: {sorted(ALLOWED_KEYS)})")
        q = obj.get("query")
        if not isinstance(q, str) or not q.strip():
            raise _user_error(f"{where}: missing or empty \"query\" string")
        lab = obj.get("label")
        if lab is not None and lab not in labels:
            raise _user_error(f"{where}: unknown label {lab!r} (labels: {', '.join(labels)})")
        if lab is None and require_labels:
            raise _user_error(f"{where}: no \"label\" (this command needs labelled data)")
        tags = obj.get("tags") or []
        if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
            raise _user_error(f"{where}: \"tags\" must be a list of strings")
        qs.append(q)
        ls.append(lab)
        ts.append(tags)
    if not qs:
        raise _user_error(f"{what} {source} holds no queries")
    return Dataset(qs, ls, ts, source)


# ---------------------------------------------------------------------------- reference side

@dataclass
class ReferenceRun:
    """What the fp reference said, computed once and compared with every GGUF."""
    probs: list[dict]                                   # label distribution per query
    teacher: list[tuple[list[int], list[int], np.ndarray]] = field(default_factory=list)
    # (prompt ids, greedy tokens fed after it, logits per step [n_steps, vocab])
    intent_ids: list[list[int]] = field(default_factory=list)   # user-turn ids, for parity
    describe: str = ""


def reference_run(reference, data: Dataset, *, probs: list[dict] | None = None,
                  gen_prompts: int = 4, steps: int = 4, progress=None) -> ReferenceRun:
    from convert.reference import generation_prompts, spread
    from runtime.labels import decide

    if probs is None:
        probs = reference.intents(data.queries, progress=progress)
    teacher = []
    if gen_prompts > 0:
        picks = spread(data.queries, [decide(p) for p in probs], gen_prompts)
        prompts = generation_prompts(reference.cfg, [data.queries[i] for i in picks],
                                     [decide(probs[i]) for i in picks])
        for segs in prompts:
            fed, rows = reference.greedy_steps(segs, steps)
            teacher.append((reference.encode(segs), fed, rows))
    intent_ids = [reference.encode(reference.cfg.intent_prompt(q)[1:]) for q in data.queries]
    desc = f"peft {reference.dtype}" + (" merged" if reference.merged else "")
    return ReferenceRun(probs=probs, teacher=teacher, intent_ids=intent_ids, describe=desc)


# ---------------------------------------------------------------------------- GGUF side

def _threads(threads: int | None) -> int:
    if threads:
        return int(threads)
    try:
        from runtime.engine import physical_cores
        return physical_cores()
    except Exception:  # pragma: no cover
        import os
        return max(1, (os.cpu_count() or 2) // 2)


def measure_gguf(path: str | Path, data: Dataset, ref: ReferenceRun | None = None, *,
                 cfg: Profile | None = None, threads: int | None = None,
                 stop_below: float | None = None, chunk: int = 8, progress: bool = False,
                 name: str | None = None, lean: bool = False) -> dict:
    """One row of figures for one GGUF. With stop_below (an agreement target) and a reference,
    measuring stops as soon as the disagreements make the target unreachable ("complete": False;
    "agreement" is then the best it could still have reached). lean (convert): the file is
    memory-mapped and not repacked, so the weights take no anonymous memory (a repacked 3B
    q4_k_m takes ~1.4 GB); the arithmetic is the same, the kernels' summation order may differ."""
    from runtime.engine import Engine

    threads = _threads(threads)
    path = Path(path)
    t0 = time.perf_counter()
    n = len(data)
    allowed = None
    if stop_below is not None and ref is not None:
        allowed = math.floor((1.0 - stop_below) * n + 1e-9)
    probs: list[dict] = []
    mismatched_tokens = 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=name or path.name, unit="q", file=sys.stderr, leave=False,
                   dynamic_ncols=True)
    try:
        engine = Engine(path, cfg, threads=threads, slots=4, n_ctx=4096,
                        **(dict(mmap=True, repack=False) if lean else {}))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise _user_error(f"cannot load {path}: {e}") from None
    cfg = engine.cfg  # the given profile, else the one stored in the GGUF
    try:
        desc = engine.describe()
        complete = True
        for start in range(0, n, chunk):
            batch = data.queries[start:start + chunk]
            probs += [r.probs for r in engine.intents(batch)]
            if bar:
                bar.update(len(batch))
            if allowed is not None:
                d = sum(max(p, key=p.get) != max(r, key=r.get)
                        for p, r in zip(probs, ref.probs[:len(probs)]))
                if d > allowed and len(probs) < n:
                    complete = False
                    break
        if ref is not None and ref.intent_ids:
            for q, ids in zip(data.queries[:len(probs)], ref.intent_ids):
                mismatched_tokens += engine.tokenize_segments(cfg.intent_prompt(q)[1:]) != ids
    finally:
        engine.close()
        if bar:
            bar.close()
    m = len(probs)
    row: dict = {"model": str(path), "name": name or path.name, "bytes": path.stat().st_size,
                 "quant": desc.get("quant"), "complete": complete, "n_measured": m}
    gold = data.labels[:m] if data.labelled else None
    row.update(fidelity.intent_figures(cfg.labels, probs, gold,
                                       ref.probs[:m] if ref is not None else None))
    row["probs"] = probs
    if ref is not None:
        row["tokenizer_mismatches"] = int(mismatched_tokens)
        if not complete:
            d = len(row["disagreements"])
            row["agreement_measured"] = row["agreement"]
            row["agreement"] = (n - d) / n  # upper bound: every unmeasured query agreeing
        if ref.teacher and complete:
            from convert.verify import GGUFRunner

            # teacher-forced: the rows after the prompt's last token and after each fed token
            scorer = GGUFRunner(path, max(len(p) + len(f) for p, f, _ in ref.teacher) + 8, threads,
                                lean=lean)
            try:
                got = [scorer.logits(p + f, start=len(p) - 1) for p, f, _ in ref.teacher]
            finally:
                scorer.close()
            nt = fidelity.next_token_figures(np.concatenate([r for _, _, r in ref.teacher]),
                                             np.concatenate(got))
            row["next_token_top1"] = nt["top1_agreement"]
            row["next_token_kl"] = nt["mean_kl"]
            row["next_token_positions"] = nt["n_positions"]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


# ---------------------------------------------------------------------------- report

COLUMNS = [("name", "model", "str"), ("quant", "quant", "str"), ("bytes", "size", "size"),
           ("accuracy", "accuracy", "pct"), ("macro_f1", "macro F1", "float"),
           ("agreement", "agreement", "pct"), ("label_kl", "label KL", "float"),
           ("next_token_top1", "next-tok top1", "pct"), ("next_token_kl", "next-tok KL", "float"),
           ("seconds", "s", "str")]


def render(report: dict) -> str:
    rows = report["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    out = [f"eval on {report['data']['source']}: {report['data']['n']} queries"
           + (f", reference {report['reference']}" if report.get("reference") else ""), "",
           fidelity.format_table(rows, cols)]
    for r in rows:
        if "per_label" in r:
            out += ["", f"{r['name']}: per label"]
            out.append(fidelity.format_table(
                [{"label": k, **v} for k, v in r["per_label"].items()],
                [("label", "label", "str"), ("precision", "precision", "pct"),
                 ("recall", "recall", "pct"), ("f1", "F1", "pct"), ("support", "n", "str")]))
            out.append(fidelity.format_confusion(r["confusion"], r["labels"]))
        warn = fidelity.explicit_warning(r["name"], r.get("agreement"),
                                         report.get("min_agreement", fidelity.DEFAULT_MIN_AGREEMENT),
                                         r.get("n")) if r.get("name") != "reference" else None
        if warn:
            out.append(warn.replace("; try --quant auto or q5_k_m.", "."))
        if r.get("tokenizer_mismatches"):
            out.append(f"{r['name']}: WARNING tokenization differs from the reference on "
                       f"{r['tokenizer_mismatches']} queries")
    return "\n".join(out)


def evaluate(models: list[str | Path], data: Dataset, *, reference=None, cfg=None,
             threads: int | None = None, gen_prompts: int = 4, progress: bool = True) -> dict:
    # one profile for every model and the reference: the given one, else the reference's; with
    # neither, each model is measured with the profile stored in it
    cfg = cfg or (reference.cfg if reference is not None else None)
    ref_run = None
    ref_row = None
    if reference is not None:
        bar = None
        if progress:
            from tqdm import tqdm
            bar = lambda it: tqdm(it, desc="reference (torch)", unit="q", file=sys.stderr,  # noqa: E731
                                  leave=False, dynamic_ncols=True)
        ref_run = reference_run(reference, data, gen_prompts=gen_prompts, progress=bar)
        ref_row = {"name": "reference", "quant": ref_run.describe}
        ref_row.update(fidelity.intent_figures(reference.cfg.labels, ref_run.probs,
                                               data.labels if data.labelled else None))
    rows = [measure_gguf(m, data, ref_run, cfg=cfg, threads=threads, progress=progress)
            for m in models]
    for r in rows:
        r.pop("probs", None)
    return {"data": {"source": data.source, "n": len(data),
                     "labelled": sum(x is not None for x in data.labels)},
            "reference": ref_run.describe if ref_run else None,
            "rows": ([ref_row] if ref_row else []) + rows}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qwen-local eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, metavar="X.gguf", help="one or more GGUF files")
    p.add_argument("--data", help="JSONL of {query, label, tags}; default: the packaged Vietnamese set")
    p.add_argument("--reference-base", metavar="DIR", help="base model folder for the fp reference")
    p.add_argument("--reference-adapter", metavar="DIR", help="PEFT adapter folder for the fp reference")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--gen-prompts", type=int, default=4,
                   help="reply prompts for the next-token check (0: skip), default 4")
    p.add_argument("--prompts", metavar="FILE|NAME",
                   help="prompt profile for every model and the reference (default: the one stored in "
                        "the first model by convert, else the built-in seed profile)")
    p.add_argument("--min-agreement", type=float, default=fidelity.DEFAULT_MIN_AGREEMENT,
                   help="warn for models agreeing with the reference less than this (default 0.99)")
    p.add_argument("--threads", type=int, help="threads for llama.cpp and torch")
    p.add_argument("--limit", type=int, help="only the first N queries")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON here")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    for m in args.model:
        if not Path(m).is_file():
            raise _user_error(f"model file {m} not found")
    from runtime.engine import read_profile
    try:
        cfg = load_profile(args.prompts) if args.prompts else (read_profile(args.model[0]) or load_profile())
    except (ProfileError, RuntimeError) as e:
        raise _user_error(str(e)) from None
    data = load_data(args.data, cfg.labels)
    if args.limit:
        data = Dataset(data.queries[:args.limit], data.labels[:args.limit], data.tags[:args.limit],
                       data.source)
    reference = None
    if args.reference_base or args.reference_adapter:
        from convert.reference import Reference
        try:
            reference = Reference(args.reference_base, args.reference_adapter, cfg=cfg,
                                  dtype=args.reference_dtype, threads=_threads(args.threads))
        except (OSError, ValueError) as e:
            raise _user_error(f"cannot load the reference: {e}") from None
    elif not data.labelled:
        raise _user_error("the data has no labels and no reference was given: nothing to measure")
    report = evaluate(args.model, data, reference=reference, cfg=cfg, threads=args.threads,
                      gen_prompts=args.gen_prompts, progress=not args.no_progress)
    report["min_agreement"] = args.min_agreement
    print(render(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        except OSError as e:
            raise _user_error(f"cannot write {args.json}: {e.strerror or e}") from None
    return 0
