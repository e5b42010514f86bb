"""Issue 10 (second round), finding F: slow clients (slowloris) do not take the service down.

Real HTTP on loopback against the real waitress server. A bounded version of the
finding: a few hundred connections trickling header lines, against a connection
limit set below them (the finding: 1,100 against 1,000). The full load is
``bench/bench_slowloris.py``.
"""

from __future__ import annotations

import resource
import socket
import threading
import time

import pytest
from api_support import start_service, stop_service

HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def health_answers_within(port: int, seconds: float) -> bool:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=seconds) as s:
        s.sendall(HEALTH)
        answer = s.recv(64)
    return answer.startswith(b"HTTP/1.1 200 ") and time.monotonic() - started < seconds


def read_response(s: socket.socket) -> bytes:
    """One whole response (headers and a Content-Length body) from a keep-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += s.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_peer(s: socket.socket) -> bool:
    try:
        s.setblocking(False)
        return s.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        s.setblocking(True)


@pytest.fixture
def files_limit():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"needs 2048 open files (this process may have {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))


def trickle(s: socket.socket, payload: bytes, limit: float = 20.0) -> tuple[bool, float]:
    """Send ``payload`` every 0.25 s until the server closes the connection or ``limit``
    seconds pass; close it. Returns (closed by the server, seconds waited)."""
    started = time.monotonic()
    tick = threading.Event()
    closed = False
    while time.monotonic() - started < limit:
        try:
            s.sendall(payload)
        except OSError:
            closed = True
            break
        if closed_by_peer(s):
            closed = True
            break
        tick.wait(0.25)
    waited = time.monotonic() - started
    s.close()
    return closed, waited


def test_headers_trickled_past_the_deadline_close_the_connection(tmp_path):
    service = start_service(tmp_path, extra_server={"header_timeout": 2})
    try:
        s = socket.create_connection(("127.0.0.1", service.server.port), timeout=5)
        s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
        # A byte now and then: waitress's idle timeout never fires.
        closed, waited = trickle(s, b"X-Slow: 1\r\n")
        assert closed, "a client trickling header lines kept its connection for 20 s"
        assert waited >= 1.5, waited
    finally:
        stop_service(service)


def test_a_complete_request_is_not_cut_by_the_deadline(tmp_path):
    service = start_service(tmp_path, extra_server={"header_timeout": 1})
    try:
        with socket.create_connection(("127.0.0.1", service.server.port), timeout=5) as s:
            for request in range(3):  # keep-alive: idle between requests is not "slow headers"
                s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(s).startswith(b"HTTP/1.1 200 ")
                threading.Event().wait(1.5 if request == 0 else 0)
    finally:
        stop_service(service)


def test_hundreds_of_trickling_connections_from_one_address_do_not_stop_health(tmp_path, files_limit):
    # The connection limit below the load, as in the finding (1,100 against 1,000), scaled down.
    service = start_service(tmp_path, extra_server={"connection_limit": 200, "connections_per_client": 50,
                                                    "header_timeout": 60})
    slow = []
    try:
        for _ in range(300):
            s = socket.create_connection(("127.0.0.1", service.server.port), timeout=5)
            try:
                s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")
            except OSError:
                pass  # already closed by the cap
            slow.append(s)
        for s in slow:  # one more header line each, as slowloris does
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                pass
        assert health_answers_within(service.server.port, 1.0)
        open_ones = [s for s in slow if not closed_by_peer(s)]
        assert len(open_ones) <= 51, len(open_ones)
    finally:
        for s in slow:
            s.close()
        stop_service(service)


SLOW_BODY = (b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
             b"Content-Length: 1000000\r\n\r\n{")


def connect_from(source: str, port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(5)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def health_from(source: str, port: int, seconds: float) -> bytes:
    """The first bytes of /health's answer to a new connection from ``source`` (b"" if none in time)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(seconds)
    try:
        s.bind((source, 0))
        s.connect(("127.0.0.1", port))
        s.sendall(HEALTH)
        return s.recv(64)
    except OSError:
        return b""
    finally:
        s.close()


@pytest.mark.parametrize("first", ["first request", "after a complete request"])
def test_a_body_trickled_past_the_deadline_closes_the_connection(tmp_path, first):
    # Headers complete at once, then one body byte every 0.25 s: neither header_timeout nor
    # idle_timeout ever fires; body_timeout (the whole request) does (issue 10 outside test a10 F1),
    # also on a keep-alive connection that completed a request before.
    service = start_service(tmp_path, extra_server={"header_timeout": 60, "body_timeout": 2})
    try:
        s = socket.create_connection(("127.0.0.1", service.server.port), timeout=5)
        if first != "first request":
            s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).startswith(b"HTTP/1.1 200 ")
            threading.Event().wait(2.5)  # longer than body_timeout: idle between requests does not count
        s.sendall(SLOW_BODY)
        closed, waited = trickle(s, b" ")
        assert closed, "a client trickling its body kept its connection for 20 s"
        assert waited >= 1.5, waited
    finally:
        stop_service(service)


@pytest.mark.parametrize("kind", ["slow body", "idle"])
def test_slow_connections_from_many_addresses_do_not_stop_health(tmp_path, files_limit, kind):
    # a10 F1, scaled down: 6 addresses x 45 connections, each address below connections_per_client,
    # all of them above connection_limit; deadlines far away, so only making room can serve /health.
    service = start_service(tmp_path, extra_server={"connection_limit": 200, "connections_per_client": 50,
                                                    "header_timeout": 120, "body_timeout": 120,
                                                    "idle_timeout": 120})
    port = service.server.port
    slow = []
    try:
        for address in range(1, 7):
            for _ in range(45):
                try:
                    s = connect_from(f"127.0.1.{address}", port)
                    if kind == "slow body":
                        s.sendall(SLOW_BODY)
                except OSError:
                    continue  # closed already to make room: what the guard does
                slow.append(s)
        for s in slow:  # one more byte each, as a trickling client does
            try:
                s.sendall(b" " if kind == "slow body" else b"")
            except OSError:
                pass
        answers = [health_from("127.0.2.200", port, 1.0) for _ in range(3)]
        assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers), answers
        open_ones = [s for s in slow if not closed_by_peer(s)]
        assert len(open_ones) < 200, len(open_ones)
    finally:
        for s in slow:
            s.close()
        stop_service(service)
