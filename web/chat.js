// The chat page: keeps the conversation in the browser and streams each reply from /v1/chat/completions (SSE).
"use strict";

const $ = (id) => document.getElementById(id);
const history = [];          // [{role, content}] sent with every request: the server keeps no state
let historyStart = 0;        // turns before this index were dropped to fit the model's context
let modelName = null;
let maxModelLen = null;      // the model's context in tokens (GET /v1/models): max_tokens never asks for more
let controller = null;       // AbortController of the reply being streamed

const SETTINGS = ["temperature", "top_p", "max_tokens", "system", "api-key"];
for (const id of SETTINGS) {
  const saved = localStorage.getItem("chat." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("input", () => {
    localStorage.setItem("chat." + id, $(id).value);
    showSliderValues();
  });
}
function showSliderValues() {
  $("temperature-value").textContent = $("temperature").value;
  $("top_p-value").textContent = $("top_p").value;
}
showSliderValues();

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text) { $("status").textContent = text; }

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    modelName = body.data[0].id;
    maxModelLen = body.data[0].max_model_len || null;
    if (maxModelLen) $("max_tokens").max = String(maxModelLen - 1);
    $("model-name").textContent = modelName;
    setStatus("");
  } catch (e) {
    setStatus("无法获取模型 (model list failed): " + e.message);
  }
}

function addBubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

// Parse server-sent events from a fetch body; calls onData(jsonText) for each "data:" line.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder("utf-8");   // stream: true keeps a split UTF-8 character for the next chunk
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) {
          if (onData(line.slice(6)) === false) return;
        }
      }
    }
  }
}

// The request body for the conversation from turn `start` on. max_tokens: the setting if one is given (never more
// than the context), else left out, so the server gives the reply whatever room the conversation leaves.
function requestBody(start, withMaxTokens) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...history.slice(start));
  const body = {
    model: modelName, messages, stream: true,
    temperature: parseFloat($("temperature").value),
    top_p: parseFloat($("top_p").value),
  };
  const wanted = parseInt($("max_tokens").value, 10);
  if (withMaxTokens && wanted > 0) body.max_tokens = maxModelLen ? Math.min(wanted, maxModelLen - 1) : wanted;
  return body;
}

// POST the conversation; when it does not fit the context, first let the server fit the reply (no max_tokens),
// then drop the oldest exchanges, until it fits or only the new question is left.
async function post() {
  let withMaxTokens = true;
  for (;;) {
    const body = requestBody(historyStart, withMaxTokens);
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (r.ok) return r;
    const err = await r.json().catch(() => ({}));
    const code = err.error ? err.error.code : null;
    if (code === "context_length_exceeded" && withMaxTokens && body.max_tokens) {
      withMaxTokens = false;
    } else if (code === "context_length_exceeded" && historyStart + 2 < history.length) {
      historyStart += 2;   // one user + assistant exchange
      setStatus("较早的对话已省略以适应上下文 (earlier turns dropped to fit the context)");
    } else {
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
  }
}

async function send(text) {
  if (!modelName) await loadModel();
  if (!modelName) return;
  history.push({ role: "user", content: text });
  const question = addBubble("user", text);
  const bubble = addBubble("assistant streaming", "");
  let reply = "", failed = false;
  controller = new AbortController();
  $("send").disabled = true; $("stop").disabled = false;
  try {
    const r = await post();
    await readEvents(r, (data) => {
      if (data === "[DONE]") return false;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices.length ? chunk.choices[0].delta : {};
      if (delta.content) {
        reply += delta.content;
        bubble.textContent = reply;
        bubble.scrollIntoView({ block: "end" });
      }
    });
  } catch (e) {
    if (e.name !== "AbortError") {
      failed = true;
      bubble.classList.add("error");
      bubble.textContent = reply + "\n[错误 error: " + e.message + "]";
    }
  } finally {
    bubble.classList.remove("streaming");
    if (failed || !reply) {   // a failed (or empty) turn is not sent again: the next question follows the last good one
      history.pop();
      question.classList.add("failed");
      if (historyStart > history.length) historyStart = history.length;
    } else {
      history.push({ role: "assistant", content: reply });
    }
    bubble.dataset.done = "1";
    controller = null;
    $("send").disabled = false; $("stop").disabled = true;
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {   // isComposing: an IME is still picking 汉字
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  history.length = 0;
  historyStart = 0;
  $("messages").innerHTML = "";
});
loadModel();
