"""The bounded queue of one app: at most --max-queue requests in flight (queued + running); beyond
that, or once a graceful shutdown has begun, 503 with a Retry-After that grows with the queue."""
from __future__ import annotations

import math
from collections.abc import Callable

from qwen_local.runtime.serve.errors import HTTPError, Overloaded


class Admission:
    def __init__(self, max_queue: int, retry_after: int, engine_slots: int,
                 on_reject: Callable[[str], None] = lambda endpoint: None):
        self.max_queue, self.min_retry_after, self.engine_slots = max_queue, retry_after, engine_slots
        self.on_reject = on_reject
        self.inflight = 0
        self.draining = False

    def begin_drain(self) -> None:
        """New requests get 503 from now on; the ones in flight run to their end."""
        self.draining = True

    def slot(self, endpoint: str) -> Slot:
        return Slot(self, endpoint)

    def retry_after(self) -> str:
        # roughly how long the queue ahead takes: one round of the engine's slots per second
        return str(max(self.min_retry_after, math.ceil(self.inflight / max(1, self.engine_slots))))

    def overloaded(self) -> HTTPError:
        detail = ("server is shutting down, retry later" if self.draining else
                  "server busy: request queue is full, retry later")
        return HTTPError(503, detail, {"Retry-After": self.retry_after()})


class Slot:
    """One place in the bounded queue; release() is idempotent (called by whoever ends first)."""

    def __init__(self, admission: Admission, endpoint: str):
        self.admission, self.endpoint, self.held = admission, endpoint, False

    def acquire(self) -> Slot:
        a = self.admission
        if a.inflight >= a.max_queue or a.draining:
            a.on_reject(self.endpoint)
            raise Overloaded()
        a.inflight += 1
        self.held = True
        return self

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.inflight -= 1

    __enter__ = acquire

    def __exit__(self, *exc) -> None:
        self.release()
