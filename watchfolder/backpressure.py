"""Back-pressure on an importer's target: a cap on concurrent imports and a circuit breaker.

One :class:`TargetGate` stands in front of the importer of a worker process
(its target: an OMERO server, the archive volume). Workers ask it before they
claim a job:

- **Cap.** At most ``max_concurrent`` imports run at once against the target
  (``importer.omero.max_concurrent``), whatever the worker count; a worker
  finding no free slot does not claim, so queued jobs stay queued.
- **Circuit breaker.** A failure that says the target itself is unavailable
  (:attr:`ImportFailure.unavailable`: server unreachable, connection lost,
  session service down, archive volume full) is checked at once with a probe
  (the OMERO child logs in and out; the archive checks its free space). If the
  target does not answer, it is *paused*: workers stop claiming its jobs, so no
  job burns its attempts while the server is down; the failed job, and any that
  fail so while the target is paused, go back to the queue with their attempt
  not counted. If the probe answers, the failure is the job's own and counts;
  ``importer.pause.after_failures`` such failures in a row (a flapping server)
  pause the target too. While paused, the target is probed every
  ``probe_interval`` seconds; the first success resumes it and the queue drains
  at the cap.
- **Configuration errors.** A failure caused by the service's configuration of the
  target (:attr:`ImportFailure.config_error`: the OMERO admin account refused, or
  without the Sudo privilege) is checked with the same probe, which checks that
  configuration too (the OMERO child's ``--ping`` logs in and checks the account may
  act for users). When the probe fails, every job would fail the same way: the target
  pauses with the probe's reason (naming the fix), the job goes back to the queue with
  its attempt not counted, and the admin is mailed at once, once per pause; it resumes
  when the probe passes. When the probe passes, the failure is the job's own and counts.
- **Pre-check.** ``Importer.pause_reason`` (archive: free space under
  ``importer.archive.min_free_bytes``) pauses the target before any job fails.

The gate publishes its state as the store component ``("target", name)``, which
``status``, the dashboard and ``/metrics`` (``watchfolder_importer_paused``)
show; a pause longer than ``importer.pause.alert_after`` mails the admin once,
and its end mails again. The gate is per process: each ``work`` process
pauses, probes and caps on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import ImportFailure

log = logging.getLogger(__name__)

#: How often the cheap pre-check (free space) runs while the target is not paused.
PRECHECK_SECONDS = 5.0
#: How often the gate's state (imports running, peak) is published for status and /metrics.
PUBLISH_SECONDS = 5.0


class TargetGate:
    """Cap + breaker + pre-check for one target (see the module doc). Thread-safe."""

    def __init__(
        self,
        importer,
        *,
        after_failures: int,
        probe_interval: float,
        alert_after: float,
        store=None,
        alert: Callable[[str, dict[str, Any], bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ):
        self.importer = importer
        self.target = importer.target()
        cap = importer.max_concurrent()
        self.max_concurrent = cap
        self.after_failures = after_failures
        self.probe_interval = probe_interval
        self.alert_after = alert_after
        self.store = store
        self.alert = alert
        self.clock = clock
        self._lock = threading.Lock()
        self._probe_lock = threading.Lock()
        self._publish_lock = threading.Lock()
        self.running = 0
        self.peak = 0
        self.failures = 0
        self.paused_since: float | None = None
        self.reason: str | None = None
        self.last_probe_at: float | None = None
        self.last_probe: str | None = None
        self.alerted = False
        # When the current pause mails the admin: alert_after after it began, or at once
        # for a configuration error (it will not go away by itself).
        self._alert_at: float | None = None
        # Why the target is paused: "configuration" (the admin must act) or "unavailable".
        self.cause: str | None = None
        self.pauses = 0
        self._next_probe = 0.0
        self._next_precheck = 0.0
        self._next_publish = 0.0
        self.need_bytes: int | None = None  # paused for space: resume once this many bytes fit

    @classmethod
    def from_config(cls, config, importer, store=None, alert=None) -> TargetGate:
        p = config.importer.pause
        return cls(importer, after_failures=p.after_failures, probe_interval=p.probe_interval,
                   alert_after=p.alert_after, store=store, alert=alert)

    # -- claiming ---------------------------------------------------------------

    @property
    def paused(self) -> bool:
        return self.paused_since is not None

    def acquire(self) -> bool:
        """Take a slot to claim a job: False while paused or at the cap. Call :meth:`done` after."""
        self.tick()
        with self._lock:
            if self.paused_since is not None:
                return False
            if self.max_concurrent is not None and self.running >= self.max_concurrent:
                return False
            self.running += 1
            self.peak = max(self.peak, self.running)
            return True

    def done(self) -> None:
        """Give the slot back (the claim found nothing, or the job ended)."""
        with self._lock:
            self.running = max(0, self.running - 1)

    # -- outcomes -----------------------------------------------------------------

    def succeeded(self) -> None:
        with self._lock:
            self.failures = 0

    def failed(self, failure: ImportFailure, *, job_bytes: int = 0) -> bool:
        """Record a failed job; True when it must go back to the queue with its attempt not counted.

        A target out of space (:attr:`ImportFailure.full`: ENOSPC, EDQUOT, or too little
        free for the job, ``job_bytes`` or the failure's own ``need_bytes``) pauses at once,
        without a probe: the job goes back to the queue, and the target resumes once
        :meth:`Importer.space_reason` says that much fits again.

        A failure that says the target is unavailable, or is caused by the target's
        configuration (``config_error``), is checked at once with a probe: when the
        probe fails, this is an outage or a setup every job would fail on, not the
        job's fault: the target pauses and the job is released. When the probe
        succeeds, the failure is the job's own (a file that breaks the connection
        every time; a group the configured OMERO account may not act in) and counts,
        unless ``after_failures`` unavailable failures came in a row (a flapping
        server), which pauses the target too.
        """
        config = bool(failure.config_error) and not failure.unavailable
        if not failure.unavailable and not config:
            with self._lock:
                self.failures = 0
            return False
        with self._lock:
            if not config:
                self.failures += 1
            if failure.full:
                need = failure.need_bytes if failure.need_bytes is not None else job_bytes
                self.need_bytes = max(self.need_bytes or 0, need)
                if self.paused_since is None:
                    self._pause(failure.message)
                    self._next_probe = self.clock()  # space freed meanwhile: the next tick finds it
        if failure.full:
            self.publish()
            return True
        with self._lock:
            if self.paused_since is not None:
                return True
        with self._probe_lock:  # one probe at a time; a thread that waited uses the fresh state
            with self._lock:
                if self.paused_since is not None:
                    return True
            reason = self._safely(self.importer.probe)
            self.last_probe_at = self.clock()
            self.last_probe = reason or "ok"
            with self._lock:
                if reason is not None and config:
                    self._pause(f"configuration error: {reason}", alert_now=True)
                elif reason is not None:
                    self._pause(f"{failure.message} (probe: {reason})")
                elif not config and self.failures >= self.after_failures:
                    self._pause(f"{self.failures} failures in a row: {failure.message}")
                paused = self.paused_since is not None
        self.publish()
        if paused:
            self.tick()  # a configuration error mails the admin now
        return paused

    def _pause(self, reason: str, *, alert_now: bool = False) -> None:
        now = self.clock()
        self.paused_since = now
        self.reason = reason
        self.alerted = False
        self._alert_at = now if alert_now else now + self.alert_after
        self.cause = "configuration" if alert_now else "unavailable"
        self.pauses += 1
        self._next_probe = now + self.probe_interval
        log.warning("importer target %s paused: %s; probing every %g s", self.target, reason,
                    self.probe_interval)

    # -- probing ------------------------------------------------------------------

    def tick(self) -> None:
        """Probe when due (paused), run the pre-check when due (not paused), alert when due,
        publish the state (imports running, peak) every :data:`PUBLISH_SECONDS`."""
        now = self.clock()
        if now >= self._next_publish:
            self._next_publish = now + PUBLISH_SECONDS
            self.publish()
        if self.paused_since is None:
            if now < self._next_precheck:
                return
            self._next_precheck = now + PRECHECK_SECONDS
            reason = self._safely(self.importer.pause_reason)
            if reason:
                with self._lock:
                    if self.paused_since is None:
                        self._pause(reason)
                self.publish()
            return
        if now >= self._next_probe and self._probe_lock.acquire(blocking=False):
            try:
                self._probe(now)
            finally:
                self._probe_lock.release()
        if (not self.alerted and self.paused_since is not None and self._alert_at is not None
                and self.clock() >= self._alert_at):
            self.alerted = True
            self._alert(resumed=False)

    def _probe(self, now: float) -> None:
        need = self.need_bytes
        reason = self._safely(self.importer.probe)
        if reason is None and need is not None:
            reason = self._safely(lambda: self.importer.space_reason(need))
        self.last_probe_at = self.clock()
        self.last_probe = reason or "ok"
        with self._lock:
            self._next_probe = self.clock() + self.probe_interval
            resumed = reason is None and self.paused_since is not None
            if resumed:
                since, alerted = self.paused_since, self.alerted
                self.paused_since = None
                self.failures = 0
                self.need_bytes = None
                self._next_precheck = 0.0
            elif reason:
                self.reason = f"configuration error: {reason}" if self.cause == "configuration" else reason
        if resumed:
            log.info("importer target %s resumed after %.0f s paused", self.target, now - since)
            if self.store is not None:
                self.store.notify_work()  # idle workers claim at once instead of at their next poll
            if alerted:
                self._alert(resumed=True, since=since)
        self.publish()

    def _safely(self, check: Callable[[], str | None]) -> str | None:
        try:
            return check()
        except Exception as exc:  # a broken check keeps the target as it is, says why
            log.exception("checking importer target %s failed", self.target)
            return f"the check itself failed: {type(exc).__name__}: {exc}"

    def _alert(self, *, resumed: bool, since: float | None = None) -> None:
        if self.alert is None:
            return
        status = self.status()
        if since is not None:
            status["paused_since"] = since
        try:
            self.alert(self.target, status, resumed)
        except Exception:  # the mail is informative; never stop the workers
            log.exception("could not queue the admin mail about target %s", self.target)

    # -- what admins see ----------------------------------------------------------

    def status(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "paused": self.paused,
            "paused_since": self.paused_since,
            "reason": self.reason if self.paused else None,
            "cause": self.cause if self.paused else None,
            "last_probe_at": self.last_probe_at,
            "last_probe": self.last_probe,
            "consecutive_failures": self.failures,
            "need_bytes": self.need_bytes if self.paused else None,
            "running": self.running,
            "max_concurrent": self.max_concurrent,
            "peak": self.peak,
            "pauses": self.pauses,
        }

    def publish(self) -> None:
        if self.store is None:
            return
        # One publisher at a time, the state read inside: a periodic publish that read the
        # state before a pause must not be written after the pause's own (it was, under load).
        with self._publish_lock:
            try:
                self.store.set_component("target", self.target, self.status())
            except Exception:  # status is informative
                log.exception("could not publish importer target status")
