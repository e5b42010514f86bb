"""The data disk out of space, as one process tells it: once, naming the file and the fix.

When the filesystem holding the job database (or the job logs beside it) is
full, every thread of a process meets it at once: workers, heartbeats, the
watchers, the outbox sender, the event dispatcher. Each used to log it in its
own words on every retry (a traceback a second per thread). Now the store
reports it here: one WARNING when a write first fails for space, naming the
file, the problem and the fix, reminders with backoff while it lasts, and one
INFO line when space is back; the other parts log it at DEBUG
(:func:`is_disk_full`, :class:`~watchfolder.store.outage.OutageNoise`).

:meth:`DiskFull.problem` is what health and status show: the filesystem has
less than :data:`FULL_BELOW` free (what any process sees, ``status`` included),
or a write of this process was refused for space less than :data:`QUIET_SECONDS`
ago and none went through since (a quota, which free space does not show). It
ends by itself once space is freed: nothing to restart.
"""

from __future__ import annotations

import errno
import logging
import shutil
import sqlite3
import threading
import time
from pathlib import Path

from .. import defaults as D
from ..units import format_duration, format_size

REMINDERS = D.PROBLEM_REMINDERS

#: Free bytes under which the data disk counts as full (a margin: SQLite grows its WAL and
#: database in pages, a checkpoint needs room for both, and a full disk frees a little at times).
FULL_BELOW = 1024 * 1024
#: Seconds without a refused write (and space above FULL_BELOW) that end a disk-full condition.
QUIET_SECONDS = 5.0


def is_disk_full(exc: BaseException | None) -> bool:
    """True for a write refused for lack of space: SQLite's SQLITE_FULL, or ENOSPC/EDQUOT."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", "") or ""
        return code.startswith("SQLITE_FULL") or "disk is full" in str(exc)
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


def io_error_from_full_disk(exc: BaseException | None, folder: str | Path) -> bool:
    """True for an I/O error (SQLite's SQLITE_IOERR…, or EIO) met while the filesystem holding
    ``folder`` has less than :data:`FULL_BELOW` free: SQLite reports some refusals for space
    as I/O errors (a cleanly stopped database has no ``-shm``; sizing a new one on a full
    disk fails with SQLITE_IOERR_SHMSIZE), and "failing disk" would send the admin the
    wrong way. False for any other error, or when the free space cannot be read."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorname", "") or ""
        if not (code.startswith("SQLITE_IOERR") or "disk I/O error" in str(exc)):
            return False
    elif not (isinstance(exc, OSError) and exc.errno == errno.EIO):
        return False
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except (OSError, ValueError):
        return False


def free_space(folder: str | Path) -> str:
    """The free space of the filesystem holding ``folder``, for a message ("12.0 KiB free")."""
    try:
        return f"{format_size(shutil.disk_usage(folder).free)} free"
    except (OSError, ValueError):
        return "free space unknown"


class DiskFull:
    """Whether the data disk holding ``folder`` is full, for one store of one process. Thread-safe.

    ``what`` names the store's files for the admin ("job database /srv/wf/watchfolder.db");
    ``fix`` says what to free; ``logger`` None for a short command (its one error line
    says it). ``failed(error)`` on each write refused for space; ``problem()`` for
    health and status (None when fine).
    """

    def __init__(self, what: str, folder: Path, fix: str, logger: logging.Logger | None, *, clock=time.monotonic):
        self.what = what
        self.folder = Path(folder)
        self.fix = fix
        self.log = logger
        self.clock = clock
        self.since: float | None = None
        self._last_failure = 0.0
        self._last_write = 0.0
        self._next_reminder = 0.0
        self._reminders = 0
        self._lock = threading.Lock()

    def _free(self) -> int | None:
        try:
            return shutil.disk_usage(self.folder).free
        except OSError:
            return None

    def _message(self, free: int | None) -> str:
        if free is not None and free >= FULL_BELOW:  # the filesystem has room: a quota refuses the writes
            problem = f"writes refused for space on the disk holding it ({self.folder}, {format_size(free)} free: " \
                      "over a quota?)"
        else:
            room = f"{format_size(free)} free" if free is not None else "free space unknown"
            problem = f"no space left on the disk holding it ({self.folder}, {room})"
        return (f"{self.what}: {problem}; {self.fix}; "
                "the service waits and carries on by itself once there is space (nothing is lost)")

    def failed(self, error: BaseException | str) -> None:
        """A write was refused for lack of space: the first logs a WARNING, later ones a reminder when due."""
        now = self.clock()
        with self._lock:
            self._last_failure = now
            if self.since is None:
                self.since = now
                self._reminders = 0
                self._next_reminder = now + REMINDERS[0]
                if self.log is not None:
                    self.log.warning("%s (%s)", self._message(self._free()), error)
            elif now >= self._next_reminder:
                self._reminders += 1
                self._next_reminder = now + REMINDERS[min(self._reminders, len(REMINDERS) - 1)]
                if self.log is not None:
                    self.log.warning("still, after %s: %s", format_duration(now - self.since),
                                     self._message(self._free()))

    def wrote(self) -> None:
        """A write went through (one attribute read when nothing is wrong)."""
        if self.since is not None:
            self._last_write = self.clock()

    def problem(self) -> str | None:
        """The one-line problem while the disk is full (see the module doc); None otherwise.
        Ends a condition this process met, with one INFO line, once space is back."""
        free = self._free()
        if free is not None and free < FULL_BELOW:
            return self._message(free)
        if self.since is None:
            return None
        with self._lock:
            if self.since is None:
                return None
            now = self.clock()
            refused = now - self._last_failure < QUIET_SECONDS and self._last_write <= self._last_failure
            if free is None or refused:
                return self._message(free)
            lasted = now - self.since
            self.since = None
        if self.log is not None:
            self.log.info("%s: space is back (%s free) after %s full; writing again", self.what,
                          format_size(free), format_duration(lasted))
        return None


__all__ = ["DiskFull", "FULL_BELOW", "QUIET_SECONDS", "free_space", "io_error_from_full_disk", "is_disk_full"]
