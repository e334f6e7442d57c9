// imba ui: statuses on the DAG, the stage panel, live updates (server-sent events) and the run
// action. No framework: the pages are rendered by the server; this only fills them in.
"use strict";

const body = document.body;
const pipeline = body.dataset.pipeline;
const workdir = body.dataset.workdir === undefined ? null : Number(body.dataset.workdir);
const token = (document.querySelector('meta[name="imba-token"]') || {}).content || "";
let statuses = {};

function nodes() {
  return document.querySelectorAll("#dag g.node");
}

let byName = null;
// A stage's box, by name (the map is built once: a pipeline may have 10,000 stages).
function nodeOf(stage) {
  if (!byName) {
    byName = new Map();
    for (const node of nodes()) byName.set(node.dataset.stage, node);
  }
  return byName.get(stage) || null;
}

const STATES = ["fresh", "stale", "running", "failed", "quarantined", "unknown", "queued", "done"];

function paint(stage, state, reasons) {
  const node = nodeOf(stage);
  if (!node) return;
  node.classList.remove(...STATES);
  node.classList.add(state);
  node.dataset.state = state;
  const title = node.querySelector("title");
  if (title) {
    const why = reasons && reasons.length ? "\n" + reasons.join("\n") : "";
    title.textContent = stage + ": " + label(state) + why;
  }
}

function label(state) {
  return state === "fresh" ? "up to date" : state;
}

async function loadStatus() {
  if (!document.getElementById("dag")) return;
  const summary = document.getElementById("summary");
  try {
    const response = await fetch(`/p/${pipeline}/status`, { headers: { "Accept": "application/json" } });
    const data = await response.json();
    if (data.error) {
      if (summary) summary.textContent = data.error;
      return;
    }
    statuses = data.stages || {};
    const counts = {};
    for (const [stage, s] of Object.entries(statuses)) {
      paint(stage, s.state, s.reasons);
      counts[s.state] = (counts[s.state] || 0) + 1;
    }
    if (summary) {
      summary.textContent = Object.entries(counts).map(([k, v]) => `${v} ${label(k)}`).join(", ");
    }
    body.dataset.statusLoaded = "true";
    showState();
  } catch (e) {
    if (summary) summary.textContent = "cannot load the status";
  }
}

function showState() {
  const panel = document.getElementById("panel");
  const name = panel && panel.dataset.stage;
  const line = document.getElementById("stage-state");
  if (!name || !line || !statuses[name]) return;
  const s = statuses[name];
  line.className = "state " + s.state;
  line.textContent = label(s.state) + (s.reasons && s.reasons.length ? ": " + s.reasons.join("; ") : "");
}

async function openStage(stage) {
  const panel = document.getElementById("panel");
  if (!panel) return;
  const response = await fetch(`/p/${pipeline}/stage?name=${encodeURIComponent(stage)}`);
  panel.innerHTML = await response.text();
  panel.dataset.stage = stage;
  for (const node of nodes()) node.classList.toggle("selected", node.dataset.stage === stage);
  showState();
}

async function runAction(ask) {
  const result = document.getElementById("action-result");
  if (result) result.textContent = "starting…";
  try {
    const response = await fetch(`/p/${pipeline}/run`, {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-Imba-Token": token },
      body: JSON.stringify(ask),
    });
    const data = await response.json().catch(() => ({}));
    if (result) {
      result.textContent = response.ok ? `started (pid ${data.pid})` : `not started: ${data.error || response.status}`;
    }
  } catch (e) {
    if (result) result.textContent = "not started";
  }
}

let reloadTimer = null;
// Fetches the page again and swaps its main part in (a run page while its run goes on).
function refreshMain() {
  clearTimeout(reloadTimer);
  reloadTimer = setTimeout(async () => {
    const response = await fetch(location.href);
    if (!response.ok) return;
    const html = await response.text();
    const doc = new DOMParser().parseFromString(html, "text/html");
    const fresh = doc.getElementById("main");
    const open = [...document.querySelectorAll("details[open]")].map((d) => d.dataset.stage);
    if (fresh) document.getElementById("main").innerHTML = fresh.innerHTML;
    for (const d of document.querySelectorAll("details")) {
      if (open.includes(d.dataset.stage)) d.open = true;
    }
  }, 150);
}

// What the live stream says: it is open, it failed, a slow page missed messages, a message.
function onLive(what, data) {
  const indicator = document.getElementById("live");
  if (what === "open") {
    if (indicator) {
      indicator.classList.add("on");
      indicator.textContent = "live";
    }
    body.dataset.live = "true";
    return;
  }
  if (what === "error") {
    if (indicator) {
      indicator.classList.remove("on");
      indicator.textContent = "offline";
    }
    return;
  }
  if (what === "lagged") {
    loadStatus();
    refreshMain();
    return;
  }
  onMessage(data);
}

function onMessage(text) {
  let message;
  try {
    message = JSON.parse(text);
  } catch (e) {
    return;
  }
  if (message.workdir !== workdir) return;
  const page = body.dataset.page;
  if (message.kind === "stage" && message.line && message.line.stage) {
    const line = message.line;
    const state = ["running", "restoring", "queued", "retrying", "waiting"].includes(line.state)
      ? "running"
      : ["done", "skipped", "cached"].includes(line.state) ? "fresh"
      : line.state === "failed" ? "failed" : null;
    if (state && page === "pipeline") {
      paint(line.stage, state, line.detail ? [line.detail] : []);
      statuses[line.stage] = { state, reasons: line.detail ? [line.detail] : [] };
      showState();
    }
  }
  if (message.kind === "record" && page === "pipeline") loadStatus();
  const run = document.getElementById("run");
  if (page === "runs" && (run ? run.dataset.run === message.run : true)) refreshMain();
}

// One stream for every tab of this UI: a shared worker holds it (a browser allows six
// connections to a host, and each tab holding its own would leave the seventh waiting). Where
// there is no shared worker, the page holds its own, and gives it back when it is left.
function listen() {
  if (window.SharedWorker) {
    const worker = new SharedWorker("/assets/live-worker.js");
    worker.port.onmessage = (event) => onLive(event.data.what, event.data.data);
    worker.port.start();
    window.addEventListener("pagehide", () => worker.port.postMessage("bye"));
    // Back from the back-forward cache, having said bye: start again.
    window.addEventListener("pageshow", (event) => {
      if (event.persisted) location.reload();
    });
    return;
  }
  if (!window.EventSource) return;
  const source = new EventSource("/events");
  window.addEventListener("pagehide", () => source.close());
  source.onopen = () => onLive("open");
  source.onerror = () => onLive("error");
  source.addEventListener("lagged", () => onLive("lagged"));
  source.onmessage = (event) => onLive("message", event.data);
}

document.addEventListener("click", (event) => {
  const node = event.target.closest && event.target.closest("#dag g.node");
  if (node) {
    openStage(node.dataset.stage);
    return;
  }
  const button = event.target.closest && event.target.closest("button.action");
  if (!button) return;
  if (button.id === "run-all") runAction({});
  else if (button.dataset.runStage) runAction({ stage: button.dataset.runStage, downstream: true });
});

// A stage's log end, fetched when its details are first opened.
document.addEventListener("toggle", async (event) => {
  const details = event.target;
  if (!details.open || !details.dataset || !details.dataset.log) return;
  const pre = details.querySelector("pre.log[data-pending]");
  if (!pre) return;
  pre.removeAttribute("data-pending");
  const response = await fetch(details.dataset.log);
  pre.textContent = response.ok ? await response.text() : "(no log)";
}, true);

document.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && event.target.matches && event.target.matches("#dag g.node")) {
    openStage(event.target.dataset.stage);
  }
});

const chooser = document.getElementById("pipelines");
if (chooser) chooser.addEventListener("change", () => { location.href = `/p/${chooser.value}`; });

loadStatus();
listen();
