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
import contextlib
import importlib.resources
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime import fidelity
from runtime.errors import UserError
from runtime.profile import Profile, ProfileError, load_profile

ALLOWED_KEYS = {"query", "label", "tags", "id"}


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
                 name: str | None = None, http: bool = False, lean: bool = False) -> dict:
    """One row of figures for one GGUF. With stop_below (an agreement target) and a reference,
    measuring stops as soon as the disagreements make the target unreachable ("complete": False;
    "agreement" is then the best it could still have reached). With http, the labels are read
    from a real server on 127.0.0.1 (/qwen/intent/batch), exactly as a client gets them.
    lean (convert): the file is memory-mapped and not repacked, so the weights take no anonymous
    memory (a repacked 3B q4_k_m takes ~1.4 GB); the arithmetic is the same, the kernels'
    summation order may differ."""
    from runtime.engine import Engine

    threads = _threads(threads)
    path = Path(path)
    t0 = time.perf_counter()
    n = len(data)
    allowed = None
    if stop_below is not None and ref is not None:
        # the target is judged by the agreement's lower confidence bound: stop at the first
        # disagreement past what still shows it (never, if n cannot show it at all)
        allowed = fidelity.max_misses(n, stop_below)
    probs: list[dict] = []
    mismatched_tokens = 0
    try:
        engine = Engine(path, cfg, threads=threads, slots=4, n_ctx=4096,
                        **(dict(mmap=True, repack=False) if lean else {}))
    except (FileNotFoundError, RuntimeError, ValueError) as e:
        raise UserError(f"cannot load {path}: {e}") from None
    cfg = engine.cfg  # the given profile, else the one stored in the GGUF
    bar = None  # after the load: a failed load is one error line, not a bar and a line
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=n, desc=name or path.name, unit="q", file=sys.stderr, leave=False,
                   dynamic_ncols=True)
    stack = contextlib.ExitStack()
    try:
        ask = _asker(engine, stack, chunk) if http else (lambda qs: [r.probs for r in engine.intents(qs)])
        desc = engine.describe()
        complete = True
        for start in range(0, n, chunk):
            batch = data.queries[start:start + chunk]
            probs += ask(batch)
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
        stack.close()
        engine.close()
        if bar:
            bar.close()
    m = len(probs)
    row: dict = {"model": str(path), "name": name or path.name, "bytes": path.stat().st_size,
                 "bits_per_weight": round(8 * path.stat().st_size / desc["n_params"], 3),
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


def _asker(engine, stack: contextlib.ExitStack, chunk: int):
    """Label distributions over HTTP from a real server on this engine (closed with the stack)."""
    import httpx

    from runtime.serve import ServeSettings, create_app, serving

    url = stack.enter_context(serving(create_app(engine, ServeSettings(max_batch=chunk))))
    client = stack.enter_context(httpx.Client(base_url=url, timeout=600))

    def ask(queries: list[str]) -> list[dict]:
        r = client.post("/qwen/intent/batch", json={"queries": queries})
        if r.status_code != 200:
            raise UserError(f"the server answered {r.status_code}: {r.text[:200]}")
        return [x["probs"] for x in r.json()["results"]]

    return ask


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


# ---------------------------------------------------------------------------- report

COLUMNS = [("name", "model", "str"), ("quant", "quant", "str"), ("bytes", "size", "size"),
           ("accuracy", "accuracy", "pct"), ("macro_f1", "macro F1", "float"),
           ("agreement", "agreement", "pct"), ("label_kl", "label KL", "float"),
           ("next_token_top1", "next-tok top1", "pct"), ("next_token_kl", "next-tok KL", "float"),
           ("seconds", "s", "str")]


def render(report: dict) -> str:
    rows = report["rows"]
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    src = report["data"]["source"]
    out = [f"eval on {src}: {report['data']['n']} queries"
           + (f", reference {report['reference']}" if report.get("reference") else "")]
    if src.startswith("packaged") and "heldout split" not in src:
        out.append(f"(not held-out: lines 1-{CALIBRATION_QUERIES} of the packaged set calibrate convert "
                   "by default; --split heldout measures only queries no conversion has seen)")
    out += ["", fidelity.format_table(rows, cols)]
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
                                         r.get("n"), convert=False) if r.get("name") != "reference" else None
        if warn:
            out.append(warn)
        if r.get("tokenizer_mismatches"):
            out.append(f"{r['name']}: WARNING tokenization differs from the reference on "
                       f"{r['tokenizer_mismatches']} queries")
    return "\n".join(out)


def evaluate(models: list[str | Path], data: Dataset, *, reference=None, cfg=None,
             threads: int | None = None, gen_prompts: int = 4, progress: bool = True,
             http: bool = False) -> dict:
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
    rows = [measure_gguf(m, data, ref_run, cfg=cfg, threads=threads, progress=progress, http=http)
            for m in models]
    for r in rows:
        r.pop("probs", None)
    return {"data": {"source": data.source, "n": len(data),
                     "labelled": sum(x is not None for x in data.labels)},
            "reference": ref_run.describe if ref_run else None,
            "rows": ([ref_row] if ref_row else []) + rows}


def build_parser() -> argparse.ArgumentParser:
    from runtime.options import Parser, add_output_flags, float_in, int_in

    p = Parser(prog="qwen-local eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", nargs="+", required=True, metavar="X.gguf", help="one or more GGUF files")
    p.add_argument("--data", help="JSONL of {query, label, tags}; default: the packaged Vietnamese set")
    p.add_argument("--split", choices=SPLITS, default="all",
                   help="part of the packaged set: all, calibration (what convert calibrates with by "
                        "default) or heldout (never seen by a conversion); default all")
    p.add_argument("--reference-base", metavar="DIR", help="base model folder for the fp reference")
    p.add_argument("--reference-adapter", metavar="DIR", help="PEFT adapter folder for the fp reference")
    p.add_argument("--reference-dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--gen-prompts", type=int_in(0, 64), default=4,
                   help="reply prompts for the next-token check (0: skip)")
    p.add_argument("--prompts", metavar="FILE|NAME",
                   help="prompt profile for every model and the reference (default: the one stored in "
                        "the first model by convert, else the built-in seed profile)")
    p.add_argument("--min-agreement", type=float_in(0, 1, lo_open=True),
                   default=fidelity.DEFAULT_MIN_AGREEMENT,
                   help="warn for models agreeing with the reference less than this share")
    p.add_argument("--threads", type=int_in(1, 1024), help="threads for llama.cpp and torch")
    p.add_argument("--limit", type=int_in(1), help="only the first N queries")
    p.add_argument("--exclude", metavar="FILE.jsonl",
                   help="leave out the queries of this file (e.g. the adapter's training set: "
                        "held-out figures)")
    p.add_argument("--http", action="store_true",
                   help="read every label over HTTP from a real server on 127.0.0.1, as clients do")
    p.add_argument("--json", metavar="OUT", help="write the full report as JSON here")
    add_output_flags(p)
    return p


def main(argv: list[str]) -> int:
    from runtime.options import progress_enabled, quiet

    args = build_parser().parse_args(argv)
    progress = progress_enabled(args.progress)
    quiet(args.verbose, progress)
    from runtime.gguf_file import gguf_problem
    for m in args.model:
        if not Path(m).is_file():
            raise UserError(f"model file {m} not found")
        problem = gguf_problem(m)  # before a reference is loaded for nothing
        if problem:
            raise UserError(f"cannot load {m}: {problem}")
    from runtime.engine import read_profile
    try:
        cfg = load_profile(args.prompts) if args.prompts else (read_profile(args.model[0]) or load_profile())
    except (ProfileError, RuntimeError) as e:
        raise UserError(str(e)) from None
    if args.data and args.split != "all":
        raise UserError("--split picks a part of the packaged set; it cannot go with --data")
    data = load_data(args.data, cfg.labels) if args.data else packaged(args.split, cfg.labels)
    if args.exclude:
        data = exclude(data, args.exclude)
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
            raise UserError(f"cannot load the reference: {e}") from None
    elif not data.labelled:
        raise UserError("the data has no labels and no reference was given: nothing to measure")
    report = evaluate(args.model, data, reference=reference, cfg=cfg, threads=args.threads,
                      gen_prompts=args.gen_prompts, progress=progress, http=args.http)
    report["min_agreement"] = args.min_agreement
    print(render(report))
    if args.json:
        try:
            Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
        except OSError as e:
            raise UserError(f"cannot write {args.json}: {e.strerror or e}") from None
    return 0
