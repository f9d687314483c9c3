"""Conversion benchmark: the usual peft merge against `qwen-local convert`, time and memory.

    qwen-local bench convert --base DIR --adapter DIR [--quant q4_k_m] [--merge-dtype bfloat16]
                             [--threads N] [--workdir DIR] [--json OUT]

Each step runs in its own process; the parent samples /proc/<pid>/status of the process and its
children every ~50 ms (VmRSS, RssAnon) and takes the kernel's exact peak RSS from wait4's rusage
(ru_maxrss). The kernel keeps no peak of *anonymous* RSS, so that one is the sampled maximum.

(a) the usual path: transformers from_pretrained (bf16 by default; --merge-dtype float32 for
    transformers 4.x's default) + PeftModel.from_pretrained + merge_and_unload + save_pretrained.
    It still has to be converted to GGUF and quantized after that.
(b) `qwen-local convert --quant q4_k_m --no-verify` (the real command line), whose own report gives the
    time spent in llama_model_quantize.
(c) `qwen-local convert --quant q4_k_m` with the gate on (parity against peft, task reference and
    imatrix, one candidate measured), the same command without --no-verify.
(d) `qwen-local convert` with no --quant: the default search within its size budget.

Goals: (b)'s peak anonymous RSS <= 1.5 GB, and (b)'s wall time <= (a) + quantization;
(c)'s peak anonymous RSS <= 1.5 GB, and (c)'s wall time <= 2x (b)'s; (d)'s wall time <= 2x (c)'s
(the default costs about one checked candidate).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from qwen_local.runtime.llama import threads_or_default
from qwen_local.runtime.bench.memory import GB, parse_status, read_status
from qwen_local.runtime.bench.process import child_env
from qwen_local.runtime.bench.report import gb, table
from qwen_local.runtime.bench.stats import ratio

SAMPLE_S = 0.05
ANON_GOAL = 1.5 * 1000 ** 3  # "1.5 GB"; decimal, the stricter reading is 1.5 GiB = 1.61e9
VERIFY_TIME_GOAL = 2.0       # a verified conversion at most this many times the --no-verify one
DEFAULT_TIME_GOAL = 2.0      # the default search at most this many times one checked candidate


def _tree_status(pid: int) -> dict[str, int]:
    """Sum of VmRSS and RssAnon over a process and its live descendants."""
    pids = [pid]
    try:
        import psutil
        pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except Exception:  # noqa: BLE001 - the process may be gone between two reads
        pass
    total = {"VmRSS": 0, "RssAnon": 0}
    for p in pids:
        try:
            st = parse_status(Path(f"/proc/{p}/status").read_text())
        except OSError:
            continue
        for k in total:
            total[k] += st.get(k, 0)
    return total


def measure(cmd: list[str], log_path: Path, env: dict | None = None, interval: float = SAMPLE_S) -> dict:
    """Run cmd, sampling memory every `interval` s: wall time, exit code, peak RSS (exact), peak anon."""
    with open(log_path, "w") as log:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        peak_rss = peak_anon = 0
        samples = 0
        rusage = None
        status = None
        while True:
            st = _tree_status(proc.pid)
            peak_rss = max(peak_rss, st["VmRSS"])
            peak_anon = max(peak_anon, st["RssAnon"])
            samples += 1
            pid, status, rusage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                break
            time.sleep(interval)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    hwm = rusage.ru_maxrss * 1024 if rusage is not None else None  # kB on Linux
    return {"cmd": cmd, "wall_s": wall, "exit_code": proc.returncode, "peak_rss": max(peak_rss, hwm or 0),
            "peak_rss_kernel": hwm, "peak_rss_sampled": peak_rss, "peak_anon_sampled": peak_anon,
            "samples": samples, "log": str(log_path)}


def child_merge(base: str, adapter: str, out: str, dtype: str, threads: int) -> int:
    """(a): what a user of peft does to get a merged checkpoint (the input of convert_hf_to_gguf)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(model, adapter)
    t1 = time.perf_counter()
    merged = model.merge_and_unload()
    t2 = time.perf_counter()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    t3 = time.perf_counter()
    print(json.dumps({"timings": {"load": t1 - t0, "merge": t2 - t1, "save": t3 - t2}}), flush=True)
    return 0


def _last_json_line(log_path: str) -> dict | None:
    try:
        for line in reversed(Path(log_path).read_text(errors="replace").splitlines()):
            if line.startswith("{"):
                return json.loads(line)
    except (OSError, ValueError):
        pass
    return None


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else (
        p.stat().st_size if p.exists() else 0)


def run(base: str, adapter: str, quant: str = "q4_k_m", merge_dtypes=("bfloat16",), threads: int = 2,
        workdir: str | None = None, keep: bool = False, log=print, verified: bool = True) -> dict:
    work = Path(tempfile.mkdtemp(prefix="qwen-local-convert-bench-", dir=workdir))
    env = child_env(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "threads": threads, "quant": quant,
                       "base": base, "adapter": adapter, "sample_interval_s": SAMPLE_S,
                       "load_avg_start": os.getloadavg()},
              "runs": {}}
    try:
        for dtype in merge_dtypes:
            name = f"peft merge_and_unload + save ({dtype})"
            log(f"(a) {name} ...")
            out = work / f"merged-{dtype}"
            r = measure([sys.executable, "-m", "qwen_local.convert.dev.bench", "--child-merge", base, adapter, str(out),
                         dtype, str(threads)], work / f"merge-{dtype}.log", env)
            r.update(kind="peft", dtype=dtype, output_bytes=_dir_bytes(out),
                     timings=(_last_json_line(r["log"]) or {}).get("timings"))
            _check(r, name)
            result["runs"][name] = r
            if not keep:
                shutil.rmtree(out, ignore_errors=True)
        steps = (("qwen-local", ["--quant", quant, "--no-verify"], "(b)", "no-verify"),
                 ("qwen-local verified", ["--quant", quant], "(c)", "verified"),
                 ("qwen-local default", [], "(d)", "default"))
        for kind, flags, tag, stem in steps[:3 if verified else 1]:
            name = f"qwen-local convert {' '.join(flags)}".strip()
            log(f"{tag} {name} ...")
            out = work / f"model-{stem}.gguf"
            r = measure([sys.executable, "-m", "qwen_local", "convert", "--adapter", adapter, "--base",
                         base, "--out", str(out), *flags, "--no-progress", "--threads", str(threads)],
                        work / f"qwen-local-convert-{stem}.log", env)
            _check(r, name)
            report = json.loads(Path(str(out) + ".json").read_text())
            r.update(kind=kind, output_bytes=report["bytes"], timings=report.get("timings"))
            if report.get("fidelity"):
                r["agreement"] = report["fidelity"]["figures"].get("agreement")
                r["chosen"] = report["fidelity"].get("chosen") or report["quant"]
            result["runs"][name] = r
            if not keep:
                for f in (out, Path(str(out) + ".json"), out.with_name(f"model-{stem}.lora.gguf")):
                    f.unlink(missing_ok=True)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["workdir"] = str(work)
    result["meta"]["load_avg_end"] = os.getloadavg()
    result["summary"] = summarize(result["runs"])
    return result


def _check(r: dict, name: str) -> None:
    if r["exit_code"] != 0:
        tail = "\n".join(Path(r["log"]).read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{name} failed (exit {r['exit_code']}):\n{tail}")


def summarize(runs: dict) -> dict:
    """Ratios of (b) to each (a), and the goals: (b)'s memory and time, (c)'s memory and time."""
    ours = next((r for r in runs.values() if r["kind"] == "qwen-local"), None)
    peft_runs = {n: r for n, r in runs.items() if r["kind"] == "peft"}
    out: dict = {"vs": {}}
    if ours is None:
        return out
    quant_s = (ours.get("timings") or {}).get("quantize")
    for n, r in peft_runs.items():
        out["vs"][n] = {
            "time": ratio(ours["wall_s"], r["wall_s"]),
            "time_vs_merge_plus_quantize": ratio(ours["wall_s"], r["wall_s"] + (quant_s or 0.0))
            if quant_s is not None else None,
            "peak_rss": ratio(ours["peak_rss"], r["peak_rss"]),
            "peak_anon": ratio(ours["peak_anon_sampled"], r["peak_anon_sampled"]),
        }
    fastest = min(peft_runs.values(), key=lambda r: r["wall_s"], default=None)
    goals = [goal("peak anonymous RSS of qwen-local convert <= 1.5 GB", ours["peak_anon_sampled"], "<=",
                  ANON_GOAL)]
    if fastest is not None and quant_s is not None:
        goals.append(goal("wall time <= fastest usual merge + quantization",
                          ours["wall_s"], "<=", fastest["wall_s"] + quant_s))
    gated = next((r for r in runs.values() if r["kind"] == "qwen-local verified"), None)
    if gated is not None:
        goals.append(goal("peak anonymous RSS of the verified conversion <= 1.5 GB",
                          gated["peak_anon_sampled"], "<=", ANON_GOAL))
        goals.append(goal(f"verified conversion wall time <= {VERIFY_TIME_GOAL:g}x --no-verify",
                          ratio(gated["wall_s"], ours["wall_s"]), "<=", VERIFY_TIME_GOAL, unit="x"))
        out["verified_vs_no_verify"] = ratio(gated["wall_s"], ours["wall_s"])
    default = next((r for r in runs.values() if r["kind"] == "qwen-local default"), None)
    if default is not None and gated is not None:
        out["default_vs_verified"] = ratio(default["wall_s"], gated["wall_s"])
        goals.append(goal(f"default conversion wall time <= {DEFAULT_TIME_GOAL:g}x the verified "
                          "--quant one", out["default_vs_verified"], "<=", DEFAULT_TIME_GOAL,
                          unit="x"))
    out["quantize_s"] = quant_s
    out["goals"] = goals
    return out


def goal(what: str, value, op: str, limit, unit: str | None = None) -> dict:
    if value is None or limit is None:
        verdict = "n/a"
    else:
        verdict = "PASS" if (value <= limit if op == "<=" else value >= limit) else "MISS"
    unit = unit or ("GB" if "RSS" in what else "s")
    return {"goal": what, "value": value, "op": op, "limit": limit, "verdict": verdict, "unit": unit}


def render(result: dict) -> str:
    rows = []
    for name, r in result["runs"].items():
        t = r.get("timings") or {}
        steps = ", ".join(f"{k} {v:.1f}" for k, v in t.items() if k != "total" and v is not None)
        rows.append([name, f"{r['wall_s']:.1f}", gb(r["peak_rss"]), gb(r["peak_anon_sampled"]),
                     gb(r.get("output_bytes")), steps])
    m = result["meta"]
    out = [f"conversion bench: {m['threads']} threads, base {m['base']}, adapter {m['adapter']}; "
           f"load average {m['load_avg_start'][0]:.1f} at start, {m['load_avg_end'][0]:.1f} at end", "",
           table(["", "wall s", "peak RSS GiB", "peak anon GiB", "output GiB", "steps, s"], rows)]
    s = result["summary"]
    if s.get("vs"):
        out.append("")
        out.append(table(["qwen-local convert / ...", "time", "time vs merge+quantize", "peak RSS",
                          "peak anon"],
                         [[n, *(("-" if v is None else f"{v:.2f}x") for v in (
                             d["time"], d["time_vs_merge_plus_quantize"], d["peak_rss"], d["peak_anon"]))]
                          for n, d in s["vs"].items()]))
        out.append("(the usual path still needs convert_hf_to_gguf and llama-quantize after its merge)")
    def fmt(v, unit):
        if v is None:
            return "-"
        # the goal is in decimal GB; the tables above are in GiB, so give both
        return {"GB": f"{v / 1000 ** 3:.2f} GB = {v / GB:.2f} GiB", "x": f"{v:.2f}x"}.get(unit, f"{v:.1f} s")

    for g in s.get("goals", []):
        unit = g.get("unit") or ("GB" if "RSS" in g["goal"] else "s")
        out.append(f"  {g['verdict']:<4}  {g['goal']}: measured {fmt(g['value'], unit)} "
                   f"(limit {fmt(g['limit'], unit)})")
    return "\n".join(out)


def main_convert(argv: list[str]) -> int:
    from qwen_local.runtime.errors import UserError

    from qwen_local.runtime.options import Parser, add_output_flags, add_threads, quiet

    ap = Parser(
        prog="qwen-local bench convert",
        description="Time and memory of the usual peft merge vs qwen-local convert. "
                    "Build a 3B-shape model first with 'qwen-local bench make-model --shape 3b --out DIR'.")
    ap.add_argument("--base", required=True, help="base model folder")
    ap.add_argument("--adapter", required=True, help="PEFT adapter folder")
    ap.add_argument("--quant", default="q4_k_m")
    ap.add_argument("--merge-dtype", action="append", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the usual path's merge; repeat to run several (default bfloat16)")
    add_threads(ap)
    ap.add_argument("--workdir", help="where outputs are written (default: the system temp folder); "
                                      "needs room for the merged checkpoint and the GGUF")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (and print where)")
    ap.add_argument("--no-verified", action="store_true",
                    help="skip (c), the conversion with the gate on")
    ap.add_argument("--json", help="write the full results here")
    add_output_flags(ap, progress=False)
    a = ap.parse_args(argv)
    quiet(a.verbose)
    for d, what in ((a.base, "base"), (a.adapter, "adapter")):
        if not Path(d).is_dir():
            raise UserError(f"no such {what} folder: {d}")
    if not Path("/proc/self/status").exists():
        raise UserError("the conversion bench reads /proc/<pid>/status: Linux only")
    threads = threads_or_default(a.threads)
    result = run(a.base, a.adapter, a.quant, tuple(a.merge_dtype or ["bfloat16"]), threads, a.workdir,
                 a.keep, log=lambda m: print(m, file=sys.stderr, flush=True), verified=not a.no_verified)
    print(render(result))
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2))
        print(f"\nJSON: {a.json}")
    return 0


def main_make_model(argv: list[str]) -> int:
    from qwen_local.convert.dev import synthetic
    from qwen_local.runtime.errors import UserError
    from qwen_local.runtime.options import Parser, add_output_flags, int_in, quiet

    ap = Parser(
        prog="qwen-local bench make-model",
        description="Random-weight Qwen2.5 model with an exact checkpoint shape and the real tokenizer, "
                    "plus a LoRA adapter on all seven projections: OUT/base and OUT/adapter.")
    ap.add_argument("--shape", choices=sorted(synthetic.SHAPES), default="3b")
    ap.add_argument("--out", required=True, help="folder to create (OUT/base, OUT/adapter)")
    ap.add_argument("--adapter-rank", type=int_in(0, 1024), default=16, help="LoRA rank (0: no adapter)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="base weights' dtype (Qwen2.5 ships bf16)")
    ap.add_argument("--tokenizer-cache", help="where the rebuilt Qwen2.5 tokenizer is cached "
                                               "(default: OUT/tokenizer)")
    add_output_flags(ap, progress=False)
    a = ap.parse_args(argv)
    quiet(a.verbose)
    out = Path(a.out)
    if (out / "base").exists() or (out / "adapter").exists():
        raise UserError(f"{out} already holds base/ or adapter/: choose another --out")
    try:
        synthetic.tiktoken_ranks_path()
    except RuntimeError as e:
        raise UserError(str(e)) from None
    tok = Path(a.tokenizer_cache) if a.tokenizer_cache else out / "tokenizer"
    t0 = time.perf_counter()
    print(f"building a random {a.shape} base ({a.dtype}) in {out / 'base'} ...", file=sys.stderr)
    synthetic.make_base(out / "base", tok, shape=a.shape, dtype=a.dtype)
    print(f"  {time.perf_counter() - t0:.0f} s, peak RSS so far {gb(read_status().get('VmHWM'))} GiB",
          file=sys.stderr)
    if a.adapter_rank > 0:
        t1 = time.perf_counter()
        print(f"building a rank-{a.adapter_rank} adapter on all seven projections in {out / 'adapter'} ...",
              file=sys.stderr)
        synthetic.make_adapter(out / "base", out / "adapter", r=a.adapter_rank, alpha=2 * a.adapter_rank,
                               dtype=a.dtype)
        print(f"  {time.perf_counter() - t1:.0f} s", file=sys.stderr)
    print(f"{out / 'base'}" + (f"  {out / 'adapter'}" if a.adapter_rank > 0 else "")
          + f"  ({time.perf_counter() - t0:.0f} s, peak RSS {gb(read_status().get('VmHWM'))} GiB)")
    return 0


def main(argv: list[str]) -> int:
    """`qwen-local bench`: serving (runtime.bench), `make-model`, `convert` (here), `soak`
    (runtime.bench.soak_cli) and `replicas` (runtime.bench.replicas). The dispatch lives here, in
    the upper layer, because two of them build or convert models."""
    if argv and argv[0] == "make-model":
        return main_make_model(argv[1:])
    if argv and argv[0] == "convert":
        return main_convert(argv[1:])
    if argv and argv[0] == "soak":
        from qwen_local.runtime.bench import soak_cli
        return soak_cli.main(argv[1:])
    if argv and argv[0] == "replicas":
        from qwen_local.runtime.bench import replicas
        return replicas.main(argv[1:])
    from qwen_local.runtime.bench.cli import main_serve
    return main_serve(argv)


if __name__ == "__main__":
    if len(sys.argv) == 7 and sys.argv[1] == "--child-merge":
        sys.exit(child_merge(*sys.argv[2:6], int(sys.argv[6])))
    sys.exit(main(sys.argv[1:]))
