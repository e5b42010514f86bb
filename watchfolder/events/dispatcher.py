"""Delivering the event outbox to each sink: at least once, in order, durably.

Each sink has a row in the store: the id of the last event it delivered and a
lease, so that one process at a time delivers it (several ``work`` processes,
on several hosts, may run a dispatcher). :meth:`run` gives each sink a thread of
its own that delivers it in order. A failed delivery is retried, with the
backoff of ``events.retry``, until it succeeds; the events behind it wait, so
the order holds. A webhook failing without a break for ``disable_after``
seconds is disabled and the admin told once; ``watchfolder events enable NAME``
(or a restart with a changed config) resumes it where it stopped.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from ..store import JobStore
from .sinks import DeliveryError, Sink

log = logging.getLogger(__name__)

#: Events read from the store per sink per pass.
BATCH = 100
#: How long a dispatcher holds a sink (renewed at every pass).
HOLD_SECONDS = 30.0
#: Delivered events older than the retention are pruned this often.
PRUNE_EVERY = 600.0


class EventDispatcher:
    """Delivers stored events to ``sinks``; ``alert(sink_name, row)`` mails the admin when one is disabled."""

    def __init__(
        self,
        store: JobStore,
        sinks: list[Sink],
        *,
        backoff: Any,
        retention: float,
        alert=None,
        poll_interval: float = 0.5,
        name: str | None = None,
    ):
        self.store = store
        self.sinks = sinks
        self.backoff = backoff
        self.retention = retention
        self.alert = alert
        self.poll_interval = poll_interval
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:events"
        self._failures: dict[str, int] = {}
        self._next_try: dict[str, float] = {}
        self._next_prune = 0.0

    def register(self, now: float | None = None) -> None:
        """Create each sink's row now (a new sink starts after the newest event), before any
        worker runs: events written between the start and the first pass are then its own."""
        for sink in self.sinks:
            self.store.sink_claim(sink.name, self.name, hold=HOLD_SECONDS, now=now)

    def _step_sink(self, sink: Sink, now: float | None = None) -> int:
        clock = time.time() if now is None else now
        if self._next_try.get(sink.name, 0.0) > clock:
            return 0
        row = self.store.sink_claim(sink.name, self.name, hold=HOLD_SECONDS, now=clock)
        if row is None or row["disabled_at"] is not None:
            return 0
        return self._deliver(sink, row, clock)

    def _prune(self, now: float | None = None) -> None:
        clock = time.time() if now is None else now
        if clock >= self._next_prune:
            self._next_prune = clock + PRUNE_EVERY
            self.store.events_prune(clock - self.retention, sinks=[s.name for s in self.sinks])

    def _deliver(self, sink: Sink, row: dict[str, Any], now: float) -> int:
        start = last_id = row["last_id"]
        done = 0
        for event in self.store.events_after(last_id, limit=BATCH):
            if sink.accepts(event):
                try:
                    sink.deliver(event)
                except Exception as exc:
                    if not isinstance(exc, DeliveryError):  # a bug in a sink must not stop the others
                        log.exception("event sink %s failed on event %s", sink.name, event["id"])
                    if last_id != start:
                        self.store.sink_update(sink.name, self.name, last_id=last_id, now=now)
                    self._failed(sink, row, done, str(exc) or type(exc).__name__, now)
                    return done
                done += 1
                # Saved after each delivery: a crash repeats at most one event.
                self.store.sink_update(sink.name, self.name, last_id=event["id"], delivered=1,
                                       failing_since=None, last_error=None, now=now)
            last_id = event["id"]
        if last_id != start:  # filtered-out events at the end of the batch
            self.store.sink_update(sink.name, self.name, last_id=last_id, now=now)
        if self._failures.pop(sink.name, None):
            log.info("event sink %s delivers again", sink.name)
        self._next_try.pop(sink.name, None)
        return done

    def _failed(self, sink: Sink, row: dict[str, Any], done: int, error: str, now: float) -> None:
        failures = self._failures.get(sink.name, 0) + 1
        self._failures[sink.name] = failures
        wait = self.backoff.delay(failures)
        self._next_try[sink.name] = now + wait
        since = row["failing_since"] if (row["failing_since"] is not None and not done) else now
        fields: dict[str, Any] = {"failing_since": since, "last_error": error}
        disable = sink.disable_after is not None and now - since >= sink.disable_after
        if disable:
            fields["disabled_at"] = now
        self.store.sink_update(sink.name, self.name, now=now, **fields)
        row.update(fields)
        if disable:
            log.error("event sink %s disabled: failing since %s: %s", sink.name, since, error)
            if self.alert is not None:
                try:
                    self.alert(sink.name, dict(row))
                except Exception:  # the alert is informative; never stop delivering others
                    log.exception("could not queue the admin mail about sink %s", sink.name)
        else:
            log.warning("event sink %s: %s; next try in %g s", sink.name, error, wait)

    def run(self, stop: threading.Event) -> None:
        """Deliver until ``stop`` is set: one thread per sink, so a slow or hanging endpoint
        delays only its own events; this thread prunes."""
        threads = [threading.Thread(target=self._run_sink, args=(sink, stop), name=f"events-{sink.name}",
                                    daemon=True) for sink in self.sinks]
        for thread in threads:
            thread.start()
        try:
            while not stop.wait(self.poll_interval):
                try:
                    self._prune()
                except Exception:  # store busy or broken: keep going
                    log.exception("pruning delivered events failed")
        finally:
            for thread in threads:
                thread.join(5)

    def _run_sink(self, sink: Sink, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    self._step_sink(sink)
                except Exception:  # store busy or broken: keep going
                    log.exception("event sink %s: pass failed", sink.name)
                stop.wait(self.poll_interval)
        finally:
            sink.close()
            try:  # hand the sink over at once (a restarted service need not wait out the hold)
                self.store.sink_claim(sink.name, self.name, hold=0.0)
            except Exception:
                log.debug("could not hand over sink %s", sink.name, exc_info=True)
