"""`qwen-local serve`: the HTTP face of the engine (FastAPI app factory + uvicorn runner).

Endpoints (Swagger UI at /docs, ReDoc at /redoc, both from the fastapi-offline wheel's local files):
  POST /qwen/intent        {"query"} -> {"intent", "probs", "source", "latency_ms"}
  POST /qwen/intent/batch  {"queries": [...]} -> {"results": [<same shape>, ...]}
  POST /qwen/generate      {"query", "intent", "has_products", "products", "stream"} ->
                           {"message", "source", ...}, or with "stream": true Server-Sent Events:
                           `event: delta` {"text"} ..., then `event: done` {"message", "source", ...}
                           (or `event: error` {"detail"})
  GET  /v1/models, POST /v1/chat/completions, POST /v1/completions
                           OpenAI's API on the same engine (openai_api): chat through the GGUF's chat
                           template, raw prompts, guided_choice; errors in OpenAI's shape
  GET  /health             model, quant, threads, GPU offload
  GET  /metrics            Prometheus
  GET  /, /playground      a page to try the model in a browser (off with --no-playground)

With --api-key, everything but /health, /docs, /redoc and /openapi.json (and the docs' assets) and
the playground page needs the bearer key: a browser cannot send one to open the docs or the page
(which asks for the key), and neither holds anything secret.

One engine worker owns the llama.cpp context; the server admits at most --max-queue requests at
once (queued + running) and answers 503 with Retry-After beyond that. Every request has a
timeout; a client that disconnects stops its generation. Bad input gets 413/422, never a 500: a body
over --max-body is refused before it is read in full, and bodies FastAPI would answer with a bare
400 (not UTF-8, nested too deeply) get 422 like any other malformed JSON.

Modules, from the outside in: cli (the command), runner (uvicorn), app (create_app), guards (auth,
body limit), routes (the endpoints), openai_api and openai_schemas (/v1), intents and replies (the
policies), local and remote (the engine and the fallback), admission (the bounded queue), state,
settings, schemas, errors, metrics, fallback (the OpenAI-compatible backend), playground (the page).
"""
from __future__ import annotations

from qwen_local.runtime.serve.app import create_app
from qwen_local.runtime.serve.runner import serving
from qwen_local.runtime.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serving"]
