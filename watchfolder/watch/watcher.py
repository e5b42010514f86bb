"""Watch folders: detect completed acquisitions and queue each exactly once.

One :class:`Watcher` per configured watch folder. It chooses how to see changes
(inotify events, or polling on network shares where events never come), feeds a
:class:`~watchfolder.detector.Detector`, queues complete acquisitions in the job
store, rejects bad ones with a readable reason, and applies post-actions when
their jobs end. It never trusts a single source of truth: a full rescan runs at
start, periodically, after an event-queue overflow and after every restart of a
dead observer (watched folder removed, share unmounted).

Big trees: the observer asks the kernel only for changes (no open/close-nowrite
events, so the watcher's own scans make none). When the kernel's event queue
overflows anyway, the lost events are caught up by restatting the folders of
the tree (a folder's mtime shows an added, removed or renamed entry) and
re-listing only the changed ones, at most once per :data:`OVERFLOW_CATCHUP_MIN`
seconds however many overflows come in; a tree that overflows again and again
(:data:`OVERFLOW_LIMIT` in :data:`OVERFLOW_WINDOW` seconds) is polled instead,
and ``status`` names the sysctl to raise (``fs.inotify.max_queued_events``).

``Watcher.loop(now)`` is one step and returns how long to wait before the next;
``Watcher.start()`` runs it in a thread. :class:`WatchService` runs all watchers
of a config and mails the admin when one stays unhealthy.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import socket
import stat
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

from .. import defaults as D
from ..config import Config, WatchConfig
from ..errors import JobNotFound
from ..filenames import beside
from ..job import JobState, printable
from ..store.outage import fault_level
from ..store.space import is_disk_full
from .detector import (
    FINISHED_AT_START,
    RECEIPT_SUFFIX,
    Detector,
    Outcome,
    imported_jobs,
    imported_this,
    read_receipt,
    unreadable_folder,
)
from .followup import PostActions
from .mounts import mount_of
from .scanner import Scanner

log = logging.getLogger(__name__)


RESTART_BACKOFF = (1.0, 2.0, 5.0, 15.0, 30.0, 60.0)
HEALTH_INTERVAL = 1.0
STATUS_INTERVAL = 2.0
FOLLOWUP_INTERVAL = 1.0
STORE_RETRY_SECONDS = 5.0
# Folders noted unreadable are looked at again at most this often (at least every quiet period).
UNREADABLE_RECHECK_SECONDS = 5.0
# Events that say nothing changed: reading files (e.g. an in-place import) must
# not restart quiet periods.
IGNORED_EVENTS = frozenset({"opened", "closed_no_write"})
# Overflow handling (see the module docstring): catch-ups coalesce into one per
# OVERFLOW_CATCHUP_MIN seconds (or 4x the last catch-up's duration, if longer);
# OVERFLOW_LIMIT overflows within OVERFLOW_WINDOW seconds switch to polling.
OVERFLOW_CATCHUP_MIN = 1.0
OVERFLOW_LIMIT = 5
OVERFLOW_WINDOW = 60.0


@dataclasses.dataclass(frozen=True)
class ImportedPerReceipt:
    """An acquisition imported by job ``id`` according to its receipt; the store has no such job."""

    id: int


class WatchLimitError(OSError):
    """inotify ran out of watches or instances; the message names the sysctl to raise."""


# ---------------------------------------------------------------------------
# inotify queue overflow: watchdog rebuilds its watches and only logs it, so a
# log handler is the one place we learn that events were lost.

_overflow_callbacks: set[Callable[[], None]] = set()
_overflow_lock = threading.Lock()


class _OverflowHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a broken log record must not break watching
            return
        if "overflow" in message.lower():
            with _overflow_lock:
                callbacks = list(_overflow_callbacks)
            for callback in callbacks:
                callback()


_overflow_handler = _OverflowHandler(logging.WARNING)
logging.getLogger("watchdog").addHandler(_overflow_handler)


def _limit_message(exc: OSError, root: str) -> str:
    if exc.errno == errno.EMFILE:
        sysctl, value = "fs.inotify.max_user_instances", _read_proc("/proc/sys/fs/inotify/max_user_instances")
    else:
        sysctl, value = "fs.inotify.max_user_watches", _read_proc("/proc/sys/fs/inotify/max_user_watches")
    return (
        f"inotify limit reached watching {root} ({sysctl} = {value}); raise it, e.g. "
        f"`sysctl -w {sysctl}=524288` and a line `{sysctl} = 524288` in /etc/sysctl.d/90-watchfolder.conf; "
        "polling meanwhile"
    )


def _queue_limit_message(root: str, overflows: int, window: float) -> str:
    sysctl = "fs.inotify.max_queued_events"
    value = _read_proc("/proc/sys/fs/inotify/max_queued_events")
    return (
        f"the kernel's inotify event queue overflowed {overflows} times in {window:g} s watching {root} "
        f"({sysctl} = {value}): the tree changes faster than events can be kept; polling instead. Raise it, "
        f"e.g. `sysctl -w {sysctl}=1048576` and a line `{sysctl} = 1048576` in "
        "/etc/sysctl.d/90-watchfolder.conf, then restart the service to watch with events again"
    )


def _read_proc(path: str) -> str:
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


class EventSource:
    """inotify (through watchdog) on one folder, recursively; events go to ``sink``."""

    def __init__(self, root: str, sink: Callable[[str, str, str, bool], None]):
        self.root = root
        self.sink = sink
        self.observer = None

    def start(self) -> None:
        from watchdog.events import (
            DirAttribEvent,
            DirCreatedEvent,
            DirDeletedEvent,
            DirModifiedEvent,
            DirMovedEvent,
            FileAttribEvent,
            FileClosedEvent,
            FileCreatedEvent,
            FileDeletedEvent,
            FileModifiedEvent,
            FileMovedEvent,
            FileSystemEventHandler,
        )
        from watchdog.observers.inotify import InotifyObserver

        # A folder removed and made again at the same path (a churning staging tree) is watched
        # again; watchdog then warns that it replaces its own callback, printing every watch it
        # holds (it formats a bound method, not the path): kilobytes of log per folder, for
        # nothing wrong. Only that warning is silenced.
        warnings.filterwarnings("ignore", message=r"Callback with id .* already exists for watch",
                                category=RuntimeWarning, module=r"watchdog\.")
        sink = self.sink

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # watchdog's thread
                sink(event.event_type, _text(event.src_path), _text(getattr(event, "dest_path", "") or ""),
                     event.is_directory)

        observer = InotifyObserver()
        try:
            # Only changes: with open and close-nowrite in the kernel's mask, every
            # folder a scan lists and every manifest it reads queues two events,
            # and a rescan of a big tree overflowed the queue it was catching up.
            observer.schedule(Handler(), self.root, recursive=True, event_filter=[
                FileCreatedEvent, DirCreatedEvent, FileDeletedEvent, DirDeletedEvent, FileModifiedEvent,
                DirModifiedEvent, FileMovedEvent, DirMovedEvent, FileClosedEvent,
                # A permission change (chmod) or a `touch` of an existing file: nothing else says so.
                FileAttribEvent, DirAttribEvent,
            ])
            observer.start()
        except OSError as exc:
            try:
                observer.stop()
            except Exception:  # never started; nothing to stop
                pass
            if exc.errno in (errno.ENOSPC, errno.EMFILE):
                raise WatchLimitError(exc.errno, _limit_message(exc, self.root)) from exc
            raise
        self.observer = observer

    def alive(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        return all(e.is_alive() for e in list(observer.emitters))

    def stop(self) -> None:
        observer, self.observer = self.observer, None
        if observer is not None:
            try:
                observer.stop()
                observer.join(timeout=5)
            except Exception:  # a dead observer may fail to stop; it is gone either way
                log.debug("stopping the observer of %s failed", self.root, exc_info=True)


def _text(path: Any) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else str(path)


# ---------------------------------------------------------------------------


class Watcher:
    """One watch folder: observer, detector, store, post-actions and health.

    ``clock`` gives the time when ``loop`` is called without ``now``.
    ``event_source`` builds the events observer (a factory taking root and sink),
    ``mount_lookup`` maps a path to its mount (tests give network filesystems).
    """

    def __init__(
        self,
        watch: WatchConfig,
        store: Any,
        *,
        clock: Callable[[], float] = time.time,
        event_source: Callable[[str, Callable], Any] = EventSource,
        mount_lookup: Callable[[str], Any] = mount_of,
        restart_backoff: tuple[float, ...] = RESTART_BACKOFF,
        health_interval: float = HEALTH_INTERVAL,
        status_interval: float = STATUS_INTERVAL,
        followup_interval: float = FOLLOWUP_INTERVAL,
        holder: str | None = None,
        lease_seconds: float = D.FOLDER_LEASE_SECONDS,
    ):
        self.watch = watch
        self.name = watch.name
        self.source = f"watch:{watch.name}"
        self.store = store
        self.clock = clock
        self.event_source_factory = event_source
        self.mount_lookup = mount_lookup
        self.restart_backoff = restart_backoff or RESTART_BACKOFF
        self.health_interval = health_interval
        self.status_interval = status_interval
        self.followup_interval = followup_interval
        # One watcher per folder across hosts: this one watches only while it holds
        # the folder's lease in the store, renewed every third of lease_seconds.
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}"
        self.lease_seconds = lease_seconds
        self.holding = False
        self.next_lease = 0.0

        self.events: deque[tuple[str, str, str, bool]] = deque()
        self.wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

        self.root = os.path.realpath(watch.path)
        self.mode = ""  # events | polling, once started
        self.fs_type = ""
        self.network = False
        self.expected_network: bool | None = None
        self.active = False
        self.health = "starting"
        self.error: str | None = None
        self._store_error = False  # self.error is a store failure, cleared by the next step that goes through
        self._store_failed_now = False
        self.warning: str | None = None
        self.unhealthy_since: float | None = None
        self.restart_attempt = 0
        self.next_restart = 0.0
        self.root_id: tuple[int, int] | None = None
        self.source_obj: Any = None
        self.detector: Detector | None = None
        self._unfinished_at_start: dict[str, int] = {}
        self._succeeded_at_start: dict[str, int] = {}
        self.scanner: Scanner | None = None
        self.post = PostActions(watch, self.root)
        self.rescan_requested = False
        self.overflow_pending = False
        self.overflow_times: deque[float] = deque()
        self.next_catchup = 0.0
        self.last_catchup_seconds: float | None = None
        self.last_event: float | None = None
        self.last_scan: float | None = None
        self.last_scan_seconds: float | None = None
        self.last_poll: float | None = None
        self.next_poll = 0.0
        self.next_rescan = 0.0
        self.next_health = 0.0
        self.next_status = 0.0
        self.next_followup = 0.0
        self.next_unreadable_check = 0.0
        self._readable_due: list[str] = []  # folders readable again, looked at by _look_again
        self._pending_signature: Any = None
        self._pending_error: str | None = None
        self.counters = {"events": 0, "rescans": 0, "polls": 0, "queued": 0, "rejected": 0, "ignored": 0,
                         "restarts": 0, "overflows": 0, "catchups": 0, "post_actions": 0}
        self._status: dict[str, Any] = self._build_status()

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        """Run :meth:`loop` in a thread until :meth:`stop`."""
        if self._thread is not None:
            return
        self._stop.clear()
        with _overflow_lock:
            _overflow_callbacks.add(self._on_overflow)
        self._thread = threading.Thread(target=self._run, name=f"watch:{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and the observer, and publish the stopped status."""
        self._stop.set()
        self.wake.set()
        with _overflow_lock:
            _overflow_callbacks.discard(self._on_overflow)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        self._deactivate()
        try:
            if self.holding:
                self.health = "stopped"
                self._publish(self.clock(), force=True)
                # Hand the folder over at once instead of after the lease.
                self.store.release_folder(self.name, self.holder)
                self.holding = False
            else:
                self.store.remove_component("watcher", self.standby_name)
        except Exception:  # the store may be closing or unreachable as well
            log.debug("publishing the stopped status of %s failed", self.name, exc_info=True)
        self.health = "stopped"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                delay = self.loop()
            except Exception as exc:  # keep watching; the status shows what broke
                if self.store.is_fault(exc):  # locked, disk full, server down: said by the store, waited out
                    log.debug("watch folder %s: step failed", self.name, exc_info=True)
                    self._store_failed("the job store failed", exc)
                else:
                    log.exception("watch folder %s: step failed", self.name)
                    self.error = f"internal error: {exc}"
                delay = 1.0
            self.wake.wait(max(0.0, delay))
            self.wake.clear()

    def _on_overflow(self) -> None:
        # watchdog's thread: only flag it; the watcher's step catches up (coalesced).
        if self.mode == "events":
            self.overflow_pending = True
            self.counters["overflows"] += 1
            self.overflow_times.append(time.monotonic())
            self.wake.set()

    def _sink(self, event_type: str, src: str, dest: str, is_dir: bool) -> None:
        if event_type in IGNORED_EVENTS:
            return
        self.events.append((event_type, src, dest, is_dir))
        self.wake.set()

    # -- starting and restarting the observer ------------------------------

    def _choose_mode(self) -> str:
        mount = self.mount_lookup(self.root)
        self.fs_type = mount.fs_type if mount is not None else "unknown"
        self.network = bool(mount is not None and mount.is_network)
        if self.watch.mode == "auto":
            return "polling" if self.network else "events"
        return self.watch.mode

    def _activate(self, now: float) -> None:
        """Start observing (observer, then a full rescan); raises OSError if the folder is not usable."""
        st = os.stat(self.root)
        if not os.path.isdir(self.root):
            raise NotADirectoryError(errno.ENOTDIR, f"{self.root} is not a folder")
        os.listdir(self.root)  # unreadable shows now, not as a silent empty scan
        mode = self._choose_mode()
        if self.expected_network is None:
            self.expected_network = self.network
        elif self.expected_network and not self.network:
            # The mount point is there but the share is not: watching the empty
            # local folder would look healthy and see nothing.
            raise OSError(errno.ENOENT, f"{self.root} is on {self.fs_type} now, not on its network share: "
                                        "the share is not mounted; mount it again")
        self.warning = None
        if mode == "events":
            source = self.event_source_factory(self.root, self._sink)
            try:
                source.start()
                self.source_obj = source
            except WatchLimitError as exc:
                self.warning = str(exc)
                log.warning("watch folder %s: %s", self.name, exc)
                mode = "polling"
        self.mode = mode
        self.root_id = (st.st_dev, st.st_ino)
        skip = tuple(
            os.path.realpath(a.folder)
            for a in (self.watch.on_success, self.watch.on_failure)
            if a.folder is not None
        )
        try:
            remembered = {e.path: e for e in self.store.pending_list(watch=self.name, limit=1_000_000)}
        except Exception:  # the store is busy: start without, the clocks restart
            log.warning("watch folder %s: cannot read its pending acquisitions from the store", self.name,
                        exc_info=True)
            remembered = None
        self.detector = Detector(self.watch, self.root, trust_events=(mode == "events"), remembered=remembered,
                                 finished=self._finished_job, finished_snapshots=self._finished_snapshots())
        self.detector.imported_as = self._imported_already
        self._unfinished_at_start = self._unfinished_jobs()
        self._succeeded_at_start = self._succeeded_jobs()
        self._pending_signature = None
        # The folder mtime index serves polling, and in events mode the catch-up after an overflow.
        self.scanner = Scanner(self.detector, self.root, index=True, skip=skip)
        self.events.clear()
        self.overflow_pending = False
        self.overflow_times.clear()
        self.active = True
        self._rescan(now)
        self.last_poll = now
        self.next_poll = now + self.watch.poll_interval

    def _deactivate(self) -> None:
        self.active = False
        source, self.source_obj = self.source_obj, None
        if source is not None:
            source.stop()

    def _unhealthy(self, now: float, reason: str) -> None:
        if self.health != "unhealthy":
            log.warning("watch folder %s is unhealthy: %s", self.name, reason)
        self._deactivate()
        self.health = "unhealthy"
        self.error = reason
        if self.unhealthy_since is None:
            self.unhealthy_since = now
        delay = self.restart_backoff[min(self.restart_attempt, len(self.restart_backoff) - 1)]
        self.restart_attempt += 1
        self.next_restart = now + delay
        self._publish(now, force=True)

    def _try_start(self, now: float, *, publish: bool = True) -> None:
        """Start watching (or restart after a problem); ``publish``: say so in the store now (the
        step that called it publishes at its end: one pending list of a new tree, not two)."""
        try:
            self._activate(now)
        except OSError as exc:
            self._unhealthy(now, _describe_root_problem(self.root, exc))
            return
        if self.health == "unhealthy":
            self.counters["restarts"] += 1
            log.warning("watch folder %s recovered (%s mode)", self.name, self.mode)
        self.health = "ok"
        self.error = None
        self.unhealthy_since = None
        self.restart_attempt = 0
        if publish:
            self._publish(now, force=True)

    def _check_health(self, now: float) -> None:
        try:
            st = os.stat(self.root)
        except OSError as exc:
            self._unhealthy(now, _describe_root_problem(self.root, exc))
            return
        if (st.st_dev, st.st_ino) != self.root_id:
            # Removed and recreated, or a share mounted/unmounted over it: the
            # observer watches the old folder; start over.
            self._unhealthy(now, f"{self.root} was replaced (removed and recreated, or a share was "
                                 "mounted or unmounted); restarting the watch")
            return
        if self.mode == "events" and self.source_obj is not None and not self.source_obj.alive():
            self._unhealthy(now, f"the event observer of {self.root} stopped; restarting it")

    # -- the single step ----------------------------------------------------

    def loop(self, now: float | None = None) -> float:
        """One step: events, health, polling, rescans, due candidates, post-actions, status.

        Returns the number of seconds until something is due.
        """
        now = self.clock() if now is None else now
        self._store_failed_now = False
        if not self._hold(now):
            self._publish(now)
            return max(0.0, self.next_lease - now)
        started = False
        if not self.active:
            if self.health in ("starting", "standby") or now >= self.next_restart:
                self._try_start(now, publish=False)
                started = self.active
            if not self.active:
                self._publish(now)
                return max(0.0, min(self.next_restart - now, self.health_interval))
        assert self.detector is not None and self.scanner is not None
        if now >= self.next_health:
            self.next_health = now + self.health_interval
            self._check_health(now)
            if not self.active:
                return max(0.0, min(self.next_restart - now, self.health_interval))
        self._drain_events(now)
        if not self.active:
            return max(0.0, min(self.next_restart - now, self.health_interval))
        self._recheck_unreadable(now)
        self._look_again(now)
        if self.rescan_requested or now >= self.next_rescan:
            self._rescan(now)
            self.overflow_pending = False  # a full rescan saw everything
        elif self.overflow_pending and self.mode == "events":
            self._overflowed(now)
        polled = False
        if self.mode == "polling" and now >= self.next_poll:
            changed = self.scanner.poll(now, since=self.last_poll)
            self.counters["polls"] += 1
            if changed:
                self.last_event = now
            self.last_poll = now
            self.next_poll = now + self.watch.poll_interval
            polled = True
        outcomes = self.detector.loop(now, recheck_pending=polled, since=self.last_poll)
        self._enqueue_all([o for o in outcomes if o.kind == "enqueue"], now)
        for outcome in outcomes:
            if outcome.kind != "enqueue":
                self._apply(outcome, now)
        if now >= self.next_followup:
            self.next_followup = now + self.followup_interval
            self._followups(now)
        if self._store_error and not self._store_failed_now:  # the store answered this whole step
            self._store_error = False
            self.error = None
        self._publish(now, force=started)
        return self._next_delay(now)

    def _store_failed(self, what: str, exc: BaseException) -> None:
        """A store operation failed (tried again later): the status says what and why, in the
        store's own words for a full data disk (file, problem, fix), until a step goes through."""
        problem = None
        if is_disk_full(exc):
            check = getattr(self.store, "space_problem", None)
            problem = check() if check is not None else None
        self.error = f"{what}: {problem or exc}"
        self._store_error = self._store_failed_now = True

    # -- the folder's lease (several watchers, one holder) --------------------

    @property
    def standby_name(self) -> str:
        """The component name a watcher waiting for the folder publishes under."""
        return f"{self.name}@{self.holder}"

    def _hold(self, now: float) -> bool:
        """Take or renew the folder's lease when due; True while this watcher holds it.

        On taking it over, the next step starts watching with a full rescan, so
        nothing dropped while the previous holder was dying is missed (and
        idempotency keys keep what it already queued from being queued twice).
        On losing it (another took over after this one stalled), it stops watching.
        """
        if now < self.next_lease:
            return self.holding
        try:
            held = self.store.hold_folder(self.name, self.holder, ttl=self.lease_seconds, now=now)
            if not held and self._release_dead_local_holder():
                held = self.store.hold_folder(self.name, self.holder, ttl=self.lease_seconds, now=now)
        except Exception as exc:  # store unreachable: carry on as we were; retry soon
            self.next_lease = now + min(1.0, self.lease_seconds / 3)
            self._store_failed("cannot renew the folder's lease in the job store", exc)
            return self.holding
        self.next_lease = now + self.lease_seconds / 3
        if held and not self.holding:
            log.warning("watch folder %s: %s holds it now; watching", self.name, self.holder)
            self.health = "starting"
            try:
                self.store.remove_component("watcher", self.standby_name)
            except Exception:
                log.debug("removing the standby status of %s failed", self.name, exc_info=True)
        elif not held and (self.holding or self.health != "standby"):
            if self.holding:
                log.warning("watch folder %s: lease lost to another watcher; standing by", self.name)
            self._deactivate()
            self.health = "standby"
            self.error = None
            self.next_status = 0.0
        self.holding = held
        return held

    def finish_followups(self, now: float) -> None:
        """Apply pending post-actions once more at shutdown, if this watcher can hold the folder.

        The lease was released when watching stopped; another watcher may have taken
        the folder over since, and then its post-actions are that watcher's to apply
        (a move must not be applied twice).
        """
        if not self.store.hold_folder(self.name, self.holder, ttl=self.lease_seconds, now=now):
            return
        try:
            self._followups(now)
        finally:
            self.store.release_folder(self.name, self.holder)

    def _release_dead_local_holder(self) -> bool:
        """Free the folder when its holder was a process of this host that no longer exists.

        A watcher restarted after a crash (kill -9, OOM) then resumes at once
        instead of waiting for its predecessor's lease to run out.
        """
        here = socket.gethostname()
        for lease in self.store.folder_holders():
            if lease["folder"] != self.name or lease["host"] != here or lease["pid"] == os.getpid():
                continue
            try:
                os.kill(lease["pid"], 0)
            except ProcessLookupError:
                log.warning("watch folder %s: its holder %s (pid %d on this host) is gone; taking over",
                            self.name, lease["holder"], lease["pid"])
                self.store.release_folder(self.name, lease["holder"])
                return True
            except OSError:  # alive, owned by another user
                return False
        return False

    def _next_delay(self, now: float) -> float:
        due = [self.next_health, self.next_followup, self.next_rescan, self.next_status, self.next_lease]
        if self.overflow_pending:
            due.append(self.next_catchup)
        if self.mode == "polling":
            due.append(self.next_poll)
        if self.detector is not None:
            candidate = self.detector.next_due()
            if candidate is not None:
                due.append(candidate)
        return max(0.0, min(due) - now)

    def _rescan(self, now: float) -> None:
        assert self.scanner is not None
        self.rescan_requested = False
        stats = self.scanner.full_scan(now)
        self.counters["rescans"] += 1
        self.last_scan = now
        self.last_scan_seconds = stats.seconds
        self.next_rescan = now + self.watch.rescan_interval
        if self.scanner.errors:
            self.warning = self.scanner.errors[-1]
            self.scanner.errors.clear()
        log.info("watch folder %s: scanned %d folders, %d acquisitions in %.2f s",
                 self.name, stats.folders, stats.candidates, stats.seconds)

    def _overflowed(self, now: float) -> None:
        """Events were lost: catch up on what may have changed, or give up events for polling."""
        assert self.scanner is not None and self.detector is not None
        horizon = time.monotonic() - OVERFLOW_WINDOW
        while self.overflow_times and self.overflow_times[0] < horizon:
            self.overflow_times.popleft()
        if len(self.overflow_times) >= OVERFLOW_LIMIT:
            self.warning = _queue_limit_message(self.root, len(self.overflow_times), OVERFLOW_WINDOW)
            log.warning("watch folder %s: %s", self.name, self.warning)
            source, self.source_obj = self.source_obj, None
            if source is not None:
                source.stop()
            self.mode = "polling"
            self.detector.trust_events = False
            self.overflow_pending = False
            self.events.clear()
            self._rescan(now)
            self.last_poll = now
            self.next_poll = now + self.watch.poll_interval
            self._publish(now, force=True)
            return
        if now < self.next_catchup:
            return
        self.overflow_pending = False
        started = time.perf_counter()
        # Added, removed and renamed entries show in their folder's mtime; files of
        # pending acquisitions are looked at directly. In-place changes to
        # acquisitions already handled are left to the periodic full rescan.
        changed = self.scanner.poll(now, since=self.last_event)
        for rel in list(self.detector.pending):
            self.detector.observe(rel, now, since=self.last_event)
        seconds = time.perf_counter() - started
        self.counters["catchups"] += 1
        self.last_catchup_seconds = seconds
        self.next_catchup = now + max(OVERFLOW_CATCHUP_MIN, 4 * seconds)
        log.info("watch folder %s: event queue overflowed; caught up (%d folders changed) in %.2f s",
                 self.name, changed, seconds)

    def _drain_events(self, now: float) -> None:
        if not self.events:
            return
        detector, scanner, rule = self.detector, self.scanner, self.detector.rule
        root = self.root
        prefix = root.rstrip("/") + "/"
        while self.events:
            event_type, src, dest, is_dir = self.events.popleft()
            self.counters["events"] += 1
            self.last_event = now
            # A move is a removal at src and an arrival at dest; other events concern src.
            for path, arrived in ((src, event_type != "moved"), (dest, True)):
                if not path:
                    continue
                if path == root:
                    if event_type == "deleted" or (event_type == "moved" and not arrived):
                        self._unhealthy(now, f"{root} was removed or moved away")
                        return
                    continue
                if not path.startswith(prefix):
                    continue
                rel = path[len(prefix):]
                if detector.patterns.parent_excluded(rel):
                    # Below an excluded folder (up to a known container): never entered, not part of an
                    # acquisition (a viewer's cache writing on must not restart its quiet period).
                    continue
                removed = event_type == "deleted" or not arrived
                cand = rule.candidate_for(rel, detector.known, is_dir)
                if cand is not None and cand in detector.known:
                    # Inside (or at) an acquisition already known: its own look decides what is
                    # in it (a known container is never filtered inside), as polling does.
                    if is_dir and removed and rel == cand:
                        detector.forget_below(rel)  # the acquisition itself went away
                    else:
                        detector.touch(cand, now)
                    continue
                # Outside every known acquisition: the scanner's rule, as polling and scans apply it.
                if removed:
                    detector.forget_below(rel)  # candidates and notes of skipped paths there
                elif is_dir and self._unreadable_dir(rel, now):
                    continue  # noted with why at once; looked at again until it can be read
                elif is_dir and event_type in ("created", "moved"):
                    # Entries inside a folder that arrives whole produce no events of their own.
                    scanner.scan_subtree(rel, now, since=None)
                elif os.path.islink(path):
                    # A link made in place (inotify does not mark it a folder): noted with the reason, never
                    # followed -- what the scan of its folder would note.
                    detector.admit(rel, now)
                    if cand is None or cand == rel:
                        continue
                    # Part of another candidate (q.czi.json -> elsewhere, the sidecar of q.czi): that one
                    # is looked at as the scan would (its look refuses the linked sidecar: a failed job).
                if cand is not None and not removed:
                    detector.touch(cand, now)
                elif cand is None and not removed and not is_dir:
                    self._note_stray(rel, now)

    def _unreadable_dir(self, rel: str, now: float) -> bool:
        """A folder outside every known acquisition that cannot be read (e.g. ``chmod 000`` in
        place): noted against that path with why, True. One that became readable again after
        such a note: looked at as new, False (issue 12 item 10; outside report b12 item 4)."""
        detector = self.detector
        assert detector is not None
        reason = unreadable_folder(os.path.join(self.root, rel))
        noted = detector.skipped.get(rel)
        if reason is not None:
            if noted is not None and noted[1] == "unreadable" and noted[2] != reason:
                del detector.skipped[rel]  # another reason now
            detector.skip(rel, "unreadable", reason, now)
            return True
        if noted is not None and noted[1] == "unreadable" and detector.refusal(rel) is None:
            self._readable_again(rel)  # (not a name it cannot handle: that stays noted)
        return False

    def _readable_again(self, rel: str) -> None:
        """A folder noted unreadable can be read now: forget the note; looked at as a new folder
        at the end of this step (:meth:`_look_again`)."""
        detector = self.detector
        assert detector is not None
        detector.skipped.pop(rel, None)
        log.info("watch folder %s: %s can be read again", self.name, printable(rel))
        self._readable_due.append(rel)

    def _look_again(self, now: float) -> None:
        """Folders readable again: looked at as new folders.

        In events mode the kernel may have refused such a folder a watch while it was
        unreadable (watchdog skips EACCES silently): the event source is started anew first,
        once for all of them (a `chmod -R` fixing many folders restarts it once), so changes
        inside them are seen from then on.
        """
        if not self._readable_due:
            return
        due, self._readable_due = self._readable_due, []
        scanner = self.scanner
        assert scanner is not None
        if self.mode == "events" and self.source_obj is not None:
            fresh = self.event_source_factory(self.root, self._sink)
            try:
                fresh.start()
            except OSError as exc:  # the old one goes on; the periodic rescan is the safety net
                log.warning("watch folder %s: could not restart its event observer: %s", self.name, exc)
            else:
                old, self.source_obj = self.source_obj, fresh
                old.stop()  # after the new one started: no change falls between the two
        for rel in due:
            scanner.scan_subtree(rel, now, since=None)

    def _recheck_unreadable(self, now: float) -> None:
        """Folders noted unreadable are looked at again every few seconds, in every mode:
        a permission fix (``chmod``) changes no folder's modification time, so polling would
        not see it, and in events mode the folder may have no watch of its own."""
        if now < self.next_unreadable_check:
            return
        detector = self.detector
        assert detector is not None
        self.next_unreadable_check = now + max(1.0, min(self.watch.quiet_period, UNREADABLE_RECHECK_SECONDS))
        for rel, (_first, kind, _reason) in list(detector.skipped.items()):
            if kind != "unreadable":
                continue
            full = os.path.join(self.root, rel)
            try:
                st = os.lstat(full)
            except (FileNotFoundError, NotADirectoryError):
                detector.skipped.pop(rel, None)  # gone
                continue
            except OSError:  # still cannot be looked at (a path too long, its parent unreadable)
                continue
            # Not a name it cannot handle (not valid UTF-8, noted unreadable too): that stays.
            if stat.S_ISDIR(st.st_mode) and unreadable_folder(full) is None and detector.refusal(rel) is None:
                self._readable_again(rel)

    def _note_stray(self, rel: str, now: float) -> None:
        """A file that is no candidate: a sidecar pair this rule does not take is listed at once."""
        detector = self.detector
        head, _, name = rel.rpartition("/")
        suffix = self.watch.sidecar_suffix
        partner = name[: -len(suffix)] if name.endswith(suffix) else name + suffix
        names = {n for n in (name, partner) if os.path.lexists(os.path.join(self.root, head, n))}
        for data_rel, reason in detector.rule.stray_sidecars(self.root, head, names):
            detector.skip(data_rel, "not_acquisition", reason, now)
        # Data where an acquisition is expected (a loose file in a layout, a manifest in a sidecar folder).
        found = detector.rule.misplaced(self.root, rel, False)
        if found is not None:
            detector.skip(*found, now)
        # A descriptor one letter case away (WATCHFOLDER.JSON, cells.czi.JSON): said, not ignored.
        if not detector.rule.reads_descriptors:
            return
        try:
            listing = os.listdir(os.path.join(self.root, head) if head else self.root)
        except OSError:
            listing = []
        for near_rel, kind, reason in detector.rule.near_misses(head, listing):
            detector.skip(near_rel, kind, reason, now)

    # -- applying outcomes ----------------------------------------------------

    def _enqueue_all(self, outcomes: list[Outcome], now: float) -> None:
        """Queue the acquisitions found complete in one step, in one store transaction.

        A share that comes back with thousands of finished acquisitions costs one
        commit per batch, not one per acquisition. If the batch cannot be recorded,
        each acquisition is tried again later (none is dropped).
        """
        if not outcomes:
            return
        detector = self.detector
        assert detector is not None
        fresh = []
        for outcome in outcomes:
            try:
                if self._held(outcome, now):
                    continue
                earlier = self._imported_already(outcome)
                if earlier is not None:
                    self._changed_after_import(outcome, earlier, now)
                    continue
            except Exception as exc:  # the store or the log failing: try again later
                log.exception("watch folder %s: could not record %s", self.name, outcome.rel)
                self._store_failed(f"could not record {outcome.rel} in the job store", exc)
                detector.settle(outcome, False, now, retry_after=STORE_RETRY_SECONDS)
                continue
            fresh.append(outcome)
        if not fresh:
            return
        outcomes = fresh
        for outcome in outcomes:
            self._remember_snapshot(outcome)
        note = f"detected in watch folder {self.name}"
        try:
            answers = self.store.enqueue_many([(o.spec, note) for o in outcomes], now=now)
        except Exception as exc:  # store busy or failing: try again, never drop the acquisition
            log.exception("watch folder %s: could not record %d acquisition(s)", self.name, len(outcomes))
            self._store_failed(f"could not record {outcomes[0].rel} and {len(outcomes) - 1} more in the job store",
                               exc)
            for outcome in outcomes:
                detector.settle(outcome, False, now, retry_after=STORE_RETRY_SECONDS)
            return
        for outcome, (job, created) in zip(outcomes, answers, strict=True):
            cand = detector.known.get(outcome.rel)
            if cand is not None:
                cand.job_id = job.id
            if created:
                self.counters["queued"] += 1
                for warning in outcome.warnings:
                    self.store.log(job.id, f"warning: {warning}", now=now)
                log.info("watch folder %s: queued job %d for %s", self.name, job.id, outcome.rel)
            detector.settle(outcome, True, now)

    def _finished_job(self, spec: Any) -> Any:
        """The finished job recorded for this acquisition as it is now (same key), or None."""
        try:
            job = self.store.find(spec.key())
        except Exception:  # the store busy: looked at again later
            return None
        return job if job is not None and job.state.finished else None

    def _remember_snapshot(self, outcome: Outcome) -> None:
        """Record in the job the detector's digest of the acquisition as queued (every name, size
        and mtime_ns under it), so a later run can tell "unchanged" from "changed after the import"."""
        cand = self.detector.known.get(outcome.rel) if self.detector else None
        if outcome.spec is not None and cand is not None and cand.digest is not None:
            outcome.spec = dataclasses.replace(outcome.spec, extra={**outcome.spec.extra,
                                                                    "snapshot": cand.digest.hex()})

    def _unchanged(self, outcome: Outcome, earlier: Any) -> bool:
        """The acquisition is exactly what ``earlier`` imported — a restart's look, not a change:
        the same inodes and mtime_ns of its files, and the same snapshot (every name, size and
        mtime_ns under it; jobs queued before snapshots were recorded: the same key)."""
        cand = self.detector.known.get(outcome.rel) if self.detector else None
        if outcome.spec is None or cand is None or cand.digest is None:
            return False
        if (outcome.spec.extra.get("identity") or {}).get("files") != (earlier.spec.extra.get("identity") or {}).get(
                "files"):
            return False
        recorded = earlier.spec.extra.get("snapshot")
        if recorded is not None:
            return recorded == cand.digest.hex()
        return outcome.spec.key() == earlier.idempotency_key

    def _receipt_only(self, outcome: Outcome, receipt: Any) -> ImportedPerReceipt | None:
        """The acquisition's receipt says it was imported by a job this database does not hold
        (restored from a backup older than that import): honoured when the receipt names this
        watch folder and acquisition, a success, the same file count and bytes, and the
        acquisition has not changed since (its inode's ctime is not after the import)."""
        if not isinstance(receipt, dict) or receipt.get("state") != str(JobState.SUCCEEDED):
            return None
        spec = outcome.spec
        if (receipt.get("watch") != self.name or receipt.get("acquisition") != outcome.rel or spec is None
                or receipt.get("files") != len(spec.files) or receipt.get("bytes") != spec.total_bytes()):
            return None
        finished = receipt.get("finished_at")
        try:
            changed = os.stat(os.path.join(self.root, outcome.rel)).st_ctime
        except OSError:
            return None
        if not isinstance(finished, (int, float)) or changed > finished + 1:
            return None
        return ImportedPerReceipt(receipt["job_id"])

    def _changed_after_import(self, outcome: Outcome, earlier: Any, now: float) -> None:
        if isinstance(earlier, ImportedPerReceipt):
            note = (f"{printable(outcome.rel)} was imported by job {earlier.id} according to its receipt, but the job "
                    "database does not know that job (restored from a backup older than the import?): not "
                    f"imported again (delete {printable(str(beside(outcome.rel, RECEIPT_SUFFIX)))} to import it again)")
            # Its log is that job's own: new jobs get ids past the highest log (SQLiteStore).
            self.store.log(earlier.id, note, now=now)
            log.warning("watch folder %s: %s", self.name, note)
            self.detector.settle(outcome, True, now)
            return
        if self._unchanged(outcome, earlier):
            cand = self.detector.known.get(outcome.rel) if self.detector else None
            if cand is not None:
                cand.job_id = earlier.id
            self.detector.settle(outcome, True, now)
            return
        # Changed in place after its import (a viewer, the OS or a user added or rewrote a
        # file): never imported again. Noted against the job that imported it, once per change:
        # the note names the state it saw (a digest of every name, size and mtime under the
        # acquisition), so a restart that finds the same state again writes nothing.
        cand = self.detector.known.get(outcome.rel) if self.detector else None
        state = f" [state {cand.digest.hex()[:12]}]" if cand is not None and cand.digest is not None else ""
        if state and state in self.store.read_log(earlier.id):
            cand.job_id = earlier.id
            self.detector.settle(outcome, True, now)
            return
        now_reads = f" (now: {outcome.reason})" if outcome.reason else ""
        self.store.log(earlier.id, f"{printable(outcome.rel)} changed after this import{now_reads}; not imported "
                       f"again (to import new data, drop it as a new acquisition){state}", now=now)
        if cand is not None:
            cand.job_id = earlier.id
        log.info("watch folder %s: %s changed after its import as job %d; ignored",
                 self.name, outcome.rel, earlier.id)
        self.detector.settle(outcome, True, now)

    def _apply(self, outcome: Outcome, now: float) -> None:
        """Record a rejected or ignored acquisition (enqueues go through :meth:`_enqueue_all`)."""
        detector = self.detector
        assert detector is not None
        try:
            earlier = self._imported_already(outcome) if outcome.kind in ("reject", "changed") else None
            if earlier is not None:
                self._changed_after_import(outcome, earlier, now)
            elif outcome.kind == "changed":  # no longer so (removed meanwhile): look again
                detector.settle(outcome, False, now, retry_after=self.watch.quiet_period)
            elif outcome.kind == "reject" and self._held(outcome, now):
                pass
            elif outcome.kind == "reject":
                # Marked so that a retry reads the acquisition from disk again (watch.redetect).
                self._remember_snapshot(outcome)
                spec = dataclasses.replace(outcome.spec, extra={**outcome.spec.extra, "rejected": True})
                job, created = self.store.reject(spec, outcome.reason, now=now)
                if created:
                    self.counters["rejected"] += 1
                    log.warning("watch folder %s: rejected %s (job %d): %s", self.name, outcome.rel, job.id,
                                outcome.reason)
                detector.settle(outcome, True, now)
            elif outcome.kind == "ignore":
                self.counters["ignored"] += 1
                log.debug("watch folder %s: ignored %s: %s", self.name, outcome.rel, outcome.reason)
        except Exception as exc:  # store busy or failing: try again, never drop the acquisition
            log.exception("watch folder %s: could not record %s", self.name, outcome.rel)
            self._store_failed(f"could not record {outcome.rel} in the job store", exc)
            detector.settle(outcome, False, now, retry_after=STORE_RETRY_SECONDS)

    def _finished_snapshots(self) -> dict[str, set[str]]:
        """Acquisition (relative path) -> the snapshots its newest failed or cancelled jobs recorded
        (at most :data:`FINISHED_AT_START` jobs of this watch folder, newest first), from the store
        at start."""
        states = [JobState.FAILED.value, JobState.CANCELLED.value]
        try:
            jobs, _ = self.store.list_jobs(states=states, source=f"watch:{self.name}", limit=FINISHED_AT_START,
                                           files=False)
        except Exception:  # the store is busy: receipts and error reports still say what was handled
            log.warning("watch folder %s: cannot read its finished jobs from the store", self.name, exc_info=True)
            return {}
        out: dict[str, set[str]] = {}
        for job in jobs:
            rel, snapshot = job.spec.extra.get("acquisition"), job.spec.extra.get("snapshot")
            if isinstance(rel, str) and isinstance(snapshot, str) and job.spec.extra.get("watch") == self.name:
                out.setdefault(rel, set()).add(snapshot)
        return out

    def _succeeded_jobs(self) -> dict[str, int]:
        """Acquisition (relative path) -> id of its newest succeeded job (:func:`imported_jobs`), from
        the store at start: what a kept acquisition whose receipt was deleted is recognised by."""
        try:
            return {rel: job.id for rel, job in imported_jobs(self.store, self.name).items()}
        except Exception:  # the store is busy: receipts still say what was imported
            log.warning("watch folder %s: cannot read its imported jobs from the store", self.name, exc_info=True)
            return {}

    def _unfinished_jobs(self) -> dict[str, int]:
        """Acquisition (relative path) -> id of its unfinished job, from the store (at start)."""
        unfinished = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRY_WAIT.value]
        try:
            jobs, _ = self.store.list_jobs(states=unfinished, source=f"watch:{self.name}", limit=1000, files=False)
        except Exception:  # the store is busy: the candidates' own job ids still hold this run's jobs
            log.warning("watch folder %s: cannot read its unfinished jobs from the store", self.name, exc_info=True)
            return {}
        out: dict[str, int] = {}
        for job in reversed(jobs):  # newest last: it wins
            rel = job.spec.extra.get("acquisition")
            if isinstance(rel, str) and job.spec.extra.get("watch") == self.name:
                out[rel] = job.id
        return out

    def _held(self, outcome: Outcome, now: float) -> bool:
        """Hold a new job for an acquisition while an earlier job of it has started and not ended.

        The acquisition changed while its job runs (files deleted or added; or the job
        waits for a retry): queueing the changed one now would import it twice, in two folders.
        The running job finds the change (a file that disappeared fails it for good,
        and removes what it wrote); once it has ended, the changed acquisition is
        looked at again -- imported if that job failed, noted if it succeeded.
        """
        detector = self.detector
        assert detector is not None
        cand = detector.known.get(outcome.rel)
        job_id = cand.job_id if cand is not None and cand.job_id is not None \
            else self._unfinished_at_start.get(outcome.rel)
        if job_id is None or outcome.spec is None:
            return False
        try:
            job = self.store.get(job_id)
        except Exception:  # JobNotFound (another database): nothing to wait for
            return False
        if job.state.finished or job.idempotency_key == outcome.spec.idempotency_key:
            self._unfinished_at_start.pop(outcome.rel, None)
            return False
        if job.state == JobState.QUEUED and job.started_at is None:
            # Not started: it has written nothing, and when it starts it finds the files it lists
            # missing or changed (failing before it copies anything), so the new job may go ahead.
            return False
        detector.settle(outcome, False, now, retry_after=max(self.watch.quiet_period, 1.0))
        if cand is not None:
            cand.waiting_kind = "waiting"
            cand.waiting = (f"changed while job {job.id} for it is {job.state}: looked at again once that job "
                            "has ended (no second job is queued meanwhile)")
        return True

    def _imported_already(self, outcome: Outcome) -> Any:
        """The succeeded job that imported this very acquisition before it changed in place, or None.

        Known from the candidate (this run), from the receipt beside the acquisition
        (after a restart), or, without a receipt, from the store's newest success for it
        (among the newest :data:`FINISHED_AT_START` of this watch folder). "This very acquisition": the same folder (device and inode)
        still holding the manifest or sidecar that job imported, or at least one of the
        files it imported, unchanged (inode and mtime). A folder removed and dropped
        again holds a new descriptor and new files: a new job.
        """
        cand = self.detector.known.get(outcome.rel) if self.detector else None
        job_id = cand.job_id if cand is not None else None
        receipt: Any = None
        if job_id is None:
            job_id, receipt = read_receipt(self.root, outcome.rel)
        from_store = False
        if not isinstance(job_id, int):
            # No receipt (deleted by someone tidying the folder): the store's newest success for
            # this acquisition, read at start, answers by the same identity rule, stricter (the
            # receipt is gone too when a folder was removed and dropped again).
            job_id, from_store = self._succeeded_at_start.get(outcome.rel), True
        if not isinstance(job_id, int):
            return None
        try:
            job = self.store.get(job_id)
        except JobNotFound:
            return self._receipt_only(outcome, receipt)
        except Exception:  # store busy: treat as new
            return None
        since = (job.finished_at or job.updated_at) if from_store else None
        return job if imported_this(job, self.name, self.root, outcome.rel, untouched_since=since) else None

    def _followups(self, now: float) -> None:
        try:
            jobs = self.store.followups(self.source, limit=100)
        except Exception as exc:
            self._store_failed("cannot read finished jobs from the store", exc)
            return
        for job in jobs:
            try:
                note = self.post.apply(job)
            except OSError as exc:
                note = f"post-action failed: {exc}; the files were left where they are"
                self.warning = f"job {job.id}: {note}"
                log.warning("watch folder %s: job %d: %s", self.name, job.id, note)
            self.counters["post_actions"] += 1
            try:
                self.store.followup_done(job.id, note, now=now)
            except Exception as exc:  # the store failing (disk full, locked): applied again next time, idempotent
                log.debug("watch folder %s: job %d: recording its post-action failed", self.name, job.id,
                          exc_info=True)
                self._store_failed("cannot record the post-actions of finished jobs in the job store", exc)
                return

    # -- status ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The latest published status (thread-safe copy)."""
        with self._lock:
            return dict(self._status)

    def _sync_pending(self, now: float) -> None:
        """Keep the store's pending list of this folder equal to the detector's (when it changed)."""
        if self.detector is None or not self.active:
            return
        rows = self.detector.pending_rows(now)
        signature = [row[:5] + row[6:7] for row in rows]  # path, kind, reason (None: writing), times, owner
        if signature == self._pending_signature:
            return
        entries = self.detector.entries_of(rows, now)
        try:
            self.store.pending_sync(self.name, entries, now=now)
        except Exception as exc:  # the next step tries again; said once per different error
            message = f"{type(exc).__name__}: {exc}"
            if message != self._pending_error:
                self._pending_error = message
                log.log(fault_level(exc), "watch folder %s: cannot record its %d pending acquisitions in the "
                        "store (%s); trying again", self.name, len(entries), message)
            return
        if self._pending_error:
            log.info("watch folder %s: pending acquisitions recorded again", self.name)
        self._pending_error = None
        self._pending_signature = signature

    def _publish(self, now: float, *, force: bool = False) -> None:
        self._sync_pending(now)
        status = self._build_status()
        if force or now >= self.next_status:
            self.next_status = now + self.status_interval
            try:
                name = self.name if self.holding or self.health != "standby" else self.standby_name
                self.store.set_component("watcher", name, status, now=now)
            except Exception:  # status is best effort; watching goes on
                log.debug("publishing the status of %s failed", self.name, exc_info=True)
        # After the store: whoever sees a status here finds it published too (other processes read the store).
        with self._lock:
            self._status = status

    def _build_status(self) -> dict[str, Any]:
        detector = self.detector
        return {
            "health": self.health,
            "folder": self.name,
            "holder": self.holder,
            "holding": self.holding,
            "mode": self.mode or None,
            "configured_mode": self.watch.mode,
            "detection": self.watch.detection,
            "path": str(self.watch.path),
            "fs_type": self.fs_type or None,
            "last_event": self.last_event,
            "last_scan": self.last_scan,
            "last_scan_seconds": self.last_scan_seconds,
            "last_catchup_seconds": self.last_catchup_seconds,
            "pending": detector.pending_count() if detector else 0,
            "pending_acquisitions": detector.pending_list() if detector else [],
            "known": len(detector.known) if detector else 0,
            "rescans": self.counters["rescans"],
            "events": self.counters["events"],
            "counters": dict(self.counters),
            "error": self.error,
            "warning": self.warning,
            "unhealthy_since": self.unhealthy_since,
            "next_restart": self.next_restart if self.health == "unhealthy" else None,
        }


def _describe_root_problem(root: str, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        return f"{root} does not exist (removed, or its share is not mounted); waiting for it to come back"
    if isinstance(exc, PermissionError):
        return f"{root}: permission denied; let the service user read it"
    return f"{root}: {exc.strerror or exc}"


class WatchService:
    """All watch folders of a config, with an alert when one stays unhealthy.

    ``notifier`` (optional) provides ``compose_watcher_alert(name, status, since)``;
    its mails go to the store's outbox once per unhealthy period.
    """

    def __init__(self, config: Config, store: Any, notifier: Any = None, **watcher_options: Any):
        self.config = config
        self.store = store
        self.notifier = notifier
        self.alert_after = config.notify.watcher_unhealthy_after
        self.watchers = [Watcher(w, store, **watcher_options) for w in config.watch]
        self._alerted: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start every watcher and the supervisor that sends unhealthy alerts."""
        for watcher in self.watchers:
            watcher.start()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="watch-service", daemon=True)
        self._thread.start()

    def finish_followups(self) -> None:
        """After the workers stopped: apply the post-actions (receipts, moves) of jobs that just ended."""
        for watcher in self.watchers:
            try:
                watcher.finish_followups(time.time())
            except Exception:  # best effort at shutdown; the next start applies what is left
                log.exception("watch folder %s: post-actions at shutdown failed", watcher.name)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        for watcher in self.watchers:
            watcher.stop(timeout)

    def _run(self) -> None:
        while not self._stop.wait(min(5.0, max(0.5, self.alert_after / 4))):
            try:
                self.loop()
            except Exception:  # alerts are best effort; keep supervising
                log.exception("watch service: supervising failed")

    def loop(self, now: float | None = None) -> list[str]:
        """Mail the admin about watchers unhealthy longer than ``notify.watcher_unhealthy_after``.

        Returns the names alerted in this step.
        """
        now = time.time() if now is None else now
        alerted = []
        for watcher in self.watchers:
            status = watcher.status()
            since = status.get("unhealthy_since")
            if status.get("health") != "unhealthy" or since is None:
                self._alerted.pop(watcher.name, None)
                continue
            if now - since < self.alert_after or self._alerted.get(watcher.name) == since:
                continue
            self._alerted[watcher.name] = since
            alerted.append(watcher.name)
            if self.notifier is None:
                log.warning("watch folder %s unhealthy since %s; no notifier to mail the admin", watcher.name, since)
                continue
            mails = self.notifier.compose_watcher_alert(watcher.name, status, since, now=now)
            if mails:
                self.store.outbox_add(mails, now=now)
        return alerted

    def status(self) -> list[dict[str, Any]]:
        return [dict(w.status(), name=w.name) for w in self.watchers]
