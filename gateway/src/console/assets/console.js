/* ɳClaw console: the one script of the signed-in pages (vanilla ES2020, no libraries, no build
 * step). The server renders a static skeleton per page (body[data-page]); this file fills it from
 * the admin API (/claw/v1, same origin, session cookie). It never uses innerHTML: key names and
 * event data are untrusted and reach the DOM only as text nodes and attribute values.
 *
 * DOM contract (ids and data-testid the tests rely on):
 * All pages  nav a[aria-current=page], #sign-out, #status (aria-live toast; class "error" on failure)
 * Sign-in    #sign-in-form, #secret, #sign-in-submit, #sign-in-error (server-rendered, no JS)
 * Usage      #usage-filter: #f-since #f-until #f-key(select) #f-apply, .presets button[data-since];
 *            #usage-error; #csv-link (href follows the filters);
 *            cards #card-requests #card-tokens #card-cost #card-saved [data-value = raw number],
 *            #card-saved-sub ("priced as <model>"); chart #usage-chart: button[data-metric=
 *            requests|tokens][aria-pressed], svg[data-testid=chart-svg][data-metric],
 *            rect[data-testid=chart-bar][data-day][data-tier][data-value],
 *            ul[data-testid=chart-legend] li[data-tier];
 *            #by-model-table tr[data-testid=by-model-row][data-model],
 *            #by-key-table tr[data-testid=by-key-row][data-key-id]
 * Keys       #key-filter, #key-status-filter (all|active|revoked), #key-count,
 *            #keys-table tr[data-testid=key-row][data-key-id][data-status=active|revoked] with
 *            a[data-testid=key-link] and button[data-testid=revoke-key][data-key-id];
 *            #create-key-form: #new-key-name #new-key-rpm #new-key-admin #create-key-submit;
 *            #create-key-error; #secret-panel: #secret-name, #secret-value (readonly <input>:
 *            read its value), #secret-copy, #secret-done
 * Revoke     dialog#revoke-dialog (built on first use): #revoke-name #revoke-reason
 *            #revoke-confirm #revoke-cancel (Esc cancels)
 * Key        #key-page[data-key-id], #key-name, #key-badge, #key-error, #key-revoke,
 *            #fact-id #fact-prefix #fact-status #fact-rpm #fact-admin #fact-created
 *            #fact-last-used #fact-revoked; the usage cards and chart as above;
 *            #requests-refresh, #requests-table tr[data-testid=request-row][data-request-id]
 * Ledger     #ledger-conn[data-state=connecting|open|closed], #ledger-type, #ledger-key,
 *            #ledger-pause[aria-pressed], #ledger-held[data-value], #ledger-count,
 *            #ledger-table tr[data-testid=ledger-row][data-event-id][data-event-type][data-key-id]
 *            (click, or Enter/Space when focused, selects: aria-current=true), #ledger-json
 * Health     #health-overall, #health-updated, #health-error, #health-version,
 *            #health-uptime[data-value=seconds], #health-started, #health-mode,
 *            #tiers-table tr[data-testid=tier-row][data-tier][data-provider][data-state],
 *            #health-ledger-backend #health-ledger-ends #health-ledger-appended #health-outbox,
 *            #health-projection-state #health-projection-source #health-projection-lag
 *            #health-projection-idle #health-projection-applied, #health-models
 */
"use strict";

(() => {
// ---- Shared: DOM helpers ----

const API = "/claw/v1";
const $ = (sel, root = document) => root.querySelector(sel);
const CSRF = ($('meta[name="claw-csrf"]') || {}).content || "";

/** Attributes: `text` sets textContent, `onX` functions listen, null/false are skipped. */
function attrs(node, a) {
  for (const [k, v] of Object.entries(a || {})) {
    if (v == null || v === false) continue;
    if (k === "text") node.textContent = v;
    else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  return node;
}

/** Children: nodes as they are, anything else as text (never parsed as HTML). */
function append(node, kids) {
  for (const c of kids.flat(Infinity)) if (c != null && c !== false) node.append(c instanceof Node ? c : String(c));
  return node;
}

const h = (tag, a, ...kids) => append(attrs(document.createElement(tag), a), kids);
const svg = (tag, a, ...kids) => append(attrs(document.createElementNS("http://www.w3.org/2000/svg", tag), a), kids);
/** Class names without the falsy ones; null when none is left. */
const cls = (...names) => names.filter(Boolean).join(" ") || null;

// ---- Shared: the admin API ----

class ApiError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

let leaving = false;
/** The session is gone: to the sign-in form, and back here afterwards. */
function goSignIn() {
  if (leaving) return;
  leaving = true;
  location.assign("/claw/sign-in?next=" + encodeURIComponent(location.pathname + location.search));
}

/** fetch() for the admin API: JSON in and out, x-csrf-token on changes, sign-in on 401, and
 *  an OpenAI-shaped error becomes an ApiError with error.message and the HTTP status. */
async function api(path, { method = "GET", json, signal } = {}) {
  const headers = { accept: "application/json" };
  if (method !== "GET") headers["x-csrf-token"] = CSRF;
  if (json !== undefined) headers["content-type"] = "application/json";
  let res;
  try {
    res = await fetch(path, { method, headers, signal, body: json === undefined ? undefined : JSON.stringify(json),
      credentials: "same-origin", cache: "no-store" });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError("The gateway did not answer. Is it running?", 0);
  }
  if (res.status === 401) {
    goSignIn();
    throw new ApiError("Your session has expired. Signing in again…", 401);
  }
  let data = null;
  try { data = JSON.parse(await res.text()); } catch (_) { /* empty or not JSON */ }
  if (!res.ok) {
    throw new ApiError((data && data.error && data.error.message) || `The gateway answered HTTP ${res.status}.`, res.status);
  }
  return data;
}

const isAbort = (e) => e && e.name === "AbortError";
const keyPath = (id) => `${API}/api-keys/${encodeURIComponent(id)}`;
const keyPage = (id) => `/claw/keys/${encodeURIComponent(id)}`;
const withQuery = (path, q) => (String(q) ? `${path}?${q}` : path);

// ---- Shared: formatters (the reader's locale; times in local time with the ISO string as title) ----

const num = (v) => (v == null || v === "" ? NaN : Number(v));
const sum = (xs) => xs.reduce((a, b) => a + b, 0);
const intF = new Intl.NumberFormat();
const compactF = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const usdF = {};
const dateTimeF = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
const timeF = new Intl.DateTimeFormat(undefined, { timeStyle: "medium" });
const dayF = new Intl.DateTimeFormat(undefined, { month: "short", day: "numeric", timeZone: "UTC" });
const dayLongF = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeZone: "UTC" });
const utcDay = (d) => new Date(d + "T00:00:00Z");

/** 1234567 → "1,234,567"; missing → "—". */
function fmtInt(v) {
  const n = num(v);
  return Number.isFinite(n) ? intF.format(Math.round(n)) : "—";
}

/** USD: 2 decimals from $1, 4 from a cent, up to 6 below a cent. */
function fmtUsd(v) {
  const n = num(v), a = Math.abs(n);
  if (!Number.isFinite(n)) return "—";
  if (a > 0 && a < 0.0000005) return "<$0.000001";
  const d = a >= 1 || a === 0 ? 2 : a >= 0.01 ? 4 : 6;
  usdF[d] = usdF[d] || new Intl.NumberFormat(undefined,
    { style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: d });
  return usdF[d].format(n);
}

/** Seconds: "1 d 2 h", "1 h 2 min", "2 min 5 s", "42 s". */
function fmtDuration(v) {
  const s = Math.max(0, Math.floor(num(v)));
  if (!Number.isFinite(s)) return "—";
  const d = Math.floor(s / 86400), hr = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d} d ${hr} h` : hr ? `${hr} h ${m} min` : m ? `${m} min ${s % 60} s` : `${s} s`;
}

/** Milliseconds: "840 ms", "2.35 s". */
function fmtMs(v) {
  const n = num(v);
  if (!Number.isFinite(n)) return "—";
  return n < 1000 ? `${intF.format(Math.round(n))} ms` : `${(n / 1000).toFixed(n < 10000 ? 2 : 1)} s`;
}

/** A <time> in local time, the ISO string as title; `short` leaves out today's date. */
function timeEl(iso, short, missing = "never") {
  if (!iso) return h("span", { class: "muted" }, missing);
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return h("span", null, iso);
  const today = d.toDateString() === new Date().toDateString();
  return h("time", { datetime: iso, title: iso }, short && today ? timeF.format(d) : dateTimeF.format(d));
}

/** Offsets per partition {"0": 12, "1": 40} → "0: 12 · 1: 40"; {error} → the error. */
function fmtOffsets(o) {
  if (!o || typeof o !== "object") return "—";
  if (o.error) return h("span", { class: "st-err" }, String(o.error));
  const parts = Object.entries(o).map(([p, off]) => `${p}: ${fmtInt(off)}`);
  return parts.length ? parts.join(" · ") : "none yet";
}

/** A request failed: an HTTP status from 400, or a word that says so. */
function failed(status) {
  const n = num(status);
  return Number.isFinite(n) ? n >= 400 : /err|fail|cancel/i.test(String(status || ""));
}

const TIERS = [["local", "Local"], ["free_gemini", "Free Gemini"], ["api_key", "Paid API"]];
const TIER_LABEL = Object.fromEntries(TIERS);
const tierLabel = (t) => TIER_LABEL[t] || t || "?";
/** A tier with its colour swatch. */
const tierEl = (t, text = tierLabel(t)) => h("span", { class: `tier t-${t}`, title: t }, text);
const badge = (text, kind) => h("span", { class: cls("badge", kind) }, text);

// ---- Shared: status messages ----

let sayTimer = 0;
/** A short message in the #status live region (a toast that fades after a while). */
function say(msg, kind) {
  const box = $("#status");
  if (!box) return;
  box.className = cls("status", kind);
  box.textContent = msg;
  clearTimeout(sayTimer);
  sayTimer = setTimeout(() => (box.textContent = ""), kind === "error" ? 9000 : 4500);
}
const sayError = (e) => { if (e.status !== 401 && !isAbort(e)) say(e.message, "error"); };

/** An error (ApiError, Error or string) in an inline role=alert element; null hides it. */
function showError(node, err) {
  if (!node || (err && err.status === 401)) return; // 401: already on the way to sign-in
  node.textContent = !err ? "" : typeof err === "string" ? err : err.message;
  node.hidden = !err;
}

// ---- Shared: tables ----

/** Replaces a table's rows. `cols`: [{cell: item => node|string|array, num?, cls?}];
 *  `row(item)`: the <tr>'s attributes; `empty`: the text when there is no item. */
function fillTable(table, items, cols, { row, empty = "Nothing here yet." } = {}) {
  const body = table.tBodies[0];
  if (!items.length) {
    body.replaceChildren(h("tr", null, h("td", { colspan: cols.length, class: "muted" }, empty)));
    return;
  }
  body.replaceChildren(...items.map((it) =>
    h("tr", row && row(it), cols.map((c) => h("td", { class: cls(c.num && "num", c.cls) }, c.cell(it))))));
}

/** Fills an element (selector or node) with text/nodes; `raw` goes to data-value. */
function put(sel, content, raw) {
  const node = typeof sel === "string" ? $(sel) : sel;
  if (!node) return;
  node.replaceChildren(...[content].flat().map((c) => (c instanceof Node ? c : String(c == null ? "—" : c))));
  if (raw !== undefined) node.dataset.value = raw == null ? "" : String(raw);
}

// ---- Shared: the SVG chart, stacked bars of usage rows per day and tier ----

let chartSeq = 0;

/** Every day from a to b (YYYY-MM-DD, UTC), at most 731. */
function dayRange(a, b) {
  const out = [];
  for (let t = utcDay(a).getTime(), end = utcDay(b).getTime(); t <= end && out.length < 731; t += 864e5) {
    out.push(new Date(t).toISOString().slice(0, 10));
  }
  return out;
}

/** A round axis maximum and step for values up to `max`, in about 4 steps. */
function niceScale(max) {
  if (!(max > 0)) return { top: 1, step: 1 };
  const rough = max / 4, mag = 10 ** Math.floor(Math.log10(rough)), f = rough / mag;
  const step = Math.max(1, (f <= 1 ? 1 : f <= 2 ? 2 : f <= 2.5 ? 2.5 : f <= 5 ? 5 : 10) * mag);
  return { top: Math.ceil(max / step) * step, step };
}

/**
 * A chart inside `host`; returns {set(rows)} for the usage document's rows ({day,
 * tier_source, requests, prompt_tokens, completion_tokens}). One stacked bar per day (gaps
 * filled), a requests/tokens toggle, a legend with totals, a <title> per segment (tooltip),
 * and the same numbers as a table for screen readers. Redraws when its width changes.
 */
function makeChart(host) {
  let rows = null, metric = "requests", width = 0;
  const legend = h("ul", { class: "legend", "data-testid": "chart-legend" });
  const toggle = h("div", { class: "presets", role: "group", "aria-label": "Chart metric" },
    [["requests", "Requests"], ["tokens", "Tokens"]].map(([m, label]) => h("button", {
      type: "button", "data-metric": m, "aria-pressed": String(m === metric), text: label,
      onclick: () => {
        metric = m;
        for (const b of toggle.children) b.setAttribute("aria-pressed", String(b.dataset.metric === m));
        draw();
      },
    })));
  const plot = h("div", { class: "plot" }, h("p", { class: "muted" }, "Loading…"));
  const table = h("table");
  const details = h("details", null, h("summary", null, "Show the numbers as a table"),
    h("div", { class: "table-wrap" }, table));
  host.replaceChildren(h("div", { class: "chart-bar" }, legend, toggle), plot, details);
  if ("ResizeObserver" in window) {
    new ResizeObserver(() => { if (rows && Math.abs(plot.clientWidth - width) > 8) draw(); }).observe(plot);
  }

  function draw() {
    const unit = metric;
    // Sums per day and tier; a tier the console does not know gets its own (grey) series.
    const series = TIERS.map((t) => t[0]), perDay = new Map(), perTier = {};
    for (const r of rows) {
      const t = String(r.tier_source || "unknown");
      if (!series.includes(t)) series.push(t);
      const v = metric === "tokens" ? (num(r.prompt_tokens) || 0) + (num(r.completion_tokens) || 0) : num(r.requests) || 0;
      const d = perDay.get(r.day) || {};
      d[t] = (d[t] || 0) + v;
      perDay.set(r.day, d);
      perTier[t] = (perTier[t] || 0) + v;
    }
    const grand = sum(Object.values(perTier));
    legend.replaceChildren(...series.map((t) => h("li", { "data-tier": t },
      h("span", { class: `sw t-${t}`, "aria-hidden": "true" }), `${tierLabel(t)} ${fmtInt(perTier[t] || 0)}`,
      grand ? h("span", { class: "muted" }, ` (${Math.round(((perTier[t] || 0) * 100) / grand)}%)`) : null)));

    const seen = [...perDay.keys()].filter(Boolean).sort();
    details.hidden = !seen.length;
    if (!seen.length) {
      plot.replaceChildren(h("p", { class: "muted" }, "No requests in this period."));
      return;
    }
    let days = dayRange(seen[0], seen[seen.length - 1]);
    if (!days.length || days.length >= 731) days = seen; // odd or very long spans: the days with data

    // Geometry in CSS pixels of the current width.
    width = plot.clientWidth;
    const W = Math.max(260, width || 640), H = W < 520 ? 190 : 240;
    const m = { l: 46, r: 8, t: 10, b: 24 }, iw = W - m.l - m.r, ih = H - m.t - m.b;
    const band = iw / days.length, bw = Math.max(1, Math.min(56, band * 0.72));
    const { top, step } = niceScale(Math.max(...days.map((d) => sum(Object.values(perDay.get(d) || {})))));
    const y = (v) => m.t + ih - (v / top) * ih;
    const id = `chart-title-${++chartSeq}`;
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img", "aria-labelledby": id,
      "data-testid": "chart-svg", "data-metric": metric },
      svg("title", { id }, `Daily ${unit} by tier, ${days[0]} to ${days[days.length - 1]}: ${fmtInt(grand)} in all`));

    for (let v = 0; v <= top + step / 2; v += step) { // grid and y labels
      const yy = Math.round(y(v)) + 0.5;
      root.append(svg("line", { class: "grid", x1: m.l, x2: W - m.r, y1: yy, y2: yy }),
        svg("text", { class: "axis", x: m.l - 6, y: yy + 4, "text-anchor": "end" }, compactF.format(v)));
    }
    const every = Math.max(1, Math.ceil(64 / band)); // x labels: about one per 64 px
    days.forEach((d, i) => {
      if (i % every === 0) {
        root.append(svg("text", { class: "axis", x: (m.l + (i + 0.5) * band).toFixed(1), y: H - 6,
          "text-anchor": "middle" }, dayF.format(utcDay(d))));
      }
    });

    const bars = svg("g"); // the stacked segments, each at least 1 px tall so it shows
    days.forEach((d, i) => {
      const vals = perDay.get(d);
      if (!vals) return;
      const x = (m.l + i * band + (band - bw) / 2).toFixed(1);
      let base = y(0), acc = 0;
      for (const t of series) {
        const v = vals[t] || 0;
        if (!v) continue;
        acc += v;
        const topY = Math.min(base - 1, y(acc));
        bars.append(svg("rect", { class: `bar t-${t}`, x, y: topY.toFixed(1), width: bw.toFixed(1),
          height: (base - topY).toFixed(1), "data-testid": "chart-bar", "data-day": d, "data-tier": t, "data-value": v },
          svg("title", null, `${dayLongF.format(utcDay(d))} · ${tierLabel(t)}: ${fmtInt(v)} ${unit}`)));
        base = topY;
      }
    });
    root.append(bars);
    plot.replaceChildren(root);

    // The same numbers as a table, newest day first.
    const th = (text, c) => h("th", { scope: "col", class: c }, text);
    table.replaceChildren(
      h("thead", null, h("tr", null, th("Day"), series.map((t) => th(tierLabel(t), "num")), th("Total", "num"))),
      h("tbody", null, seen.slice().reverse().map((d) => h("tr", null, h("th", { scope: "row" }, d),
        series.map((t) => h("td", { class: "num" }, fmtInt(perDay.get(d)[t] || 0))),
        h("td", { class: "num" }, fmtInt(sum(Object.values(perDay.get(d)))))))));
  }

  return { set(r) { rows = Array.isArray(r) ? r : []; draw(); } };
}

// ---- Shared: usage cards (Usage and Key pages) ----

function renderCards(totals, pricedAs, rows) {
  const t = totals || {}, reqs = (rows || []).map((r) => [r.tier_source, num(r.requests) || 0]);
  const all = sum(reqs.map((r) => r[1])), free = sum(reqs.filter((r) => r[0] !== "api_key").map((r) => r[1]));
  put("#card-requests", fmtInt(t.requests), t.requests);
  put("#card-requests-sub", all ? `${Math.round((free * 100) / all)}% served by the local and free tiers` : "none in this period");
  put("#card-tokens", fmtInt(t.total_tokens), t.total_tokens);
  put("#card-tokens-sub", `${fmtInt(t.prompt_tokens)} prompt · ${fmtInt(t.completion_tokens)} completion`);
  put("#card-cost", fmtUsd(t.cost_usd), t.cost_usd);
  put("#card-cost-sub", "spent on the paid API tier");
  put("#card-saved", fmtUsd(t.saved_usd), t.saved_usd);
  put("#card-saved-sub", pricedAs ? `priced as ${pricedAs}` : "by the local and free tiers");
}

// ---- Shared: revoking a key, after a confirmation <dialog> ----

let revokeResolve = null;

/** The dialog, built once. Cancel has the focus first; Esc cancels; Enter in the reason confirms. */
function revokeDialog() {
  let dlg = $("#revoke-dialog");
  if (dlg) return dlg;
  const reason = h("input", { id: "revoke-reason", "data-testid": "revoke-reason", maxlength: 500, autocomplete: "off" });
  const finish = (ok) => {
    const resolve = revokeResolve;
    revokeResolve = null;
    if (dlg.open) dlg.close();
    if (resolve) resolve(ok ? reason.value.trim() : null);
  };
  const button = (id, text, ok, c) => h("button", { type: "button", id, "data-testid": id, class: c, onclick: () => finish(ok) }, text);
  dlg = h("dialog", { id: "revoke-dialog", "data-testid": "revoke-dialog", "aria-labelledby": "revoke-h", "aria-describedby": "revoke-desc" },
    h("h2", { id: "revoke-h" }, "Revoke “", h("span", { id: "revoke-name" }), "”?"),
    h("p", { id: "revoke-desc" }, "Requests with this key are refused from now on. This cannot be undone."),
    h("label", { for: "revoke-reason" }, "Reason (optional, recorded in the ledger)"), reason,
    h("div", { class: "actions" }, button("revoke-cancel", "Cancel", false), button("revoke-confirm", "Revoke", true, "danger solid")));
  dlg.addEventListener("cancel", (e) => { e.preventDefault(); finish(false); });
  dlg.addEventListener("close", () => finish(false));
  reason.addEventListener("keydown", (e) => { if (e.key === "Enter") { e.preventDefault(); finish(true); } });
  document.body.append(dlg);
  return dlg;
}

/** Resolves to the reason ("" for none), or null when cancelled. */
function confirmRevoke(name) {
  const dlg = revokeDialog();
  $("#revoke-name").textContent = name;
  $("#revoke-reason").value = "";
  return new Promise((resolve) => {
    revokeResolve = resolve;
    dlg.showModal();
    $("#revoke-cancel").focus();
  });
}

/** Confirms, then revokes; true when the key was revoked. */
async function revokeKey(key) {
  const reason = await confirmRevoke(key.name);
  if (reason === null) return false;
  await api(withQuery(keyPath(key.id), new URLSearchParams(reason ? { reason } : {})), { method: "DELETE" });
  say(`Key “${key.name}” revoked.`);
  return true;
}

// ---- Page: Usage ----

function pageUsage() {
  const form = $("#usage-filter"), since = $("#f-since"), until = $("#f-until"), keySel = $("#f-key");
  const err = $("#usage-error"), chart = makeChart($("#usage-chart"));
  let ctl = null;

  /** The filters as query parameters, empty ones left out. */
  function params() {
    const q = new URLSearchParams();
    if (since.value.trim()) q.set("since", since.value.trim());
    if (until.value.trim()) q.set("until", until.value.trim());
    if (keySel.value) q.set("key_id", keySel.value);
    return q;
  }

  /** Key options: "All keys" and every key (revoked ones marked); a wanted id that is not
   *  (yet) known keeps an option of its own, so that a filtered link works at once. */
  function keyOptions(keys, want) {
    const opts = [h("option", { value: "" }, "All keys")].concat(keys.map((k) =>
      h("option", { value: k.id }, `${k.name} (${k.key_prefix}…)${k.is_active ? "" : " — revoked"}`)));
    if (want && !keys.some((k) => k.id === want)) opts.push(h("option", { value: want }, want));
    keySel.replaceChildren(...opts);
    keySel.value = want;
  }
  let knownKeys = [];

  /** The page's query string → the filter fields. */
  function fromUrl() {
    const q = new URLSearchParams(location.search);
    since.value = q.get("since") || "";
    until.value = q.get("until") || "";
    keyOptions(knownKeys, q.get("key_id") || "");
  }

  async function load() {
    if (ctl) ctl.abort();
    ctl = new AbortController();
    const q = params();
    $("#csv-link").href = withQuery(`${API}/usage.csv`, q);
    form.setAttribute("aria-busy", "true");
    try {
      const data = await api(withQuery(`${API}/usage`, q), { signal: ctl.signal });
      showError(err, null);
      const rows = data.usage || [];
      renderCards(data.totals, data.saved_priced_as, rows);
      chart.set(rows);
      byModel(rows);
      byKey(data.keys || []);
    } catch (e) {
      if (!isAbort(e)) showError(err, e);
    } finally {
      form.removeAttribute("aria-busy");
    }
  }

  function byModel(rows) {
    const by = new Map();
    for (const r of rows) {
      const m = by.get(r.model) || { model: r.model, tiers: new Set(), requests: 0, tokens: 0, cost: 0 };
      m.tiers.add(r.tier_source);
      m.requests += num(r.requests) || 0;
      m.tokens += (num(r.prompt_tokens) || 0) + (num(r.completion_tokens) || 0);
      m.cost += num(r.cost_usd) || 0;
      by.set(r.model, m);
    }
    fillTable($("#by-model-table"), [...by.values()].sort((a, b) => b.requests - a.requests || b.tokens - a.tokens), [
      { cell: (m) => h("code", null, m.model) },
      { cell: (m) => [...m.tiers].map((t) => tierEl(t)), cls: "nowrap" },
      { cell: (m) => fmtInt(m.requests), num: true },
      { cell: (m) => fmtInt(m.tokens), num: true },
      { cell: (m) => fmtUsd(m.cost), num: true },
    ], { empty: "No requests in this period.", row: (m) => ({ "data-testid": "by-model-row", "data-model": m.model }) });
  }

  function byKey(keys) {
    const tierCounts = (k) => TIERS.filter(([t]) => k.by_tier && k.by_tier[t] && num(k.by_tier[t].requests) > 0)
      .map(([t, label]) => h("span", { class: `tier t-${t}`,
        title: `${label}: ${fmtInt(k.by_tier[t].requests)} requests, ${fmtInt(k.by_tier[t].total_tokens)} tokens` },
      fmtInt(k.by_tier[t].requests)));
    fillTable($("#by-key-table"), keys.slice().sort((a, b) => (num(b.requests) || 0) - (num(a.requests) || 0)), [
      { cell: (k) => h("a", { href: keyPage(k.key_id), title: k.key_id }, k.name || k.key_id) },
      { cell: (k) => fmtInt(k.requests), num: true },
      { cell: tierCounts, cls: "nowrap" },
      { cell: (k) => fmtInt(k.total_tokens), num: true },
      { cell: (k) => fmtUsd(k.cost_usd), num: true },
      { cell: (k) => fmtUsd(k.saved_usd), num: true },
      { cell: (k) => timeEl(k.last_used_at) },
    ], { empty: "No key used the gateway in this period.", row: (k) => ({ "data-testid": "by-key-row", "data-key-id": k.key_id }) });
  }

  /** Applies the filters: into the URL (a filtered view is a link), then loads. */
  function apply() {
    const url = withQuery(location.pathname, params());
    if (url !== location.pathname + location.search) history.pushState(null, "", url);
    load();
  }

  form.addEventListener("submit", (e) => { e.preventDefault(); apply(); });
  for (const b of form.querySelectorAll("[data-since]")) {
    b.addEventListener("click", () => { since.value = b.dataset.since; until.value = ""; apply(); });
  }
  keySel.addEventListener("change", apply);
  window.addEventListener("popstate", () => { fromUrl(); load(); });

  fromUrl();
  load();
  api(`${API}/api-keys`).then((d) => { knownKeys = (d && d.keys) || []; keyOptions(knownKeys, keySel.value); })
    .catch(sayError);
}

// ---- Page: Keys ----

function pageKeys() {
  const table = $("#keys-table"), filter = $("#key-filter"), statusSel = $("#key-status-filter");
  const form = $("#create-key-form"), formErr = $("#create-key-error");
  const panel = $("#secret-panel"), secret = $("#secret-value"), copyBtn = $("#secret-copy");
  let keys = [];

  const q = new URLSearchParams(location.search);
  filter.value = q.get("q") || "";
  if (["all", "active", "revoked"].includes(q.get("status"))) statusSel.value = q.get("status");

  const cols = [
    { cell: (k) => [h("a", { href: keyPage(k.id), "data-testid": "key-link" }, k.name), h("span", { class: "id" }, k.id)] },
    { cell: (k) => h("code", null, `${k.key_prefix}…`), cls: "nowrap" },
    { cell: (k) => fmtInt(k.rpm_limit), num: true },
    { cell: (k) => (k.admin_allowed ? badge("yes", "warn") : badge("no")) },
    { cell: (k) => timeEl(k.created_at, false, "—") },
    { cell: (k) => timeEl(k.last_used_at) },
    { cell: (k) => (k.is_active ? badge("active", "ok")
      : h("span", { class: "badge bad", title: k.revoked_at && `revoked ${k.revoked_at}` }, "revoked")) },
    { cell: (k) => k.is_active && h("button", { type: "button", class: "danger small", "data-testid": "revoke-key",
      "data-key-id": k.id, "aria-label": `Revoke ${k.name}` }, "Revoke") },
  ];

  function render() {
    const needle = filter.value.trim().toLowerCase(), st = statusSel.value;
    const shown = keys.filter((k) => (st === "all" || (st === "active") === !!k.is_active) &&
      (!needle || [k.name, k.key_prefix, k.id].some((x) => String(x || "").toLowerCase().includes(needle))));
    fillTable(table, shown, cols, {
      empty: keys.length ? "No key matches the filter." : "No keys yet. Create one above.",
      row: (k) => ({ "data-testid": "key-row", "data-key-id": k.id, "data-status": k.is_active ? "active" : "revoked",
        class: k.is_active ? null : "revoked" }),
    });
    $("#key-count").textContent = `Showing ${shown.length} of ${keys.length} keys (${keys.filter((k) => k.is_active).length} active)`;
  }

  async function load() {
    try {
      keys = ((await api(`${API}/api-keys`)) || {}).keys || [];
      render();
    } catch (e) {
      sayError(e);
    }
  }

  /** The list filter lives in the URL too, so that the view is a link. */
  function filterChanged() {
    const p = new URLSearchParams();
    if (filter.value.trim()) p.set("q", filter.value.trim());
    if (statusSel.value !== "all") p.set("status", statusSel.value);
    history.replaceState(null, "", withQuery(location.pathname, p));
    render();
  }
  filter.addEventListener("input", filterChanged);
  statusSel.addEventListener("change", filterChanged);

  // Revoke buttons, delegated: the rows are rebuilt on every render.
  table.addEventListener("click", async (e) => {
    const btn = e.target.closest("button[data-testid=revoke-key]");
    const key = btn && keys.find((k) => k.id === btn.dataset.keyId);
    if (!key) return;
    try {
      if (await revokeKey(key)) {
        await load();
        $("#list-h").focus();
      } else {
        btn.focus();
      }
    } catch (err) {
      sayError(err);
    }
  });

  // Create, then show the secret, once.
  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    const name = $("#new-key-name").value.trim(), rpm = Number($("#new-key-rpm").value);
    if (!name) return showError(formErr, "Give the key a name.");
    if (!Number.isInteger(rpm) || rpm < 1 || rpm > 1000000) {
      return showError(formErr, "The rate limit is a whole number of requests per minute, from 1 to 1,000,000.");
    }
    const submit = $("#create-key-submit");
    submit.disabled = true;
    showError(formErr, null);
    try {
      const made = await api(`${API}/api-keys`, { method: "POST",
        json: { name, admin_allowed: $("#new-key-admin").checked, rpm_limit: rpm } });
      form.reset();
      $("#secret-name").textContent = `“${made.name}” (${made.key_prefix}…)`;
      secret.value = made.key;
      copyBtn.textContent = "Copy";
      panel.hidden = false;
      panel.focus();
      say(`Key “${made.name}” created. Copy its secret now.`);
      load();
    } catch (err) {
      showError(formErr, err);
    } finally {
      submit.disabled = false;
    }
  });

  /** The secret lives in nothing but this field, and only until Done or leaving the page. */
  function hideSecret() {
    secret.value = "";
    panel.hidden = true;
  }

  copyBtn.addEventListener("click", async () => {
    const copied = () => { copyBtn.textContent = "Copied"; say("Key copied to the clipboard."); };
    try {
      await navigator.clipboard.writeText(secret.value);
      copied();
    } catch (_) {
      // No clipboard API (plain http, a denied permission): select the text instead.
      secret.focus();
      secret.select();
      let ok = false;
      try { ok = document.execCommand("copy"); } catch (_) { /* unsupported */ }
      if (ok) copied();
      else say("The key is selected: press Ctrl+C (⌘C on a Mac) to copy it.");
    }
  });
  secret.addEventListener("focus", () => secret.select());
  $("#secret-done").addEventListener("click", () => { hideSecret(); $("#new-key-name").focus(); });
  window.addEventListener("pagehide", hideSecret); // and never from the back/forward cache

  load();
}

// ---- Page: Key (one key's facts, usage and recent requests) ----

function pageKey() {
  const id = $("#key-page").dataset.keyId, err = $("#key-error"), revokeBtn = $("#key-revoke");
  const chart = makeChart($("#usage-chart"));
  let key = null;
  $("#key-ledger-link").href = "/claw/ledger?key=" + encodeURIComponent(id);

  async function loadKey() {
    try {
      key = await api(keyPath(id));
    } catch (e) {
      if (e.status === 404) put("#key-name", "Unknown key");
      return showError(err, e.status === 404 ? `No key has the id ${id}.` : e);
    }
    showError(err, null);
    put("#key-name", key.name);
    document.title = `${key.name} · ɳClaw`;
    const b = $("#key-badge");
    b.textContent = key.is_active ? "active" : "revoked";
    b.className = cls("badge", key.is_active ? "ok" : "bad");
    put("#fact-prefix", h("code", null, `${key.key_prefix}…`));
    put("#fact-status", key.is_active ? "active" : "revoked");
    put("#fact-rpm", `${fmtInt(key.rpm_limit)} requests per minute`);
    put("#fact-admin", key.admin_allowed ? "allowed" : "not allowed");
    put("#fact-created", timeEl(key.created_at, false, "—"));
    put("#fact-last-used", timeEl(key.last_used_at));
    put("#fact-revoked", timeEl(key.revoked_at, false, "—"));
    revokeBtn.hidden = !key.is_active;
  }

  async function loadUsage() {
    try {
      const data = await api(`${API}/usage?key_id=${encodeURIComponent(id)}`);
      renderCards(data.totals, data.saved_priced_as, data.usage || []);
      chart.set(data.usage || []);
    } catch (e) {
      sayError(e);
    }
  }

  const requestCols = [
    { cell: (r) => timeEl(r.occurred_at, true, "—") },
    { cell: (r) => h("code", null, r.model || "—") },
    { cell: (r) => tierEl(r.tier) },
    { cell: (r) => r.provider || "—" },
    { cell: (r) => h("span", { title: `${fmtInt(r.prompt_tokens)} prompt + ${fmtInt(r.completion_tokens)} completion` },
      fmtInt(r.total_tokens)), num: true },
    { cell: (r) => fmtUsd(r.cost_usd), num: true },
    { cell: (r) => fmtMs(r.latency_ms), num: true },
    { cell: (r) => h("span", { class: failed(r.status) ? "st-err" : "st-ok" }, r.status == null ? "—" : r.status) },
  ];

  async function loadRequests() {
    const btn = $("#requests-refresh");
    btn.disabled = true;
    try {
      const data = await api(`${keyPath(id)}/requests?limit=50`);
      fillTable($("#requests-table"), (data && data.requests) || [], requestCols, {
        empty: "This key has not made a request yet.",
        row: (r) => ({ "data-testid": "request-row", "data-request-id": r.request_id, class: failed(r.status) && "failed" }),
      });
    } catch (e) {
      if (e.status === 404) fillTable($("#requests-table"), [], requestCols, { empty: "No requests." });
      else sayError(e);
    } finally {
      btn.disabled = false;
    }
  }

  revokeBtn.addEventListener("click", async () => {
    try {
      if (key && (await revokeKey(key))) {
        await loadKey();
        $("#key-name").setAttribute("tabindex", "-1");
        $("#key-name").focus();
      } else {
        revokeBtn.focus();
      }
    } catch (e) {
      sayError(e);
    }
  });
  $("#requests-refresh").addEventListener("click", () => { loadRequests(); loadUsage(); });

  loadKey();
  loadUsage();
  loadRequests();
}

// ---- Page: Ledger (live events over server-sent events) ----

function pageLedger() {
  const CAP = 500; // events kept, and rows shown at most
  const tbody = $("#ledger-table").tBodies[0], typeSel = $("#ledger-type"), keyIn = $("#ledger-key");
  const pauseBtn = $("#ledger-pause"), heldEl = $("#ledger-held"), conn = $("#ledger-conn"), pre = $("#ledger-json");
  const buffer = []; // SSE messages {partition, offset, event}, oldest first
  const byId = new Map(); // event_id → message: also what de-duplicates replays after a reconnect
  const names = new Map(); // key id → key name
  let queue = [], framePending = false, paused = false, held = 0, selected = null;
  let es = null, openedAt = 0, retry = 0, typing = 0;

  const q = new URLSearchParams(location.search);
  typeSel.value = q.get("type") || "";
  if (typeSel.selectedIndex < 0) typeSel.value = "";
  keyIn.value = q.get("key") || "";

  /** Does an event pass the type and key filters? */
  function matches(ev) {
    if (typeSel.value && ev.event_type !== typeSel.value) return false;
    const needle = keyIn.value.trim().toLowerCase();
    return !needle || String(ev.key_id || "").toLowerCase().includes(needle) ||
      (names.get(ev.key_id) || "").toLowerCase().includes(needle);
  }

  /** One line that says what happened. */
  function summary(ev) {
    const d = ev.data || {};
    switch (ev.event_type) {
      case "RequestServed": {
        const served = d.model_served || d.model_requested || "?";
        const parts = [d.model_requested && d.model_requested !== served ? `${d.model_requested} → ${served}` : served,
          `${d.provider || "?"} (${d.tier || "?"})`, `status ${d.status}`,
          `${fmtInt(d.total_tokens)} tokens${d.tokens_estimated ? " (estimated)" : ""}`, fmtUsd(d.cost_usd), fmtMs(d.latency_ms)];
        if (d.stream) parts.push(d.ttft_ms != null ? `stream, first token ${fmtMs(d.ttft_ms)}` : "stream");
        return parts.join(" · ");
      }
      case "TierFallback":
        return `${d.from_tier || "?"}/${d.from_provider || "?"} → ${d.to_tier || "none"}: ${d.reason || "?"}${d.detail ? " — " + d.detail : ""}`;
      case "KeyCreated":
        return `“${d.name}” ${d.key_prefix || ""}… · ${fmtInt(d.rpm_limit)} rpm${d.admin_allowed ? " · admin allowed" : ""}`;
      case "KeyRevoked":
        return d.reason ? `reason: ${d.reason}` : "revoked";
      default: {
        const s = JSON.stringify(d);
        return s.length > 160 ? s.slice(0, 159) + "…" : s;
      }
    }
  }

  function rowFor(msg, fresh) {
    const ev = msg.event, kid = ev.key_id;
    return h("tr", { tabindex: 0, "data-testid": "ledger-row", "data-event-id": ev.event_id, "data-event-type": ev.event_type,
      "data-key-id": kid || "", "aria-current": ev.event_id === selected ? "true" : null,
      class: cls(ev.event_type === "RequestServed" && failed(ev.data && ev.data.status) && "failed", fresh && "fresh") },
    h("td", null, timeEl(ev.occurred_at, true, "—")),
    h("td", null, h("span", { class: `ev ev-${ev.event_type}` }, ev.event_type)),
    h("td", { class: "nowrap" }, kid ? h("a", { href: keyPage(kid), title: kid, class: "clip" }, names.get(kid) || kid.slice(0, 13) + "…")
      : h("span", { class: "muted" }, "—")),
    h("td", { class: "wrap" }, summary(ev)));
  }

  function counts() {
    $("#ledger-count").textContent = `${fmtInt(tbody.querySelectorAll("tr[data-event-id]").length)} of ${fmtInt(buffer.length)} events shown`;
    heldEl.hidden = !paused;
    heldEl.dataset.value = String(held);
    heldEl.textContent = `· ${fmtInt(held)} new while paused`;
  }

  /** Rebuilds every row from the buffer (filters changed, resumed, names known). */
  function renderAll() {
    const rows = buffer.filter((e) => matches(e.event)).reverse().map((e) => rowFor(e, false));
    tbody.replaceChildren(...(rows.length ? rows : [h("tr", null, h("td", { colspan: 4, class: "muted" },
      buffer.length ? "No event matches the filters." : "Waiting for events…"))]));
    queue = [];
    counts();
  }

  /** Puts the queued events on top, newest first, and drops rows past the cap. */
  function flush() {
    framePending = false;
    const items = queue.filter((e) => matches(e.event));
    queue = [];
    if (paused || !items.length) return counts();
    if (!tbody.querySelector("tr[data-event-id]")) tbody.replaceChildren();
    const fresh = openedAt && Date.now() - openedAt > 1500; // no highlight for the replayed tail
    const frag = document.createDocumentFragment();
    for (let i = items.length - 1; i >= 0; i--) frag.append(rowFor(items[i], fresh));
    tbody.prepend(frag);
    for (let last = tbody.lastElementChild; last && (tbody.rows.length > CAP || !byId.has(last.dataset.eventId));
      last = tbody.lastElementChild) last.remove();
    counts();
  }

  /** One SSE message: {"partition","offset","event":{…}}. */
  function receive(raw) {
    let msg;
    try { msg = JSON.parse(raw); } catch (_) { return; }
    const ev = msg && msg.event;
    if (!ev || !ev.event_id || byId.has(ev.event_id)) return;
    buffer.push(msg);
    byId.set(ev.event_id, msg);
    if (ev.event_type === "KeyCreated" && ev.key_id && ev.data && ev.data.name) names.set(ev.key_id, ev.data.name);
    while (buffer.length > CAP) byId.delete(buffer.shift().event.event_id);
    if (paused) {
      held++;
      return counts();
    }
    queue.push(msg); // rendered in batches, once per animation frame
    if (queue.length > CAP) queue.splice(0, queue.length - CAP);
    if (!framePending) {
      framePending = true;
      requestAnimationFrame(flush);
    }
  }

  function setConn(state, text) {
    conn.dataset.state = state;
    conn.textContent = text;
  }

  function connect() {
    if (es) es.close();
    setConn("connecting", "Connecting…");
    es = new EventSource(`${API}/events?tail=200&follow=true`);
    es.onopen = () => { openedAt = Date.now(); setConn("open", "Live"); };
    es.onmessage = (e) => receive(e.data);
    es.onerror = () => {
      if (es.readyState === EventSource.CONNECTING) return setConn("connecting", "Reconnecting…");
      // Closed for good (an HTTP error): check the session (401 → sign-in), retry later.
      es.close();
      es = null;
      setConn("closed", "Disconnected, retrying…");
      api(`${API}/status`).catch(() => {}).finally(() => { if (!leaving) retry = setTimeout(connect, 5000); });
    };
  }

  /** Shows an event's full JSON in the detail panel. */
  function select(tr) {
    const msg = byId.get(tr.dataset.eventId);
    if (!msg) return;
    selected = msg.event.event_id;
    for (const r of tbody.querySelectorAll("tr[aria-current]")) r.removeAttribute("aria-current");
    tr.setAttribute("aria-current", "true");
    $("#detail-h").textContent = `${msg.event.event_type} · partition ${msg.partition}, offset ${msg.offset}`;
    $("#ledger-detail-hint").hidden = true;
    pre.textContent = JSON.stringify(msg.event, null, 2);
    pre.hidden = false;
    if (window.matchMedia("(max-width: 960px)").matches) $("#ledger-detail").scrollIntoView({ block: "nearest" });
  }

  tbody.addEventListener("click", (e) => {
    const tr = !e.target.closest("a") && e.target.closest("tr[data-event-id]");
    if (tr) select(tr);
  });
  tbody.addEventListener("keydown", (e) => {
    if ((e.key === "Enter" || e.key === " ") && e.target.matches("tr[data-event-id]")) {
      e.preventDefault();
      select(e.target);
    }
  });

  /** Filters → the URL (a filtered ledger is a link) and the rows. */
  function filtersChanged() {
    const p = new URLSearchParams();
    if (typeSel.value) p.set("type", typeSel.value);
    if (keyIn.value.trim()) p.set("key", keyIn.value.trim());
    history.replaceState(null, "", withQuery(location.pathname, p));
    if (!paused) renderAll();
  }
  typeSel.addEventListener("change", filtersChanged);
  keyIn.addEventListener("input", () => { clearTimeout(typing); typing = setTimeout(filtersChanged, 150); });

  // Pause: events keep arriving (and are kept) but are not drawn; Resume draws them all.
  pauseBtn.addEventListener("click", () => {
    paused = !paused;
    held = 0;
    pauseBtn.setAttribute("aria-pressed", String(paused));
    pauseBtn.textContent = paused ? "Resume" : "Pause";
    if (paused) counts();
    else renderAll();
  });

  // Key names for the Key column: ids alone are hard to read.
  api(`${API}/api-keys`).then((d) => {
    for (const k of (d && d.keys) || []) names.set(k.id, k.name);
    if (!paused && buffer.length) renderAll();
  }).catch(() => {});

  window.addEventListener("pagehide", () => { clearTimeout(retry); if (es) es.close(); es = null; });
  window.addEventListener("pageshow", (e) => { if (e.persisted) connect(); });
  counts();
  connect();
}

// ---- Page: Health (the status document, every 5 s while the tab is visible) ----

function pageHealth() {
  const err = $("#health-error"), overall = $("#health-overall");
  let timer = 0, busy = false;
  const kinds = { up: "ok", running: "ok", probing: "warn", down: "bad", unreachable: "bad", stopped: "bad", failed: "bad" };
  const stateBadge = (s) => (s ? badge(s, kinds[s]) : "—");
  const setOverall = (text, kind) => { overall.textContent = text; overall.className = cls("badge", kind); };

  const tierCols = [
    { cell: (t) => tierEl(t.tier, t.tier) },
    { cell: (t) => t.provider },
    { cell: (t) => stateBadge(t.state) },
    { cell: (t) => (t.available ? badge("yes", "ok") : badge("no")) },
    { cell: (t) => (t.load ? `${fmtInt(t.load.in_flight)} / ${fmtInt(t.load.capacity)}` : "—"), num: true },
    { cell: (t) => (t.load ? `${fmtInt(t.load.queued)} / ${fmtInt(t.load.max_queue)}` : "—"), num: true },
    { cell: (t) => t.detail || "", cls: "wrap" },
  ];

  function render(s) {
    put("#health-version", s.version || "—");
    put("#health-uptime", fmtDuration(s.uptime_s), s.uptime_s);
    put("#health-started", timeEl(s.started_at, false, "—"));
    put("#health-mode", s.mode || "—");

    const tiers = s.tiers || [], up = tiers.filter((t) => t.available).length;
    const used = tiers.filter((t) => t.available || t.state !== "unconfigured").length; // configured ones
    setOverall(up ? `${up} of ${used} configured tiers available` : "No tier available", up ? (up === used ? "ok" : "warn") : "bad");
    fillTable($("#tiers-table"), tiers, tierCols, { empty: "No tier reported.",
      row: (t) => ({ "data-testid": "tier-row", "data-tier": t.tier, "data-provider": t.provider, "data-state": t.state }) });

    const ledger = s.ledger || {}, backlog = s.outbox ? s.outbox.backlog : null, p = s.projection || {};
    put("#health-ledger-backend", ledger.backend || "—");
    put("#health-ledger-ends", fmtOffsets(ledger.ends));
    put("#health-ledger-appended", fmtOffsets(ledger.appended_here));
    put("#health-outbox", num(backlog) > 0 ? badge(`${fmtInt(backlog)} waiting`, "warn") : fmtInt(backlog), backlog);
    put("#health-projection-state", stateBadge(p.state));
    put("#health-projection-source", p.source || "—");
    put("#health-projection-lag", p.lag_events == null ? "—" : `${fmtInt(p.lag_events)} events`, p.lag_events);
    put("#health-projection-idle", fmtMs(p.idle_ms), p.idle_ms);
    put("#health-projection-applied", fmtOffsets(p.applied));
    const models = s.models || [];
    put("#health-models", models.length ? models.map((m) => h("li", null, m)) : h("li", { class: "muted" }, "none"));
  }

  async function tick() {
    clearTimeout(timer);
    if (busy || document.hidden) return; // resumes when the tab shows again
    busy = true;
    try {
      render(await api(`${API}/status`));
      showError(err, null);
      put("#health-updated", `Updated ${timeF.format(new Date())} · refreshes every 5 s`);
    } catch (e) {
      showError(err, e);
      setOverall("Unreachable", "bad");
    } finally {
      busy = false;
      if (!leaving) timer = setTimeout(tick, 5000);
    }
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) tick(); });
  tick();
}

// ---- Start the current page's code. ----

const PAGES = { usage: pageUsage, keys: pageKeys, key: pageKey, ledger: pageLedger, health: pageHealth };
const start = PAGES[document.body.dataset.page];
if (start) start();
})();
