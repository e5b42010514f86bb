"""The admin view: queue, workers, watchers, importer, outbox and disk space in one dict.

Shared by ``GET /api/v1/status``, the dashboard and ``watchfolder status``; it
reads everything from the store (and the disk), so it works from any process.

Components publish themselves with ``store.set_component(kind, name, status)``;
the keys read here are:

- workers (kind ``worker``): ``state`` (``idle``, ``busy``, ``stopped``),
  ``job_id`` (the job it runs, or null), ``heartbeat_seconds`` (its interval,
  else ``workers.heartbeat_seconds``); the row's ``updated_at`` is the
  heartbeat. A worker that stops cleanly removes its row.
- watchers (kind ``watcher``): ``health`` (``starting``, ``ok``, ``unhealthy``,
  ``stopped``), ``error``, ``warning``, ``path``, ``mode``, ``last_event``,
  ``last_scan``, ``pending``, ``pending_acquisitions``, ``events``, ``rescans``.
- importer (kind ``importer``): ``ok`` and anything else the importer's
  ``health()`` returns.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .job import JobState
from .mail.message import CONFIG_PROBLEM

# A worker is healthy while its heartbeat is younger than this many heartbeat intervals.
HEARTBEAT_TOLERANCE = 3.0

log = logging.getLogger(__name__)


def _age(now: float, then: float | None) -> float | None:
    return None if then is None else max(0.0, now - then)


def worker_view(component: dict[str, Any], *, heartbeat_seconds: float, now: float) -> dict[str, Any]:
    """One worker's row in the status view."""
    status = component.get("status") or {}
    state = str(status.get("state") or "unknown")
    heartbeat_seconds = float(status.get("heartbeat_seconds") or heartbeat_seconds)
    age = _age(now, component.get("updated_at"))
    stopped = state == "stopped"
    fresh = age is not None and age <= HEARTBEAT_TOLERANCE * heartbeat_seconds
    problem = None
    if not stopped and not fresh:
        problem = f"no heartbeat for {age:.0f} s (expected every {heartbeat_seconds:g} s)"
    return {
        "name": component.get("name"),
        "host": component.get("host"),
        "pid": component.get("pid"),
        "state": state,
        "current_job": status.get("job_id"),
        "heartbeat_at": component.get("updated_at"),
        "heartbeat_age": age,
        "healthy": stopped or fresh,
        "problem": problem,
    }


def watcher_view(component: dict[str, Any], *, unhealthy_after: float, now: float) -> dict[str, Any]:
    """One watcher's row in the status view (from what :mod:`.watcher` publishes)."""
    status = component.get("status") or {}
    age = _age(now, component.get("updated_at"))
    state = status.get("health")
    problem = status.get("error") or None
    healthy = state != "unhealthy" if state is not None else problem is None
    if healthy and state not in ("stopped",) and age is not None and age > unhealthy_after:
        healthy = False
        problem = f"no report for {age:.0f} s (the watcher process may be gone)"
    if not healthy and problem is None:
        problem = "unhealthy"
    return {
        "name": component.get("name"),
        "host": component.get("host"),
        "pid": component.get("pid"),
        "path": status.get("path"),
        "mode": status.get("mode"),
        "folder": status.get("folder"),
        "holder": status.get("holder"),
        "health": state,
        "healthy": healthy,
        "problem": problem,
        "warning": status.get("warning"),
        "last_event_at": status.get("last_event"),
        "last_scan_at": status.get("last_scan"),
        "pending": status.get("pending"),
        "pending_acquisitions": status.get("pending_acquisitions") or [],
        "events": status.get("events"),
        "rescans": status.get("rescans"),
        "updated_at": component.get("updated_at"),
    }


#: Pending kinds of paths the watcher does not take as acquisitions (an exclude pattern, a
#: symbolic link, not an acquisition in this folder's mode): listed with why, never queued.
NOT_IMPORTED_KINDS = frozenset({"excluded", "symlink", "not_acquisition"})


def pending_counts(store, owners: Sequence[str] | None = None) -> dict[str, dict[str, int]]:
    """The one count of what is not queued yet, per watch folder: ``{watch: {"acquisitions": n,
    "not_imported": m}}`` from the store's pending list (what ``watchfolder pending``,
    ``GET /api/v1/pending`` and the dashboard's pending panel list). ``acquisitions``: entries
    that become jobs once complete (waiting for files, still being written, wrong size…);
    ``not_imported``: paths listed only to say why they are not taken (:data:`NOT_IMPORTED_KINDS`).
    ``owners`` (a token limited to owners): only entries whose owner is one of them, as
    :meth:`watchfolder.web.auth.Principal.may_see_pending`."""
    out: dict[str, dict[str, int]] = {}
    for entry in store.pending_list(limit=1_000_000):
        if owners is not None and (entry.owner is None or entry.owner not in owners):
            continue
        counts = out.setdefault(entry.watch, {"acquisitions": 0, "not_imported": 0})
        counts["not_imported" if entry.kind in NOT_IMPORTED_KINDS else "acquisitions"] += 1
    return out


def store_view(store) -> dict[str, Any]:
    """The store's backend, location (no secrets) and schema version."""
    described = dict(store.describe())
    return {k: described[k] for k in ("backend", "location", "schema", "error") if k in described}


def folder_view(store, *, now: float) -> list[dict[str, Any]]:
    """Which watcher holds which watch folder; ``expired`` when its holder stopped renewing."""
    return [
        {
            "folder": h["folder"],
            "holder": h["holder"],
            "host": h["host"],
            "pid": h["pid"],
            "acquired_at": h["acquired_at"],
            "expires_at": h["expires_at"],
            "expired": h["expires_at"] < now,
        }
        for h in store.folder_holders()
    ]


def hosts_view(workers: list[dict[str, Any]], folders: list[dict[str, Any]],
               watchers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per host: how many workers (and how many busy), the watch folders its watchers hold
    (``folders``) and those they stand by for (``standby``), and per watcher process
    (``watchers``: holder name, pid) which it holds and which it stands by for.

    ``folders`` is :func:`folder_view` (live leases only count); ``watchers`` the
    :func:`watcher_view` rows, of which the healthy standby ones count.
    """
    hosts: dict[str, dict[str, Any]] = {}

    def entry(host: str) -> dict[str, Any]:
        return hosts.setdefault(host, {"host": host, "workers": 0, "busy": 0, "folders": [], "standby": [],
                                       "watchers": []})

    def watcher(host: str, holder: str, pid: Any) -> dict[str, Any]:
        rows = entry(host)["watchers"]
        for row in rows:
            if row["holder"] == holder:
                return row
        rows.append({"holder": holder, "pid": pid, "holds": [], "standby": []})
        return rows[-1]

    for w in workers:
        e = entry(str(w.get("host") or "?"))
        e["workers"] += 1
        e["busy"] += w.get("state") == "busy"
    for f in folders:
        if not f["expired"]:
            entry(str(f["host"]))["folders"].append(f["folder"])
            watcher(str(f["host"]), f["holder"], f.get("pid"))["holds"].append(f["folder"])
    for w in watchers:
        if w.get("health") == "standby" and w.get("healthy") and w.get("folder"):
            host = str(w.get("host") or "?")
            entry(host)["standby"].append(w["folder"])
            watcher(host, str(w.get("holder") or w.get("name")), w.get("pid"))["standby"].append(w["folder"])
    for e in hosts.values():
        e["folders"].sort()
        e["standby"].sort()
        e["watchers"].sort(key=lambda row: row["holder"])
    return sorted(hosts.values(), key=lambda e: e["host"])


def importer_view(config, store, importer=None) -> dict[str, Any]:
    """Importer health: asked directly when this process has one, else as last published."""
    kind = config.importer.kind
    if importer is not None:
        try:
            health = dict(importer.health())
        except Exception as exc:  # health must never break the status view
            health = {"ok": False, "error": f"health check failed: {exc}"}
        return {"kind": kind, **health, "ok": bool(health.get("ok")), "source": "live"}
    published = store.components("importer")
    if not published:
        return {"kind": kind, "ok": None, "source": "none", "error": None}
    latest = max(published, key=lambda c: c.get("updated_at") or 0)
    status = dict(latest.get("status") or {})
    return {
        "kind": kind,
        **status,
        "ok": bool(status.get("ok")) if "ok" in status else None,
        "source": "published",
        "updated_at": latest.get("updated_at"),
    }


def target_view(component: dict[str, Any], *, now: float) -> dict[str, Any]:
    """An importer target's back-pressure state, as its gate published it (watchfolder.backpressure)."""
    status = dict(component.get("status") or {})
    since = status.get("paused_since")
    return {
        **status,
        "target": status.get("target") or component.get("name"),
        "paused": bool(status.get("paused")),
        "paused_for": _age(now, since) if status.get("paused") else None,
        "host": component.get("host"),
        "pid": component.get("pid"),
        "updated_at": component.get("updated_at"),
    }


def sink_view(row: dict[str, Any], *, now: float) -> dict[str, Any]:
    """An event sink's delivery state: ``ok``, ``failing`` (retrying) or ``disabled``."""
    state = "disabled" if row.get("disabled_at") is not None else (
        "failing" if row.get("failing_since") is not None else "ok")
    return {
        "name": row["name"],
        "state": state,
        "last_id": row["last_id"],
        "delivered": row.get("delivered", 0),
        "failing_for": _age(now, row.get("failing_since")),
        "last_error": row.get("last_error"),
        "holder": row.get("holder"),
        "disabled_at": row.get("disabled_at"),
    }


def outbox_backlog(config, store, *, now: float, owners: Sequence[str] | None = None) -> dict[str, Any]:
    """Mails still pending after ``notify.retry.max_attempts`` transient failures: they are
    never given up (the server may be down for a day) but the admin must hear of them.
    ``config_count``/``config_error``: pending mails whose last failure was a configuration
    problem of the service (the newest such error, with its fix), whatever their attempts.
    ``owners``: only the mails of their jobs (as :func:`collect_status`)."""
    pending = store.outbox_list(state="pending", limit=1000, owners=owners)
    stuck = [m for m in pending if m.attempts >= config.notify.retry.max_attempts]
    # Waiting on the admin (a refused sender address or login, TLS): known at the first attempt.
    misconfigured = [m for m in pending if (m.last_error or "").startswith(CONFIG_PROBLEM)]
    backoff = config.notify.retry.backoff
    return {
        "count": len(stuck),
        "oldest_age": _age(now, min(m.created_at for m in stuck)) if stuck else None,
        "last_error": max(stuck, key=lambda m: m.attempts).last_error if stuck else None,
        "retry_every": float(backoff[-1]) if backoff else 0.0,
        "config_count": len(misconfigured),
        "config_error": max(misconfigured, key=lambda m: m.id).last_error if misconfigured else None,
    }


def disk_view(label: str, path: Path) -> dict[str, Any]:
    """Free space of the filesystem holding ``path`` (or its nearest existing parent: an
    archive root is created by the first import)."""
    probe = Path(path)
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    try:
        usage = shutil.disk_usage(probe)
    except OSError as exc:
        return {"label": label, "path": str(path), "error": f"{exc.strerror or exc}"}
    return {
        "label": label,
        "path": str(path),
        "total": usage.total,
        "used": usage.used,
        "free": usage.free,
        "free_fraction": (usage.free / usage.total) if usage.total else None,
    }


def disks(config) -> list[dict[str, Any]]:
    """The data directory, the archive root (archive importer) and every watch folder."""
    entries: list[tuple[str, Path]] = [("data_dir", Path(config.data_dir))]
    if config.importer.kind == "archive":
        entries.append(("archive", Path(config.importer.archive.root)))
    for watch in config.watch:
        entries.append((f"watch:{watch.name}", Path(watch.path)))
    return [disk_view(label, path) for label, path in entries]


def orphaned_jobs(store, live_workers: set[str], *, owners: Sequence[str] | None = None,
                  now: float | None = None) -> list[str]:
    """One line per running job whose worker has no row any more (its process was killed, e.g.
    ``kill -9``, and pruned): the job is not lost, it goes back to the queue when its lease ends
    (it is not taken over earlier: a worker on another host, or under the same host name in
    another PID namespace, may still run it). At most the first 1000 running jobs are looked at."""
    now = time.time() if now is None else now
    jobs, _ = store.list_jobs(states=[JobState.RUNNING.value], limit=1000, files=False)
    out = []
    for job in jobs:
        if job.worker in live_workers or (owners is not None and job.owner not in owners):
            continue
        until = job.lease_expires_at
        when = (f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(until))} (in {max(0.0, until - now):.0f} s)"
                if until else "")
        out.append(f"job {job.id} is running on worker {job.worker}, which is gone; it goes back to the queue "
                   f"when its lease ends{when}")
    return out

def collect_status(config, store, importer=None, *, now: float | None = None,
                   owners: Sequence[str] | None = None) -> dict[str, Any]:
    """The admin view as plain data (JSON-able); ``healthy`` sums it up and ``problems`` says why not.

    ``owners``: the queue counts and the outbox figures and problems cover only their jobs (a token
    limited to owners).
    """
    now = time.time() if now is None else now
    problems: list[str] = []
    store.prune_workers(now=now)  # dead processes' rows, so health recovers with no worker running
    space = _space_problem(store)
    if space:
        problems.append(space)
    counts = store.counts(owners=owners)
    oldest = store.oldest_queued_at(owners=owners)
    workers = [
        worker_view(c, heartbeat_seconds=config.workers.heartbeat_seconds, now=now)
        for c in store.components("worker")
    ]
    watchers = [
        watcher_view(c, unhealthy_after=config.notify.watcher_unhealthy_after, now=now)
        for c in store.components("watcher")
    ]
    # Every pending count (status, the dashboard's queue box, pending panel and watchers table)
    # is this one: the store's pending list, scoped like GET /api/v1/pending.
    pending = pending_counts(store, owners)
    for w in watchers:
        here = pending.get(w["name"], {"acquisitions": 0, "not_imported": 0})
        w["pending"], w["not_imported"] = here["acquisitions"], here["not_imported"]
    for w in workers:
        if not w["healthy"]:
            problems.append(f"worker {w['name']}: {w['problem']}")
    problems += orphaned_jobs(store, {w["name"] for w in workers}, owners=owners, now=now)
    for w in watchers:
        if not w["healthy"]:
            problems.append(f"watcher {w['name']}: {w['problem']}")
    importer_status = importer_view(config, store, importer)
    # The dashboard links images to OMERO.web with it (as the owners' mails do).
    importer_status["web_url"] = (config.importer.omero.web_url or "").rstrip("/") or None
    if importer_status.get("ok") is False:
        problems.append(f"importer {importer_status['kind']}: {importer_status.get('error') or 'not ok'}")
    targets = [target_view(c, now=now) for c in store.components("target")]
    for tv in targets:
        if tv["paused"]:
            problems.append(f"importer target {tv['target']} paused since {tv['paused_for']:.0f} s: {tv['reason']}")
    sinks = [sink_view(s, now=now) for s in store.sinks()]
    for sv in sinks:
        if sv["state"] != "ok":
            problems.append(f"event sink {sv['name']} {sv['state']}: {sv['last_error']}")
    # A token limited to owners sees the figures and problems of their jobs' mails only, by the
    # same rule as the queue counts (web/auth.py Principal.owner_scope); mails of no job not at all.
    outbox = store.outbox_counts(owners=owners)
    if outbox.get("failed"):
        problems.append(f"outbox: {outbox['failed']} mail(s) could not be sent")
    backlog = outbox_backlog(config, store, now=now, owners=owners)
    if backlog["config_count"]:
        problems.append(
            f"outbox: {backlog['config_count']} mail(s) wait for a fix of the mail configuration "
            f"(they go out by themselves once it is made): {backlog['config_error']}"
        )
    if backlog["count"]:
        problems.append(
            f"outbox: {backlog['count']} mail(s) still undelivered after {config.notify.retry.max_attempts} "
            f"attempts or more (oldest queued {backlog['oldest_age']:.0f} s ago; last error: {backlog['last_error']}); "
            f"retried every {backlog['retry_every']:g} s at most until the mail server takes them"
        )
    disk = disks(config)
    for d in disk:
        if d.get("error"):
            problems.append(f"disk {d['label']} ({d['path']}): {d['error']}")
    folders = folder_view(store, now=now)
    for f in folders:
        if f["expired"]:
            problems.append(
                f"watch folder {f['folder']}: the lease of {f['holder']} on {f['host']} expired "
                f"{now - f['expires_at']:.0f} s ago and no other watcher took it over"
            )
    return {
        "generated_at": now,
        "version": __version__,
        "healthy": not problems,
        "problems": problems,
        "queue": {
            "counts": counts,
            "oldest_queued_at": oldest,
            "oldest_queued_age": _age(now, oldest),
        },
        "pending": {
            "acquisitions": sum(c["acquisitions"] for c in pending.values()),
            "not_imported": sum(c["not_imported"] for c in pending.values()),
        },
        "workers": workers,
        "watchers": watchers,
        "importer": {**importer_status, "targets": targets},
        "events": {"last_id": store.last_event_id(), "sinks": sinks},
        "outbox": {"counts": outbox, "backlog": backlog},
        "disk": disk,
        "store": store_view(store),
        "folders": folders,
        "hosts": hosts_view(workers, folders, watchers),
    }


def _space_problem(store) -> str | None:
    """The data disk full, as the store tells it (store/space.py), or None."""
    check = getattr(store, "space_problem", None)
    try:
        return check() if check is not None else None
    except Exception as exc:  # informative: a failed check must not break status or health
        return f"cannot check the data disk's free space: {exc}"


#: Per store (by id): the reason health last found it failing, so the log says it once per streak.
_health_failing: dict[int, str] = {}


def _say_store_streak(store, reason: str | None) -> None:
    """Log the store failing health once when a streak starts (not a traceback per poll), and its end."""
    key = id(store)
    before = _health_failing.get(key)
    if reason is None:
        if before is not None:
            del _health_failing[key]
            log.info("health: the job store answers again")
        return
    if before is None:
        if len(_health_failing) > 100:
            _health_failing.clear()
        _health_failing[key] = reason
        log.error("health: the job store fails (%s); health answers 503 until it recovers (said once)", reason)


def health(config, store, *, now: float | None = None) -> tuple[bool, dict[str, Any]]:
    """The load balancer's view: the store answers, its disk is not full, and no live worker
    missed its heartbeats.

    Returns ``(ok, {"status": "ok" | "unhealthy", "checks": {"store": {...}, "workers": {...}}})``,
    each check ``{"ok": bool, "detail": str | None}``. Total: any error of the store (a
    read or a write failing, a deleted ``-wal``, an I/O error) is the store check failing
    with the error as its detail, never an exception (the route answers 503, not 500).
    """
    now = time.time() if now is None else now
    checks: dict[str, Any] = {}
    said = False  # the store itself logs this failure (a CRITICAL broken file, a full disk): not again here
    try:
        store_ok = bool(store.ping())
        broken = getattr(store, "broken", None)  # deleted or replaced under this process (SQLiteStore.check_file)
        said = bool(broken)
        reason = (broken or getattr(store, "ping_error", None) or store.describe().get("error")) if not store_ok \
            else None
        checks["store"] = {
            "ok": store_ok,
            "detail": None if store_ok else (broken or f"the database does not answer{': ' + reason if reason else ''}"),
        }
    except Exception as exc:  # a broken store must yield 503, not 500
        store_ok = False
        checks["store"] = {"ok": False, "detail": f"the database does not answer: {exc}"}
    space = _space_problem(store) if store_ok else None
    if space:  # it answers reads, but takes no write: nothing can be recorded
        checks["store"] = {"ok": False, "detail": space}
        said = True
    workers_ok = True
    detail: list[str] = []
    if store_ok:
        try:
            store.prune_workers(now=now)
            for c in store.components("worker"):
                w = worker_view(c, heartbeat_seconds=config.workers.heartbeat_seconds, now=now)
                if not w["healthy"]:
                    workers_ok = False
                    detail.append(f"{w['name']}: {w['problem']}")
        except Exception as exc:  # it answered the ping, then failed a read or a write: still 503, not 500
            store_ok = False
            workers_ok, detail = True, []
            checks["store"] = {"ok": False, "detail": f"the database fails reads or writes: {exc}"}
    checks["workers"] = {"ok": workers_ok, "detail": "; ".join(detail) or None}
    ok = store_ok and not space and workers_ok
    _say_store_streak(store, None if checks["store"]["ok"] or said else checks["store"]["detail"])
    return ok, {"status": "ok" if ok else "unhealthy", "checks": checks}


__all__ = ["collect_status", "health", "HEARTBEAT_TOLERANCE"]
