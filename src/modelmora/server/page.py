"""The status page at ``/``: a control panel in one server-rendered HTML page with a little
plain JS and no build step.

Each second it reads ``/status`` (resident models, memory per device, failures, problems),
``/models`` (every registered model) and ``/health`` (problems, and outages where the
server reports them), and it follows ``/events?requests=true`` (server-sent events): the
recent lifecycle events and proxied requests, which the server keeps in bounded rings
(:mod:`modelmora.server.recent`) and replays on connect, so a reload loses none of them.

What it shows: a banner per problem; per device a track as wide as its budget with one
segment per model's bytes (reservations of loads under way hatched, after the resident
ones) and a chart of the last five minutes scaled to the budget, with the budget line; one
row per registered model with its state (available, queued with the number of callers
waiting, loading, ready, sleeping, failed with the reason), leases, device and memory, and
Load / Unload / Pin buttons.  The buttons call the REST API with the page's token (from
``?token=``), under the same rules as any other client; an unload refused because the
model is leased asks before forcing it.  When the server cannot be reached the page greys
out what it shows (``body.stale``) and says since when.
"""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelmora · __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }
 h1 { font-size: 1.3rem; margin: 0 0 .2rem; display: inline; } h2 { font-size: 1rem; margin: 1.2rem 0 .4rem; }
 table { border-collapse: collapse; min-width: 40rem; background: #fff; }
 th, td { border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; vertical-align: top; }
 th { background: #f0f0f0; } .dim { color: #777; } .num { text-align: right; font-variant-numeric: tabular-nums; }
 #health { font-weight: 600; } #health.ok { color: #2a7a3a; } #health.bad { color: #b02a2a; }
 .banner { background: #fde8e8; border: 1px solid #e0a0a0; color: #7a1a1a; padding: .4rem .7rem; margin: .4rem 0; border-radius: 4px; }
 .banner b { font-family: ui-monospace, monospace; }
 #toast { min-height: 1.2rem; margin: .4rem 0; color: #444; font-style: italic; }
 .device { margin-bottom: .9rem; } .device .head { margin-bottom: .2rem; }
 .track { position: relative; width: 720px; height: 26px; background: #eef0f3; border: 1px solid #bbb;
          display: flex; overflow: hidden; }
 .seg { height: 100%; box-sizing: border-box; border-right: 1px solid #fff; color: #fff; font-size: 11px;
        line-height: 26px; padding-left: 4px; white-space: nowrap; overflow: hidden; }
 .seg.reserved { color: #222; border: 1px dashed #555;
   background-image: repeating-linear-gradient(45deg, rgba(255,255,255,.7) 0 4px, transparent 4px 8px); }
 .over { position: absolute; right: 0; top: 0; bottom: 0; width: 4px; background: #c03030; }
 canvas.chart { display: block; background: #fff; border: 1px solid #ddd; margin-top: .3rem; }
 .state { font-weight: 600; } .s-ready { color: #2a7a3a; } .s-failed { color: #b02a2a; }
 .s-loading, .s-waking, .s-queued { color: #a06a00; } .s-sleeping, .s-parking { color: #4a60a0; }
 .why { display: block; font-size: 12px; color: #666; max-width: 26rem; }
 .queued { color: #a06a00; font-weight: 600; }
 button { font: inherit; font-size: 12px; padding: .1rem .5rem; margin-right: .2rem; }
 #events li { font-family: ui-monospace, monospace; font-size: 12px; }
 #requests td { font-size: 12px; } .bad-status { color: #b02a2a; font-weight: 600; }
 body.stale #devices, body.stale #models, body.stale #requests, body.stale #events { opacity: .45; filter: grayscale(1); }
 body.stale #health { color: #b02a2a; }
</style></head>
<body>
<header><h1>modelmora</h1> <span class="dim">__TITLE__</span> · <span id="health">connecting…</span>
 <span class="dim" id="updated"></span></header>
<div id="banners"></div><div id="toast"></div>
<main>
<h2>Memory per device</h2><div id="devices"></div>
<h2>Models</h2>
<table id="models"><thead><tr><th>model</th><th>provider · target</th><th>state</th><th>waiting</th>
 <th>leases</th><th>device · memory</th><th>idle · expires in</th><th>actions</th></tr></thead><tbody></tbody></table>
<h2>Recent requests</h2>
<table id="requests"><thead><tr><th>ended</th><th>model</th><th>route</th><th>status</th><th>waited for load</th>
 <th>duration</th></tr></thead><tbody></tbody></table>
<h2>Recent events</h2><ul id="events"></ul>
</main>
<script>
"use strict";
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const headers = token ? {Authorization: "Bearer " + token} : {};
const deviceColours = ["#4a7bd0", "#d0774a", "#4ab07b", "#a04ad0", "#d0b04a"];
const modelColours = ["#3b6fb6", "#2f9e6e", "#8e5cc4", "#c2a13a", "#3aa5b8", "#b8577a", "#6b8e23", "#7f7f7f",
                      "#5c6bc0", "#00897b"];
const BUDGET_LINE = "#c03030", SPAN = 300, KEEP = 50;
const history = {};      // device -> [[t, used]]
const rows = {};         // model -> its <tr>
const loadingSince = {}; // model -> when this page first saw it loading (ms)
let state = {status: null, models: []}, lastGood = null, busy = new Set();

function size(n) { if (n == null) return "-"; const u = ["B","KB","MB","GB","TB"]; let i = 0;
  while (Math.abs(n) >= 1000 && i < u.length - 1) { n /= 1000; i++; } return n.toFixed(i ? 1 : 0) + " " + u[i]; }
function secs(s) { if (s == null) return "never"; if (s < 1) return (1000 * s).toFixed(0) + " ms";
  return s < 60 ? s.toFixed(s < 10 ? 1 : 0) + " s" : (s / 60).toFixed(1) + " min"; }
function clock(t) { return new Date(t * 1000).toLocaleTimeString(); }
function el(tag, cls, text) { const e = document.createElement(tag); if (cls) e.className = cls;
  if (text != null) e.textContent = text; return e; }
function colourOf(name) { let h = 0; for (const ch of name) h = (h * 31 + ch.charCodeAt(0)) >>> 0;
  return modelColours[h % modelColours.length]; }
function toast(text) { document.getElementById("toast").textContent = text; }

async function getJSON(path) { const r = await fetch(path, {headers}); return r.json(); }
async function post(path, body) {
  return fetch(path, {method: "POST", headers: {...headers, "Content-Type": "application/json"},
                      body: JSON.stringify(body || {})});
}
async function why(r) { try { const b = await r.json(); return (b.error && b.error.message) || JSON.stringify(b); }
  catch (e) { return "HTTP " + r.status; } }

async function act(name, action) {
  const path = "/models/" + encodeURI(name) + "/";
  busy.add(name); render();
  try {
    let r;
    if (action === "load") { toast("loading " + name + " …"); r = await post(path + "load"); }
    else if (action === "pin") r = pinned(name) ? await post(path + "unpin") : await post(path + "load", {pin: true});
    else {
      r = await post(path + "unload", {force: false});
      if (r.status === 409) {
        const reason = await why(r);
        if (!confirm(name + " has leases (" + reason + ").\\n\\nForce the unload? It closes the holders' handles.")) {
          toast(name + " kept: it is leased"); return; }
        r = await post(path + "unload", {force: true});
      }
    }
    toast(r.ok ? action + " " + name + ": done" : action + " " + name + " refused (" + r.status + "): " + await why(r));
  } catch (e) { toast(action + " " + name + " failed: " + e); }
  finally { busy.delete(name); await poll(); }
}

function resident(name) { return state.status ? state.status.models.find(m => m.name === name) : undefined; }
function pinned(name) { const m = resident(name); if (m) return m.pinned;
  const r = state.models.find(m => m.name === name); return !!(r && r.pinned); }

function modelState(name, m, failure) {
  if (m) {
    const st = m.state === "waiting" ? "queued" : m.state;
    let note = "";
    if (st === "loading" || st === "waking") {
      loadingSince[name] = loadingSince[name] || Date.now();
      note = m.progress != null ? Math.round(100 * m.progress) + " %" : "for " + secs((Date.now() - loadingSince[name]) / 1000);
      if (m.eta_s != null) note += ", about " + secs(m.eta_s) + " left";
    } else delete loadingSince[name];
    if (failure && st !== "ready") note = (note ? note + " · " : "") + "last failure: " + failure.error;
    return [st, note];
  }
  delete loadingSince[name];
  if (failure) return ["failed", failure.error + (failure.retry_in_s > 0 ? " · retried in " + secs(failure.retry_in_s) : "")
                                 + " (" + failure.failures + " in a row)"];
  return ["available", ""];
}

function renderModels() {
  const s = state.status, tbody = document.querySelector("#models tbody");
  const names = state.models.map(m => m.name);
  for (const m of s.models) if (!names.includes(m.name)) names.push(m.name);  // adopted, unregistered
  for (const name of Object.keys(rows)) if (!names.includes(name)) { rows[name].remove(); delete rows[name]; }
  names.forEach((name, index) => {
    let tr = rows[name];
    if (!tr) {
      tr = rows[name] = tbody.insertRow(); tr.dataset.model = name;
      for (let i = 0; i < 8; i++) tr.insertCell();
      tr.cells[0].textContent = name;
      tr.cells[4].className = "leases num";
      for (const [action, label] of [["load", "Load"], ["unload", "Unload"], ["pin", "Pin"]]) {
        const b = el("button", null, label); b.dataset.action = action; b.onclick = () => act(name, action);
        tr.cells[7].appendChild(b);
      }
    }
    if (tbody.children[index] !== tr) tbody.insertBefore(tr, tbody.children[index] || null);  // registry order
    const reg = state.models.find(r => r.name === name), m = resident(name), failure = s.failures[name];
    tr.cells[1].textContent = (m || reg).provider + " · " + (m || reg).target;
    const [st, note] = modelState(name, m, failure);
    tr.cells[2].replaceChildren(el("span", "state s-" + st, st), ...(note ? [el("span", "why", note)] : []));
    const waiting = m ? m.waiting || 0 : 0;
    tr.cells[3].replaceChildren(el("span", "queued", waiting ? waiting + " waiting" : ""));
    tr.cells[4].textContent = m ? String(m.leases - waiting) : "";
    const mem = m ? m.memory : {}, est = reg ? reg.memory : {};
    tr.cells[5].replaceChildren(Object.keys(mem).length
      ? document.createTextNode(Object.entries(mem).map(([d, b]) => d + " " + size(b)).join(", "))
      : el("span", "dim", Object.entries(est).map(([d, b]) => d + " ~" + size(b)).join(", ") || "-"));
    if (m && m.placement) tr.cells[5].append(el("span", "why placement", m.placement));  // where, and why there
    tr.cells[6].textContent = m && (st === "ready" || st === "sleeping")
      ? secs(m.idle_s) + " · " + (m.pinned ? "pinned" : secs(m.expires_in_s)) : "";
    const [load, unload, pin] = tr.cells[7].children, inFlight = busy.has(name);
    load.disabled = inFlight || (!!m && st !== "sleeping");
    unload.disabled = inFlight || !m;
    pin.disabled = inFlight; pin.textContent = pinned(name) ? "Unpin" : "Pin";
  });
}

function renderDevices() {
  const s = state.status, box = document.getElementById("devices");
  Object.entries(s.devices).forEach(([dev, d], i) => {
    let div = box.querySelector(`.device[data-device="${CSS.escape(dev)}"]`);
    if (!div) {
      div = el("div", "device"); div.dataset.device = dev;
      div.append(el("div", "head"), el("div", "track"));
      const c = el("canvas", "chart"); c.width = 720; c.height = 110; c.dataset.device = dev; div.append(c);
      box.appendChild(div);
    }
    const scale = d.budget || Math.max(d.observed ? d.observed.total : 0, d.used_by_modelmora, 1);
    const held = [], reserved = [];
    for (const m of s.models) { const b = m.memory[dev]; if (!b) continue;
      (m.state === "loading" || m.state === "waking" ? reserved : held).push([m.name, b, m.state]); }
    const sum = a => a.reduce((t, [, b]) => t + b, 0);
    const head = [dev + ": " + size(sum(held)) + " held of " + (d.budget ? size(d.budget) + " budget" : "no budget (track: the device's total, " + size(scale) + ")")];
    if (reserved.length) head.push(size(sum(reserved)) + " reserved for loads under way");
    head.push("peak " + size(d.peak_by_modelmora));
    if (d.observed) head.push("device: " + size(d.observed.used) + " used of " + size(d.observed.total) + " (" + d.observed.source + ")");
    div.querySelector(".head").textContent = head.join(" · ");
    const track = div.querySelector(".track"); track.replaceChildren();
    for (const [name, b, st] of [...held, ...reserved]) {
      const r = st === "loading" || st === "waking", seg = el("div", "seg" + (r ? " reserved" : ""));
      seg.dataset.model = name; seg.style.width = (100 * b / scale) + "%"; seg.style.flex = "none";
      seg.style.backgroundColor = r ? "#f3e3c0" : colourOf(name);
      seg.title = name + " " + size(b) + (r ? " reserved (" + st + ")" : " " + st);
      seg.textContent = name + " " + size(b); track.appendChild(seg);
    }
    if (sum(held) + sum(reserved) > scale) track.appendChild(el("div", "over"));
    (history[dev] = history[dev] || []).push([Date.now() / 1000, d.used_by_modelmora]);
    history[dev] = history[dev].filter(([t]) => Date.now() / 1000 - t < SPAN);
    draw(div.querySelector("canvas"), dev, d, deviceColours[i % deviceColours.length]);
  });
}

function draw(c, dev, d, colour) {
  // scaled to the budget (with a margin above it), never to the highest use seen; a use
  // above the budget stretches it so the line stays on the chart
  const pts = history[dev], g = c.getContext("2d"), top = 6, bottom = 14, h = c.height - top - bottom;
  const most = Math.max(0, ...pts.map(([, v]) => v));
  const scale = Math.max(d.budget ? d.budget * 1.1 : Math.max(d.observed ? d.observed.total : 0, 1), most * 1.05);
  c.dataset.scale = String(scale); c.dataset.points = String(pts.length);
  const y = v => top + h - v / scale * h, now = Date.now() / 1000;
  g.clearRect(0, 0, c.width, c.height);
  if (d.budget) {
    g.strokeStyle = BUDGET_LINE; g.lineWidth = 1; g.setLineDash([6, 4]); g.beginPath();
    g.moveTo(0, Math.round(y(d.budget)) + .5); g.lineTo(c.width, Math.round(y(d.budget)) + .5); g.stroke(); g.setLineDash([]);
  }
  if (pts.length) {
    const x = t => c.width - (now - t) / SPAN * c.width;
    g.fillStyle = "rgba(120,120,120,.12)"; g.beginPath(); g.moveTo(x(pts[0][0]), y(0));
    pts.forEach(([t, v]) => g.lineTo(x(t), y(v))); g.lineTo(x(pts[pts.length - 1][0]), y(0)); g.fill();
    g.strokeStyle = colour; g.lineWidth = 2; g.beginPath();
    pts.forEach(([t, v], j) => j ? g.lineTo(x(t), y(v)) : g.moveTo(x(t), y(v))); g.stroke();
  }
  g.fillStyle = "#777"; g.font = "11px system-ui, sans-serif";
  g.fillText(dev + (d.budget ? " · budget " + size(d.budget) + " (dashed)" : " · no budget") + " · now "
             + size(d.used_by_modelmora), 6, c.height - 3);
  g.fillText("last 5 minutes", c.width - 80, c.height - 3);
}

function renderBanners(health) {
  const box = document.getElementById("banners"); box.replaceChildren();
  const problems = {...(state.status.problems || {}), ...((health && health.problems) || {})};
  const outages = (health && health.outages) || {};
  for (const provider of Object.keys(outages)) delete problems["observe:" + provider];  // one banner each
  for (const [component, error] of Object.entries(problems)) {
    const b = el("div", "banner"); b.append(el("b", null, component), document.createTextNode(": " + error));
    box.appendChild(b);
  }
  for (const [provider, o] of Object.entries(outages)) {
    const b = el("div", "banner");
    b.append(el("b", null, provider), document.createTextNode(" unreachable since " + o.since + ": " + o.error
      + (o.retry_in_s != null ? " (asked again in " + secs(o.retry_in_s) + ")" : "")));
    box.appendChild(b);
  }
  const bad = box.children.length, hs = document.getElementById("health");
  hs.textContent = bad ? "degraded (" + bad + " problem" + (bad > 1 ? "s" : "") + ")" : "ok"; hs.className = bad ? "bad" : "ok";
}

function render() { if (state.status) { renderModels(); renderDevices(); } }

async function poll() {
  try {
    const [status, models, health] = await Promise.all([getJSON("/status"), getJSON("/models"), getJSON("/health")]);
    if (!status.devices) throw new Error((status.error && status.error.message) || "unexpected answer");
    state = {status, models}; lastGood = Date.now();
    document.body.classList.remove("stale");
    render(); renderBanners(health);
    document.getElementById("updated").textContent = "· updated " + new Date().toLocaleTimeString();
  } catch (e) { stale("" + e); }
}
function stale(reason) {
  document.body.classList.add("stale");
  const hs = document.getElementById("health"); hs.className = "bad";
  hs.textContent = "cannot reach the server" + (lastGood ? "; showing what it said at " + new Date(lastGood).toLocaleTimeString() : "");
  document.getElementById("updated").textContent = "· " + reason;
}

function addEvent(e) {
  const ul = document.getElementById("events"), li = el("li", null, clock(e.at) + "  " + e.text);
  ul.prepend(li); while (ul.children.length > KEEP) ul.lastChild.remove();
}
function addRequest(r) {
  const tbody = document.querySelector("#requests tbody"), tr = document.createElement("tr");
  tr.dataset.model = r.model;
  const cells = [clock(r.at), r.model, r.method + " " + r.route, r.status ? String(r.status) : "- (client left)",
                 r.waited_s == null ? "" : "waited " + secs(r.waited_s), secs(r.duration_s)];
  cells.forEach((v, i) => { const td = tr.insertCell(); td.textContent = v; if (i >= 4) td.className = "num"; });
  if (!r.status || r.status >= 400) tr.cells[3].className = "bad-status";
  tbody.prepend(tr); while (tbody.children.length > KEEP) tbody.lastChild.remove();
}
let events = null;
function follow() {
  events = new EventSource("/events" + (q ? q + "&" : "?") + "requests=true");
  // on each (re)connect the server replays its rings: start from empty lists so nothing doubles
  events.onopen = () => { document.getElementById("events").replaceChildren();
                          document.querySelector("#requests tbody").replaceChildren(); };
  events.onmessage = (m) => { const e = JSON.parse(m.data); (e.kind === "Request" ? addRequest : addEvent)(e); };
  events.onerror = () => { events.close(); setTimeout(follow, 2000); };  // poll() marks the page stale
}
follow(); poll(); setInterval(poll, 1000);
</script></body></html>
"""


def render_page(title: str) -> str:
    """The page's HTML, with ``title`` (escaped) in its heading."""
    return PAGE.replace("__TITLE__", html.escape(title))


__all__ = ["render_page"]
