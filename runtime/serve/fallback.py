"""The remote backend (`--fallback openai`): GPT-4o-mini or any OpenAI-compatible server.

Same prompts as the local model, sent one of two ways (`--fallback-mode`):
- completions: the rendered profile prompt, as is, to /v1/completions. A backend serving the same
  model (vLLM with the base and the LoRA adapter, llama-server, another qwen-local) tokenizes that
  text with special tokens parsed, which gives exactly the ids the local model gets. A query holding
  special-token text is not sent this way (the backend would read it as control tokens).
  The intent is asked for under a constraint to the labels, in the first form the server honours:
  `structured_outputs.choice` (vLLM >= 0.12, qwen-local), `guided_choice` (older vLLM,
  qwen-local), a GBNF `grammar` (llama.cpp's servers), else one plain word.
- chat: the prompt's ChatML turns, verbatim, as system and user messages (OpenAI's own models;
  Qwen's chat template rebuilds the same text). The intent is asked for as JSON constrained to the
  label enum (OpenAI structured outputs; llama.cpp and vLLM servers turn the schema into a grammar).
By default the first call tries completions and a backend without it (a 404) settles on chat; with
no OPENAI_BASE_URL (OpenAI itself) it is chat.

Whatever comes back is mapped robustly to exactly one label or rejected (`FallbackError`).
"""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import AsyncIterator

from qwen_local.runtime.labels import decide
from qwen_local.runtime.profile import Profile, Segment, messages, prompt_text
from qwen_local.runtime.scoring import label_grammar

NO_ENDPOINT = (404, 405, 501)  # how a server says it has no /v1/completions (OpenAI: 404)


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


def _text(completion) -> str:
    """A completion's text; FallbackError for an answer of another shape (then no constraint is
    judged by it)."""
    choices = getattr(completion, "choices", None)
    text = getattr(choices[0], "text", None) if isinstance(choices, list) and choices else None
    if not isinstance(text, str):
        raise FallbackError("fallback backend failed: its answer is not a completion")
    return text


class OpenAIFallback:
    def __init__(self, cfg: Profile, *, model: str = "gpt-4o-mini", base_url: str | None = None,
                 api_key: str | None = None, timeout: float = 30.0, mode: str | None = None):
        """mode: "completions", "chat", or None (settled by the backend's first answer)."""
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
        if mode not in (None, "completions", "chat"):
            raise ValueError(f"fallback mode must be completions or chat, not {mode!r}")
        self.mode = mode or (None if self.base_url else "chat")  # OpenAI's own models are chat models
        self.client = AsyncOpenAI(api_key=key, base_url=self.base_url, timeout=timeout, max_retries=1)
        self._format = 0  # index of the first response_format (chat) this server accepts
        self._choice = 0  # index of the first label constraint (completions) this server honours

    def describe(self) -> dict:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url or "api.openai.com",
                "mode": self.mode or "auto (completions unless the backend has none)"}

    async def aclose(self) -> None:
        await self.client.close()

    async def _completions(self, segments: list[Segment], **kw):
        """The backend's /v1/completions answer to this prompt's text, or None when it has no such
        endpoint (then, in auto mode, the mode becomes chat)."""
        from openai import APIStatusError

        try:
            prompt = prompt_text(segments)
        except ValueError as e:
            raise FallbackError(f"not sent to the fallback: {e}") from None
        try:
            r = await self.client.completions.create(model=self.model, prompt=prompt, **kw)
        except APIStatusError as e:
            if self.mode is None and e.status_code in NO_ENDPOINT:
                self.mode = "chat"
                return None
            raise
        self.mode = self.mode or "completions"
        return r

    # ------------------------------------------------------------------ intent
    def _schema(self) -> dict:
        return {"type": "json_schema", "json_schema": {
            "name": "intent", "strict": True,
            "schema": {"type": "object", "additionalProperties": False, "required": ["intent"],
                       "properties": {"intent": {"type": "string", "enum": list(self.cfg.labels)}}}}}

    async def intent(self, query: str) -> dict:
        """{"intent": label, "probs": {...}} or FallbackError; never a label outside the set."""
        from openai import OpenAIError

        segments = self.cfg.intent_prompt(query)
        try:
            if self.mode != "chat":
                label = await self._intent_completions(segments)
                if label is not None:
                    return {"intent": label, "probs": {lab: float(lab == label) for lab in self.cfg.labels}}
            return await self._intent_chat(messages(segments))
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e

    async def _intent_completions(self, segments: list[Segment]) -> str | None:
        """The label, asked for under each label constraint in turn until one is honoured (the
        answer is exactly a label); a server that refuses a constraint's field (400/422 naming it),
        or answers outside the labels, gets the next. Then one plain word, mapped by `map_label`."""
        from openai import APIStatusError

        labels = list(self.cfg.labels)
        forms = [{"structured_outputs": {"choice": labels}}, {"guided_choice": labels},
                 {"grammar": label_grammar(labels)}]
        while True:
            form = forms[self._choice] if self._choice < len(forms) else None
            try:
                r = await self._completions(segments, max_tokens=16, temperature=0, extra_body=form)
            except APIStatusError as e:
                if form is None or e.status_code not in (400, 422) or next(iter(form)) not in str(e):
                    raise
                self._choice += 1
                continue
            if r is None:
                return None
            text = _text(r)
            if form is None:
                label = map_label(text, labels)
                if label is None:
                    raise FallbackError(f"the fallback's intent is not a label: {text[:200]!r}")
                return label
            if text in labels:
                return text
            self._choice += 1  # a well-formed answer outside the labels: the constraint was ignored

    async def _intent_chat(self, msgs: list[dict]) -> dict:
        """Tries, in order, and remembers what the server refused: OpenAI structured outputs
        (json_schema with the label enum), llama-cpp-python's json_object + schema (also a grammar),
        then a plain one-word answer with logprobs. Every answer goes through `map_label`."""
        from openai import APIStatusError

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
                raise
            content = r.choices[0].message.content or ""
            label = map_label(content, self.cfg.labels)
            if label is None:
                raise FallbackError(f"the fallback's intent is not a label: {content[:200]!r}")
            return {"intent": label, "probs": {lab: float(lab == label) for lab in self.cfg.labels}}
        r = await self.client.chat.completions.create(
            model=self.model, messages=msgs, temperature=0, max_tokens=5, logprobs=True, top_logprobs=10)
        choice = r.choices[0]
        content = choice.message.content or ""
        label = map_label(content, self.cfg.labels)
        if label is None:
            raise FallbackError(f"the fallback's intent is not a label: {content[:200]!r}")
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
    async def _reply(self, query, intent, has_products, products, max_tokens: int,
                     temperature: float | None, stream: bool):
        """(mode, the backend's answer or stream) for the reply prompt."""
        segments = self.cfg.reply_prompt(query, intent, has_products, products)
        t = self.cfg.reply.temperature if temperature is None else temperature
        if self.mode != "chat":  # the profile's sampling, as the local model uses it
            gen = self.cfg.reply
            r = await self._completions(segments, max_tokens=max_tokens, temperature=t, top_p=gen.top_p,
                                        stream=stream, extra_body={"top_k": gen.top_k} if gen.top_k else None)
            if r is not None:
                return "completions", r
        return "chat", await self.client.chat.completions.create(
            model=self.model, messages=messages(segments), max_tokens=max_tokens, temperature=t,
            stream=stream)

    async def generate(self, query: str, intent: str | None, has_products: bool,
                       products: list[dict] | None, *, max_tokens: int, temperature: float | None = None) -> str:
        from openai import OpenAIError

        try:
            mode, r = await self._reply(query, intent, has_products, products, max_tokens, temperature, False)
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e
        return _text(r) if mode == "completions" else r.choices[0].message.content or ""

    async def stream(self, query: str, intent: str | None, has_products: bool,
                     products: list[dict] | None, *, max_tokens: int,
                     temperature: float) -> AsyncIterator[str]:
        from openai import OpenAIError

        try:
            mode, s = await self._reply(query, intent, has_products, products, max_tokens, temperature, True)
            async for chunk in s:
                if not chunk.choices:
                    continue
                c = chunk.choices[0]
                text = c.text if mode == "completions" else (c.delta.content if c.delta else None)
                if text:
                    yield text
        except OpenAIError as e:
            raise FallbackError(f"fallback backend failed: {e}") from e
