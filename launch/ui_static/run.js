// Run page: poll a run folder, draw its metrics as inline SVG, browse its sampled completions.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#4f5bd5", "#e07b39", "#1f8a4c", "#c2417a", "#0e8fb3", "#8a6d1f", "#7a4fd5", "#6b7385"];

// Which metric keys go in which chart (first matching chart wins; keys are as the trainer logs them).
// Which metric keys go in which chart (first matching chart wins). Keys as trainer/rollout_side.py logs them:
// reward/<fn>/mean, reward/total/mean, accuracy, completion_length/{mean,max,min}, kl, and eval/* from evaluations.
const CHARTS = [
  { id: "rewards", title: "Reward per function (mean)", match: (k) => /^rewards?\//.test(k) && !/(std|failures)/.test(k) },
  { id: "accuracy", title: "Accuracy", match: (k) => (/accuracy/.test(k) || /pass@/.test(k)) && !/_(lo|hi)$/.test(k) },
  { id: "length", title: "Completion length (tokens)", match: (k) => /^completion_length\//.test(k) || /(^|\/)mean_length$/.test(k) },
  { id: "kl", title: "KL divergence", match: (k) => /(^|\/)kl($|_mean$)/.test(k) },
];

// Short legend labels: "reward/correctness/mean" -> "correctness".
function label(key) {
  return /^rewards?\//.test(key) ? key.replace(/^rewards?\//, "").replace(/\/mean$/, "") : key;
}

const state = {
  runDir: "",
  rows: [],
  filter: "all",
  step: "",
  timer: null,
  poll: 3000,
  lastOk: null,
  lastCompletionsKey: "",
  customKey: "",
};

// ---- charts -------------------------------------------------------------------------------------------------
function niceTicks(lo, hi, n) {
  if (!(hi > lo)) { hi = lo + 1; lo = lo - 1; }
  const span = hi - lo;
  const step0 = Math.pow(10, Math.floor(Math.log10(span / n)));
  const err = (span / n) / step0;
  const step = step0 * (err >= 7.5 ? 10 : err >= 3.5 ? 5 : err >= 1.5 ? 2 : 1);
  const start = Math.floor(lo / step) * step;
  const ticks = [];
  for (let v = start; v <= hi + step * 0.5; v += step) ticks.push(Number(v.toPrecision(12)));
  return ticks;
}

function svgEl(name, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", name);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

let tooltip = null;
function showTooltip(x, y, html) {
  if (!tooltip) {
    tooltip = document.createElement("div");
    tooltip.className = "tooltip";
    document.body.append(tooltip);
  }
  tooltip.innerHTML = html;
  tooltip.style.left = x + 14 + "px";
  tooltip.style.top = y + 14 + "px";
  tooltip.classList.remove("hidden");
}
function hideTooltip() { if (tooltip) tooltip.classList.add("hidden"); }
function esc(s) { return String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]); }

// Draw one line chart of `keys` over `rows` (each row has a `step`).
function drawChart(box, title, keys, rows) {
  box.textContent = "";
  const h = document.createElement("h3");
  h.textContent = title;
  box.append(h);
  const series = keys.map((k, i) => ({
    key: k,
    color: COLORS[i % COLORS.length],
    pts: rows.filter((r) => r[k] !== null && r[k] !== undefined && r.step !== null).map((r) => [r.step, r[k]]),
  })).filter((s) => s.pts.length);
  if (!series.length) {
    const nd = document.createElement("div");
    nd.className = "nodata";
    nd.textContent = keys.length ? "no values yet" : "not logged by this run";
    box.append(nd);
    return;
  }
  // Draw at the box's pixel width so text is never stretched.
  const W = Math.max(280, Math.round(box.clientWidth - 24)), H = 220, m = { l: 48, r: 12, t: 8, b: 24 };
  const xs = series.flatMap((s) => s.pts.map((p) => p[0]));
  const ys = series.flatMap((s) => s.pts.map((p) => p[1]));
  let x0 = Math.min(...xs), x1 = Math.max(...xs);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  let y0 = Math.min(...ys), y1 = Math.max(...ys);
  const pad = (y1 - y0) * 0.08 || Math.abs(y1) * 0.1 || 1;
  // Pad the range, but never across zero when every value is on one side of it.
  const lo = y0, hi = y1;
  y0 -= pad; y1 += pad;
  if (lo >= 0 && y0 < 0) y0 = 0;
  if (hi <= 0 && y1 > 0) y1 = 0;
  // A series that is all zeros (a run that has earned no reward yet) must still draw: both clamps above
  // would otherwise collapse the range to a point and every coordinate to NaN.
  if (!(y1 > y0)) { if (lo >= 0) y1 = y0 + pad; else y0 = y1 - pad; }
  const yt = niceTicks(y0, y1, 4).filter((t) => t >= y0 - 1e-12 && t <= y1 + 1e-12);
  const tickStep = yt.length > 1 ? yt[1] - yt[0] : 1;
  const decimals = Math.max(0, Math.min(6, -Math.floor(Math.log10(tickStep) + 1e-9)));
  const X = (v) => m.l + ((v - x0) / (x1 - x0)) * (W - m.l - m.r);
  const Y = (v) => H - m.b - ((v - y0) / (y1 - y0)) * (H - m.t - m.b);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": title });
  const grid = svgEl("g", { class: "grid" });
  const axis = svgEl("g", { class: "axis" });
  for (const t of yt) {
    grid.append(svgEl("line", { x1: m.l, x2: W - m.r, y1: Y(t), y2: Y(t) }));
    const tx = svgEl("text", { x: m.l - 6, y: Y(t) + 3, "text-anchor": "end" });
    tx.textContent = Math.abs(t) >= 1e5 ? t.toExponential(1) : t.toFixed(decimals);
    axis.append(tx);
  }
  for (const t of niceTicks(x0, x1, 6).filter((v) => v >= x0 && v <= x1 && Number.isInteger(v))) {
    const tx = svgEl("text", { x: X(t), y: H - 6, "text-anchor": "middle" });
    tx.textContent = String(t);
    axis.append(tx);
  }
  axis.append(svgEl("line", { x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b }));
  svg.append(grid, axis);
  for (const s of series) {
    const d = s.pts.map((p, i) => (i ? "L" : "M") + X(p[0]).toFixed(1) + " " + Y(p[1]).toFixed(1)).join(" ");
    svg.append(svgEl("path", { d, fill: "none", stroke: s.color, "stroke-width": 2, "vector-effect": "non-scaling-stroke", "stroke-linejoin": "round", class: "series", "data-key": s.key }));
    if (s.pts.length <= 40) {
      for (const p of s.pts) svg.append(svgEl("circle", { cx: X(p[0]), cy: Y(p[1]), r: 2.2, fill: s.color }));
    }
  }
  const hover = svgEl("g", { class: "hover" });
  const vline = svgEl("line", { y1: m.t, y2: H - m.b, visibility: "hidden" });
  hover.append(vline);
  svg.append(hover);
  svg.addEventListener("mousemove", (ev) => {
    const rect = svg.getBoundingClientRect();
    const sx = ((ev.clientX - rect.left) / rect.width) * W;
    const step = x0 + ((sx - m.l) / (W - m.l - m.r)) * (x1 - x0);
    let best = null;
    for (const v of xs) if (best === null || Math.abs(v - step) < Math.abs(best - step)) best = v;
    vline.setAttribute("x1", X(best)); vline.setAttribute("x2", X(best)); vline.setAttribute("visibility", "visible");
    const lines = series.map((s) => {
      const p = s.pts.find((q) => q[0] === best);
      return p ? `<span style="color:${s.color}">\u25A0</span> ${esc(label(s.key))}: ${fmtNum(p[1])}` : null;
    }).filter(Boolean);
    showTooltip(ev.clientX, ev.clientY, `<b>step ${best}</b><br>` + lines.join("<br>"));
  });
  svg.addEventListener("mouseleave", () => { vline.setAttribute("visibility", "hidden"); hideTooltip(); });
  box.append(svg);
  const legend = document.createElement("div");
  legend.className = "legend";
  for (const s of series) {
    const last = s.pts[s.pts.length - 1][1];
    const item = document.createElement("span");
    item.innerHTML = `<i style="background:${s.color}"></i>${esc(label(s.key))} <b>${fmtNum(last)}</b>`;
    item.title = s.key;
    legend.append(item);
  }
  box.append(legend);
}

function numericKeys(rows) {
  const keys = new Set();
  for (const r of rows) for (const [k, v] of Object.entries(r)) if (k !== "step" && typeof v === "number") keys.add(k);
  return Array.from(keys).sort();
}

function drawCharts() {
  const box = $("charts");
  const keys = numericKeys(state.rows);
  const used = new Set();
  const groups = CHARTS.map((c) => {
    const ks = keys.filter((k) => !used.has(k) && c.match(k));
    ks.forEach((k) => used.add(k));
    return { ...c, keys: ks };
  });
  // Create every box before drawing any, so each chart is measured at its final width.
  const boxFor = (id) => {
    let el = box.querySelector(`[data-chart="${id}"]`);
    if (!el) {
      el = document.createElement("div");
      el.className = "chart";
      el.dataset.chart = id;
      box.append(el);
    }
    return el;
  };
  const els = groups.map((g) => boxFor(g.id));
  const custom = boxFor("custom"); // one more chart for any other logged metric, chosen from a list
  groups.forEach((g, i) => drawChart(els[i], g.title, g.keys, state.rows));
  const others = keys.filter((k) => !used.has(k));
  if (!state.customKey || !keys.includes(state.customKey)) {
    // Truncation first: a cap that cuts most completions silently zeroes the rewards (FIELD.md).
    const preferred = ["truncated/frac", "loss", "entropy", "grad_norm"].find((k) => keys.includes(k));
    state.customKey = preferred || others[0] || keys[0] || "";
  }
  drawChart(custom, "Other metric", state.customKey ? [state.customKey] : [], state.rows);
  const sel = document.createElement("select");
  sel.id = "custom-key";
  for (const k of keys) {
    const o = document.createElement("option");
    o.value = k; o.textContent = k; o.selected = k === state.customKey;
    sel.append(o);
  }
  sel.addEventListener("change", () => { state.customKey = sel.value; drawCharts(); });
  custom.querySelector("h3").append(" ", sel);
}

// ---- completions --------------------------------------------------------------------------------------------
function promptText(row) {
  const p = row.prompt_text || row.prompt || "";
  if (Array.isArray(p)) return p.map((m) => `[${m.role}] ${m.content}`).join("\n");
  return String(p);
}

function renderCards(data) {
  const cards = $("cards");
  cards.textContent = "";
  for (const k of ["all", "correct", "incorrect"]) {
    const el = document.querySelector(`[data-count="${k}"]`);
    el.textContent = data.counts ? `(${data.counts[k]})` : "";
  }
  if (!data.rows.length) {
    const e = document.createElement("div");
    e.className = "empty";
    e.textContent = data.step === null ? "No completions logged yet." : "No completions match this filter.";
    cards.append(e);
  }
  for (const r of data.rows) {
    const card = document.createElement("div");
    card.className = "card " + (r.correct === true ? "correct" : r.correct === false ? "incorrect" : "");
    const head = document.createElement("div");
    head.className = "head";
    const badge = document.createElement("span");
    badge.className = "badge " + (r.correct === true ? "ok" : r.correct === false ? "bad" : "grey");
    badge.textContent = r.correct === true ? "correct" : r.correct === false ? "incorrect" : "unknown";
    const gold = document.createElement("span");
    gold.className = "badge grey";
    gold.textContent = "gold: " + (r.gold ?? "\u2013");
    head.append(badge, gold);
    if (r.reward !== undefined && r.reward !== null) {
      const tot = document.createElement("span");
      tot.className = "badge";
      tot.textContent = "reward " + fmtNum(Number(r.reward));
      head.append(tot);
    }
    const rw = document.createElement("span");
    rw.className = "rewards";
    for (const [k, v] of Object.entries(r.rewards || {})) {
      const c = document.createElement("span");
      c.className = "chip";
      c.textContent = `${k} ${fmtNum(Number(v))}`;
      rw.append(c);
    }
    head.append(rw);
    const extra = [];
    if (r.group !== undefined) extra.push("group " + r.group);
    if (r.num_tokens !== undefined) extra.push(r.num_tokens + " tokens");
    if (r.finish_reason) extra.push(r.finish_reason === "length" ? "truncated" : "finished");
    if (r.weight_version !== undefined) extra.push("weights v" + r.weight_version);
    if (extra.length) {
      const x = document.createElement("span");
      x.className = "hint";
      x.textContent = extra.join(" \u00b7 ");
      head.append(x);
    }
    const pr = document.createElement("details");
    pr.className = "prompt";
    const ps = document.createElement("summary");
    ps.textContent = "Prompt";
    const pre = document.createElement("pre");
    pre.textContent = promptText(r);
    pr.append(ps, pre);
    const body = document.createElement("div");
    body.className = "msg";
    renderStructured(body, String(r.completion ?? ""), { streaming: false, reasoningOpen: true });
    card.append(head, pr, body);
    cards.append(card);
  }
  $("cards-more").textContent = data.total > data.rows.length ? `showing ${data.rows.length} of ${data.total}` : "";
}

function updateSteps(summary) {
  const sel = $("step");
  const want = ["", ...summary.completion_steps.map((s) => String(s.step))];
  const have = Array.from(sel.options).map((o) => o.value);
  if (want.join(",") === have.join(",")) return;
  const cur = sel.value;
  sel.textContent = "";
  for (const v of want) {
    const o = document.createElement("option");
    o.value = v;
    const info = summary.completion_steps.find((s) => String(s.step) === v);
    o.textContent = v === "" ? "latest" : `step ${v} (${info.count})`;
    sel.append(o);
  }
  sel.value = want.includes(cur) ? cur : "";
}

// ---- polling ------------------------------------------------------------------------------------------------
async function refreshCompletions(force) {
  const q = new URLSearchParams({ run_dir: state.runDir, filter: state.filter, limit: "50" });
  if (state.step !== "") q.set("step", state.step);
  const data = await getJSON("/api/run/completions?" + q);
  const key = JSON.stringify([data.step, data.counts, state.filter]);
  if (force || key !== state.lastCompletionsKey) {
    renderCards(data);
    state.lastCompletionsKey = key;
  }
}

async function poll(force) {
  if (!state.runDir) return;
  try {
    const summary = await getJSON("/api/run?run_dir=" + encodeURIComponent(state.runDir));
    const m = await getJSON(`/api/run/metrics?run_dir=${encodeURIComponent(state.runDir)}&since=${state.rows.length}`);
    if (m.total < state.rows.length) state.rows = []; // the file was rewritten
    const grew = m.rows.length > 0;
    state.rows.push(...m.rows);
    if (grew || force) drawCharts();
    updateSteps(summary);
    await refreshCompletions(force);
    state.lastOk = Date.now();
    showError($("run-error"), summary.bad_lines ? `${summary.bad_lines} unreadable line(s) skipped` : "");
    $("live-dot").classList.add("live");
    const last = summary.last_step === null ? "no metrics yet" : `step ${summary.last_step}`;
    $("status-text").textContent = `${last} \u00b7 ${state.rows.length} metric rows \u00b7 updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    $("live-dot").classList.remove("live");
    $("status-text").textContent = "not updating";
    showError($("run-error"), e.message);
  }
}

let resizeTimer = null;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { if (state.rows.length) drawCharts(); }, 150);
});

function openRun(dir) {
  state.runDir = dir.trim();
  state.rows = [];
  state.step = "";
  state.lastCompletionsKey = "";
  $("charts").textContent = "";
  $("step").value = "";
  const url = new URL(location.href);
  url.searchParams.set("run_dir", state.runDir);
  history.replaceState(null, "", url);
  if (state.timer) clearInterval(state.timer);
  if (!state.runDir) {
    showError($("run-error"), "Give the path of a run folder (it holds metrics.jsonl and completions.jsonl).");
    return;
  }
  poll(true);
  state.timer = setInterval(() => poll(false), state.poll);
}

async function init() {
  let cfg = {};
  try {
    cfg = await getJSON("/api/config");
  } catch (e) {
    showError($("run-error"), "Cannot load the UI config: " + e.message);
  }
  state.poll = Math.max(500, (cfg.poll_interval_s || 3) * 1000);
  $("run-form").addEventListener("submit", (e) => { e.preventDefault(); openRun($("run-dir").value); });
  $("step").addEventListener("change", () => { state.step = $("step").value; refreshCompletions(true).catch((e) => showError($("run-error"), e.message)); });
  for (const b of document.querySelectorAll("#filters button")) {
    b.addEventListener("click", () => {
      state.filter = b.dataset.filter;
      for (const o of document.querySelectorAll("#filters button")) o.classList.toggle("active", o === b);
      refreshCompletions(true).catch((e) => showError($("run-error"), e.message));
    });
  }
  const fromUrl = new URLSearchParams(location.search).get("run_dir");
  const dir = fromUrl || cfg.run_dir || "";
  $("run-dir").value = dir;
  if (dir) openRun(dir);
}

init();
