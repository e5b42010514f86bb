"""The SQLite job store (the embedded default): jobs, their history, the dispatch queue and the mail outbox in one SQLite file.

It implements :class:`watchfolder.store.base.JobStore`; it and the other store
implementations are the only modules that speak SQL. Dispatch goes through litequeue: a
job has a ready queue message (``jobs.message_id``) exactly while it is
queued; the job row says everything else (attempts, lease, progress, result).
Every transition commits the job row, its queue message and its outbox mails
in one transaction, so a crash at any instant leaves either the old state or
the new one.

A claim does not use litequeue's ``pop``, which runs a transaction of its own
(a crash between it and the job update would leave a locked message whose job
is not running). Instead, inside one ``BEGIN IMMEDIATE`` that holds the write
lock, it ``peek``s the oldest ready message, marks the job running and marks
the message ``done``. A running job holds a lease that its worker renews; when
the lease expires (the worker was killed), ``maintain`` queues the job again
with a new message.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from litequeue import LiteQueue

from .. import defaults as D
from ..errors import ImportFailure, InvalidTransition, JobNotFound, LeaseLost, StoreBroken, StoreError
from ..filemodes import PRIVATE, FileModes
from ..job import (
    FINISHED_STATES,
    ErrorKind,
    FileEntry,
    HistoryEntry,
    Job,
    JobSpec,
    JobState,
    Progress,
    RetryPolicy,
    shape_key,
)
from .base import JobStore, Mail, MailComposer, OutboxMail, PendingEntry, worker_gone
from .rows import (
    FINISHED_FOLLOWUP,
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
from .space import DiskFull, free_space, io_error_from_full_disk, is_disk_full

log = logging.getLogger(__name__)

QUEUE_TABLE = "dispatch"
#: Milliseconds a job's end waits for readers to wipe its erased session key from the WAL.
WIPE_WAIT_MS = 1000

#: CloudEvents ``type`` of a job event: this prefix and the job's new state.
JOB_EVENT_PREFIX = "org.watchfolder.job."
#: A job event, built in SQL from the job row as the transition left it (no round trip
#: through Python): the job summary of ``EventData`` in api/openapi.yaml. The file
#: list stays out (it can hold 100,000 entries); the result keeps everything else.
#: CloudEvents ``type`` of a watcher's health change.
WATCHER_HEALTH_EVENT = "org.watchfolder.watcher.health"
EVENT_INSERT_SQL = (
    "INSERT INTO events (at, type, subject, job_id, owner, data)"
    " SELECT ?1, ?2, 'job/' || id, id, owner, json_object("
    "'job_id', id, 'state', state, 'owner', owner, 'group', json_extract(spec, '$.group'),"
    " 'name', json_extract(spec, '$.name'), 'source', source, 'path', json_extract(spec, '$.root'),"
    " 'target', json(json_extract(spec, '$.target')), 'attempts', attempts, 'max_attempts', max_attempts,"
    # ?5: the result without its file list, when the caller has it (a succeeding job): SQLite
    # would otherwise parse the whole result (tens of MB for a plate of 100,000 files) to drop it.
    " 'message', ?3, 'result', CASE WHEN ?5 IS NULL THEN json_remove(json(result), '$.files') ELSE json(?5) END,"
    " 'error', CASE WHEN error_kind IS NULL THEN NULL"
    " ELSE json_object('kind', error_kind, 'message', error_message) END,"
    " 'created_at', created_at, 'updated_at', updated_at)"
    " FROM jobs WHERE id = ?4"
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
-- litequeue indexes status and message_id apart, so finding the oldest ready
-- message sorts every ready one: a backlog of N drains in O(N^2). This index
-- makes it a seek.
CREATE INDEX IF NOT EXISTS dispatch_ready ON dispatch(status, message_id);
CREATE TABLE IF NOT EXISTS jobs (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key  TEXT NOT NULL UNIQUE,
    state            TEXT NOT NULL,
    owner            TEXT NOT NULL,
    source           TEXT NOT NULL,
    spec             TEXT NOT NULL,   -- JSON, without the session key and (schema 2) without the files
    session_key      TEXT,            -- secret, erased when the job ends
    attempts         INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    next_attempt_at  REAL,
    created_at       REAL NOT NULL,
    updated_at       REAL NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    worker           TEXT,
    lease_expires_at REAL,
    message_id       TEXT,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    progress         TEXT,
    result           TEXT,
    error_kind       TEXT,
    error_message    TEXT,
    error_config     INTEGER NOT NULL DEFAULT 0,
    followup         TEXT,            -- NULL, 'pending' or 'done' (post-actions of watched jobs)
    dismissed_at     REAL             -- an admin acknowledged the failure (seed API DELETE)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, next_attempt_at);
CREATE INDEX IF NOT EXISTS jobs_lease ON jobs(lease_expires_at) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS jobs_owner ON jobs(owner, id);
CREATE INDEX IF NOT EXISTS jobs_source ON jobs(source, id);
CREATE INDEX IF NOT EXISTS jobs_followup ON jobs(source, id) WHERE followup = 'pending';
-- The listed files, written once at enqueue: out of the jobs row, which every
-- progress write and lease renewal rewrites whole (an HCS plate lists 100,000 files).
CREATE TABLE IF NOT EXISTS job_files (
    job_id  INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    path    TEXT NOT NULL,
    size    INTEGER,
    sha256  TEXT,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS job_history (
    id      INTEGER PRIMARY KEY,
    job_id  INTEGER NOT NULL REFERENCES jobs(id),
    at      REAL NOT NULL,
    state   TEXT NOT NULL,
    message TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS job_history_job ON job_history(job_id, id);
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    job_id          INTEGER,
    kind            TEXT NOT NULL,
    sender          TEXT NOT NULL,
    recipients      TEXT NOT NULL,   -- JSON list
    subject         TEXT NOT NULL,
    raw             BLOB NOT NULL,
    state           TEXT NOT NULL,   -- pending | sending | sent | failed | dismissed | digested
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL,
    claimed_until   REAL,
    last_error      TEXT,
    created_at      REAL NOT NULL,
    sent_at         REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(state, next_attempt_at);
-- The event outbox: one row per job state change (written by the transaction that
-- makes the change), progress milestone and watcher health change. Delivered in id
-- order to every sink (webhook, MQTT) and read by GET /api/v1/events.
CREATE TABLE IF NOT EXISTS events (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    at      REAL NOT NULL,
    type    TEXT NOT NULL,
    subject TEXT NOT NULL,
    job_id  INTEGER,
    owner   TEXT,
    data    TEXT NOT NULL   -- JSON
);
CREATE INDEX IF NOT EXISTS events_owner ON events(owner, id);
-- One row per event sink: how far it has delivered, who delivers it now (a lease,
-- so one process at a time delivers a sink, in order), and whether it is failing.
CREATE TABLE IF NOT EXISTS event_sinks (
    name          TEXT PRIMARY KEY,
    last_id       INTEGER NOT NULL DEFAULT 0,
    holder        TEXT,
    held_until    REAL,
    delivered     INTEGER NOT NULL DEFAULT 0,
    failing_since REAL,
    last_error    TEXT,
    disabled_at   REAL,
    updated_at    REAL
);
CREATE TABLE IF NOT EXISTS components (
    kind       TEXT NOT NULL,
    name       TEXT NOT NULL,
    host       TEXT NOT NULL,
    pid        INTEGER NOT NULL,
    status     TEXT NOT NULL,   -- JSON
    updated_at REAL NOT NULL,
    PRIMARY KEY (kind, name)
);
CREATE TABLE IF NOT EXISTS pending (
    watch       TEXT NOT NULL,
    path        TEXT NOT NULL,
    kind        TEXT NOT NULL,
    reason      TEXT NOT NULL,
    owner       TEXT,
    first_seen  REAL NOT NULL,
    last_change REAL NOT NULL,
    quiet_until REAL,
    digest      TEXT,
    updated_at  REAL NOT NULL,
    PRIMARY KEY (watch, path)
);
CREATE INDEX IF NOT EXISTS pending_first_seen ON pending(first_seen);
"""


def watcher_event_data(name: str, status: dict[str, Any], previous: str | None) -> dict[str, Any]:
    """The data of a watcher health event: its name, folder, health before and now, and why."""
    return {
        "watcher": name,
        "path": status.get("path"),
        "health": status.get("health"),
        "previous": previous,
        "problem": status.get("error") or status.get("warning"),
    }


# Numbered schema steps after the baseline SCHEMA above (which stays idempotent:
# CREATE … IF NOT EXISTS). A store opened at an older version applies the
# missing steps at start, in one transaction each, and logs each one.
MIGRATIONS: list[tuple[int, str, str]] = [
    (1, "jobs, history, dispatch queue, outbox and components", ""),
    # job_files is in SCHEMA: rows of version 1 keep their files in spec and are still
    # read; the version number keeps a version 1 program from reading version 2 rows.
    (2, "a job's listed files in job_files, not in jobs.spec", ""),
    (3, "watch folder leases (one watcher per folder)", """
CREATE TABLE IF NOT EXISTS folder_leases (
    folder      TEXT PRIMARY KEY,
    holder      TEXT NOT NULL,
    host        TEXT NOT NULL,
    pid         INTEGER NOT NULL,
    acquired_at REAL NOT NULL,
    expires_at  REAL NOT NULL
);
"""),
    # An admin mail folded into a digest is 'digested' with the digest's id, never 'sent'.
    (4, "outbox mails folded into an admin digest name it (outbox.digest_id)",
     "ALTER TABLE outbox ADD COLUMN digest_id INTEGER"),
    # Content de-duplication looks earlier jobs up by these (indexed), not among the newest N.
    # Back-filled for the jobs already there (_backfill_dedup_keys).
    # The columns are added by _add_dedup_keys (SQLite has no ADD COLUMN IF NOT EXISTS).
    (5, "content de-duplication keys (shape_key, content_key) on jobs, indexed", """
CREATE INDEX IF NOT EXISTS jobs_shape ON jobs(shape_key, id);
CREATE INDEX IF NOT EXISTS jobs_content ON jobs(content_key, id);
"""),
    # The keys of a one-file acquisition no longer hold its data file's name (job._key_paths):
    # computed again for the jobs already there (_backfill_dedup_keys), with step 5's.
    (6, "de-duplication keys of one-file acquisitions without the data file's name", ""),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]
#: The step after which the de-duplication keys of stored jobs are computed (again).
BACKFILL_VERSION = 6


_ADD_COLUMN = re.compile(r"\s*ALTER\s+TABLE\s+(\w+)\s+ADD\s+COLUMN\s+(\w+)", re.IGNORECASE)


def _column_there(conn: sqlite3.Connection, statement: str) -> bool:
    """Whether ``statement`` adds a column that is already there (SQLite has no ``ADD COLUMN IF NOT
    EXISTS``; a file whose version was set back is migrated again)."""
    match = _ADD_COLUMN.match(statement)
    if not match:
        return False
    table, column = match.groups()
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


def _add_dedup_keys(conn: sqlite3.Connection) -> None:
    """The columns of schema step 5, unless there already."""
    have = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
    for column in ("shape_key", "content_key"):
        if column not in have:
            conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} TEXT")


def _backfill_dedup_keys(conn: sqlite3.Connection) -> None:
    """Schema step 5 for the jobs already stored: each one's shape key, and the content key of
    each succeeded one (from its listed or recorded checksums), in the step's transaction."""
    rows = conn.execute("SELECT id, spec, state, result FROM jobs").fetchall()
    for row in rows:
        files = tuple(FileEntry(r["path"], r["size"], r["sha256"]) for r in conn.execute(
            "SELECT path, size, sha256 FROM job_files WHERE job_id = ? ORDER BY seq", (row["id"],)))
        shape, content = dedup_keys_of_row(row, files)
        conn.execute("UPDATE jobs SET shape_key = ?, content_key = ? WHERE id = ?", (shape, content, row["id"]))
    if rows:
        log.info("store: de-duplication keys of %d earlier job(s) recorded", len(rows))


# SQLite primary result codes (https://www.sqlite.org/rescode.html) -> (problem, fix).
_DB_ERRORS: dict[str, tuple[str, str]] = {
    "SQLITE_FULL": (
        "no space left on the disk holding the job database",
        "free space on that filesystem (old job logs are in the logs folder beside it)",
    ),
    "SQLITE_CORRUPT": (
        "the job database is corrupt",
        "stop every watchfolder process, move the file and its -wal/-shm aside, and restore the last backup "
        "(or salvage it: sqlite3 OLD .recover | sqlite3 NEW)",
    ),
    "SQLITE_NOTADB": (
        "the file is not an SQLite database (corrupt or overwritten)",
        "stop every watchfolder process, move the file and its -wal/-shm aside, and restore the last backup",
    ),
    "SQLITE_CANTOPEN": (
        "the job database cannot be opened",
        "check that its folder exists and that the user watchfolder runs as may write there (store.path)",
    ),
    "SQLITE_READONLY": (
        "the job database is read-only",
        "give the user watchfolder runs as write access to the file and its folder, or remount read-write",
    ),
    "SQLITE_IOERR": (
        "an I/O error on the job database (failing disk, or a network filesystem: SQLite needs a local disk)",
        "check the disk (dmesg) and keep store.path on a local filesystem",
    ),
    "SQLITE_BUSY": (
        "the job database stayed locked longer than store.busy_timeout",
        "look for a process holding it (fuser FILE) or raise store.busy_timeout",
    ),
    "SQLITE_LOCKED": (
        "the job database stayed locked longer than store.busy_timeout",
        "look for a process holding it (fuser FILE) or raise store.busy_timeout",
    ),
}


# Result codes of a store failing now rather than of a bad request: waited out by workers.
_STORE_FAULT_CODES = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_FULL", "SQLITE_IOERR")


def explain_database_error(exc: sqlite3.Error, path: os.PathLike | str) -> str:
    """One line for an admin: the database file, the problem, and the fix (by SQLite result code)."""
    code = getattr(exc, "sqlite_errorname", None) or ""
    primary = "_".join(code.split("_")[:2])  # SQLITE_IOERR_WRITE -> SQLITE_IOERR
    folder = Path(path).parent
    if primary == "SQLITE_FULL" or io_error_from_full_disk(exc, folder):
        # Also an I/O error on a full disk: SQLite could not size the new -shm of a cleanly
        # stopped database (issue 11 F4), not a failing disk.
        problem, fix = _DB_ERRORS["SQLITE_FULL"]
        return f"job database {path}: {problem} ({folder}, {free_space(folder)}; {exc}); {fix}"
    problem, fix = _DB_ERRORS.get(primary, (None, None))
    if problem is None:
        text = str(exc).lower()
        if "disk is full" in text:
            problem, fix = _DB_ERRORS["SQLITE_FULL"]
        elif "malformed" in text or "not a database" in text:
            problem, fix = _DB_ERRORS["SQLITE_CORRUPT"]
        else:
            return f"job database {path}: {exc}"
    return f"job database {path}: {problem} ({exc}); {fix}"




def _file_problem(path: Path) -> str | None:
    """What is wrong with the database file at ``path`` as a file: "is missing" or "is empty
    (0 bytes)" (which SQLite would take for a new database); None otherwise.

    Only ``stat``: opening and closing the file in a process that has it open through
    SQLite would drop that process's POSIX locks on it (fcntl semantics) and let
    writers corrupt it. A foreign file is refused by SQLite itself (SQLITE_NOTADB).
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        return "is missing"
    except OSError:
        return None  # unreadable: SQLite says why (SQLITE_CANTOPEN, SQLITE_IOERR)
    return "is empty (0 bytes)" if size == 0 else None


class _Connection(sqlite3.Connection):
    """A connection that reports a corrupt or foreign file to its store the first time it meets one."""

    on_corrupt: Callable[[sqlite3.DatabaseError], None] | None = None
    on_full: Callable[[sqlite3.DatabaseError], bool] | None = None
    on_written: Callable[[], None] | None = None
    #: Opened read-only because the disk is full (SQLiteStore.read_only): a refused write is
    #: a write refused for space, and is raised as SQLITE_FULL so every caller treats it so.
    full_disk_read_only = False

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        try:
            return super().execute(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._check(exc)
            raise

    def executemany(self, sql: str, parameters: Any, /) -> sqlite3.Cursor:
        try:
            return super().executemany(sql, parameters)
        except sqlite3.DatabaseError as exc:
            self._check(exc)
            raise

    def _check(self, exc: sqlite3.DatabaseError) -> None:
        """Corruption met after the store opened: :class:`StoreBroken` (a CLI opening a bad file
        keeps SQLite's error, which names the result code, for its one line)."""
        code = getattr(exc, "sqlite_errorname", "") or ""
        if self.full_disk_read_only and code.startswith("SQLITE_READONLY"):
            raise _full_error("opened read-only: no space to write") from exc
        if self.on_corrupt is not None and _is_corrupt(exc):
            broken = self.on_corrupt(exc)
            if broken:
                raise StoreBroken(broken) from exc
        if self.on_full is not None:
            if is_disk_full(exc):
                self.on_full(exc)
            elif (code.startswith("SQLITE_IOERR") or "I/O error" in str(exc)) and self.on_full(exc):
                # An I/O error on a full disk is a write refused for space (space.io_error_from_full_disk):
                # raised as SQLITE_FULL, every caller (workers, API, outage noise) takes it as such.
                raise _full_error(f"SQLite said: {exc}, the disk having no room") from exc


def _full_error(why: str) -> sqlite3.OperationalError:
    """SQLite's disk-full error (SQLITE_FULL), for a refusal for space it reported otherwise."""
    full = sqlite3.OperationalError(f"database or disk is full ({why})")
    full.sqlite_errorname = "SQLITE_FULL"
    return full


def _is_corrupt(exc: sqlite3.DatabaseError) -> bool:
    code = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    return code.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")) or "malformed" in text or "not a database" in text


def _now(now: float | None) -> float:
    return time.time() if now is None else now




class SQLiteStore(FileLogs, JobStore):
    """Durable jobs in SQLite. Safe to share between threads and processes on one host.

    ``composer`` builds the mails of a job that just finished (for a success,
    before the finishing transaction on the job as it will be committed, and
    again inside only if it changed meanwhile; for other endings inside it);
    a ``mails`` argument to a finishing call overrides it.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        synchronous: str = D.STORE_SYNCHRONOUS,
        lease_seconds: float = D.LEASE_SECONDS,
        retry: RetryPolicy | None = None,
        logs_dir: str | os.PathLike | None = None,
        busy_timeout: float = D.BUSY_TIMEOUT_SECONDS,
        mail_retry: RetryPolicy | None = None,
        composer: MailComposer | None = None,
        sender: str = D.MAIL_FROM,
        files: FileModes = PRIVATE,
        log_faults: bool = True,
    ):
        self.path = Path(path)
        self.files = files
        self.log_faults = log_faults
        if synchronous not in ("full", "normal"):
            raise StoreError(f"synchronous must be 'full' or 'normal', got {synchronous!r}")
        self.synchronous = synchronous
        self.lease_seconds = float(lease_seconds)
        self.retry_policy = retry or RetryPolicy(D.RETRY_MAX_ATTEMPTS, D.RETRY_BACKOFF)
        self.mail_retry = mail_retry or RetryPolicy(D.MAIL_MAX_ATTEMPTS, D.MAIL_BACKOFF)
        self.logs_dir = Path(logs_dir) if logs_dir else self.path.parent / "logs"
        self.busy_timeout = busy_timeout
        self.composer = composer
        self.sender = sender
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._last_prune = 0.0
        # A finished job's session key was erased but a copy may still be in the WAL (a reader was in the way).
        self._wipe_due = False
        self._schema_ready = False
        self._identity: tuple[int, int] | None = None
        # The -wal and -shm files this process has open (device, inode), by suffix: SQLite keeps
        # them while any connection is open, so one deleted or replaced under it means another
        # process now uses another wal-index -- its writes unseen here, ours unseen there.
        self._side_identity: dict[str, tuple[int, int]] = {}
        self.broken: str | None = None
        self.ping_error: str | None = None  # why the last ping failed (health's detail)
        self._broken_lock = threading.Lock()  # several threads may find it at once: one CRITICAL line
        # Said once per process, for the database and the job logs (store/space.py).
        self.__dict__["_disk_full"] = DiskFull(
            f"job database {self.path}", self.path.parent,
            f"free space on that filesystem (old job logs are in {self.logs_dir})", log if log_faults else None)
        files.make_dir(self.path.parent, own=False)  # usually the data_dir: it holds the archive too
        files.make_dir(self.logs_dir)
        self._refuse_a_new_database_over_old_logs()
        # Pending jobs hold OMERO session keys: the database is the service user's only
        # (or its file_group's, read-only); SQLite gives the -wal and -shm files its mode.
        for path in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            files.secure_file(path, create=path == self.path)
        #: Why this store only reads (the disk is full), or None: see :meth:`_open_read_only`.
        self.read_only: str | None = None
        try:
            self._conn()  # create the schema now, so errors show at start
        except sqlite3.OperationalError as exc:
            if log_faults or not (is_disk_full(exc) or io_error_from_full_disk(exc, self.path.parent)):
                raise
            self._open_read_only(exc)

    @classmethod
    def from_config(cls, config, composer: MailComposer | None = None, *, log_faults: bool = True) -> SQLiteStore:
        return cls(
            config.store.path,
            synchronous=config.store.synchronous,
            lease_seconds=config.store.lease_seconds,
            retry=config.retry,
            logs_dir=config.logs_dir,
            busy_timeout=config.store.busy_timeout,
            mail_retry=config.notify.retry,
            composer=composer,
            sender=config.notify.sender,
            files=FileModes.for_group(config.file_group),
            log_faults=log_faults,
        )

    # -- connections -------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self.broken:
            raise StoreBroken(self.broken)
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._identity is None:
            self._refuse_a_new_database_over_old_logs()
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None, factory=_Connection)
        try:
            queue = self._set_up(conn)
        except BaseException:
            conn.close()  # else its open -shm stays this process's, seen by the next connection too
            raise
        with self._connections_lock:
            self._connections.append(conn)
        if self.files.gid is not None:
            # SQLite made the -wal/-shm (with the first connection) in the creating process's group.
            for path in (f"{self.path}-wal", f"{self.path}-shm"):
                self.files.secure_file(path)
        self._local.conn = conn
        self._local.queue = queue
        if self._identity is None:
            st = os.stat(self.path)
            self._identity = (st.st_dev, st.st_ino)
        self._note_side_files()  # a connection of ours may have made them anew: theirs now
        return conn

    def _note_side_files(self, *, only_new: bool = False) -> None:
        """Record the identity of the -wal and -shm files as they are now (``only_new``: those
        not recorded yet). Not in read-only mode: it keeps its wal-index in memory."""
        if self.read_only:
            return
        for suffix in ("-wal", "-shm"):
            if only_new and suffix in self._side_identity:
                continue
            try:
                st = os.stat(f"{self.path}{suffix}")
            except OSError:
                continue
            self._side_identity[suffix] = (st.st_dev, st.st_ino)

    def _set_up(self, conn: sqlite3.Connection) -> LiteQueue:
        """Set up a new connection (pragmas, the schema once per store); returns its queue."""
        if self.read_only:
            # No -shm (its wal-index lives in this process's memory), so no file to size on the
            # full disk; the exclusive lock it needs is refused (SQLITE_BUSY) while any other
            # process has the database open, so nothing it reads can be stale. Writes are refused.
            conn.execute("PRAGMA locking_mode = EXCLUSIVE")
            conn.execute("PRAGMA query_only = ON")
            conn.full_disk_read_only = True
        conn.on_corrupt = self._corrupt
        conn.on_full = self._full
        conn.on_written = self.disk_full.wrote
        # LiteQueue switches the connection to autocommit and WAL; our own
        # transactions are explicit BEGIN IMMEDIATE … COMMIT around it.
        queue = LiteQueue(conn, queue_name=QUEUE_TABLE)
        conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
        conn.execute("PRAGMA foreign_keys = ON")
        # Erased secrets (session keys) are overwritten with zeros, not just unlinked from the b-tree.
        conn.execute("PRAGMA secure_delete = ON")
        # After each checkpoint the WAL is cut back to this size instead of keeping its peak.
        conn.execute(f"PRAGMA journal_size_limit = {D.WAL_SIZE_LIMIT_BYTES}")
        conn.row_factory = sqlite3.Row
        with self._connections_lock:
            # Once per store, not per thread: it takes the write lock.
            if not self._schema_ready and not self.read_only:
                self._create_schema(conn)
                self._schema_ready = True
        return queue

    def _open_read_only(self, error: sqlite3.OperationalError) -> None:
        """A short command (``jobs list``, ``status``) on a full disk beside a cleanly stopped
        database: SQLite cannot size the new ``-shm`` (SQLITE_IOERR), so the store opens it
        read-only without one (exclusive locking mode keeps the wal-index in memory). Reads go
        on; a write raises SQLITE_FULL (the command's one line says no space). Raises
        ``error`` again when that is not possible either (the database busy in another
        process, or its schema not this version's)."""
        self.read_only = explain_database_error(error, self.path)
        try:
            conn = self._conn()
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        except sqlite3.Error:
            self.close()
            raise error from None
        if row is None or int(row["value"]) != SCHEMA_VERSION:  # a migration is a write
            self.close()
            raise error
        self.schema_version = SCHEMA_VERSION
        self._schema_ready = True

    def _refuse_a_new_database_over_old_logs(self) -> None:
        # Job ids restart at 1 in a new database: job 7's log would be another
        # job's, and the drop folders' acquisitions would be imported again. SQLite
        # takes an empty (0-byte) file for a new database, so that counts as missing.
        problem = _file_problem(self.path)
        if problem is None:
            return  # a database, or a foreign file SQLite itself refuses (SQLITE_NOTADB) with the fix
        logs = next(iter(self.logs_dir.glob("*.log")), None) if self.logs_dir.is_dir() else None
        if logs is not None:
            message = (
                f"the job database {self.path} {problem}, but {self.logs_dir} holds logs of earlier jobs: "
                "it was deleted, moved or emptied. Restore it from the backup (README: Restoring the job "
                "database); to start afresh on purpose, move the logs folder away as well"
            )
            raise StoreError(message)  # the command's one error line (or the service's, at start)

    def _corrupt(self, exc: sqlite3.DatabaseError) -> str | None:
        """An operation found the file corrupt or not a database: once the store is open, it
        refuses every operation from now on (``StoreBroken``), with one CRITICAL line, and
        health says why. Returns the reason (None while opening: the caller's error says it)."""
        if self._identity is None:
            return None
        if self.broken:
            return self.broken
        problem = _file_problem(self.path) or "is corrupt"
        return self._break(
            f"the job database {self.path} {problem} ({exc}): database file is not a database / corrupt; "
            "stop every watchfolder process, move the file and its -wal/-shm aside and restore the last "
            "backup (README: Restoring the job database); this process records nothing more"
        )

    def _break(self, reason: str) -> str:
        """Mark the store broken with ``reason`` unless another thread did first (its reason
        stands); the one CRITICAL line of this process. Returns the reason in force."""
        with self._broken_lock:
            if self.broken is None:
                self.broken = reason
                log.critical(reason)
            return self.broken

    def _full(self, exc: sqlite3.DatabaseError) -> bool:
        """A write was refused for space (SQLITE_FULL, or an I/O error while the disk has no
        room: :func:`~.space.io_error_from_full_disk`): said once by :attr:`disk_full` (not
        while opening: the command's one error line says it). Returns whether it was one."""
        full = is_disk_full(exc) or io_error_from_full_disk(exc, self.path.parent)
        if full and self._identity is not None:
            self.disk_full.failed(exc)
        return full

    def _highest_log_id(self) -> int:
        """The highest job id with a log file in ``logs_dir`` (0 if none)."""
        top = 0
        try:
            with os.scandir(self.logs_dir) as entries:
                for entry in entries:
                    stem, dot, ext = entry.name.partition(".")
                    if ext == "log" and stem.isdigit():
                        top = max(top, int(stem))
        except OSError:
            pass
        return top

    def check_file(self) -> str | None:
        """Check that ``store.path`` is still the file this store opened (same device and inode).

        A database deleted or replaced under a running process is written to
        unseen while other processes create a new one where job ids start again:
        once noticed, this store refuses every operation (``StoreError`` with the
        returned reason), the worker stops claiming and health turns 503.
        Called on the health tick (``maintain``, ``ping``). Returns None when fine.
        """
        if self.broken or self._identity is None:
            return self.broken
        try:
            st = os.stat(self.path)
            problem = None if (st.st_dev, st.st_ino) == self._identity else "was replaced by another file"
            problem = problem or _file_problem(self.path)
        except FileNotFoundError:
            problem = "was deleted"
        except OSError as exc:
            problem = f"cannot be checked ({exc.strerror or exc})"
        if problem:
            return self._break(
                f"the job database {self.path} {problem} while this process (pid {os.getpid()}) had it open; "
                "stop every watchfolder process and restore the database from the backup "
                "(this process records nothing more)"
            )
        side = self._side_file_problem()
        if side:
            return self._break(
                f"the job database {self.path} {side} while this process (pid {os.getpid()}) had it open: "
                "processes no longer see each other's writes. Stop every watchfolder process, then start "
                "them again (SQLite rebuilds its index from the -wal); if a command then says the database "
                "is corrupt, restore it from the backup (this process records nothing more)"
            )
        return self.broken

    def _side_file_problem(self) -> str | None:
        """Why the -wal or -shm file this process has open is no longer the one at its path, or None."""
        self._note_side_files(only_new=True)
        for suffix, known in list(self._side_identity.items()):
            try:
                st = os.stat(f"{self.path}{suffix}")
            except FileNotFoundError:
                return f"lost its {suffix} file ({self.path}{suffix} was deleted; jobs recorded since may be lost)"
            except OSError:
                continue
            if (st.st_dev, st.st_ino) != known:
                return (f"lost its {suffix} file ({self.path}{suffix} was replaced by another; jobs recorded since "
                        "may be lost)")
        return None

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        # executescript commits any open transaction first, so the schema gets its own.
        conn.executescript("BEGIN IMMEDIATE;" + SCHEMA + "COMMIT;")
        with _transaction(conn):
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row["value"]) if row else 0
            if current > SCHEMA_VERSION:
                raise StoreError(
                    f"{self.path} was written by a newer watchfolder (schema {current}, this one knows "
                    f"{SCHEMA_VERSION}); upgrade watchfolder"
                )
            # Job ids start past the highest log file (a database restored from a backup
            # older than the logs): a new job never appends to another job's log.
            top = self._highest_log_id()
            if top:
                row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'jobs'").fetchone()
                if row is None:
                    conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('jobs', ?)", (top,))
                elif row[0] < top:
                    log.warning("store %s: job ids continue at %d, past the logs of jobs this database does "
                                "not know (restored from a backup?)", self.path, top + 1)
                    conn.execute("UPDATE sqlite_sequence SET seq = ? WHERE name = 'jobs'", (top,))
            for version, what, sql in MIGRATIONS:
                if version <= current:
                    continue
                if current:  # a fresh file says nothing: it is simply created at the latest version
                    log.info("store %s: schema %d -> %d: %s", self.path, version - 1, version, what)
                if version == 5:
                    _add_dedup_keys(conn)
                for statement in filter(str.strip, sql.split(";")):
                    if not _column_there(conn, statement):  # steps stay idempotent, like SCHEMA
                        conn.execute(statement)
                if version == BACKFILL_VERSION and current:
                    _backfill_dedup_keys(conn)  # once, whichever of steps 5 and 6 were due
                conn.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?)"
                    " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(version),),
                )
        self.schema_version = SCHEMA_VERSION

    def _queue(self) -> LiteQueue:
        self._conn()
        return self._local.queue

    def close(self) -> None:
        """Close every connection this store opened (call once no thread uses it).

        A wipe of an erased session key that a reader was in the way of is tried once more first.
        """
        if self._wipe_due and not self.broken:
            try:
                self._wipe_erased(self._conn())
            except (sqlite3.Error, StoreError):
                pass
        self._side_identity.clear()  # SQLite may remove them once closed: not ours to watch any more
        with self._connections_lock:
            for conn in self._connections:
                try:
                    conn.close()
                except sqlite3.ProgrammingError:  # closed from its own thread already
                    pass
            self._connections.clear()
        self._local = threading.local()

    # -- reading -----------------------------------------------------------

    def _job(self, row: sqlite3.Row, history: list[HistoryEntry] | None = None) -> Job:
        return job_from_row(row, self.log_path(row["id"]), history, files=self._files)

    def _files(self, job_id: int) -> tuple[FileEntry, ...]:
        rows = self._conn().execute(
            "SELECT path, size, sha256 FROM job_files WHERE job_id = ? ORDER BY seq", (job_id,)
        ).fetchall()
        return tuple(FileEntry(path, size, sha256) for path, size, sha256 in rows)

    def _insert_files(self, conn, job_id: int, spec: JobSpec) -> None:
        conn.executemany(
            "INSERT INTO job_files (job_id, seq, path, size, sha256) VALUES (?, ?, ?, ?, ?)",
            ((job_id, seq, f.path, f.size, f.sha256) for seq, f in enumerate(spec.files)),
        )

    def _history(self, conn: sqlite3.Connection, job_id: int) -> list[HistoryEntry]:
        return history_from_rows(
            conn.execute("SELECT at, state, message FROM job_history WHERE job_id = ? ORDER BY id", (job_id,))
        )

    def get(self, job_id: int) -> Job:
        """The job with its history; raises :class:`JobNotFound`."""
        conn = self._conn()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return self._job(row, self._history(conn, job_id))

    def find(self, idempotency_key: str) -> Job | None:
        row = self._conn().execute("SELECT * FROM jobs WHERE idempotency_key = ?", (idempotency_key,)).fetchone()
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
        """Jobs newest first, filtered; returns the page and the cursor of the next page (or None).

        ``source`` matches exactly, or as a prefix when it ends with ``*``;
        ``since``/``until`` bound the creation time; ``dismissed`` filters on
        whether an admin acknowledged a failure.
        """
        where, args = [], []
        if dismissed is not None:
            where.append("dismissed_at IS NOT NULL" if dismissed else "dismissed_at IS NULL")
        if states:
            states = [str(JobState(s)) for s in states]
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if owner:
            where.append("owner = ?")
            args.append(owner)
        if source:
            if source.endswith("*"):
                where.append("substr(source, 1, ?) = ?")
                args += [len(source) - 1, source[:-1]]
            else:
                where.append("source = ?")
                args.append(source)
        if since is not None:
            where.append("created_at >= ?")
            args.append(since)
        if until is not None:
            where.append("created_at < ?")
            args.append(until)
        if cursor:
            where.append("id < ?")
            args.append(page_cursor(cursor))
        limit = max(1, min(int(limit), 1000))
        sql = "SELECT * FROM jobs" + (" WHERE " + " AND ".join(where) if where else "")
        rows = self._conn().execute(sql + " ORDER BY id DESC LIMIT ?", (*args, limit + 1)).fetchall()
        jobs = [self._job(r) if files else job_from_row(r, self.log_path(r["id"]), files=()) for r in rows[:limit]]
        next_cursor = str(jobs[-1].id) if len(rows) > limit else None
        return jobs, next_cursor

    def imported_as(self, content_key: str) -> Job | None:
        row = self._conn().execute(
            "SELECT * FROM jobs WHERE content_key = ? AND state = 'succeeded' ORDER BY id DESC LIMIT 1", (content_key,)
        ).fetchone()
        return self._job(row) if row is not None else None

    def alike(self, spec: JobSpec, *, states: Iterable[str], before: int | None = None, limit: int = 20) -> list[Job]:
        key = shape_key(spec)
        states = [str(JobState(s)) for s in states]
        if key is None or not states:
            return []
        rows = self._conn().execute(
            f"SELECT * FROM jobs WHERE shape_key = ? AND state IN ({','.join('?' * len(states))}) AND id < ?"
            " ORDER BY id DESC LIMIT ?",
            (key, *states, before if before is not None else 2**63 - 1, max(1, min(int(limit), 1000))),
        ).fetchall()
        return [self._job(r) for r in rows]

    def counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        """Number of jobs in each state (every state present); ``owners``: only theirs."""
        counts = {str(s): 0 for s in JobState}
        where, args = owners_clause(owners)
        for row in self._conn().execute(f"SELECT state, count(*) AS n FROM jobs WHERE {where} GROUP BY state", args):
            counts[row["state"]] = row["n"]
        return counts

    def oldest_queued_at(self, *, owners: Sequence[str] | None = None) -> float | None:
        where, args = owners_clause(owners)
        row = self._conn().execute(
            f"SELECT min(created_at) AS t FROM jobs WHERE state IN ('queued', 'retry_wait') AND {where}", args
        ).fetchone()
        return row["t"]

    def totals(self) -> dict[str, float]:
        """Aggregates for metrics: bytes imported and summed durations of succeeded jobs."""
        row = self._conn().execute(
            "SELECT count(*) AS n, coalesce(sum(finished_at - started_at), 0) AS seconds,"
            " coalesce(sum(json_extract(progress, '$.bytes_done')), 0) AS bytes"
            " FROM jobs WHERE state = 'succeeded'"
        ).fetchone()
        return {"succeeded": row["n"], "seconds": row["seconds"], "bytes": row["bytes"]}

    # -- logs --------------------------------------------------------------

    def read_log(self, job_id: int) -> str:
        if self._conn().execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
            raise JobNotFound(job_id)
        return self._read_log_file(job_id)

    # -- writing: helpers --------------------------------------------------

    def _add_history(
        self, conn, job_id: int, state: JobState | str, message: str, now: float, *, event: bool = True,
        result_summary: str | None = None,
    ) -> None:
        """Record a history entry; a state change (``event``) also goes to the event outbox.

        Called after the job row was updated, in the same transaction: the event's
        data is the job as it is now (see :data:`EVENT_INSERT_SQL`). ``result_summary``:
        the job's result without ``files`` as JSON, when the caller just wrote that result.
        """
        conn.execute(
            "INSERT INTO job_history (job_id, at, state, message) VALUES (?, ?, ?, ?)",
            (job_id, now, str(state), message),
        )
        if event:
            conn.execute(EVENT_INSERT_SQL, (now, JOB_EVENT_PREFIX + str(state), message, job_id, result_summary))

    def _finish(
        self,
        conn,
        row: sqlite3.Row,
        now: float,
        mails: MailComposer | None,
        message: str,
        prepared: _Prepared | None = None,
        *,
        erased: bool = False,
        known: Job | None = None,
        result_summary: str | None = None,
    ) -> Job:
        """Common tail of every transition into a finished state (inside the transaction).

        ``prepared``: the mails composed before the transaction for the job as it was
        expected to end (:meth:`_prepare`); used when the job did end exactly so (same
        row, no history entry since), else the composer runs here as it always did.
        ``erased``: the transition erased the job's session key; the caller runs
        :meth:`_wipe_erased` once the transaction committed.
        """
        if erased:
            self._wipe_due = True
        self._add_history(conn, row["id"], row["state"], message, now, result_summary=result_summary)
        if prepared is not None and prepared.matches(conn, row):
            job = prepared.job
        else:
            prepared = None
            # The composer may say who cancelled or what happened last: give it the history.
            history = self._history(conn, row["id"])
            job = dataclasses.replace(known, history=history) if known is not None else self._job(row, history)
        if row["message_id"]:
            self._queue().done(row["message_id"])
        if prepared is not None:
            self._outbox_insert(conn, prepared.mails, job.id, now, raw=prepared.raw)
        else:
            composer = mails if mails is not None else self.composer
            if composer is not None:
                self._outbox_insert(conn, composer(job), job.id, now)
        return job

    def _prepare(
        self, job_id: int, worker: str, composer: MailComposer | None, changes: dict[str, Any], message: str,
        now: float, *, running: Job | None = None, result: dict[str, Any] | None = None,
        progress: Progress | None = None,
    ) -> _Prepared | None:
        """Compose (and render) a finishing job's mails *before* its transaction.

        Composing a mail (text + HTML through Python's email package) costs a few
        milliseconds; inside the transaction it held the database's write lock that
        long, stalling every other worker, watcher and API request. Here the job is
        read without the lock and ``changes`` (the finishing UPDATE's new column
        values) applied in Python; :meth:`_finish` uses the result only if the row
        the UPDATE returns is exactly that, so the mails always describe the job as
        it was committed.
        """
        if composer is None:
            return None
        conn = self._conn()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None or row["state"] != "running" or row["worker"] != worker:
            return None  # the transaction will say why
        data = {**dict(row), **changes}
        history = self._history(conn, job_id)
        entries = [*history, HistoryEntry(now, JobState(data["state"]), message)]
        job = _succeeded_from(running, data, result, progress, now, entries) or self._job(data, entries)
        composed = list(composer(job))
        return _Prepared(job, data, len(history) + 1, composed, [m.as_bytes() for m in composed])

    # -- writing: clients --------------------------------------------------

    def enqueue(self, spec: JobSpec, *, now: float | None = None, note: str = "") -> tuple[Job, bool]:
        """Queue a job; the same idempotency key returns the existing job and ``False``."""
        return self.enqueue_many([(spec, note)], now=now)[0]

    def enqueue_many(
        self, items: Iterable[tuple[JobSpec, str]], *, now: float | None = None
    ) -> list[tuple[Job, bool]]:
        """Queue several ``(spec, note)`` in one transaction (one commit for all: group commit).

        Each answer is ``(job, created)`` as from :meth:`enqueue`; a key repeated
        within the batch returns the first one's job with ``False``.
        """
        now = _now(now)
        conn = self._conn()
        queue = self._queue()
        out: list[tuple[Job, bool]] = []
        with _transaction(conn):
            for spec, note in items:
                key = spec.key()
                # Insert unless the key exists, in one statement: each statement lets another
                # thread take the GIL, and the API enqueues from several threads. (Not ON
                # CONFLICT DO NOTHING: that uses up an AUTOINCREMENT id on every duplicate.)
                # No RETURNING either: fetching its row costs one more step.
                cols = self._columns(spec, key, JobState.QUEUED, now)
                cur = conn.execute(
                    f"INSERT INTO jobs ({', '.join(cols)}) SELECT {', '.join('?' * len(cols))}"
                    " WHERE NOT EXISTS (SELECT 1 FROM jobs WHERE idempotency_key = ?)",
                    (*cols.values(), key),
                )
                if cur.rowcount != 1:
                    existing = conn.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
                    out.append((self._job(existing), False))
                    continue
                job_id = cur.lastrowid
                self._insert_files(conn, job_id, spec)
                message = queue.put(str(job_id))
                conn.execute("UPDATE jobs SET message_id = ? WHERE id = ?", (message.message_id, job_id))
                self._add_history(conn, job_id, JobState.QUEUED, note or f"queued from {spec.source}", now)
                out.append((self._queued_job(job_id, spec, key, now), True))
        if any(created for _, created in out):
            self.notify_work()
        return out

    def _queued_job(self, job_id: int, spec: JobSpec, key: str, now: float) -> Job:
        """The job a fresh enqueue just wrote, as :meth:`_job` would read it back (without history).

        Built from what was written instead of read back: decoding the row again was
        a tenth of an API submit.
        """
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

    def _insert(self, conn, spec: JobSpec, key: str, state: JobState, now: float, **extra: Any) -> int:
        cols = self._columns(spec, key, state, now, **extra)
        cur = conn.execute(
            f"INSERT INTO jobs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})", tuple(cols.values())
        )
        self._insert_files(conn, cur.lastrowid, spec)
        return cur.lastrowid

    def _columns(self, spec: JobSpec, key: str, state: JobState, now: float, **extra: Any) -> dict[str, Any]:
        """The columns of a new job row."""
        return new_job_columns(spec, key, state, now, self.retry_policy.max_attempts, **extra)

    def reject(
        self, spec: JobSpec, reason: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> tuple[Job, bool]:
        """Record bad input (invalid sidecar, unknown owner…) as a job that failed permanently.

        Idempotent by key like :meth:`enqueue`, so a rescan does not report it twice.
        """
        now = _now(now)
        key = spec.key()
        conn = self._conn()
        with _transaction(conn):
            existing = conn.execute("SELECT * FROM jobs WHERE idempotency_key = ?", (key,)).fetchone()
            if existing is not None:
                return self._job(existing), False
            job_id = self._insert(
                conn,
                dataclasses.replace(spec, session_key=None),
                key,
                JobState.FAILED,
                now,
                finished_at=now,
                error_kind=str(ErrorKind.PERMANENT),
                error_message=reason,
            )
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            # Logged before the mails are composed, so the admin's mail quotes it.
            self.log(job_id, f"rejected: {reason}", now=now)
            job = self._finish(conn, row, now, mails, f"rejected: {reason}")
        return job, True

    def cancel(self, job_id: int, *, by: str = "", now: float | None = None, mails: MailComposer | None = None) -> Job:
        """Cancel a job. Queued or waiting: at once. Running: asks its worker to stop."""
        now = _now(now)
        conn = self._conn()
        who = f" by {by}" if by else ""
        with _transaction(conn):
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            state = JobState(row["state"])
            if state.finished:
                raise InvalidTransition(f"job {job_id} is already {state}; only unfinished jobs can be cancelled")
            orphan = self._orphaned(conn, row, now) if state == JobState.RUNNING else None
            if orphan:
                # Nobody would act on the request: waiting for the lease to run out would
                # queue it, claim it again and burn an attempt before the cancel lands.
                who = f"{who} (its worker {row['worker']} {orphan})"
            if state == JobState.RUNNING and not orphan:
                conn.execute(
                    "UPDATE jobs SET cancel_requested = 1, updated_at = ? WHERE id = ?", (now, job_id)
                )
                self._add_history(conn, job_id, state, f"cancel requested{who}", now, event=False)
            else:
                erased = row["session_key"] is not None
                row = conn.execute(
                    "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, session_key = NULL,"
                    f" next_attempt_at = NULL, {FINISHED_FOLLOWUP}"
                    " WHERE id = ? RETURNING *",
                    (now, now, job_id),
                ).fetchone()
                self._finish(conn, row, now, mails, f"cancelled{who}", erased=erased)
        self._wipe_erased(conn)
        running = state == JobState.RUNNING and not orphan
        self.log(job_id, f"cancel requested{who}" if running else f"cancelled{who}", now=now)
        return self.get(job_id)

    def _orphaned(self, conn, row: sqlite3.Row, now: float) -> str | None:
        """Why a running job's worker is gone (lease expired, or its process no longer runs on
        this host), or None while it may still be working."""
        if row["lease_expires_at"] is not None and row["lease_expires_at"] < now:
            return "stopped renewing its lease"
        worker = row["worker"] or ""
        published = conn.execute(
            "SELECT host, pid, status FROM components WHERE kind = 'worker' AND name = ?", (worker,)
        ).fetchone()
        if published is None:
            return worker_gone(worker, None, None, None)
        return worker_gone(worker, published["host"], published["pid"], published["status"])

    def retry(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        """Queue a failed or cancelled job again, with a fresh attempt budget.

        A job waiting for its next attempt is queued at once.
        """
        now = _now(now)
        conn = self._conn()
        who = f" by {by}" if by else ""
        with _transaction(conn):
            row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
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
                error_config=0, cancel_requested=0, followup=None, dismissed_at=None,
            )
        self.notify_work()
        self.log(job_id, f"retry requested{who}", now=now)
        return self.get(job_id)

    def dismiss(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        """Acknowledge a failed job: it leaves the failed-imports list, its record stays."""
        now = _now(now)
        conn = self._conn()
        who = f" by {by}" if by else ""
        with _transaction(conn):
            row = conn.execute("SELECT state, dismissed_at FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["state"] != "failed":
                raise InvalidTransition(f"job {job_id} is {row['state']}; only failed jobs can be dismissed")
            if row["dismissed_at"] is None:
                conn.execute("UPDATE jobs SET dismissed_at = ?, updated_at = ? WHERE id = ?", (now, now, job_id))
                self._add_history(conn, job_id, "failed", f"failure dismissed{who}", now, event=False)
        return self.get(job_id)

    # -- writing: workers --------------------------------------------------

    def claim(self, worker: str, *, now: float | None = None) -> Job | None:
        """Take the oldest queued job and hold its lease, or return None when nothing is queued."""
        queue = self._queue()
        conn = self._conn()
        now = _now(now)
        with _transaction(conn):
            while (message := queue.peek()) is not None:
                queue.done(message.message_id)
                row = conn.execute(
                    "UPDATE jobs SET state = 'running', worker = ?, attempts = attempts + 1, message_id = NULL,"
                    " lease_expires_at = ?, started_at = coalesce(started_at, ?), updated_at = ?,"
                    " next_attempt_at = NULL"
                    " WHERE id = ? AND state = 'queued' AND message_id = ? RETURNING *",
                    (worker, now + self.lease_seconds, now, now, int(message.data), message.message_id),
                ).fetchone()
                if row is not None:
                    self._add_history(conn, row["id"], JobState.RUNNING, f"attempt {row['attempts']} on {worker}", now)
                    return self._job(row)
                # A message whose job moved on cannot exist (every transition updates both),
                # but a stray one must not block the queue: it is dropped above.
        return None

    def _requeue(self, conn, job_id: int, now: float, message: str, **columns: Any) -> None:
        """Queue a job again with a new message (inside the caller's transaction)."""
        queued = self._queue().put(str(job_id))
        sets = "".join(f", {name} = ?" for name in columns)
        conn.execute(
            "UPDATE jobs SET state = 'queued', message_id = ?, worker = NULL, lease_expires_at = NULL,"
            f" updated_at = ?{sets} WHERE id = ?",
            (queued.message_id, now, *columns.values(), job_id),
        )
        self._add_history(conn, job_id, JobState.QUEUED, message, now)

    def _running(self, conn, job_id: int, worker: str) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        if row["state"] != "running" or row["worker"] != worker:
            raise LeaseLost(f"job {job_id} is no longer held by {worker} (state {row['state']}, worker {row['worker']})")
        return row

    def _update_running(
        self, conn, job_id: int, worker: str, assignments: str, params: tuple, returning: str = "*"
    ) -> sqlite3.Row:
        """UPDATE the job if ``worker`` still holds it, in one statement; else raise as :meth:`_running`."""
        row = conn.execute(
            f"UPDATE jobs SET {assignments} WHERE id = ? AND state = 'running' AND worker = ? RETURNING {returning}",
            (*params, job_id, worker),
        ).fetchone()
        if row is None:
            self._running(conn, job_id, worker)  # says why: JobNotFound or LeaseLost
            raise StoreError(f"job {job_id} could not be updated")  # not reached inside one transaction
        return row

    def replace_spec(self, job_id: int, worker: str, spec: JobSpec, *, now: float | None = None) -> Job:
        """Store what a running job's acquisition is now (re-read from disk on a retry).

        The idempotency key and the source stay. Raises :class:`LeaseLost` when the
        job is no longer this worker's.
        """
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            row = conn.execute(
                "UPDATE jobs SET spec = ?, owner = ?, shape_key = ?, updated_at = ? WHERE id = ? AND state = 'running'"
                " AND worker = ? RETURNING id",
                (json.dumps(dataclasses.replace(spec, session_key=None).to_dict(files=False)), spec.owner,
                 shape_key(spec), now, job_id, worker),
            ).fetchone()
            if row is None:
                raise LeaseLost(f"job {job_id} is no longer held by {worker}")
            conn.execute("DELETE FROM job_files WHERE job_id = ?", (job_id,))
            self._insert_files(conn, job_id, spec)
        return self.get(job_id)

    def report_progress(
        self, job_id: int, worker: str, progress: Progress | None = None, *, now: float | None = None
    ) -> bool:
        """Record progress and renew the lease; returns whether a cancel was requested.

        Raises :class:`LeaseLost` when the job is no longer this worker's.
        """
        now = _now(now)
        conn = self._conn()
        if progress is None:
            row = conn.execute(
                "UPDATE jobs SET lease_expires_at = ? WHERE id = ? AND state = 'running' AND worker = ?"
                " RETURNING cancel_requested",
                (now + self.lease_seconds, job_id, worker),
            ).fetchone()
        else:
            row = conn.execute(
                "UPDATE jobs SET lease_expires_at = ?, progress = ?, updated_at = ?"
                " WHERE id = ? AND state = 'running' AND worker = ? RETURNING cancel_requested",
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
        running: Job | None = None,
    ) -> Job:
        """Mark a running job succeeded with its result; its mails go to the outbox in the same transaction."""
        now = _now(now)
        conn = self._conn()
        result_json = json.dumps(result)
        progress_json = json.dumps(progress.to_dict()) if progress else None
        changes: dict[str, Any] = {
            "state": "succeeded", "result": result_json, "finished_at": now, "updated_at": now,
            "lease_expires_at": None, "session_key": None, "error_kind": None, "error_message": None,
            "error_config": 0, "content_key": content_key,
        }
        if progress_json is not None:
            changes["progress"] = progress_json
        prepared = self._prepare(job_id, worker, mails if mails is not None else self.composer,
                                 changes, "succeeded", now, running=running, result=result, progress=progress)
        if prepared is not None:  # FINISHED_FOLLOWUP, as SQL computes it
            prepared.data["followup"] = "pending" if prepared.data["source"].startswith("watch:") else None
        # The event's copy of the result, without the file list (see EVENT_INSERT_SQL).
        summary = json.dumps({k: v for k, v in result.items() if k != "files"}) if "files" in result else None
        with _transaction(conn):
            erased = self._holds_key(conn, job_id)
            # Every column but the result, which is result_json: not copied back out of SQLite
            # (tens of MB for a plate of 100,000 files).
            row = self._update_running(
                conn, job_id, worker,
                "state = 'succeeded', result = ?, finished_at = ?, updated_at = ?,"
                " lease_expires_at = NULL, session_key = NULL, progress = coalesce(?, progress),"
                " error_kind = NULL, error_message = NULL, error_config = 0, content_key = ?,"
                f" {FINISHED_FOLLOWUP}",
                (result_json, now, now, progress_json, content_key),
                returning=self._columns_but("result"),
            )
            row = {**dict(row), "result": result_json}
            known = _succeeded_from(running, row, result, progress, now, [])
            job = self._finish(conn, row, now, mails, "succeeded", prepared, erased=erased, known=known,
                               result_summary=summary)
        self._wipe_erased(conn)
        return job

    def fail(
        self,
        job_id: int,
        worker: str,
        failure: ImportFailure,
        *,
        now: float | None = None,
        mails: MailComposer | None = None,
    ) -> Job:
        """Record a failed attempt: ``retry_wait`` with backoff when transient and attempts remain, else ``failed``."""
        now = _now(now)
        conn = self._conn()
        kind = ErrorKind.TRANSIENT if failure.transient else ErrorKind.PERMANENT
        with _transaction(conn):
            current = self._running(conn, job_id, worker)
            attempts = current["attempts"]
            if failure.transient and attempts < current["max_attempts"]:
                wait = self.retry_policy.delay(attempts)
                row = conn.execute(
                    "UPDATE jobs SET state = 'retry_wait', next_attempt_at = ?, updated_at = ?, worker = NULL,"
                    " lease_expires_at = NULL, error_kind = ?, error_message = ?, error_config = ?"
                    " WHERE id = ? RETURNING *",
                    (now + wait, now, str(kind), failure.message, int(failure.config_error), job_id),
                ).fetchone()
                self._add_history(
                    conn, job_id, JobState.RETRY_WAIT,
                    f"attempt {attempts} failed ({kind}): {failure.message}; next attempt in {wait:g} s", now,
                )
                return self._job(row)
            if failure.transient:
                message = f"gave up after {attempts} attempts: {failure.message}"
            else:
                message = failure.message
            row = conn.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?, lease_expires_at = NULL,"
                " session_key = NULL, error_kind = ?, error_message = ?, error_config = ?,"
                f" {FINISHED_FOLLOWUP}"
                " WHERE id = ? RETURNING *",
                (now, now, str(kind), message,
                 int(failure.config_error), job_id),
            ).fetchone()
            job = self._finish(conn, row, now, mails, f"failed ({kind}): {message}",
                               erased=current["session_key"] is not None)
        self._wipe_erased(conn)
        return job

    def cancelled(
        self, job_id: int, worker: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> Job:
        """The worker stopped a running job whose cancel was requested."""
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            erased = self._holds_key(conn, job_id)
            row = self._update_running(
                conn, job_id, worker,
                "state = 'cancelled', finished_at = ?, updated_at = ?, lease_expires_at = NULL,"
                f" session_key = NULL, {FINISHED_FOLLOWUP}",
                (now, now),
            )
            job = self._finish(conn, row, now, mails, "cancelled while running", erased=erased)
        self._wipe_erased(conn)
        return job

    def release(self, job_id: int, worker: str, *, now: float | None = None, reason: str = "",
                delay: float = 0.0) -> Job:
        """Give a running job back to the queue (worker shutting down). The attempt is not counted.

        ``delay`` (seconds): back in ``retry_wait`` until then instead of queued at once.
        """
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            row = self._running(conn, job_id, worker)
            message = f"released by {worker}: {reason or 'stopping'}"
            if delay > 0:
                conn.execute(
                    "UPDATE jobs SET state = 'retry_wait', next_attempt_at = ?, updated_at = ?, worker = NULL,"
                    " lease_expires_at = NULL, attempts = ? WHERE id = ?",
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
        """Housekeeping, safe to run from any process at any time.

        - running jobs whose lease expired go back to the queue (or fail when out of attempts;
          or are cancelled when a cancel was requested: nobody acted on it);
        - ``retry_wait`` jobs whose time has come are queued;
        - consumed queue messages are pruned now and then.
        """
        now = _now(now)
        if self.check_file():
            raise StoreBroken(self.broken)
        conn = self._conn()
        if str(self.path) in _WAL_RECLAIM:
            _reclaim_wal(conn, str(self.path))
        if self.disk_full.since is not None:
            self.disk_full.problem()  # ends the condition (one INFO line) once space is back
        stats = {"expired": 0, "due": 0}
        with _transaction(conn):
            expired = conn.execute(
                "SELECT * FROM jobs WHERE state = 'running' AND lease_expires_at < ?", (now,)
            ).fetchall()
            for row in expired:
                stats["expired"] += 1
                note = f"lease of {row['worker']} expired (worker stopped or stalled)"
                if row["cancel_requested"]:
                    # Queued again, it would be claimed again (an attempt burnt) only to be
                    # cancelled there: the cancel lands now (issue 11 outside test F5).
                    message = f"cancelled: the {note} before it acted on the cancel request"
                    done = conn.execute(
                        "UPDATE jobs SET state = 'cancelled', finished_at = ?, updated_at = ?, lease_expires_at = NULL,"
                        f" session_key = NULL, next_attempt_at = NULL, {FINISHED_FOLLOWUP} WHERE id = ? RETURNING *",
                        (now, now, row["id"]),
                    ).fetchone()
                    self._finish(conn, done, now, None, message, erased=row["session_key"] is not None)
                elif row["attempts"] >= row["max_attempts"]:
                    # Transient like any attempt that ran out: a crash or a stall is not the files' fault.
                    message = f"gave up after {row['attempts']} attempts; the last one ended when its {note}"
                    done = conn.execute(
                        "UPDATE jobs SET state = 'failed', finished_at = ?, updated_at = ?, lease_expires_at = NULL,"
                        " session_key = NULL, error_kind = 'transient', error_message = ?,"
                        f" {FINISHED_FOLLOWUP} WHERE id = ? RETURNING *",
                        (now, now, message, row["id"]),
                    ).fetchone()
                    self._finish(conn, done, now, None, message, erased=row["session_key"] is not None)
                else:
                    self._requeue(conn, row["id"], now, note + "; queued again")
            due = conn.execute(
                "SELECT id FROM jobs WHERE state = 'retry_wait' AND next_attempt_at <= ?", (now,)
            ).fetchall()
            for row in due:
                stats["due"] += 1
                self._requeue(conn, row["id"], now, "retry time reached")
            # finished sends whose sender died between claim and result: send again
            conn.execute(
                "UPDATE outbox SET state = 'pending' WHERE state = 'sending' AND claimed_until < ?", (now,)
            )
        self._wipe_erased(conn)  # keys of jobs that expired here, or a wipe a reader was in the way of
        if stats["expired"] or stats["due"]:
            self.notify_work()
        if now - self._last_prune > D.PRUNE_SECONDS:
            self._last_prune = now
            self._queue().prune(include_failed=False)
            self._truncate_wal(conn)
            stats["workers_pruned"] = len(self.prune_workers(now=now))
        return stats

    def _columns_but(self, *left_out: str) -> str:
        """The jobs table's columns but ``left_out``, for a ``RETURNING`` or ``SELECT`` list."""
        cached = self.__dict__.setdefault("_column_lists", {})
        columns = cached.get(left_out)
        if columns is None:
            names = [r[1] for r in self._conn().execute("PRAGMA table_info(jobs)")]
            columns = cached[left_out] = ", ".join(f'"{n}"' for n in names if n not in left_out)
        return columns

    @staticmethod
    def _holds_key(conn: sqlite3.Connection, job_id: int) -> bool:
        """Whether the job still holds a session key (read inside the transaction that ends it)."""
        row = conn.execute("SELECT session_key IS NOT NULL FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def _wipe_erased(self, conn: sqlite3.Connection) -> None:
        """After a job's end erased its session key: leave no copy of it on disk, now.

        ``secure_delete`` zeroes the key in the page the transaction wrote, but
        older versions of that page stay in the WAL, and in the database file when
        a checkpoint had copied one there, until the next TRUNCATE checkpoint. The
        housekeeping round made one every few seconds; a ``work --burst`` beside
        ``serve`` (whose open connection keeps the WAL when the burst exits) left
        the key on disk until the next burst. So the job's end makes it, waiting up
        to ``WIPE_WAIT_MS`` for readers; when one is still in the way, the next
        :meth:`maintain` (or :meth:`close`) tries again.
        """
        if not self._wipe_due:
            return
        (timeout,) = conn.execute("PRAGMA busy_timeout").fetchone()
        try:
            conn.execute(f"PRAGMA busy_timeout = {WIPE_WAIT_MS}")
            busy, _frames, _done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError as exc:
            log.debug("wiping an erased session key from the WAL waits: %s", exc)
            return
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")
        if busy:
            log.debug("wiping an erased session key from the WAL waits for a reader")
            return
        self._wipe_due = False

    @staticmethod
    def _truncate_wal(conn: sqlite3.Connection) -> None:
        """Copy the WAL into the database and empty it, if no reader is in the way (never waits).

        An erased session key is zeroed in the database (``secure_delete``) but the WAL
        still holds the page as it was until the WAL is reset; truncating it leaves no copy.
        """
        (timeout,) = conn.execute("PRAGMA busy_timeout").fetchone()
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        except sqlite3.OperationalError:
            pass  # busy: the next round tries again
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(timeout)}")

    # -- follow-ups of watched jobs -----------------------------------------

    def flush(self) -> None:
        """Make every transaction committed so far durable (survive a power cut), whatever ``synchronous`` is."""
        conn = self._conn()
        if self.synchronous == "full":
            return
        conn.execute("PRAGMA synchronous = FULL")
        try:
            # A FULL commit syncs the write-ahead log, and with it every frame before it.
            with _transaction(conn):
                conn.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
        finally:
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")

    def followups(self, source: str, *, limit: int = 100) -> list[Job]:
        """Finished jobs from ``source`` whose post-actions (receipt, move…) are not done yet.

        ``source`` matches exactly, or as a prefix when it ends with ``*``
        (as in :meth:`list_jobs`). Their outcome is flushed to disk first, so a
        source is never moved or deleted on the strength of a success a power
        cut could still undo.
        """
        if source.endswith("*"):
            where, args = "substr(source, 1, ?) = ?", (len(source) - 1, source[:-1])
        else:
            where, args = "source = ?", (source,)
        rows = self._conn().execute(
            f"SELECT * FROM jobs WHERE followup = 'pending' AND {where} ORDER BY id LIMIT ?", (*args, limit)
        ).fetchall()
        if rows:  # watchers ask every tick: an fsync only when there is something to act on
            self.flush()
        return [self._job(r) for r in rows]

    def followup_done(self, job_id: int, note: str = "", *, now: float | None = None) -> None:
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            conn.execute("UPDATE jobs SET followup = 'done' WHERE id = ?", (job_id,))
            if note:
                row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                self._add_history(conn, job_id, row["state"], note, now, event=False)
        if note:
            self.log(job_id, note, now=now)

    # -- components (workers, watchers, importer) ---------------------------

    def set_component(self, kind: str, name: str, status: dict[str, Any], *, now: float | None = None) -> None:
        """Publish a component's status for the status view (any process).

        A watcher whose ``health`` changes also writes a ``org.watchfolder.watcher.health``
        event, in the same transaction.
        """
        if self.check_file():  # components publish on a clock: the health tick of watch-only processes
            raise StoreBroken(self.broken)
        now = _now(now)
        upsert = (
            "INSERT INTO components (kind, name, host, pid, status, updated_at) VALUES (?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (kind, name) DO UPDATE SET host = excluded.host, pid = excluded.pid,"
            " status = excluded.status, updated_at = excluded.updated_at"
        )
        args = (kind, name, socket.gethostname(), os.getpid(), json.dumps(status), now)
        conn = self._conn()
        if kind != "watcher" or "health" not in status:
            conn.execute(upsert, args)
            return
        with _transaction(conn):
            old = conn.execute(
                "SELECT json_extract(status, '$.health') AS health FROM components WHERE kind = ? AND name = ?",
                (kind, name),
            ).fetchone()
            conn.execute(upsert, args)
            previous = old["health"] if old else None
            if previous != status["health"]:
                data = watcher_event_data(name, status, previous)
                self._insert_event(conn, WATCHER_HEALTH_EVENT, f"watcher/{name}", data, None, None, now)

    def remove_component(self, kind: str, name: str) -> None:
        self._conn().execute("DELETE FROM components WHERE kind = ? AND name = ?", (kind, name))

    def components(self, kind: str | None = None) -> list[dict[str, Any]]:
        sql = "SELECT * FROM components" + (" WHERE kind = ?" if kind else "") + " ORDER BY kind, name"
        rows = self._conn().execute(sql, (kind,) if kind else ()).fetchall()
        return [component_from_row(r) for r in rows]

    # -- watch folder leases -------------------------------------------------

    def hold_folder(self, folder: str, holder: str, *, ttl: float, now: float | None = None) -> bool:
        """Take or renew the lease on watch folder ``folder`` for ``ttl`` seconds; True when ``holder`` holds it."""
        now = _now(now)
        row = self._conn().execute(
            "INSERT INTO folder_leases (folder, holder, host, pid, acquired_at, expires_at)"
            " VALUES (:f, :h, :host, :pid, :now, :until)"
            " ON CONFLICT (folder) DO UPDATE SET holder = excluded.holder, host = excluded.host,"
            " pid = excluded.pid, expires_at = excluded.expires_at,"
            " acquired_at = CASE WHEN folder_leases.holder = excluded.holder"
            " THEN folder_leases.acquired_at ELSE excluded.acquired_at END"
            " WHERE folder_leases.holder = excluded.holder OR folder_leases.expires_at < :now"
            " RETURNING holder",
            {"f": folder, "h": holder, "host": socket.gethostname(), "pid": os.getpid(),
             "now": now, "until": now + ttl},
        ).fetchone()
        return row is not None

    def release_folder(self, folder: str, holder: str) -> None:
        self._conn().execute("DELETE FROM folder_leases WHERE folder = ? AND holder = ?", (folder, holder))

    def folder_holders(self) -> list[dict[str, Any]]:
        rows = self._conn().execute("SELECT * FROM folder_leases ORDER BY folder").fetchall()
        return [dict(r) for r in rows]

    def describe(self) -> dict[str, Any]:
        return {"backend": "sqlite", "location": str(self.path), "schema": SCHEMA_VERSION}

    # -- pending acquisitions -------------------------------------------------

    def pending_sync(self, watch: str, entries: Iterable[PendingEntry], *, now: float | None = None) -> None:
        """Make ``entries`` the whole pending list of watch folder ``watch`` (see :class:`JobStore`)."""
        now = _now(now)
        rows = [
            (watch, e.path, e.kind, e.reason, e.owner, e.first_seen, e.last_change, e.quiet_until, e.digest, now)
            for e in entries
        ]
        conn = self._conn()
        with _transaction(conn):
            keep = {r[1] for r in rows}
            stored = [r[0] for r in conn.execute("SELECT path FROM pending WHERE watch = ?", (watch,))]
            conn.executemany(
                "DELETE FROM pending WHERE watch = ? AND path = ?", [(watch, p) for p in stored if p not in keep]
            )
            conn.executemany(
                "INSERT INTO pending (watch, path, kind, reason, owner, first_seen, last_change, quiet_until,"
                " digest, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (watch, path) DO UPDATE SET kind = excluded.kind, reason = excluded.reason,"
                " owner = excluded.owner, first_seen = min(pending.first_seen, excluded.first_seen),"
                " last_change = excluded.last_change, quiet_until = excluded.quiet_until,"
                " digest = excluded.digest, updated_at = excluded.updated_at",
                rows,
            )

    def throughput(self, *, since: float, bucket: float, now: float | None = None,
                   owners: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Succeeded jobs and bytes per ``bucket`` seconds since ``since`` (see :class:`JobStore`)."""
        now = _now(now)
        if bucket <= 0:
            raise StoreError(f"bucket must be a positive number of seconds, got {bucket!r}")
        count = max(1, int((now - since) // bucket) + 1)
        out = [{"start": since + i * bucket, "jobs": 0, "bytes": 0, "duplicates": 0} for i in range(count)]
        where, args = owners_clause(owners)
        # A duplicate (succeeded as "already imported as job N", result.duplicate_of) imported nothing.
        dup = "json_extract(coalesce(result, '{}'), '$.duplicate_of') IS NOT NULL"
        rows = self._conn().execute(
            f"SELECT CAST((finished_at - ?) / ? AS INTEGER) AS i, sum(CASE WHEN {dup} THEN 0 ELSE 1 END) AS n,"
            f" sum(CASE WHEN {dup} THEN 1 ELSE 0 END) AS d,"
            f" coalesce(sum(CASE WHEN {dup} THEN 0 ELSE json_extract(progress, '$.bytes_done') END), 0) AS bytes"
            f" FROM jobs WHERE state = 'succeeded' AND finished_at >= ? AND finished_at <= ? AND {where} GROUP BY i",
            (since, bucket, since, now, *args),
        ).fetchall()
        for r in rows:
            if 0 <= r["i"] < count:
                out[r["i"]]["jobs"] = r["n"]
                out[r["i"]]["duplicates"] = r["d"]
                out[r["i"]]["bytes"] = r["bytes"]
        return out

    def pending_list(
        self, *, watch: str | None = None, owner: str | None = None, limit: int = 500
    ) -> list[PendingEntry]:
        """Pending acquisitions, oldest first, optionally of one watch folder or owner."""
        where, params = [], []
        if watch is not None:
            where.append("watch = ?")
            params.append(watch)
        if owner is not None:
            where.append("owner = ?")
            params.append(owner)
        sql = "SELECT * FROM pending" + (" WHERE " + " AND ".join(where) if where else "")
        sql += " ORDER BY first_seen, watch, path LIMIT ?"
        rows = self._conn().execute(sql, (*params, int(limit))).fetchall()
        return [pending_from_row(r) for r in rows]

    # -- events -------------------------------------------------------------

    def _insert_event(self, conn, type_: str, subject: str, data: dict[str, Any],
                      job_id: int | None, owner: str | None, now: float) -> int:
        cur = conn.execute(
            "INSERT INTO events (at, type, subject, job_id, owner, data) VALUES (?, ?, ?, ?, ?, ?)",
            (now, type_, subject, job_id, owner, json.dumps(data)),
        )
        return cur.lastrowid

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
        """Append an event that is not a job state change (a progress milestone); returns its id."""
        conn = self._conn()
        with _transaction(conn):
            return self._insert_event(conn, type, subject, data, job_id, owner, _now(now))

    def events_after(
        self,
        after: int = 0,
        *,
        limit: int = 100,
        owners: Iterable[str] | None = None,
        job_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Events with ``id > after`` in id order, at most ``limit``; optionally only ``owners``' or one job's."""
        where, args = ["id > ?"], [int(after)]
        if owners is not None:
            owners = list(owners)
            where.append(f"owner IN ({', '.join('?' * len(owners))})")
            args += owners
        if job_id is not None:
            where.append("job_id = ?")
            args.append(job_id)
        rows = self._conn().execute(
            f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?", (*args, int(limit))
        ).fetchall()
        return [
            {"id": r["id"], "at": r["at"], "type": r["type"], "subject": r["subject"], "job_id": r["job_id"],
             "owner": r["owner"], "data": json.loads(r["data"])}
            for r in rows
        ]

    def last_event_id(self) -> int:
        # AUTOINCREMENT keeps the highest id ever used in sqlite_sequence, pruned rows included.
        row = self._conn().execute(
            "SELECT max(coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'events'), 0),"
            " coalesce((SELECT max(id) FROM events), 0)) AS id"
        ).fetchone()
        return row["id"]

    def _sink(self, row: sqlite3.Row) -> dict[str, Any]:
        return {k: row[k] for k in row.keys()}

    def sink_claim(self, name: str, holder: str, *, hold: float, now: float | None = None) -> dict[str, Any] | None:
        """Hold sink ``name`` for ``hold`` seconds (created at the newest event when new).

        Returns the sink's row (``last_id``, ``failing_since``, ``disabled_at``…) or None
        while another holder's lease runs: one process delivers a sink at a time.
        """
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            conn.execute(
                "INSERT INTO event_sinks (name, last_id, updated_at)"
                " VALUES (?, (SELECT coalesce(max(id), 0) FROM events), ?) ON CONFLICT (name) DO NOTHING",
                (name, now),
            )
            row = conn.execute(
                "UPDATE event_sinks SET holder = ?, held_until = ? WHERE name = ?"
                " AND (holder IS NULL OR holder = ? OR held_until < ?) RETURNING *",
                (holder, now + hold, name, holder, now),
            ).fetchone()
        return self._sink(row) if row else None

    def sink_update(self, name: str, holder: str, *, now: float | None = None, **fields: Any) -> None:
        """Record a sink's progress while holding it: ``last_id``, ``delivered`` (added),
        ``failing_since``, ``last_error``, ``disabled_at``. Raises :class:`StoreError` when
        ``holder`` no longer holds it."""
        allowed = {"last_id", "failing_since", "last_error", "disabled_at"}
        sets, args = ["updated_at = ?"], [_now(now)]
        for key, value in fields.items():
            if key == "delivered":
                sets.append("delivered = delivered + ?")
            elif key in allowed:
                sets.append(f"{key} = ?")
            else:
                raise StoreError(f"unknown sink field {key!r}")
            args.append(value)
        cur = self._conn().execute(
            f"UPDATE event_sinks SET {', '.join(sets)} WHERE name = ? AND holder = ?", (*args, name, holder)
        )
        if cur.rowcount != 1:
            raise StoreError(f"event sink {name!r} is not held by {holder}")

    def sink_reset(self, name: str, *, now: float | None = None) -> None:
        """Re-enable a disabled sink: it resumes after the last event it delivered."""
        self._conn().execute(
            "UPDATE event_sinks SET disabled_at = NULL, failing_since = NULL, last_error = NULL, updated_at = ?"
            " WHERE name = ?",
            (_now(now), name),
        )

    def sinks(self) -> list[dict[str, Any]]:
        """Every event sink's row, by name."""
        return [self._sink(r) for r in self._conn().execute("SELECT * FROM event_sinks ORDER BY name")]

    def events_prune(self, before: float, *, sinks: Iterable[str] = ()) -> int:
        """Delete events older than ``before`` that every named sink has delivered; returns how many."""
        sinks = list(sinks)
        floor = ""
        args: list[Any] = [before]
        if sinks:
            floor = (f" AND id <= (SELECT coalesce(min(last_id), 0) FROM event_sinks"
                     f" WHERE name IN ({', '.join('?' * len(sinks))}))")
            args += sinks
        return self._conn().execute(f"DELETE FROM events WHERE at < ?{floor}", args).rowcount

    # -- outbox -------------------------------------------------------------

    def _outbox_insert(
        self, conn, mails: Iterable[Mail], job_id: int | None, now: float, *, raw: list[bytes] | None = None
    ) -> None:
        for i, mail in enumerate(mails):
            conn.execute(
                "INSERT INTO outbox (job_id, kind, sender, recipients, subject, raw, state, next_attempt_at,"
                " created_at) VALUES (?, ?, ?, ?, ?, ?, 'pending', ?, ?)",
                (
                    job_id,
                    mail.kind,
                    mail.sender or self.sender,
                    json.dumps(list(mail.recipients)),
                    mail.subject,
                    raw[i] if raw is not None else mail.as_bytes(),
                    now,
                    now,
                ),
            )

    def outbox_add(self, mails: Iterable[Mail], *, job_id: int | None = None, now: float | None = None) -> None:
        """Queue mails that belong to no job transition (e.g. watcher alerts)."""
        conn = self._conn()
        with _transaction(conn):
            self._outbox_insert(conn, mails, job_id, _now(now))

    def outbox_digest(self, digest: Mail, mail_ids: Iterable[int], *, now: float | None = None) -> int:
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            self._outbox_insert(conn, [digest], None, now)
            digest_id = conn.execute("SELECT last_insert_rowid()").fetchone()[0]
            for mail_id in mail_ids:
                conn.execute(
                    "UPDATE outbox SET state = 'digested', digest_id = ?, sent_at = NULL, last_error = NULL,"
                    " claimed_until = NULL WHERE id = ?", (digest_id, mail_id),
                )
        return int(digest_id)

    def _mail(self, row: sqlite3.Row) -> OutboxMail:
        return mail_from_row(row)

    def outbox_claim(self, *, now: float | None = None, limit: int = 10, hold: float = 300.0) -> list[OutboxMail]:
        """Take due mails for sending; they stay ``sending`` for ``hold`` seconds at most."""
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            rows = conn.execute(
                "UPDATE outbox SET state = 'sending', claimed_until = ?, attempts = attempts + 1"
                " WHERE id IN (SELECT id FROM outbox WHERE state = 'pending' AND next_attempt_at <= ?"
                # The longest-waiting first: by id, mails that keep failing would starve the rest.
                " ORDER BY next_attempt_at, id LIMIT ?) RETURNING *",
                (now + hold, now, limit),
            ).fetchall()
        return sorted((self._mail(r) for r in rows), key=lambda m: m.id)

    def outbox_sent(self, mail_id: int, *, now: float | None = None) -> None:
        """The server accepted the mail: never send it again."""
        self._conn().execute(
            "UPDATE outbox SET state = 'sent', sent_at = ?, last_error = NULL, claimed_until = NULL WHERE id = ?",
            (_now(now), mail_id),
        )

    def outbox_failed(self, mail_id: int, error: str, *, permanent: bool, now: float | None = None) -> OutboxMail:
        """A delivery failed: transient → ``pending`` after a capped backoff; permanent → ``failed``."""
        now = _now(now)
        conn = self._conn()
        with _transaction(conn):
            row = conn.execute("SELECT attempts FROM outbox WHERE id = ?", (mail_id,)).fetchone()
            if row is None:
                raise StoreError(f"no mail with id {mail_id} in the outbox")
            give_up = permanent  # a transient failure never uses up the mail (issue 11)
            row = conn.execute(
                "UPDATE outbox SET state = ?, next_attempt_at = ?, last_error = ?, claimed_until = NULL"
                " WHERE id = ? RETURNING *",
                (
                    "failed" if give_up else "pending",
                    None if give_up else now + self.mail_retry.delay(row["attempts"]),
                    error,
                    mail_id,
                ),
            ).fetchone()
        return self._mail(row)

    def outbox_resend(self, mail_id: int, *, now: float | None = None) -> OutboxMail:
        """Queue a failed (or sent) mail again, with a fresh attempt budget."""
        row = self._conn().execute(
            "UPDATE outbox SET state = 'pending', attempts = 0, next_attempt_at = ?, sent_at = NULL"
            " WHERE id = ? AND state IN ('failed', 'dismissed', 'sent', 'digested') RETURNING *",
            (_now(now), mail_id),
        ).fetchone()
        if row is None:
            raise StoreError(f"mail {mail_id} does not exist or is not failed, dismissed, digested or sent; nothing to resend")
        return self._mail(row)

    def outbox_dismiss(self, mail_id: int) -> OutboxMail | None:
        row = self._conn().execute(
            "UPDATE outbox SET state = 'dismissed' WHERE id = ? AND state = 'failed' RETURNING *", (mail_id,)
        ).fetchone()
        return None if row is None else self._mail(row)

    def outbox_hold(self, mail_ids: Iterable[int], *, until: float, now: float | None = None) -> int:
        """Claimed mails back to ``pending`` until ``until``, their claim not counted (see :class:`JobStore`)."""
        conn = self._conn()
        held = 0
        with _transaction(conn):
            for mail_id in mail_ids:
                held += conn.execute(
                    "UPDATE outbox SET state = 'pending', next_attempt_at = ?, claimed_until = NULL,"
                    " attempts = max(0, attempts - 1) WHERE id = ? AND state = 'sending'",
                    (until, mail_id),
                ).rowcount
        return held

    def outbox_list(self, *, state: str | None = None, limit: int = 50, before: int | None = None,
                    owners: Sequence[str] | None = None) -> list[OutboxMail]:
        where, params = outbox_where(state, before, "?", owners)
        rows = self._conn().execute(f"SELECT * FROM outbox{where} ORDER BY id DESC LIMIT ?", (*params, limit)).fetchall()
        return [self._mail(r) for r in rows]

    def outbox_counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        counts = {"pending": 0, "sending": 0, "sent": 0, "failed": 0}
        where, params = outbox_where(None, None, "?", owners)
        for row in self._conn().execute(f"SELECT state, count(*) AS n FROM outbox{where} GROUP BY state", params):
            counts[row["state"]] = row["n"]
        return counts

    def outbox_next_due(self) -> float | None:
        row = self._conn().execute("SELECT min(next_attempt_at) AS t FROM outbox WHERE state = 'pending'").fetchone()
        return row["t"]

    # -- health --------------------------------------------------------------

    def is_fault(self, exc: BaseException) -> bool:
        """Also SQLite's own: locked past ``busy_timeout``, disk full, I/O error (by result code)."""
        if isinstance(exc, sqlite3.OperationalError):
            code = getattr(exc, "sqlite_errorname", "") or ""
            if code.startswith(_STORE_FAULT_CODES):
                return True
            text = str(exc)
            return "database is locked" in text or "disk is full" in text or "disk I/O error" in text
        return super().is_fault(exc)

    def ping(self) -> bool:
        """True when the database answers; when not, ``ping_error`` says why."""
        if self.check_file():
            return False
        try:
            self._conn().execute("SELECT 1 FROM jobs LIMIT 1").fetchall()
            self.ping_error = None
            return True
        except sqlite3.Error as exc:
            self.ping_error = str(exc)
            return False


def _succeeded_from(running: Job | None, row: Any, result: dict[str, Any] | None, progress: Progress | None,
                    now: float, history: list[HistoryEntry]) -> Job | None:
    """The job as the finishing UPDATE left it (``row``: its columns), built from the worker's
    own ``running`` job instead of parsing the row's spec, files and result again (tens of MB for
    a plate of 100,000 files); None when ``running`` is not that job at that attempt."""
    if (running is None or running.id != row["id"] or row["state"] != "succeeded"
            or running.attempts != row["attempts"] or running.cancel_requested != bool(row["cancel_requested"])):
        return None
    return dataclasses.replace(
        running, state=JobState.SUCCEEDED, result=result, finished_at=now, updated_at=now,
        lease_expires_at=None, error=None, history=history, progress=progress or running.progress,
        spec=dataclasses.replace(running.spec, session_key=None) if running.spec.session_key else running.spec,
    )


@dataclasses.dataclass
class _Prepared:
    """Mails composed before a finishing transaction, for the job as it was expected to end."""

    job: Job
    data: dict[str, Any]  # the jobs row as the finishing UPDATE was expected to leave it
    history_len: int  # entries including the finishing one
    mails: list[Mail]
    raw: list[bytes]

    def matches(self, conn: sqlite3.Connection, row: sqlite3.Row) -> bool:
        """Did the job end exactly as expected (inside the transaction, after its history entry)?"""
        if dict(row) != self.data:
            return False
        count = conn.execute("SELECT count(*) FROM job_history WHERE job_id = ?", (row["id"],)).fetchone()[0]
        return count == self.history_len


class _transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT`` on an autocommit connection; rollback on any exception."""

    __slots__ = ("conn", "changes")

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn
        self.changes = 0

    def __enter__(self):
        self.conn.execute("BEGIN IMMEDIATE")
        self.changes = self.conn.total_changes
        return self.conn

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
            except sqlite3.OperationalError as error:
                _after_write_error(self.conn, error)
                raise
            written = getattr(self.conn, "on_written", None)
            if written is not None and self.conn.total_changes != self.changes:
                written()  # a write went through: a disk-full condition may end (store/space.py)
            return False
        try:
            self.conn.execute("ROLLBACK")
        except sqlite3.OperationalError:  # SQLite already rolled back (e.g. on SQLITE_FULL)
            pass
        if isinstance(exc, sqlite3.OperationalError):
            _after_write_error(self.conn, exc)
        return False


# Databases whose WAL must be checkpointed and truncated as soon as the disk allows
# (a write failed for space); retried on every maintain tick until it succeeds.
_WAL_RECLAIM: set[str] = set()


def _after_write_error(conn: sqlite3.Connection, exc: sqlite3.OperationalError) -> None:
    """A write failed for space: give the write-ahead log's space back to the filesystem.

    The WAL keeps its size after a checkpoint; on a small data filesystem it grows
    back and fills it once space was freed. A TRUNCATE checkpoint copies it into the
    database and truncates it to zero bytes; while the disk is still full it cannot
    (the database file must grow), so it is retried on each maintain tick until the
    admin has freed space.
    """
    if not (getattr(exc, "sqlite_errorname", "") or "").startswith("SQLITE_FULL") and "full" not in str(exc):
        return
    try:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        path = conn.execute("PRAGMA database_list").fetchone()[2]
    except sqlite3.Error:
        return
    _WAL_RECLAIM.add(path)
    _reclaim_wal(conn, path)


def _reclaim_wal(conn: sqlite3.Connection, path: str) -> bool:
    """Try the TRUNCATE checkpoint; True (and forgotten) once done."""
    try:
        busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    except sqlite3.Error as error:
        # The store said the disk is full once (store/space.py); this is retried every tick.
        log.debug("job database %s is full; the WAL checkpoint waits for free space (%s)", path, error)
        return False
    if busy:
        return False  # a reader holds an old snapshot: next tick
    _WAL_RECLAIM.discard(path)
    log.log(logging.INFO if log_frames else logging.DEBUG,
            "job database %s: write-ahead log checkpointed and truncated after a disk-full error (%s frames)",
            path, log_frames)
    return True


__all__ = ["JobStore", "FINISHED_STATES"]
