"""The HTTP server: waitress (a production-grade threaded WSGI server) around the API app.

``Server(config, app).start()`` serves in a background thread (``watchfolder run``
and tests); ``serve_forever()`` serves in the calling thread until ``stop()``
or Ctrl-C (``watchfolder serve``). Port 0 binds an ephemeral port; ``.port`` and
``.url`` tell which.
"""

from __future__ import annotations

import json
import logging
import resource
import threading
import time

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import BaseWSGIServer, create_server
from waitress.task import ErrorTask

from ..errors import ConfigError
from .seed import SEED_PREFIX

log = logging.getLogger(__name__)

# How long one poll of the server loop waits; bounds how fast stop() is noticed
# when the wake-up trigger is not available.
LOOP_TIMEOUT = 0.5


def _request_target(request) -> tuple[str, str]:
    """The method and the raw target (``/ome/import?x``) of a request waitress refused, as far as it got."""
    method = getattr(request, "command", None)
    uri = getattr(request, "request_uri", None)
    if uri is None or method is None:
        parts = (getattr(request, "first_line", b"") or b"").split()
        method = method or (parts[0].decode("latin-1") if parts else "?")
        uri = uri if uri is not None else (parts[1].decode("latin-1") if len(parts) > 1 else "")
    return method, uri


class JsonErrorTask(ErrorTask):
    """waitress's own refusals (body too large, bad request line, …) in JSON: the API's error
    shape, or the seed's ``{"reason": ...}`` under ``/ome/`` (logged there, as the seed's are)."""

    def execute(self):
        e = self.request.error
        message = f"{e.reason}: {e.body}"
        if e.code == 413:
            limit = self.channel.server.adj.max_request_body_size
            message = f"the body is larger than the limit of {limit} bytes (server.max_body_bytes)"
        method, uri = _request_target(self.request)
        if uri.startswith(SEED_PREFIX):
            log.warning("%s %s from %s refused (%d): %s", method, uri.split("?", 1)[0][:200].encode(
                "unicode_escape").decode("ascii"), _host(self.channel.addr), e.code, message)
            body = json.dumps({"reason": message}).encode()
        else:
            body = json.dumps({"error": message, "detail": None}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    """waitress's channel, with its refusals in JSON and the guards against slow clients.

    - A request's headers must be complete ``header_timeout`` seconds after its first
      byte (after the connection opened, for the first one): waitress's idle timeout
      restarts on every byte, so one header line every few seconds (slowloris) would
      hold the connection for ever.
    - The whole request, headers and body, must be complete ``body_timeout`` seconds
      after its first byte (after the connection opened, for the first one): a body
      trickled one byte every few seconds would hold it for ever too.
      :meth:`SlowClientGuard.close_slow_requests` closes both kinds.
    - One client address holds at most ``connections_per_client`` connections, and
      the server at most ``connection_limit``: a new connection past either cap
      closes the connection (of that address, or of anyone) whose request has been
      incomplete longest, then the one idle longest between requests; only when
      every other connection is running a request is the new one closed. So a quick
      request (a health check) always finds room: see :meth:`SlowClientGuard.admit`.
    """

    error_task_class = JsonErrorTask
    #: When the request being received started (time.monotonic()), None once its headers are complete.
    header_started: float | None = None
    #: When the request being received started (time.monotonic()), None once it is complete (headers
    #: and body) and between requests.
    request_started: float | None = None

    def __init__(self, server, sock, addr, adj, map=None):
        super().__init__(server, sock, addr, adj, map=map)
        self.header_started = self.request_started = time.monotonic()
        guard = getattr(server, "watchfolder_guard", None)
        if guard is not None:
            guard.admit(self)

    def received(self, data):
        now = time.monotonic()
        if self.request is None and data and self.request_started is None:
            self.header_started = self.request_started = now
        result = super().received(data)
        request = self.request
        if request is None:  # every request received so far is complete (dispatched)
            self.header_started = self.request_started = None
        else:
            if self.request_started is None:  # a pipelined request after a complete one
                self.request_started = now
            if request.headers_finished:
                self.header_started = None
            elif self.header_started is None:
                self.header_started = now
        return result


class SlowClientGuard:
    """The connection caps and the request deadlines of one waitress server (see :class:`JsonErrorChannel`).

    ``header_timeout`` and ``body_timeout`` are seconds; ``per_client`` connections per
    client address (0: no cap); ``limit`` connections in all (``server.connection_limit``).
    """

    def __init__(self, server, header_timeout: float, per_client: int, *, body_timeout: float | None = None,
                 limit: int | None = None) -> None:
        self.server = server
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.per_client = per_client
        self.limit = limit
        self._warned: dict[str, float] = {}
        original = server.maintenance

        def maintenance(now: float) -> None:
            original(now)
            self.close_slow_requests(time.monotonic())

        server.maintenance = maintenance  # waitress calls it every cleanup_interval from its loop
        if limit is not None:
            # waitress stops accepting at the limit, so that a new client waits in the backlog
            # behind every slow one; this server accepts always and makes room (admit).
            def readable() -> bool:
                now = time.time()
                if now >= server.next_channel_cleanup:
                    server.next_channel_cleanup = now + server.adj.cleanup_interval
                    server.maintenance(now)
                return bool(server.accepting)

            server.readable = readable

    def _warn(self, address: str, message: str) -> None:
        now = time.monotonic()
        if now - self._warned.get(address, -1e9) >= 60:  # once a minute per address in the log
            self._warned[address] = now
            if len(self._warned) > 10_000:
                self._warned.clear()
            log.warning("HTTP client %s: %s", address, message)

    def _channels(self) -> list:
        """Every open connection of the server's map (all its listeners)."""
        return [c for c in list(self.server._map.values()) if isinstance(c, HTTPChannel)]

    @staticmethod
    def _victim(candidates: list, new):
        """Whose connection to close for ``new``: the request incomplete longest, the idle one longest, or new."""
        incomplete = [c for c in candidates if c is not new and not c.requests
                      and getattr(c, "request_started", None) is not None]
        if incomplete:
            return min(incomplete, key=lambda c: c.request_started), "whose request has been incomplete longest"
        idle = [c for c in candidates if c is not new and not c.requests]
        if idle:
            return min(idle, key=lambda c: c.last_activity), "idle longest between requests"
        return new, "the new one (every other one is running a request)"

    def admit(self, channel: JsonErrorChannel) -> None:
        address = _host(channel.addr)
        if self.per_client:
            mine = [c for c in self._channels() if _host(c.addr) == address]
            if len(mine) > self.per_client:
                victim, which = self._victim(mine, channel)
                self._warn(address, f"more than {self.per_client} connections (server.connections_per_client); "
                                    f"closing its connection {which}" if victim is not channel else
                                    f"more than {self.per_client} connections (server.connections_per_client); "
                                    f"closing {which}")
                victim.handle_close()
                if victim is channel:
                    return
        if self.limit is not None:
            everyone = self._channels()
            if len(everyone) > self.limit:
                victim, which = self._victim(everyone, channel)
                self._warn("*", f"{len(everyone)} connections are past server.connection_limit ({self.limit}); "
                                + (f"closing {which}" if victim is channel else
                                   f"closing the connection {which} (from {_host(victim.addr)}) for a new one "
                                   f"from {address}"))
                victim.handle_close()

    def close_slow_requests(self, now: float) -> None:
        """Close each connection whose headers (``header_timeout``) or whole request (``body_timeout``) is late."""
        header_cutoff = now - self.header_timeout
        body_cutoff = None if self.body_timeout is None else now - self.body_timeout
        for channel in self._channels():
            if channel.requests:
                continue
            started = getattr(channel, "header_started", None)
            if started is not None and started < header_cutoff:
                self._warn(_host(channel.addr), f"request headers not complete after {self.header_timeout:g} s "
                                                "(server.header_timeout); connection closed")
                channel.handle_close()
                continue
            started = getattr(channel, "request_started", None)
            if body_cutoff is not None and started is not None and started < body_cutoff:
                self._warn(_host(channel.addr), f"request (headers and body) not complete after "
                                                f"{self.body_timeout:g} s (server.body_timeout); connection closed")
                channel.handle_close()


def _host(addr) -> str:
    return str(addr[0]) if isinstance(addr, (tuple, list)) and addr else str(addr)


def _raise_open_files_limit(wanted: int) -> None:
    """Raise the soft limit on open files towards ``wanted`` (never past the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit to %d (%s); server.connection_limit may not be "
                        "reached", target, exc)


def _listeners(server, channel_map: dict) -> list:
    """The waitress servers that accept connections: ``server`` itself, or each of a MultiSocketServer's."""
    if isinstance(server, BaseWSGIServer):
        return [server]
    return [d for d in channel_map.values() if isinstance(d, BaseWSGIServer)]


def split_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:8470`` for IPv6) into host and port."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"server.listen: must be HOST:PORT such as 127.0.0.1:8470, got {listen!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


class Server:
    """waitress serving ``app`` on ``config.server.listen`` (or ``listen``)."""

    def __init__(self, config, app, *, listen: str | None = None) -> None:
        self.host, requested_port = split_listen(listen or config.server.listen)
        self._map: dict = {}
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        limit = config.server.max_body_bytes
        server = config.server
        # Every connection is a descriptor; keep room for the store, logs and the children.
        _raise_open_files_limit(server.connection_limit + 512)
        try:
            self._server = create_server(
                app,
                map=self._map,
                host=self.host,
                port=requested_port,
                threads=config.server.threads,
                ident="watchfolder",
                # waitress refuses larger bodies before buffering them, in JSON (JsonErrorTask).
                max_request_body_size=limit,
                expose_tracebacks=False,
                clear_untrusted_proxy_headers=True,
                # Idle or half-open clients must not starve the others (waitress's
                # default keeps 100 connections, each for 120 s of silence).
                connection_limit=server.connection_limit,
                channel_timeout=server.idle_timeout,
                # The header and body deadlines are checked at each cleanup, so often enough to keep it.
                cleanup_interval=max(1, min(30, int(server.idle_timeout / 2), int(server.header_timeout / 3),
                                            int(server.body_timeout / 3))),
                # select() cannot watch descriptors past 1024.
                asyncore_use_poll=True,
            )
            self._server.channel_class = JsonErrorChannel
            for listener in _listeners(self._server, self._map):
                listener.channel_class = JsonErrorChannel
                listener.watchfolder_guard = SlowClientGuard(
                    listener, server.header_timeout, server.connections_per_client,
                    body_timeout=server.body_timeout, limit=server.connection_limit)
        except OSError as exc:
            raise ConfigError(
                f"server.listen: cannot listen on {self.host}:{requested_port} ({exc.strerror or exc}); "
                "pick a free port or stop what uses it"
            ) from None
        if hasattr(self._server, "effective_port"):
            self.port = int(self._server.effective_port)
        else:  # several sockets (a host name with IPv4 and IPv6 addresses)
            self.port = int(self._server.effective_listen[0][1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        if host in ("0.0.0.0", "[::]"):
            host = "127.0.0.1"
        return f"http://{host}:{self.port}"

    def _loop(self) -> None:
        try:
            while not self._stopping.is_set() and self._map:
                wasyncore.loop(timeout=LOOP_TIMEOUT, map=self._map, use_poll=True, count=1)
        finally:
            self._server.task_dispatcher.shutdown()
            wasyncore.close_all(self._map)
            self._stopped.set()

    def start(self) -> None:
        """Serve in a background thread; returns at once (the socket is already bound)."""
        if self._thread is not None:
            raise RuntimeError("server already started")
        self._thread = threading.Thread(target=self._loop, name=f"http-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving the API on %s", self.url)

    def serve_forever(self) -> None:
        """Serve in the calling thread until :meth:`stop` (from another thread) or Ctrl-C."""
        log.info("serving the API on %s", self.url)
        try:
            self._loop()
        except KeyboardInterrupt:
            pass

    def stop(self, timeout: float = 10.0) -> None:
        """Stop accepting, finish the running requests, close every connection."""
        self._stopping.set()
        trigger = getattr(self._server, "pull_trigger", None)
        if trigger is not None:
            try:
                trigger()
            except OSError:
                pass  # already closed
        if self._thread is not None:
            self._thread.join(timeout)
        else:
            self._stopped.wait(timeout)


__all__ = ["Server", "split_listen"]
