"""Prometheus metrics of one server instance (own registry, so several apps can live in one process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the server)

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TPS_BUCKETS = (1, 2, 4, 6, 8, 10, 15, 20, 30, 50, 100, 200, 500)


class Metrics:
    def __init__(self, queue_depth=None, engine_depth=None):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("qwen_requests", "HTTP requests by endpoint, status code and source",
                                ["endpoint", "status", "source"], registry=r)
        self.latency = Histogram("qwen_request_latency_seconds", "request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("qwen_generated_tokens", "tokens generated locally", registry=r)
        self.tokens_per_s = Histogram("qwen_generation_tokens_per_second",
                                      "local decode speed per reply", buckets=TPS_BUCKETS, registry=r)
        self.cancelled = Counter("qwen_generations_cancelled",
                                 "local generations stopped early (client disconnected or timeout)",
                                 ["reason"], registry=r)
        self.fallbacks = Counter("qwen_fallbacks", "requests answered by the fallback backend",
                                 ["endpoint", "reason"], registry=r)
        self.rejected = Counter("qwen_overload_rejections", "requests refused with 503 (queue full)",
                                ["endpoint"], registry=r)
        self.queue_depth = Gauge("qwen_queue_depth", "requests in flight in this server (queued + running)",
                                 registry=r)
        self.engine_depth = Gauge("qwen_engine_depth", "jobs waiting or running in the llama.cpp worker",
                                  registry=r)
        if queue_depth is not None:
            self.queue_depth.set_function(queue_depth)
        if engine_depth is not None:
            self.engine_depth.set_function(engine_depth)

    def render(self) -> bytes:
        return generate_latest(self.registry)
