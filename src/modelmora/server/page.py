"""The live status page at ``/``: one server-rendered HTML page, a little JS, no build step.
It polls ``/status`` each second (memory per device over time, resident models, leases) and
follows ``/events`` (server-sent events) for the recent-events list."""

from __future__ import annotations

import html

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>modelmora · {title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
 body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; background: #fafafa; }}
 h1 {{ font-size: 1.3rem; margin: 0 0 .2rem; }} h2 {{ font-size: 1rem; margin: 1.2rem 0 .4rem; }}
 table {{ border-collapse: collapse; min-width: 40rem; background: #fff; }}
 th, td {{ border: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }}
 th {{ background: #f0f0f0; }} .dim {{ color: #777; }}
 .bar {{ display: inline-block; height: .7rem; background: #4a7bd0; vertical-align: middle; }}
 #events li {{ font-family: ui-monospace, monospace; font-size: 12px; }}
 canvas {{ background: #fff; border: 1px solid #ddd; }}
</style></head>
<body>
<h1>modelmora</h1><div class="dim">{title} · <span id="updated">connecting…</span></div>
<h2>Memory per device</h2>
<table id="devices"><thead><tr><th>device</th><th>used by models</th><th>budget</th><th>peak</th></tr></thead><tbody></tbody></table>
<canvas id="chart" width="900" height="220"></canvas>
<h2>Resident models</h2>
<table id="models"><thead><tr><th>model</th><th>provider</th><th>state</th><th>device</th><th>leases</th><th>memory</th><th>idle</th><th>expires in</th></tr></thead><tbody></tbody></table>
<h2>Recent events</h2><ul id="events"></ul>
<script>
const token = new URLSearchParams(location.search).get("token");
const q = token ? "?token=" + encodeURIComponent(token) : "";
const auth = token ? {{headers: {{Authorization: "Bearer " + token}}}} : {{}};
const history = {{}};  // device -> [[t, used]]
const colours = ["#4a7bd0", "#d0774a", "#4ab07b", "#a04ad0", "#d0b04a"];
function size(n) {{ if (n == null) return "-"; const u = ["B","KB","MB","GB","TB"]; let i = 0;
  while (Math.abs(n) >= 1000 && i < u.length - 1) {{ n /= 1000; i++; }} return n.toFixed(i ? 1 : 0) + " " + u[i]; }}
function secs(s) {{ if (s == null) return "never"; return s < 60 ? s.toFixed(0) + "s" : (s / 60).toFixed(1) + "m"; }}
function cell(tr, text) {{ const td = document.createElement("td"); td.textContent = text; tr.appendChild(td); return td; }}
function draw() {{
  const c = document.getElementById("chart"), g = c.getContext("2d");
  g.clearRect(0, 0, c.width, c.height);
  const now = Date.now() / 1000, span = 300; let max = 1;
  for (const pts of Object.values(history)) for (const [, v] of pts) max = Math.max(max, v);
  Object.entries(history).forEach(([dev, pts], i) => {{
    g.strokeStyle = colours[i % colours.length]; g.lineWidth = 2; g.beginPath();
    pts.forEach(([t, v], j) => {{ const x = c.width - (now - t) / span * c.width, y = c.height - 14 - v / max * (c.height - 30);
      j ? g.lineTo(x, y) : g.moveTo(x, y); }});
    g.stroke(); g.fillStyle = g.strokeStyle; g.fillText(dev + " " + size(pts.length ? pts[pts.length - 1][1] : 0), 8, 14 + 14 * i);
  }});
  g.fillStyle = "#777"; g.fillText("last 5 minutes · max " + size(max), c.width - 170, c.height - 2);
}}
async function poll() {{
  try {{
    const r = await fetch("/status", auth); const s = await r.json(); const t = Date.now() / 1000;
    const dev = document.querySelector("#devices tbody"); dev.innerHTML = "";
    for (const [name, d] of Object.entries(s.devices)) {{
      const tr = dev.insertRow(); cell(tr, name);
      const used = cell(tr, size(d.used_by_modelmora) + " ");
      if (d.budget) {{ const b = document.createElement("span"); b.className = "bar";
        b.style.width = Math.min(200, 200 * d.used_by_modelmora / d.budget) + "px"; used.appendChild(b); }}
      cell(tr, d.budget == null ? "unlimited" : size(d.budget)); cell(tr, size(d.peak_by_modelmora));
      (history[name] = history[name] || []).push([t, d.used_by_modelmora]);
      history[name] = history[name].filter(([x]) => t - x < 300);
    }}
    const mt = document.querySelector("#models tbody"); mt.innerHTML = "";
    for (const m of s.models) {{ const tr = mt.insertRow(); tr.dataset.model = m.name;
      [m.name, m.provider, m.state, (m.devices || []).join(" + ") || "-", String(m.leases),
       Object.entries(m.memory).map(([d, b]) => d + " " + size(b)).join(", ") || "-",
       secs(m.idle_s), secs(m.expires_in_s)].forEach(v => cell(tr, v));
      if (m.placement) {{ const why = document.createElement("div"); why.className = "dim why";  // why it is there
        why.textContent = m.placement; tr.children[3].appendChild(why); tr.children[3].title = m.placement; }} }}
    if (!s.models.length) {{ const tr = mt.insertRow(); const td = cell(tr, "no models resident"); td.colSpan = 8; td.className = "dim"; }}
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    draw();
  }} catch (e) {{ document.getElementById("updated").textContent = "cannot reach the server: " + e; }}
}}
const events = new EventSource("/events" + q);
events.onmessage = (m) => {{ const e = JSON.parse(m.data); const li = document.createElement("li");
  li.textContent = new Date(e.at * 1000).toLocaleTimeString() + "  " + e.text;
  const ul = document.getElementById("events"); ul.prepend(li); while (ul.children.length > 50) ul.lastChild.remove(); }};
poll(); setInterval(poll, 1000);
</script></body></html>
"""


def render_page(title: str) -> str:
    return PAGE.format(title=html.escape(title))


__all__ = ["render_page"]
