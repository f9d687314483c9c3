"""`qwen-local demo`: the whole path on a fresh machine, with no adapter and no download.

1. builds (once, cached in models/demo/) a tiny random-weight Qwen2 with the real Qwen2.5 tokenizer
   and trains a LoRA intent adapter on it from the packaged Vietnamese set (convert.dev.synthetic);
2. converts it like a real adapter: merge -> GGUF -> quantize -> verify against peft
   (convert.pipeline.run);
3. serves it with the real server on 127.0.0.1 and asks one intent and one reply over HTTP.

The base weights are random: the intent labels come from a weak classifier and the reply is noise.
The demo shows the path, not quality.

Cost: the first run is the model build with the adapter training (600 torch steps, on one thread:
the tiny matmuls run several times faster than on two) and the verified conversion. On 2 cores
shared with other work (load ~4.5) it took 151 s: 76 s model, 69 s convert + verify, 3 s serve and
ask. Later runs reuse models/demo/ and only serve and ask. The demo prints each step's time.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from qwen_local.runtime.errors import UserError

WARNING = (
    "NOTE: this demo model's base has RANDOM weights. Its LoRA adapter was trained here on the\n"
    "packaged intent set, so its labels come from a weak classifier{accuracy}\n"
    "and its reply is noise: the demo shows that convert -> verify -> serve works end to end on\n"
    "this machine, not quality. With a real adapter:\n"
    "    qwen-local convert --adapter ./epoch_2_final --base Qwen/Qwen2.5-3B-Instruct --out models/epoch_2_final.gguf\n"
    "    qwen-local serve --model models/epoch_2_final.gguf\n"
    "then POST {{\"query\": ...}} to http://127.0.0.1:8000/qwen/intent (see the README's Serve section)."
)
QUERY = "Mình cần một chiếc áo khoác nhẹ để đi Đà Lạt, shop tư vấn giúp?"
PRODUCTS = [{"name": "Áo khoác gió nữ chống nước", "price": 459000, "color": "be"},
            {"name": "Áo cardigan len mỏng", "price": 329000, "color": "xám"}]


def build_parser():
    from qwen_local.convert.quantize import QTYPES
    from qwen_local.runtime.options import Parser, add_output_flags, add_threads, int_in

    p = Parser(prog="qwen-local demo", description=__doc__.split("\n")[0])
    p.add_argument("--dir", default="models/demo", help="cache folder")
    p.add_argument("--quant", default="q8_0", choices=sorted(QTYPES), help="quantization of the demo GGUF")
    p.add_argument("--port", type=int_in(0, 65535), default=0, help="port to serve on (0: a free one)")
    add_threads(p)
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached model and GGUF")
    p.add_argument("--keep-serving", action="store_true",
                   help="keep the server running after the two requests (Ctrl-C to stop)")
    add_output_flags(p, progress=False)
    return p


def build_model(folder: Path, quant: str, rebuild: bool, log=print) -> Path:
    """The demo GGUF, built (tokenizer, base, adapter, conversion) only when not cached."""
    gguf = folder / f"demo-tiny-{quant}.gguf"
    if gguf.is_file() and (folder / f"demo-tiny-{quant}.gguf.json").is_file() and not rebuild:
        log(f"[1/3] cached demo model: {gguf}")
        return gguf
    try:
        from qwen_local.convert.dev import synthetic
    except ImportError as e:  # pragma: no cover
        raise UserError(f"cannot import the converter: {e}") from None
    folder.mkdir(parents=True, exist_ok=True)
    base, adapter = folder / "base", folder / "adapter"
    log("[1/3] building a tiny random-weight Qwen2 with the real Qwen2.5 tokenizer and training a LoRA "
        "intent adapter on it ...")
    t0 = time.perf_counter()
    try:
        if rebuild or not (base / "config.json").is_file():
            synthetic.make_base(base, folder / "tokenizer", "tiny", seed=0)
        if rebuild or not (adapter / "adapter_config.json").is_file():
            # one torch thread: on 2 cores the tiny matmuls run several times faster than with two
            synthetic.train_intent_adapter(base, adapter, seed=1, threads=1)
    except RuntimeError as e:  # e.g. the dashscope wheel (tokenizer ranks) is missing
        raise UserError(str(e)) from None
    log(f"      {time.perf_counter() - t0:.0f} s")
    log(f"[2/3] convert -> verify ({quant}) ...")
    t1 = time.perf_counter()
    from qwen_local.convert.pipeline import final_line, run

    report = run(str(adapter), base=str(base), quant=quant, out=gguf, verify=True, progress=False,
                 log=lambda s: log("      " + s))
    log("      " + final_line(report))
    log(f"      {time.perf_counter() - t1:.0f} s")
    return Path(report["output"])


def _heldout(folder: Path) -> str:
    """The adapter's accuracy on its held-out queries, as measured after training (if recorded)."""
    try:
        from qwen_local.convert.dev.synthetic import INTENT_REPORT

        h = json.loads((folder / "adapter" / INTENT_REPORT).read_text())["heldout"]
        return f" ({h['accuracy']:.0%} right on {h['n']} held-out queries)"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def main(argv: list[str] | None = None) -> int:
    import httpx

    from qwen_local.runtime.engine import Engine
    from qwen_local.runtime.options import quiet
    from qwen_local.runtime.serve import ServeSettings, create_app, serving

    a = build_parser().parse_args(argv)
    quiet(a.verbose)
    t_start = time.perf_counter()
    gguf = build_model(Path(a.dir), a.quant, a.rebuild)
    t_built = time.perf_counter()

    print("[3/3] serving it and asking over HTTP ...", flush=True)
    engine = Engine(gguf, threads=a.threads, n_ctx=4096)  # the profile stored in the GGUF
    try:
        with serving(create_app(engine, ServeSettings()), port=a.port) as url, \
                httpx.Client(base_url=url, timeout=120) as http:
            health = http.get("/health").json()
            print(f"      {url}  model {Path(health['model']).name} ({health['quant']}), "
                  f"{health['threads']} threads, GPU offload {'on' if health['gpu_offload'] else 'off'}")
            print(f"\n$ curl -s {url}/qwen/intent -H 'content-type: application/json' "
                  f"-d '{json.dumps({'query': QUERY}, ensure_ascii=False)}'")
            r = http.post("/qwen/intent", json={"query": QUERY})
            r.raise_for_status()
            print(json.dumps(r.json(), ensure_ascii=False, indent=2))
            body = {"query": QUERY, "intent": r.json()["intent"], "has_products": True,
                    "products": PRODUCTS, "max_tokens": 40}
            print(f"\n$ curl -s {url}/qwen/generate -H 'content-type: application/json' "
                  f"-d '{json.dumps(body, ensure_ascii=False)}'")
            g = http.post("/qwen/generate", json=body)
            g.raise_for_status()
            print(json.dumps(g.json(), ensure_ascii=False, indent=2))
            t_end = time.perf_counter()
            print(f"\ndemo took {t_end - t_start:.0f} s here: model {t_built - t_start:.0f} s, serve and ask "
                  f"{t_end - t_built:.0f} s")
            print(WARNING.format(accuracy=_heldout(Path(a.dir))), flush=True)
            if a.keep_serving:
                print(f"\nserving on {url} (docs at {url}/docs); Ctrl-C to stop", flush=True)
                while True:
                    time.sleep(0.5)
    except RuntimeError as e:  # the server did not start (port taken?)
        raise UserError(str(e)) from None
    finally:
        engine.close()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
