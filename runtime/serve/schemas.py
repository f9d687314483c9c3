"""What the endpoints take and give: request and response bodies, and the Server-Sent Event shape.

Text that cannot be UTF-8 (lone surrogates from JSON escapes) is a 422 like any other bad field,
never a 500 when it would later be encoded.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


def utf8_text(value: Any) -> Any:
    """Reject text that cannot be UTF-8 (lone surrogates from JSON escapes) with a 422."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("text must be valid Unicode (no lone surrogates)") from None
    elif isinstance(value, dict):
        for k, v in value.items():
            utf8_text(k)
            utf8_text(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            utf8_text(v)
    return value


def _query(v: str) -> str:
    utf8_text(v)
    if not v.strip():
        raise ValueError("query must not be empty")
    return v


class IntentRequest(BaseModel):
    query: str = Field(min_length=1, description="the customer's message")

    _check = field_validator("query")(_query)


class IntentResponse(BaseModel):
    intent: str
    probs: dict[str, float]
    source: str = Field(description='"local" or "fallback"')
    latency_ms: float


class BatchRequest(BaseModel):
    queries: list[str] = Field(min_length=1)

    @field_validator("queries")
    @classmethod
    def _each(cls, v: list[str]) -> list[str]:
        for q in v:
            _query(q)
        return v


class BatchResponse(BaseModel):
    results: list[IntentResponse]


class Product(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str | None = None
    price: float | int | str | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, v):  # extra fields too: every key and value must be encodable text
        return utf8_text(v)


class GenerateRequest(BaseModel):
    query: str = Field(min_length=1)
    intent: str | None = Field(None, description="the label from /qwen/intent (adds a hint)")
    has_products: bool = False
    products: list[Product] | None = None
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=100_000,
                                   description="default: the prompt profile's (seed: 120); at most the "
                                               "server's --max-tokens (512): more is a 422, not a silent cap")
    temperature: float | None = Field(None, ge=0.0, le=2.0,
                                      description="default: the prompt profile's (seed: 0.5)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    _check = field_validator("query")(_query)


class GenerateResponse(BaseModel):
    message: str
    source: str
    intent: str | None = None
    finish_reason: str
    n_tokens: int | None = None
    latency_ms: float
    tokens_per_s: float | None = None


@dataclass
class Reply:
    """A /qwen/generate request that passed the server's checks, with its length and temperature
    resolved (the request's, else the prompt profile's); t0 is when the request arrived."""
    query: str
    intent: str | None
    has_products: bool
    products: list[dict] | None
    max_tokens: int
    temperature: float
    seed: int | None
    stream: bool
    t0: float

    @property
    def prompt(self) -> tuple:
        """The reply prompt's arguments, as the engine and the fallback take them."""
        return self.query, self.intent, self.has_products, self.products


def reply_payload(message: str, source: str, intent: str | None, finish_reason: str, latency_ms: float,
                  n_tokens: int | None = None, tokens_per_s: float | None = None) -> dict:
    """A GenerateResponse as a dict: the JSON answer, and the data of a stream's `done` event."""
    return {"message": message, "source": source, "intent": intent, "finish_reason": finish_reason,
            "n_tokens": n_tokens, "latency_ms": latency_ms, "tokens_per_s": tokens_per_s}


def sse(event: str, data: dict) -> dict:
    """One Server-Sent Event for sse_starlette: `event: <event>` with the JSON data."""
    return {"event": event, "data": json.dumps(data, ensure_ascii=False)}
