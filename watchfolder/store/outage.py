"""What a store outage says in the log: one line when it starts, reminders with backoff, one when it ends.

Every thread of a process that uses the store (workers, heartbeats, watchers,
the outbox, the event dispatcher, the web server) meets the same outage; they
report it here, once per process, instead of each in its own words every
retry. The callers themselves log an outage at DEBUG only.
"""

from __future__ import annotations

import logging
import threading
import time

from .. import defaults as D
from ..units import format_duration

#: Seconds between "still unreachable" reminders while an outage lasts: doubling, then every 15 min.
REMINDERS = D.PROBLEM_REMINDERS


def fault_level(exc: BaseException | None) -> int:
    """The level a caller logs a store fault at: DEBUG for a server outage or a full
    data disk (reported once per process by :class:`Outage` and store/space.py),
    WARNING for the rest (SQLite locked past busy_timeout, an I/O error, a broken
    store: each caller says once that it met it)."""
    from ..errors import StoreUnavailable
    from .space import is_disk_full

    if isinstance(exc, StoreUnavailable) or (exc is not None and is_disk_full(exc)):
        return logging.DEBUG
    return logging.WARNING


class Outage:
    """The availability of one store, as the log tells it.

    ``down(error)`` on each failed attempt: the first logs a WARNING naming the
    store and the error; later ones log a reminder once :data:`REMINDERS` says
    (seconds since the previous line). ``up(started)`` on each success of an
    attempt begun at ``started``: after an outage, one INFO line with its
    duration. A success begun before the latest failure (a call that was under
    way when the server went) ends nothing. Thread-safe; ``up()`` costs one
    attribute read when nothing is wrong. Times are ``clock()`` seconds
    (``time.monotonic()``).
    """

    def __init__(self, store: str, logger: logging.Logger, *, clock=time.monotonic):
        self.store = store
        self.log = logger
        self.clock = clock
        self.since: float | None = None
        self.error: str | None = None
        self._next_reminder = 0.0
        self._last_failure = 0.0
        self._reminders = 0
        self._lock = threading.Lock()

    def down(self, error: str) -> None:
        """Note a failed attempt; ``error`` names the store and what failed (one line)."""
        now = self.clock()
        with self._lock:
            self.error = error
            self._last_failure = now
            if self.since is None:
                self.since = now
                self._reminders = 0
                self._next_reminder = now + REMINDERS[0]
                self.log.warning("%s; waiting for it, retrying with backoff (nothing is lost)", error)
            elif now >= self._next_reminder:
                self._reminders += 1
                self._next_reminder = now + REMINDERS[min(self._reminders, len(REMINDERS) - 1)]
                self.log.warning("still, after %s: %s", format_duration(now - self.since), error)

    def up(self, started: float) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is None or started < self._last_failure:
                return
            lasted = self.clock() - self.since
            self.since = None
            self.error = None
            self.log.info("store %s reachable again after %s", self.store, format_duration(lasted))


_OUTAGES: dict[str, Outage] = {}
_OUTAGES_LOCK = threading.Lock()


def outage_for(store: str, logger: logging.Logger) -> Outage:
    """The one :class:`Outage` of this process for ``store`` (a location, password redacted).

    Shared by every handle on that store, the retries of a service waiting to open it included.
    """
    with _OUTAGES_LOCK:
        outage = _OUTAGES.get(store)
        if outage is None:
            outage = _OUTAGES[store] = Outage(store, logger)
        return outage


class OutageNoise(logging.Filter):
    """A handler filter: what an outage makes the other parts say, already said by :class:`Outage`.

    Drops (or, when the root logger is at DEBUG, shows as DEBUG) a record whose
    exception is a :class:`~watchfolder.errors.StoreUnavailable` (a loop that
    retries), a :class:`~watchfolder.errors.StoreBroken` (the store said so once,
    CRITICAL) or SQLite's disk full (said once by store/space.py), and psycopg's
    own warnings about lost or failed connections.
    Installed on the root handlers by the command line (``install``).
    """

    PSYCOPG_NOISE = (
        "error connecting in", "reconnection attempt in pool", "discarding broken connection",
        "discarding closed connection", "closing returned connection", "error resetting connection",
        "error ignored terminating", "error ignored in rollback",
    )

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno <= logging.DEBUG or not self._noise(record):
            return True
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True

    def _noise(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("psycopg"):
            return str(record.msg).startswith(self.PSYCOPG_NOISE)
        if record.exc_info and record.exc_info[1] is not None:
            import sqlite3

            from ..errors import StoreBroken, StoreUnavailable
            from .space import is_disk_full

            exc: BaseException | None = record.exc_info[1]
            while exc is not None:
                if isinstance(exc, (StoreUnavailable, StoreBroken)):
                    return True
                if isinstance(exc, sqlite3.Error) and is_disk_full(exc):
                    return True
                exc = exc.__cause__ or exc.__context__
        return False

    @classmethod
    def install(cls) -> None:
        """Add the filter to the root logger's handlers (once)."""
        for handler in logging.getLogger().handlers:
            if not any(isinstance(f, cls) for f in handler.filters):
                handler.addFilter(cls())
