"""The OpenAI-compatible fallback backend on its own: label mapping and configuration (the server
tests exercise it over HTTP against a real llama-cpp-python server)."""
from __future__ import annotations

import pytest

from qwen_local.runtime.profile import load_profile
from qwen_local.runtime.serve.fallback import OpenAIFallback, map_label

LABELS = ("fashion", "chitchat", "off_topic")


def test_map_label_is_strict():
    assert map_label("fashion", LABELS) == "fashion"
    assert map_label(" Fashion.\n", LABELS) == "fashion"
    assert map_label('"off topic"', LABELS) == "off_topic"
    assert map_label("Off-Topic", LABELS) == "off_topic"
    assert map_label("Intent: chitchat", LABELS) == "chitchat"
    assert map_label('{"intent": "chitchat"}', LABELS) == "chitchat"
    for bad in ("", "weather", "fashion or chitchat", "fash", "ok", None, "fashionable"):
        assert map_label(bad, LABELS) is None


def test_fallback_needs_a_key_or_a_base_url(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIFallback(load_profile())
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:9/v1")
    assert OpenAIFallback(load_profile()).describe()["base_url"] == "http://127.0.0.1:9/v1"
