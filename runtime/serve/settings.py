"""Every setting of `qwen-local serve`, once: the app reads the model, and the command line is made
from it (each field's type, default and description are its option, its check and its --help line;
see runtime.options.add_fields)."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from qwen_local.runtime.options import THREADS_HELP, Arg

Policy = Literal["local", "local-then-fallback", "fallback"]
POLICY_DEFAULT = "default: local-then-fallback with --fallback, else local"


class ServeSettings(BaseModel):
    """Loading (model, prompts, threads, ctx, slots, flash_attn, gpu_layers), listening (host, port, grace,
    log_level) and the app (limits, auth, the playground page, fallback). An app built from
    ServeSettings() answers like `qwen-local serve` with no options; the loading and listening
    fields are the command's."""

    model_config = ConfigDict(extra="forbid")

    model: Annotated[str | None, Arg(required=True)] = Field(
        None, description="GGUF file (from qwen-local convert)")
    host: str = "127.0.0.1"
    port: Annotated[int, Arg(1, 65535)] = 8000
    threads: Annotated[int | None, Arg(1, 1024)] = Field(None, description=THREADS_HELP)
    lora: Annotated[str | None, Arg(metavar="FILE")] = Field(
        None, description="a LoRA file from convert to apply to --model instead of the one the "
                          "model names (several adapters of one base can share one base file)")
    prompts: Annotated[str | None, Arg(metavar="FILE|NAME")] = Field(
        None, description="prompt profile to serve instead of the one stored in the GGUF by convert "
                          "(a JSON file, or a built-in name: seed, catalog); the model was verified "
                          "with the stored one")
    ctx: Annotated[int, Arg(512, 1 << 20)] = Field(
        8192, description="KV cache size in tokens, shared by all slots")
    slots: Annotated[int, Arg(1, 256)] = Field(4, description="sequences decoded together")
    flash_attn: Literal["on", "off"] = Field(
        "on", description="llama.cpp's flash attention kernel: replies decode 1.10-1.21x faster "
                          "with it at the 3B shape on 2 cores, intents take the same time, and "
                          "labels agree with the fine-tune as often (docs/figures.md); off is "
                          "exact arithmetic, as convert measures with")
    gpu_layers: Annotated[int | None, Arg(-1)] = Field(
        None, description="-1: all; default: all layers when llama.cpp has GPU offload (Metal), else 0")
    max_queue: Annotated[int, Arg(1)] = Field(32, description="requests in flight before 503")
    timeout: Annotated[float, Arg(0, 86400, lo_open=True)] = Field(60.0, description="seconds per request")
    fallback_timeout: Annotated[float | None, Arg(0, 86400, lo_open=True)] = Field(
        None, description="seconds per fallback call (default: --timeout)")
    grace: Annotated[float, Arg(0, 86400)] = Field(
        30.0, description="on SIGTERM/Ctrl-C, seconds in-flight requests get to finish (new ones: 503)")
    max_batch: Annotated[int, Arg(1, 10_000)] = Field(64, description="queries per batch request")
    max_query_chars: Annotated[int, Arg(1, 1 << 20)] = Field(2000, description="longer queries get 413")
    max_tokens: Annotated[int, Arg(1, 100_000)] = Field(
        512, description="largest max_tokens a reply may ask for (more is a 422); the prompt profile "
                         "sets the default length (120 for the seed profile)")
    max_body: Annotated[int, Arg(1024, 1 << 30)] = Field(
        1 << 20, description="largest request body in bytes; larger gets 413 before parsing")
    # the command line reads the environment; the model does not, so that an app built in a test or
    # by eval --http never turns auth on by accident
    api_key: Annotated[str | None, Arg(env="QWEN_LOCAL_API_KEY")] = Field(
        None, description="require 'Authorization: Bearer KEY' on the data endpoints and /metrics "
                          "(/health and /docs stay open; default: $QWEN_LOCAL_API_KEY)")
    playground: bool = Field(
        True, description="do not serve the playground page at / and /playground (default: served, "
                          "without the key; the page asks for it)")
    fallback: Literal["openai"] | None = Field(
        None, description="remote backend (OPENAI_BASE_URL, OPENAI_API_KEY)")
    fallback_model: str = "gpt-4o-mini"
    fallback_mode: Literal["completions", "chat"] | None = Field(
        None, description="completions: the rendered prompt as is, to /v1/completions (vLLM, "
                          "llama-server, another qwen-local: exact); chat: its turns as messages "
                          "(OpenAI's models); default: completions if the backend serves it, else chat")
    intent_policy: Policy | None = Field(None, description=POLICY_DEFAULT)
    generate_policy: Policy | None = Field(None, description=POLICY_DEFAULT)
    log_level: str = Field("info", description="uvicorn's log level")
    retry_after: Annotated[int, Arg(cli=False)] = Field(
        1, description="seconds, lower bound of the Retry-After header")

    @field_validator("api_key")
    @classmethod
    def _no_empty_key(cls, v: str | None) -> str | None:
        return v or None  # QWEN_LOCAL_API_KEY= (set but empty) means no auth

    @model_validator(mode="after")
    def _default_policies(self) -> ServeSettings:
        default = "local-then-fallback" if self.fallback else "local"
        self.intent_policy = self.intent_policy or default
        self.generate_policy = self.generate_policy or default
        return self

    @property
    def local_only(self) -> bool:
        return self.intent_policy == "local" and self.generate_policy == "local"

    @property
    def fallback_seconds(self) -> float:
        """Per fallback call: --fallback-timeout, else the same as the local --timeout."""
        return self.timeout if self.fallback_timeout is None else self.fallback_timeout
