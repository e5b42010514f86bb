"""The storage contract: what every job store implements, in plain data.

Everything above the store (workers, watchers, the REST API, the CLI, the mail
sender) speaks to it only through this interface, and only with the plain
records of :mod:`watchfolder.job` (``JobSpec`` in, ``Job`` out) and the mail
records below. ``tests/store_contract.py`` holds the contract tests, written
against this class alone and run against every implementation (huey's
``BaseStorage`` is the model).

Times are epoch seconds (``now`` arguments let tests and callers pass the
clock); errors are :class:`~watchfolder.errors.JobNotFound`,
:class:`~watchfolder.errors.InvalidTransition`,
:class:`~watchfolder.errors.LeaseLost` and
:class:`~watchfolder.errors.StoreError`.
"""

from __future__ import annotations

import abc
import email.policy
import errno
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from .. import defaults as D
from ..errors import ImportFailure, StoreUnavailable
from ..job import Job, JobSpec, Progress, storable

log = logging.getLogger(__name__)


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22,
    proc(5)); None where that cannot be read (not Linux, no such process)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rpartition(b")")[2].split()
        return int(fields[19])  # field 22 counted from the state, field 3
    except (OSError, ValueError, IndexError):
        return None


def process_runs(pid: int, started: int | None = None) -> bool:
    """Whether process ``pid`` still runs on this host -- and, when ``started`` (its
    :func:`process_start`) is known, is that same process, not a later one given the same
    pid (pids are reused: often in containers, with a small ``pid_max``)."""
    if not process_exists(pid):
        return False
    if started is None:
        return True
    now = process_start(pid)
    return now is None or now == started


def worker_gone(worker: str, host: str | None, pid: int | None, status: Any) -> str | None:
    """Why ``worker`` (a row of ``components``: its host, pid and status, JSON text or a dict;
    or, unpublished, None for all three) no longer runs, or None while it may. Only a process
    of this host can be asked; a worker name is ``host:pid:…`` (``worker.WorkerPool``)."""
    if host is None and pid is None:
        host, _, rest = worker.partition(":")
        pid_text = rest.partition(":")[0]
        pid = int(pid_text) if pid_text.isdigit() else None
    if not pid or host != socket.gethostname():
        return None
    if isinstance(status, str):
        try:
            status = json.loads(status)
        except ValueError:
            status = None
    started = status.get("process_start") if isinstance(status, dict) else None
    if process_runs(int(pid), started if isinstance(started, int) else None):
        return None
    if process_exists(int(pid)):
        return f"is gone (pid {pid} now belongs to another process)"
    return f"is gone (pid {pid} no longer runs)"


class CachingHeaderRegistry(HeaderRegistry):
    """Python's :class:`~email.headerregistry.HeaderRegistry` builds a new header class with
    ``type()`` on every lookup — a third of composing a mail. The class depends only on the
    header's name, so each is built once here; the headers themselves behave the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._classes: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        cls = self._classes.get(key)
        if cls is None:
            cls = self._classes[key] = super().__getitem__(name)
        return cls


_HEADERS = CachingHeaderRegistry()
# Generation policies of Mail.as_bytes, by (ascii_only, one_line_headers).
_WIRE_POLICIES = {
    (ascii_only, one_line): (email.policy.SMTP if ascii_only else email.policy.SMTPUTF8).clone(
        header_factory=_HEADERS, **({"max_line_length": 998} if one_line else {}))
    for ascii_only in (True, False) for one_line in (True, False)
}


@dataclass(frozen=True)
class Mail:
    """A composed mail, ready for the outbox.

    ``kind`` is e.g. ``job_succeeded``, ``job_failed``, ``admin_failure``,
    ``watcher_unhealthy``; ``recipients`` are the envelope recipients.
    """

    kind: str
    recipients: tuple[str, ...]
    message: EmailMessage

    @property
    def sender(self) -> str:
        return str(self.message.get("From") or "")

    @property
    def subject(self) -> str:
        return str(self.message.get("Subject") or "")

    def as_bytes(self) -> bytes:
        # SMTPUTF8 keeps a non-ASCII address readable in the headers; plain SMTP would mangle it.
        ascii_only = all(r.isascii() for r in self.recipients)
        # Nothing needs RFC 2047 encoded words (whose 75-character limit needs folding): keep
        # each header on one line (RFC 5322 allows 998). Readers that unfold a folded header
        # by turning CRLF into a space (Python's compat32, some webmail) show doubled spaces.
        one_line = not ascii_only or all(str(v).isascii() for _, v in self.message.raw_items())
        return self.message.as_bytes(policy=_WIRE_POLICIES[ascii_only, one_line])


@dataclass(frozen=True)
class OutboxMail:
    """A mail as stored in the outbox."""

    id: int
    job_id: int | None
    kind: str
    sender: str
    recipients: tuple[str, ...]
    subject: str
    raw: bytes
    state: str  # pending | sending | sent | failed | dismissed | digested
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    created_at: float
    sent_at: float | None
    digest_id: int | None = None  # state digested: the id of the admin digest that stands for it

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "job_id": self.job_id,
            "kind": self.kind,
            "recipients": list(self.recipients),
            "subject": self.subject,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_at": self.next_attempt_at,
            "last_error": self.last_error,
            "created_at": self.created_at,
            "sent_at": self.sent_at,
            "digest_id": self.digest_id,
        }


class WorkSignal:
    """Wakes waiting workers when a job is queued: a generation counter under a condition.

    A worker reads :meth:`generation` *before* it looks for a job and, finding
    none, waits (:meth:`wait`) for it to change, so a job queued between the look
    and the wait is not missed.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._generation = 0

    def generation(self) -> int:
        return self._generation

    def notify(self) -> None:
        with self._cond:
            self._generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notify after generation ``seen``; True if one came."""
        with self._cond:
            return self._cond.wait_for(lambda: self._generation != seen, timeout)


_signal_lock = threading.Lock()


@dataclass(frozen=True)
class PendingEntry:
    """An acquisition a watcher knows of and has not queued, with why (plain data).

    ``watch`` is the watch folder's name and ``path`` the acquisition's path
    relative to it (``/``-separated). ``kind`` is a short machine word
    (``writing``, ``waiting``, ``size``, ``sidecar``, ``ignored``…) and
    ``reason`` the same in a scientist's words. ``first_seen`` is when a
    watcher first saw the acquisition (kept across restarts by the store),
    ``last_change`` when it last changed, ``quiet_until`` when its quiet period
    ends (None when not counting), all epoch seconds. ``digest`` is the
    watcher's opaque snapshot of the acquisition (hex) at ``last_change``: a
    restarted watcher that finds the same digest knows nothing changed while it
    was down. ``owner`` is the owner named so far, or None. Names that are not
    valid UTF-8 are stored escaped (:func:`watchfolder.job.storable`).
    """

    watch: str
    path: str
    kind: str
    reason: str
    first_seen: float
    last_change: float
    quiet_until: float | None = None
    owner: str | None = None
    digest: str | None = None
    updated_at: float | None = None

    def __post_init__(self) -> None:
        # Names come from the filesystem and may not be valid UTF-8: made representable
        # here, once, so no store refuses the whole list for one of them.
        for name in ("watch", "path", "kind", "reason", "owner"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, storable(value))

    def to_dict(self) -> dict:
        return {
            "watch": self.watch,
            "path": self.path,
            "kind": self.kind,
            "reason": self.reason,
            "owner": self.owner,
            "first_seen": self.first_seen,
            "last_change": self.last_change,
            "quiet_until": self.quiet_until,
            "updated_at": self.updated_at,
        }


#: Builds the mails of a job that just finished. Its mails are written to the outbox in
#: the finishing transaction; a store may call it before that transaction, on the job as
#: it will be committed, to keep the (slow) composition out of its write lock, provided
#: it calls it again inside when the job turned out otherwise.
MailComposer = Callable[[Job], "list[Mail]"]


class JobStore(abc.ABC):
    """Durable jobs, their history, the dispatch queue and the mail outbox.

    Safe to share between the threads of a process; several processes may
    open the same store. Every state transition commits the job, its history
    entry, its dispatch message and its mails atomically.

    Size: one job may list 100,000 files (an HCS plate is one acquisition).
    A store writes ``spec.files`` once, at enqueue, and keeps it out of what
    :meth:`report_progress`, lease renewals and transitions rewrite (SQLite:
    the ``job_files`` table beside the ``jobs`` row), so their cost does not
    grow with the file count; every read returns the files in their order,
    unchanged. :meth:`enqueue_many` takes thousands of acquisitions in one
    call (a share that comes back with a backlog).
    """

    @abc.abstractmethod
    def close(self) -> None:
        """Close every connection this store opened (call once no thread uses it)."""

    @abc.abstractmethod
    def get(self, job_id: int) -> Job:
        """The job with its history; raises :class:`JobNotFound`."""

    @abc.abstractmethod
    def find(self, idempotency_key: str) -> Job | None:
        """The job holding ``idempotency_key`` (without history), or None."""

    @abc.abstractmethod
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
        whether an admin acknowledged a failure. ``files=False`` leaves each
        job's file list out (``spec.files`` empty): for callers that read only
        the rest, as a watcher at start does, a page of HCS plates is not a
        page of millions of file rows.
        """

    @abc.abstractmethod
    def imported_as(self, content_key: str) -> Job | None:
        """The newest succeeded job that recorded ``content_key`` (:func:`~watchfolder.job.content_key`:
        the same owner, target, group, paths, sizes and SHA-256), or None.

        Content de-duplication's exact look-up (:mod:`watchfolder.watch.dedup`): an
        index seek, so a copy of an acquisition imported thousands of jobs ago is found
        as surely as one of the last job.
        """

    @abc.abstractmethod
    def alike(self, spec: JobSpec, *, states: Iterable[str], before: int | None = None, limit: int = 20) -> list[Job]:
        """Jobs in ``states`` with ``spec``'s shape key (:func:`~watchfolder.job.shape_key`: the
        same owner, target, group, paths and sizes), newest first, at most ``limit``
        (1 to 1000); ``before``: only jobs with a lower id. Empty when ``spec`` lists no files.

        An index seek: de-duplication's cheap test (is there any earlier job these files
        could be a copy of?) and its look-up of identical jobs still queued or running.
        """

    @abc.abstractmethod
    def counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        """Number of jobs in each state (every state present); ``owners``: only theirs."""

    @abc.abstractmethod
    def oldest_queued_at(self, *, owners: Sequence[str] | None = None) -> float | None:
        """Creation time (epoch seconds) of the oldest queued job (of ``owners``), or None when none is queued."""

    @abc.abstractmethod
    def totals(self) -> dict[str, float]:
        """Aggregates for metrics: bytes imported and summed durations of succeeded jobs."""

    @abc.abstractmethod
    def log_path(self, job_id: int) -> Path:
        """Where job ``job_id``'s log lives (a file; it may not exist yet)."""

    @abc.abstractmethod
    def log(self, job_id: int, message: str | Sequence[str], *, now: float | None = None) -> None:
        """Append to the job's log file: a ``str`` is one line, a sequence one line per item.

        Control characters (a newline included) are escaped in every line
        (:func:`~watchfolder.job.printable`), so no name can break or forge a line.
        """

    @abc.abstractmethod
    def read_log(self, job_id: int) -> str:
        """The job's whole log as text (empty when nothing was logged); raises :class:`JobNotFound`."""

    @abc.abstractmethod
    def enqueue(self, spec: JobSpec, *, now: float | None = None, note: str = "") -> tuple[Job, bool]:
        """Queue a job; the same idempotency key returns the existing job and ``False``."""

    @abc.abstractmethod
    def enqueue_many(
        self, items: Iterable[tuple[JobSpec, str]], *, now: float | None = None
    ) -> list[tuple[Job, bool]]:
        """Queue several ``(spec, note)`` in one transaction (one commit for all: group commit).

        Each answer is ``(job, created)`` as from :meth:`enqueue`; a key repeated
        within the batch returns the first one's job with ``False``.
        """

    @abc.abstractmethod
    def reject(
        self, spec: JobSpec, reason: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> tuple[Job, bool]:
        """Record bad input (invalid sidecar, unknown owner…) as a job that failed permanently.

        Idempotent by key like :meth:`enqueue`, so a rescan does not report it twice.
        """

    @abc.abstractmethod
    def cancel(self, job_id: int, *, by: str = "", now: float | None = None, mails: MailComposer | None = None) -> Job:
        """Cancel a job. Queued or waiting: at once. Running: asks its worker to stop."""

    @abc.abstractmethod
    def retry(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        """Queue a failed or cancelled job again, with a fresh attempt budget.

        A job waiting for its next attempt is queued at once.
        """

    @abc.abstractmethod
    def dismiss(self, job_id: int, *, by: str = "", now: float | None = None) -> Job:
        """Acknowledge a failed job: it leaves the failed-imports list, its record stays."""

    @abc.abstractmethod
    def claim(self, worker: str, *, now: float | None = None) -> Job | None:
        """Take the oldest queued job and hold its lease, or return None when nothing is queued."""

    @abc.abstractmethod
    def replace_spec(self, job_id: int, worker: str, spec: JobSpec, *, now: float | None = None) -> Job:
        """Store a running job's acquisition as re-read from disk (a retry re-detects it): files,
        owner, target… change; the idempotency key and the source stay. Raises
        :class:`~watchfolder.errors.LeaseLost` when ``worker`` no longer holds the job."""
        raise NotImplementedError(f"{type(self).__name__} cannot replace a job's spec")

    def report_progress(
        self, job_id: int, worker: str, progress: Progress | None = None, *, now: float | None = None
    ) -> bool:
        """Record progress and renew the lease; returns whether a cancel was requested.

        Raises :class:`LeaseLost` when the job is no longer this worker's.
        """

    @abc.abstractmethod
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
        """Mark a running job succeeded with its result; its mails go to the outbox in the same transaction.

        ``content_key``: what it imported (:func:`~watchfolder.job.imported_content_key`),
        recorded for :meth:`imported_as`; None when it imported nothing itself or a
        checksum is unknown. ``running``: the job as its worker holds it (a hint: a store
        may build the finished job from it instead of reading and parsing the row again,
        which for a plate of 100,000 files is tens of MB).
        """

    @abc.abstractmethod
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

    @abc.abstractmethod
    def cancelled(
        self, job_id: int, worker: str, *, now: float | None = None, mails: MailComposer | None = None
    ) -> Job:
        """The worker stopped a running job whose cancel was requested."""

    @abc.abstractmethod
    def release(self, job_id: int, worker: str, *, now: float | None = None, reason: str = "",
                delay: float = 0.0) -> Job:
        """Give a running job back to the queue (worker shutting down). The attempt is not counted.

        ``delay`` (seconds): the job waits in ``retry_wait`` until then (as after a failed
        attempt, but uncounted and without an error) instead of being queued at once.
        """

    @abc.abstractmethod
    def maintain(self, *, now: float | None = None) -> dict[str, int]:
        """Housekeeping, safe to run from any process at any time.

        - running jobs whose lease expired go back to the queue (or fail when out of attempts;
          or are cancelled when a cancel was requested: their worker never acted on it);
        - ``retry_wait`` jobs whose time has come are queued;
        - consumed queue messages are pruned now and then.
        """

    @abc.abstractmethod
    def flush(self) -> None:
        """Make every transaction committed so far durable (survive a power cut), whatever ``synchronous`` is."""

    @abc.abstractmethod
    def followups(self, source: str, *, limit: int = 100) -> list[Job]:
        """Finished jobs from ``source`` whose post-actions (receipt, move…) are not done yet.

        ``source`` matches exactly, or as a prefix when it ends with ``*``
        (as in :meth:`list_jobs`). Their outcome is flushed to disk first, so a
        source is never moved or deleted on the strength of a success a power
        cut could still undo.
        """

    @abc.abstractmethod
    def followup_done(self, job_id: int, note: str = "", *, now: float | None = None) -> None:
        """Mark job ``job_id``'s post-actions done (``note`` goes to its log)."""

    @abc.abstractmethod
    def set_component(self, kind: str, name: str, status: dict[str, Any], *, now: float | None = None) -> None:
        """Publish a component's status for the status view (any process)."""

    @abc.abstractmethod
    def remove_component(self, kind: str, name: str) -> None:
        """Forget a component's status row (it stopped cleanly)."""

    @abc.abstractmethod
    def components(self, kind: str | None = None) -> list[dict[str, Any]]:
        """Every published component status (optionally of one ``kind``), as plain dicts."""

    def prune_workers(self, *, now: float | None = None, after: float = D.WORKER_PRUNE_SECONDS) -> list[dict[str, Any]]:
        """Forget the rows of dead workers: those of this host whose process is gone, and
        any whose heartbeat is older than ``after`` seconds (or ten of the worker's own
        heartbeat intervals, if longer; other hosts' processes cannot be asked). A process
        killed with SIGKILL never removes its row, and health would stay 503 forever.
        Returns the rows removed, each logged once as a warning. A worker that was only
        stopped (SIGSTOP) publishes its row again at its next heartbeat.
        """
        now = time.time() if now is None else now
        here = socket.gethostname()
        removed = []
        for row in self.components("worker"):
            status = row.get("status") or {}
            bound = max(after, 10 * float(status.get("heartbeat_seconds") or 0))
            age = now - row["updated_at"] if row.get("updated_at") is not None else 0.0
            started = status.get("process_start")
            gone = row.get("host") == here and row.get("pid") and not process_runs(
                int(row["pid"]), started if isinstance(started, int) else None)
            if gone or age > bound:
                try:
                    self.remove_component("worker", row["name"])
                except Exception as exc:  # the store failing (disk full, locked): status and health go on
                    if not self.is_fault(exc):
                        raise
                    log.debug("could not forget worker %s: %s", row["name"], exc)
                    continue
                log.warning(
                    "forgot worker %s (pid %s on %s): %s", row["name"], row.get("pid"), row.get("host"),
                    "its process is gone" if gone else f"no heartbeat for {age:.0f} s; its process is gone",
                )
                removed.append(row)
        return removed

    @abc.abstractmethod
    def outbox_add(self, mails: Iterable[Mail], *, job_id: int | None = None, now: float | None = None) -> None:
        """Queue mails that belong to no job transition (e.g. watcher alerts)."""

    @abc.abstractmethod
    def outbox_claim(self, *, now: float | None = None, limit: int = 10, hold: float = 300.0) -> list[OutboxMail]:
        """Take due mails for sending; they stay ``sending`` for ``hold`` seconds at most."""

    @abc.abstractmethod
    def outbox_sent(self, mail_id: int, *, now: float | None = None) -> None:
        """The server accepted the mail: never send it again."""

    @abc.abstractmethod
    def outbox_failed(self, mail_id: int, error: str, *, permanent: bool, now: float | None = None) -> OutboxMail:
        """A delivery failed. Transient: ``pending`` again after the mail retry policy's
        backoff (its last value is the cap, repeated for as long as it takes: a mail is
        never given up because the server was down). Permanent (the server refused a
        recipient): kept as ``failed``, resent only by ``outbox_resend``."""

    @abc.abstractmethod
    def outbox_resend(self, mail_id: int, *, now: float | None = None) -> OutboxMail:
        """Queue a failed, dismissed, digested or sent mail again, with a fresh attempt budget."""

    @abc.abstractmethod
    def outbox_dismiss(self, mail_id: int) -> OutboxMail | None:
        """An admin has read a failed mail: it becomes ``dismissed`` and leaves the failed backlog (and the
        status problems); the row, its message and last error stay (``outbox_resend`` still sends it).
        Returns the mail, or None when ``mail_id`` is not a failed mail."""

    @abc.abstractmethod
    def outbox_hold(self, mail_ids: Iterable[int], *, until: float, now: float | None = None) -> int:
        """Give claimed (``sending``) mails back as ``pending``, due at ``until``; the claim is not counted
        as an attempt. Returns how many were held (the admin digest waits with them)."""

    @abc.abstractmethod
    def outbox_digest(self, digest: Mail, mail_ids: Iterable[int], *, now: float | None = None) -> int:
        """Queue the admin ``digest`` and mark the mails it stands for (``mail_ids``, claimed)
        ``digested`` with its id, in one transaction; returns the digest's id. A digested mail is
        never sent on its own and is not counted as sent: only the digest goes out."""

    @abc.abstractmethod
    def outbox_list(self, *, state: str | None = None, limit: int = 50, before: int | None = None,
                    owners: Sequence[str] | None = None) -> list[OutboxMail]:
        """Outbox mails newest first, optionally in one ``state`` (pending, sending, sent, failed, dismissed,
        digested), only those with an id below ``before`` (the next page: the last id of the page before),
        and with ``owners`` only the mails of their jobs (None: every mail)."""

    @abc.abstractmethod
    def outbox_counts(self, *, owners: Sequence[str] | None = None) -> dict[str, int]:
        """Number of outbox mails in each state; with ``owners`` only the mails of their jobs (the
        status view of a token limited to owners), mails of no job not at all."""

    @abc.abstractmethod
    def outbox_next_due(self) -> float | None:
        """The earliest ``next_attempt_at`` (epoch seconds) of a pending mail, or None."""

    # -- pending acquisitions (what the watchers see and have not queued) ----

    @abc.abstractmethod
    def pending_sync(self, watch: str, entries: Iterable[PendingEntry], *, now: float | None = None) -> None:
        """Make ``entries`` the whole pending list of watch folder ``watch``, in one transaction.

        Entries of ``watch`` not given are removed (queued, rejected or gone).
        An entry already stored keeps its stored ``first_seen`` when that is
        earlier than the given one, so a restarted watcher never restarts the
        clock of an acquisition; ``updated_at`` is set to ``now``.
        """

    @abc.abstractmethod
    def throughput(self, *, since: float, bucket: float, now: float | None = None,
                   owners: Sequence[str] | None = None) -> list[dict[str, float]]:
        """Succeeded jobs (of ``owners``, or everyone's) per time bucket, for the dashboard's chart.

        Buckets of ``bucket`` seconds from ``since`` up to ``now``, oldest first,
        empty ones included: ``[{"start": epoch seconds, "jobs": n, "bytes": b, "duplicates": d}]``
        where a job counts in the bucket of its ``finished_at`` and ``bytes`` sums
        its ``progress.bytes_done``. A duplicate (succeeded without importing: the same files were
        already imported, ``result.duplicate_of``) counts in ``duplicates`` only, not in ``jobs``
        or ``bytes``.
        """

    @abc.abstractmethod
    def pending_list(
        self, *, watch: str | None = None, owner: str | None = None, limit: int = 500
    ) -> list[PendingEntry]:
        """Pending acquisitions, oldest first (by ``first_seen``), optionally of one watch folder or owner."""

    @abc.abstractmethod
    def ping(self) -> bool:
        """True when the database answers."""

    def is_fault(self, exc: BaseException) -> bool:
        """True when ``exc`` is the store failing now (unreachable, locked past its timeout,
        disk full, I/O error), not a fault of the job or the caller: worth waiting out.

        A store fault is never a job's fault (issue 11): a worker keeps the job's
        attempt, retries its finishing write and makes progress and log writes best
        effort. A job's log is a file beside the database, so the same OS errors
        of the data disk (no space, quota, I/O) count too.
        """
        if isinstance(exc, StoreUnavailable):
            return True
        return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO)

    # -- watch folder leases (several watchers, one holder per folder) -------

    @abc.abstractmethod
    def hold_folder(self, folder: str, holder: str, *, ttl: float, now: float | None = None) -> bool:
        """Take or renew the lease on watch folder ``folder`` for ``ttl`` seconds.

        True when ``holder`` holds it now: it was free, expired, or already
        ``holder``'s (then renewed). False while another holder's lease runs.
        """

    @abc.abstractmethod
    def release_folder(self, folder: str, holder: str) -> None:
        """Give the folder's lease up (only when ``holder`` holds it), so another watcher takes over at once."""

    @abc.abstractmethod
    def folder_holders(self) -> list[dict[str, Any]]:
        """Every folder lease: ``folder``, ``holder``, ``host``, ``pid``, ``acquired_at``, ``expires_at``."""

    def describe(self) -> dict[str, Any]:
        """What the status view shows about the store itself: ``backend``, ``location`` (no secrets), ``schema``."""
        return {"backend": type(self).__name__}

    # -- waking workers -------------------------------------------------------
    # Not abstract: every store gets the in-process signal. A store whose database
    # can notify other processes (PostgreSQL's LISTEN/NOTIFY) overrides
    # :meth:`wait_for_work` to also return on such a notification; one that cannot
    # (SQLite) leaves workers of other processes to their poll interval.

    @property
    def work_signal(self) -> WorkSignal:
        """This store's in-process signal (created on first use)."""
        signal = self.__dict__.get("_work_signal")
        if signal is None:
            with _signal_lock:
                signal = self.__dict__.setdefault("_work_signal", WorkSignal())
        return signal

    def work_generation(self) -> int:
        """A token to read before looking for a job, for :meth:`wait_for_work`."""
        return self.work_signal.generation()

    def wait_for_work(self, seen: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a job to be queued after ``seen`` was read.

        Returns True when woken (a job may be there), False on timeout. Implementations
        call :meth:`notify_work` after *committing* anything that queues a job
        (enqueue, retry, requeue of an expired lease or a due retry, release).
        """
        return self.work_signal.wait(seen, timeout)

    def notify_work(self) -> None:
        """Wake this process's waiting workers (call after the commit that queued work)."""
        self.work_signal.notify()


    # -- events (CloudEvents outbox) -------------------------------------------
    #
    # Every job state change writes an event in the transaction that makes the
    # change: ``type`` is ``org.watchfolder.job.<state>``, ``subject`` ``job/<id>``,
    # ``data`` the job summary as the change left it (no file list). Events are
    # plain dicts ``{"id", "at", "type", "subject", "job_id", "owner", "data"}``,
    # ids increasing. Sinks (webhook endpoints, MQTT) keep their position in the
    # store and are held by one process at a time through a lease.

    @abc.abstractmethod
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

    @abc.abstractmethod
    def events_after(
        self,
        after: int = 0,
        *,
        limit: int = 100,
        owners: Iterable[str] | None = None,
        job_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """Events with ``id > after`` in id order, at most ``limit``; optionally only ``owners``' or one job's."""

    @abc.abstractmethod
    def last_event_id(self) -> int:
        """The highest event id given out so far (0 when none): pruning old events never lowers it.

        A reader whose position is past it is reading another store (restored from a
        backup, or replaced): ``GET /api/v1/events`` answers 409 to such a position.
        """

    @abc.abstractmethod
    def sink_claim(self, name: str, holder: str, *, hold: float, now: float | None = None) -> dict[str, Any] | None:
        """Hold sink ``name`` for ``hold`` seconds; a new sink starts after the newest event.

        Returns the sink's row (``name``, ``last_id``, ``holder``, ``held_until``,
        ``delivered``, ``failing_since``, ``last_error``, ``disabled_at``, ``updated_at``)
        or None while another holder's lease runs.
        """

    @abc.abstractmethod
    def sink_update(self, name: str, holder: str, *, now: float | None = None, **fields: Any) -> None:
        """Record a held sink's progress: ``last_id``, ``delivered`` (a count to add),
        ``failing_since``, ``last_error``, ``disabled_at``. Raises :class:`StoreError` when
        ``holder`` does not hold it or a field is unknown."""

    @abc.abstractmethod
    def sink_reset(self, name: str, *, now: float | None = None) -> None:
        """Re-enable a disabled sink; it resumes after the last event it delivered."""

    @abc.abstractmethod
    def sinks(self) -> list[dict[str, Any]]:
        """Every event sink's row (as :meth:`sink_claim` returns it), by name."""

    @abc.abstractmethod
    def events_prune(self, before: float, *, sinks: Iterable[str] = ()) -> int:
        """Delete events older than ``before`` (epoch seconds) that every named sink has
        delivered; returns how many were deleted."""
