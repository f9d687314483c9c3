"""The official `openai` npm package, unchanged but for baseURL, under the machine's Node.js against
the real server: models, chat, chat streamed, completions, guided_choice, errors.

The package is installed into a temporary folder from npm's registry (or its cache). The test
skips only where `node` is absent; CI has Node.js, so there it runs. The script's intent call is the
README's Next.js route (its system prompt read from README.md).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llama_cpp")

from qwen_local.runtime.profile import messages, prompt_text  # noqa: E402
from qwen_local.runtime.serve import ServeSettings, create_app, serving  # noqa: E402

NODE = shutil.which("node")
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js (node) is not installed on this machine")
PACKAGE = "openai@6"  # v6 needs no dependency and runs on Node 20 (v7 wants Node 22)

SCRIPT = r"""
import OpenAI from "openai";

const args = JSON.parse(process.env.ARGS);
const client = new OpenAI({ baseURL: args.baseURL, apiKey: args.apiKey, maxRetries: 0 });
const out = {};
out.models = (await client.models.list()).data.map((m) => m.id);
const chat = await client.chat.completions.create({
  model: "qwen-local", messages: args.chat, max_tokens: 8, temperature: 0 });
out.chat = { content: chat.choices[0].message.content, finish: chat.choices[0].finish_reason,
             usage: chat.usage };
const stream = await client.chat.completions.create({
  model: "qwen-local", messages: args.chat, max_tokens: 8, temperature: 0, stream: true });
out.streamed = "";
for await (const chunk of stream) out.streamed += chunk.choices[0]?.delta?.content ?? "";
const text = await client.completions.create({
  model: "qwen-local", prompt: args.prompt, max_tokens: 8, temperature: 0 });
out.completion = text.choices[0].text;
const label = await client.chat.completions.create({
  model: "qwen-local", messages: args.intent, max_tokens: 4, guided_choice: args.labels });
out.label = label.choices[0].message.content;
try {
  await client.chat.completions.create({ model: "qwen-local", messages: args.chat, n: 2 });
} catch (e) {
  out.error = { bad_request: e instanceof OpenAI.BadRequestError, status: e.status, param: e.param };
}
try {
  await new OpenAI({ baseURL: args.baseURL, apiKey: "wrong", maxRetries: 0 }).models.list();
} catch (e) {
  out.auth = { status: e.status, authentication: e instanceof OpenAI.AuthenticationError };
}
console.log(JSON.stringify(out));
"""


@pytest.fixture(scope="module")
def npm_openai(tmp_path_factory):
    """A folder with the openai package installed and the script beside it."""
    npm = shutil.which("npm")
    assert npm, "node is installed but npm is not"
    folder = tmp_path_factory.mktemp("npm-openai")
    done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefer-offline", PACKAGE],
                          cwd=folder, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    (folder / "client.mjs").write_text(SCRIPT)
    return folder


def readme_intent_system() -> str:
    """INTENT_SYSTEM of the README's Next.js route: its string literals joined."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    source = re.search(r"const INTENT_SYSTEM =(.*?);\n", readme, re.S).group(1)
    return "".join(json.loads(lit) for lit in re.findall(r'"(?:[^"\\]|\\.)*"', source))


def test_the_readme_route_sends_the_training_prompt(engine):
    """The README's classifyIntent sends the profile's intent prompt as chat messages, so with
    guided_choice it gets /qwen/intent's label (the npm test below sends exactly these)."""
    query = "Váy này còn size S không?"
    assert messages(engine.cfg.intent_prompt(query)) == [
        {"role": "system", "content": readme_intent_system()}, {"role": "user", "content": f"{query}\n"}]


@pytest.mark.slow
@needs_node
def test_the_openai_npm_client_against_qwen_local(npm_openai, engine):
    chat = [{"role": "user", "content": "Chào shop, váy maxi còn không?"}]
    prompt = prompt_text(engine.cfg.reply_prompt("chào shop", "chitchat", False))
    query = "Áo khoác nào hợp đi Đà Lạt?"
    args = {"apiKey": "k", "chat": chat, "prompt": prompt, "labels": list(engine.cfg.labels),
            "intent": [{"role": "system", "content": readme_intent_system()},
                       {"role": "user", "content": f"{query}\n"}]}  # as the README's route sends it
    with serving(create_app(engine, ServeSettings(api_key="k", max_tokens=64))) as url:
        args["baseURL"] = f"{url}/v1"
        done = subprocess.run([NODE, "client.mjs"], cwd=npm_openai, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "ARGS": json.dumps(args)})
        assert done.returncode == 0, done.stderr[-3000:]
        out = json.loads(done.stdout)
        auth = {"Authorization": "Bearer k"}
        same = httpx.post(f"{url}/v1/chat/completions", headers=auth, timeout=60, json={
            "messages": chat, "max_tokens": 8, "temperature": 0}).json()
        text = httpx.post(f"{url}/v1/completions", headers=auth, timeout=60, json={
            "prompt": prompt, "max_tokens": 8, "temperature": 0}).json()
        intent = httpx.post(f"{url}/qwen/intent", headers=auth, json={"query": query}).json()["intent"]
    assert out["models"] == [engine.model_path.rsplit("/", 1)[-1].removesuffix(".gguf")]
    assert out["chat"]["content"] == same["choices"][0]["message"]["content"]
    assert out["chat"]["finish"] in ("stop", "length") and out["chat"]["usage"] == same["usage"]
    assert out["streamed"] == out["chat"]["content"]
    assert out["completion"] == text["choices"][0]["text"]
    assert out["label"] == intent
    assert out["error"] == {"bad_request": True, "status": 400, "param": "n"}
    assert out["auth"] == {"status": 401, "authentication": True}
