"""The app under uvicorn: `serving` runs it in a background thread of this process (eval --http, the
demo); `serve` runs it as `qwen-local serve`, where SIGTERM (or Ctrl-C) drains instead of dropping
work.

uvicorn alone, on SIGTERM, closes the listening socket and waits for open connections: new clients
get "connection refused" (a load balancer cannot tell that from a crash) and a long stream keeps the
process alive for as long as it runs. Here the first signal starts a drain:

1. new requests get 503 + Retry-After ("shutting down"); /health answers `status: draining`;
2. in-flight requests (queued, prefilling, streaming, at the fallback) run to their end for up to
   `grace` seconds;
3. whatever still runs then is cancelled in the engine, so it ends with a clean error (a 503 JSON
   answer or an SSE `error` event), never a cut connection;
4. uvicorn then stops as usual. A second signal stops at once.
"""
from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
import time

import uvicorn


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app, engine, grace: float):
        super().__init__(config)
        self.app, self.engine, self.grace = app, engine, float(grace)
        self.draining = False

    def handle_exit(self, sig, frame):  # called by uvicorn's signal handlers
        if self.draining:  # a second signal: stop now
            return super().handle_exit(sig, frame)
        self.draining = True
        self.app.state.serve.admission.begin_drain()
        threading.Thread(target=self._drain, args=(sig,), name="qwen-local-drain", daemon=True).start()

    def _drain(self, sig) -> None:
        name = signal.Signals(sig).name if sig else "shutdown"
        admission = self.app.state.serve.admission
        print(f"qwen-local serve: {name}: draining {admission.inflight} request(s), grace {self.grace:g} s",
              file=sys.stderr, flush=True)
        end = time.monotonic() + self.grace
        while admission.inflight > 0 and time.monotonic() < end:
            time.sleep(0.05)
        if admission.inflight > 0:
            n = self.engine.cancel_all()
            print(f"qwen-local serve: grace period over: cancelled {n} generation(s)",
                  file=sys.stderr, flush=True)
            end = time.monotonic() + 5  # cancelled jobs answer within a decode step or two
            while admission.inflight > 0 and time.monotonic() < end:
                time.sleep(0.05)
        super().handle_exit(sig, None)


def serve(app, engine, *, host: str, port: int, log_level: str, grace: float) -> None:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    DrainingServer(config, app, engine, grace).run()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def serving(app, port: int | None = None, start_timeout: float = 30.0):
    """Run `app` with uvicorn on 127.0.0.1 in a background thread; yields its base URL."""
    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off"))
    thread = threading.Thread(target=server.run, name="qwen-local-http", daemon=True)
    thread.start()
    try:
        t0 = time.monotonic()
        while not server.started:
            if not thread.is_alive() or time.monotonic() - t0 > start_timeout:
                raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
            time.sleep(0.02)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
