// The admin page: asks for the admin key (kept in sessionStorage, so it
// goes when the tab closes), reads /v1/admin/overview with it every
// REFRESH_MS and shows nodes, apps and broadcasts. Rates are the
// difference of two readings of the cumulative counters over the time
// between them. Plain DOM, text only (never innerHTML): names come from
// the server and are shown, not parsed.
"use strict";

const REFRESH_MS = 2000;
const KEY_STORAGE = "herald-admin-key";
const OVERVIEW_URL = "/v1/admin/overview";

let previous = null; // { at: ms, apps: Map(id -> totals) }
let timer = null;

const $ = (id) => document.getElementById(id);

function show(element, visible) {
  element.hidden = !visible;
}

function setError(message) {
  $("error").textContent = message ?? "";
  show($("error"), Boolean(message));
}

function cell(text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  return td;
}

function emptyRow(tbody, columns, text) {
  const tr = document.createElement("tr");
  const td = cell(text, "empty");
  td.colSpan = columns;
  tr.append(td);
  tbody.append(tr);
}

function sum(values) {
  return values.reduce((total, value) => total + value, 0);
}

function rate(now, before, seconds) {
  if (before === undefined || seconds <= 0) return "–";
  return (Math.max(0, now - before) / seconds).toFixed(1);
}

function webhookErrors(attempts) {
  return sum(
    Object.entries(attempts ?? {})
      .filter(([outcome]) => outcome !== "accepted")
      .map(([, count]) => count),
  );
}

function webhookAll(attempts) {
  return sum(Object.values(attempts ?? {}));
}

function renderNodes(nodes) {
  const tbody = $("nodes");
  tbody.replaceChildren();
  if (nodes.length === 0) emptyRow(tbody, 5, "no live room node");
  for (const node of nodes) {
    const tr = document.createElement("tr");
    tr.dataset.node = node.id;
    const shards = node.shard_connections.length
      ? node.shard_connections.map((count, shard) => `${shard}: ${count}`).join("  ")
      : "–";
    tr.append(
      cell(node.id),
      cell(node.region || "–"),
      cell(String(node.connections), "num"),
      cell(node.cpu_percent.toFixed(1), "num"),
      cell(shards, "shards"),
    );
    tbody.append(tr);
  }
}

function renderApps(apps, seconds) {
  const tbody = $("apps");
  tbody.replaceChildren();
  if (apps.length === 0) emptyRow(tbody, 10, "no app");
  for (const app of apps) {
    const before = previous?.apps.get(app.id);
    const t = app.totals;
    const gaveUp = sum(Object.values(app.webhook_gave_up));
    const errorRate = rate(
      webhookErrors(t.webhook_attempts),
      before && webhookErrors(before.webhook_attempts),
      seconds,
    );
    const tr = document.createElement("tr");
    tr.dataset.app = app.id;
    tr.append(
      cell(app.id),
      cell(String(app.online_connections), "num"),
      cell(String(app.online_users), "num"),
      cell(rate(t.messages_stored, before?.messages_stored, seconds), "num"),
      cell(rate(t.deliveries, before?.deliveries, seconds), "num"),
      cell(rate(t.acks, before?.acks, seconds), "num"),
      cell(rate(t.upstreams, before?.upstreams, seconds), "num"),
      cell(rate(webhookAll(t.webhook_attempts), before && webhookAll(before.webhook_attempts), seconds), "num"),
      cell(errorRate, Number(errorRate) > 0 ? "num errors" : "num"),
      cell(String(gaveUp), gaveUp > 0 ? "num errors" : "num"),
    );
    tbody.append(tr);
  }
}

function renderBroadcasts(apps) {
  const tbody = $("broadcasts");
  tbody.replaceChildren();
  const rows = apps.flatMap((app) => app.broadcasts.map((b) => [app.id, b]));
  if (rows.length === 0) emptyRow(tbody, 8, "no unexpired broadcast");
  for (const [app, broadcast] of rows) {
    const percent = broadcast.percent;
    const tr = document.createElement("tr");
    tr.className = "broadcast";
    tr.dataset.app = app;
    tr.dataset.seq = String(broadcast.seq);
    tr.dataset.percent = String(percent);
    const bar = document.createElement("progress");
    bar.max = 100;
    bar.value = percent;
    const label = document.createElement("span");
    label.className = "percent";
    label.textContent = `${percent}%`;
    const progressCell = document.createElement("td");
    progressCell.append(bar, label);
    tr.append(
      cell(app),
      cell(String(broadcast.seq), "num"),
      progressCell,
      cell(String(broadcast.target), "num"),
      cell(String(broadcast.sent), "num"),
      cell(String(broadcast.dropped), "num"),
      cell(String(broadcast.acked), "num"),
      cell(broadcast.in_progress ? "sending" : "done", broadcast.in_progress ? "running" : "done"),
    );
    tbody.append(tr);
  }
}

function render(overview) {
  const at = overview.generated_at_ms;
  const seconds = previous ? (at - previous.at) / 1000 : 0;
  const connections = sum(overview.nodes.map((node) => node.connections));
  const total = $("total-connections");
  total.textContent = String(connections);
  total.dataset.connections = String(connections);
  $("total-nodes").textContent = String(overview.nodes.length);
  $("total-apps").textContent = String(overview.apps.length);
  $("updated").textContent = new Date(at).toLocaleTimeString();
  renderNodes(overview.nodes);
  renderApps(overview.apps, seconds);
  renderBroadcasts(overview.apps);
  previous = { at, apps: new Map(overview.apps.map((app) => [app.id, app.totals])) };
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body?.error?.message ?? `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status}`;
  }
}

function signedOut(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(KEY_STORAGE);
  previous = null;
  show($("dashboard"), false);
  show($("logout"), false);
  show($("login"), true);
  $("status").textContent = "not signed in";
  setError(message);
  $("admin-key").focus();
}

async function refresh() {
  const key = sessionStorage.getItem(KEY_STORAGE);
  if (!key) {
    signedOut(null);
    return;
  }
  let response;
  try {
    response = await fetch(OVERVIEW_URL, {
      headers: { Authorization: `Bearer ${key}` },
      cache: "no-store",
    });
  } catch (error) {
    setError(`Herald does not answer (${error.message}); trying again.`);
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  if (response.status === 401 || response.status === 403) {
    signedOut(`The key was refused: ${await errorMessage(response)}`);
    return;
  }
  if (!response.ok) {
    setError(`Reading the overview failed: ${await errorMessage(response)}; trying again.`);
    timer = setTimeout(refresh, REFRESH_MS);
    return;
  }
  render(await response.json());
  setError(null);
  show($("login"), false);
  show($("dashboard"), true);
  show($("logout"), true);
  $("status").textContent = `signed in, refreshing every ${REFRESH_MS / 1000} s`;
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) return;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("admin-key").value = "";
    clearTimeout(timer);
    refresh();
  });
  $("logout").addEventListener("click", () => signedOut(null));
  refresh();
});
