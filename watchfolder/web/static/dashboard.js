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

async function api(method, path, asText) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const response = await fetch("api/v1/" + path, {
    method,
    headers: { "Authorization": "Bearer " + token, "Accept": asText ? "text/plain" : "application/json" },
    cache: "no-store",
  });
  if (asText && response.ok) return response.text();
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

// IEC units (KiB = 1024 B), as in the CLI and the mails (watchfolder/units.py).
function bytes(n) {
  if (n == null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

function stamp(t) {
  return t == null ? "–" : new Date(t * 1000).toLocaleString();
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
    // Cancelling stops an import in progress: asked first (retry and dismiss are undone easily).
    if (action === "cancel" && !window.confirm(`Cancel job ${job.id}? A running import is stopped.`)) return;
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

// A job rejected when it was detected failed because of its files or its descriptor:
// retrying the same files fails the same way (also after a retry that failed again).
// Changed files make a new job. The server says so (cause_in_files).
function causeInFiles(job) {
  return Boolean(job.cause_in_files);
}

function actionsFor(job) {
  const out = [];
  if (!principal || !principal.permissions.includes("manage")) return out;
  if (["queued", "running", "retry_wait"].includes(job.state) && !job.cancel_requested) {
    out.push(actionButton("Cancel", "cancel", job));
  }
  if ((job.state === "failed" || job.state === "cancelled") && !causeInFiles(job)) {
    out.push(actionButton("Retry", "retry", job));
  }
  if (job.state === "failed" && job.dismissed_at == null) out.push(actionButton("Dismiss", "dismiss", job));
  return out;
}

function jobLink(job) {
  return el("a", { href: `#/jobs/${job.id}` }, String(job.id));
}

// Failures with the same cause read alike but name other files and numbers: group on the words
// (the server's error.group, the admin digest's grouping; this is the same rule for old answers).
function reasonKey(message) {
  return (message || "(no reason)")
    .replace(/\S*[\/\\]\S*|\S+\.[A-Za-z0-9]{2,5}\b/g, "…")
    .replace(/\d+/g, "N").slice(0, 90);
}

function flash(message, isError) {
  const p = $("#message");
  p.textContent = message;
  p.className = isError ? "error" : "note";
}

// Pending kinds of paths never taken as acquisitions (watchfolder/status.py NOT_IMPORTED_KINDS).
const NOT_IMPORTED = new Set(["excluded", "symlink", "not_acquisition"]);
function plural(n, noun) { return `${n} ${noun}${n === 1 ? "" : "s"}`; }

function renderPending(pending, watchers, now) {
  const box = $("#pending");
  const byWatch = new Map(watchers.map((w) => [w.name, []]));
  for (const p of pending) {
    if (!byWatch.has(p.watch)) byWatch.set(p.watch, []);
    byWatch.get(p.watch).push(p);
  }
  const parts = [];
  for (const [name, items] of byWatch) {
    // The counts of status.pending (one definition): acquisitions not queued yet, and paths not taken.
    const skipped = items.filter((p) => NOT_IMPORTED.has(p.kind)).length;
    const waiting = items.length - skipped;
    const head = el("h3", { "data-acquisitions": waiting, "data-not-imported": skipped },
      `${name}: ${waiting ? plural(waiting, "acquisition") + " not queued yet" : "nothing waiting"}` +
      (skipped ? `; ${plural(skipped, "path")} not imported (excluded, links, not acquisitions)` : ""));
    if (!items.length) { parts.push(el("div", { class: "watch-pending", "data-watch": name }, head)); continue; }
    const rows = items.map((p) => el("tr", { "data-path": p.path, class: "kind-" + p.kind },
      el("td", {}, el("code", {}, p.path)), el("td", {}, p.owner || "–"),
      el("td", { class: "why" }, p.reason), el("td", {}, age(p.waiting_for))));
    const table = el("table", { class: "pending" },
      el("thead", {}, el("tr", {}, el("th", {}, "Acquisition"), el("th", {}, "Owner"), el("th", {}, "Why not yet"),
        el("th", {}, "Seen for"))), el("tbody", {}, ...rows));
    parts.push(el("div", { class: "watch-pending", "data-watch": name }, head, table));
  }
  box.replaceChildren(...(parts.length ? parts : [el("p", { class: "empty" }, "No watch folders.")]));
}

const SVG = "http://www.w3.org/2000/svg";
function svg(tag, attrs, ...children) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, String(v));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

// Two bar charts in one inline SVG: acquisitions and bytes per bucket.
function renderThroughput(data) {
  const width = 720, barsH = 70, gap = 34, left = 70;
  const n = data.buckets.length;
  const step = (width - left) / Math.max(1, n);
  const height = 2 * barsH + 2 * gap;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width: "100%", role: "img",
    "aria-label": `acquisitions and bytes per ${data.bucket / 3600} h` });
  // Duplicates ("already imported as job N") imported nothing: counted apart, not as acquisitions.
  const dups = data.buckets.reduce((sum, b) => sum + (b.duplicates || 0), 0);
  const series = [["jobs", "acquisitions imported" + (dups ? ` (and ${dups} duplicate(s) not counted)` : ""),
    (v) => String(v), "#3f7fd0"], ["bytes", "bytes", bytes, "#6aa84f"]];
  series.forEach(([key, label, fmt, colour], row) => {
    const top = row * (barsH + gap) + 14;
    const max = Math.max(...data.buckets.map((b) => b[key]), 0);
    const total = data.buckets.reduce((sum, b) => sum + b[key], 0);
    root.append(svg("text", { x: 0, y: top - 2, class: "label" }, `${label}: ${fmt(total)} in all, peak ${fmt(max)}`));
    root.append(svg("line", { x1: left, x2: width, y1: top + barsH, y2: top + barsH, stroke: "#bbb" }));
    data.buckets.forEach((b, i) => {
      const h = max ? Math.max(b[key] ? 1 : 0, (b[key] / max) * barsH) : 0;
      const rect = svg("rect", { x: left + i * step + 1, y: top + barsH - h, width: Math.max(1, step - 2), height: h,
        fill: colour, class: "bar-" + key, "data-value": b[key] },
        svg("title", {}, `${new Date(b.start * 1000).toLocaleString()}: ${fmt(b[key])}`));
      root.append(rect);
    });
  });
  const first = data.buckets[0], last = data.buckets[n - 1];
  if (first && last) {
    const y = height - 4;
    root.append(svg("text", { x: left, y, class: "label" }, new Date(first.start * 1000).toLocaleString()));
    root.append(svg("text", { x: width, y, "text-anchor": "end", class: "label" }, "now"));
  }
  $("#throughput").replaceChildren(root);
}

function render(status, running, failed, pending) {
  const now = status.generated_at;
  const admin = principal && principal.permissions.includes("manage");
  $("#updated").textContent = "updated " + new Date(now * 1000).toLocaleTimeString();
  $("#problems").textContent = status.problems.join("; ");

  const counts = $("#queue-counts");
  counts.replaceChildren();
  for (const [state, n] of Object.entries(status.queue.counts)) {
    counts.append(el("dt", {}, state), el("dd", { "data-state": state }, n));
  }
  // "Queue" is about jobs; acquisitions not queued yet are the pending panel's.
  const notQueued = status.pending ? status.pending.acquisitions : 0;
  $("#oldest").textContent = (status.queue.oldest_queued_age == null
    ? "No job waiting." : "Oldest waiting job: " + age(status.queue.oldest_queued_age)) +
    (notQueued ? ` ${plural(notQueued, "acquisition")} not queued yet (see Pending).` : "");

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

  fill($("#failures tbody"), failed.slice(0, 20).map((job) => el("tr", { "data-job-id": job.id },
    el("td", {}, jobLink(job)), el("td", {}, job.owner), el("td", {}, job.source),
    el("td", { class: "reason" }, job.error ? job.error.message : ""),
    el("td", {}, ...actionsFor(job).filter((b) => !b.classList.contains("dismiss"))))), "No failures.", 5);

  const groups = new Map();
  for (const job of failed) {
    const key = job.error && job.error.group ? job.error.group : reasonKey(job.error && job.error.message);
    const g = groups.get(key) || { key, jobs: [], example: job.error ? job.error.message : "" };
    g.jobs.push(job);
    groups.set(key, g);
  }
  fill($("#failure-groups tbody"), [...groups.values()].sort((a, b) => b.jobs.length - a.jobs.length).map((g) =>
    el("tr", { "data-count": g.jobs.length },
      el("td", { class: "count" }, g.jobs.length),
      el("td", { class: "reason", title: g.example }, g.example),
      el("td", {}, ...g.jobs.slice(0, 5).flatMap((j) => [jobLink(j), " "]),
        g.jobs.length > 5 ? `and ${g.jobs.length - 5} more` : ""))), "No failures.", 3);

  renderPending(pending, status.watchers, now);

  fill($("#watchers tbody"), status.watchers.map((w) => el("tr", { class: w.healthy ? "ok" : "bad" },
    el("td", {}, w.name), el("td", {}, w.path), el("td", {}, w.mode),
    el("td", {}, !w.healthy ? "unhealthy: " + (w.problem || "")
      : w.health === "standby" ? "standby (another watcher holds the folder)" : "healthy"),
    el("td", {}, when(w.last_event_at, now)), el("td", {}, when(w.last_scan_at, now)),
    el("td", { class: "pending-count", title: "acquisitions not queued yet" +
      (w.not_imported ? `; and ${plural(w.not_imported, "path")} not imported` : "") },
      w.pending == null ? "–" : w.pending))), "No watcher reports.", 7);

  fill($("#workers tbody"), status.workers.map((w) => el("tr", { class: w.healthy ? "ok" : "bad" },
    el("td", {}, w.name), el("td", {}, `${w.host} (pid ${w.pid})`), el("td", {}, w.state),
    el("td", {}, w.current_job == null ? "–" : w.current_job),
    el("td", {}, age(w.heartbeat_age) + (w.healthy ? "" : " – " + w.problem)))), "No worker reports.", 5);

  // Several hosts: each host's workers, the watch folders its watchers hold and those they stand by for.
  fill($("#hosts tbody"), (status.hosts || []).map((h) => el("tr", {},
    el("td", {}, h.host), el("td", {}, `${h.workers} (${h.busy} busy)`),
    el("td", {}, h.folders.length ? h.folders.join(", ") : "–"),
    el("td", {}, (h.standby || []).length ? h.standby.join(", ") : "–"))), "No host reports.", 4);
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

let range = 24;
let lastThroughput = 0;

function route() {
  const hash = location.hash.replace(/^#/, "") || "/";
  const m = hash.match(/^\/jobs\/(\d+)$/);
  // The id stays the text of the address: Number() would round one past 2^53 to another job's id.
  if (m) return { view: "job", id: m[1] };
  if (hash.startsWith("/jobs")) return { view: "jobs", query: new URLSearchParams(hash.split("?")[1] || "") };
  return { view: "overview" };
}

function show(view) {
  for (const v of ["overview", "jobs", "job"]) $("#view-" + v).hidden = v !== view;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("on", a.dataset.view === view);
}

async function refreshOverview() {
  const [status, running, failed, pending] = await Promise.all([
    api("GET", "status"),
    api("GET", "jobs?state=running&limit=100"),
    api("GET", "jobs?state=failed&limit=200"),
    api("GET", "pending?limit=500"),
  ]);
  render(status, running.jobs, failed.jobs.filter((j) => j.dismissed_at == null), pending.pending);
  if (Date.now() - lastThroughput > 30000) {
    lastThroughput = Date.now();
    renderThroughput(await api("GET", "throughput?hours=" + range));
  }
}

async function refreshJobs(query) {
  const form = $("#filters");
  for (const name of ["state", "owner", "source", "q"]) form.elements[name].value = query.get(name) || "";
  const params = new URLSearchParams();
  for (const [k, v] of query) if (v && k !== "cursor") params.set(k, v);
  params.set("limit", "25");
  if (query.get("cursor")) params.set("cursor", query.get("cursor"));
  const page = await api("GET", "jobs?" + params);
  fill($("#jobs tbody"), page.jobs.map((job) => el("tr", { "data-job-id": job.id, class: "state-" + job.state },
    el("td", {}, jobLink(job)), el("td", {}, job.state), el("td", {}, job.owner),
    el("td", {}, stamp(job.created_at)), el("td", {}, job.source),
    el("td", {}, targetLabel(job.target)), el("td", {}, bytes(job.progress.bytes_total)),
    el("td", { class: "reason" }, job.error ? job.error.message : ""))), "No job matches.", 8);
  const next = $("#next-page");
  next.disabled = !page.next_cursor;
  next.dataset.cursor = page.next_cursor || "";
  $("#first-page").disabled = !query.get("cursor");
  $("#page-info").textContent = `${page.jobs.length} job(s) on this page` + (page.next_cursor ? "; older ones on the next" : "");
}

function targetLabel(target) {
  return Object.entries(target || {}).map(([k, v]) => `${k} ${v}`).join(" / ") || "–";
}

const JOB_ID_MAX = 9223372036854775807n; // job ids are positive 64-bit integers (the API's rule)

async function refreshJob(id) {
  if (BigInt(id) > JOB_ID_MAX || BigInt(id) < 1n) {
    $("#job-title").textContent = `No job ${id}: ` + (BigInt(id) < 1n ? "job ids start at 1"
      : `the id is too large (job ids go up to ${JOB_ID_MAX})`);
    for (const part of ["#job-actions", "#job-summary", "#job-progress", "#job-result", "#job-history tbody",
      "#job-files tbody", "#job-log"]) $(part).replaceChildren();
    return;
  }
  const [job, status] = await Promise.all([api("GET", `jobs/${id}`), api("GET", "status")]);
  let log = "";
  try { log = await api("GET", `jobs/${id}/log`, true); } catch (err) { log = "(no log: " + err.message + ")"; }
  $("#job-title").textContent = `Job ${job.id}: ${job.state}` + (job.name ? ` – ${job.name}` : "");
  $("#job-actions").replaceChildren(...actionsFor(job),
    causeInFiles(job) ? el("span", { class: "hint" }, "No retry: the cause is in the files or their descriptor. " +
      "Fix them in the drop folder; the watcher queues the changed acquisition by itself.") : "");
  const pairs = [
    ["Owner", job.owner + (job.group ? ` (group ${job.group})` : "")], ["Target", targetLabel(job.target)],
    ["Source", job.source], ["Folder", job.root], ["Description", job.description || "–"],
    ["Annotations", Object.entries(job.annotations || {}).map(([k, v]) => `${k}: ${v}`).join("; ") || "–"],
    ["Attempts", `${job.attempts} of ${job.max_attempts}`], ["Created", stamp(job.created_at)],
    ["Started", stamp(job.started_at)], ["Finished", stamp(job.finished_at)],
  ];
  if (job.error) pairs.push(["Reason", job.error.message]);
  $("#job-summary").replaceChildren(...pairs.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { "data-key": k }, v)]));
  const pct = percent(job.progress);
  const bar = el("div", { class: "bar" }, el("div", { class: "fill" }));
  bar.firstChild.style.width = pct + "%";
  if (!job.progress.bytes_done && !job.progress.files_done && !["running", "succeeded"].includes(job.state)) {
    // Nothing was copied (rejected at detection, failed before the import began): no 0 % bar.
    $("#job-progress").replaceChildren(el("span", { class: "empty" },
      job.state === "queued" || job.state === "retry_wait" ? "Not started." : "Nothing was copied."));
  } else {
    const files = job.progress.files_total;
    $("#job-progress").replaceChildren(bar, el("span", { class: "pct" }, `${pct}% ${job.progress.phase || ""}`),
      el("small", {}, ` ${bytes(job.progress.bytes_done)} of ${bytes(job.progress.bytes_total)}, ` +
        `${job.progress.files_done} of ${files} ${files === 1 ? "file" : "files"}`));
  }
  $("#job-result").replaceChildren(resultView(job, status.importer.web_url));
  fill($("#job-history tbody"), (job.history || []).map((h) => el("tr", {},
    el("td", {}, stamp(h.at)), el("td", {}, h.state), el("td", {}, h.message))), "No history.", 3);
  fill($("#job-files tbody"), job.files.slice(0, 500).map((f) => el("tr", {},
    el("td", {}, el("code", {}, f.path)), el("td", {}, bytes(f.size)), el("td", {}, f.sha256 ? f.sha256.slice(0, 16) + "…" : "–"))),
  "No files.", 3);
  $("#job-log").textContent = log.split("\n").slice(-40).join("\n");
}

function resultView(job, webUrl) {
  const r = job.result;
  if (!r) {
    const why = { succeeded: "No result recorded.", failed: "Not imported: see the reason above.",
      cancelled: "Not imported: cancelled." }[job.state] || "Not finished.";
    return el("p", { class: "empty" }, why);
  }
  const out = el("div", {});
  if (r.destination) out.append(el("p", { class: "archive" }, "Archived in ", el("code", {}, r.destination)));
  const images = Array.isArray(r.image_ids) ? r.image_ids : [];
  if (images.length) {
    const list = el("ul", { class: "images" });
    for (const id of images.slice(0, 200)) {
      list.append(el("li", {}, webUrl
        ? el("a", { href: `${webUrl}/webclient/?show=image-${id}`, target: "_blank", rel: "noopener" }, `image ${id}`)
        : `image ${id}`));
    }
    out.append(el("p", {}, `${images.length} image(s) in OMERO:`), list);
  }
  if (!out.childNodes.length) out.append(el("pre", {}, JSON.stringify(r, null, 2)));
  return out;
}

async function refresh() {
  clearTimeout(timer);
  const where = route();
  show(where.view);
  try {
    if (where.view === "job") await refreshJob(where.id);
    else if (where.view === "jobs") await refreshJobs(where.query);
    else await refreshOverview();
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
  $("#nav").hidden = true;
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
  $("#nav").hidden = false;
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
  window.addEventListener("hashchange", () => { if (principal) refresh(); });
  $("#filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const params = new URLSearchParams();
    for (const name of ["state", "owner", "source", "q"]) {
      const value = event.target.elements[name].value.trim();
      if (value) params.set(name, value);
    }
    location.hash = "#/jobs" + (params.toString() ? "?" + params : "");
  });
  $("#next-page").addEventListener("click", (event) => {
    const query = route().query || new URLSearchParams();
    query.set("cursor", event.target.dataset.cursor);
    location.hash = "#/jobs?" + query;
  });
  $("#first-page").addEventListener("click", () => {
    const query = route().query || new URLSearchParams();
    query.delete("cursor");
    location.hash = "#/jobs" + (query.toString() ? "?" + query : "");
  });
  for (const hours of [24, 168]) {
    $("#range-" + hours).addEventListener("click", () => {
      range = hours;
      lastThroughput = 0;
      $("#range-24").classList.toggle("on", hours === 24);
      $("#range-168").classList.toggle("on", hours === 168);
      refresh();
    });
  }
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
