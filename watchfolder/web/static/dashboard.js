// watchfolder dashboard: no build step, no framework. Every value from the API goes
// into the page through textContent, never as HTML.
"use strict";

const TOKEN_KEY = "watchfolder.token";
const params = new URLSearchParams(location.search);
const REFRESH_MS = Math.max(1, Number(params.get("refresh")) || 5) * 1000;

let principal = null;
let timer = null;

const $ = (sel) => document.querySelector(sel);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else node[k] = v;
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child == null ? "" : String(child)));
  }
  return node;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(method, path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch("api/v1/" + path, {
    method,
    headers: { "Authorization": "Bearer " + token, "Accept": "application/json" },
    cache: "no-store",
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new HttpError(response.status, body.error || response.statusText);
  return body;
}

function age(seconds) {
  if (seconds == null) return "–";
  if (seconds < 90) return Math.round(seconds) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

function when(t, now) {
  return t == null ? "–" : age(now - t) + " ago";
}

function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function percent(progress) {
  if (progress.bytes_total) return Math.min(100, Math.floor(100 * progress.bytes_done / progress.bytes_total));
  if (progress.files_total) return Math.min(100, Math.floor(100 * progress.files_done / progress.files_total));
  return 0;
}

function fill(tbody, rows, empty, columns) {
  tbody.replaceChildren(...(rows.length ? rows : [el("tr", {}, el("td", { colSpan: columns, class: "empty" }, empty))]));
}

function actionButton(label, action, job) {
  const button = el("button", { type: "button", class: action, "data-job-id": job.id }, label);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api("POST", `jobs/${job.id}/${action}`);
      flash(`job ${job.id}: ${action} done`);
    } catch (err) {
      flash(`job ${job.id}: ${action} failed: ${err.message}`, true);
    }
    refresh();
  });
  return button;
}

function flash(message, isError) {
  const p = $("#message");
  p.textContent = message;
  p.className = isError ? "error" : "note";
}

function render(status, running, failed) {
  const now = status.generated_at;
  const admin = principal && principal.permissions.includes("manage");
  $("#updated").textContent = "updated " + new Date(now * 1000).toLocaleTimeString();
  $("#problems").textContent = status.problems.join("; ");

  const counts = $("#queue-counts");
  counts.replaceChildren();
  for (const [state, n] of Object.entries(status.queue.counts)) {
    counts.append(el("dt", {}, state), el("dd", { "data-state": state }, n));
  }
  $("#oldest").textContent = status.queue.oldest_queued_age == null
    ? "Nothing waiting." : "Oldest waiting job: " + age(status.queue.oldest_queued_age);

  fill($("#running tbody"), running.map((job) => {
    const pct = percent(job.progress);
    const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
    bar.firstChild.style.width = pct + "%";
    const label = `${pct}% ${job.progress.phase || ""}`.trim();
    return el("tr", { "data-job-id": job.id },
      el("td", {}, job.id), el("td", {}, job.owner), el("td", {}, job.source),
      el("td", { class: "progress" }, bar, el("span", { class: "pct" }, label),
        el("small", {}, ` ${bytes(job.progress.bytes_done)} of ${bytes(job.progress.bytes_total)}`)),
      el("td", {}, admin && !job.cancel_requested ? actionButton("Cancel", "cancel", job)
        : job.cancel_requested ? "cancelling" : ""));
  }), "No job is running.", 5);

  fill($("#failures tbody"), failed.map((job) => el("tr", { "data-job-id": job.id },
    el("td", {}, job.id), el("td", {}, job.owner), el("td", {}, job.source),
    el("td", { class: "reason" }, job.error ? job.error.message : ""),
    el("td", {}, admin ? actionButton("Retry", "retry", job) : ""))), "No failures.", 5);

  fill($("#watchers tbody"), status.watchers.map((w) => el("tr", { class: w.healthy ? "ok" : "bad" },
    el("td", {}, w.name), el("td", {}, w.path), el("td", {}, w.mode),
    el("td", {}, !w.healthy ? "unhealthy: " + (w.problem || "")
      : w.health === "standby" ? "standby (another watcher holds the folder)" : "healthy"),
    el("td", {}, when(w.last_event_at, now)), el("td", {}, when(w.last_scan_at, now)),
    el("td", {}, w.pending == null ? "–" : w.pending))), "No watcher reports.", 7);

  fill($("#workers tbody"), status.workers.map((w) => el("tr", { class: w.healthy ? "ok" : "bad" },
    el("td", {}, w.name), el("td", {}, `${w.host} (pid ${w.pid})`), el("td", {}, w.state),
    el("td", {}, w.current_job == null ? "–" : w.current_job),
    el("td", {}, age(w.heartbeat_age) + (w.healthy ? "" : " – " + w.problem)))), "No worker reports.", 5);

  // Several hosts: each host's workers and the watch folders its watchers hold.
  fill($("#hosts tbody"), (status.hosts || []).map((h) => el("tr", {},
    el("td", {}, h.host), el("td", {}, `${h.workers} (${h.busy} busy)`),
    el("td", {}, h.folders.length ? h.folders.join(", ") : "–"))), "No host reports.", 3);
  const store = status.store || {};
  $("#store").textContent = store.backend ? `Job store: ${store.backend} ${store.location || ""} (schema ${store.schema})` : "";

  const imp = status.importer;
  $("#importer").textContent = `Importer ${imp.kind}: ` +
    (imp.ok === true ? "ok" : imp.ok === false ? "NOT OK " + (imp.error || "") : "no report yet");
  $("#outbox").textContent = "Outbox: " + Object.entries(status.outbox.counts).map(([k, v]) => `${v} ${k}`).join(", ");

  fill($("#disk tbody"), status.disk.map((d) => el("tr", {},
    el("td", {}, d.label), el("td", {}, d.path),
    el("td", {}, d.error ? d.error : `${bytes(d.free)} of ${bytes(d.total)}`))), "", 3);
}

async function refresh() {
  clearTimeout(timer);
  try {
    const [status, running, failed] = await Promise.all([
      api("GET", "status"),
      api("GET", "jobs?state=running&limit=100"),
      api("GET", "jobs?state=failed&limit=20"),
    ]);
    render(status, running.jobs, failed.jobs);
  } catch (err) {
    if (err.status === 401) return logout("The token was refused: " + err.message);
    flash("Refresh failed: " + err.message, true);
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

function logout(message) {
  clearTimeout(timer);
  sessionStorage.removeItem(TOKEN_KEY);
  principal = null;
  $("#board").hidden = true;
  $("#logout").hidden = true;
  $("#who").textContent = "";
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
  $("#token").focus();
}

async function open() {
  try {
    principal = await api("GET", "whoami");
  } catch (err) {
    return logout(err.status === 401 ? "Unknown token." : "Cannot reach the server: " + err.message);
  }
  if (!principal.permissions.includes("status")) {
    return logout(`Token ${principal.name} has role ${principal.role}; the dashboard needs role read or admin.`);
  }
  $("#login").hidden = true;
  $("#board").hidden = false;
  $("#logout").hidden = false;
  $("#who").textContent = `${principal.name} (${principal.role})`;
  refresh();
}

document.addEventListener("DOMContentLoaded", () => {
  $("#login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("#token").value.trim());
    $("#token").value = "";
    open();
  });
  $("#logout").addEventListener("click", () => logout(""));
  // `watchfolder run` prints a link with a one-run token in the fragment (never sent to
  // the server in a URL): keep it for this tab and take it out of the address bar.
  const fromLink = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromLink) {
    sessionStorage.setItem(TOKEN_KEY, fromLink);
    history.replaceState(null, "", location.pathname + location.search);
  }
  if (sessionStorage.getItem(TOKEN_KEY)) open();
  else logout("");
});
