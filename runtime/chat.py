"""Chat messages as a prompt: the model's own chat template (stored in the GGUF as
`tokenizer.chat_template`), rendered in a jinja2 sandbox and cut into segments by the one
tokenization rule (runtime.profile.split_runs).

The template is rendered once with a unique placeholder in place of each message's text, so the
template's own text (its special tokens above all) is known apart from what the caller wrote: the
runs between special tokens that hold a placeholder are untrusted (NFC'd, a typed "<|im_end|>" stays
text), the rest trusted. It is rendered a second time with the real texts; the two must agree once
the texts are put in, which holds for any template that copies message text as it is (Qwen's does).
A template that rewrites or tests the text (strip, split, "in") is refused rather than guessed at.
"""
from __future__ import annotations

import json
import secrets

from qwen_local.runtime.profile import Segment, split_runs

ROLES = ("system", "user", "assistant")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered by this model's chat template (a 400 for the client)."""


def _raise(message: str):
    raise ChatTemplateError(f"the model's chat template refused the messages: {message}")


class ChatTemplate:
    def __init__(self, source: str):
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        # HF's settings for chat templates (transformers' apply_chat_template), in a sandbox: the
        # template comes from a model file and must not reach Python objects
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = _raise
        try:
            self.template = env.from_string(source)
        except TemplateError as e:
            raise ValueError(f"the model's chat template does not parse: {e}") from None
        self.source = source

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        from jinja2 import TemplateError

        try:
            return self.template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                        tools=None, bos_token="", eos_token="")
        except ChatTemplateError:
            raise
        except (TemplateError, TypeError, ValueError, RecursionError) as e:
            raise ChatTemplateError(f"the model's chat template failed on these messages: "
                                    f"{type(e).__name__}: {e}"[:300]) from None

    def segments(self, messages: list[dict]) -> list[Segment]:
        """The prompt for `messages` ({"role", "content"} with text content), ending with the open
        assistant turn, as (text, trusted) segments."""
        nonce = secrets.token_hex(8)
        marks = [f"\x00{nonce}.{i}\x00" for i in range(len(messages))]
        marked = self.render([{**m, "content": mark} for m, mark in zip(messages, marks)])
        pieces: list[tuple[str, str]] = []
        rest = marked
        for mark, m in zip(marks, messages):
            before, found, rest = rest.partition(mark)
            if not found or mark in rest:
                raise ChatTemplateError("the model's chat template does not copy each message's text "
                                        "once, as it is; use /v1/completions with a rendered prompt")
            pieces += [("text", before), ("value", m["content"])]
        pieces.append(("text", rest))
        if "".join(t for _, t in pieces) != self.render(messages):
            raise ChatTemplateError("the model's chat template renders these messages differently "
                                    "from their text alone; use /v1/completions with a rendered prompt")
        return split_runs(pieces)

