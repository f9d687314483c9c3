// qwen-local playground. Every URL is relative: the page talks to the server that sent it and to
// nothing else (its Content-Security-Policy says so too). Text from the server or the user is only
// ever set as textContent, never parsed as HTML.
"use strict";

const KEY = "qwen-local-api-key";  // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);
let labels = [];       // from /health: the order of the bars and of the CSV columns
let batchRows = null;  // the last batch, for the CSV
let afterKey = null;   // what to try again once a key is given

// ---------------------------------------------------------------- talking to the server

class ApiError extends Error {
  constructor(status, detail) {
    super(`${status}: ${detail}`);
    this.status = status;
  }
}

function describeDetail(detail) {
  // {"detail": "..."}, or FastAPI's list of {loc, msg} for a 422
  if (Array.isArray(detail)) {
    return detail.map((d) => `${d.msg} (${(d.loc || []).join(".")})`).join("; ");
  }
  return typeof detail === "string" ? detail : JSON.stringify(detail);
}

async function apiError(res) {
  let detail = res.statusText || "no message";
  try {
    detail = describeDetail((await res.json()).detail);
  } catch (e) { /* not JSON: the status text says what there is */ }
  return new ApiError(res.status, detail);
}

async function post(path, body) {
  const headers = {"content-type": "application/json"};
  const key = sessionStorage.getItem(KEY);
  if (key) headers.authorization = "Bearer " + key;
  const res = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
  if (res.status === 401) sessionStorage.removeItem(KEY);
  if (!res.ok) throw await apiError(res);
  return res;
}

// Server-Sent Events over a POST: EventSource can only GET, so this reads the body as a stream.
// Lines end in \r\n, \n or \r; a \r at the end of a chunk waits for the next, which may hold its \n.
function sseParser(onEvent) {
  let buf = "", event = "message", data = [];
  const line = (text) => {
    if (text === "") {
      if (data.length) onEvent(event, data.join("\n"));
      event = "message";
      data = [];
      return;
    }
    if (text.startsWith(":")) return;  // a comment (keep-alive ping)
    const cut = text.indexOf(":");
    const field = cut < 0 ? text : text.slice(0, cut);
    let value = cut < 0 ? "" : text.slice(cut + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  };
  return (chunk) => {
    buf += chunk;
    const hold = buf.endsWith("\r") ? 1 : 0;
    const lines = buf.slice(0, buf.length - hold).split(/\r\n|\r|\n/);
    buf = lines.pop() + (hold ? "\r" : "");
    lines.forEach(line);
  };
}

// ---------------------------------------------------------------- small helpers

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined && text !== null) e.textContent = text;
  return e;
}

const pct1 = (x) => (typeof x === "number" ? (100 * x).toFixed(1) + "%" : "n/a");
const num = (x, digits) => (typeof x === "number" ? x.toFixed(digits) : "n/a");

function show(id, text) {
  $(id).textContent = text;
  $(id).hidden = !text;
}

function fail(e, id, retry) {
  const text = e instanceof ApiError ? `Error ${e.message}`
    : e instanceof TypeError ? `${e.message} (is the server running?)` : e.message;
  show(id, text);
  if (e.status === 401) askKey(e.message, retry);
}

function labelOrder(probs) {
  return labels.length && labels.every((k) => k in probs) ? labels : Object.keys(probs);
}

// Percentages with one decimal that add up to exactly 100.0 (largest remainder), since the bars
// of one answer are read together.
function percents(probs, keys) {
  const total = keys.reduce((s, k) => s + (probs[k] || 0), 0) || 1;
  const tenths = keys.map((k) => ((probs[k] || 0) / total) * 1000);
  const shown = tenths.map(Math.floor);
  let left = 1000 - shown.reduce((a, b) => a + b, 0);
  const order = tenths.map((t, i) => [t - shown[i], i]).sort((a, b) => b[0] - a[0]);
  for (const [, i] of order) {
    if (left <= 0) break;
    shown[i] += 1;
    left -= 1;
  }
  return shown.map((t) => t / 10);
}

// ---------------------------------------------------------------- the model panel

function fill(dl, rows) {
  dl.replaceChildren();
  for (const [term, value, title] of rows) {
    if (value === undefined || value === null) continue;
    const dd = el("dd", "", String(value));
    if (title) dd.title = title;
    dl.append(el("dt", "", term), dd);
  }
}

function renderHealth(h) {
  const p = h.profile || {};
  show("server-status", `${h.status} · ${h.threads} threads · GPU offload ${h.gpu_offload ? "on" : "off"}`
       + (h.auth ? " · API key required" : ""));
  fill($("health"), [
    ["model", String(h.model).split(/[\\/]/).pop(), h.model],
    ["quant", h.quant || "unknown"],
    ["prompt profile", p.name],
    ["profile sha256", p.sha256],
    ["as converted", p.as_converted ? "yes: the prompts convert verified"
                                    : "no: not the prompts convert verified"],
    ["labels", (h.labels || []).join(", ")],
  ]);
  const f = h.fidelity;
  if (!f) {
    fill($("fidelity"), [["none", "not stored (converted without verification?)"]]);
  } else if (f.error) {
    fill($("fidelity"), [["unreadable", f.error]]);
  } else {
    fill($("fidelity"), [
      ["file", f.chosen || f.quant],
      ["label agreement", pct1(f.agreement)],
      [`${Math.round(100 * f.confidence)}% lower bound`, f.bound === null ? "n/a (stopped early)" : pct1(f.bound)],
      ["n", f.n],
      ["target", `${pct1(f.min_agreement)}, ${f.met_target ? "met" : "missed"}`],
      ["label KL", typeof f.label_kl === "number" ? String(Number(f.label_kl.toPrecision(2))) : null],
      ["accuracy", typeof f.accuracy === "number" ? pct1(f.accuracy) : null],
      ["reference", f.reference],
    ]);
  }
}

async function loadHealth() {
  try {
    const res = await fetch("health");
    if (!res.ok) throw await apiError(res);
    const h = await res.json();
    labels = h.labels || [];
    renderHealth(h);
    if (h.auth && !sessionStorage.getItem(KEY)) askKey("", null);
  } catch (e) {
    show("server-status", `server not reachable: ${e.message}`);
  }
}

// ---------------------------------------------------------------- one message

function bar(label, percent, top) {
  const row = el("div", top ? "bar top" : "bar");
  const track = el("span", "bar-track");
  const filled = el("span", "bar-fill");
  filled.style.width = percent + "%";
  track.append(filled);
  row.append(el("span", "bar-label", label), track, el("span", "bar-value", percent.toFixed(1) + "%"));
  return row;
}

function renderIntent(r) {
  const keys = labelOrder(r.probs);
  const shown = percents(r.probs, keys);
  $("intent-label").textContent = r.intent;
  $("intent-meta").textContent = `${num(r.latency_ms, 1)} ms · ${r.source}`;
  $("bars").replaceChildren(...keys.map((k, i) => bar(k, shown[i], k === r.intent)));
}

function parseProducts(text) {
  // one a line, "name, price": the price is after the last comma; digits with dots or spaces as
  // thousands separators ("459.000") are a number, anything else is sent as text
  return text.split(/\r\n|\r|\n/).map((l) => l.normalize("NFC").trim()).filter(Boolean).map((l) => {
    const cut = l.lastIndexOf(",");
    if (cut < 0) return {name: l};
    const price = l.slice(cut + 1).trim();
    return {name: l.slice(0, cut).trim(),
            price: /^\d[\d. ]*$/.test(price) ? Number(price.replace(/[. ]/g, "")) : price || null};
  });
}

async function streamReply(body) {
  const res = await post("qwen/generate", body);
  const reply = $("reply");
  show("reply-meta", "streaming…");
  const feed = sseParser((event, data) => {
    const d = JSON.parse(data);
    if (event === "delta") {
      reply.append(d.text);
    } else if (event === "done") {
      show("reply-meta", `${d.n_tokens ?? "?"} tokens · ${num(d.tokens_per_s, 1)} tokens/s · `
           + `latency ${num(d.latency_ms, 0)} ms · ${d.finish_reason} · ${d.source}`);
    } else if (event === "error") {
      throw new Error(`the reply stopped: ${describeDetail(d.detail)}`);
    }
  });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      feed(value);
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

async function ask(event) {
  event.preventDefault();
  const query = $("query").value.normalize("NFC");  // as typed, in the form the model was trained on
  const products = parseProducts($("products").value);
  show("ask-error", "");
  $("answer").hidden = true;  // until this message's intent is in
  for (const id of ["reply", "reply-meta"]) $(id).textContent = "";
  $("send").disabled = true;
  try {
    const intent = await (await post("qwen/intent", {query})).json();
    $("you").textContent = query;
    renderIntent(intent);
    $("answer").hidden = false;
    const body = {query, intent: intent.intent, has_products: $("has-products").checked, stream: true};
    if (products.length) body.products = products;
    await streamReply(body);
  } catch (e) {
    fail(e, "ask-error", () => $("ask-form").requestSubmit());
  } finally {
    $("send").disabled = false;
  }
}

// ---------------------------------------------------------------- a batch

function renderBatch(rows) {
  const keys = labelOrder(rows[0].probs);
  const head = el("tr");
  for (const h of ["#", "query", "intent", ...keys, "ms"]) head.append(el("th", "", h));
  $("batch-table").tHead.replaceChildren(head);
  $("batch-table").tBodies[0].replaceChildren(...rows.map((r, i) => {
    const tr = el("tr");
    tr.append(el("td", "num", i + 1), el("td", "query", r.query), el("td", "label", r.intent));
    percents(r.probs, keys).forEach((p, j) => tr.append(
      el("td", keys[j] === r.intent ? "num top" : "num", p.toFixed(1) + "%")));
    tr.append(el("td", "num", num(r.latency_ms, 1)));
    return tr;
  }));
  $("batch-table").hidden = false;
}

async function classifyBatch(event) {
  event.preventDefault();
  const queries = $("batch-input").value.split(/\r\n|\r|\n/).map((q) => q.normalize("NFC"))
    .filter((q) => q.trim());
  show("batch-error", "");
  $("batch-run").disabled = true;
  try {
    const {results} = await (await post("qwen/intent/batch", {queries})).json();
    batchRows = results.map((r, i) => ({...r, query: queries[i]}));
    renderBatch(batchRows);
    $("csv").disabled = false;
  } catch (e) {
    fail(e, "batch-error", () => $("batch-form").requestSubmit());
  } finally {
    $("batch-run").disabled = false;
  }
}

function csvField(v) {
  const s = v === undefined || v === null ? "" : String(v);
  return /[",\r\n]/.test(s) ? `"${s.replace(/"/g, '""')}"` : s;
}

function downloadCsv() {
  const keys = labelOrder(batchRows[0].probs);
  const lines = [["query", "intent", ...keys, "source", "latency_ms"],
                 ...batchRows.map((r) => [r.query, r.intent, ...keys.map((k) => r.probs[k]), r.source,
                                          r.latency_ms])];
  // UTF-8 with a byte-order mark: without it Excel reads the file as the local code page and
  // Vietnamese comes out as mojibake
  const text = "\ufeff" + lines.map((l) => l.map(csvField).join(",")).join("\r\n") + "\r\n";
  const url = URL.createObjectURL(new Blob([text], {type: "text/csv;charset=utf-8"}));
  const a = el("a");
  a.href = url;
  a.download = "qwen-local-intents.csv";
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// ---------------------------------------------------------------- the key

function askKey(message, retry) {
  afterKey = retry;
  show("key-error", message ? `Error ${message}` : "");
  $("key").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key").focus();
}

function useKey(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key-dialog").close();
  const retry = afterKey;
  afterKey = null;
  if (retry) retry();
}

// ---------------------------------------------------------------- wiring

$("ask-form").addEventListener("submit", ask);
$("query").addEventListener("keydown", (e) => {
  // Enter sends, Shift+Enter is a new line; not while an input method (Telex, VNI) is composing
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    if (!$("send").disabled) $("ask-form").requestSubmit();
  }
});
$("batch-form").addEventListener("submit", classifyBatch);
$("csv").addEventListener("click", downloadCsv);
$("key-form").addEventListener("submit", useKey);
loadHealth();
