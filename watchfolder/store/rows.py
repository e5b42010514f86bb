"""Rows to records and back, shared by the store implementations.

Every store keeps the same columns (``jobs``, ``job_history``, ``outbox``,
``components``, ``folder_leases``), so turning a row (any mapping from column
name to value: ``sqlite3.Row``, psycopg's ``dict_row``) into the plain records
of :mod:`watchfolder.job` and :mod:`watchfolder.store.base` is written once,
here, as are the job logs (files under one folder, see :class:`FileLogs`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import StoreError
from ..filemodes import PRIVATE, FileModes
from ..job import (
    ErrorKind,
    FileEntry,
    HistoryEntry,
    Job,
    JobError,
    JobSpec,
    JobState,
    Progress,
    imported_content_key,
    printable,
    shape_key,
)
from ..units import whole_number
from .base import OutboxMail, PendingEntry
from .space import DiskFull, is_disk_full

#: Every transition into a finished state: watched jobs then await their post-actions.
FINISHED_FOLLOWUP = "followup = CASE WHEN source LIKE 'watch:%' THEN 'pending' END"


def page_cursor(cursor: str) -> int:
    """The job id a ``list_jobs`` cursor (an earlier page's ``next_cursor``) stands for.

    Raises StoreError naming the fix for anything else (not digits, past 64 bits).
    """
    number = whole_number(str(cursor))
    if number is None:
        raise StoreError(f"invalid cursor {cursor!r}; pass the next_cursor of the previous page")
    return number


def job_from_row(
    row: Mapping[str, Any],
    log_path: Path,
    history: list[HistoryEntry] | None = None,
    files: Callable[[int], tuple[FileEntry, ...]] | tuple[FileEntry, ...] | None = None,
) -> Job:
    """The :class:`Job` a ``jobs`` row holds (``spec``, ``progress`` and ``result`` are JSON text).

    A spec without ``files`` keeps them in the ``job_files`` table: ``files`` gives
    them (the tuple, or a function of the job id that reads them).
    """
    spec_data = json.loads(row["spec"])
    spec_data["session_key"] = row["session_key"]
    spec = JobSpec.from_dict(spec_data)
    if "files" not in spec_data and files is not None:
        spec = dataclasses.replace(spec, files=files(row["id"]) if callable(files) else files)
    error = None
    if row["error_kind"]:
        error = JobError(ErrorKind(row["error_kind"]), row["error_message"] or "", bool(row["error_config"]))
    return Job(
        id=row["id"],
        spec=spec,
        idempotency_key=row["idempotency_key"],
        state=JobState(row["state"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        next_attempt_at=row["next_attempt_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        worker=row["worker"],
        lease_expires_at=row["lease_expires_at"],
        cancel_requested=bool(row["cancel_requested"]),
        progress=Progress(**json.loads(row["progress"])) if row["progress"] else Progress(),
        result=json.loads(row["result"]) if row["result"] else None,
        error=error,
        history=history or [],
        log_path=str(log_path),
        dismissed_at=row["dismissed_at"],
    )


def history_from_rows(rows) -> list[HistoryEntry]:
    """``job_history`` rows (``at``, ``state``, ``message``) in order."""
    return [HistoryEntry(r["at"], JobState(r["state"]), r["message"]) for r in rows]


def new_job_columns(
    spec: JobSpec, key: str, state: JobState, now: float, max_attempts: int, **extra: Any
) -> dict[str, Any]:
    """The columns of a new ``jobs`` row."""
    return {
        "idempotency_key": key,
        "state": str(state),
        "owner": spec.owner,
        "source": spec.source,
        "spec": json.dumps(spec.to_dict(files=False)),  # the files go to job_files
        "session_key": spec.session_key,
        "max_attempts": max_attempts,
        "created_at": now,
        "updated_at": now,
        "progress": json.dumps(Progress(bytes_total=spec.total_bytes(), files_total=len(spec.files)).to_dict()),
        "followup": "pending" if spec.source.startswith("watch:") and state.finished else None,
        "shape_key": shape_key(spec),
        **extra,
    }


def outbox_where(state: str | None, before: int | None, mark: str,
                 owners: Sequence[str] | None = None) -> tuple[str, tuple]:
    """The ``WHERE`` of an outbox listing (``mark`` is the driver's placeholder): in ``state``
    if given, ids below ``before`` if given (the next page of a newest-first listing), and with
    ``owners`` (a token limited to owners, :attr:`watchfolder.web.auth.Principal.owner_scope`)
    only the mails of their jobs (a mail of no job, e.g. an admin digest, belongs to no owner)."""
    terms, params = [], []
    if owners is not None:
        where, args = owners_clause(owners, mark)
        terms.append(f"job_id IN (SELECT id FROM jobs WHERE {where})")
        params.extend(args)
    if state:
        terms.append(f"state = {mark}")
        params.append(state)
    if before is not None:
        terms.append(f"id < {mark}")
        params.append(int(before))
    return (" WHERE " + " AND ".join(terms) if terms else ""), tuple(params)


def dedup_keys_of_row(row: Mapping[str, Any], files: tuple[FileEntry, ...] | None) -> tuple[str | None, str | None]:
    """``(shape_key, content_key)`` of a stored job (a ``jobs`` row with ``spec``, ``state``,
    ``result``; ``files`` from ``job_files`` unless the spec holds them): the back-fill of the
    schema step that added the keys. The content key only for a succeeded job that imported
    its files with every checksum known (:func:`~watchfolder.job.imported_content_key`)."""
    data = json.loads(row["spec"])
    data["session_key"] = None
    spec = JobSpec.from_dict(data)
    if "files" not in data and files is not None:
        spec = dataclasses.replace(spec, files=files)
    content = None
    if row["state"] == str(JobState.SUCCEEDED):
        content = imported_content_key(spec, json.loads(row["result"]) if row["result"] else None)
    return shape_key(spec), content


def mail_from_row(row: Mapping[str, Any]) -> OutboxMail:
    """The :class:`OutboxMail` an ``outbox`` row holds (``recipients`` is a JSON list)."""
    return OutboxMail(
        id=row["id"],
        job_id=row["job_id"],
        kind=row["kind"],
        sender=row["sender"],
        recipients=tuple(json.loads(row["recipients"])),
        subject=row["subject"],
        raw=bytes(row["raw"]),
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        sent_at=row["sent_at"],
        digest_id=row["digest_id"] if "digest_id" in row.keys() else None,
    )


def component_from_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A ``components`` row as the plain dict :meth:`JobStore.components` answers."""
    return {
        "kind": row["kind"],
        "name": row["name"],
        "host": row["host"],
        "pid": row["pid"],
        "status": json.loads(row["status"]),
        "updated_at": row["updated_at"],
    }


def pending_from_row(row: Mapping[str, Any]) -> PendingEntry:
    """A ``pending`` row as the :class:`PendingEntry` it holds."""
    return PendingEntry(
        watch=row["watch"], path=row["path"], kind=row["kind"], reason=row["reason"], first_seen=row["first_seen"],
        last_change=row["last_change"], quiet_until=row["quiet_until"], owner=row["owner"], digest=row["digest"],
        updated_at=row["updated_at"],
    )


class FileLogs:
    """Job logs as files ``<logs_dir>/<job id>.log``, appended one stamped line at a time.

    Both stores keep logs as files rather than rows: importers redirect a child
    process's output straight into the file (``ImportContext.log_path``) and
    the failure mail quotes its tail. With several hosts, ``logs_dir`` is a
    shared folder mounted at the same path everywhere; a log is only written
    by the worker holding the job's lease, so plain appends are safe on
    NFS/SMB (no locking, unlike a database file).
    """

    logs_dir: Path
    files: FileModes = PRIVATE
    log_faults = True  # a service logs a full disk once (store/space.py); a short command's error says it

    def log_path(self, job_id: int) -> Path:
        return self.logs_dir / f"{job_id}.log"

    @property
    def disk_full(self) -> DiskFull:
        """The data disk's space, as this process tells it (store/space.py): the logs' folder here;
        a store with files of its own there (SQLite) names them instead."""
        disk = self.__dict__.get("_disk_full")
        if disk is None:
            disk = self.__dict__.setdefault("_disk_full", DiskFull(
                f"job logs {self.logs_dir}", self.logs_dir,
                "free space on that filesystem (old job logs can be compressed or moved away)",
                logging.getLogger(type(self).__module__) if self.log_faults else None))
        return disk

    def space_problem(self) -> str | None:
        """The data disk full (one line naming the file, the problem and the fix), or None."""
        return self.disk_full.problem()

    def log(self, job_id: int, message: str | Sequence[str], *, now: float | None = None) -> None:
        """Append to the job's log file: a ``str`` is one line, a sequence of strings one line each.

        Every line is escaped with :func:`~watchfolder.job.printable` -- a newline or
        another control character inside a message (a file or folder name holding one)
        shows as ``\\n`` and never breaks the line, so nothing in a name can pass for a
        log entry. A message that is meant to span lines (a traceback, the files archived)
        is given as its lines.
        """
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() if now is None else now))
        lines = [message] if isinstance(message, str) else list(message)
        try:
            with self.files.open_append(self.log_path(job_id), errors="backslashreplace") as fh:  # 0600 or 0640
                fh.write("".join(f"{stamp}Z {printable(str(line))}\n" for line in lines))
        except OSError as exc:
            if is_disk_full(exc):
                self.disk_full.failed(f"cannot write {self.log_path(job_id)}: {exc.strerror}")
            raise

    def _read_log_file(self, job_id: int) -> str:
        try:
            return self.log_path(job_id).read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""


def owners_clause(owners: Sequence[str] | None, mark: str = "?") -> tuple[str, tuple[str, ...]]:
    """SQL condition limiting jobs to ``owners`` (None: everyone's; empty: nobody's)."""
    if owners is None:
        return "1 = 1", ()
    if not owners:
        return "1 = 0", ()
    return f"owner IN ({', '.join(mark for _ in owners)})", tuple(owners)
