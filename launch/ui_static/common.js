// Shared by both pages: render a completion with its reasoning dimmed/collapsible and its answer bold,
// and small fetch helpers that turn any failure into a readable message.
"use strict";

// Split a (possibly still streaming) completion into parts: reasoning, answer, plain text.
// `startInReasoning` handles prompts that already opened the reasoning block.
function parseStructured(text, startInReasoning) {
  const parts = [];
  const re = /<(\/?)(reasoning|think|answer)>/g;
  let state = startInReasoning ? "reasoning" : "plain";
  let last = 0;
  let m;
  const push = (kind, s, closed) => {
    if (kind === "plain" && !s.trim()) return;
    parts.push({ kind, text: s, closed });
  };
  while ((m = re.exec(text)) !== null) {
    const chunk = text.slice(last, m.index);
    const closing = m[1] === "/";
    const tag = m[2] === "answer" ? "answer" : "reasoning";
    if (!closing) {
      push(state, chunk, state === "plain");
      state = tag;
    } else {
      push(state, chunk, true);
      state = "plain";
    }
    last = re.lastIndex;
  }
  push(state, text.slice(last), state === "plain");
  return parts;
}

// Render into `el`; `streaming` keeps an unclosed reasoning block open and shows a cursor.
function renderStructured(el, text, opts) {
  opts = opts || {};
  // Keep the user's open/closed choice of reasoning blocks across re-renders while streaming.
  const prevOpen = Array.from(el.querySelectorAll("details.reasoning")).map((d) => d.open);
  el.textContent = "";
  const parts = parseStructured(text, !!opts.startInReasoning);
  let ri = 0;
  for (const p of parts) {
    if (p.kind === "reasoning") {
      const d = document.createElement("details");
      d.className = "reasoning";
      const defaultOpen = opts.streaming ? true : !!opts.reasoningOpen;
      d.open = ri < prevOpen.length ? prevOpen[ri] : defaultOpen;
      const s = document.createElement("summary");
      s.textContent = p.closed ? "Reasoning" : "Reasoning\u2026";
      const body = document.createElement("div");
      body.className = "reasoning-text";
      body.textContent = p.text.trim();
      d.append(s, body);
      el.append(d);
      ri += 1;
    } else if (p.kind === "answer") {
      const a = document.createElement("div");
      a.className = "answer";
      a.textContent = p.text.trim();
      el.append(a);
    } else {
      const t = document.createElement("div");
      t.className = "plain";
      t.textContent = p.text.trim();
      el.append(t);
    }
  }
  if (opts.streaming) {
    const c = document.createElement("span");
    c.className = "cursor";
    el.append(c);
  }
}

async function getJSON(url) {
  let r;
  try {
    r = await fetch(url, { cache: "no-store" });
  } catch (e) {
    throw new Error("the UI server is not reachable (" + e.message + ")");
  }
  let body = null;
  try {
    body = await r.json();
  } catch (e) {
    body = null;
  }
  if (!r.ok) {
    const detail = body && (body.error || (body.detail && JSON.stringify(body.detail)));
    throw new Error(detail || "HTTP " + r.status);
  }
  return body;
}

function showError(el, msg) {
  if (!msg) {
    el.classList.add("hidden");
    el.textContent = "";
    return;
  }
  el.textContent = msg;
  el.classList.remove("hidden");
}

function fmtNum(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "\u2013";
  const a = Math.abs(v);
  if (a !== 0 && (a >= 1e5 || a < 1e-3)) return v.toExponential(2);
  if (Number.isInteger(v)) return String(v);
  return v.toFixed(a >= 100 ? 1 : 3);
}
