"""The playground page in a real browser: Debian's chromium driven by Playwright, against the real
server (uvicorn on 127.0.0.1) over a tiny converted GGUF that carries stored fidelity figures.

Every browser test ends in `finish`: a screenshot of the page (the last of each test is kept under
$QWEN_LOCAL_ARTIFACTS, default <tmp>/qwen-local-artifacts) and a check of the browser's network log,
which must hold the page's own requests and nothing from another origin. Waits are Playwright's
(expect, expect_response, expect_download), never sleeps; their 60 s limit is for a loaded machine.
The tiny model has random weights: labels are arbitrary and replies are noise, so the tests check
what the page shows against what the server answered, not what the model says.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import unicodedata
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llama_cpp")

from playwright.sync_api import expect, sync_playwright  # noqa: E402

from qwen_local.runtime.engine import Engine  # noqa: E402
from qwen_local.runtime.fidelity import METADATA_KEY, lower_bound  # noqa: E402
from qwen_local.runtime.gguf_file import write_metadata  # noqa: E402
from qwen_local.runtime.serve import ServeSettings, create_app, serving  # noqa: E402

from test_server import sse_events  # noqa: E402

LABELS = ("fashion", "chitchat", "off_topic")
MAX_QUERY, MAX_BATCH = 80, 6
# what convert stores for a file that met its target (convert.fidelity_report.metadata_value)
FIDELITY = {"chosen": "q8_0", "quant": "q8_0", "met_target": True, "min_agreement": 0.99,
            "reference": "f16 GGUF (llama.cpp)", "agreement": 1.0, "label_kl": 0.0004,
            "accuracy": 0.871, "n": 400, "complete": True}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic"]
WAIT_MS = 60_000
expect.set_options(timeout=WAIT_MS)


def find_chromium() -> str | None:
    """$QWEN_LOCAL_CHROMIUM, else a Chromium (or Chrome) on PATH: the system's browser, since
    `playwright install` downloads one, which CI and offline machines cannot."""
    for candidate in (os.environ.get("QWEN_LOCAL_CHROMIUM"), "chromium", "chromium-browser",
                      "google-chrome"):
        path = candidate and shutil.which(candidate)
        if path:
            return path
    return None


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def fidelity_gguf(tiny_gguf, tmp_path_factory) -> Path:
    """tiny_gguf (converted without verification, so without figures) with convert's figures."""
    path = tmp_path_factory.mktemp("fidelity-gguf") / "tiny-q8_0.gguf"
    shutil.copy(tiny_gguf, path)
    write_metadata(path, {METADATA_KEY: json.dumps(FIDELITY)})
    return path


@pytest.fixture(scope="module")
def engine(fidelity_gguf):
    e = Engine(fidelity_gguf, threads=2, n_ctx=4096, slots=4)
    yield e
    e.close()


def app_url(engine, **settings):
    return serving(create_app(engine, ServeSettings(**settings)))


@pytest.fixture(scope="module")
def server(engine):
    with app_url(engine, max_query_chars=MAX_QUERY, max_batch=MAX_BATCH) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    path = find_chromium()
    if path is None:
        why = ("no Chromium found ($QWEN_LOCAL_CHROMIUM, or chromium / chromium-browser / "
               "google-chrome on PATH): the playground's browser tests need one "
               "(Debian: apt-get install chromium)")
        if os.environ.get("QWEN_LOCAL_REQUIRE_BROWSER"):  # CI installed one: a skip would hide it
            pytest.fail(why)
        pytest.skip(why)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=path, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Tab:
    """One browser context and page, with every request it made."""

    def __init__(self, browser):
        self.context = browser.new_context(accept_downloads=True,
                                           viewport={"width": 1180, "height": 860})
        self.requests: list[str] = []
        self.context.on("request", lambda r: self.requests.append(r.url))
        self.page = self.context.new_page()
        self.page.set_default_timeout(WAIT_MS)

    def open(self, url: str, path: str = "/"):
        response = self.page.goto(url + path)
        expect(self.page.locator("#server-status")).not_to_have_text("connecting…")
        return response


@pytest.fixture
def tab(browser):
    t = Tab(browser)
    yield t
    t.context.close()


def finish(tab: Tab, origin: str, name: str, page=None) -> None:
    """The test's screenshot (of page, default the tab's), and the network log's verdict: only the
    server's own origin."""
    folder = Path(os.environ.get("QWEN_LOCAL_ARTIFACTS")
                  or Path(tempfile.gettempdir()) / "qwen-local-artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    (page or tab.page).screenshot(path=folder / f"playground-{name}.png", full_page=True)
    assert tab.requests, "the network log saw nothing"
    foreign = [u for u in tab.requests if not (u.startswith(origin + "/") or u.startswith("data:")
                                              or u.startswith(f"blob:{origin}/"))]
    assert not foreign, f"requests outside {origin}: {foreign}"


def shown_percents(locator) -> list[float]:
    return [float(t.rstrip("%")) for t in locator.all_inner_texts()]


def ask(page, query: str, products: str = "", has_products: bool = False):
    """Type a message and send it; returns the /qwen/intent request."""
    page.fill("#query", query)
    page.fill("#products", products)
    page.set_checked("#has-products", has_products)
    with page.expect_request("**/qwen/intent") as request:
        page.click("#send")
    return request.value


def reply_done(page) -> None:
    expect(page.locator("#reply-meta")).to_contain_text("tokens/s")


# ------------------------------------------------------------------------------------------ no browser
def test_page_and_health_over_http(server):
    page = httpx.get(server + "/")
    assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
    assert '<meta charset="utf-8">' in page.text
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert httpx.get(server + "/playground").content == page.content
    for asset, ctype in (("app.js", "text/javascript"), ("style.css", "text/css")):
        r = httpx.get(f"{server}/playground/{asset}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
    assert httpx.get(server + "/playground/index.py").status_code == 404
    # the page is no part of the API
    assert not {"/", "/playground"} & set(httpx.get(server + "/openapi.json").json()["paths"])
    # /health carries the figures convert stored, with their bound worked out
    fig = httpx.get(server + "/health").json()["fidelity"]
    assert {k: fig[k] for k in FIDELITY} == FIDELITY
    assert fig["bound"] == lower_bound(400, 400) and fig["confidence"] == 0.95


def test_no_playground_is_404(engine):
    with app_url(engine, playground=False) as url, app_url(engine, playground=False,
                                                          api_key="k") as keyed:
        for path in ("/", "/playground", "/playground/app.js"):
            assert httpx.get(url + path).status_code == 404
            assert httpx.get(keyed + path).status_code == 404  # public paths: no route, not 401
        assert httpx.post(url + "/qwen/intent", json={"query": "áo"}).status_code == 200


# ------------------------------------------------------------------------------------------ browser
@pytest.mark.slow
def test_page_shows_what_health_says(server, tab):
    response = tab.open(server, "/playground")
    assert response.status == 200
    h = httpx.get(server + "/health").json()
    panel = tab.page.locator("#health")
    for text in (Path(h["model"]).name, h["quant"], "seed", h["profile"]["sha256"], "yes"):
        expect(panel).to_contain_text(text)
    fid = tab.page.locator("#fidelity")
    for text in ("q8_0", "label agreement", "100.0%", "95% lower bound", "99.3%", "400", "99.0%, met",
                 "0.0004", "87.1%"):
        expect(fid).to_contain_text(text)
    finish(tab, server, "health")


def test_intent_bars_sum_to_100(server, tab):
    tab.open(server)
    typed = unicodedata.normalize("NFD", "Áo khoác dạ màu be còn size M không shop?")
    with tab.page.expect_response("**/qwen/intent") as answer:
        request = ask(tab.page, typed)
    nfc = unicodedata.normalize("NFC", typed)
    assert json.loads(request.post_data)["query"] == nfc  # sent as typed, in NFC
    expect(tab.page.locator("#you")).to_have_text(nfc)
    probs = answer.value.json()["probs"]
    bars = tab.page.locator("#bars .bar")
    expect(bars).to_have_count(3)
    label = tab.page.locator("#intent-label").inner_text()
    shown = shown_percents(tab.page.locator("#bars .bar-value"))
    names = tab.page.locator("#bars .bar-label").all_inner_texts()
    assert label in LABELS and names == list(LABELS)
    assert round(sum(shown), 1) == 100.0
    assert all(abs(s - 100 * probs[n]) < 0.1 + 1e-9 for s, n in zip(shown, names))
    assert tab.page.locator("#bars .bar.top .bar-label").inner_text() == label == max(probs, key=probs.get)
    reply_done(tab.page)
    finish(tab, server, "intent")


# test instruments, not page code: a copy of the reply's event stream as the page's fetch read it
# (Chromium keeps no body of a streamed response for Playwright to read)
TEE_REPLY = """(() => {
    window.sseText = null;
    const fetchFirst = window.fetch;
    window.fetch = async (...args) => {
        const res = await fetchFirst(...args);
        if (!String(args[0]).endsWith("qwen/generate") || !res.body) return res;
        const [mine, copy] = res.body.tee();
        new Response(copy).text().then((text) => { window.sseText = text; });
        return new Response(mine, {status: res.status, statusText: res.statusText, headers: res.headers});
    };
})()"""


def test_reply_streams_and_grows(server, tab):
    tab.page.add_init_script(TEE_REPLY)
    tab.open(server)
    # every change of the reply's text, as the browser renders it
    tab.page.evaluate("""() => {
        window.lengths = [];
        const reply = document.getElementById("reply");
        new MutationObserver(() => window.lengths.push(reply.textContent.length))
            .observe(reply, {childList: true, characterData: true, subtree: true});
    }""")
    with tab.page.expect_response("**/qwen/generate") as stream:
        ask(tab.page, "Váy maxi dưới 500k có màu xanh không?", "Váy maxi hoa nhí, 459.000", True)
    reply_done(tab.page)
    sent = json.loads(stream.value.request.post_data)
    assert sent["stream"] is True and sent["has_products"] is True
    assert sent["products"] == [{"name": "Váy maxi hoa nhí", "price": 459000}]
    assert sent["intent"] == tab.page.locator("#intent-label").inner_text()
    events = sse_events(tab.page.wait_for_function("window.sseText").json_value().splitlines())
    kind, done = events[-1]
    assert kind == "done" and done["n_tokens"] >= 3
    assert tab.page.locator("#reply").text_content() == done["message"]
    grew = [n for n in tab.page.evaluate("window.lengths") if n]
    assert len(set(grew)) >= 3 and grew == sorted(grew), grew  # seen growing, never shrinking
    meta = tab.page.locator("#reply-meta").inner_text()
    assert f"{done['n_tokens']} tokens" in meta and "latency" in meta
    finish(tab, server, "stream")


def test_batch_table_and_csv(server, tab):
    tab.open(server)
    queries = ["xin chào shop", unicodedata.normalize("NFD", "Đầm dạ hội đỏ size S"),
               'Áo "oversize", còn không?', "thời tiết Hà Nội mai thế nào", "cảm ơn nhé"]
    tab.page.fill("#batch-input", "\n".join(queries[:2] + [""] + queries[2:]))  # a blank line is skipped
    with tab.page.expect_response("**/qwen/intent/batch") as answer:
        tab.page.click("#batch-run")
    results = answer.value.json()["results"]
    rows = tab.page.locator("#batch-table tbody tr")
    expect(rows).to_have_count(5)
    nfc = [unicodedata.normalize("NFC", q) for q in queries]
    for i, res in enumerate(results):
        cells = rows.nth(i).locator("td").all_inner_texts()
        assert cells[1:3] == [nfc[i], res["intent"]]
        assert round(sum(float(c.rstrip("%")) for c in cells[3:6]), 1) == 100.0
    with tab.page.expect_download() as download:
        tab.page.click("#csv")
    assert download.value.suggested_filename == "qwen-local-intents.csv"
    raw = Path(download.value.path()).read_bytes()
    assert raw.startswith(b"\xef\xbb\xbf")  # the BOM: Excel then reads UTF-8
    table = list(csv.reader(io.StringIO(raw.decode("utf-8-sig"), newline="")))
    assert table[0] == ["query", "intent", *LABELS, "source", "latency_ms"]
    assert [r[0] for r in table[1:]] == nfc
    for row, res in zip(table[1:], results, strict=True):
        assert row[1] == res["intent"] and row[5] == "local"
        assert [float(x) for x in row[2:5]] == [res["probs"][k] for k in LABELS]
    finish(tab, server, "batch")


def test_errors_show_the_api_message(server, engine, tab):
    tab.open(server)
    too_long = "á" * (MAX_QUERY + 1)
    detail = httpx.post(server + "/qwen/intent", json={"query": too_long}).json()["detail"]
    error = tab.page.locator("#ask-error")
    ask(tab.page, too_long)
    expect(error).to_have_text(f"Error 413: {detail}")
    ask(tab.page, "   ")
    expect(error).to_contain_text("Error 422: ")
    expect(error).to_contain_text("query must not be empty")
    tab.page.fill("#batch-input", "\n".join(f"câu {i}" for i in range(MAX_BATCH + 1)))
    tab.page.click("#batch-run")
    expect(tab.page.locator("#batch-error")).to_have_text(
        f"Error 413: too many queries: {MAX_BATCH + 1}, the limit is {MAX_BATCH}")
    finish(tab, server, "errors")


def test_503_is_shown(tiny_gguf, tab):
    """A draining server (as on SIGTERM) still serves the page, and the model answers 503; over a
    file converted without verification, the panel says that no figures are stored."""
    with Engine(tiny_gguf, threads=2, n_ctx=2048, slots=1) as plain:
        app = create_app(plain, ServeSettings())
        app.state.serve.admission.begin_drain()
        with serving(app) as url:
            page = tab.page
            tab.open(url)
            expect(page.locator("#server-status")).to_contain_text("draining")
            expect(page.locator("#fidelity")).to_contain_text("not stored")
            detail = httpx.post(url + "/qwen/intent", json={"query": "áo"}).json()["detail"]
            page.fill("#query", "áo sơ mi trắng")
            page.press("#query", "Enter")  # Enter sends
            expect(page.locator("#ask-error")).to_have_text(f"Error 503: {detail}")
            finish(tab, url, "503")


@pytest.mark.slow
def test_key_prompt_under_api_key(engine, tab):
    with app_url(engine, api_key="s3cret") as url:
        assert tab.open(url).status == 200  # the page itself needs no key
        dialog, page = tab.page.locator("#key-dialog"), tab.page
        expect(dialog).to_be_visible()
        expect(page.locator("#health")).to_contain_text("seed")  # /health is open
        page.fill("#key", "wrong")
        page.click("#key-form button")
        expect(dialog).to_be_hidden()
        ask(page, "áo dài cưới")
        expect(dialog).to_be_visible()  # asked again, saying why
        expect(page.locator("#key-error")).to_contain_text("401: missing or wrong API key")
        expect(page.locator("#ask-error")).to_contain_text("Error 401")
        with page.expect_response("**/qwen/intent") as answer:
            page.fill("#key", "s3cret")
            page.click("#key-form button")  # and the message is sent again with it
        assert answer.value.ok and answer.value.request.headers["authorization"] == "Bearer s3cret"
        expect(page.locator("#intent-label")).to_have_text(answer.value.json()["intent"])
        reply_done(page)
        # kept in this tab's sessionStorage only: not in localStorage, not a cookie
        assert page.evaluate("sessionStorage.getItem('qwen-local-api-key')") == "s3cret"
        assert page.evaluate("localStorage.length") == 0 and tab.context.cookies() == []
        tab.open(url)
        expect(page.locator("#server-status")).to_contain_text("API key required")
        assert not dialog.is_visible()  # the reloaded tab still has it
        other = tab.context.new_page()  # another tab has not
        other.goto(url + "/")
        expect(other.locator("#key-dialog")).to_be_visible()
        finish(tab, url, "key", other)


def test_no_playground_in_the_browser(engine, tab):
    with app_url(engine, playground=False) as url:
        assert tab.page.goto(url + "/").status == 404
        assert tab.page.goto(url + "/playground").status == 404
        finish(tab, url, "off")
