"""The PostgreSQL job store: workers and watchers on several hosts share one database.

It implements :class:`watchfolder.store.base.JobStore` with the same columns
and the same semantics as the SQLite store; the contract tests
(``tests/store_contract.py``) run unchanged against both.

- **Dispatch** needs no separate queue: a queued job carries ``message_id``,
  a number from the ``dispatch_seq`` sequence taken each time it is (re)queued,
  so the oldest queued job comes first, as with litequeue. A claim is one
  statement: ``SELECT … FOR UPDATE SKIP LOCKED`` picks the job, the same
  transaction marks it running under the worker's lease and writes its history
  entry; concurrent claims skip each other's row instead of waiting on it.
- **Wake-ups**: every transaction that makes a job claimable also runs
  ``NOTIFY watchfolder_jobs``; a ``LISTEN`` connection turns those into the
  contract's :meth:`~JobStore.notify_work`, so :meth:`~JobStore.wait_for_work`
  wakes idle workers of every host at once; while that connection is down,
  workers fall back to their poll interval.
- **Connections** come from a ``psycopg_pool`` pool; one idle for a while is
  checked before use, so a server restart costs at most a failed call or two
  once it is back. A call that cannot reach the server raises
  :class:`~watchfolder.errors.StoreUnavailable`, and workers and watchers wait
  and try again with backoff. A connection goes back to the pool in the
  caller's thread (no reset callback, which would hand it to a pool thread and
  make the next call wait for that thread). A claim or a progress write is one
  statement in its own transaction (one round trip); a finish one statement,
  then its mails and the COMMIT with the closing Sync (two round trips, one
  without mail: ``tests/test_postgres.py`` counts them). Other transactions run
  in pipeline mode on autocommit connections, opened with an explicit BEGIN
  (psycopg's implicit one is synced apart, a round trip of its own).
- **Job logs** are files in ``logs_dir`` (:class:`~watchfolder.store.rows.FileLogs`):
  with several hosts, a shared folder mounted at the same path everywhere.
- **Times** are epoch seconds from the calling host's clock: hosts keep their
  clocks in sync (NTP); leases tolerate skew well below ``lease_seconds``.
- **Schema** changes are numbered steps (:data:`MIGRATIONS`) applied at start
  under an advisory lock, so hosts starting together migrate once.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from .. import defaults as D
from ..errors import (
    ImportFailure,
    InvalidTransition,
    JobNotFound,
    LeaseLost,
    StoreError,
    StoreRefused,
    StoreUnavailable,
)
from ..filemodes import PRIVATE, FileModes
from ..job import ErrorKind, FileEntry, HistoryEntry, Job, JobSpec, JobState, Progress, RetryPolicy, shape_key
from .base import JobStore, Mail, MailComposer, OutboxMail, PendingEntry, worker_gone
from .outage import Outage, outage_for
from .rows import (
    FINISHED_FOLLOWUP as _FINISHED_FOLLOWUP,
)
from .rows import (
    FileLogs,
    component_from_row,
    dedup_keys_of_row,
    history_from_rows,
    job_from_row,
    mail_from_row,
    new_job_columns,
    outbox_where,
    owners_clause,
    page_cursor,
    pending_from_row,
)
from .sqlite import JOB_EVENT_PREFIX, WATCHER_HEALTH_EVENT, watcher_event_data

try:  # an optional dependency: only sites with store.url postgresql://… need it
    import psycopg
    import psycopg_pool
    from psycopg.rows import dict_row
except ImportError:  # pragma: no cover - reported by PostgresStore()
    psycopg = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
_SILENT = logging.getLogger(__name__ + ".short")  # the outages of short commands (their error says it)
_SILENT.disabled = True

# psycopg's placeholders are %s: a literal % is written %%.
FINISHED_FOLLOWUP = _FINISHED_FOLLOWUP.replace("%", "%%")

#: The NOTIFY channel that says "a job can be claimed".
CHANNEL = "watchfolder_jobs"
#: Key of the advisory lock every transaction takes before writing an event and holds
#: until it commits: event ids then commit in id order, so a reader that resumes
#: after the last id it saw never skips an event committed late.
EVENTS_LOCK = 0x77_66_02
#: A job event, built from the job row as the transition left it (no round trip through
#: Python): the job summary of ``EventData`` in api/openapi.yaml, without the file list.
def _job_event_data(message: str) -> str:
    """The SQL of a job event's data from the job row ``j``, with ``message`` (an SQL expression)."""
    return JOB_EVENT_DATA.replace("%(message)s::text", message)


JOB_EVENT_DATA = (
    "json_build_object('job_id', j.id, 'state', j.state, 'owner', j.owner, 'group', j.spec::jsonb -> 'group',"
    " 'name', j.spec::jsonb -> 'name', 'source', j.source, 'path', j.spec::jsonb -> 'root',"
    " 'target', j.spec::jsonb -> 'target', 'attempts', j.attempts, 'max_attempts', j.max_attempts,"
    " 'message', %(message)s::text, 'result', j.result::jsonb - 'files',"
    " 'error', CASE WHEN j.error_kind IS NULL THEN NULL"
    " ELSE json_build_object('kind', j.error_kind, 'message', j.error_message) END,"
    " 'created_at', j.created_at, 'updated_at', j.updated_at)::text"
)
CLAIM_EVENT_DATA = _job_event_data("'attempt ' || j.attempts || ' on ' || %(w)s")
JOB_EVENT_INSERT = (
    "INSERT INTO events (at, type, subject, job_id, owner, data)"
    f" SELECT %(at)s, {JOB_EVENT_PREFIX!r} || j.state, 'job/' || j.id, j.id, j.owner, {JOB_EVENT_DATA}"
    " FROM jobs j WHERE j.id = %(job)s"
)
#: The listed files of the jobs with the ids given (an array), in order.
FILES_OF_JOBS = "SELECT job_id, path, size, sha256 FROM job_files WHERE job_id = ANY(%s) ORDER BY job_id, seq"
#: A pooled connection idle longer than this is checked before use (seconds).
IDLE_CHECK_SECONDS = 0.5
#: While waiting for a pooled connection, how often to look whether the pool's attempt failed (seconds).
CONNECT_POLL_SECONDS = 0.1
#: Key of the advisory lock held while the schema is migrated.
MIGRATION_LOCK = 0x77_66_01

MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "jobs, history, outbox and components", """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE SEQUENCE IF NOT EXISTS dispatch_seq;
CREATE TABLE IF NOT EXISTS jobs (
    id               BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    idempotency_key  TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    owner            TEXT NOT NULL,
    source           TEXT NOT NULL,
    spec             TEXT NOT NULL,
    session_key      TEXT,
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    next_attempt_at  DOUBLE PRECISION,
    created_at       DOUBLE PRECISION NOT NULL,
    updated_at       DOUBLE PRECISION NOT NULL,
    started_at       DOUBLE PRECISION,
    finished_at      DOUBLE PRECISION,
    worker           TEXT,
    lease_expires_at DOUBLE PRECISION,
    message_id       BIGINT,
    cancel_requested BOOLEAN NOT NULL DEFAULT FALSE,
    progress         TEXT,
    result           TEXT,
    error_kind       TEXT,
    error_message    TEXT,
    error_config     BOOLEAN NOT NULL DEFAULT FALSE,
    followup         TEXT,
    dismissed_at     DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_dispatch ON jobs(message_id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);
CREATE INDEX IF NOT EXISTS jobs_source ON jobs(source, id);
CREATE INDEX IF NOT EXISTS jobs_followup ON jobs(source, id) WHERE followup = 'pending';
-- The listed files, written once at enqueue, out of the jobs row that progress writes
-- and lease renewals update (an HCS plate lists 100,000 files).
CREATE TABLE IF NOT EXISTS job_files (
    job_id  BIGINT NOT NULL REFERENCES jobs(id),
    seq     INTEGER NOT NULL,
    path    TEXT NOT NULL,
    size    BIGINT,
    sha256  TEXT,
    PRIMARY KEY (job_id, seq)
);
CREATE TABLE IF NOT EXISTS job_history (
    id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    job_id  BIGINT NOT NULL REFERENCES jobs(id),
    at      DOUBLE PRECISION NOT NULL,
    state   TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_history_job ON job_history(job_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    id              BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    job_id          BIGINT,
    kind            TEXT NOT NULL,
    sender          TEXT NOT NULL,
    recipients      TEXT NOT NULL,
    subject         TEXT NOT NULL,
    raw             BYTEA NOT NULL,
    state           TEXT NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at DOUBLE PRECISION,
    claimed_until   DOUBLE PRECISION,
    last_error      TEXT,
    created_at      DOUBLE PRECISION NOT NULL,
    sent_at         DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
-- The event outbox (CloudEvents): one row per job state change, written by the
-- transaction that makes the change, under EVENTS_LOCK so ids commit in order.
CREATE TABLE IF NOT EXISTS events (
    id      BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    at      DOUBLE PRECISION NOT NULL,
    type    TEXT NOT NULL,
    subject TEXT NOT NULL,
    job_id  BIGINT,
    owner   TEXT,
    data    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_owner ON events(owner, id);
CREATE TABLE IF NOT EXISTS event_sinks (
    name          TEXT PRIMARY KEY,
    last_id       BIGINT NOT NULL DEFAULT 0,
    holder        TEXT,
    held_until    DOUBLE PRECISION,
    delivered     BIGINT NOT NULL DEFAULT 0,
    failing_since DOUBLE PRECISION,
    last_error    TEXT,
    disabled_at   DOUBLE PRECISION,
    updated_at    DOUBLE PRECISION
);
CREATE TABLE IF NOT EXISTS components (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    status     TEXT NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (kind, name)
);
"""),
    (2, "watch folder leases (one watcher per folder)", """
CREATE TABLE IF NOT EXISTS folder_leases (
    folder      TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    acquired_at DOUBLE PRECISION NOT NULL,
    expires_at  DOUBLE PRECISION NOT NULL
);
"""),
    (3, "pending acquisitions (what the watchers see and have not queued)", """
CREATE TABLE IF NOT EXISTS pending (
    watch       TEXT NOT NULL,
    path        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    owner       TEXT,
    first_seen  DOUBLE PRECISION NOT NULL,
    last_change DOUBLE PRECISION NOT NULL,
    quiet_until DOUBLE PRECISION,
    digest      TEXT,
    updated_at  DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (watch, path)
);
CREATE INDEX IF NOT EXISTS pending_first_seen ON pending(first_seen);
"""),
    # An admin mail folded into a digest is 'digested' with the digest's id, never 'sent'.
    (4, "outbox mails folded into an admin digest name it (outbox.digest_id)",
     "ALTER TABLE outbox ADD COLUMN IF NOT EXISTS digest_id BIGINT"),
    # Content de-duplication looks earlier jobs up by these (indexed), not among the newest N.
    # Back-filled for the jobs already there (_backfill_dedup_keys).
    (5, "content de-duplication keys (shape_key, content_key) on jobs, indexed", """
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS shape_key TEXT;
ALTER TABLE jobs ADD COLUMN IF NOT EXISTS content_key TEXT;
CREATE INDEX IF NOT EXISTS jobs_shape ON jobs(shape_key, id);
CREATE INDEX IF NOT EXISTS jobs_content ON jobs(content_key, id);
"""),
    # The keys of a one-file acquisition no longer hold its data file's name (job._key_paths):
    # computed again for the jobs already there (_backfill_dedup_keys), with step 5's.
    (6, "de-duplication keys of one-file acquisitions without the data file's name", "SELECT 1"),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: The step after which the de-duplication keys of stored jobs are computed (again).
BACKFILL_VERSION = 6

def _backfill_dedup_keys(conn) -> None:
    """Schema step 5 for the jobs already stored: each one's shape key, and the content key of
    each succeeded one (from its listed or recorded checksums), in the step's transaction;
    a batch of jobs per round trip."""
    ids = [r["id"] for r in conn.execute("SELECT id FROM jobs ORDER BY id").fetchall()]
    for start in range(0, len(ids), 500):
        batch = ids[start:start + 500]
        rows = conn.execute("SELECT id, spec, state, result FROM jobs WHERE id = ANY(%s)", (batch,)).fetchall()
        files: dict[int, list[FileEntry]] = {}
        for f in conn.execute(FILES_OF_JOBS, (batch,)).fetchall():
            files.setdefault(f["job_id"], []).append(FileEntry(f["path"], f["size"], f["sha256"]))
        keys = [(*dedup_keys_of_row(r, tuple(files.get(r["id"], ()))), r["id"]) for r in rows]
        with conn.cursor() as cur:
            cur.executemany("UPDATE jobs SET shape_key = %s, content_key = %s WHERE id = %s", keys)
    if ids:
        log.info("store: de-duplication keys of %d earlier job(s) recorded", len(ids))


#: PostgreSQL array types of the columns a new job row sets (``rows.new_job_columns``), for batch inserts.
_ARRAY_TYPES = {
    "idempotency_key": "text", "state": "text", "owner": "text", "source": "text", "spec": "text",
    "session_key": "text", "max_attempts": "integer", "created_at": "double precision",
    "updated_at": "double precision", "progress": "text", "followup": "text", "shape_key": "text",
}


def _now(now: float | None) -> float:
    return time.time() if now is None else now


def redact_url(url: str) -> str:
    """``url`` without its password (for logs, status and errors)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


#: What the server says when it refuses a connection for good (waiting will not fix it), and the
#: fix, as (pattern of the server's reason, fix). ``{user}``, ``{dbname}`` come from ``store.url``.
#: libpq gives no SQLSTATE for a failed connection, so the (English) messages are matched.
REFUSALS: list[tuple[re.Pattern, str]] = [
    (re.compile(r'database "[^"]*" does not exist'),
     "create it (createdb -O {user} {dbname}) or correct the database name in store.url"),
    (re.compile(r'role "[^"]*" does not exist'),
     "create the role (createuser --pwprompt {user}) or correct the user name in store.url"),
    (re.compile(r"password authentication failed|no password supplied|password is required"),
     "set store.password ({{env: VARIABLE}} or {{file: PATH}}) to the password of role {user}"),
    (re.compile(r"no pg_hba\.conf entry|authentication failed"),
     "let this host and role {user} in through the server's pg_hba.conf (then SELECT pg_reload_conf())"),
    (re.compile(r"permission denied for database|is not permitted to log in"),
     "on the server: GRANT CONNECT ON DATABASE {dbname} TO {user}; ALTER ROLE {user} LOGIN"),
    (re.compile(r"invalid (connection option|URI|integer value|port)|missing \"=\""),
     "correct store.url (postgresql://USER@HOST[:PORT]/DATABASE)"),
]


def connection_error(exc: BaseException, url: str) -> StoreError:
    """The store error for a failed connection to ``url``: :class:`StoreRefused` when waiting will not
    fix it (with the server's reason and the fix), else :class:`StoreUnavailable`."""
    text = str(exc).strip()
    reason = _first_line(exc)
    fatal = re.search(r"FATAL:\s+(.*)", text)
    if fatal:
        reason = fatal.group(1).strip()
    elif ": " in reason and reason.startswith("connection failed"):
        reason = reason.rsplit(": ", 1)[1] or reason
    for pattern, fix in REFUSALS:
        if pattern.search(text):
            try:
                info = psycopg.conninfo.conninfo_to_dict(url)
            except psycopg.Error:
                info = {}
            user = info.get("user") or "USER"
            fix = fix.format(user=user, dbname=info.get("dbname") or user)
            return StoreRefused(f"store.url {redact_url(url)}: the server refused the connection: {reason}; {fix}")
    return StoreUnavailable(f"PostgreSQL at {redact_url(url)} is unreachable: {reason}")


def probe(url: str, *, password: str | None = None, connect_timeout: float = D.PG_CONNECT_TIMEOUT_SECONDS
          ) -> dict[str, Any]:
    """Connect once to ``url`` without changing anything: ``{"server": version, "schema": n or None}``.

    What ``check-config`` shows. Raises :class:`StoreRefused` or
    :class:`StoreUnavailable` as :func:`connection_error` says, and
    :class:`StoreError` when psycopg is not installed.
    """
    if psycopg is None:
        raise StoreError("store.url is a postgresql:// URL but psycopg is not installed; "
                         "install watchfolder with the postgresql extra: pip install 'watchfolder[postgresql]'")
    kwargs: dict[str, Any] = {"connect_timeout": max(1, int(connect_timeout)), "autocommit": True}
    if password is not None:
        kwargs["password"] = password
    try:
        with psycopg.connect(url, **kwargs) as conn:
            version = conn.execute("SHOW server_version").fetchone()[0]
            schema = None
            if conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()[0]:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                schema = int(row[0]) if row else None
    except (psycopg.OperationalError, psycopg.ProgrammingError) as exc:
        raise connection_error(exc, url) from exc
    return {"server": version, "schema": schema}


def _source_filter(source: str) -> tuple[str, tuple]:
    if source.endswith("*"):
        return "left(source, %s) = %s", (len(source) - 1, source[:-1])
    return "source = %s", (source,)


class PostgresStore(FileLogs, JobStore):
    """Durable jobs in PostgreSQL, shared by the processes of any number of hosts.

    ``url`` is a libpq URL (``postgresql://user@host:5432/db``); ``password``
    (from the config's secret) is passed apart so it never appears in the URL,
    logs or status. Raises :class:`StoreError` when psycopg is not installed
    or the schema is newer than this watchfolder, and
    :class:`StoreUnavailable` when the server cannot be reached at start.
    """

    def __init__(
        self,
        url: str,
        *,
        password: str | None = None,
        lease_seconds: float = D.LEASE_SECONDS,
        retry: RetryPolicy | None = None,
        logs_dir: str | os.PathLike = "logs",
        mail_retry: RetryPolicy | None = None,
        composer: MailComposer | None = None,
        sender: str = D.MAIL_FROM,
        pool_max: int = D.PG_POOL_MAX,
        connect_timeout: float = D.PG_CONNECT_TIMEOUT_SECONDS,
        application_name: str = "watchfolder",
        log_outages: bool = True,
        files: FileModes = PRIVATE,
    ):
        if psycopg is None:
            raise StoreError(
                "store.url is a postgresql:// URL but psycopg is not installed; "
                "install watchfolder with the postgresql extra: pip install 'watchfolder[postgresql]'"
            )
        self.url = url
        self.location = redact_url(url)
        self.lease_seconds = float(lease_seconds)
        self.retry_policy = retry or RetryPolicy(D.RETRY_MAX_ATTEMPTS, D.RETRY_BACKOFF)
        self.mail_retry = mail_retry or RetryPolicy(D.MAIL_MAX_ATTEMPTS, D.MAIL_BACKOFF)
        self.logs_dir = Path(logs_dir)
        self.files = files
        self.composer = composer
        self.sender = sender
        self.connect_timeout = connect_timeout
        self._connect_kwargs: dict[str, Any] = {
            "application_name": application_name,
            "connect_timeout": max(1, int(connect_timeout)),
        }
        if password is not None:
            self._connect_kwargs["password"] = password
        files.make_dir(self.logs_dir)
        self._returned: dict[int, float] = {}  # id(connection) -> when it went back to the pool
        # Outages are logged once per process (store/outage.py); a short command only reports its error.
        self._outage = outage_for(self.location, log) if log_outages else Outage(self.location, _SILENT)
        self.log_faults = log_outages  # the job logs' disk full, likewise (store/space.py)
        # (monotonic time, exception) of the pool's latest failed connection attempt.
        self._connect_failure: tuple[float, BaseException] | None = None
        self.pool = psycopg_pool.ConnectionPool(
            url,
            connection_class=self._connection_class(),
            min_size=1,
            max_size=max(1, pool_max),
            kwargs={**self._connect_kwargs, "row_factory": dict_row, "autocommit": True},
            # No reset callback: with one, the pool hands each returned connection to a
            # worker thread, and the next request waits for that thread (a thread switch
            # or two per transaction); _connection stamps the return itself.
            check=self._check_idle,
            timeout=connect_timeout,
            reconnect_timeout=0,  # never give up reconnecting: the server may be down for long
            name="watchfolder",
            open=False,
        )
        self.pool.open(wait=False)
        self._listener_lock = threading.Lock()
        self._listener: threading.Thread | None = None
        self._listener_stop = threading.Event()
        self._listening = False
        self._last_error: str | None = None
        try:
            self.schema_version = self._migrate()
        except BaseException:
            self.pool.close()  # no pool left reconnecting in the background of a failed start
            raise

    @classmethod
    def from_config(cls, config, composer: MailComposer | None = None, *, log_outages: bool = True
                    ) -> PostgresStore:
        password = config.store.password.reveal() if config.store.password is not None else None
        return cls(
            config.store.url,
            password=password,
            lease_seconds=config.store.lease_seconds,
            retry=config.retry,
            logs_dir=config.logs_dir,
            mail_retry=config.notify.retry,
            composer=composer,
            sender=config.notify.sender,
            log_outages=log_outages,
            files=FileModes.for_group(config.file_group),
        )

    # -- connections -------------------------------------------------------

    def _connection_class(self) -> type:
        """psycopg's connection class, noting each failed connection attempt of the pool on this store."""
        store = self

        class Connection(psycopg.Connection):
            @classmethod
            def connect(cls, conninfo: str = "", **kwargs: Any):
                try:
                    return super().connect(conninfo, **kwargs)
                except psycopg.Error as exc:
                    store._connect_failure = (time.monotonic(), exc)
                    raise

        return Connection

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        """A pooled connection (``with conn:`` commits or rolls back as psycopg does), or an error at once.

        The pool connects in the background; when its attempt fails while we wait, the
        error is raised at once (:func:`connection_error`: :class:`StoreRefused` for a
        wrong database, role or password, :class:`StoreUnavailable` otherwise), not after
        ``connect_timeout`` as a bare pool timeout.
        """
        asked = time.monotonic()
        deadline = asked + self.connect_timeout
        while True:
            try:
                conn = self.pool.getconn(timeout=max(0.001, min(CONNECT_POLL_SECONDS, deadline - time.monotonic())))
                break
            except psycopg_pool.PoolTimeout:
                failed = self._connect_failure
                if failed is not None and failed[0] >= asked:
                    raise connection_error(failed[1], self.url) from failed[1]
                if time.monotonic() >= deadline:
                    raise StoreUnavailable(f"PostgreSQL at {self.location} is unreachable: no connection within "
                                           f"{self.connect_timeout:g} s") from None
        try:
            with conn:
                yield conn
        finally:
            self._returned[id(conn)] = time.monotonic()
            self.pool.putconn(conn)

    def _check_idle(self, conn) -> None:
        """Check a connection idle for a while before handing it out (the server may have restarted).

        A connection back from use a moment ago is handed out unchecked: a check is a
        round trip, and busy workers reuse theirs at once. One that breaks anyway fails
        its call with :class:`StoreUnavailable`, and callers try again.
        """
        if time.monotonic() - self._returned.get(id(conn), 0.0) > IDLE_CHECK_SECONDS:
            psycopg_pool.ConnectionPool.check_connection(conn)

    @contextmanager
    def _tx(self, *, pipeline: bool = True, single: bool = False) -> Iterator[Any]:
        """A pooled connection inside one transaction: committed at the end, rolled back on any exception.

        Pooled connections are in autocommit mode and transactions are opened with
        an explicit ``BEGIN``: psycopg's implicit one, in pipeline mode, is followed
        by a Sync of its own, a round trip before the first statement. In pipeline
        mode (the default) BEGIN, the statements whose results are not read yet and
        the COMMIT travel together with the next statement that is read or with the
        pipeline's closing Sync, so a transition costs one round trip per result it
        reads before its end, plus one. ``single``: the caller runs one statement,
        its own transaction (autocommit): one round trip. ``pipeline=False``: a
        plain transaction, one round trip per statement (scripts, COPY). On any
        exception the transaction is rolled back (``with conn`` of psycopg).
        """
        started = time.monotonic()
        try:
            with self._connection() as conn:
                if single:
                    yield conn
                elif not pipeline:  # e.g. scripts of several statements (the schema)
                    with conn.transaction():
                        yield conn
                else:
                    with conn.pipeline():
                        conn.execute("BEGIN")
                        yield conn
                        conn.execute("COMMIT")  # sent with the pipeline's closing Sync
        except StoreUnavailable as exc:
            self._outage.down(str(exc))
            raise
        except psycopg.OperationalError as exc:
            self.pool.check()  # drop the other connections the same restart broke
            error = StoreUnavailable(f"PostgreSQL at {self.location} is unreachable: {_first_line(exc)}")
            self._outage.down(str(error))
            raise error from exc
        self._outage.up(started)

    def _migrate(self) -> int:
        with self._tx(pipeline=False) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            has_meta = conn.execute("SELECT to_regclass('meta') IS NOT NULL AS ok").fetchone()["ok"]
            current = 0
            if has_meta:
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                current = int(row["value"]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.location} was written by a newer watchfolder (schema {current}, this one knows "
                    f"{SCHEMA_VERSION}); upgrade watchfolder on this host"
                )
            for version, what, sql in MIGRATIONS:
                if version <= current:
                    continue
                if current:  # a fresh database says nothing: it is simply created at the latest version
                    log.info("store %s: schema %d -> %d: %s", self.location, version - 1, version, what)
                conn.execute(sql)
                if version == BACKFILL_VERSION and current:
                    _backfill_dedup_keys(conn)  # once, whichever of steps 5 and 6 were due
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(version),),
                )
        return SCHEMA_VERSION

    def close(self) -> None:
        """Close the pool and the LISTEN connection (call once no thread uses the store)."""
        self._listener_stop.set()
        if self._listener is not None:
            self._listener.join(timeout=5)
        self.pool.close()

    def describe(self) -> dict[str, Any]:
        described = {"backend": "postgresql", "location": self.location, "schema": self.schema_version,
                     "listening": self._listening}
        if self._last_error:
            described["error"] = self._last_error
        return described

    # -- reading -----------------------------------------------------------

    def _job(self, row: dict, history: list[HistoryEntry] | None = None, conn=None) -> Job:
        """The job of one row, its files read from ``job_files`` (on ``conn``, inside its transaction)."""
        return self._jobs([row], conn, history)[0]

    def _jobs(self, rows: list[dict], conn=None, history: list[HistoryEntry] | None = None) -> list[Job]:
        """The jobs of ``rows``, their files read in one query."""
        if not rows:
            return []
        files: dict[int, list[FileEntry]] = {r["id"]: [] for r in rows}
        sql = FILES_OF_JOBS
        if conn is None:
            with self._tx() as own:
                found = own.execute(sql, (list(files),)).fetchall()
        else:
            found = conn.execute(sql, (list(files),)).fetchall()
        for f in found:
            files[f["job_id"]].append(FileEntry(f["path"], f["size"], f["sha256"]))
        return [job_from_row(r, self.log_path(r["id"]), history, files=tuple(files[r["id"]])) for r in rows]

    def _history(self, conn, job_id: int) -> list[HistoryEntry]:
        return history_from_rows(
            conn.execute("SELECT at, state, message FROM job_history WHERE job_id = %s ORDER BY id", (job_id,))
        )

    def get(self, job_id: int) -> Job:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            return self._job(row, self._history(conn, job_id), conn)

    def find(self, idempotency_key: str) -> Job | None:
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE idempotency_key = %s", (idempotency_key,)).fetchone()
        return self._job(row) if row else None

    def list_jobs(
        self,
        *,
        states: Iterable[str] | None = None,
        owner: str | None = None,
        source: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 50,
        cursor: str | None = None,
        dismissed: bool | None = None,
        files: bool = True,
    ) -> tuple[list[Job], str | None]:
        where: list[str] = []
        args: list[Any] = []
        if dismissed is not None:
            where.append("dismissed_at IS NOT NULL" if dismissed else "dismissed_at IS NULL")
        if states:
            where.append("state = ANY(%s)")
            args.append([str(JobState(s)) for s in states])
        if owner:
            where.append("owner = %s")
            args.append(owner)
        if source:
            clause, values = _source_filter(source)
            where.append(clause)
            args += values
        if since is not None:
            where.append("created_at >= %s")
            args.append(since)
        if until is not None:
            where.append("created_at < %s")
            args.append(until)
        if cursor:
            where.append("id < %s")
            args.append(page_cursor(cursor))
        limit = max(1, min(int(limit), 1000))
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        with self._tx() as conn:
            rows = conn.execute(sql + " ORDER BY id DESC LIMIT %s", (*args, limit + 1)).fetchall()
        jobs = (self._jobs(rows[:limit]) if files
                else [job_from_row(r, self.log_path(r["id"]), files=()) for r in rows[:limit]])
        return jobs, (str(jobs[-1].id) if len(rows) > limit else None)

    def imported_as(self, content_key: str) -> Job | None:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE content_key = %s AND state = 'succeeded' ORDER BY id DESC LIMIT 1",
                (content_key,),
            ).fetchone()
            return self._job(row, conn=conn) if row is not None else None

    def alike(self, spec: JobSpec, *, states: Iterable[str], before: int | None = None, limit: int = 20) -> list[Job]:
        key = shape_key(spec)
        states = [str(JobState(s)) for s in states]
        if key is None or not states:
            return []
        with self._tx() as conn:
            rows = conn.execute(
                "SELECT * FROM jobs WHERE shape_key = %s AND state = ANY(%s) AND id < %s ORDER BY id DESC LIMIT %s",
                (key, states, before if before is not None else 2**63 - 1, max(1, min(int(limit), 1000))),
            ).fetchall()
            return self._jobs(rows, conn) if rows else []

    def counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        counts = {str(s): 0 for s in JobState}
        where, args = owners_clause(owners, "%s")
        with self._tx() as conn:
            for row in conn.execute(f"SELECT state, count(*) AS n FROM jobs WHERE {where} GROUP BY state", args):
                counts[row["state"]] = row["n"]
        return counts

    def oldest_queued_at(self, *, owners: Sequence[str] | None = None) -> float | None:
        where, args = owners_clause(owners, "%s")
        with self._tx() as conn:
            return conn.execute(
                f"SELECT min(created_at) AS t FROM jobs WHERE state IN ('queued', 'retry_wait') AND {where}", args
            ).fetchone()["t"]

    def totals(self) -> dict[str, float]:
        with self._tx() as conn:
            row = conn.execute(
                "SELECT count(*) AS n, coalesce(sum(finished_at - started_at), 0) AS seconds,"
                " coalesce(sum((progress::jsonb ->> 'bytes_done')::numeric), 0) AS bytes"
                " FROM jobs WHERE state = 'succeeded'"
            ).fetchone()
        return {"succeeded": row["n"], "seconds": float(row["seconds"]), "bytes": int(row["bytes"])}

    def throughput(self, *, since: float, bucket: float, now: float | None = None,
                   owners: Sequence[str] | None = None) -> list[dict[str, float]]:
        now = _now(now)
        if bucket <= 0:
            raise StoreError(f"bucket must be a positive number of seconds, got {bucket!r}")
        count = max(1, int((now - since) // bucket) + 1)
        out = [{"start": since + i * bucket, "jobs": 0, "bytes": 0, "duplicates": 0} for i in range(count)]
        where, args = owners_clause(owners, "%s")
        # A duplicate (succeeded as "already imported as job N", result.duplicate_of) imported nothing.
        dup = "coalesce(result, '{}')::jsonb ? 'duplicate_of'"
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT floor((finished_at - %s) / %s)::bigint AS i, count(*) FILTER (WHERE NOT {dup}) AS n,"
                f" count(*) FILTER (WHERE {dup}) AS d,"
                f" coalesce(sum((progress::jsonb ->> 'bytes_done')::numeric) FILTER (WHERE NOT {dup}), 0) AS bytes"
                " FROM jobs WHERE state = 'succeeded' AND finished_at >= %s AND finished_at <= %s"
                f" AND {where} GROUP BY 1",
                (since, bucket, since, now, *args),
            ).fetchall()
        for r in rows:
            if 0 <= r["i"] < count:
                out[r["i"]]["jobs"] = int(r["n"])
                out[r["i"]]["duplicates"] = int(r["d"])
                out[r["i"]]["bytes"] = int(r["bytes"])
        return out

    def read_log(self, job_id: int) -> str:
        with self._tx() as conn:
            if conn.execute("SELECT 1 FROM jobs WHERE id = %s", (job_id,)).fetchone() is None:
                raise JobNotFound(job_id)
        return self._read_log_file(job_id)

    # -- writing: helpers --------------------------------------------------

    def _add_history(
        self, conn, job_id: int, state: JobState | str, message: str, now: float, *, event: bool = True
    ) -> None:
        """Record a history entry; a state change (``event``) also goes to the event outbox.

        Called after the job row was updated, in the same transaction: the event's
        data is the job as it is now.
        """
        conn.execute(
            "INSERT INTO job_history (job_id, at, state, message) VALUES (%s, %s, %s, %s)",
            (job_id, now, str(state), message),
        )
        if event:
            self._job_event(conn, job_id, message, now)

    @staticmethod
    def _job_event(conn, job_id: int, message: str, now: float) -> None:
        """The job's event, under the events lock (taken by an InitPlan, before the event gets its id),
        held until the transaction ends: write it last, just before the COMMIT."""
        conn.execute(JOB_EVENT_INSERT + " AND (SELECT count(pg_advisory_xact_lock(%(lock)s))) = 1",
                     {"at": now, "job": job_id, "message": message, "lock": EVENTS_LOCK})

    def _finish(self, conn, row: dict, now: float, mails: MailComposer | None, message: str) -> Job:
        """Common tail of every transition into a finished state (inside the transaction).

        The event goes last, after the mails are composed: the events lock it takes is
        held until the commit, and every claim and finish of every host waits for it.
        """
        self._add_history(conn, row["id"], row["state"], message, now, event=False)
        job = self._job(row, self._history(conn, row["id"]), conn)
        composer = mails if mails is not None else self.composer
        if composer is not None:
            self._outbox_insert(conn, composer(job), job.id, now)
        self._job_event(conn, row["id"], message, now)
        return job

    def _finish_running(
        self, conn, job_id: int, worker: str, assignments: str, params: tuple, now: float,
        mails: MailComposer | None, message: str,
    ) -> Job:
        """Finish the job ``worker`` runs, as :meth:`_update_running` then :meth:`_finish`.

        One statement: the update, its history entry, and the job back with its history
        and files. Without mail (the caller runs it alone, autocommit) the statement
        also takes the events lock (an InitPlan, before the event gets its id) and writes
        the event: one round trip. With mails, they are composed from the job it returns,
        then the outbox rows, the event (the events lock taken only now, so no other
        host's claim or finish waits for a composition) and the COMMIT go together with
        the closing Sync: two round trips.
        """
        composer = mails if mails is not None else self.composer
        with_event = composer is None
        lock = " AND (SELECT count(pg_advisory_xact_lock(%s))) = 1" if with_event else ""
        ctes = [
            f"upd AS (UPDATE jobs SET {assignments} WHERE id = %s AND state = 'running' AND worker = %s{lock}"
            " RETURNING *)",
            "entry AS (INSERT INTO job_history (job_id, at, state, message)"
            " SELECT id, %s, state, %s FROM upd RETURNING id, at, state, message)",
        ]
        args = [*params, job_id, worker, *([EVENTS_LOCK] if with_event else []), now, message]
        if with_event:
            ctes.append("event AS (INSERT INTO events (at, type, subject, job_id, owner, data)"
                        f" SELECT %s, {JOB_EVENT_PREFIX!r} || j.state, 'job/' || j.id, j.id, j.owner,"
                        f" {_job_event_data('%s::text')} FROM upd j)")
            args += [now, message]
        row = conn.execute(
            f"WITH {', '.join(ctes)}"
            " SELECT upd.*, (SELECT json_agg(json_build_array(h.at, h.state, h.message) ORDER BY h.id) FROM"
            " (SELECT id, at, state, message FROM job_history WHERE job_id = upd.id"
            " UNION ALL SELECT id, at, state, message FROM entry) h) AS history_json,"
            " (SELECT coalesce(json_agg(json_build_array(f.path, f.size, f.sha256) ORDER BY f.seq), '[]')"
            " FROM job_files f WHERE f.job_id = upd.id) AS files_json FROM upd",
            args,
        ).fetchone()
        if row is None:
            self._running(conn, job_id, worker)  # says why: JobNotFound or LeaseLost
            raise StoreError(f"job {job_id} could not be updated")
        history = [HistoryEntry(at, JobState(state), text) for at, state, text in row.pop("history_json")]
        files = tuple(FileEntry(path, size, sha256) for path, size, sha256 in row.pop("files_json"))
        job = job_from_row(row, self.log_path(job_id), history, files=files)
        if composer is not None:
            self._outbox_insert(conn, composer(job), job.id, now)
            self._job_event(conn, job_id, message, now)
        return job

    def _no_mail(self, mails: MailComposer | None) -> bool:
        """Whether a finishing transition writes no mail (then it is one statement: see :meth:`_finish_running`)."""
        return mails is None and self.composer is None

    def _requeue(self, conn, job_id: int, now: float, message: str, **columns: Any) -> None:
        """Queue a job again at the back of the line (inside the caller's transaction), and wake a worker."""
        sets = "".join(f", {name} = %s" for name in columns)
        conn.execute(
            "UPDATE jobs SET state = 'queued', message_id = nextval('dispatch_seq'), worker = NULL,"
            f" lease_expires_at = NULL, updated_at = %s{sets} WHERE id = %s",
            (now, *columns.values(), job_id),
        )
        self._add_history(conn, job_id, JobState.QUEUED, message, now)
        conn.execute(f"NOTIFY {CHANNEL}")

    def _running(self, conn, job_id: int, worker: str) -> dict:
        row = conn.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["state"] != "running" or row["worker"] != worker:
            raise LeaseLost(f"job {job_id} is no longer held by {worker} (state {row['state']}, worker {row['worker']})")
        return row

    def _update_running(self, conn, job_id: int, worker: str, assignments: str, params: tuple) -> dict:
        row = conn.execute(
            f"UPDATE jobs SET {assignments} WHERE id = %s AND state = 'running' AND worker = %s RETURNING *",
            (*params, job_id, worker),
        ).fetchone()
        if row is None:
            self._running(conn, job_id, worker)  # says why: JobNotFound or LeaseLost
            raise StoreError(f"job {job_id} could not be updated")
        return row

    # -- writing: clients --------------------------------------------------

    def enqueue(self, spec: JobSpec, *, now: float | None = None, note: str = "") -> tuple[Job, bool]:
        return self.enqueue_many([(spec, note)], now=now)[0]

    def enqueue_many(
        self, items: Iterable[tuple[JobSpec, str]], *, now: float | None = None
    ) -> list[tuple[Job, bool]]:
        """As the contract says; a batch costs a fixed number of statements, whatever its size.

        The keys of the batch are locked (transaction-scoped advisory locks, in
        sorted order so two batches never deadlock), so an insert-unless-exists
        never races another host's, and a duplicate takes no id.
        """
        now = _now(now)
        items = list(items)
        keys = [spec.key() for spec, _ in items]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)
        with self._tx() as conn:
            conn.execute(
                "SELECT count(pg_advisory_xact_lock(hashtextextended(k, 0)))"
                " FROM (SELECT DISTINCT k FROM unnest(%s::text[]) AS k ORDER BY k) AS sorted",
                (list(first),),
            )
            existing = {
                r["idempotency_key"]: r
                for r in conn.execute("SELECT * FROM jobs WHERE idempotency_key = ANY(%s)", (list(first),))
            }
            new = [i for key, i in first.items() if key not in existing]
            ids: dict[str, int] = {}
            if new:
                cols = [new_job_columns(items[i][0], keys[i], JobState.QUEUED, now, self.retry_policy.max_attempts)
                        for i in new]
                names = list(cols[0])
                arrays = [[c[name] for c in cols] for name in names]
                types = [_ARRAY_TYPES[name] for name in names]
                # One INSERT for the batch; ORDER BY keeps ids and dispatch order in batch order.
                rows = conn.execute(
                    f"INSERT INTO jobs ({', '.join(names)}, message_id)"
                    f" SELECT {', '.join(names)}, nextval('dispatch_seq') FROM unnest("
                    + ", ".join(f"%s::{t}[]" for t in types)
                    + f") WITH ORDINALITY AS t({', '.join(names)}, n) ORDER BY n RETURNING id, idempotency_key",
                    arrays,
                ).fetchall()
                ids = {r["idempotency_key"]: r["id"] for r in rows}
                self._insert_files(conn, [(ids[keys[i]], items[i][0]) for i in new])
                conn.execute(
                    "INSERT INTO job_history (job_id, at, state, message)"
                    " SELECT id, %s, 'queued', message FROM unnest(%s::bigint[], %s::text[]) AS t(id, message)",
                    (now, [ids[keys[i]] for i in new],
                     [items[i][1] or f"queued from {items[i][0].source}" for i in new]),
                )
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
                conn.execute(
                    "INSERT INTO events (at, type, subject, job_id, owner, data)"
                    f" SELECT %(at)s, '{JOB_EVENT_PREFIX}queued', 'job/' || j.id, j.id, j.owner,"
                    f" {_job_event_data('t.message')} FROM jobs j"
                    " JOIN unnest(%(ids)s::bigint[], %(messages)s::text[]) AS t(id, message) ON j.id = t.id"
                    " ORDER BY j.id",
                    {"at": now, "ids": [ids[keys[i]] for i in new],
                     "messages": [items[i][1] or f"queued from {items[i][0].source}" for i in new]},
                )
                conn.execute(f"NOTIFY {CHANNEL}")
            known = {key: self._jobs([row], conn)[0] for key, row in existing.items()}
        out: list[tuple[Job, bool]] = []
        for i, (spec, _) in enumerate(items):
            key = keys[i]
            if key in ids and first[key] == i:
                out.append((self._queued_job(ids[key], spec, key, now), True))
            elif key in ids:  # repeated within the batch: the first one's job
                out.append((self._queued_job(ids[key], items[first[key]][0], key, now), False))
            else:
                out.append((known[key], False))
        if ids:
            self.notify_work()
        return out

    def _insert_files(self, conn, jobs: list[tuple[int, JobSpec]]) -> None:
        """The listed files of new jobs (a plate lists 100,000), pipelined in one round trip."""
        rows = [(job_id, seq, f.path, f.size, f.sha256) for job_id, spec in jobs for seq, f in enumerate(spec.files)]
        if rows:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO job_files (job_id, seq, path, size, sha256) VALUES (%s, %s, %s, %s, %s)",
                                rows)

    def _queued_job(self, job_id: int, spec: JobSpec, key: str, now: float) -> Job:
        return Job(
            id=job_id,
            spec=spec,
            idempotency_key=key,
            state=JobState.QUEUED,
            attempts=0,
            max_attempts=self.retry_policy.max_attempts,
            created_at=now,
            updated_at=now,
            progress=Progress(bytes_total=spec.total_bytes(), files_total=len(spec.files)),
            log_path=str(self.log_path(job_id)),
        )

    def reject(
        self, spec: JobSpec, reason: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> tuple[Job, bool]:
        now = _now(now)
        key = spec.key()
        with self._tx() as conn:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))
            existing = conn.execute("SELECT * FROM jobs WHERE idempotency_key = %s", (key,)).fetchone()
            if existing is not None:
                return self._job(existing, conn=conn), False
            cols = new_job_columns(
                dataclasses.replace(spec, session_key=None), key, JobState.FAILED, now,
                self.retry_policy.max_attempts,
                finished_at=now, error_kind=str(ErrorKind.PERMANENT), error_message=reason,
            )
            row = conn.execute(
                f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) RETURNING *",
                tuple(cols.values()),
            ).fetchone()
            self._insert_files(conn, [(row["id"], spec)])
            self.log(row["id"], f"rejected: {reason}", now=now)
            job = self._finish(conn, row, now, mails, f"rejected: {reason}")
        return job, True

    def cancel(self, job_id: int, *, by: str = "", now: float | None = None, mails: MailComposer | None = None) -> Job:
        now = _now(now)
        who = f" by {by}" if by else ""
        with self._tx() as conn:
            row = conn.execute("SELECT * FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            state = JobState(row["state"])
            if state.finished:
                raise InvalidTransition(f"job {job_id} is already {state}; only unfinished jobs can be cancelled")
            orphan = self._orphaned(conn, row, now) if state == JobState.RUNNING else None
            if orphan:
                # Nobody would act on the request: waiting for the lease to run out would
                # only delay the cancel (SQLiteStore.cancel does the same).
                who = f"{who} (its worker {row['worker']} {orphan})"
            if state == JobState.RUNNING and not orphan:
                conn.execute("UPDATE jobs SET cancel_requested = TRUE, updated_at = %s WHERE id = %s", (now, job_id))
                self._add_history(conn, job_id, state, f"cancel requested{who}", now, event=False)
            else:
                row = conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = %s, updated_at = %s, session_key = NULL,"
                    f" next_attempt_at = NULL, message_id = NULL, {FINISHED_FOLLOWUP}"
                    " WHERE id = %s RETURNING *",
                    (now, now, job_id),
                ).fetchone()
                self._finish(conn, row, now, mails, f"cancelled{who}")
        running = state == JobState.RUNNING and not orphan
        self.log(job_id, f"cancel requested{who}" if running else f"cancelled{who}", now=now)
        return self.get(job_id)

    def _orphaned(self, conn, row: dict, now: float) -> str | None:
        """Why a running job's worker is gone (lease expired, or its process no longer runs on
        this host), or None while it may still be working."""
        if row["lease_expires_at"] is not None and row["lease_expires_at"] < now:
            return "stopped renewing its lease"
        worker = row["worker"] or ""
        published = conn.execute(
            "SELECT host, pid, status FROM components WHERE kind = 'worker' AND name = %s", (worker,)
        ).fetchone()
        if published is None:
            return worker_gone(worker, None, None, None)
        return worker_gone(worker, published["host"], published["pid"], published["status"])

    def retry(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        now = _now(now)
        who = f" by {by}" if by else ""
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            state = JobState(row["state"])
            if state not in (JobState.FAILED, JobState.CANCELLED, JobState.RETRY_WAIT):
                raise InvalidTransition(
                    f"job {job_id} is {state}; only failed, cancelled or waiting jobs can be retried"
                )
            self._requeue(
                conn, job_id, now, f"retry requested{who}",
                attempts=0, next_attempt_at=None, finished_at=None, error_kind=None, error_message=None,
                error_config=False, cancel_requested=False, followup=None, dismissed_at=None,
            )
        self.notify_work()
        self.log(job_id, f"retry requested{who}", now=now)
        return self.get(job_id)

    def dismiss(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        now = _now(now)
        who = f" by {by}" if by else ""
        with self._tx() as conn:
            row = conn.execute("SELECT state, dismissed_at FROM jobs WHERE id = %s FOR UPDATE", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] != "failed":
                raise InvalidTransition(f"job {job_id} is {row['state']}; only failed jobs can be dismissed")
            if row["dismissed_at"] is None:
                conn.execute("UPDATE jobs SET dismissed_at = %s, updated_at = %s WHERE id = %s", (now, now, job_id))
                self._add_history(conn, job_id, "failed", f"failure dismissed{who}", now, event=False)
        return self.get(job_id)

    # -- writing: workers --------------------------------------------------

    def claim(self, worker: str, *, now: float | None = None) -> Job | None:
        now = _now(now)
        with self._tx(single=True) as conn:
            # One statement, its own transaction, one round trip: take the events lock
            # (an InitPlan, run before the first row is looked at, so before the event
            # gets its id), pick the oldest queued job no other claim holds, mark it
            # running under this worker's lease, write its history entry and its
            # event, read its files.
            cur = conn.execute(
                "WITH next AS (SELECT id FROM jobs WHERE state = 'queued'"
                " AND (SELECT count(pg_advisory_xact_lock(%(lock)s))) = 1 ORDER BY message_id"
                " LIMIT 1 FOR UPDATE SKIP LOCKED),"
                " claimed AS (UPDATE jobs SET state = 'running', worker = %(w)s, attempts = attempts + 1,"
                " message_id = NULL, lease_expires_at = %(lease)s, started_at = coalesce(started_at, %(now)s),"
                " updated_at = %(now)s, next_attempt_at = NULL FROM next WHERE jobs.id = next.id RETURNING jobs.*),"
                " entry AS (INSERT INTO job_history (job_id, at, state, message)"
                " SELECT id, %(now)s, 'running', 'attempt ' || attempts || ' on ' || %(w)s FROM claimed),"
                " event AS (INSERT INTO events (at, type, subject, job_id, owner, data)"
                f" SELECT %(now)s, '{JOB_EVENT_PREFIX}running', 'job/' || j.id, j.id, j.owner,"
                f" {CLAIM_EVENT_DATA} FROM claimed j)"
                " SELECT claimed.*, (SELECT coalesce(json_agg(json_build_array(f.path, f.size, f.sha256)"
                " ORDER BY f.seq), '[]') FROM job_files f WHERE f.job_id = claimed.id) AS files_json FROM claimed",
                {"w": worker, "lease": now + self.lease_seconds, "now": now, "lock": EVENTS_LOCK},
            )
            row = cur.fetchone()
        if row is None:
            return None
        files = tuple(FileEntry(path, size, sha256) for path, size, sha256 in row["files_json"])
        return job_from_row(row, self.log_path(row["id"]), files=files)

    def replace_spec(self, job_id: int, worker: str, spec: JobSpec, *, now: float | None = None) -> Job:
        """Store what a running job's acquisition is now (re-read from disk on a retry); key and source stay."""
        now = _now(now)
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET spec = %s, owner = %s, shape_key = %s, updated_at = %s WHERE id = %s"
                " AND state = 'running' AND worker = %s RETURNING id",
                (json.dumps(dataclasses.replace(spec, session_key=None).to_dict(files=False)), spec.owner,
                 shape_key(spec), now, job_id, worker),
            ).fetchone()
            if row is None:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            conn.execute("DELETE FROM job_files WHERE job_id = %s", (job_id,))
            self._insert_files(conn, [(job_id, spec)])
        return self.get(job_id)

    def report_progress(
        self, job_id: int, worker: str, progress: Progress | None = None, *, now: float | None = None
    ) -> bool:
        now = _now(now)
        with self._tx(single=True) as conn:  # one statement: its own transaction, one round trip
            if progress is None:
                row = conn.execute(
                    "UPDATE jobs SET lease_expires_at = %s WHERE id = %s AND state = 'running' AND worker = %s"
                    " RETURNING cancel_requested",
                    (now + self.lease_seconds, job_id, worker),
                ).fetchone()
            else:
                row = conn.execute(
                    "UPDATE jobs SET lease_expires_at = %s, progress = %s, updated_at = %s"
                    " WHERE id = %s AND state = 'running' AND worker = %s RETURNING cancel_requested",
                    (now + self.lease_seconds, json.dumps(progress.to_dict()), now, job_id, worker),
                ).fetchone()
        if row is None:
            raise LeaseLost(f"job {job_id} is no longer held by {worker}")
        return bool(row["cancel_requested"])

    def succeed(
        self,
        job_id: int,
        worker: str,
        result: dict[str, Any],
        *,
        now: float | None = None,
        mails: MailComposer | None = None,
        progress: Progress | None = None,
        content_key: str | None = None,
        running: Job | None = None,  # a hint (JobStore.succeed); the row comes back from the UPDATE here
    ) -> Job:
        now = _now(now)
        with self._tx(single=self._no_mail(mails)) as conn:
            return self._finish_running(
                conn, job_id, worker,
                "state = 'succeeded', result = %s, finished_at = %s, updated_at = %s,"
                " lease_expires_at = NULL, session_key = NULL, progress = coalesce(%s, progress),"
                " error_kind = NULL, error_message = NULL, error_config = FALSE, content_key = %s,"
                f" {FINISHED_FOLLOWUP}",
                (json.dumps(result), now, now, json.dumps(progress.to_dict()) if progress else None, content_key),
                now, mails, "succeeded",
            )

    def fail(
        self,
        job_id: int,
        worker: str,
        failure: ImportFailure,
        *,
        now: float | None = None,
        mails: MailComposer | None = None,
    ) -> Job:
        now = _now(now)
        kind = ErrorKind.TRANSIENT if failure.transient else ErrorKind.PERMANENT
        with self._tx() as conn:
            current = self._running(conn, job_id, worker)
            attempts = current["attempts"]
            if failure.transient and attempts < current["max_attempts"]:
                wait = self.retry_policy.delay(attempts)
                row = conn.execute(
                    "UPDATE jobs SET state = 'retry_wait', next_attempt_at = %s, updated_at = %s, worker = NULL,"
                    " lease_expires_at = NULL, error_kind = %s, error_message = %s, error_config = %s"
                    " WHERE id = %s RETURNING *",
                    (now + wait, now, str(kind), failure.message, bool(failure.config_error), job_id),
                ).fetchone()
                self._add_history(
                    conn, job_id, JobState.RETRY_WAIT,
                    f"attempt {attempts} failed ({kind}): {failure.message}; next attempt in {wait:g} s", now,
                )
                return self._job(row, conn=conn)
            message = f"gave up after {attempts} attempts: {failure.message}" if failure.transient else failure.message
            row = conn.execute(
                "UPDATE jobs SET state = 'failed', finished_at = %s, updated_at = %s, lease_expires_at = NULL,"
                " session_key = NULL, error_kind = %s, error_message = %s, error_config = %s,"
                f" {FINISHED_FOLLOWUP} WHERE id = %s RETURNING *",
                (now, now, str(kind), message, bool(failure.config_error), job_id),
            ).fetchone()
            return self._finish(conn, row, now, mails, f"failed ({kind}): {message}")

    def cancelled(
        self, job_id: int, worker: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> Job:
        now = _now(now)
        with self._tx(single=self._no_mail(mails)) as conn:
            return self._finish_running(
                conn, job_id, worker,
                "state = 'cancelled', finished_at = %s, updated_at = %s, lease_expires_at = NULL,"
                f" session_key = NULL, {FINISHED_FOLLOWUP}",
                (now, now), now, mails, "cancelled while running",
            )

    def release(self, job_id: int, worker: str, *, now: float | None = None, reason: str = "",
                delay: float = 0.0) -> Job:
        now = _now(now)
        with self._tx() as conn:
            row = self._running(conn, job_id, worker)
            message = f"released by {worker}: {reason or 'stopping'}"
            if delay > 0:
                conn.execute(
                    "UPDATE jobs SET state = 'retry_wait', next_attempt_at = %s, updated_at = %s, worker = NULL,"
                    " lease_expires_at = NULL, attempts = %s WHERE id = %s",
                    (now + delay, now, max(row["attempts"] - 1, 0), job_id),
                )
                self._add_history(conn, job_id, JobState.RETRY_WAIT, f"{message}; looked at again in {delay:g} s",
                                  now)
            else:
                self._requeue(conn, job_id, now, message, attempts=max(row["attempts"] - 1, 0))
        if delay <= 0:
            self.notify_work()
        return self.get(job_id)

    def maintain(self, *, now: float | None = None) -> dict[str, int]:
        now = _now(now)
        stats = {"expired": 0, "due": 0}
        with self._tx() as conn:
            # SKIP LOCKED: a job another transaction is finishing right now is not expired here.
            expired = conn.execute(
                "SELECT * FROM jobs WHERE state = 'running' AND lease_expires_at < %s FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchall()
            for row in expired:
                stats["expired"] += 1
                note = f"lease of {row['worker']} expired (worker stopped or stalled)"
                if row["cancel_requested"]:
                    # Queued again, it would be claimed again (an attempt burnt) only to be
                    # cancelled there: the cancel lands now (issue 11 outside test F5).
                    message = f"cancelled: the {note} before it acted on the cancel request"
                    done = conn.execute(
                        "UPDATE jobs SET state = 'cancelled', finished_at = %s, updated_at = %s,"
                        " lease_expires_at = NULL, session_key = NULL, next_attempt_at = NULL, message_id = NULL,"
                        f" {FINISHED_FOLLOWUP} WHERE id = %s RETURNING *",
                        (now, now, row["id"]),
                    ).fetchone()
                    self._finish(conn, done, now, None, message)
                elif row["attempts"] >= row["max_attempts"]:
                    # Transient like any attempt that ran out: a crash or a stall is not the files' fault.
                    message = f"gave up after {row['attempts']} attempts; the last one ended when its {note}"
                    done = conn.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = %s, updated_at = %s, lease_expires_at = NULL,"
                        " session_key = NULL, error_kind = 'transient', error_message = %s,"
                        f" {FINISHED_FOLLOWUP} WHERE id = %s RETURNING *",
                        (now, now, message, row["id"]),
                    ).fetchone()
                    self._finish(conn, done, now, None, message)
                else:
                    self._requeue(conn, row["id"], now, note + "; queued again")
            due = conn.execute(
                "SELECT id FROM jobs WHERE state = 'retry_wait' AND next_attempt_at <= %s FOR UPDATE SKIP LOCKED",
                (now,),
            ).fetchall()
            for row in due:
                stats["due"] += 1
                self._requeue(conn, row["id"], now, "retry time reached")
            conn.execute(
                "UPDATE outbox SET state = 'pending' WHERE state = 'sending' AND claimed_until < %s", (now,)
            )
        if stats["expired"] or stats["due"]:
            self.notify_work()
        return stats

    # -- follow-ups of watched jobs -----------------------------------------

    def flush(self) -> None:
        """Every commit is durable already (PostgreSQL's ``synchronous_commit`` is on by default)."""

    def followups(self, source: str, *, limit: int = 100) -> list[Job]:
        clause, args = _source_filter(source)
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT * FROM jobs WHERE followup = 'pending' AND {clause} ORDER BY id LIMIT %s", (*args, limit)
            ).fetchall()
        return self._jobs(rows)

    def followup_done(self, job_id: int, note: str = "", *, now: float | None = None) -> None:
        now = _now(now)
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE jobs SET followup = 'done' WHERE id = %s RETURNING state", (job_id,)
            ).fetchone()
            if note and row is not None:
                self._add_history(conn, job_id, row["state"], note, now, event=False)
        if note:
            self.log(job_id, note, now=now)

    # -- components (workers, watchers, importer) ---------------------------

    def set_component(self, kind: str, name: str, status: dict[str, Any], *, now: float | None = None) -> None:
        """As the contract says; a watcher whose ``health`` changes also writes a health event."""
        now = _now(now)
        upsert = (
            "INSERT INTO components (kind, name, host, pid, status, updated_at) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (kind, name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
            " status = excluded.status, updated_at = excluded.updated_at"
        )
        args = (kind, name, socket.gethostname(), os.getpid(), json.dumps(status), now)
        with self._tx() as conn:
            if kind != "watcher" or "health" not in status:
                conn.execute(upsert, args)
                return
            old = conn.execute(
                "SELECT status::jsonb ->> 'health' AS health FROM components WHERE kind = %s AND name = %s"
                " FOR UPDATE", (kind, name),
            ).fetchone()
            conn.execute(upsert, args)
            previous = old["health"] if old else None
            if previous != status["health"]:
                self._insert_event(conn, WATCHER_HEALTH_EVENT, f"watcher/{name}",
                                   watcher_event_data(name, status, previous), None, None, now)

    # -- events ----------------------------------------------------------------

    @staticmethod
    def _insert_event(conn, type_: str, subject: str, data: dict[str, Any], job_id: int | None,
                      owner: str | None, now: float) -> int:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (EVENTS_LOCK,))
        return conn.execute(
            "INSERT INTO events (at, type, subject, job_id, owner, data) VALUES (%s, %s, %s, %s, %s, %s)"
            " RETURNING id",
            (now, type_, subject, job_id, owner, json.dumps(data)),
        ).fetchone()["id"]

    def add_event(
        self,
        type: str,
        subject: str,
        data: dict[str, Any],
        *,
        job_id: int | None = None,
        owner: str | None = None,
        now: float | None = None,
    ) -> int:
        with self._tx() as conn:
            return self._insert_event(conn, type, subject, data, job_id, owner, _now(now))

    def events_after(
        self,
        after: int = 0,
        *,
        limit: int = 100,
        owners: Iterable[str] | None = None,
        job_id: int | None = None,
    ) -> list[dict[str, Any]]:
        where, args = ["id > %s"], [int(after)]
        if owners is not None:
            where.append("owner = ANY(%s)")
            args.append(list(owners))
        if job_id is not None:
            where.append("job_id = %s")
            args.append(job_id)
        with self._tx() as conn:
            rows = conn.execute(
                f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT %s", (*args, int(limit))
            ).fetchall()
        return [
            {"id": r["id"], "at": r["at"], "type": r["type"], "subject": r["subject"], "job_id": r["job_id"],
             "owner": r["owner"], "data": json.loads(r["data"])}
            for r in rows
        ]

    def last_event_id(self) -> int:
        with self._tx() as conn:
            # The identity sequence remembers ids of pruned rows too (NULL before the first event).
            return conn.execute(
                "SELECT greatest(coalesce(pg_sequence_last_value(pg_get_serial_sequence('events', 'id')), 0),"
                " coalesce((SELECT max(id) FROM events), 0)) AS id"
            ).fetchone()["id"]

    def sink_claim(self, name: str, holder: str, *, hold: float, now: float | None = None) -> dict[str, Any] | None:
        now = _now(now)
        with self._tx() as conn:
            conn.execute(
                "INSERT INTO event_sinks (name, last_id, updated_at)"
                " VALUES (%s, (SELECT coalesce(max(id), 0) FROM events), %s) ON CONFLICT (name) DO NOTHING",
                (name, now),
            )
            row = conn.execute(
                "UPDATE event_sinks SET holder = %s, held_until = %s WHERE name = %s"
                " AND (holder IS NULL OR holder = %s OR held_until < %s) RETURNING *",
                (holder, now + hold, name, holder, now),
            ).fetchone()
        return dict(row) if row else None

    def sink_update(self, name: str, holder: str, *, now: float | None = None, **fields: Any) -> None:
        allowed = {"last_id", "failing_since", "last_error", "disabled_at"}
        sets, args = ["updated_at = %s"], [_now(now)]
        for key, value in fields.items():
            if key == "delivered":
                sets.append("delivered = delivered + %s")
            elif key in allowed:
                sets.append(f"{key} = %s")
            else:
                raise StoreError(f"unknown sink field {key!r}")
            args.append(value)
        with self._tx() as conn:
            row = conn.execute(
                f"UPDATE event_sinks SET {', '.join(sets)} WHERE name = %s AND holder = %s RETURNING name",
                (*args, name, holder),
            ).fetchone()
        if row is None:
            raise StoreError(f"event sink {name!r} is not held by {holder}")

    def sink_reset(self, name: str, *, now: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE event_sinks SET disabled_at = NULL, failing_since = NULL, last_error = NULL,"
                " updated_at = %s WHERE name = %s",
                (_now(now), name),
            )

    def sinks(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return [dict(r) for r in conn.execute("SELECT * FROM event_sinks ORDER BY name").fetchall()]

    def events_prune(self, before: float, *, sinks: Iterable[str] = ()) -> int:
        sinks = list(sinks)
        floor, args = "", [before]
        if sinks:
            floor = " AND id <= (SELECT coalesce(min(last_id), 0) FROM event_sinks WHERE name = ANY(%s))"
            args.append(sinks)
        with self._tx() as conn:
            rows = conn.execute(f"DELETE FROM events WHERE at < %s{floor} RETURNING id", args).fetchall()
        return len(rows)

    def remove_component(self, kind: str, name: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM components WHERE kind = %s AND name = %s", (kind, name))

    def components(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM components" + (" WHERE kind = %s" if kind else "") + " ORDER BY kind, name"
        with self._tx() as conn:
            rows = conn.execute(sql, (kind,) if kind else ()).fetchall()
        return [component_from_row(r) for r in rows]

    # -- watch folder leases -------------------------------------------------

    def hold_folder(self, folder: str, holder: str, *, ttl: float, now: float | None = None) -> bool:
        now = _now(now)
        with self._tx() as conn:
            row = conn.execute(
                "INSERT INTO folder_leases (folder, holder, host, pid, acquired_at, expires_at)"
                " VALUES (%(f)s, %(h)s, %(host)s, %(pid)s, %(now)s, %(until)s)"
                " ON CONFLICT (folder) DO UPDATE SET holder = excluded.holder, host = excluded.host,"
                " pid = excluded.pid, expires_at = excluded.expires_at,"
                " acquired_at = CASE WHEN folder_leases.holder = excluded.holder"
                " THEN folder_leases.acquired_at ELSE excluded.acquired_at END"
                " WHERE folder_leases.holder = excluded.holder OR folder_leases.expires_at < %(now)s"
                " RETURNING holder",
                {"f": folder, "h": holder, "host": socket.gethostname(), "pid": os.getpid(),
                 "now": now, "until": now + ttl},
            ).fetchone()
        return row is not None

    def release_folder(self, folder: str, holder: str) -> None:
        with self._tx() as conn:
            conn.execute("DELETE FROM folder_leases WHERE folder = %s AND holder = %s", (folder, holder))

    def folder_holders(self) -> list[dict[str, Any]]:
        with self._tx() as conn:
            return list(conn.execute("SELECT * FROM folder_leases ORDER BY folder").fetchall())

    # -- pending acquisitions -------------------------------------------------

    def pending_sync(self, watch: str, entries: Iterable[PendingEntry], *, now: float | None = None) -> None:
        now = _now(now)
        rows = [
            (watch, e.path, e.kind, e.reason, e.owner, e.first_seen, e.last_change, e.quiet_until, e.digest, now)
            for e in entries
        ]
        with self._tx() as conn:
            conn.execute(
                "DELETE FROM pending WHERE watch = %s AND NOT (path = ANY(%s))", (watch, [r[1] for r in rows])
            )
            if rows:
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO pending (watch, path, kind, reason, owner, first_seen, last_change,"
                        " quiet_until, digest, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                        " ON CONFLICT (watch, path) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,"
                        " owner = excluded.owner, first_seen = least(pending.first_seen, excluded.first_seen),"
                        " last_change = excluded.last_change, quiet_until = excluded.quiet_until,"
                        " digest = excluded.digest, updated_at = excluded.updated_at",
                        rows,
                    )

    def pending_list(
        self, *, watch: str | None = None, owner: str | None = None, limit: int = 500
    ) -> list[PendingEntry]:
        where, params = [], []
        if watch is not None:
            where.append("watch = %s")
            params.append(watch)
        if owner is not None:
            where.append("owner = %s")
            params.append(owner)
        sql = "SELECT * FROM pending" + (" WHERE " + " AND ".join(where) if where else "")
        sql += ' ORDER BY first_seen, watch COLLATE "C", path COLLATE "C" LIMIT %s'
        with self._tx() as conn:
            rows = conn.execute(sql, (*params, int(limit))).fetchall()
        return [pending_from_row(r) for r in rows]

    # -- outbox -------------------------------------------------------------

    def _outbox_insert(self, conn, mails: Iterable[Mail], job_id: int | None, now: float) -> None:
        rows = [
            (job_id, mail.kind, mail.sender or self.sender, json.dumps(list(mail.recipients)), mail.subject,
             mail.as_bytes(), now, now)
            for mail in mails
        ]
        for row in rows:  # queued in the pipeline (executemany would exchange them at once: a round trip)
            conn.execute(
                "INSERT INTO outbox (job_id, kind, sender, recipients, subject, raw, state, next_attempt_at,"
                " created_at) VALUES (%s, %s, %s, %s, %s, %s, 'pending', %s, %s)",
                row,
            )

    def outbox_add(self, mails: Iterable[Mail], *, job_id: int | None = None, now: float | None = None) -> None:
        with self._tx() as conn:
            self._outbox_insert(conn, mails, job_id, _now(now))

    def outbox_digest(self, digest: Mail, mail_ids: Iterable[int], *, now: float | None = None) -> int:
        now = _now(now)
        with self._tx() as conn:
            digest_id = conn.execute(
                "INSERT INTO outbox (job_id, kind, sender, recipients, subject, raw, state, next_attempt_at,"
                " created_at) VALUES (NULL, %s, %s, %s, %s, %s, 'pending', %s, %s) RETURNING id",
                (digest.kind, digest.sender or self.sender, json.dumps(list(digest.recipients)), digest.subject,
                 digest.as_bytes(), now, now),
            ).fetchone()["id"]
            ids = [int(i) for i in mail_ids]
            if ids:
                conn.execute(
                    "UPDATE outbox SET state = 'digested', digest_id = %s, sent_at = NULL, last_error = NULL,"
                    " claimed_until = NULL WHERE id = ANY(%s)", (digest_id, ids),
                )
        return int(digest_id)

    def outbox_claim(self, *, now: float | None = None, limit: int = 10, hold: float = 300.0) -> list[OutboxMail]:
        now = _now(now)
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE outbox SET state = 'sending', claimed_until = %s, attempts = attempts + 1"
                " WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= %s"
                " ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED) RETURNING *",
                (now + hold, now, limit),
            ).fetchall()
        return sorted((mail_from_row(r) for r in rows), key=lambda m: m.id)

    def outbox_sent(self, mail_id: int, *, now: float | None = None) -> None:
        with self._tx() as conn:
            conn.execute(
                "UPDATE outbox SET state = 'sent', sent_at = %s, last_error = NULL, claimed_until = NULL"
                " WHERE id = %s",
                (_now(now), mail_id),
            )

    def outbox_failed(self, mail_id: int, error: str, *, permanent: bool, now: float | None = None) -> OutboxMail:
        now = _now(now)
        with self._tx() as conn:
            row = conn.execute("SELECT attempts FROM outbox WHERE id = %s FOR UPDATE", (mail_id,)).fetchone()
            if row is None:
                raise StoreError(f"no mail with id {mail_id} in the outbox")
            give_up = permanent or row["attempts"] >= self.mail_retry.max_attempts
            row = conn.execute(
                "UPDATE outbox SET state = %s, next_attempt_at = %s, last_error = %s, claimed_until = NULL"
                " WHERE id = %s RETURNING *",
                (
                    "failed" if give_up else "pending",
                    None if give_up else now + self.mail_retry.delay(row["attempts"]),
                    error,
                    mail_id,
                ),
            ).fetchone()
        return mail_from_row(row)

    def outbox_dismiss(self, mail_id: int) -> OutboxMail | None:
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE outbox SET state = 'dismissed' WHERE id = %s AND state = 'failed' RETURNING *", (mail_id,)
            ).fetchone()
        return None if row is None else mail_from_row(row)

    def outbox_hold(self, mail_ids: Iterable[int], *, until: float, now: float | None = None) -> int:
        ids = [int(i) for i in mail_ids]
        if not ids:
            return 0
        with self._tx() as conn:
            rows = conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = %s, claimed_until = NULL,"
                " attempts = greatest(0, attempts - 1) WHERE id = ANY(%s) AND state = 'sending' RETURNING id",
                (until, ids),
            ).fetchall()
        return len(rows)

    def outbox_resend(self, mail_id: int, *, now: float | None = None) -> OutboxMail:
        with self._tx() as conn:
            row = conn.execute(
                "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = %s, sent_at = NULL"
                " WHERE id = %s AND state IN ('failed', 'dismissed', 'sent', 'digested') RETURNING *",
                (_now(now), mail_id),
            ).fetchone()
        if row is None:
            raise StoreError(f"mail {mail_id} does not exist or is not failed, dismissed, digested or sent; nothing to resend")
        return mail_from_row(row)

    def outbox_list(self, *, state: str | None = None, limit: int = 50, before: int | None = None,
                    owners: Sequence[str] | None = None) -> list[OutboxMail]:
        where, params = outbox_where(state, before, "%s", owners)
        with self._tx() as conn:
            rows = conn.execute(f"SELECT * FROM outbox{where} ORDER BY id DESC LIMIT %s", (*params, limit)).fetchall()
        return [mail_from_row(r) for r in rows]

    def outbox_counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        counts = {"pending": 0, "sending": 0, "sent": 0, "failed": 0}
        where, params = outbox_where(None, None, "%s", owners)
        with self._tx() as conn:
            for row in conn.execute(f"SELECT state, count(*) AS n FROM outbox{where} GROUP BY state", params):
                counts[row["state"]] = row["n"]
        return counts

    def outbox_next_due(self) -> float | None:
        with self._tx() as conn:
            return conn.execute(
                "SELECT min(next_attempt_at) AS t FROM outbox WHERE state = 'pending'"
            ).fetchone()["t"]

    # -- health --------------------------------------------------------------

    def ping(self) -> bool:
        try:
            with self._tx() as conn:
                conn.execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
        except (StoreError, psycopg.Error) as exc:
            self._last_error = str(exc)
            return False
        self._last_error = None
        return True

    # -- wake-ups --------------------------------------------------------------

    def wait_for_work(self, seen: int, timeout: float) -> bool:
        """As the contract's, and also woken by a ``NOTIFY`` from any host (the LISTEN thread starts on first use)."""
        self._start_listener()
        return super().wait_for_work(seen, timeout)

    def _start_listener(self) -> None:
        if self._listener is not None:
            return
        with self._listener_lock:
            if self._listener is not None or self._listener_stop.is_set():
                return
            self._listener = threading.Thread(target=self._listen, name="pg-listen", daemon=True)
            self._listener.start()

    def _listen(self) -> None:
        backoff = iter(D.RECONNECT_BACKOFF)
        reconnecting = False
        while not self._listener_stop.is_set():
            started = time.monotonic()
            try:
                with psycopg.connect(self.url, autocommit=True, **self._connect_kwargs) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    self._listening = True
                    self._outage.up(started)
                    backoff = iter(D.RECONNECT_BACKOFF)
                    if reconnecting:  # a job queued while we were not listening is claimable now
                        self.notify_work()
                    reconnecting = True
                    while not self._listener_stop.is_set():
                        for _ in conn.notifies(timeout=1.0, stop_after=1):
                            self.notify_work()
            except psycopg.Error as exc:  # the outage's one line says it (workers poll meanwhile)
                self._outage.down(f"PostgreSQL at {self.location}: LISTEN connection lost ({_first_line(exc)}); "
                                  "workers poll meanwhile")
            self._listening = False
            self._listener_stop.wait(next(backoff, D.RECONNECT_BACKOFF[-1]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
