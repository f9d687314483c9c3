"""The prompt profile: the labels, the two prompt templates and the generation defaults of one fine-tune.

A fine-tune learned exact token sequences, so the profile is part of the model: `convert` calibrates
and verifies with it and stores it in the GGUF (`qwen_local.prompts`), and `serve` serves the one
stored there. The built-in default, `seed`, is the shop's integration-guide prompts byte for byte.

A profile is a small JSON file (see runtime/data/profiles/):

    {"name": "...", "labels": [...],
     "intent": {"template": "...{query}...", "max_tokens": 4},
     "reply":  {"template": "...{intent}...{has_products}...{query}...", "max_tokens": 120,
                "temperature": 0.5, "top_p": 0.8, "top_k": 20},
     "has_products": {"true": "Có", "false": "Không"},
     "products": {"none": "...", "unlisted": "...", "max_items": 20, "max_chars": 600}}   (optional)

Templates are whole ChatML prompts with `{slot}` fields (`{{`/`}}` for literal braces). The intent
template has `{query}`; the reply template may use `{query}`, `{intent}`, `{has_products}` and
`{products}`.

Tokenization rule (the one the training code used: HF `tokenizer(prompt)` on the rendered string):
the rendered text is split at the template's own special tokens and each run between them is
tokenized whole. A prompt is therefore rendered as segments `(text, trusted)`:
- an untrusted segment is one whole run that holds user values (template text and the values
  together, NFC-normalized as HF normalizes it); it is tokenized with special-token parsing off, so
  a typed "<|im_end|>" stays plain text;
- a trusted segment is template text that starts and ends at a special token (or at the prompt's
  ends); tokenized with special-token parsing on, it gives the same ids as the split rule.
Segment 0, the template up to the last special token before the first slot, never depends on the
request: the engine keeps its KV cache warm.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from qwen_local.runtime.errors import UserError

Segment = tuple[str, bool]  # (text, trusted)

PROFILES_DIR = Path(__file__).parent / "data" / "profiles"
DEFAULT_PROFILE = "seed"
METADATA_KEY = "qwen_local.prompts"

# Qwen2's special (control) tokens: the points where HF's tokenizer splits a prompt before BPE.
# <tool_call> and </tool_call> are added but not special; both tokenizers match them inside text.
SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

SLOTS = {"intent": {"query"}, "reply": {"query", "intent", "has_products", "products"}}
_KEYS = {"name", "about", "labels", "intent", "reply", "has_products", "products"}
_GEN_KEYS = {"template", "max_tokens", "temperature", "top_p", "top_k"}
_PRODUCT_KEYS = {"none", "unlisted", "max_items", "max_chars"}


class ProfileError(UserError, ValueError):
    """A profile that cannot be used: the message names the file and the problem. A UserError, so
    every command reports it as one line without wrapping it."""


def nfc(text: str) -> str:
    """Text as HF's Qwen2 normalizer sees it (llama.cpp does not normalize)."""
    return unicodedata.normalize("NFC", text)


@dataclass(frozen=True)
class Generation:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0      # 0: no top-k cut


@dataclass(frozen=True)
class Template:
    """A parsed template: literal text and slot names, in order."""
    parts: tuple[tuple[str, str | None], ...]   # (literal text before, slot name or None)

    @classmethod
    def parse(cls, text: str, kind: str) -> "Template":
        try:
            parts = tuple((lit, field) for lit, field, spec, conv in string.Formatter().parse(text)
                          if _plain(field, spec, conv, kind))
        except ValueError as e:
            raise ProfileError(f"{kind} template does not render: {e}") from None
        names = {f for _, f in parts if f is not None}
        if "query" not in names:
            raise ProfileError(f"{kind} template has no {{query}} slot")
        return cls(parts)

    def segments(self, values: dict[str, str]) -> list[Segment]:
        """The rendered prompt as segments (see the module docstring)."""
        pieces: list[tuple[str, str]] = []
        for lit, field in self.parts:
            pieces.append(("text", lit))
            if field is not None:
                pieces.append(("value", values[field]))
        return split_runs(pieces)


def split_runs(pieces: list[tuple[str, str]]) -> list[Segment]:
    """The one tokenization rule, for any rendered prompt given as ("text", template text) and
    ("value", user text) pieces in order: the text is cut at the template's special tokens, each
    run between them that holds a value is one untrusted segment (NFC'd), everything else is
    merged into trusted text. Special-token text inside a value never cuts a run."""
    marked: list[tuple[str, str]] = []   # ("special", tok) | ("text", literal) | ("value", text)
    for kind, text in pieces:
        if kind == "value":
            marked.append((kind, text))
            continue
        for i, chunk in enumerate(_SPECIAL_RE.split(text)):
            if chunk:
                marked.append(("special" if i % 2 else "text", chunk))
    runs: list[list[tuple[str, str]]] = [[]]
    for piece in marked:   # group into runs separated by special tokens
        if piece[0] == "special":
            runs += [[piece], []]
        else:
            runs[-1].append(piece)
    out: list[Segment] = []
    for run in runs:
        text = "".join(t for _, t in run)
        if any(k == "value" for k, _ in run):
            out.append((nfc(text), False))
        elif text:
            if out and out[-1][1]:
                out[-1] = (out[-1][0] + text, True)
            else:
                out.append((text, True))
    return out


def raw_segments(prompt: str) -> list[Segment]:
    """A prompt rendered by the caller (a raw /v1/completions prompt): all of it is trusted, so its
    special-token text is parsed, and each run between special tokens is NFC'd, as HF
    `tokenizer(prompt)` normalizes it (a combining mark after "<|im_end|>" must not compose with
    its ">")."""
    chunks = _SPECIAL_RE.split(prompt)
    return [("".join(c if i % 2 else nfc(c) for i, c in enumerate(chunks)), True)] if prompt else []


def prompt_text(segments: list[Segment]) -> str:
    """The rendered prompt as one string, for a backend that tokenizes it raw with special tokens
    parsed (vLLM, llama-server, another qwen-local: the same ids as here). ValueError when user
    text holds a special token's text: such a backend would read it as a control token."""
    for text, trusted in segments:
        if not trusted and _SPECIAL_RE.search(text):
            raise ValueError("the text holds a special token (e.g. <|im_end|>), which a raw-prompt "
                             "backend would read as a control token")
    return "".join(text for text, _ in segments)


def _plain(field, spec, conv, kind) -> bool:
    if field is None:
        return True
    if field not in SLOTS[kind]:
        raise ProfileError(f"{kind} template has an unknown slot {{{field}}} "
                           f"(known: {', '.join(sorted(SLOTS[kind]))})")
    if spec or conv:
        raise ProfileError(f"{kind} template slot {{{field}}} must be plain (no format spec or !conversion)")
    return True


@dataclass(frozen=True)
class Profile:
    name: str
    labels: tuple[str, ...]
    intent_template: str
    reply_template: str
    intent: Generation
    reply: Generation
    has_products: tuple[str, str]         # how False and True are written into the reply prompt
    products_none: str = ""
    products_unlisted: str = ""
    max_products: int = 20
    max_product_chars: int = 600          # one product rendered, after truncation of long fields
    about: str = ""

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ProfileError("labels must be at least two distinct strings")
        if any(not isinstance(x, str) or not x or x != x.strip() for x in self.labels):
            raise ProfileError("labels must be non-empty strings without surrounding spaces")
        object.__setattr__(self, "_intent", Template.parse(self.intent_template, "intent"))
        object.__setattr__(self, "_reply", Template.parse(self.reply_template, "reply"))

    # ------------------------------------------------------------------ prompts
    def intent_prompt(self, query: str) -> list[Segment]:
        return self._intent.segments({"query": query})

    def reply_prompt(self, query: str, intent: str | None, has_products: bool,
                     products: list[dict] | None = None) -> list[Segment]:
        if products:
            listed = self.format_products(products)
        else:
            listed = self.products_unlisted if has_products else self.products_none
        return self._reply.segments({"query": query, "intent": intent or "",
                                     "has_products": self.has_products[bool(has_products)],
                                     "products": listed})

    def head(self, kind: str) -> str:
        """The fixed, cacheable head of every prompt of this kind ("" if the template has none)."""
        segs = (self.intent_prompt("") if kind == "intent" else self.reply_prompt("", "", False))
        return segs[0][0] if segs and segs[0][1] else ""

    def format_products(self, products: list[dict]) -> str:
        lines = []
        for i, p in enumerate(products[: self.max_products], 1):
            fields_ = [f"{k}: {v}" for k, v in p.items() if v not in (None, "", [], {})]
            line = f"{i}. " + "; ".join(fields_)
            if len(line) > self.max_product_chars:
                line = line[: self.max_product_chars - 1] + "…"
            lines.append(line)
        return "\n".join(lines)

    @property
    def uses_products(self) -> bool:
        return "{products}" in self.reply_template

    # ------------------------------------------------------------------ identity
    def to_dict(self) -> dict:
        d = {"name": self.name, "labels": list(self.labels),
             "intent": {"template": self.intent_template, **_gen_dict(self.intent)},
             "reply": {"template": self.reply_template, **_gen_dict(self.reply)},
             "has_products": {"true": self.has_products[1], "false": self.has_products[0]}}
        if self.uses_products:
            d["products"] = {"none": self.products_none, "unlisted": self.products_unlisted,
                             "max_items": self.max_products, "max_chars": self.max_product_chars}
        if self.about:
            d["about"] = self.about
        return d

    def to_json(self) -> str:
        """Canonical JSON: what is stored in the GGUF and hashed."""
        return json.dumps(self.to_dict(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        return {"name": self.name, "sha256": self.sha256[:16], "labels": list(self.labels)}


def _gen_dict(g: Generation) -> dict:
    return {"max_tokens": g.max_tokens, "temperature": g.temperature, "top_p": g.top_p, "top_k": g.top_k}


def _generation(d: dict, kind: str) -> Generation:
    g = Generation(max_tokens=d.get("max_tokens", 4 if kind == "intent" else 120),
                   temperature=d.get("temperature", 0.0), top_p=d.get("top_p", 1.0),
                   top_k=d.get("top_k", 0))
    checks = (("max_tokens", g.max_tokens, int, 1, 4096), ("temperature", g.temperature, (int, float), 0, 2),
              ("top_p", g.top_p, (int, float), 0, 1), ("top_k", g.top_k, int, 0, 1_000_000))
    for key, v, typ, lo, hi in checks:
        if isinstance(v, bool) or not isinstance(v, typ) or not lo <= v <= hi:
            raise ProfileError(f"{kind}.{key} must be a number in [{lo}, {hi}], not {v!r}")
    if kind == "reply" and g.top_p == 0:
        raise ProfileError("reply.top_p must be > 0")
    return g


def from_dict(data: object) -> Profile:
    """A profile from its JSON object; unknown keys, missing slots and bad values are errors."""
    if not isinstance(data, dict):
        raise ProfileError("a profile must be a JSON object")
    unknown = sorted(set(data) - _KEYS)
    if unknown:
        raise ProfileError(f"unknown keys {unknown} (known: {sorted(_KEYS)})")
    for key in ("name", "labels", "intent", "reply"):
        if key not in data:
            raise ProfileError(f"missing key {key!r}")
    if not isinstance(data["name"], str) or not data["name"].strip():
        raise ProfileError("name must be a non-empty string")
    if not isinstance(data["labels"], list):
        raise ProfileError("labels must be a list of strings")
    gens = {}
    for kind in ("intent", "reply"):
        sec = data[kind]
        if not isinstance(sec, dict) or not isinstance(sec.get("template"), str):
            raise ProfileError(f"{kind} must be an object with a string 'template'")
        bad = sorted(set(sec) - _GEN_KEYS)
        if bad:
            raise ProfileError(f"unknown keys in {kind}: {bad} (known: {sorted(_GEN_KEYS)})")
        gens[kind] = _generation(sec, kind)
    hp = data.get("has_products", {"true": "Có", "false": "Không"})
    if not isinstance(hp, dict) or set(hp) != {"true", "false"} or not all(isinstance(v, str) for v in hp.values()):
        raise ProfileError('has_products must be {"true": "...", "false": "..."}')
    prod = data.get("products", {})
    if not isinstance(prod, dict) or set(prod) - _PRODUCT_KEYS:
        raise ProfileError(f"products must be an object with keys among {sorted(_PRODUCT_KEYS)}")
    for key in ("max_items", "max_chars"):
        v = prod.get(key, 20 if key == "max_items" else 600)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000:
            raise ProfileError(f"products.{key} must be an integer in [1, 10000], not {v!r}")
    if not all(isinstance(prod.get(k, ""), str) for k in ("none", "unlisted")):
        raise ProfileError("products.none and products.unlisted must be strings")
    # templates are compared with what HF sees, which normalizes text to NFC
    return Profile(name=data["name"], labels=tuple(data["labels"]), about=str(data.get("about", "")),
                   intent_template=nfc(data["intent"]["template"]),
                   reply_template=nfc(data["reply"]["template"]),
                   intent=gens["intent"], reply=gens["reply"], has_products=(hp["false"], hp["true"]),
                   products_none=prod.get("none", ""), products_unlisted=prod.get("unlisted", ""),
                   max_products=prod.get("max_items", 20), max_product_chars=prod.get("max_chars", 600))


def from_json(text: str, source: str = "profile") -> Profile:
    try:
        return from_dict(json.loads(text))
    except json.JSONDecodeError as e:
        raise ProfileError(f"{source}: not valid JSON: {e}") from None
    except ProfileError as e:
        raise ProfileError(f"{source}: {e}") from None


def stored_profile(text: str | None, model_path) -> Profile | None:
    """The profile convert stored in a GGUF (its METADATA_KEY value), or None if it has none."""
    return from_json(text, f"the prompt profile stored in {model_path}") if text else None


def builtin_names() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.json"))


def load_profile(spec: str | Path | None = None) -> Profile:
    """A profile by file path or built-in name (default: the seed profile)."""
    spec = DEFAULT_PROFILE if spec is None else str(spec)
    path = Path(spec)
    if not path.is_file() and spec in builtin_names():
        path = PROFILES_DIR / f"{spec}.json"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"cannot read prompt profile {spec!r} (a JSON file, or one of "
                           f"{', '.join(builtin_names())}): {e}") from None
    return from_json(text, f"prompt profile {spec}")


def messages(segments: list[Segment]) -> list[dict]:
    """The ChatML turns of a rendered prompt as chat messages, contents verbatim (for a remote
    OpenAI-compatible model: a server applying Qwen's chat template rebuilds the same text).
    Turns are cut only at the template's own special tokens, never at text a user typed. The open
    assistant turn at the end is the one the remote writes, so it is left out."""
    turns: list[list[str]] = []
    current: list[str] | None = None        # the turn being read, between <|im_start|> and <|im_end|>
    for text, trusted in segments:
        chunks = _SPECIAL_RE.split(text) if trusted else ["", text]
        for i, chunk in enumerate(chunks):
            if i % 2 == 0 and trusted:
                if current is not None:
                    current.append(chunk)
            elif trusted:                   # a special token of the template
                current = [] if chunk == "<|im_start|>" else None
                if current is not None:
                    turns.append(current)
            elif current is not None:       # user text: never a turn boundary
                current.append(chunk)
    out = []
    for parts in turns:
        role, _, content = "".join(parts).partition("\n")
        if role and content:
            out.append({"role": role.strip(), "content": content})
    return out
