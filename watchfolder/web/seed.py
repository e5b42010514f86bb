"""Compatibility with the seed system's import API (the Java import queue this service replaces).

Its clients POST a JSON array to ``/ome/import`` and get ``[{statusUri, targetUri}]``
back with 200, then read ``GET /ome/import/{id}`` as a plain-text log. Admins list
``GET /ome/failed/import`` and read or drop ``GET|DELETE /ome/failed/import/{id}``,
and list the mails that could not be delivered with ``GET /ome/failed/mail`` (each
read as text with ``GET /ome/failed/mail/{id}`` and dropped from the list with
``DELETE``; ``watchfolder mail resend ID`` queues one again).
Validation errors answer 400 ``{"reason": "..."}``, one line per problem, as the
seed did; nothing is queued unless every request in the array is valid.

As in the seed, ``/ome/import`` takes no bearer token: the OMERO session key is
the credential and the job runs in that session. Before anything is queued,
each distinct key is joined in OMERO by one long-lived child process
(:mod:`watchfolder.importers.omero_sessions`: one JSON line each way, a key
OMERO accepted remembered for ``server.seed_session_cache`` seconds); a key
OMERO rejects answers 403 and nothing is queued; OMERO (or the child) not
answering within ``server.seed_session_timeout`` answers 503. The job's owner, group and mail address are
the session's, not the body's (``experimenterEmail`` is checked for shape only).
Also stricter than the seed, deliberately:

- ``omeroHost``/``omeroPort`` must name the OMERO server this service imports
  into (``importer.omero``); otherwise anyone could make the service upload files
  from the allowed roots to a server of their choosing;
- ``targetUri`` must resolve under ``server.allowed_roots``.

The ``statusUri`` id is a random UUID (the job's idempotency key is
``ome-import:<uuid>``), so logs cannot be enumerated by counting job ids. The
failed-import routes need an admin token and show only the jobs that token may
see (its owners), through the API's one authorisation helper (``Api.visible``);
the failed-mail routes show a token limited to owners only the mails of those
owners' jobs (``Api.mail_visible``).

Since this route takes no token, it is also bounded: only ``application/json``
bodies (a web page cannot post JSON across origins without the browser asking
first, so no CSRF), at most ``server.seed_max_items`` items (413) and
``server.seed_rate_per_minute`` requests per client address (429). Its session
checks hold a server thread while OMERO thinks, so they go through a
:class:`~.gate.CheckGate`: at most ``server.seed_session_checks`` at once, and
a breaker that answers 503 at once for ``server.seed_session_pause`` seconds
after OMERO failed several in a row; every 503 carries ``Retry-After``. Every
refusal is logged for the admin.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import threading
import time
import urllib.parse
import uuid
from typing import Any

import bottle

from .. import defaults as D
from ..errors import AcquisitionError, ImportFailure, JobNotFound
from ..job import SEED_SOURCE_PREFIX, Job, JobSpec, JobState, Target
from ..watch.acquisition import from_path
from . import params
from .auth import AuthError, Forbidden, resolve_under_roots
from .gate import CheckGate, GateClosed
from .http import ApiError, BodyError, error_response, read_json_body

log = logging.getLogger(__name__)

IMPORT_PATH = "/ome/import"
FAILED_PATH = "/ome/failed/import"
FAILED_MAIL_PATH = "/ome/failed/mail"
SEED_PREFIX = "/ome/"
#: Failed mails looked at by the failed-mail routes (newest first); mails fail rarely.
FAILED_MAIL_LIMIT = 10_000
KEY_PREFIX = "ome-import:"
# Different session keys in one request: each is checked with OMERO (one round trip each).
MAX_SESSIONS = 4

_EMAIL = re.compile(r"[^@\s]+@[^@\s]+")


class SeedError(Exception):
    """A 4xx answered as ``{"reason": ...}``."""

    def __init__(self, reason: str, status: int = 400):
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _reason(reason: str, status: int = 400) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(json.dumps({"reason": reason}), status=status)
    response.content_type = "application/json"
    return response


def _text(body: str, status: int = 200) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(body, status=status)
    response.content_type = "text/plain; charset=utf-8"
    return response


def _positive(value: Any, field: str, errors: list[str]) -> int | None:
    """The seed took ids and ports as strings or numbers."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        errors.append(f"{field}: must be a positive whole number, got {value!r}")
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        errors.append(f"{field}: must be a positive whole number, got {value!r}")
        return None
    if not 0 < number <= params.INT64_MAX:  # OMERO ids are Java longs
        errors.append(f"{field}: must be a positive whole number below 2^63, got {value!r}")
        return None
    return number


def target_path(uri: str) -> str:
    """The local path of a ``file:`` URI (no host, or localhost) or of an absolute path."""
    if uri.lower().startswith("file:"):
        parsed = urllib.parse.urlsplit(uri)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(
                f"file URI {uri!r} names host {parsed.netloc!r}; only files on this server can be imported "
                "(use file:///path or a plain path)"
            )
        try:
            path = urllib.parse.unquote(parsed.path, errors="strict")
        except UnicodeDecodeError:
            raise ValueError(f"file URI {uri[:200]!r} does not percent-encode UTF-8; encode the path as UTF-8 "
                             "(RFC 8089)") from None
    else:
        path = uri
    bad = params.path_problem(path)
    if bad is not None:
        raise ValueError(f"the path {bad}")
    if not path.startswith("/"):
        raise ValueError(f"{uri!r} is not an absolute path or a file: URI")
    return path


def build_spec(config, item: Any, where: str, errors: list[str]) -> JobSpec | None:
    """Validate one seed request into a job spec; problems go to ``errors`` (labelled with ``where``)."""
    if not isinstance(item, dict):
        errors.append(f"{where}: must be a JSON object, got {type(item).__name__}")
        return None
    mine: list[str] = []

    def text(key: str, required: bool) -> str | None:
        value = item.get(key)
        if value is None or value == "":
            if required:
                mine.append(f"{key}: required")
            return None
        if not isinstance(value, str):
            mine.append(f"{key}: must be a string, got {value!r}")
            return None
        return value

    email = text("experimenterEmail", True)
    if email is not None and not _EMAIL.fullmatch(email.strip()):
        mine.append(f"experimenterEmail: not an email address: {email!r}")
    uri = text("targetUri", True)
    host = text("omeroHost", True)
    session_key = text("sessionKey", True)
    port = _positive(item.get("omeroPort"), "omeroPort", mine) or D.OMERO_PORT
    omero = config.importer.omero
    if host is not None and (host.strip().lower() != omero.host.lower() or port != omero.port):
        mine.append(
            f"omeroHost, omeroPort: {host}:{port} is not the OMERO server this service imports into "
            f"({omero.host}:{omero.port}); send requests for another server to that server's import service"
        )
    dataset_id = _positive(item.get("datasetId"), "datasetId", mine)
    screen_id = _positive(item.get("screenId"), "screenId", mine)
    if dataset_id and screen_id:
        mine.append("datasetId and screenId are mutually exclusive")
    name = text("name", False)
    description = text("description", False)
    text_annotations: list[list[str]] = []
    raw_annotations = item.get("textAnnotations") or []
    if not isinstance(raw_annotations, list):
        mine.append("textAnnotations: must be an array of [namespace, text] pairs")
        raw_annotations = []
    for i, pair in enumerate(raw_annotations):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(s, str) and s for s in pair)
        ):
            mine.append(f"textAnnotations[{i}]: must be [namespace, text] with both non-empty, got {pair!r}")
        else:
            text_annotations.append([pair[0], pair[1]])
    annotation_ids: list[int] = []
    raw_ids = item.get("annotationIds") or []
    if not isinstance(raw_ids, list):
        mine.append("annotationIds: must be an array of ids")
        raw_ids = []
    for i, value in enumerate(raw_ids):
        number = _positive(value, f"annotationIds[{i}]", mine)
        if number is not None:
            annotation_ids.append(number)

    path = None
    if uri is not None:
        try:
            path = resolve_under_roots(target_path(uri), config.server.allowed_roots)
        except (ValueError, Forbidden) as exc:
            mine.append(f"targetUri: {exc}")
    spec = None
    if not mine and path is not None:
        target = Target(dataset_id=dataset_id) if dataset_id else Target(screen_id=screen_id) if screen_id else Target()
        try:
            spec = from_path(
                path,
                source=SEED_SOURCE_PREFIX + email.strip(),
                owner=email.strip(),
                email=email.strip(),
                # No container: the images are imported orphaned, as the seed did.
                target=target,
                name=name,
                description=description,
                idempotency_key=KEY_PREFIX + str(uuid.uuid4()),
                allow_hard_links=config.server.allow_hard_links,
            )
            for entry in spec.files:
                resolve_under_roots(f"{spec.root}/{entry.path}", config.server.allowed_roots)
        except (AcquisitionError, Forbidden) as exc:
            mine.append(f"targetUri: {exc}")
            spec = None
    if mine:
        errors.extend(f"{where}: {m}" for m in mine)
        return None
    assert spec is not None and session_key is not None
    return dataclasses.replace(
        spec,
        importer="omero",
        session_key=session_key,
        omero_host=omero.host,
        omero_port=omero.port,
        extra={**spec.extra, "text_annotations": text_annotations, "annotation_ids": annotation_ids},
    )


def import_id(job: Job) -> str:
    """The id clients see: the UUID for seed jobs, the job id for others."""
    key = job.idempotency_key
    return key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else str(job.id)


def find_import(store, ident: str, *, numeric: bool) -> Job | None:
    """The job behind an import id; numeric job ids only where ``numeric`` (admin routes)."""
    try:
        uuid.UUID(ident)
    except ValueError:
        job_id = params.positive_id(ident) if numeric else None
        if job_id is not None:
            try:
                return store.get(job_id)
            except JobNotFound:
                return None
        return None
    return store.find(KEY_PREFIX + ident)


class RateLimiter:
    """At most ``per_minute`` requests per client address, as a token bucket (bursts up to ``per_minute``).

    Thread-safe; remembers at most ``max_clients`` addresses (the least recently seen go first).
    """

    def __init__(self, per_minute: int, max_clients: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(per_minute)
        self.max_clients = max_clients
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def allow(self, client: str, now: float | None = None) -> float:
        """0 when ``client`` may go ahead (one token taken), else the seconds to wait."""
        now = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
            self._buckets[client] = (tokens - 1 if wait == 0 else tokens, now)
            while len(self._buckets) > self.max_clients:
                del self._buckets[next(iter(self._buckets))]
            return wait


def install(app: bottle.Bottle, api) -> None:
    """Mount the seed routes on the API's app."""
    config, store = api.config, api.store
    limiter = RateLimiter(config.server.seed_rate_per_minute)
    checker: list = []
    # Checks hold a server thread while OMERO thinks: a few at once, and none while OMERO fails.
    gate = CheckGate(config.server.session_checks, failures=D.SEED_BREAKER_FAILURES,
                     pause=config.server.seed_session_pause)
    api.session_gate = gate

    def session_owner(key: str) -> dict[str, Any]:
        """Whose session ``key`` is, asked of OMERO (ImportFailure when rejected or unreachable)."""
        if not checker:
            if api.session_checker is not None:
                checker.append(api.session_checker)
            else:
                importer = api.importer if hasattr(api.importer, "session_info") else None
                if importer is None:
                    from ..importers import create_importer  # only when serving seed clients

                    importer = create_importer(config)
                checker.append(importer.session_info)
        return gate.run(checker[0], key)
    max_items = config.server.seed_max_items

    def admin() -> Any:
        """The caller's principal when it holds an admin token, else the error response."""
        try:
            principal = api.principal()
            principal.require("manage", "use the failed-import routes")
        except AuthError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="watchfolder"'} if exc.status == 401 else None
            return error_response(exc.status, str(exc), None, headers)
        return principal

    def admin_only(handler):
        """A route for admin tokens: the handler gets the principal first, others get the error."""

        @functools.wraps(handler)
        def route(*args, **kwargs):
            principal = admin()
            if isinstance(principal, bottle.HTTPResponse):
                return principal
            return handler(principal, *args, **kwargs)

        return route

    def refuse(reason: str, status: int = 400, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
        # Every reason, on one line: an admin watching for abuse wants the foreign host and the
        # path outside the roots, not only the first item's bad address.
        log.warning("POST %s from %s refused (%d): %s", IMPORT_PATH, bottle.request.remote_addr or "?", status,
                    "; ".join(line for line in reason.splitlines() if line.strip()) if reason else "")
        response = _reason(reason, status)
        for key, value in (headers or {}).items():
            response.set_header(key, value)
        return response

    @app.post(IMPORT_PATH)
    def post_import():
        wait = limiter.allow(bottle.request.remote_addr or "?")
        if wait:
            return refuse(
                f"too many requests from this address (server.seed_rate_per_minute is "
                f"{config.server.seed_rate_per_minute}); try again in {wait:.0f} s",
                429, {"Retry-After": str(max(1, round(wait)))},
            )
        try:
            params.require_json(bottle.request.environ)
            body = read_json_body(bottle.request.environ, api.max_body)
        except ApiError as exc:
            return refuse(exc.error, exc.status)
        except BodyError as exc:  # the seed answered every bad value with 400
            return refuse(exc.message, 400 if exc.status == 422 else exc.status)
        if body is None:
            return _json_list([])
        if not isinstance(body, list):
            return refuse(f"the body must be a JSON array of import requests, got {type(body).__name__}")
        if len(body) > max_items:
            return refuse(f"{len(body)} import requests in one body; the limit is {max_items} "
                          "(server.seed_max_items): send them in several requests", 413)
        # After the checks of the body's type and size (415, 413), as on an OMERO instance.
        if config.importer.kind != "omero":
            return refuse(
                f"this service imports with importer {config.importer.kind!r}, not into OMERO, so it cannot "
                "use OMERO session keys; submit with POST /api/v1/jobs and a bearer token instead"
            )
        errors: list[str] = []
        specs: list[tuple[JobSpec, str]] = []
        for i, item in enumerate(body):
            if item is None:
                continue
            spec = build_spec(config, item, f"request {i}", errors)
            if spec is not None:
                specs.append((spec, item["targetUri"]))
        if errors:
            return refuse("\n".join(errors))
        # The session key is the credential: OMERO must accept it before anything is
        # queued, and the job belongs to the session's user, whatever the body claims.
        keys = {spec.session_key for spec, _ in specs}
        if len(keys) > MAX_SESSIONS:  # each costs a round trip to OMERO in a child process
            return refuse(f"{len(keys)} different session keys in one request; send at most {MAX_SESSIONS} "
                          "(one user's imports per request, as the seed's clients do)", 413)
        owners: dict[str, dict[str, Any]] = {}
        for index, (spec, uri) in enumerate(specs):
            key = spec.session_key or ""
            if key not in owners:
                try:
                    owners[key] = session_owner(key)
                except GateClosed as exc:  # refused at once: OMERO is not asked
                    return refuse(f"cannot check the session key with OMERO now: {exc.reason}; nothing was "
                                  f"queued: try again later (in {exc.retry_after} s)", 503,
                                  {"Retry-After": str(exc.retry_after)})
                except ImportFailure as exc:
                    if exc.transient or exc.config_error:  # not the client's fault
                        retry = gate.retry_after()
                        return refuse(f"cannot check the session key with OMERO now ({exc.message}); "
                                      f"nothing was queued: try again later (in {retry} s)", 503,
                                      {"Retry-After": str(retry)})
                    return refuse(f"request for {uri}: sessionKey: {exc.message}; nothing was queued: log in "
                                  "to OMERO again and send a fresh session key", 403)
            who = owners[key]
            described = spec.extra.get("descriptor_owner")
            if described and described != who["user"]:  # someone else's described data (issue 10, finding I)
                return refuse(f"request for {uri}: targetUri: the acquisition's manifest or sidecar names owner "
                              f"{described!r}, but the session is {who['user']!r}'s; nothing was queued: import "
                              "your own data, or have the owner fix the manifest")
            specs[index] = (dataclasses.replace(spec, owner=who["user"], email=who.get("email") or None,
                                                group=who.get("group") or None,
                                                source=SEED_SOURCE_PREFIX + who["user"]), uri)
        out = []
        for spec, uri in specs:
            job, _created = api.batcher.enqueue(spec, "submitted through /ome/import (seed API)")
            for warning in spec.extra.get("warnings", ()):
                store.log(job.id, f"warning: {warning}")
            out.append({"statusUri": f"{IMPORT_PATH}/{import_id(job)}", "targetUri": uri})
        return _json_list(out)

    @app.get(IMPORT_PATH + "/<ident>")
    def get_import(ident: str):
        job = find_import(store, ident, numeric=False)
        if job is None:
            return _text(f"no import {ident}\n", 404)
        return _text(store.read_log(job.id))

    @app.get(FAILED_PATH)
    @admin_only
    def list_failed(principal):
        paths: list[str] = []
        cursor = None
        while True:
            jobs, cursor = store.list_jobs(states=[str(JobState.FAILED)], dismissed=False, limit=1000, cursor=cursor)
            paths += [f"{FAILED_PATH}/{import_id(j)}" for j in jobs if api.visible(principal, j)]
            if cursor is None:
                break
        return _json_list(paths)

    def failed_job(principal, ident: str) -> Job | None:
        job = find_import(store, ident, numeric=True)
        if job is None or job.state != JobState.FAILED or job.dismissed_at is not None:
            return None
        return job if api.visible(principal, job) else None

    @app.get(FAILED_PATH + "/<ident>")
    @admin_only
    def get_failed(principal, ident: str):
        job = failed_job(principal, ident)
        if job is None:
            return _text(f"no failed import {ident}\n", 404)
        return _text(store.read_log(job.id))

    def failed_mails(principal) -> list:
        return [m for m in store.outbox_list(state="failed", limit=FAILED_MAIL_LIMIT)
                if api.mail_visible(principal, m)]

    def failed_mail(principal, ident: str):
        mail_id = params.positive_id(ident)
        if mail_id is None:
            return None
        return next((m for m in failed_mails(principal) if m.id == mail_id), None)

    @app.get(FAILED_MAIL_PATH)
    @admin_only
    def list_failed_mail(principal):
        return _json_list([f"{FAILED_MAIL_PATH}/{m.id}" for m in failed_mails(principal)])

    @app.get(FAILED_MAIL_PATH + "/<ident>")
    @admin_only
    def get_failed_mail(principal, ident: str):
        mail = failed_mail(principal, ident)
        if mail is None:
            return _text(f"no failed mail {ident}\n", 404)
        return _text(_failed_mail_text(mail))

    @app.delete(FAILED_MAIL_PATH + "/<ident>")
    @admin_only
    def delete_failed_mail(principal, ident: str):
        mail = failed_mail(principal, ident)
        if mail is not None and store.outbox_dismiss(mail.id) is not None:
            log.info("failed mail %d (%s) dismissed by %s", mail.id, mail.kind, principal.source)
        # Nothing to drop (or not this token's to see) answers the same, as for failed imports.
        return bottle.HTTPResponse(status=204)

    @app.delete(FAILED_PATH + "/<ident>")
    @admin_only
    def delete_failed(principal, ident: str):
        job = failed_job(principal, ident)
        if job is not None:  # nothing to drop (or not this token's to see) answers the same
            store.dismiss(job.id, by=principal.source)
        return bottle.HTTPResponse(status=204)


def default_error(status: int, method: str, path: str, allow: str = "") -> str:
    """The body of an answer no seed route gave (no such route, wrong method), in the seed's shape.

    Sets the content type: ``text/plain`` for a ``GET`` under the routes that answer
    text (``/ome/import/…``, ``/ome/failed/…``: an id with a ``/`` in it, such as
    ``%2Fome%2Ffailed%2Fimport%2F5``, names no route), ``{"reason": …}`` otherwise.
    """
    if status == 404 and method == "GET" and path.startswith((IMPORT_PATH + "/", FAILED_PATH + "/",
                                                               FAILED_MAIL_PATH + "/")):
        bottle.response.content_type = "text/plain; charset=utf-8"
        return f"no such import or failed item: {path}\n"
    bottle.response.content_type = "application/json"
    if status == 404:
        reason = f"no such seed route: {method} {path}; the seed routes are under {SEED_PREFIX}"
    elif status == 405:
        reason = f"method {method} not allowed on {path}; allowed: {allow}"
    else:
        reason = f"request refused ({status})"
    return json.dumps({"reason": reason})


def _failed_mail_text(mail) -> str:
    """A failed mail as the seed showed it: why it failed, then the message as it would have gone out."""
    head = [
        f"mail {mail.id} ({mail.kind}) could not be delivered after {mail.attempts} attempt(s)",
        f"to: {', '.join(mail.recipients)}",
        f"subject: {mail.subject}",
        f"last error: {mail.last_error or '(none recorded)'}",
        f"job: {mail.job_id if mail.job_id is not None else '-'}",
        f"send it again with: watchfolder mail resend {mail.id}",
        "",
    ]
    return "\n".join(head) + "\n" + mail.raw.decode("utf-8", "replace")


def _json_list(data: list) -> bottle.HTTPResponse:
    response = bottle.HTTPResponse(json.dumps(data), status=200)
    response.content_type = "application/json"
    return response


__all__ = ["install", "build_spec", "target_path", "import_id"]
