"""A fallback that misbehaves on purpose, for the fault tests and `qwen-local bench soak
--fallback-faults`: a real HTTP listener on 127.0.0.1 where an OpenAI-compatible server would be.

Modes, per connection:
- slow:    reads the request and never answers (until the client leaves, the remote is stopped,
           or 60 s pass);
- garbage: 200 with a body that is not JSON (and not an event stream);
- wrong:   200 with JSON of the wrong shape;
- reset:   closes the connection without a word (what a crashed upstream looks like);
- cycle:   the four above in turn.
"""
from __future__ import annotations

import itertools
import socket
import threading
import time

MODES = ("slow", "garbage", "wrong", "reset")


class FaultyRemote:
    def __init__(self, mode: str = "cycle", host: str = "127.0.0.1"):
        if mode != "cycle" and mode not in MODES:
            raise ValueError(f"mode must be cycle or one of {MODES}")
        self.mode = mode
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}/v1"
        self.sock.settimeout(0.1)
        self.stop_evt = threading.Event()
        self._modes = itertools.cycle(MODES)
        self.served: dict[str, int] = {}
        threading.Thread(target=self._accept, name="faulty-remote", daemon=True).start()

    def _accept(self) -> None:
        while not self.stop_evt.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            mode = next(self._modes) if self.mode == "cycle" else self.mode
            self.served[mode] = self.served.get(mode, 0) + 1
            threading.Thread(target=self._handle, args=(conn, mode), daemon=True).start()

    def _handle(self, conn: socket.socket, mode: str) -> None:
        with conn:
            try:
                if mode == "reset":
                    return
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                if mode == "slow":
                    conn.settimeout(0.5)
                    end = time.monotonic() + 60
                    while not self.stop_evt.is_set() and time.monotonic() < end:
                        try:
                            if not conn.recv(65536):
                                return  # the client gave up
                        except socket.timeout:
                            continue
                    return
                body = b"<html>502 oops</html>" if mode == "garbage" else b'{"object": "nothing"}'
                conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)
            except OSError:
                return

    def stop(self) -> None:
        self.stop_evt.set()
        self.sock.close()
