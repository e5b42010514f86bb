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

from ..units import format_duration

#: Seconds between "still unreachable" reminders while an outage lasts: doubling, then every 15 min.
REMINDERS = (60.0, 120.0, 240.0, 480.0, 900.0)


class Outage:
    """The availability of one store, as the log tells it.

    ``down(error)`` on each failed attempt: the first logs a WARNING naming the
    store and the error; later ones log a reminder once :data:`REMINDERS` says
    (seconds since the previous line). ``up()`` on each success: after an
    outage, one INFO line with its duration. Thread-safe; ``up()`` costs one
    attribute read when nothing is wrong. Times are ``time.monotonic()`` seconds.
    """

    def __init__(self, store: str, logger: logging.Logger, *, clock=time.monotonic):
        self.store = store
        self.log = logger
        self.clock = clock
        self.since: float | None = None
        self.error: str | None = None
        self._next_reminder = 0.0
        self._reminders = 0
        self._lock = threading.Lock()

    def down(self, error: str) -> None:
        """Note a failed attempt; ``error`` names the store and what failed (one line)."""
        now = self.clock()
        with self._lock:
            self.error = error
            if self.since is None:
                self.since = now
                self._reminders = 0
                self._next_reminder = now + REMINDERS[0]
                self.log.warning("%s; waiting for it, retrying with backoff (nothing is lost)", error)
            elif now >= self._next_reminder:
                self._reminders += 1
                self._next_reminder = now + REMINDERS[min(self._reminders, len(REMINDERS) - 1)]
                self.log.warning("still, after %s: %s", format_duration(now - self.since), error)

    def up(self) -> None:
        if self.since is None:
            return
        with self._lock:
            if self.since is None:
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
