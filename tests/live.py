"""What the HTTP tests share: a live server on 127.0.0.1 (runtime.serve.serving, the same helper
eval --http uses), waits on events with a deadline, a client that hangs up at a chosen moment, and
readers for SSE and Prometheus text."""
from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

from qwen_local.runtime.serve.runner import serving


@dataclass
class Live:
    url: str

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kw.pop("timeout", 60), **kw)


@contextlib.contextmanager
def live(app):
    """A real uvicorn server for `app` in a background thread, stopped on exit."""
    with serving(app) as url:
        yield Live(url)


def wait_for(cond: Callable[[], bool], limit: float = 30.0) -> bool:
    """Poll cond() until it holds or `limit` seconds pass (a deadline, not a measurement)."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


def hang_up_when(url: str, path: str, body: dict, event: Callable[[], bool],
                 limit: float = 30.0) -> bool:
    """POST body to url+path over a plain socket, then close the connection as soon as `event()`
    holds (e.g. an engine counter moved): the client leaves at that moment, whatever the load.
    Returns whether the event came before the deadline."""
    u = urlsplit(url)
    data = json.dumps(body).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {u.hostname}:{u.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port), timeout=limit) as sock:
        sock.sendall(head + data)
        return wait_for(event, limit)


def sse_events(lines) -> list[tuple[str, dict]]:
    """Parse text/event-stream lines into (event, data) pairs."""
    out, event, data = [], "message", []
    for line in lines:
        if line == "":
            if data:
                out.append((event, json.loads("\n".join(data))))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].lstrip())
    if data:
        out.append((event, json.loads("\n".join(data))))
    return out


def metric(text: str, name: str, **labels) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            if key.split("{")[0] == name and all(f'{k}="{v}"' in key for k, v in labels.items()):
                total += float(value)
    return total
