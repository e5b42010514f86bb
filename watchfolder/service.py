"""The service: the parts of watchfolder wired together in one process.

``watchfolder run`` hosts everything; ``work``, ``watch`` and ``serve`` host
one part each and share the data directory (and its SQLite file) with the
others on the same host.
"""

from __future__ import annotations

import dataclasses
import fcntl
import functools
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from . import defaults as D
from .backpressure import TargetGate
from .config import Config, TokenConfig
from .errors import StoreError, StoreRefused, StoreUnavailable, WatchfolderError
from .importers import create_importer
from .mail.outbox import OutboxSender
from .store import JobStore
from .store import open_store as _open_store
from .store.waiting import WaitingStore
from .worker import WorkerPool

log = logging.getLogger(__name__)

ALL_PARTS = frozenset({"workers", "watch", "server", "mail"})


@dataclass
class Parts:
    workers: bool = True
    watch: bool = True
    server: bool = True
    mail: bool = True


def make_notifier(config: Config):
    """The mail composer, or None when mail is off (``notify.transport: none``)."""
    if config.notify.transport == "none":
        return None
    from .mail.notify import Notifier

    return Notifier(config)


def open_store(config: Config, notifier=None, *, service: bool = False) -> JobStore:
    """The job store, composing mails with ``notifier`` when given (``service``: see ``store.open_store``)."""
    return _open_store(config, composer=notifier.compose if notifier else None, service=service)


def open_store_waiting(config: Config, notifier, stop: threading.Event, *, waiting: WaitingStore | None = None
                       ) -> JobStore:
    """The job store for a long-running service: while it cannot be reached, wait and retry with backoff.

    A host started before its database server (a reboot of both) then comes up
    on its own. Short commands use :func:`open_store` and fail at once instead.
    Raises :class:`StoreUnavailable` only when ``stop`` is set meanwhile, and
    :class:`StoreRefused` (a wrong database, role or password) at once, unless
    ``waiting`` (the stand-in a listening web server answers from) is given:
    then a refusal is logged (once per reason) and tried again like an outage,
    and each attempt's error goes to ``waiting.set_reason``.
    """
    delays = iter(D.RECONNECT_BACKOFF)
    refused = None
    while True:
        try:
            return open_store(config, notifier, service=True)
        except StoreUnavailable as exc:  # the store's outage log says it, once (store/outage.py)
            error: StoreError = exc
            log.debug("%s; trying again", exc)
        except StoreRefused as exc:
            if waiting is None:
                raise
            error = exc
            if str(exc) != refused:
                log.error("%s (the web server answers 503 until it is fixed; trying again)", exc)
                refused = str(exc)
        if waiting is not None:
            waiting.set_reason(error)
        if stop.wait(next(delays, D.RECONNECT_BACKOFF[-1])):
            raise StoreUnavailable(f"stopped while waiting for the store: {error}")
class DataDirLock:
    """The OS lock that lets one ``run``/``watch`` use a data directory at a time.

    ``flock(2)`` on ``<data_dir>/watch.lock``: the kernel releases it when the
    process ends in any way (kill -9 included), so a stale lock never needs
    clearing by hand. Two watchers on one data directory would queue and move
    the same acquisitions twice. Raises :class:`~watchfolder.errors.WatchfolderError`
    naming the holder (pid, host, start time) when it is taken.
    """

    def __init__(self, data_dir: Path):
        self.path = Path(data_dir) / "watch.lock"
        self._fd: int | None = None

    def acquire(self, what: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise WatchfolderError(
                f"data directory {self.path.parent} is already used by {holder}; one `watchfolder run` or "
                "`watch` per data directory: stop that one first, or give this one its own data_dir"
            ) from None
        os.ftruncate(fd, 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.pwrite(fd, f"`watchfolder {what}` (pid {os.getpid()} on {socket.gethostname()}, started {started})\n"
                  .encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


class Service:
    """Start and stop the configured parts. ``start()`` returns at once; ``stop()`` shuts down in order."""

    def __init__(
        self,
        config: Config,
        parts: Parts | None = None,
        *,
        burst: bool = False,
        name: str | None = None,
        stop: threading.Event | None = None,
    ):
        self.config = config
        self.parts = parts or Parts(server=config.server.enabled)
        self.burst = burst
        # This process's identity on a shared store: worker names NAME:w1…, the watch folder leases' holder.
        self.name = name
        for watch in config.watch:
            if watch.path.is_relative_to(config.data_dir):
                watch.path.mkdir(parents=True, exist_ok=True)
        self.notifier = make_notifier(config)
        self._stop = stop or threading.Event()
        self.store: JobStore | WaitingStore
        if self.parts.server:
            # The web server listens at once and answers 503 until the store opens (in start()).
            # A refusal (wrong database, role, password) still stops here.
            try:
                self.store = open_store(config, self.notifier, service=True)
            except StoreUnavailable as exc:
                self.store = WaitingStore(config.store.backend, config.store.display_url, exc)
        else:
            self.store = open_store_waiting(config, self.notifier, self._stop)
        self.importer = create_importer(config) if (self.parts.workers or self.parts.server) else None
        self.pool: WorkerPool | None = None
        self.gate: TargetGate | None = None
        self.dispatcher = None
        self.watch = None
        self.server = None
        self.run_token: str | None = None
        self.sender: OutboxSender | None = None
        self._stop_mail = threading.Event()
        self._lock: DataDirLock | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Start the parts; if one cannot start, stop those already running and raise."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        config = self.config
        waiting = self.store if isinstance(self.store, WaitingStore) else None
        if waiting is not None:
            # The store is not reachable yet: listen now (store-backed routes answer 503),
            # then wait for it and start the rest as usual.
            self._start_server(waiting)
            log.info("web server listening on %s; it answers 503 until the store %s is reachable",
                     self.server.url, waiting.location)
            self.store = open_store_waiting(config, self.notifier, self._stop, waiting=waiting)
        if self.parts.watch and config.store.backend == "sqlite":
            # Before anything starts: a second watcher would act on the same drops. (With
            # PostgreSQL, watchers on several hosts share folders through folder leases.)
            self._lock = DataDirLock(config.data_dir)
            self._lock.acquire("run" if self.parts.workers else "watch")
        if self.parts.workers or self.parts.mail:
            # Sinks registered before anything can queue a job: a new sink starts after the
            # newest event, so the events of this run's first jobs are its own.
            self._make_dispatcher()
        # The server first: a port in use is the likeliest start-up failure, and
        # nothing else should have started when it happens.
        if self.parts.server and self.server is None:
            self._start_server(self.store)
        if self.parts.mail and config.notify.transport != "none":
            from .mail.transports import create_transport

            transport = create_transport(config)
            if transport is not None:
                self.sender = OutboxSender(self.store, transport, hold=config.notify.claim_hold,
                                           notifier=self.notifier)
                thread = threading.Thread(target=self.sender.run, args=(self._stop_mail,), name="outbox", daemon=True)
                thread.start()
                self._threads.append(thread)
        if self.parts.watch and config.watch:
            from .watch.watcher import WatchService

            self.watch = WatchService(config, self.store, notifier=self.notifier, holder=self.name)
            self.watch.start()
        if self.dispatcher is not None:
            thread = threading.Thread(target=self.dispatcher.run, args=(self._stop_mail,), name="events",
                                      daemon=True)
            thread.start()
            self._threads.append(thread)
        if self.parts.workers:
            from .watch.dedup import find_duplicate
            from .watch.redetect import redetect

            self.gate = TargetGate.from_config(config, self.importer, self.store, alert=self._target_alert)
            self.gate.publish()
            self.pool = WorkerPool(
                self.store,
                self.importer,
                config.workers.count,
                poll_interval=config.workers.poll_interval,
                heartbeat_seconds=config.workers.heartbeat_seconds,
                gate=self.gate,
                milestones=config.events.progress_milestones,
                milestone_min_bytes=config.events.progress_min_bytes,
                redetect=functools.partial(redetect, config=config),
                duplicate_of=functools.partial(find_duplicate, config=config, store=self.store),
                name=self.name,
            )
            self.pool.start(burst=self.burst)
        if self.importer is not None:
            self.store.set_component("importer", self.importer.name, self.importer.health())
        if waiting is not None:
            waiting.attach(self.store)  # after the sinks are registered: the API may queue jobs from now on
            log.info("store %s reachable: the web server serves everything", waiting.location)

    def _start_server(self, store) -> None:
        from .web.app import create_app
        from .web.server import Server

        served = self._with_run_token(self.config)
        self.server = Server(served, create_app(served, store, self.importer))
        self.server.start()

    def _make_dispatcher(self) -> None:
        """The event dispatcher (delivers the event outbox to the sinks and prunes it), its sinks registered."""
        from .events.dispatcher import EventDispatcher
        from .events.sinks import create_sinks

        events = self.config.events
        self.dispatcher = EventDispatcher(
            self.store, create_sinks(self.config), backoff=events.retry, retention=events.retention,
            alert=self._sink_alert,
        )
        self.dispatcher.register()

    def _admin_alert(self, key: str, title: str, what: str, advice: str, status: dict, since: float) -> None:
        if self.notifier is None:
            log.warning("%s (no mail: notify.transport is none)", title)
            return
        mails = self.notifier.compose_admin_alert(key, title, what, advice, status, since)
        if mails:
            self.store.outbox_add(mails)

    def _target_alert(self, target: str, status: dict, resumed: bool) -> None:
        since = status.get("paused_since") or 0.0
        if resumed:
            self._admin_alert(
                f"target-resumed:{target}:{since}", f"Imports to {target} resumed",
                f"The importer target {target} answers again; its queued jobs are being imported.",
                "Nothing to do.", status, since)
        elif status.get("cause") == "configuration":
            self._admin_alert(
                f"target-paused:{target}:{since}", f"Imports to {target} paused: configuration error",
                f"Imports to {target} are paused: {status.get('reason')}. Every job would fail the same way, "
                "so none is tried: jobs wait in the queue and lose no attempts.",
                "Fix what the reason names (the OMERO account or the service's configuration). The service "
                "probes the target and resumes by itself once the check passes; GET /api/v1/status shows "
                "the last probe.",
                status, since)
        else:
            self._admin_alert(
                f"target-paused:{target}:{since}", f"Imports to {target} paused",
                f"Imports to {target} are paused: {status.get('reason')}. Jobs wait in the queue and "
                "lose no attempts; the service probes the target and resumes by itself.",
                "Check the server or the volume named above; GET /api/v1/status shows the last probe.",
                status, since)

    def _sink_alert(self, sink: str, row: dict) -> None:
        self._admin_alert(
            f"sink-disabled:{sink}:{row.get('disabled_at')}", f"Event sink {sink} disabled",
            f"Events could not be delivered to {sink} since {row.get('failing_since')}: "
            f"{row.get('last_error')}. It is disabled; events after {row.get('last_id')} wait in the store.",
            f"Fix the endpoint, then run `watchfolder events enable {sink}`: delivery resumes where it stopped.",
            row, row.get("failing_since") or 0.0)

    def _with_run_token(self, config: Config) -> Config:
        """With no tokens configured and a loopback address, make an admin token for this run only.

        Like Jupyter's start-up link: the person who started the service gets
        the dashboard; nothing is written to the config or the log.
        """
        if config.server.tokens or config.server.host not in ("127.0.0.1", "localhost", "::1"):
            if not config.server.tokens:
                log.warning("server.tokens is empty: the API accepts no requests; "
                            "create a token with `watchfolder token new --name NAME --role admin`")
            return config
        from .web.auth import hash_token, new_token

        token, _ = new_token("this-run-admin", "admin")
        self.run_token = token
        run_token = TokenConfig(name="this-run-admin", role="admin", hash=hash_token(token))
        return dataclasses.replace(config, server=dataclasses.replace(config.server, tokens=(run_token,)))

    def wait_workers(self) -> None:
        """Block until the worker pool ends (burst mode)."""
        if self.pool:
            self.pool.join()

    def stop(self) -> None:
        """Stop accepting work, let running jobs finish within the grace period, flush mail."""
        if self.server:
            self.server.stop()
        if self.watch:
            self.watch.stop()
        if self.pool:
            self.pool.stop(self.config.workers.shutdown_grace)
        if self.watch:
            # Jobs that finished during the grace period get their receipt (or move) now,
            # not at the next start.
            self.watch.finish_followups()
        if self.sender:
            # Mails of jobs that just finished leave now: all that are due in burst
            # mode (`work --burst` drains the outbox as it drains the queue), within
            # the grace period otherwise.
            deadline = None if self.burst else time.monotonic() + self.config.workers.shutdown_grace
            try:
                self.sender.drain(deadline=deadline)
            except Exception:
                log.exception("final outbox round failed")
        self._stop_mail.set()
        for thread in self._threads:
            thread.join(10)
        if self.importer is not None:
            self.importer.close()
        self.store.close()
        if self._lock is not None:
            self._lock.release()
