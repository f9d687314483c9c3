"""The remote backend (`--fallback openai`): GPT-4o-mini or any OpenAI-compatible server.

Same prompts as the local model: the profile's rendered prompt, sent as its ChatML turns. Intent from the remote is still strictly one of the labels: the
request asks for JSON constrained to the label enum (OpenAI structured outputs; llama.cpp and vLLM
servers turn the schema into a grammar), and whatever comes back is mapped robustly to exactly one
label or rejected (`FallbackError`). Servers that refuse `response_format` are asked for one word,
with logprobs when they offer them.

Point OPENAI_BASE_URL at a vLLM or llama-server fleet to scale out the same way.
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import AsyncIterator

from qwen_local.runtime.labels import decide
from qwen_local.runtime.profile import Profile, messages


class FallbackError(RuntimeError):
    """The remote backend failed or answered something that is not a label."""


def map_label(text: str, labels) -> str | None:
    """The one label that a free-form answer names, or None (ambiguous or none).

    Accepts "fashion", " Fashion.", '"off topic"', "off-topic", "Intent: chitchat", '{"intent": ...}'.
    """
    if not isinstance(text, str):
        return None
    labels = list(labels)
    t = text.strip()
    if t.startswith("{"):
        try:
            v = json.loads(t)
            if isinstance(v, dict) and isinstance(v.get("intent"), str):
                t = v["intent"]
        except ValueError:
            pass
    norm = lambda s: re.sub(r"[\s\-]+", "_", s.strip().lower())  # noqa: E731
    t = norm(t.strip(" \t\r\n\"'`.,!:;*()[]{}"))
    by_norm = {norm(lab): lab for lab in labels}
    if t in by_norm:
        return by_norm[t]
    # labels named as whole words anywhere in the answer: exactly one distinct label counts
    raw = text.lower()
    found = {lab for n, lab in by_norm.items()
             if re.search(r"(?<![a-z0-9_])" + re.escape(n).replace("_", r"[\s_\-]+") + r"(?![a-z0-9_])",
                          raw)}
    if len(found) == 1:
        return found.pop()
    return None


class OpenAIFallback:
    def __init__(self, cfg: Profile, *, model: str = "gpt-4o-mini", base_url: str | None = None,
                 api_key: str | None = None, timeout: float = 30.0):
        from openai import AsyncOpenAI

        self.cfg = cfg
        self.model = model
        self.base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
        key = api_key or os.environ.get("OPENAI_API_KEY")
        if not key:
            if not self.base_url:
                raise ValueError("--fallback openai needs OPENAI_API_KEY (or OPENAI_BASE_URL for a "
                                 "self-hosted OpenAI-compatible server)")
            key = "no-key"  # self-hosted servers usually ignore it
        self.client = AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=timeout, max_retries=1)
        self._format = 0  # index of the first response_format this server accepts

    def describe(self) -> dict:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url or "api.openai.com"}

    async def aclose(self) -> None:
        await self.client.close()

    # ------------------------------------------------------------------ intent
    def _schema(self) -> dict:
        return {"type": "json_schema", "json_schema": {
            "name": "intent", "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": ["intent"],
                       "properties": {"intent": {"type": "string", "enum": list(self.cfg.labels)}}}}}

    async def intent(self, query: str) -> dict:
        """{"intent": label, "probs": {...}} or FallbackError; never a label outside the set.

        Tries, in order, and remembers what the server refused: OpenAI structured outputs
        (json_schema with the label enum), llama-cpp-python's json_object + schema (also a grammar),
        then a plain one-word answer with logprobs. Every answer goes through `map_label`.
        """
        from openai import APIStatusError, OpenAIError

        msgs = messages(self.cfg.intent_prompt(query))
        schema = self._schema()
        formats = [schema, {"type": "json_object", "schema": schema["json_schema"]["schema"]}]
        while self._format < len(formats):
            try:
                r = await self.client.chat.completions.create(
                    model=self.model, messages=msgs, temperature=0, max_tokens=40,
                    response_format=formats[self._format])
            except APIStatusError as e:
                # a server that does not know this response_format says so with 400/422 (or, for
                # llama-cpp-python, a 500 naming the field): try the next form
                if e.status_code in (400, 422, 500) and "response_format" in str(e):
                    self._format += 1
                    continue
                raise FallbackError(f"fallback backend failed: {e}") from e
            except OpenAIError as e:
                raise FallbackError(f"fallback backend failed: {e}") from e
            content = r.choices[0].message.content or ""
            label = map_label(content, self.cfg.labels)
            if label is None:
                raise FallbackError(f"remote intent is not a label: {content[:200]!r}")
            return {"intent": label, "probs": {lab: float(lab == label) for lab in self.cfg.labels}}
        try:
            r = await self.client.chat.completions.create(
                model=self.model, messages=msgs, temperature=0, max_tokens=5, logprobs=True,
                top_logprobs=10)
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e
        choice = r.choices[0]
        label = map_label(choice.message.content or "", self.cfg.labels)
        if label is None:
            raise FallbackError(f"remote intent is not a label: {(choice.message.content or '')[:200]!r}")
        return {"intent": label, "probs": self._logprob_probs(choice, label)}

    def _logprob_probs(self, choice, label: str) -> dict[str, float]:
        """Label masses from the first token's top logprobs (prefix rule), else one-hot."""
        one_hot = {lab: float(lab == label) for lab in self.cfg.labels}
        try:
            top = choice.logprobs.content[0].top_logprobs
        except (AttributeError, IndexError, TypeError):
            return one_hot
        mass = {lab: 0.0 for lab in self.cfg.labels}
        for t in top or []:
            piece = (t.token or "").strip().lower()
            owners = [lab for lab in self.cfg.labels if piece and lab.lower().startswith(piece)]
            if len(owners) == 1:
                mass[owners[0]] += math.exp(t.logprob)
        total = sum(mass.values())
        if total <= 0 or decide(mass) != label:
            return one_hot
        return {lab: m / total for lab, m in mass.items()}

    # ------------------------------------------------------------------ reply
    def _reply_messages(self, query, intent, has_products, products):
        return messages(self.cfg.reply_prompt(query, intent, has_products, products))

    def _temperature(self, t: float | None) -> float:
        return self.cfg.reply.temperature if t is None else t

    async def generate(self, query: str, intent: str | None, has_products: bool,
                       products: list[dict] | None, *, max_tokens: int, temperature: float | None = None) -> str:
        from openai import OpenAIError

        try:
            r = await self.client.chat.completions.create(
                model=self.model, messages=self._reply_messages(query, intent, has_products, products),
                max_tokens=max_tokens, temperature=self._temperature(temperature))
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e
        return r.choices[0].message.content or ""

    async def stream(self, query: str, intent: str | None, has_products: bool,
                     products: list[dict] | None, *, max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        from openai import OpenAIError

        try:
            s = await self.client.chat.completions.create(
                model=self.model, messages=self._reply_messages(query, intent, has_products, products),
                max_tokens=max_tokens, temperature=self._temperature(temperature), stream=True)
            async for chunk in s:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e
