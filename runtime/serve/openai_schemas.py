"""What the /v1 endpoints take and give: OpenAI's request bodies, checked strictly, and the shapes of
its answers and stream chunks.

A field that would change the answer and is not served (n > 1, tools, logprobs, a response_format
other than text, penalties, ...) is a 400 naming it; so is any field this server does not know.
Nothing is silently ignored but fields that cannot change the answer (user, store, metadata,
service_tier, parallel_tool_calls without tools). `guided_choice` (vLLM's extension, also as
`structured_outputs: {"choice": [...]}`) answers with one of the choices by the one-pass label rule.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from qwen_local.runtime.serve.schemas import utf8_text

MAX_CHOICES = 64
MAX_STOPS = 16


def _absent(v) -> bool:
    return v is None or v is False or v == [] or v == {}


# field -> (accepted?, why not): fields of OpenAI's API that change the answer and are not served
UNSERVED = {
    "n": (lambda v: v in (None, 1), "only n=1 is served"),
    "best_of": (lambda v: v in (None, 1), "only best_of=1 is served"),
    "logprobs": (_absent, "logprobs are not served"),
    "top_logprobs": (lambda v: v in (None, 0), "logprobs are not served"),
    "echo": (_absent, "echo is not served"),
    "suffix": (lambda v: not v, "suffix (insertion) is not served"),
    "tools": (_absent, "tools are not served"),
    "functions": (_absent, "functions are not served"),
    "tool_choice": (lambda v: v in (None, "none"), "tools are not served"),
    "function_call": (lambda v: v in (None, "none"), "functions are not served"),
    "response_format": (lambda v: v is None or v == {"type": "text"},
                        "only response_format {\"type\": \"text\"} is served (for labels: guided_choice)"),
    "frequency_penalty": (lambda v: not v, "penalties are not served"),
    "presence_penalty": (lambda v: not v, "penalties are not served"),
    "logit_bias": (_absent, "logit_bias is not served"),
    "reasoning_effort": (lambda v: v is None, "reasoning_effort is not served"),
    "modalities": (lambda v: v in (None, ["text"]), "only text output is served"),
    "audio": (lambda v: v is None, "audio is not served"),
    "prediction": (lambda v: v is None, "prediction is not served"),
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class StructuredOutputs(BaseModel):
    """vLLM's structured outputs: of them, `choice` is served (the same as guided_choice)."""
    model_config = ConfigDict(extra="forbid")
    choice: list[str] = Field(min_length=1, max_length=MAX_CHOICES)


class V1Request(BaseModel):
    """The fields chat and completions share."""
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="any name: this server serves one model (see /v1/models)")
    max_tokens: int | None = Field(None, ge=1, description="default and limit: the server's --max-tokens")
    temperature: float | None = Field(None, ge=0, le=2, description="default 1")
    top_p: float | None = Field(None, gt=0, le=1, description="default 1")
    top_k: int | None = Field(None, ge=-1, description="vLLM's extension; 0 or -1: no cut (default)")
    stop: str | list[str] | None = Field(None, description=f"up to {MAX_STOPS} texts that end the answer")
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    guided_choice: list[str] | None = Field(
        None, min_length=1, max_length=MAX_CHOICES,
        description="vLLM's extension: answer with one of these, by the one-pass label rule "
                    "(the choice whose first tokens hold the most probability; no sampling)")
    structured_outputs: StructuredOutputs | None = None
    # accepted; they cannot change the answer
    user: str | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's, not served: see UNSERVED
    n: int | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text(cls, v):  # text that cannot be UTF-8 (lone surrogates) is a 400, never a 500
        return utf8_text(v)

    @field_validator(*[k for k in UNSERVED], check_fields=False)
    @classmethod
    def _served(cls, v, info: ValidationInfo):
        accepted, why = UNSERVED[info.field_name]
        if not accepted(v):
            raise ValueError(why)
        return v

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS or any(not s for s in stops):
            raise ValueError(f"stop must be up to {MAX_STOPS} non-empty texts")
        return v

    @field_validator("guided_choice")
    @classmethod
    def _choices(cls, v):
        if v is not None and (len(set(v)) != len(v) or any(not c for c in v)):
            raise ValueError("guided_choice must be distinct non-empty texts")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def choices(self) -> list[str] | None:
        if self.structured_outputs is not None:
            return self.structured_outputs.choice
        return self.guided_choice

    @property
    def length(self) -> int | None:
        return self.max_tokens


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"] = Field(
        description="developer is OpenAI's newer name for system, and is rendered as system")
    content: str | list[TextPart]
    name: str | None = None
    # what a client copies back from an earlier answer: accepted when empty
    tool_calls: list | None = None
    refusal: str | None = None
    function_call: dict | None = None
    audio: dict | None = None
    annotations: list | None = None

    @field_validator("tool_calls", "function_call", "audio", "refusal", "annotations")
    @classmethod
    def _empty(cls, v, info: ValidationInfo):
        if not _absent(v):
            raise ValueError(f"{info.field_name} in a message is not served")
        return v

    def for_template(self) -> dict:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        msg = {"role": "system" if self.role == "developer" else self.role, "content": text}
        return {**msg, "name": self.name} if self.name is not None else msg


class ChatRequest(V1Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="the same as max_tokens")
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None
    reasoning_effort: str | None = None
    modalities: list[str] | None = None
    audio: dict | None = None
    prediction: dict | None = None

    @model_validator(mode="after")
    def _one_length(self):
        if None not in (self.max_tokens, self.max_completion_tokens) and \
                self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ")
        return self

    @property
    def length(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(V1Request):
    prompt: str | list[str] = Field(description="one prompt, rendered by the caller (special tokens "
                                                "in it are parsed)")
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and len(v) != 1:
            raise ValueError("one prompt per request (a list of exactly one text)")
        if not (v if isinstance(v, str) else v[0]):
            raise ValueError("the prompt must not be empty")
        return v

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class Shape:
    """The answer and stream chunks of one chat or text completion, in OpenAI's format."""

    def __init__(self, chat: bool, model: str):
        self.chat, self.model = chat, model
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _head(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _choice(self, text: str | None, finish: str | None, chunk: bool) -> dict:
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
        if chunk:
            body = {} if text is None else {"content": text}
            return {"index": 0, "delta": body, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish}

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        return {**self._head(False), "choices": [self._choice(text, finish, False)], "usage": usage}

    def chunk(self, text: str | None = None, finish: str | None = None) -> dict:
        return {**self._head(True), "choices": [self._choice(text, finish, True)]}

    def opening(self) -> dict | None:
        """A chat stream's first chunk names the role; a text stream has none."""
        if not self.chat:
            return None
        first = self.chunk()
        first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
        return first

    def usage_chunk(self, usage: dict) -> dict:
        return {**self._head(True), "choices": [], "usage": usage}


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
