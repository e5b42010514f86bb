"""The REST API: a Bottle application over the package (see ``api/openapi.yaml``).

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
import importlib.resources
import json
import logging
import os
import queue
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import bottle

from . import defaults as D
from .acquisition import from_path, line_column
from .auth import AuthError, Principal, TokenVerifier, resolve_roots, resolve_under_roots
from .errors import AcquisitionError, InvalidTransition, JobNotFound, StoreError
from .job import Job, JobState, Target
from .metrics import exposition, make_registry
from .status import collect_status, health

log = logging.getLogger(__name__)

API = "/api/v1"
JSON_TYPE = "application/json"
MAX_PAGE = 500

JOB_REQUEST_FIELDS = (
    "path", "owner", "group", "email", "target", "name", "description", "annotations",
    "idempotency_key", "session_key",
)
_TEXT_FIELDS = ("owner", "group", "email", "name", "description", "session_key", "idempotency_key")


class ApiError(Exception):
    """An error answer: status, a human message with the fix, and structured detail."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def invalid(problems: list[dict[str, str]]) -> ApiError:
    """422 naming every bad field."""
    fields = ", ".join(p["field"] for p in problems)
    return ApiError(422, f"invalid or unknown field(s): {fields}", problems)


def problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


# ---------------------------------------------------------------------------
# Request bodies


class BodyError(Exception):
    """The body is too large (413) or not JSON (400); ``detail`` holds line and column."""

    def __init__(self, status: int, message: str, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def read_json_body(environ: dict, limit: int) -> Any:
    """Read and parse the request body, refusing more than ``limit`` bytes."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    if length > limit:
        raise BodyError(413, f"the body has {length} bytes; the limit is {limit} (server.max_body_bytes)")
    stream = environ["wsgi.input"]
    raw = stream.read(length) if length >= 0 else stream.read(limit + 1)
    if len(raw) > limit:
        raise BodyError(413, f"the body is larger than the limit of {limit} bytes (server.max_body_bytes)")
    if not raw.strip():
        raise BodyError(400, "the body is empty; send a JSON document", {"line": 1, "column": 1, "message": "empty"})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = line_column(raw, exc.start)
        raise BodyError(
            400,
            f"the body is not UTF-8 (bad byte at line {line}, column {column}); send UTF-8 JSON",
            {"line": line, "column": column, "message": "not UTF-8"},
        ) from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise BodyError(
            400,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            {"line": exc.lineno, "column": exc.colno, "message": exc.msg},
        ) from None


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
    elif not os.path.isabs(path):
        problems.append(problem("path", f"must be absolute (start with /), got {path!r}"))
    else:
        clean["path"] = path
    for key in _TEXT_FIELDS:
        value = body.get(key)
        if value is None:
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
                if not isinstance(v, str) or not k.strip():
                    problems.append(problem(f"annotations.{k}", f"must be a string with a non-empty key, got {v!r}"))
            clean["annotations"] = dict(annotations)
    return clean, problems


def parse_time(value: str, field: str) -> float:
    """Unix seconds or ISO 8601 (naive means UTC)."""
    try:
        return float(value)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise invalid([problem(field, f"must be Unix seconds or ISO 8601 such as 2026-11-28T10:00:00Z, got {value!r}")]) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


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
        self.verifier = TokenVerifier(config.server.tokens)
        self.max_body = config.server.max_body_bytes
        self.registry = make_registry(config, store)
        self.batcher = EnqueueBatcher(store)
        # Roots are config: resolve them once, not on every request.
        self.allowed_roots = resolve_roots(config.server.allowed_roots)
        self.token_roots = {p.roots: resolve_roots(p.roots) for p in self.verifier.principals()}

    # -- helpers -----------------------------------------------------------

    def principal(self) -> Principal:
        return self.verifier.verify(bottle.request.get_header("Authorization"))

    def body(self) -> Any:
        try:
            return read_json_body(bottle.request.environ, self.max_body)
        except BodyError as exc:
            raise ApiError(exc.status, exc.message, exc.detail) from None

    def job_url(self, job_id: int) -> str:
        base = (self.config.server.public_url or "").rstrip("/")
        return f"{base}{API}/jobs/{job_id}"

    def visible(self, principal: Principal, job: Job) -> bool:
        if not principal.may_see_owner(job.owner):
            return False
        if principal.can("read"):
            return True
        return principal.can("read_own") and job.source == principal.source

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
            )
        except AcquisitionError as exc:
            message = str(exc)
            field = "owner" if ": no owner;" in message else "target" if ": no target;" in message else "path"
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

    def list_jobs(self, principal: Principal, query: bottle.FormsDict) -> dict[str, Any]:
        problems: list[dict[str, str]] = []
        known = ("state", "owner", "source", "since", "until", "limit", "cursor")
        problems += [_unknown_field(k, known) for k in query.keys() if k not in known]
        states: list[str] = []
        for raw in query.getall("state"):
            for s in filter(None, (x.strip() for x in raw.split(","))):
                if s not in {str(v) for v in JobState}:
                    problems.append(problem("state", f"unknown state {s!r}; use {', '.join(str(v) for v in JobState)}"))
                states.append(s)
        limit = 50
        if query.get("limit") is not None:
            try:
                limit = int(query.get("limit"))
                if not 1 <= limit <= MAX_PAGE:
                    raise ValueError
            except ValueError:
                problems.append(problem("limit", f"must be a whole number from 1 to {MAX_PAGE}, got {query.get('limit')!r}"))
        since = until = None
        try:
            if query.get("since"):
                since = parse_time(query.get("since"), "since")
            if query.get("until"):
                until = parse_time(query.get("until"), "until")
        except ApiError as exc:
            problems += exc.detail
        cursor = query.get("cursor") or None
        if cursor is not None and not cursor.isdigit():
            problems.append(problem("cursor", f"must be the next_cursor of a previous page, got {cursor!r}"))
        if problems:
            raise invalid(problems)
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
        jobs, next_cursor = self._page(principal, filters, limit, cursor, post_filter)
        return {"jobs": [j.to_dict(history=False) for j in jobs], "next_cursor": next_cursor}

    def _page(self, principal, filters, limit, cursor, post_filter) -> tuple[list[Job], str | None]:
        if not post_filter:
            return self.store.list_jobs(**filters, limit=limit, cursor=cursor)
        # A token limited to several owners: fill the page from successive store pages. The
        # cursor stays exact because every job of each store page was looked at.
        out: list[Job] = []
        for _ in range(50):
            jobs, cursor = self.store.list_jobs(**filters, limit=limit - len(out), cursor=cursor)
            out += [j for j in jobs if principal.may_see_owner(j.owner)]
            if cursor is None or len(out) >= limit:
                break
        return out, cursor


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    body = json.dumps(data, separators=(",", ":"))
    response = bottle.HTTPResponse(body, status=status, headers=headers)
    response.content_type = JSON_TYPE
    return response


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
    return _json({"error": error, "detail": detail}, status, headers)


def api_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Turn package exceptions into JSON errors (the mapping from errors to status codes)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except ApiError as exc:
            return error_response(exc.status, exc.error, exc.detail, exc.headers)
        except AuthError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="watchfolder"'} if exc.status == 401 else None
            return error_response(exc.status, str(exc), None, headers)
        except JobNotFound as exc:
            return error_response(404, str(exc))
        except InvalidTransition as exc:
            return error_response(409, str(exc))
        except StoreError as exc:
            return error_response(422, str(exc))

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper


def _package_file(name: str) -> bytes:
    return importlib.resources.files("watchfolder").joinpath(name).read_bytes()


STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def create_app(config, store, importer=None) -> bottle.Bottle:
    """The WSGI application: REST API, metrics, dashboard and the seed-compatible routes."""
    from . import seed

    api = Api(config, store, importer)
    app = bottle.Bottle(catchall=True)
    app.config["json.enable"] = False
    app.config["watchfolder.api"] = api
    openapi_bytes = _package_file("openapi.yaml")
    static_dir = importlib.resources.files("watchfolder").joinpath("static")
    static_files = {p.name: p.read_bytes() for p in static_dir.iterdir() if p.is_file()}

    def default_error(err: bottle.HTTPError) -> str:
        bottle.response.content_type = JSON_TYPE
        if err.status_code >= 500:
            log.error("unhandled error on %s %s: %s", bottle.request.method, bottle.request.path, err.exception)
            if err.traceback:
                log.error("%s", err.traceback)
            return json.dumps({"error": "internal server error; see the server log", "detail": None})
        if err.status_code == 404:
            message = f"no such endpoint: {bottle.request.method} {bottle.request.path}; see {API}/openapi.yaml"
        elif err.status_code == 405:
            message = f"method {bottle.request.method} not allowed on {bottle.request.path}; allowed: {err.headers.get('Allow', '')}"
        else:
            message = str(err.body)
        return json.dumps({"error": message, "detail": None})

    app.default_error_handler = default_error

    @app.post(f"{API}/jobs")
    @api_errors
    def submit_job():
        principal = api.principal()
        principal.require("submit", "submit jobs")
        job, created = api.submit(principal, api.body())
        return _json(job.to_dict(), 202 if created else 200, {"Location": api.job_url(job.id)})

    @app.get(f"{API}/jobs")
    @api_errors
    def list_jobs():
        principal = api.principal()
        return _json(api.list_jobs(principal, bottle.request.query))

    @app.get(f"{API}/jobs/<job_id:int>")
    @api_errors
    def get_job(job_id: int):
        principal = api.principal()
        return _json(api.visible_job(principal, job_id).to_dict())

    @app.get(f"{API}/jobs/<job_id:int>/log")
    @api_errors
    def get_log(job_id: int):
        principal = api.principal()
        job = api.visible_job(principal, job_id)
        response = bottle.HTTPResponse(store.read_log(job.id))
        response.content_type = "text/plain; charset=utf-8"
        return response

    @app.post(f"{API}/jobs/<job_id:int>/retry")
    @api_errors
    def retry_job(job_id: int):
        principal = api.principal()
        principal.require("manage", "retry jobs")
        api.visible_job(principal, job_id)
        return _json(store.retry(job_id, by=principal.source).to_dict())

    @app.post(f"{API}/jobs/<job_id:int>/cancel")
    @api_errors
    def cancel_job(job_id: int):
        principal = api.principal()
        principal.require("manage", "cancel jobs")
        api.visible_job(principal, job_id)
        return _json(store.cancel(job_id, by=principal.source).to_dict())

    @app.get(f"{API}/status")
    @api_errors
    def get_status():
        principal = api.principal()
        principal.require("status", "read the status view")
        return _json(collect_status(config, store, importer))

    @app.get(f"{API}/whoami")
    @api_errors
    def whoami():
        p = api.principal()
        permissions = sorted(x for x in ("submit", "read", "read_own", "status", "manage") if p.can(x))
        return _json({"name": p.name, "role": p.role, "owners": list(p.owners), "roots": list(p.roots),
                      "permissions": permissions})

    @app.get(f"{API}/health")
    def get_health():
        ok, data = health(config, store)
        return _json(data, 200 if ok else 503)

    @app.get(f"{API}/openapi.yaml")
    def get_openapi():
        response = bottle.HTTPResponse(openapi_bytes)
        response.content_type = "application/yaml"
        return response

    @app.get("/metrics")
    def get_metrics():
        response = bottle.HTTPResponse(exposition(api.registry))
        response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return response

    def static(name: str) -> bottle.HTTPResponse:
        if name not in static_files:
            return error_response(404, f"no static file {name!r}")
        response = bottle.HTTPResponse(static_files[name])
        response.content_type = STATIC_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        # The page holds no data; the API calls it makes carry the token.
        response.set_header("Cache-Control", "no-cache")
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("X-Frame-Options", "DENY")
        return response

    @app.get("/")
    def dashboard():
        response = static("index.html")
        response.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        )
        return response

    @app.get("/static/<name>")
    def static_file(name: str):
        return static(name)

    seed.install(app, api)
    return app


__all__ = ["create_app", "Api", "ApiError", "read_json_body", "parse_job_request"]
