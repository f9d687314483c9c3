"""The assistant's prompts, labels and request limits: one place, overridable from a JSON config file.

Prompts are rendered as ChatML *segments*: (text, trusted). Trusted segments are the template and
our own prompts (tokenized with special tokens allowed); untrusted ones are user text and product
data, NFC-normalized and tokenized with special=False so that typing "<|im_end|>" stays plain text.
"""
from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

Segment = tuple[str, bool]  # (text, trusted)

INTENT_SYSTEM = (
    "Bạn là bộ phân loại ý định cho trợ lý tư vấn thời trang của một cửa hàng quần áo trực tuyến. "
    "Đọc tin nhắn của khách và xếp nó vào đúng một nhãn:\n"
    "- fashion: quần áo, giày dép, phụ kiện, phối đồ, mặc gì cho dịp nào hay thời tiết nào, size, "
    "giá, màu, chất liệu, và đơn hàng, giao hàng, đổi trả, thanh toán ở cửa hàng.\n"
    "- chitchat: chào hỏi, cảm ơn, khen, hỏi thăm, hỏi về trợ lý, trò chuyện xã giao.\n"
    "- off_topic: mọi chủ đề khác không liên quan đến thời trang hay cửa hàng.\n"
    "Chỉ trả lời bằng một từ: fashion, chitchat hoặc off_topic."
)

REPLY_SYSTEM = (
    "Bạn là trợ lý tư vấn thời trang thân thiện của cửa hàng. Luôn trả lời bằng tiếng Việt, "
    "ngắn gọn (2-4 câu), tự nhiên như nhân viên bán hàng.\n"
    "Quy tắc bắt buộc:\n"
    "- Chỉ nói về những sản phẩm có trong danh sách \"Sản phẩm tìm được\"; dùng đúng tên và giá "
    "trong danh sách.\n"
    "- Không bao giờ nêu tên cửa hàng, thương hiệu, sản phẩm, giá hay thông tin nào không có trong "
    "danh sách.\n"
    "- Nếu không có sản phẩm phù hợp, nói thật là chưa tìm thấy và mời khách mô tả thêm "
    "(kiểu dáng, màu, size, tầm giá).\n"
    "- Nếu khách trò chuyện xã giao, đáp lại thân thiện rồi gợi ý khách hỏi về thời trang.\n"
    "- Nếu câu hỏi ngoài chủ đề thời trang, lịch sự từ chối và mời khách quay lại chủ đề mua sắm."
)

# What the reply model is told about the turn, by intent (the label set is configurable, so a
# label without an entry simply gets no hint).
REPLY_HINTS = {
    "fashion": "Khách đang hỏi về thời trang.",
    "chitchat": "Khách đang trò chuyện xã giao.",
    "off_topic": "Câu hỏi nằm ngoài chủ đề thời trang.",
}


@dataclass(frozen=True)
class PromptConfig:
    labels: tuple[str, ...] = ("fashion", "chitchat", "off_topic")
    intent_system: str = INTENT_SYSTEM
    reply_system: str = REPLY_SYSTEM
    reply_hints: dict = field(default_factory=lambda: dict(REPLY_HINTS))
    max_query_chars: int = 2000
    max_products: int = 20
    max_product_chars: int = 600  # one product rendered, after truncation of long fields
    max_reply_tokens: int = 200

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise ValueError("labels must be at least two distinct strings")
        if any(not isinstance(x, str) or not x or x != x.strip() for x in self.labels):
            raise ValueError("labels must be non-empty strings without surrounding spaces")


def load_config(path: str | Path | None) -> PromptConfig:
    """Defaults, overridden by the keys of a JSON file (unknown keys are an error, not ignored)."""
    if path is None:
        return PromptConfig()
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read config {path}: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config {path} must be a JSON object")
    known = {f.name for f in fields(PromptConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"config {path}: unknown keys {unknown} (known: {sorted(known)})")
    if "labels" in data:
        data["labels"] = tuple(data["labels"])
    return replace(PromptConfig(), **data)


def clean(text: str) -> str:
    """User text as the model saw it in training: NFC (llama.cpp does not normalize)."""
    return unicodedata.normalize("NFC", text)


def chatml(system: str, user: list[Segment]) -> list[Segment]:
    """A system turn, a user turn made of segments, and the open assistant turn."""
    return [(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n", True), *user,
            ("<|im_end|>\n<|im_start|>assistant\n", True)]


def system_prefix(system: str) -> str:
    """The fixed, cacheable head of every prompt that uses this system prompt."""
    return chatml(system, [])[0][0]


def intent_prompt(cfg: PromptConfig, query: str) -> list[Segment]:
    return chatml(cfg.intent_system, [(clean(query), False)])


def format_products(cfg: PromptConfig, products: list[dict]) -> str:
    lines = []
    for i, p in enumerate(products[: cfg.max_products], 1):
        fields_ = [f"{k}: {v}" for k, v in p.items() if v not in (None, "", [], {})]
        line = f"{i}. " + "; ".join(fields_)
        if len(line) > cfg.max_product_chars:
            line = line[: cfg.max_product_chars - 1] + "…"
        lines.append(line)
    return "\n".join(lines)


def reply_prompt(cfg: PromptConfig, query: str, intent: str, has_products: bool,
                 products: list[dict] | None) -> list[Segment]:
    """The reply turn: hint, the products found (if any), then the customer's message."""
    hint = cfg.reply_hints.get(intent, "")
    if products:
        found = "Sản phẩm tìm được:\n"
        data = format_products(cfg, products)
    elif has_products:
        found, data = "Sản phẩm tìm được: (có, nhưng không được gửi kèm chi tiết)", ""
    else:
        found, data = "Sản phẩm tìm được: (không có sản phẩm nào)", ""
    head = (hint + "\n" if hint else "") + found
    user: list[Segment] = [(head, True)]
    if data:
        user.append((clean(data), False))
    user += [("\n\nKhách hỏi: ", True), (clean(query), False)]
    return chatml(cfg.reply_system, user)
