// Chat page: one question to one or two rollout servers, answers streamed side by side.
"use strict";

const $ = (id) => document.getElementById(id);
let systemPrompts = {};

function columnUrl(col) {
  return $("url-" + col).value.trim().replace(/\/+$/, "");
}

async function checkServer(col) {
  const url = columnUrl(col);
  const label = $("model-" + col);
  label.classList.remove("bad");
  if (!url) {
    label.textContent = col === "a" ? "no server URL" : "off";
    return false;
  }
  label.textContent = "checking\u2026";
  try {
    const info = await getJSON("/api/models?server_url=" + encodeURIComponent(url));
    label.textContent = (info.models && info.models[0]) || url;
    label.title = url;
    return true;
  } catch (e) {
    label.textContent = "unreachable";
    label.classList.add("bad");
    label.title = e.message;
    return false;
  }
}

async function checkServers() {
  showError($("page-error"), "");
  const [a, b] = await Promise.all([checkServer("a"), checkServer("b")]);
  const problems = [];
  if (!a) problems.push("Model A: " + ($("model-a").title || "give the URL of a rollout server"));
  if (columnUrl("b") && !b) problems.push("Model B: " + $("model-b").title);
  showError($("page-error"), problems.join("\n"));
}

function messagesFor(question) {
  const fmt = $("format").value;
  const msgs = [];
  if (fmt && systemPrompts[fmt]) msgs.push({ role: "system", content: systemPrompts[fmt] });
  msgs.push({ role: "user", content: question });
  return msgs;
}

function addBubble(transcript, cls) {
  const empty = transcript.querySelector(".empty");
  if (empty) empty.remove();
  const b = document.createElement("div");
  b.className = "bubble " + cls;
  transcript.append(b);
  return b;
}

// Read the proxied server-sent events; returns when the stream ends.
async function streamAnswer(col, question) {
  const transcript = $("transcript-" + col);
  addBubble(transcript, "user").textContent = question;
  const bubble = addBubble(transcript, "assistant");
  const body = document.createElement("div");
  body.className = "msg";
  const meta = document.createElement("div");
  meta.className = "meta";
  bubble.append(body, meta);
  let text = "";
  let finish = null;
  let error = null;
  const started = performance.now();
  renderStructured(body, "", { streaming: true });
  transcript.scrollTop = transcript.scrollHeight;
  try {
    const r = await fetch("/api/chat", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        server_url: columnUrl(col),
        messages: messagesFor(question),
        max_tokens: Number($("max-tokens").value) || 512,
        temperature: Number($("temperature").value) || 0,
      }),
    });
    if (!r.ok) {
      let detail = "HTTP " + r.status;
      try {
        const j = await r.json();
        detail = j.error || JSON.stringify(j.detail || j);
      } catch (e) { /* keep the status */ }
      throw new Error(detail);
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    let done = false;
    while (!done) {
      const chunk = await reader.read();
      if (chunk.done) break;
      buf += decoder.decode(chunk.value, { stream: true });
      let sep;
      while ((sep = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, sep);
        buf = buf.slice(sep + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") { done = true; break; }
          let obj;
          try { obj = JSON.parse(data); } catch (e) { continue; }
          if (obj.error) { error = typeof obj.error === "string" ? obj.error : (obj.error.message || JSON.stringify(obj.error)); done = true; break; }
          const choice = (obj.choices || [])[0] || {};
          const delta = (choice.delta && choice.delta.content) || choice.text || "";
          text += delta;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
      }
      renderStructured(body, text, { streaming: true });
      transcript.scrollTop = transcript.scrollHeight;
    }
  } catch (e) {
    error = e.message;
  }
  renderStructured(body, text, { streaming: false, reasoningOpen: true });
  const secs = ((performance.now() - started) / 1000).toFixed(1);
  meta.textContent = (finish === "length" ? "stopped at the token cap \u00b7 " : "") + secs + " s";
  if (error) {
    const err = document.createElement("div");
    err.className = "error";
    err.textContent = error;
    bubble.append(err);
  } else if (!text) {
    meta.textContent = "(empty answer) \u00b7 " + secs + " s";
  }
  transcript.scrollTop = transcript.scrollHeight;
}

async function send(ev) {
  ev.preventDefault();
  const question = $("question").value.trim();
  if (!question) return;
  const cols = ["a", "b"].filter((c) => columnUrl(c));
  if (!cols.length) {
    showError($("page-error"), "Give the URL of at least one rollout server (Model A).");
    return;
  }
  showError($("page-error"), "");
  $("send").disabled = true;
  $("question").value = "";
  try {
    await Promise.all(cols.map((c) => streamAnswer(c, question)));
  } finally {
    $("send").disabled = false;
    $("question").focus();
  }
}

function updateSystemHint() {
  const fmt = $("format").value;
  const text = fmt && systemPrompts[fmt] ? systemPrompts[fmt].trim() : "";
  $("system-hint").textContent = text || "(none: the question is sent alone)";
  $("system-summary").textContent = text ? `System prompt (${fmt}, sent before each question)` : "No system prompt";
}

async function init() {
  try {
    const cfg = await getJSON("/api/config");
    systemPrompts = cfg.system_prompts || {};
    const urls = cfg.server_urls || [];
    if (urls[0]) $("url-a").value = urls[0];
    if (urls[1]) $("url-b").value = urls[1];
    if (cfg.run_dir) $("run-link").href = "run.html?run_dir=" + encodeURIComponent(cfg.run_dir);
  } catch (e) {
    showError($("page-error"), "Cannot load the UI config: " + e.message);
  }
  const sel = $("format");
  for (const name of Object.keys(systemPrompts)) {
    const o = document.createElement("option");
    o.value = name;
    o.textContent = name;
    sel.append(o);
  }
  const none = document.createElement("option");
  none.value = "";
  none.textContent = "none";
  sel.append(none);
  sel.addEventListener("change", updateSystemHint);
  updateSystemHint();
  $("composer").addEventListener("submit", send);
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) send(e);
  });
  $("connect").addEventListener("click", checkServers);
  for (const c of ["a", "b"]) $("url-" + c).addEventListener("change", () => checkServer(c));
  if (columnUrl("a") || columnUrl("b")) checkServers();
}

init();
