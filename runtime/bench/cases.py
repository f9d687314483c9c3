"""Prompts every measured path sends: the same intent queries and reply cases for the engine, raw
llama.cpp and the seed's transformers path."""
from __future__ import annotations

from qwen_local.runtime.profile import Profile

BATCH_SIZES = (1, 2, 4, 8)
REPLY_TOKENS = 120

INTENT_QUERIES = [
    "ao so mi trang nam size L con hang ko shop",
    "Chào shop, hôm nay bạn khỏe không?",
    "Thời tiết Hà Nội tuần này lạnh quá, mặc gì đi làm cho ấm mà vẫn lịch sự?",
    "Giải giúp mình phương trình x^2 - 5x + 6 = 0 với",
    "Váy maxi hoa nhí dưới 500k có màu xanh không ạ?",
    "cảm ơn bạn nhiều nha, tư vấn nhiệt tình ghê",
    "Đơn hàng mình đặt hôm thứ 2 mà giờ chưa thấy giao, kiểm tra giúp mình được không?",
    "Ai là tác giả của Truyện Kiều vậy?",
]

REPLY_CASES = [
    dict(query="Mình cần một chiếc váy đi dự tiệc cưới, tầm 800k, màu pastel, có mẫu nào không shop?",
         intent="fashion",
         products=[{"name": "Váy midi lụa xếp ly", "price": "790.000đ", "color": "hồng pastel",
                    "sizes": "S, M, L"},
                   {"name": "Đầm suông cổ vuông", "price": "650.000đ", "color": "xanh mint",
                    "sizes": "M, L"},
                   {"name": "Váy hai dây voan hoa", "price": "720.000đ", "color": "vàng kem",
                    "sizes": "S, M"}]),
    dict(query="Áo khoác gió nam có size XL không, giao về Đà Nẵng mất mấy ngày vậy?",
         intent="fashion",
         products=[{"name": "Áo khoác gió hai lớp chống nước", "price": "459.000đ",
                    "color": "đen, xanh navy", "sizes": "M, L, XL"},
                   {"name": "Áo khoác dù có mũ", "price": "399.000đ", "color": "xám",
                    "sizes": "L, XL, XXL"}]),
]


def intent_segments(cfg: Profile, query: str):
    return cfg.intent_prompt(query)


def reply_segments(cfg: Profile, case: dict):
    return cfg.reply_prompt(case["query"], case["intent"], bool(case["products"]), case["products"])


def segments_text(segments) -> str:
    return "".join(text for text, _ in segments)
