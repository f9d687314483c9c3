"""`qwen-local`: one command line for convert, serve, demo, bench and eval.

Each subcommand lives in its own module with a `main(argv) -> int`; this file only dispatches and
turns expected failures (qwen_local.runtime.errors.UserError) and Ctrl-C into one clear line and a non-zero
exit code.
"""
from __future__ import annotations

import importlib
import signal
import sys
import threading

from qwen_local.runtime.errors import Terminated, UserError, __version__

__all__ = ["main", "UserError", "__version__"]

COMMANDS = {
    "convert": ("convert.cli", "PEFT LoRA adapter (+ base) -> merged, verified, quantized GGUF"),
    "serve": ("runtime.serve.cli", "serve /qwen/intent and /qwen/generate over a GGUF"),
    "demo": ("convert.dev.demo", "tiny random model end to end: convert -> verify -> serve -> ask"),
    "bench": ("convert.dev.bench", "speed and memory against raw llama.cpp and the transformers path"),
    "eval": ("convert.dev.evaluate", "intent accuracy / agreement of one or more GGUFs on labelled data"),
}


def _raise_terminated(signum, frame):  # noqa: ARG001
    raise Terminated(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: qwen-local {" + ",".join(COMMANDS) + "} ...\n")
        for name, (_, about) in COMMANDS.items():
            print(f"  {name:<8} {about}")
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        print(f"qwen-local {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"qwen-local: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})",
              file=sys.stderr)
        return 2
    module = importlib.import_module(f"qwen_local.{COMMANDS[argv[0]][0]}")
    saved = {}
    for sig in (signal.SIGTERM, getattr(signal, "SIGHUP", None)):
        # only where the default would kill us (nohup's SIG_IGN stays), and only in the main thread
        if sig is not None and signal.getsignal(sig) is signal.SIG_DFL and \
                threading.current_thread() is threading.main_thread():
            saved[sig] = signal.signal(sig, _raise_terminated)
    try:
        return int(module.main(argv[1:]) or 0)
    except UserError as e:
        print(f"qwen-local {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qwen-local {argv[0]}: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:  # the shell's convention: 128 + signal number (SIGTERM 143, SIGHUP 129)
        print(f"qwen-local {argv[0]}: {signal.Signals(t.signum).name}, stopped cleanly", file=sys.stderr)
        return 128 + t.signum
    finally:
        for sig, old in saved.items():
            signal.signal(sig, old)


if __name__ == "__main__":
    sys.exit(main())
