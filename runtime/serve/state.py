"""What one app's endpoints share (engine, settings, fallback, metrics, queue), kept on
`app.state.serve` and handed to each endpoint by `Depends(get_state)`."""
from __future__ import annotations

import time
from pathlib import Path

from fastapi import Request

from qwen_local.runtime.engine import Engine
from qwen_local.runtime.fidelity import METADATA_KEY as FIDELITY_KEY, stored_figures
from qwen_local.runtime.serve.admission import Admission
from qwen_local.runtime.serve.errors import HTTPError
from qwen_local.runtime.serve.metrics import Metrics
from qwen_local.runtime.serve.settings import ServeSettings

# metric label of each endpoint; a request refused before it reached one counts as "other"
ENDPOINTS = {"/qwen/intent": "intent", "/qwen/intent/batch": "batch", "/qwen/generate": "generate",
             "/v1/chat/completions": "chat", "/v1/completions": "completions", "/v1/models": "models"}


class ServeState:
    def __init__(self, engine: Engine, settings: ServeSettings, fallback=None):
        self.engine, self.settings, self.fallback = engine, settings, fallback
        # what convert measured the file to keep, read once (None: not a verified conversion)
        self.fidelity = stored_figures(engine.weights.meta(FIDELITY_KEY))
        self.metrics = Metrics(queue_depth=lambda: self.admission.inflight,
                               engine_depth=lambda: engine.depth)
        self.admission = Admission(settings.max_queue, settings.retry_after, engine.slots,
                                   on_reject=lambda endpoint: self.metrics.rejected.labels(endpoint).inc())
        self._chat_template = _chat_template(engine)
        self.started = int(time.time())

    @property
    def model_id(self) -> str:
        """The name /v1 gives the served model: its file name without .gguf."""
        return Path(self.engine.model_path).stem

    def chat_template(self):
        """The GGUF's chat template (runtime.chat.ChatTemplate), or HTTPError 400 when the model
        has none that can be used: /qwen/* and /v1/completions work without one."""
        if isinstance(self._chat_template, str):
            raise HTTPError(400, f"{self._chat_template}; use /v1/completions with a rendered prompt",
                            code="no_chat_template")
        return self._chat_template

    @property
    def draining(self) -> bool:
        return self.admission.draining

    def record(self, endpoint: str, status: int, source: str, t0: float) -> None:
        """One answered request: its count by status and source, and its latency since t0."""
        self.metrics.requests.labels(endpoint, str(status), source).inc()
        self.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)

    def count(self, path: str, status: int) -> None:
        """A request answered before its endpoint ran (body too large, not valid JSON)."""
        self.metrics.requests.labels(ENDPOINTS.get(path, "other"), str(status), "local").inc()

    def check_query(self, q: str) -> None:
        if len(q) > self.settings.max_query_chars:
            raise HTTPError(413, f"query too long: {len(q)} characters, the limit is "
                                 f"{self.settings.max_query_chars}")


async def get_state(request: Request) -> ServeState:
    # async: FastAPI would run a plain function in its thread pool, a hop on every request
    return request.app.state.serve


def _chat_template(engine: Engine):
    """The GGUF's chat template, or why there is none to use."""
    from qwen_local.runtime.chat import ChatTemplate

    source = engine.weights.meta("tokenizer.chat_template")
    if not source:
        return "the model has no chat template (tokenizer.chat_template)"
    try:
        return ChatTemplate(source)
    except ValueError as e:
        return str(e)
