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

from waitress import wasyncore
from waitress.channel import HTTPChannel
from waitress.server import create_server
from waitress.task import ErrorTask

from ..errors import ConfigError

log = logging.getLogger(__name__)

# How long one poll of the server loop waits; bounds how fast stop() is noticed
# when the wake-up trigger is not available.
LOOP_TIMEOUT = 0.5


class JsonErrorTask(ErrorTask):
    """waitress's own refusals (body too large, bad request line, …) in the API's JSON error shape."""

    def execute(self):
        e = self.request.error
        message = f"{e.reason}: {e.body}"
        if e.code == 413:
            limit = self.channel.server.adj.max_request_body_size
            message = f"the body is larger than the limit of {limit} bytes (server.max_body_bytes)"
        body = json.dumps({"error": message, "detail": None}).encode()
        self.status = f"{e.code} {e.reason}"
        self.response_headers.append(("Content-Type", "application/json"))
        self.set_close_on_finish()
        self.content_length = len(body)
        self.write(body)


class JsonErrorChannel(HTTPChannel):
    error_task_class = JsonErrorTask


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
                cleanup_interval=max(1, min(30, int(server.idle_timeout / 2))),
                # select() cannot watch descriptors past 1024.
                asyncore_use_poll=True,
            )
            self._server.channel_class = JsonErrorChannel
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
