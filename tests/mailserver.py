"""A real SMTP server for the tests: aiosmtpd on an ephemeral port, recording what it receives."""

from __future__ import annotations

import email
import email.policy
import shutil
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    raw: bytes
    tls: bool = False
    authenticated: bool = False

    @property
    def message(self) -> EmailMessage:
        return email.message_from_bytes(self.raw, policy=email.policy.default)  # type: ignore[return-value]

    def text(self) -> str:
        return self.message.get_body(("plain",)).get_content().replace("\r\n", "\n")

    def html(self) -> str:
        return self.message.get_body(("html",)).get_content().replace("\r\n", "\n")


@dataclass
class Recorder:
    """aiosmtpd handler: stores each accepted mail; replies can be scripted per recipient or for DATA."""

    received: list[Received] = field(default_factory=list)
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        reply = self.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        if self.data_reply:
            return self.data_reply
        with self.arrived:
            self.received.append(
                Received(
                    envelope.mail_from,
                    list(envelope.rcpt_tos),
                    envelope.original_content,
                    # session.ssl covers STARTTLS; the transport's ssl_object covers implicit TLS.
                    tls=session.ssl is not None or server.transport.get_extra_info("ssl_object") is not None,
                    authenticated=bool(session.authenticated),
                )
            )
            self.arrived.notify_all()
        return "250 Message accepted for delivery"

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        """Block until ``count`` mails have arrived (the server thread records them)."""
        deadline = time.monotonic() + timeout
        with self.arrived:
            while len(self.received) < count:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"expected {count} mails, got {len(self.received)}")
                self.arrived.wait(left)
            return list(self.received)


class EphemeralController(Controller):
    """aiosmtpd's Controller, but listening on a port the OS picks (``port=0``)."""

    def __init__(self, handler, port: int = 0, **kwargs):
        super().__init__(handler, hostname="127.0.0.1", port=port, **kwargs)

    def _trigger_server(self):
        # Runs after the listening socket exists: learn the port before the base class connects.
        if self.port == 0:
            self.port = self.server.sockets[0].getsockname()[1]
        super()._trigger_server()


class Credentials:
    """aiosmtpd authenticator accepting one user/password pair (PLAIN and LOGIN)."""

    def __init__(self, user: str, password: str):
        self.user = user.encode()
        self.password = password.encode()
        self.attempts: list[tuple[str, bytes]] = []

    def __call__(self, server, session, envelope, mechanism, auth_data):
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        self.attempts.append((mechanism, auth_data.login))
        ok = auth_data.login == self.user and auth_data.password == self.password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


def self_signed_certificate(folder: Path) -> tuple[Path, Path]:
    """A certificate for localhost/127.0.0.1 and its key, made with the openssl command."""
    openssl = shutil.which("openssl")
    if openssl is None:  # pragma: no cover - openssl is part of the base image here
        raise RuntimeError("the openssl command is needed to make a test certificate")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
            "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


class ScriptedSmtpServer:
    """A raw SMTP server on an ephemeral port whose replies are scripted per command.

    ``replies``: verb (``"EHLO"``, ``"MAIL"``, ``"RCPT"``, ``"DATA"``, ...) → the reply line
    sent instead of the usual one (``"553 5.7.1 sender address rejected"``). ``trickle``:
    verb → seconds between the bytes of its (usual) reply, for the first
    ``trickle_connections`` connections only: a server slow but alive, each byte well within
    the client's read timeout. ``ssl_context``: implicit TLS. ``received`` holds the message data of each accepted DATA.
    """

    def __init__(self, *, replies: dict[str, str] | None = None, trickle: dict[str, float] | None = None,
                 trickle_connections: int = 1, extensions: tuple[str, ...] = ("8BITMIME",),
                 ssl_context: ssl.SSLContext | None = None):
        import socketserver

        self.replies = dict(replies or {})
        self.trickle = dict(trickle or {})
        self.trickle_connections = trickle_connections
        self.extensions = extensions
        self.received: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                with outer._lock:
                    outer.connections += 1
                    number = outer.connections
                try:
                    if ssl_context is None:
                        outer._session(self.rfile, self.connection, number)
                        return
                    with ssl_context.wrap_socket(self.connection, server_side=True) as tls:  # implicit TLS
                        outer._session(tls.makefile("rb"), tls, number)
                except OSError:  # the client cut the connection
                    pass

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> ScriptedSmtpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _reply(self, sock, verb: str, usual: str, number: int) -> None:
        line = (self.replies.get(verb) or usual) + "\r\n"
        delay = self.trickle.get(verb) if number <= self.trickle_connections else None
        if not delay:
            sock.sendall(line.encode())
            return
        for byte in line.encode():
            sock.sendall(bytes([byte]))
            time.sleep(delay)

    def _session(self, rfile, sock, number: int) -> None:
        self._reply(sock, "GREETING", "220 scripted ESMTP", number)
        while True:
            line = rfile.readline()
            if not line:
                return
            verb = line.split(b" ", 1)[0].strip().decode("ascii", "replace").upper()
            if verb == "EHLO":
                if verb in self.replies:
                    self._reply(sock, verb, "", number)
                    continue
                lines = ["localhost", *self.extensions]
                sock.sendall("".join(f"250{'-' if i < len(lines) - 1 else ' '}{x}\r\n"
                                     for i, x in enumerate(lines)).encode())
            elif verb == "DATA":
                if verb in self.replies:
                    self._reply(sock, verb, "", number)
                    continue
                sock.sendall(b"354 go ahead\r\n")
                data = bytearray()
                while True:
                    chunk = rfile.readline()
                    if not chunk:
                        return
                    if chunk == b".\r\n":
                        break
                    data += chunk
                with self._lock:
                    self.received.append(bytes(data))
                self._reply(sock, "DATA-END", "250 2.0.0 queued", number)
            elif verb == "QUIT":
                sock.sendall(b"221 bye\r\n")
                return
            else:
                self._reply(sock, verb, {"STARTTLS": "454 TLS not available", "AUTH": "504 no such mechanism"}
                            .get(verb, "250 2.0.0 OK"), number)
