"""The REST API under ``/api/v1``: jobs, status, whoami and health (see ``api/openapi.yaml``).

A thin shell: each handler checks the token, calls one package function and
turns package exceptions into ``{"error": ..., "detail": ...}`` with the right
status code. The seed-compatible ``/ome/...`` routes live in :mod:`.seed`.

``POST /api/v1/jobs`` body (see ``JobRequest`` in the OpenAPI document)::

    {"path": "/data/drop/jdoe/slide3",          # required, absolute, under server.allowed_roots
     "owner": "jdoe", "group": "lab", "email": "jdoe@example.org",
     "target": {"project": "P", "dataset": "D"},
     "name": "...", "description": "...", "annotations": {"k": "v"},
     "idempotency_key": "...", "session_key": "..."}
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import bottle

from .. import defaults as D
from ..errors import AcquisitionError, JobNotFound
from ..events.cloudevents import envelope
from ..job import Job, JobState, Target
from ..status import collect_status, health
from ..watch.acquisition import annotation_field, annotation_problem, from_path
from ..watch.explain import pending_view
from . import params
from .auth import Principal, TokenVerifier, resolve_roots, resolve_under_roots
from .http import (
    API,
    RETRY_AFTER_SECONDS,
    ApiError,
    BodyError,
    api_errors,
    invalid,
    json_response,
    problem,
    read_json_body,
)
from .metrics import make_registry

log = logging.getLogger(__name__)

MAX_PAGE = 500
#: Event ids are SQL BIGINTs.
MAX_EVENT_ID = 2**63 - 1

JOB_REQUEST_FIELDS = (
    "path", "owner", "group", "email", "target", "name", "description", "annotations",
    "idempotency_key", "session_key",
)
_TEXT_FIELDS = ("owner", "group", "email", "name", "description", "session_key", "idempotency_key")
# Optional text the contract allows empty: "" means "not given".
_MAY_BE_EMPTY = ("group", "email", "name", "description")


def _unknown_field(key: str, known: tuple[str, ...]) -> dict[str, str]:
    hint = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    fix = f"did you mean {hint[0]!r}?" if hint else f"known fields: {', '.join(known)}"
    return problem(str(key), f"unknown field; {fix}")


def parse_job_request(body: Any) -> tuple[dict[str, Any], list[dict[str, str]]]:
    """Validate a ``POST /jobs`` body: ``(clean fields, problems)``; every problem names its field."""
    if not isinstance(body, dict):
        return {}, [problem("(body)", f"must be a JSON object such as {{\"path\": ...}}, got {type(body).__name__}")]
    problems = [_unknown_field(k, JOB_REQUEST_FIELDS) for k in body if k not in JOB_REQUEST_FIELDS]
    clean: dict[str, Any] = {}
    path = body.get("path")
    if path is None:
        problems.append(problem("path", "required: the absolute path of the acquisition on this server"))
    elif not isinstance(path, str) or not path.strip():
        problems.append(problem("path", f"must be a non-empty string, got {path!r}"))
    elif (bad := params.path_problem(path)) is not None:
        problems.append(problem("path", bad))
    elif not os.path.isabs(path):
        problems.append(problem("path", f"must be absolute (start with /), got {path!r}"))
    else:
        clean["path"] = path
    for key in _TEXT_FIELDS:
        value = body.get(key)
        if value is None or (key in _MAY_BE_EMPTY and isinstance(value, str) and not value.strip()):
            continue
        if not isinstance(value, str) or not value.strip() or "\x00" in value:
            problems.append(problem(key, f"must be a non-empty string, got {value!r}"))
        elif key == "idempotency_key" and len(value) > 200:
            problems.append(problem(key, f"must be at most 200 characters, got {len(value)}"))
        elif key in ("owner", "group") and ("/" in value or any(c.isspace() for c in value)):
            problems.append(problem(key, f"must be a user or group name without spaces or '/', got {value!r}"))
        elif key == "email" and ("@" not in value or any(c.isspace() for c in value.strip())):
            problems.append(problem(key, f"must be an address such as jdoe@example.org, got {value!r}"))
        else:
            clean[key] = value.strip() if key != "session_key" else value
    if body.get("target") is not None:
        try:
            clean["target"] = Target.from_dict(body["target"], where="target")
        except AcquisitionError as exc:
            problems.append(problem("target", str(exc)))
    annotations = body.get("annotations")
    if annotations is not None:
        if not isinstance(annotations, dict):
            problems.append(problem("annotations", 'must be an object of text values such as {"objective": "63x"}'))
        else:
            for k, v in annotations.items():
                bad = annotation_problem(k, v)
                if bad is not None:
                    problems.append(problem(annotation_field(k), bad))
            clean["annotations"] = dict(annotations)
    return clean, problems


def _int_param(query, name: str, default: int, low: int, high: int, problems: list) -> int:
    """A whole-number query parameter between ``low`` and ``high``; a bad one adds a problem."""
    raw = query.get(name)
    if raw is None:
        return default
    try:
        return params.whole_number(raw, name, low, high)
    except ApiError as exc:
        problems += exc.detail
        return default


def parse_time(value: str, field: str) -> float:
    """Unix seconds or ISO 8601 (naive means UTC); 422 naming ``field`` otherwise (NaN and infinities too)."""
    bad = invalid([problem(field, f"must be Unix seconds or ISO 8601 such as 2026-11-28T10:00:00Z, got {value!r}")])
    try:
        seconds = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
        except (ValueError, OverflowError):
            raise bad from None
    if not math.isfinite(seconds) or abs(seconds) > 1e11:  # beyond year 5000: a typo
        raise bad
    return seconds


# ---------------------------------------------------------------------------
# Writing jobs


class EnqueueBatcher:
    """Group commit for the API's enqueues: one writer at a time, several jobs per transaction.

    A request thread queues its spec, then takes the write lock; if no earlier
    writer has stored its job meanwhile, it writes everything waiting (its own
    included) in one transaction (``JobStore.enqueue_many``). Under
    load one commit covers many jobs; without load a request writes its own job
    with no hand-over to another thread. Threads wait on a Python lock rather
    than in SQLite's busy handler, which sleeps in steps of up to 100 ms.
    """

    def __init__(self, store, *, max_batch: int = 64) -> None:
        self.store = store
        self.max_batch = max_batch
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()

    def enqueue(self, spec, note: str) -> tuple[Job, bool]:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((spec, note, future))
        while not future.done():
            with self._lock:
                batch = []
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if batch:
                    self._write(batch)
        return future.result()

    def _write(self, batch: list) -> None:
        if len(batch) > 1:
            try:
                results = self.store.enqueue_many([(spec, note) for spec, note, _ in batch])
            except Exception:  # one bad job must not fail the others: write each alone
                log.exception("batched enqueue failed; writing the %d jobs one by one", len(batch))
            else:
                for (_, _, future), result in zip(batch, results, strict=True):
                    future.set_result(result)
                return
        for spec, note, future in batch:
            try:
                future.set_result(self.store.enqueue(spec, note=note))
            except BaseException as exc:  # handed to the waiting request thread
                future.set_exception(exc)


# ---------------------------------------------------------------------------
# The application


class Api:
    """What the handlers share: config, store, token verifier. Also used by :mod:`.seed`."""

    def __init__(self, config, store, importer=None) -> None:
        self.config = config
        self.store = store
        self.importer = importer
        self.session_checker = None  # set by create_app; see seed.install
        self.session_gate = None  # the seed route's CheckGate (web/gate.py), set by seed.install
        self.verifier = TokenVerifier(config.server.tokens)
        self.max_body = config.server.max_body_bytes
        self.registry = make_registry(config, store)
        self.batcher = EnqueueBatcher(store)
        # Roots are config: resolve them once, not on every request.
        self.allowed_roots = resolve_roots(config.server.allowed_roots)
        self.token_roots = {p.roots: resolve_roots(p.roots) for p in self.verifier.principals()}

    # -- helpers -----------------------------------------------------------

    def principal(self) -> Principal:
        # The raw WSGI value (Latin-1 text): bottle's header view decodes UTF-8 and fails on other bytes.
        return self.verifier.verify(bottle.request.environ.get("HTTP_AUTHORIZATION"))

    def body(self) -> Any:
        """The request's JSON body: 415 unless sent as application/json, 413 too large, 400 not JSON."""
        params.require_json(bottle.request.environ)
        try:
            return read_json_body(bottle.request.environ, self.max_body)
        except BodyError as exc:
            raise ApiError(exc.status, exc.message, exc.detail) from None

    def job_url(self, job_id: int) -> str:
        base = (self.config.server.public_url or "").rstrip("/")
        return f"{base}{API}/jobs/{job_id}"

    def visible(self, principal: Principal, job: Job) -> bool:
        return principal.may_read(job.owner, job.source)

    def mail_visible(self, principal: Principal, mail) -> bool:
        """An outbox mail as its job is visible; a mail of no job (watcher alerts, admin digests) only to
        tokens limited to no owner."""
        if not principal.owners:
            return principal.can("read")
        if mail.job_id is None:
            return False
        try:
            return self.visible(principal, self.store.get(mail.job_id))
        except JobNotFound:
            return False

    def visible_job(self, principal: Principal, job_id: int) -> Job:
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            job = None
        if job is None or not self.visible(principal, job):
            raise ApiError(404, f"no job {job_id} visible to token {principal.name!r}")
        return job

    def check_paths(self, principal: Principal, path: str) -> str:
        token_roots = self.token_roots.get(principal.roots)
        if token_roots is None:  # a principal not from the config's tokens
            token_roots = resolve_roots(principal.roots)
        return resolve_under_roots(path, self.allowed_roots, token_roots, roots_resolved=True)

    # -- events ----------------------------------------------------------------

    def event_visible(self, principal: Principal, event: dict[str, Any]) -> bool:
        """Job events as the job is visible; watcher events to tokens that read the status view."""
        owner = event.get("owner")
        if event.get("job_id") is None:
            return principal.can("status") and not principal.owners
        if owner is None or not principal.may_see_owner(owner):
            return False
        if principal.can("read"):
            return True
        return principal.can("read_own") and (event.get("data") or {}).get("source") == principal.source

    def list_events(self, principal: Principal, query: bottle.MultiDict) -> dict[str, Any]:
        """``GET /events?after=&limit=``: CloudEvents after an id, oldest first, as this token may see them."""
        problems = []
        after = _int_param(query, "after", 0, 0, MAX_EVENT_ID, problems)
        limit = _int_param(query, "limit", 100, 1, MAX_PAGE, problems)
        unknown = [k for k in query.keys() if k not in ("after", "limit")]
        problems += [problem(k, "unknown parameter; use after and limit") for k in unknown]
        if problems:
            raise invalid(problems)
        newest = self.store.last_event_id()
        if after > newest:
            raise ApiError(409, f"after={after} is past the newest event id of this store ({newest}): the store was "
                                "replaced or restored from a backup; start again with after=0 and de-duplicate "
                                "on (source, id)")
        source = self.config.events.source
        out: list[dict[str, Any]] = []
        position = after
        more = False
        for _ in range(20):  # bounded work per request: the next page goes on from next_after
            batch = self.store.events_after(position, limit=limit)
            for event in batch:
                if len(out) == limit:
                    more = True
                    break
                position = event["id"]
                if self.event_visible(principal, event):
                    out.append(envelope(event, source))
            if more or len(batch) < limit:
                break
        else:
            more = True
        return {"events": out, "next_after": position, "has_more": more}

    # -- jobs ----------------------------------------------------------------

    def submit(self, principal: Principal, body: Any) -> tuple[Job, bool]:
        principal.require("submit", "submit jobs")
        fields, problems = parse_job_request(body)
        if problems:
            raise invalid(problems)
        if "session_key" in fields and self.config.importer.kind != "omero":
            raise invalid([problem(
                "session_key",
                f"this server imports with importer {self.config.importer.kind!r}, not omero; leave session_key out",
            )])
        real = self.check_paths(principal, fields["path"])
        if "owner" in fields:
            principal.check_owner(fields["owner"])
        try:
            spec = from_path(
                real,
                source=principal.source,
                owner=fields.get("owner"),
                group=fields.get("group"),
                email=fields.get("email"),
                target=fields.get("target"),
                name=fields.get("name"),
                description=fields.get("description"),
                annotations=fields.get("annotations"),
                manifest_name=D.MANIFEST_NAME,
                sidecar_suffix=D.SIDECAR_SUFFIX,
                idempotency_key=(
                    f"{principal.source}:{fields['idempotency_key']}" if "idempotency_key" in fields else None
                ),
                resolved=True,  # check_paths resolved it
                allow_hard_links=self.config.server.allow_hard_links,
                owner_may_override=False,  # a client may not reassign described data (issue 10, finding I)
            )
        except AcquisitionError as exc:
            message = str(exc)
            field = "owner" if (": no owner;" in message or " contradicts the owner " in message) else "target" if ": no target;" in message else "path"
            raise invalid([problem(field, message)]) from None
        principal.check_owner(spec.owner)
        # No per-file check needed: from_path refuses files that resolve outside the
        # acquisition folder, and the folder itself was checked above.
        if "session_key" in fields:
            omero = self.config.importer.omero
            spec = dataclasses.replace(
                spec, session_key=fields["session_key"], omero_host=omero.host, omero_port=omero.port
            )
        job, created = self.batcher.enqueue(spec, f"submitted by token {principal.name}")
        if created:
            for warning in spec.extra.get("warnings", ()):
                self.store.log(job.id, f"warning: {warning}")
        return job, created

    def list_jobs(self, principal: Principal, query: bottle.MultiDict) -> dict[str, Any]:
        """``query``: from :func:`.params.query` (UTF-8). Every bad parameter is named in one 422."""
        problems: list[dict[str, str]] = []
        known = ("state", "owner", "source", "since", "until", "limit", "cursor", "q")
        problems += [_unknown_field(k, known) for k in query.keys() if k not in known]
        states: list[str] = []
        names = ", ".join(str(v) for v in JobState)
        for raw in query.getall("state"):
            given = [x.strip() for x in raw.split(",")]
            if not all(given):
                problems.append(problem("state", f"must list states separated by commas ({names}), got {raw!r}"))
            for s in filter(None, given):
                if s not in {str(v) for v in JobState}:
                    problems.append(problem("state", f"unknown state {s!r}; use {names}"))
                states.append(s)
        limit = 50
        since = until = cursor = None
        checks = (
            ("limit", lambda v: params.whole_number(v, "limit", 1, MAX_PAGE)),
            ("since", lambda v: parse_time(v, "since")),
            ("until", lambda v: parse_time(v, "until")),
            ("cursor", params.cursor),
        )
        parsed: dict[str, Any] = {}
        for key, parse in checks:
            if query.get(key) is None:
                continue
            try:
                parsed[key] = parse(query.get(key))
            except ApiError as exc:
                problems += exc.detail
        problems += params.filter_problems(query, ("owner", "source"))
        if problems:
            raise invalid(problems)
        limit = parsed.get("limit", limit)
        since, until, cursor = parsed.get("since"), parsed.get("until"), parsed.get("cursor")
        owner = query.get("owner") or None
        source = query.get("source") or None
        empty = {"jobs": [], "next_cursor": None}
        if not principal.can("read"):
            principal.require("read_own", "list jobs")
            mine = principal.source
            if source and not (source == mine or (source.endswith("*") and mine.startswith(source[:-1]))):
                return empty
            source = mine
        post_filter = False
        if principal.owners:
            if owner is not None:
                if owner not in principal.owners:
                    return empty
            elif len(principal.owners) == 1:
                owner = principal.owners[0]
            else:
                post_filter = True
        filters = {"states": states or None, "owner": owner, "source": source, "since": since, "until": until}
        text = (query.get("q") or "").strip().casefold()
        jobs, next_cursor = self._page(principal, filters, limit, cursor, post_filter or bool(text),
                                       (lambda job: text in _searchable(job)) if text else None)
        return {"jobs": [j.to_dict(history=False) for j in jobs], "next_cursor": next_cursor}

    def pending(self, principal: Principal, query: bottle.FormsDict) -> dict[str, Any]:
        """Pending acquisitions the token may see: all (read role, within its owners), else its owners' only."""
        known = ("watch", "owner", "limit")
        problems = [_unknown_field(k, known) for k in query.keys() if k not in known]
        limit = 500
        if query.get("limit") is not None:
            try:
                limit = params.whole_number(query.get("limit"), "limit", 1, 10_000)
            except ApiError as exc:
                problems += exc.detail
        problems += params.filter_problems(query, ("watch", "owner"))
        if query.get("watch"):
            # This host's watch folders and those any watcher sharing the store reports.
            known = {w.name for w in self.config.watch} | {c["name"] for c in self.store.components("watcher")}
            problems += params.one_of(query.get("watch"), "watch", sorted(known), "watch folder")
        if problems:
            raise invalid(problems)
        if not principal.can("read"):
            principal.require("read_own", "list pending acquisitions")
        owner = query.get("owner") or None
        # A watcher may not know an acquisition's owner yet: only unrestricted readers see those.
        if owner is None and len(principal.owners) == 1:
            owner = principal.owners[0]
        entries = self.store.pending_list(watch=query.get("watch") or None, owner=owner, limit=limit)
        return {"pending": pending_view([e for e in entries if principal.may_see_pending(e.owner)])}

    def status(self, principal: Principal) -> dict[str, Any]:
        """``GET /status``: the admin view; a token limited to owners gets their counts and pending only."""
        principal.require("status", "read the status view")
        view = collect_status(self.config, self.store, self.importer, owners=principal.owner_scope)
        if principal.owner_scope is None:
            return view
        for watcher in view["watchers"]:
            shown = [p for p in watcher["pending_acquisitions"] if principal.may_see_pending(p.get("owner"))]
            watcher["pending_acquisitions"] = shown  # its counts are scoped by collect_status
        for worker in view["workers"]:
            job_id = worker.get("current_job")
            if job_id is not None:
                try:
                    job = self.store.get(job_id)
                except JobNotFound:
                    job = None
                if job is None or not self.visible(principal, job):
                    worker["current_job"] = None
        return view

    def _page(self, principal, filters, limit, cursor, post_filter, match=None) -> tuple[list[Job], str | None]:
        if not post_filter:
            return self.store.list_jobs(**filters, limit=limit, cursor=cursor)
        # A token limited to several owners: fill the page from successive store pages. The
        # cursor stays exact because every job of each store page was looked at.
        out: list[Job] = []
        for _ in range(50):
            jobs, cursor = self.store.list_jobs(**filters, limit=limit - len(out), cursor=cursor)
            out += [j for j in jobs if principal.may_see_owner(j.owner) and (match is None or match(j))]
            if cursor is None or len(out) >= limit:
                break
        return out, cursor


def _searchable(job: Job) -> str:
    """What the job list's text filter (``q``) looks in: folder, files, name, target, owner, reason."""
    spec = job.spec
    parts = [spec.root, spec.name or "", spec.description or "", spec.target.label, job.owner, job.source,
             job.error.message if job.error else "", str(job.id)]
    parts += [f.path for f in spec.files[:1000]]
    return "\n".join(parts).casefold()


def throughput(store, hours: float, now: float | None = None, owners: Sequence[str] | None = None) -> dict[str, Any]:
    """Acquisitions and bytes per hour (per 6 hours beyond two days) over the last ``hours`` (of ``owners``)."""
    now = time.time() if now is None else now
    bucket = 3600.0 if hours <= 48 else 6 * 3600.0
    since = (now // bucket + 1) * bucket - hours * 3600.0
    return {"since": since, "bucket": bucket,
            "buckets": store.throughput(since=since, bucket=bucket, now=now, owners=owners)}


def install(app: bottle.Bottle, api: Api) -> None:
    """Mount the ``/api/v1`` routes (jobs, status, whoami, health) on ``app``."""
    config, store = api.config, api.store

    @app.post(f"{API}/jobs")
    @api_errors
    def submit_job():
        principal = api.principal()
        principal.require("submit", "submit jobs")
        job, created = api.submit(principal, api.body())
        return json_response(job.to_dict(), 202 if created else 200, {"Location": api.job_url(job.id)})

    @app.get(f"{API}/jobs")
    @api_errors
    def list_jobs():
        principal = api.principal()
        return json_response(api.list_jobs(principal, params.query(bottle.request.environ)))

    @app.get(f"{API}/jobs/<ident>")
    @api_errors
    def get_job(ident: str):
        principal = api.principal()
        job_id = params.job_id(ident)
        return json_response(api.visible_job(principal, job_id).to_dict())

    @app.get(f"{API}/jobs/<ident>/log")
    @api_errors
    def get_log(ident: str):
        principal = api.principal()
        job_id = params.job_id(ident)
        job = api.visible_job(principal, job_id)
        response = bottle.HTTPResponse(store.read_log(job.id))
        response.content_type = "text/plain; charset=utf-8"
        return response

    @app.post(f"{API}/jobs/<ident>/retry")
    @api_errors
    def retry_job(ident: str):
        principal = api.principal()
        job_id = params.job_id(ident)
        principal.require("manage", "retry jobs")
        api.visible_job(principal, job_id)
        return json_response(store.retry(job_id, by=principal.source).to_dict())

    @app.post(f"{API}/jobs/<ident>/dismiss")
    @api_errors
    def dismiss_job(ident: str):
        principal = api.principal()
        job_id = params.job_id(ident)
        principal.require("manage", "dismiss failures")
        api.visible_job(principal, job_id)
        return json_response(store.dismiss(job_id, by=principal.source).to_dict())

    @app.get(f"{API}/throughput")
    @api_errors
    def get_throughput():
        principal = api.principal()
        principal.require("status", "read the throughput")
        raw = params.query(bottle.request.environ).get("hours", "24")  # empty is refused, as the enum says
        if raw not in ("24", "168"):
            raise invalid([problem("hours", f"must be 24 (a day) or 168 (a week), got {raw!r}")])
        return json_response(throughput(store, float(raw), owners=principal.owner_scope))

    @app.post(f"{API}/jobs/<ident>/cancel")
    @api_errors
    def cancel_job(ident: str):
        principal = api.principal()
        job_id = params.job_id(ident)
        principal.require("manage", "cancel jobs")
        api.visible_job(principal, job_id)
        return json_response(store.cancel(job_id, by=principal.source).to_dict())

    @app.get(f"{API}/events")
    @api_errors
    def list_events():
        principal = api.principal()
        return json_response(api.list_events(principal, params.query(bottle.request.environ)))

    @app.get(f"{API}/pending")
    @api_errors
    def list_pending():
        return json_response(api.pending(api.principal(), params.query(bottle.request.environ)))

    @app.get(f"{API}/status")
    @api_errors
    def get_status():
        return json_response(api.status(api.principal()))

    @app.get(f"{API}/whoami")
    @api_errors
    def whoami():
        p = api.principal()
        permissions = sorted(x for x in ("submit", "read", "read_own", "status", "manage") if p.can(x))
        return json_response({"name": p.name, "role": p.role, "owners": list(p.owners), "roots": list(p.roots),
                      "permissions": permissions})

    @app.get(f"{API}/health")
    def get_health():
        try:
            ok, data = health(config, store)  # total by design; this is the last guard against a 500
        except Exception as exc:
            log.error("health: %s: %s", type(exc).__name__, exc)
            ok, data = False, {"status": "unhealthy", "checks": {
                "store": {"ok": False, "detail": f"health could not be computed: {exc}"},
                "workers": {"ok": True, "detail": None}}}
        # The store down (or not reachable yet) is worth asking again soon; a stuck worker is not.
        retry = None if ok or data["checks"]["store"]["ok"] else {"Retry-After": RETRY_AFTER_SECONDS}
        return json_response(data, 200 if ok else 503, retry)


__all__ = ["Api", "install", "parse_job_request"]
