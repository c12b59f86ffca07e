// slmforge dashboard: charts, live runs, the playground. Plain JavaScript, no build step.
"use strict";

const apiKey = () => (document.querySelector('meta[name="slmforge-key"]') || {}).content || "";

function authHeaders(extra) {
  const headers = Object.assign({}, extra || {});
  if (apiKey()) headers["Authorization"] = "Bearer " + apiKey();
  return headers;
}

// Interactive charts (zoom, hover): each .plot carries its Plotly figure as JSON.
document.addEventListener("DOMContentLoaded", () => {
  document.querySelectorAll(".plot[data-figure]").forEach((el) => {
    if (typeof Plotly === "undefined") return;
    const fig = JSON.parse(el.dataset.figure);
    Plotly.newPlot(el, fig.data, fig.layout, {responsive: true, displaylogo: false});
  });
});

// A run's page: progress bars and log from server-sent events until the run ends.
function followJob(url, status) {
  if (status !== "running") return;
  const bars = document.getElementById("bars");
  const log = document.getElementById("log");
  const source = new EventSource(url);
  source.addEventListener("progress", (e) => {
    const p = JSON.parse(e.data);
    let bar = Array.from(bars.querySelectorAll(".bar")).find((b) => b.dataset.task === p.task);
    if (!bar) {
      bar = document.createElement("div");
      bar.className = "bar";
      bar.dataset.task = p.task;
      const label = document.createElement("label");
      label.append(document.createTextNode(p.task + " "));
      const count = document.createElement("span"); count.className = "count";
      const info = document.createElement("span"); info.className = "info muted";
      const progress = document.createElement("progress");
      label.append(count, document.createTextNode(" "), info, progress);
      bar.append(label);
      bars.append(bar);
    }
    const progress = bar.querySelector("progress");
    progress.max = p.total || 1;
    progress.value = p.completed;
    bar.querySelector(".count").textContent = Math.floor(p.completed) + "/" + (p.total ? Math.floor(p.total) : "?");
    bar.querySelector(".info").textContent = p.info || "";
    bar.classList.toggle("done", !!p.done);
  });
  source.addEventListener("log", (e) => {
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 4;
    log.textContent += JSON.parse(e.data);
    if (atEnd) log.scrollTop = log.scrollHeight;
  });
  source.addEventListener("done", (e) => {
    source.close();
    const d = JSON.parse(e.data);
    const badge = document.getElementById("status");
    badge.textContent = d.status;
    badge.className = "badge " + d.status;
    document.getElementById("cancel-form").hidden = true;
    const link = document.getElementById("result-link");
    if (link && d.status === "succeeded" && d.result) link.hidden = false;
  });
}

// The playground: chat with a served model over the server's own OpenAI-compatible API.
async function startPlayground() {
  const $ = (id) => document.getElementById(id);
  const toolSpecs = JSON.parse($("tool-specs").textContent);
  let models = [];
  let history = [];
  try {
    const res = await fetch("/v1/models", {headers: authHeaders()});
    models = (await res.json()).data.filter((m) => m.kind !== "embed");
  } catch (err) {
    models = [];
  }
  $("no-models").hidden = models.length > 0;
  $("send").disabled = models.length === 0;
  for (const m of models) $("model").append(new Option(m.id + (m.adapter ? " (adapter " + m.adapter + ")" : "") + " · " + m.engine, m.id));
  const fillProfiles = () => {
    const model = models.find((m) => m.id === $("model").value);
    $("profile").length = 1;
    for (const p of (model && model.profiles) || []) $("profile").append(new Option(p + (p === model.default_profile ? " (default)" : ""), p));
  };
  $("model").addEventListener("change", fillProfiles);
  fillProfiles();

  const bubble = (role, text) => {
    const div = document.createElement("div");
    div.className = "msg " + role;
    const who = document.createElement("span"); who.className = "who"; who.textContent = role;
    const body = document.createElement("div"); body.className = "body"; body.textContent = text;
    div.append(who, body);
    $("messages").append(div);
    return body;
  };
  $("clear").addEventListener("click", () => { history = []; $("messages").textContent = ""; $("stats").textContent = ""; });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); $("send-form").requestSubmit(); }
  });
  $("send-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const text = $("prompt").value.trim();
    if (!text) return;
    $("prompt").value = "";
    bubble("user", text);
    history.push({role: "user", content: text});
    const messages = ($("system").value.trim() ? [{role: "system", content: $("system").value.trim()}] : []).concat(history);
    fetch("/ui/api/render", {method: "POST", headers: authHeaders({"Content-Type": "application/json"}),
      body: JSON.stringify({model: $("model").value, messages})})
      .then((r) => r.json()).then((d) => { $("rendered").textContent = d.prompt == null ? "(this engine renders its own prompt)" : d.prompt; });
    const body = {model: $("model").value, messages, stream: true, stream_options: {include_usage: true},
                  max_tokens: Number($("max_tokens").value) || 128};
    if ($("profile").value) body.profile = $("profile").value;
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    if ($("top_p").value !== "") body.top_p = Number($("top_p").value);
    if ($("knowledge").value) body.knowledge = {base: $("knowledge").value};
    if ($("strategy").value) body.strategy = $("strategy").value;
    if ($("tools").value) body.tools = toolSpecs.filter((t) => t.function.name === $("tools").value);
    await streamReply(body, bubble("assistant", ""), (reply) => history.push({role: "assistant", content: reply}));
  });

  async function streamReply(body, out, done) {
    $("send").disabled = true;
    $("stats").textContent = "waiting for the first token…";
    const t0 = performance.now();
    let first = null, usage = null, reply = "", toolCalls = {};
    try {
      const res = await fetch("/v1/chat/completions", {method: "POST", headers: authHeaders({"Content-Type": "application/json"}), body: JSON.stringify(body)});
      if (!res.ok) {
        const err = await res.json().catch(() => ({}));
        throw new Error((err.error && err.error.message) || res.statusText);
      }
      const reader = res.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const {value, done: end} = await reader.read();
        if (end) break;
        buffer += decoder.decode(value, {stream: true});
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
          const data = event.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) usage = chunk.usage;
          for (const choice of chunk.choices || []) {
            const delta = choice.delta || {};
            if (delta.content) { if (first === null) first = performance.now(); reply += delta.content; out.textContent = reply; }
            for (const call of delta.tool_calls || []) {
              if (first === null) first = performance.now();
              const c = toolCalls[call.index] = toolCalls[call.index] || {name: "", arguments: ""};
              if (call.function && call.function.name) c.name += call.function.name;
              if (call.function && call.function.arguments) c.arguments += call.function.arguments;
              out.textContent = reply + Object.values(toolCalls).map((t) => "\n→ tool call " + t.name + "(" + t.arguments + ")").join("");
            }
          }
        }
      }
      const t1 = performance.now();
      const tokens = usage ? usage.completion_tokens : null;
      const ttft = first === null ? null : (first - t0) / 1000;
      const decode = first === null ? null : (t1 - first) / 1000;
      $("stats").textContent = [
        ttft === null ? "no tokens" : "time to first token " + ttft.toFixed(2) + " s",
        tokens === null ? null : tokens + " tokens",
        tokens > 1 && decode > 0 ? ((tokens - 1) / decode).toFixed(1) + " tokens/s decoding" : null,
      ].filter(Boolean).join(" · ");
      done(reply);
    } catch (err) {
      out.textContent = "Error: " + err.message;
      out.parentElement.classList.add("error");
      $("stats").textContent = "";
    } finally {
      $("send").disabled = models.length === 0;
    }
  }
}
