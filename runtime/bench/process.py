"""Worker processes, one per measured path, speaking JSON lines on a private pipe: the parent's
handle (`Worker`) and the loop inside the child (`worker_main`, run as
`python -m runtime.bench.process --worker SPEC`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from qwen_local.runtime.errors import UserError

# the checkout that holds runtime/: child processes import this same code, installed or not
ROOT = Path(__file__).resolve().parents[2]


def child_env(**extra: str) -> dict:
    """The environment of a child Python process: ours, with ROOT first on PYTHONPATH."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.update(extra)
    return env


class Worker:
    def __init__(self, name: str, spec: dict, log_dir: Path, env: dict | None = None):
        self.name = name
        self.log_path = log_dir / f"{name.replace(' ', '_').replace('/', '_')}.log"
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "qwen_local.runtime.bench.process", "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=child_env(**(env or {})),
            text=True, encoding="utf-8")
        self.ready = self._read()

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise RuntimeError(f"bench worker {self.name} died (exit {self.proc.returncode}); "
                               f"log tail:\n{self.log_tail()}")
        msg = json.loads(line)
        if msg.get("user_error"):  # e.g. a GGUF llama.cpp refuses: one line, as everywhere else
            raise UserError(msg["user_error"])
        if "error" in msg:
            raise RuntimeError(f"bench worker {self.name}: {msg['error']}\nlog tail:\n{self.log_tail()}")
        return msg

    def call(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps(dict(kw, op=op)) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def close(self):
        try:
            if self.proc.poll() is None:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired, ValueError):
            self.proc.kill()
            self.proc.wait()
        finally:
            self._log.close()


def worker_main(spec_json: str) -> int:
    """Entry point of a worker process: load the path, say ready, then answer requests."""
    proto = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)  # anything a library prints goes to the log, never into the protocol
    spec = json.loads(spec_json)
    try:
        from qwen_local.runtime.bench.workers import LlamaWorker, SeedWorker

        impl = {"llama": LlamaWorker, "seed": SeedWorker}[spec["kind"]](spec)
        proto.write(json.dumps(impl.ready) + "\n")
    except Exception as e:  # noqa: BLE001 - reported to the parent, which raises
        import traceback
        traceback.print_exc()
        from qwen_local.runtime.engine import EngineError
        msg = {"error": f"{type(e).__name__}: {e}"}
        if isinstance(e, (EngineError, FileNotFoundError)):
            msg["user_error"] = str(e)
        proto.write(json.dumps(msg) + "\n")
        return 1
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            res = getattr(impl, "op_" + req.pop("op"))(**req)
        except Exception as e:  # noqa: BLE001
            import traceback
            traceback.print_exc()
            res = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(res) + "\n")
    return 0


if __name__ == "__main__":  # a measuring worker, started by Worker
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.exit(worker_main(sys.argv[2]))
