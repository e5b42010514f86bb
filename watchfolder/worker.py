"""Workers: claim jobs from the store, run the importer, record the outcome.

A :class:`Worker` is a single-step ``loop(now)`` plus a runner; a
:class:`WorkerPool` runs N of them in threads. Each running job has a
heartbeat that renews its lease, so a lease only expires when the process
died (kill -9, power loss) or hung; :meth:`JobStore.maintain` then gives the
job back to the queue.

Shutdown (SIGTERM/SIGINT): stop claiming, let running jobs finish within the
grace period, then interrupt them at their next checkpoint and release them
back to the queue.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from . import defaults as D
from .backpressure import TargetGate
from .errors import (
    AcquisitionError,
    ImportFailure,
    JobCancelled,
    LeaseLost,
    PermanentImportError,
    ShuttingDown,
    StoreUnavailable,
    TransientImportError,
)
from .importers.base import NOTHING_THERE, ImportContext, Importer
from .job import Job, JobSpec, JobState, Progress, imported_content_key
from .store import JobStore
from .store.base import process_start
from .store.outage import fault_level

log = logging.getLogger(__name__)
_PROCESS_START = process_start(os.getpid())  # clock ticks since boot; None off Linux

# How often an idle worker waiting for work checks its stop event.
STOP_CHECK_SECONDS = 0.2
JOB_PROGRESS_EVENT = "org.watchfolder.job.progress"



class JobContext(ImportContext):
    """The running job's link to the store: progress, lease, cancel and stop checks."""

    def __init__(
        self,
        store: JobStore,
        job: Job,
        worker: str,
        hard_stop: threading.Event,
        *,
        min_interval: float = D.PROGRESS_MIN_INTERVAL,
        milestones: tuple[int, ...] = (),
        milestone_min_bytes: int = 0,
    ):
        self.store = store
        self.job = job
        self.worker = worker
        self.hard_stop = hard_stop
        self.min_interval = min_interval
        self.milestones = milestones
        self.milestone_min_bytes = milestone_min_bytes
        self._milestone = 0
        self.current = Progress(**job.progress.to_dict())
        self.cancel_requested = False
        self.lease_lost: str | None = None
        # The claim has just renewed the lease: the first progress write is due one interval
        # from now (a job shorter than that finishes without a progress write of its own).
        self._last_write = time.monotonic()
        self._lock = threading.Lock()
        self._unsaved = False  # the last progress write failed: the next one goes out at once
        self._store_failing = False  # a store fault is being waited out (logged once per streak)
        self._store_failing_level = logging.WARNING
        self._log_backlog: list[tuple[float, str]] = []  # log lines the data disk refused, kept in order
        self._log_lock = threading.Lock()

    @property
    def log_path(self) -> str:
        return str(self.store.log_path(self.job.id))

    def log(self, message: str | Sequence[str]) -> None:
        """Append to the job's log, best effort: a line the data disk refuses (full, I/O error)
        is kept in memory and written, with its own time, before the next line that goes through."""
        with self._log_lock:
            self._log_backlog.append((time.time(), message))
            del self._log_backlog[:-D.LOG_BACKLOG_LINES]
            try:
                while self._log_backlog:
                    stamp, line = self._log_backlog[0]
                    self.store.log(self.job.id, line, now=stamp)
                    self._log_backlog.pop(0)
            except Exception as exc:
                if not self.store.is_fault(exc):
                    raise
                self._store_fault(exc, "could not write its log")

    def _store_fault(self, exc: BaseException, what: str) -> None:
        """Log a store fault once per streak; the job goes on (its attempt is kept)."""
        if not self._store_failing:
            self._store_failing_level = fault_level(exc)
            log.log(self._store_failing_level, "job %s: %s (%s); the job goes on and tries again",
                    self.job.id, what, exc)
        self._store_failing = True

    def progress(
        self,
        phase: str,
        bytes_done: int = 0,
        bytes_total: int = 0,
        files_done: int = 0,
        files_total: int = 0,
    ) -> None:
        with self._lock:
            self.current = Progress(phase, bytes_done, bytes_total, files_done, files_total)
        now = time.monotonic()
        if self._unsaved or now - self._last_write >= self.min_interval:
            self._last_write = now
            self._write(self.current)
        if self.milestones and bytes_total > 0 and bytes_total >= self.milestone_min_bytes:
            self._milestone_event(phase, bytes_done * 100 // bytes_total)
        self.checkpoint()

    def _milestone_event(self, phase: str, percent: int) -> None:
        """A ``job.progress`` event when the job passes one of ``events.progress_milestones``."""
        passed = [m for m in self.milestones if self._milestone < m <= percent]
        if not passed:
            return
        self._milestone = passed[-1]
        data = {"job_id": self.job.id, "owner": self.job.owner, "percent": passed[-1], "phase": phase,
                **self.current.to_dict()}
        try:
            self.store.add_event(JOB_PROGRESS_EVENT, f"job/{self.job.id}", data, job_id=self.job.id,
                                 owner=self.job.owner)
        except Exception:  # an event is informative; the import goes on
            log.exception("job %s: could not record a progress event", self.job.id)

    def _write(self, progress: Progress | None) -> None:
        # Progress is best effort and coalesced: a write the store refuses (locked,
        # disk full, server down) is not retried as such; the next one carries the
        # latest progress, and the heartbeat keeps renewing the lease meanwhile.
        try:
            if self.store.report_progress(self.job.id, self.worker, progress):
                self.cancel_requested = True
        except LeaseLost as exc:
            self.lease_lost = str(exc)
        except Exception as exc:
            if not self.store.is_fault(exc):
                raise
            self._unsaved = True
            self._store_fault(exc, "could not save its progress or renew its lease")
            return
        self._unsaved = False
        if self._store_failing:
            self._store_failing = False
            log.log(min(self._store_failing_level, logging.INFO), "job %s: the store answers again", self.job.id)

    def heartbeat(self) -> None:
        """Renew the lease (and save the latest progress); called by the heartbeat thread."""
        with self._lock:
            progress = self.current
        self._write(progress)

    def remember(self, **facts: Any) -> None:
        extra = dict(self.job.spec.extra)
        if all(extra.get(k) == v for k, v in facts.items()):
            return
        extra.update(facts)
        try:
            self.job = self.store.replace_spec(
                self.job.id, self.worker, dataclasses.replace(self.job.spec, extra=extra))
        except LeaseLost as exc:
            self.lease_lost = str(exc)
        except Exception as exc:
            if not self.store.is_fault(exc):
                raise
            self._store_fault(exc, f"could not keep {', '.join(facts)}")

    def checkpoint(self) -> None:
        if self.lease_lost:
            raise LeaseLost(self.lease_lost)
        if self.cancel_requested:
            raise JobCancelled(f"job {self.job.id} cancelled")
        if self.hard_stop.is_set():
            raise ShuttingDown("worker stopping; grace period over")


def next_step(job: Job) -> str:
    """What follows a failed attempt, from the job's state (never from the failure's words):
    another attempt at a given time, or none (issue 14: the last attempt's failure said
    "will try again")."""
    if job.state is JobState.RETRY_WAIT:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.next_attempt_at)) if job.next_attempt_at else "soon"
        return f"tried again at {at} (attempt {job.attempts + 1} of {job.max_attempts})"
    if job.error is not None and str(job.error.kind) == "transient":
        return f"not tried again: that was the last of {job.max_attempts} attempt(s); the job has failed"
    return "not tried again: the failure is permanent; the job has failed"


class Worker:
    """Runs jobs one at a time. ``loop()`` does one step; ``run()`` loops until stopped."""

    def __init__(
        self,
        store: JobStore,
        importer: Importer,
        *,
        name: str | None = None,
        poll_interval: float = D.WORKER_POLL_SECONDS,
        heartbeat_seconds: float = D.HEARTBEAT_SECONDS,
        maintain_interval: float = 1.0,
        hard_stop: threading.Event | None = None,
        gate: TargetGate | None = None,
        milestones: tuple[int, ...] = (),
        milestone_min_bytes: int = 0,
        redetect: Callable[[Job], JobSpec] | None = None,
        duplicate_of: Callable[[Job], Job | None] | None = None,
    ):
        self.store = store
        self.importer = importer
        # Reads a rejected (or file-less) job's acquisition again from disk before a retry imports it.
        self.redetect = redetect
        # Finds an earlier succeeded job with the same content (watch.dedup): then nothing is imported twice.
        self.duplicate_of = duplicate_of
        self.gate = gate
        self.milestones = milestones
        self.milestone_min_bytes = milestone_min_bytes
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.poll_interval = poll_interval
        self.heartbeat_seconds = heartbeat_seconds
        self.maintain_interval = maintain_interval
        self.hard_stop = hard_stop or threading.Event()
        self.current: JobContext | None = None
        self.jobs_done = 0
        self.started_at = time.time()
        self._next_maintain = 0.0
        self._beat_stop = threading.Event()
        self._cleaned: dict[int, None] = {}  # ids of jobs already cleaned up (insertion-ordered, bounded)
        self._beat_thread: threading.Thread | None = None

    # -- one step -----------------------------------------------------------

    def loop(self, now: float | None = None) -> Job | None:
        """Do housekeeping when due, claim one job and run it. Returns the finished job, or None if idle."""
        clock = time.time() if now is None else now
        if clock >= self._next_maintain:
            self._next_maintain = clock + self.maintain_interval
            self.store.maintain(now=now)
            self._clean_up_ended_elsewhere()
        gate = self.gate
        if gate is not None and not gate.acquire():
            return None  # the target is paused or at its cap: leave the jobs queued
        job = None
        try:
            job = self.store.claim(self.name, now=now)
            if job is None:
                return None
            return self.process(job, now=now)
        finally:
            if gate is not None:
                gate.done()
                if job is not None and gate.max_concurrent is not None:
                    self.store.notify_work()  # a slot is free: workers held at the cap look again

    def process(self, job: Job, now: float | None = None) -> Job:
        """Run a claimed job to its next state."""
        ctx = JobContext(self.store, job, self.name, self.hard_stop, milestones=self.milestones,
                         milestone_min_bytes=self.milestone_min_bytes)
        self.current = ctx
        ctx.log(f"attempt {job.attempts} of {job.max_attempts} started on {self.name}")
        # Worker status is published by the heartbeat, not per job: a write per job
        # would cost as much as the job itself on the no-op path.
        try:
            try:
                job = ctx.job = self._prepare(job, ctx, now)
                earlier = self.duplicate_of(job) if self.duplicate_of is not None else None
                if earlier is not None and not earlier.state.finished:
                    # The same content is being imported by an earlier job: decide once it has ended
                    # (its duplicate if it succeeds, imported if it fails) -- never both at once.
                    reason = (f"the same files are being imported by job {earlier.id} ({earlier.state}); "
                              "waiting for it to end")
                    self.store.log(job.id, reason)
                    # Looked at again soon, then less often the longer it waits (a long import upstream).
                    clock = time.time() if now is None else now
                    delay = min(max(D.DUPLICATE_WAIT_SECONDS, (clock - job.created_at) / 4), D.DUPLICATE_WAIT_MAX)
                    if earlier.state == JobState.RETRY_WAIT and earlier.next_attempt_at:
                        delay = max(delay, earlier.next_attempt_at - clock)
                    return self._settle(lambda: self.store.release(job.id, self.name, now=now, reason=reason,
                                                                   delay=delay))
                if earlier is not None:
                    ctx.log(f"already imported as job {earlier.id} (the same {len(job.spec.files)} "
                            "file(s): names, sizes and SHA-256): not imported again")
                    result = {"duplicate_of": earlier.id, "files": [], "bytes": 0}
                    for key in ("destination", "image_ids", "fileset_ids", "dataset_id", "screen_id"):
                        if key in (earlier.result or {}):
                            result[key] = earlier.result[key]
                    return self._settle(
                        lambda: self.store.succeed(job.id, self.name, result, now=now, progress=ctx.current)
                    )
                result = self.importer.run(job, ctx)
                ctx.checkpoint()  # a cancel that came in at the very end still counts
            except JobCancelled:
                ctx.log("cancelled while running; stopped")
                return self.clean_up(self._settle(lambda: self.store.cancelled(job.id, self.name, now=now)))
            except ShuttingDown:
                ctx.log("worker stopping: job released to the queue")
                return self._settle(
                    lambda: self.store.release(job.id, self.name, now=now, reason="worker shutting down")
                )
            except LeaseLost as exc:
                # Someone else owns the job now; write nothing more to it.
                log.warning("job %s: %s", job.id, exc)
                return self.store.get(job.id)
            except ImportFailure as exc:
                kind = "transient" if exc.transient else "permanent"
                if self.gate is not None and self.gate.failed(exc, job_bytes=job.spec.total_bytes()):
                    reason = f"target {self.gate.target} paused ({exc.message}); attempt not counted"
                    ctx.log(f"attempt {job.attempts}: {reason}")
                    return self._settle(lambda: self.store.release(job.id, self.name, now=now, reason=reason))
                ctx.log(f"attempt {job.attempts} failed ({kind}): {exc.message}")
                failure = exc
                if not exc.transient or job.attempts >= job.max_attempts:
                    # Ending for good: remove what it wrote *before* the end is recorded, so a job queued
                    # once this one has ended (the changed acquisition again) never meets its files --
                    # only while this worker still holds the job (raises LeaseLost otherwise: a worker
                    # that took it over may be writing those files).
                    try:
                        self.store.report_progress(job.id, self.name, None, now=now)
                    except StoreUnavailable:
                        pass  # cleaned up after the end is recorded, as always
                    else:
                        self.clean_up(job, ending=True)
                ended = self._settle(lambda: self.store.fail(job.id, self.name, failure, now=now))
                ctx.log(next_step(ended))
                return self.clean_up(ended)
            except Exception as exc:
                if self.store.is_fault(exc):
                    # The store failed (locked, disk full, server down), not the job: it keeps its
                    # attempt and goes back to the queue once the store answers.
                    reason = f"the job store failed ({type(exc).__name__}: {exc}); attempt not counted"
                    log.log(fault_level(exc), "job %s: %s", job.id, reason)
                    ctx.log(f"attempt {job.attempts}: {reason}")
                    return self._settle(lambda: self.store.release(job.id, self.name, now=now, reason=reason))
                # a bug or an unexpected OS error: keep the job, retry later
                ctx.log(["unexpected error:", *("  " + line for line in traceback.format_exc().rstrip().split("\n"))])
                log.exception("job %s: unexpected error", job.id)
                failure = TransientImportError(f"internal error: {type(exc).__name__}: {exc}")
                return self.clean_up(self._settle(lambda: self.store.fail(job.id, self.name, failure, now=now)))
            if self.gate is not None:
                self.gate.succeeded()
            ctx.log("succeeded")
            # What it imported, for content de-duplication's exact look-up of later copies (any age).
            imported = imported_content_key(job.spec, result)
            return self._settle(
                lambda: self.store.succeed(job.id, self.name, result, now=now, progress=ctx.current,
                                           content_key=imported, running=ctx.job)
            )
        except LeaseLost as exc:  # the finishing write found the job taken over
            log.warning("job %s: %s", job.id, exc)
            return self._settle(lambda: self.store.get(job.id))
        finally:
            self.jobs_done += 1
            self.current = None

    def _prepare(self, job: Job, ctx: JobContext, now: float | None) -> Job:
        """The job to import: re-detected from disk when its spec is not a detected acquisition;
        never one with zero files (that is not a success, whatever the importer would say)."""
        if self.redetect is not None and (job.spec.extra.get("rejected") or not job.spec.files):
            try:
                spec = self.redetect(job)
            except AcquisitionError as exc:
                raise PermanentImportError(str(exc)) from None
            job = self.store.replace_spec(job.id, self.name, spec, now=now)
            ctx.log(f"re-read from disk: {len(spec.files)} file(s), owner {spec.owner}, target {spec.target.label}")
        if not job.spec.files:
            raise PermanentImportError(
                f"{job.spec.root}: no files to import; a job with no files is never a success "
                "(drop the acquisition again once it holds its files)"
            )
        return job

    def _settle(self, write):
        """Run a job's finishing write, waiting out a store fault (server restart, network,
        a database locked past ``busy_timeout``, a full data disk: :meth:`JobStore.is_fault`).

        The outcome of work already done is not thrown away: the write is tried
        again with backoff while the heartbeat keeps renewing the lease. If the
        lease was lost meanwhile (outage longer than the lease), the write raises
        :class:`LeaseLost` and the job's new holder decides. A write whose commit
        was cut off and is tried again finds the job finished: LeaseLost as well.
        """
        delays = iter(D.RECONNECT_BACKOFF)
        while True:
            try:
                return write()
            except Exception as exc:
                if not self.store.is_fault(exc) or self.hard_stop.is_set():
                    raise
                delay = next(delays, D.RECONNECT_BACKOFF[-1])
                log.log(fault_level(exc), "worker %s: the job store failed (%s); trying again in %g s",
                        self.name, exc, delay)
                self.hard_stop.wait(delay)

    # -- what unsuccessful jobs wrote -------------------------------------------

    def clean_up(self, job: Job, *, ending: bool = False) -> Job:
        """A job that ended without success (cancelled, failed for good) leaves nothing in the
        target: the importer removes what it wrote (issue 11). ``ending``: the job still runs
        here and is about to fail for good. Returns ``job``."""
        if (not ending and job.state not in (JobState.CANCELLED, JobState.FAILED)) or job.id in self._cleaned:
            return job
        self._cleaned[job.id] = None
        if len(self._cleaned) > 10_000:
            self._cleaned.pop(next(iter(self._cleaned)))
        try:
            removed = self.importer.cleanup(job)
        except OSError as exc:
            if exc.errno in NOTHING_THERE:  # the folder cannot exist: nothing there, done (a11 F8)
                return job
            log.warning("job %s: cleaning up after it failed: %s", job.id, exc)
            self.store.log(job.id, f"could not remove what this job wrote: {exc}")
            return job
        except Exception as exc:  # never let cleanup stop the worker; the files only take space
            log.warning("job %s: cleaning up after it failed: %s", job.id, exc)
            self.store.log(job.id, f"could not remove what this job wrote: {exc}")
            return job
        if removed:
            self.store.log(job.id, f"removed {len(removed)} file(s) this job had written to the target "
                                   "before it ended without success")
        return job

    def _clean_up_ended_elsewhere(self) -> None:
        """Jobs cancelled or failed outside a worker (an orphan cancelled from the CLI, a lease
        that ran out on the last attempt): their leftovers are removed here, on the maintain tick."""
        jobs, _ = self.store.list_jobs(states=[JobState.CANCELLED.value, JobState.FAILED.value], limit=20)
        for job in jobs:
            if job.id not in self._cleaned:
                self.clean_up(job)

    # -- heartbeat ------------------------------------------------------------

    def _publish(self, *, raise_errors: bool = False) -> None:
        ctx = self.current
        status: dict[str, Any] = {
            "state": "busy" if ctx else "idle",
            "job_id": ctx.job.id if ctx else None,
            "jobs_done": self.jobs_done,
            "started_at": self.started_at,
            "heartbeat_seconds": self.heartbeat_seconds,
            "importer": self.importer.name,
            # Tells this process from a later one given the same pid (store.base.process_runs).
            "process_start": _PROCESS_START,
        }
        try:
            self.store.set_component("worker", self.name, status)
        except Exception:  # status is informative; never let it stop work
            if raise_errors:
                raise
            log.exception("could not publish worker status")

    def _beat(self) -> None:
        # The lease is renewed here, on a clock, whatever the importer does (OMERO's
        # server-side import may say nothing for an hour). A store error (database
        # locked past busy_timeout, disk full) must not end the thread: it is logged
        # once per streak and the next beat tries again.
        failing: int | None = None  # the level the current streak of failures was logged at
        while not self._beat_stop.wait(self.heartbeat_seconds):
            try:
                ctx = self.current
                if ctx is not None:
                    ctx.heartbeat()
                self._publish(raise_errors=True)
            except Exception as exc:
                if failing is None:
                    failing = fault_level(exc)
                    log.log(failing, "worker %s: heartbeat failed (%s); retrying every %g s",
                            self.name, exc, self.heartbeat_seconds)
                continue
            if failing is not None:
                log.log(failing, "worker %s: heartbeat works again", self.name)
            failing = None

    def start_heartbeat(self) -> None:
        self._publish()
        self._beat_thread = threading.Thread(target=self._beat, name=f"heartbeat-{self.name}", daemon=True)
        self._beat_thread.start()

    def stop_heartbeat(self, remove: bool = True) -> None:
        self._beat_stop.set()
        if self._beat_thread:
            self._beat_thread.join()
        if remove:
            try:
                self.store.remove_component("worker", self.name)
            except Exception as exc:  # the row is pruned later (store.prune_workers)
                log.warning("worker %s: could not remove its status row: %s", self.name, exc)

    # -- runner -----------------------------------------------------------------

    def _idle(self, stop: threading.Event, seen: int) -> None:
        """Wait for work: woken at once by a job queued in this process (or, where the
        store can tell, in another); otherwise look again after ``poll_interval``.
        ``stop`` is checked every :data:`STOP_CHECK_SECONDS`."""
        deadline = time.monotonic() + self.poll_interval
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or self.store.wait_for_work(seen, min(left, STOP_CHECK_SECONDS)):
                return

    def run(self, stop: threading.Event, *, burst: bool = False, max_jobs: int | None = None) -> int:
        """Work until ``stop`` is set (or, in burst mode, until the queue is empty). Returns jobs run."""
        done = 0
        last_error = None
        self.start_heartbeat()
        outage = None
        try:
            while not stop.is_set():
                if max_jobs is not None and done >= max_jobs:
                    break
                # Read before looking: a job queued after the look wakes the wait below.
                seen = self.store.work_generation()
                try:
                    job = self.loop()
                except Exception as exc:
                    if not self.store.is_fault(exc):  # store broken (corrupt, deleted) or a bug
                        if str(exc) != last_error:  # once per kind, not every poll
                            log.exception("worker %s: loop failed; not claiming until the store works",
                                          self.name)
                        last_error = str(exc)
                        stop.wait(self.poll_interval)
                        continue
                    # server down or restarting, database locked, disk full: wait with backoff
                    if outage is None:
                        outage = iter(D.RECONNECT_BACKOFF)
                    delay = next(outage, D.RECONNECT_BACKOFF[-1])
                    log.debug("worker %s: %s; trying again in %g s", self.name, exc, delay)  # the store logs it
                    stop.wait(delay)
                    continue
                last_error = None
                outage = None
                if job is None:
                    if burst:
                        break
                    self._idle(stop, seen)
                else:
                    done += 1
        finally:
            self.stop_heartbeat()
        return done


class WorkerPool:
    """N workers in threads, with the shutdown sequence of the module docstring."""

    def __init__(
        self, store: JobStore, importer: Importer, count: int, *, name: str | None = None, **worker_options: Any
    ):
        self.stop_claiming = threading.Event()
        self.hard_stop = threading.Event()
        base = name or f"{socket.gethostname()}:{os.getpid()}"
        self.workers = [
            Worker(store, importer, name=f"{base}:w{i + 1}", hard_stop=self.hard_stop, **worker_options)
            for i in range(count)
        ]
        self.threads: list[threading.Thread] = []

    def start(self, *, burst: bool = False) -> None:
        for worker in self.workers:
            thread = threading.Thread(
                target=worker.run, args=(self.stop_claiming,), kwargs={"burst": burst}, name=worker.name
            )
            thread.start()
            self.threads.append(thread)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the workers to end; True when all ended."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in self.threads:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            thread.join(remaining)
        return not any(t.is_alive() for t in self.threads)

    def stop(self, grace: float = D.SHUTDOWN_GRACE_SECONDS) -> bool:
        """Stop claiming; wait up to ``grace`` seconds for running jobs; then interrupt and release them."""
        self.stop_claiming.set()
        if self.workers:
            self.workers[0].store.notify_work()  # idle workers wake and see the stop
        if self.join(grace):
            return True
        running = [w.current.job.id for w in self.workers if w.current]
        log.warning("grace period over; releasing running jobs %s to the queue", running)
        self.hard_stop.set()
        return self.join(max(5.0, grace))
