"""`qwen-local serve`: its options are ServeSettings' fields (runtime.options.add_fields), so the
command line, its --help defaults and the app's settings cannot drift apart."""
from __future__ import annotations

import argparse
import sys

from qwen_local.runtime import serve as serve_pkg
from qwen_local.runtime.engine import Engine, EngineError
from qwen_local.runtime.errors import UserError
from qwen_local.runtime.options import Parser, add_fields, add_output_flags, from_args, quiet
from qwen_local.runtime.serve.app import create_app
from qwen_local.runtime.serve.settings import ServeSettings


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="qwen-local serve", description=serve_pkg.__doc__.split("\n")[0])
    add_fields(p, ServeSettings)
    add_output_flags(p, progress=False)
    return p


def profile_warning(engine: Engine) -> str | None:
    """Why the served prompts may not be the ones the model was verified with, if they may not."""
    stored, served = engine.stored_profile, engine.cfg
    if stored is None:
        return (f"{engine.model_path} carries no prompt profile (not made by qwen-local convert?): "
                f"serving {served.name!r}; make sure the fine-tune was trained with these prompts")
    if stored.sha256 != served.sha256:
        return (f"serving prompt profile {served.name!r} ({served.sha256[:16]}), but the model was "
                f"converted and verified with {stored.name!r} ({stored.sha256[:16]}): a fine-tune "
                "answers like the trained model only with its training prompts")
    return None


def _fallback(s: ServeSettings, engine: Engine):
    if s.fallback != "openai":
        return None
    from qwen_local.runtime.serve.fallback import OpenAIFallback

    try:  # the remote gets the same prompts as the local model
        # the client library's own timeout (30 s, one retry) must not cut a longer --fallback-timeout
        return OpenAIFallback(engine.cfg, model=s.fallback_model, mode=s.fallback_mode,
                              timeout=s.fallback_seconds)
    except ValueError as e:
        raise UserError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    from qwen_local.runtime.profile import load_profile

    a = build_parser().parse_args(argv)
    quiet(a.verbose)
    s = from_args(ServeSettings, a)
    profile = load_profile(s.prompts) if s.prompts else None  # a ProfileError is a UserError
    if not s.fallback and not s.local_only:
        raise UserError("a fallback policy needs --fallback openai")
    try:
        engine = Engine(s.model, profile, threads=s.threads, n_ctx=s.ctx, slots=s.slots,
                        n_gpu_layers=s.gpu_layers, flash_attn=s.flash_attn == "on", lora=s.lora)
    except (FileNotFoundError, EngineError, ValueError) as e:
        raise UserError(str(e)) from None
    try:
        warning = profile_warning(engine)
        if warning:
            print(f"qwen-local serve: warning: {warning}", file=sys.stderr, flush=True)
        app = create_app(engine, s, _fallback(s, engine))
        info = engine.describe()
        lora = f" + LoRA {info['lora']['file']}" if info["lora"] else ""
        print(f"qwen-local serve: {info['model']} ({info['quant']}){lora}, "
              f"prompts {info['profile']['name']!r} "
              f"({info['profile']['sha256']}), {info['threads']} threads, "
              f"GPU offload {'on' if info['gpu_offload'] else 'off'}, "
              + (f"playground http://{s.host}:{s.port}/, " if s.playground else "")
              + f"API docs http://{s.host}:{s.port}/docs",
              flush=True)
        from qwen_local.runtime.serve.runner import serve

        serve(app, engine, host=s.host, port=s.port, log_level=s.log_level, grace=s.grace)
    finally:
        engine.close()
    return 0
