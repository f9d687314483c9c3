"""`qwen-local serve` as a command: its options come from ServeSettings (one default per setting,
range checks in argparse), its one-line errors, and the command run as a process."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

pytest.importorskip("llama_cpp")

from qwen_local.runtime.options import from_args  # noqa: E402
from qwen_local.runtime.profile import load_profile  # noqa: E402
from qwen_local.runtime.serve.cli import build_parser, main  # noqa: E402
from qwen_local.runtime.serve.runner import free_port  # noqa: E402
from qwen_local.runtime.serve.settings import ServeSettings  # noqa: E402

# every option `qwen-local serve` has had, in its --help order
FLAGS = ["--model", "--host", "--port", "--threads", "--lora", "--prompts", "--ctx", "--slots", "--flash-attn",
         "--gpu-layers",
         "--max-queue", "--timeout", "--fallback-timeout", "--grace", "--max-batch", "--max-query-chars",
         "--max-tokens", "--max-body", "--api-key", "--no-playground", "--fallback", "--fallback-model",
         "--fallback-mode", "--intent-policy",
         "--generate-policy", "--log-level", "--verbose"]


def test_options_are_the_settings_fields(monkeypatch):
    monkeypatch.delenv("QWEN_LOCAL_API_KEY", raising=False)
    p = build_parser()
    longs = [s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert longs == FLAGS
    # with no options the command's settings are the model's defaults: one place holds each
    a = p.parse_args(["--model", "m.gguf"])
    assert from_args(ServeSettings, a) == ServeSettings(model="m.gguf")
    for name, field in ServeSettings.model_fields.items():
        if name not in ("model", "retry_after"):  # required; not an option
            assert getattr(a, name) == field.default, name
    assert not hasattr(a, "retry_after")
    # a bool setting is a switch away from its default
    assert p.parse_args(["--model", "m.gguf", "--no-playground"]).playground is False


def test_settings_resolve_the_policies_and_refuse_unknown_fields():
    assert (ServeSettings().intent_policy, ServeSettings().generate_policy) == ("local", "local")
    fb = ServeSettings(fallback="openai")
    assert (fb.intent_policy, fb.generate_policy) == ("local-then-fallback", "local-then-fallback")
    assert ServeSettings(fallback="openai", intent_policy="local").intent_policy == "local"
    assert ServeSettings(api_key="").api_key is None
    # ranges are the command line's: an app in a test may time out at once
    assert ServeSettings(timeout=0.0).timeout == 0.0
    with pytest.raises(ValueError):
        ServeSettings(max_queues=3)
    with pytest.raises(ValueError):
        ServeSettings(intent_policy="remote")


def test_serve_cli_errors_are_one_line(tmp_path):
    from qwen_local import UserError

    with pytest.raises(UserError, match="not found"):
        main(["--model", str(tmp_path / "nope.gguf")])
    bad = tmp_path / "cfg.json"
    bad.write_text('{"labels": ["x"]}')
    with pytest.raises(UserError):
        main(["--model", str(tmp_path / "nope.gguf"), "--prompts", str(bad)])
    with pytest.raises(UserError, match="fallback"):
        main(["--model", str(tmp_path / "nope.gguf"), "--intent-policy", "fallback"])


def test_serve_cli_reads_api_key_from_env(monkeypatch):
    monkeypatch.setenv("QWEN_LOCAL_API_KEY", "from-env")
    assert build_parser().parse_args(["--model", "x.gguf"]).api_key == "from-env"


@pytest.mark.slow
def test_serve_command_end_to_end(tiny_gguf, tmp_path):
    """`qwen-local serve` as a user runs it: a process, a prompt profile that overrides the stored
    one (with a warning), limits, an API key from the env."""
    cfg = tmp_path / "prompts.json"
    profile = load_profile().to_dict()
    profile.update(name="shoes", labels=["shoes", "bags", "weather"])
    cfg.write_text(json.dumps(profile))
    port = free_port()
    env = dict(os.environ, QWEN_LOCAL_API_KEY="k1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "qwen_local", "serve", "--model", str(tiny_gguf), "--port", str(port),
         "--threads", "1", "--ctx", "2048", "--prompts", str(cfg), "--max-query-chars", "50",
         "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() - t0 < 60, "serve did not come up"
            time.sleep(0.2)
        h = httpx.get(f"{url}/health").json()
        assert h["threads"] == 1 and h["n_ctx"] == 2048 and h["auth"] is True
        assert h["labels"] == ["shoes", "bags", "weather"]
        assert h["profile"]["name"] == "shoes" and h["profile"]["as_converted"] is False
        auth = {"Authorization": "Bearer k1"}
        assert httpx.post(f"{url}/qwen/intent", json={"query": "giày"}).status_code == 401
        r = httpx.post(f"{url}/qwen/intent", json={"query": "giày"}, headers=auth)
        assert r.status_code == 200 and r.json()["intent"] in ("shoes", "bags", "weather")
        r = httpx.post(f"{url}/qwen/intent", json={"query": "x" * 51}, headers=auth)
        assert r.status_code == 413
        page = httpx.get(f"{url}/")  # the playground needs no key: it asks for one
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    finally:
        proc.terminate()
        try:
            out = proc.communicate(timeout=15)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0].decode()
    assert "qwen-local serve:" in out and f"http://127.0.0.1:{port}/docs" in out
    assert f"playground http://127.0.0.1:{port}/," in out
    assert "verified with 'seed'" in out  # serving other prompts than the converted ones is said
