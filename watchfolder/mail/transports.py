"""Transports: how a composed mail leaves the outbox.

``folder`` writes each mail as an ``.eml`` file (the default, for sites without
a mail server and for the demo); ``smtp`` hands it to a mail server with
:mod:`smtplib`. Both raise :class:`~watchfolder.mail.MailError`; ``permanent``
says whether sending the same mail again can ever help.

SMTP errors are classified by where they happen:

* setting up the session (connect, greeting, EHLO/HELO, STARTTLS, AUTH) fails
  for every mail alike and is fixed by the admin, not by the mail: always
  transient, so the pending mails go out by themselves once the server or the
  config is fixed;
* MAIL FROM names the service's own address (``notify.from``): any refusal of
  it is a configuration problem of the service, not of the mail, and transient
  too (the message says what to fix) — except 552 with the SIZE the server
  announced, which says this mail is too large;
* RCPT TO and DATA: a 4xx reply is transient, a 5xx reply permanent (the
  server will refuse this mail again);
* a connection lost or timed out at any point: transient. If it is lost after
  the message data was sent but before the server's reply arrived, the server
  may have accepted the mail and a retry delivers it twice; SMTP cannot close
  that window.

Each send may be given an overall ``deadline`` (the outbox's claim on the mail
runs out after it): a timer shuts the connection down when it passes, so a
server answering slowly but steadily (each read within ``notify.smtp.timeout``)
cannot keep a send going past the claim, and DATA is never started after it.
A send cut off that way fails transiently before the server took the mail.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import smtplib
import socket
import ssl
import tempfile
import threading
import time
from email.parser import BytesHeaderParser
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any

from .. import defaults as D
from ..errors import describe_os_error
from ..filemodes import PRIVATE, FileModeError, FileModes
from ..store.base import process_exists
from ..store.space import is_disk_full
from .message import CONFIG_PROBLEM, MailError, Transport

log = logging.getLogger(__name__)


class FolderTransport(Transport):
    """Writes each mail as an RFC 5322 ``.eml`` file into ``outbox_dir``.

    The file name comes from the mail's Date and a hash of its Message-ID, so
    sending the same mail again replaces its file instead of adding a copy.
    Files are written atomically (temporary name, fsync, rename).
    """

    name = "folder"

    def __init__(self, outbox_dir: Path | str, files: FileModes = PRIVATE):
        self.outbox_dir = Path(outbox_dir)
        self.files = files

    def file_name(self, raw: bytes) -> str:
        """The file a mail is written to (stable for the same Message-ID and Date)."""
        headers = BytesHeaderParser().parsebytes(raw)
        message_id = (headers.get("Message-ID") or "").strip()
        stamp = "undated"
        try:
            if headers.get("Date"):
                stamp = parsedate_to_datetime(headers["Date"]).strftime("%Y%m%dT%H%M%S")
        except (TypeError, ValueError):
            pass
        key = message_id.encode() if message_id else raw
        return f"{stamp}-{hashlib.sha256(key).hexdigest()[:16]}.eml"

    def sweep(self, older_than: float = D.OUTBOX_TEMP_MAX_AGE, *, now: float | None = None) -> list[Path]:
        """Delete the ``.<pid>-*.eml.tmp`` files a sender killed while writing left: at once when
        that process no longer runs on this host, else once older than ``older_than`` seconds
        (a write takes milliseconds). Returns what was deleted. First brings an existing outbox
        folder to the mode of :meth:`FileModes.make_dir` (the sender sweeps at start)."""
        now = time.time() if now is None else now
        if self.outbox_dir.is_dir():  # at start: a folder made wider before (0755) is brought to its mode
            try:
                self.files.make_dir(self.outbox_dir)
            except FileModeError as exc:
                log.warning("outbox %s: %s", self.outbox_dir, exc)
        removed = []
        for tmp in self.outbox_dir.glob(".*.eml.tmp"):
            writer = tmp.name[1:].split("-", 1)[0]  # named .<pid>-…: a writer gone on this host is known at once
            try:
                if (writer.isdigit() and not process_exists(int(writer))) or now - tmp.stat().st_mtime > older_than:
                    tmp.unlink()
                    removed.append(tmp)
            except FileNotFoundError:  # another sender swept it
                continue
            except OSError as exc:
                log.warning("cannot remove the temporary mail file %s: %s", tmp, exc.strerror or exc)
        if removed:
            log.info("removed %d temporary mail file(s) left by an interrupted sender in %s",
                     len(removed), self.outbox_dir)
        return removed

    def send(self, raw: bytes, sender: str, recipients: tuple[str, ...], *, deadline: float | None = None) -> None:
        target = self.outbox_dir / self.file_name(raw)
        tmp_name = None
        try:
            self.files.make_dir(self.outbox_dir)  # mails hold names and paths: 0700 (0750 with file_group)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{os.getpid()}-", suffix=".eml.tmp", dir=self.outbox_dir)
            with os.fdopen(fd, "wb") as fh:
                self.files.secure_fd(fh.fileno(), tmp_name)  # mkstemp's 0600, or 0640 with file_group
                fh.write(raw)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, target)
            tmp_name = None
            _fsync_dir(self.outbox_dir)
        except FileModeError as exc:
            raise MailError(f"cannot write mail to {target}: {exc}") from None
        except OSError as exc:
            if is_disk_full(exc):  # not a permission problem: say so (the mail waits in the outbox)
                raise MailError(describe_os_error(exc, target, "write mail to")[1]
                                + " (notify.outbox_dir); the mail waits in the outbox until it can be written") from None
            raise MailError(
                f"cannot write mail to {target}: {exc.strerror or exc}; "
                f"check that notify.outbox_dir ({self.outbox_dir}) is writable"
            ) from None
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        log.debug("mail for %s written to %s", ", ".join(recipients), target)


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems refuse to open folders.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class SmtpTransport(Transport):
    """Sends mails to an SMTP server: plain, STARTTLS or implicit TLS, with optional AUTH.

    One connection is kept open between mails and checked (NOOP) before reuse.
    Thread-safe: sends are serialised.
    """

    name = "smtp"

    def __init__(self, config: Any):
        self.config = config
        self._conn: smtplib.SMTP | None = None
        self._lock = threading.Lock()

    @property
    def where(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    @property
    def timeout(self) -> float:  # type: ignore[override]
        return float(self.config.timeout)

    def send(self, raw: bytes, sender: str, recipients: tuple[str, ...], *, deadline: float | None = None) -> None:
        """Hand one mail to the server. ``deadline``: a ``time.monotonic()`` value the whole
        send (connecting included) must end by; past it the connection is shut down and the
        send fails transiently (:class:`MailError`, not permanent), DATA never having been
        started after it. Raises :class:`MailError` (``permanent`` only for a 5xx to RCPT TO
        of every recipient, to DATA, or a 552 size refusal at MAIL FROM)."""
        if not recipients:
            raise MailError("the mail has no recipients", permanent=True)
        # The outbox stores the From header ("watchfolder <a@b>"); the envelope wants the address.
        sender = parseaddr(sender)[1] or sender
        options = []
        if not all(a.isascii() for a in (sender, *recipients)):
            # Non-ASCII addresses need the server's SMTPUTF8 support; smtplib refuses otherwise.
            options.append("SMTPUTF8")
        with self._lock:
            guard = _Deadline(deadline)
            try:
                if guard.passed():
                    raise _DeadlinePassed()
                with guard:
                    conn = self._session(guard)
                    refused = conn.sendmail(sender, list(recipients), raw, mail_options=options)
            except _DeadlinePassed:
                self._drop()
                raise MailError(self._too_slow(guard)) from None
            except smtplib.SMTPRecipientsRefused as exc:
                replies = {rcpt: (code, _text(msg)) for rcpt, (code, msg) in exc.recipients.items()}
                permanent = all(_is_permanent(code) for code, _ in replies.values())
                detail = "; ".join(f"{rcpt}: {code} {msg}" for rcpt, (code, msg) in replies.items())
                raise MailError(f"SMTP server {self.where} refused every recipient: {detail}",
                                permanent=permanent) from None
            except smtplib.SMTPSenderRefused as exc:
                raise self._sender_refused(exc, sender, len(raw)) from None
            except smtplib.SMTPNotSupportedError as exc:
                raise MailError(
                    f"SMTP server {self.where} cannot take this mail: {exc} "
                    "(a non-ASCII address needs a server with SMTPUTF8)",
                    permanent=True,
                ) from None
            except smtplib.SMTPHeloError as exc:  # the session's greeting, not the mail
                self._drop()
                raise MailError(
                    f"SMTP server {self.where} refused the session: {exc.smtp_code} {_text(exc.smtp_error)}"
                ) from None
            except smtplib.SMTPResponseException as exc:  # SMTPDataError and other replies
                if guard.cut:
                    self._drop()
                    raise MailError(self._too_slow(guard)) from None
                raise MailError(
                    f"SMTP server {self.where} refused the mail: {exc.smtp_code} {_text(exc.smtp_error)}",
                    permanent=_is_permanent(exc.smtp_code),
                ) from None
            except (smtplib.SMTPException, OSError) as exc:
                self._drop()
                if guard.cut:
                    raise MailError(self._too_slow(guard)) from None
                raise MailError(
                    f"connection to SMTP server {self.where} lost while sending: {_describe(exc)}"
                ) from None
            except MailError as exc:  # from _connect: a session problem, already described
                if guard.cut and not exc.permanent:
                    raise MailError(self._too_slow(guard)) from None
                raise
        if refused:
            # The server took the mail for the other recipients: sending it again would
            # duplicate it for them, so this counts as sent, with a warning.
            detail = "; ".join(f"{rcpt}: {code} {_text(msg)}" for rcpt, (code, msg) in refused.items())
            log.warning("SMTP server %s accepted the mail but refused some recipients: %s", self.where, detail)
        log.debug("mail for %s accepted by %s", ", ".join(recipients), self.where)

    def _too_slow(self, guard: _Deadline) -> str:
        return (f"SMTP server {self.where} too slow: the exchange did not end within the "
                f"{guard.budget:.3g} s left to this send (a batch of sends ends within half of "
                "notify.claim_hold, so no other sender claims its mails meanwhile); cut off before "
                "the server took the mail, which is sent again later")

    def _sender_refused(self, exc: smtplib.SMTPSenderRefused, sender: str, size: int) -> MailError:
        """A refusal at MAIL FROM: the service's config (notify.from, AUTH, TLS), so transient —
        the mails go out by themselves once the admin fixed it; only 552 to the SIZE smtplib
        announced is about this mail (too large) and permanent."""
        code, text = exc.smtp_code, _text(exc.smtp_error)
        if code == 530:
            # RFC 4954/3207: the session lacks AUTH or TLS. The config is at fault, not the mail.
            return MailError(
                f"{CONFIG_PROBLEM}SMTP server {self.where} requires authentication or TLS first: "
                f"{code} {text}; set notify.smtp.security and username/password"
            )
        if code == 552 and self._conn is not None and self._conn.has_extn("size"):
            return MailError(f"SMTP server {self.where} refused the mail as too large ({size} bytes): {code} {text}",
                             permanent=True)
        return MailError(
            f"{CONFIG_PROBLEM}SMTP server {self.where} refused the sender address {sender}: {code} {text}; "
            "set notify.from to an address this server accepts from this service (or its login) — "
            "the pending mails then go out by themselves"
        )

    def _session(self, guard: _Deadline | None = None) -> smtplib.SMTP:
        """An open, authenticated connection: the kept one if it still answers, else a new one.
        ``guard`` learns each connection before it is read from, to cut it off at its deadline."""
        guard = guard or _Deadline(None)
        if self._conn is not None:
            guard.watch(self._conn)
            try:
                code, _ = self._conn.noop()
                if code == 250:
                    return self._conn
            except (smtplib.SMTPException, OSError):
                pass
            self._drop()
        self._conn = self._connect(guard)
        return self._conn

    def _tls_context(self) -> ssl.SSLContext:
        cfg = self.config
        context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        if not cfg.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def _connect(self, guard: _Deadline) -> smtplib.SMTP:
        cfg = self.config
        conn: smtplib.SMTP | None = None
        try:
            # Made unconnected, so the guard knows it before the greeting is read.
            if cfg.security == "ssl":
                conn = _GuardedSMTP_SSL(timeout=cfg.timeout, context=self._tls_context())
            else:
                conn = _GuardedSMTP(timeout=cfg.timeout)
            conn._host = cfg.host  # what connect() would set first; TLS checks the name against it
            guard.watch(conn)
            code, greeting = conn.connect(cfg.host, cfg.port)
            if code != 220:  # what SMTP(host, port) checks
                raise smtplib.SMTPConnectError(code, greeting)
            conn.ehlo_or_helo_if_needed()
            if cfg.security == "starttls":
                if not conn.has_extn("starttls"):
                    raise MailError(
                        f"{CONFIG_PROBLEM}SMTP server {self.where} does not offer STARTTLS; "
                        "set notify.smtp.security to ssl (and the port) or none"
                    )
                conn.starttls(context=self._tls_context())
                conn.ehlo()
            if cfg.username:
                password = cfg.password.reveal() if cfg.password is not None else ""
                _login(conn, cfg.username, password)
            return conn
        except MailError:
            _close_quietly(conn)
            raise
        except ssl.SSLCertVerificationError as exc:
            _close_quietly(conn)
            raise MailError(
                f"{CONFIG_PROBLEM}TLS certificate of SMTP server {self.where} not trusted ({exc.verify_message}); "
                "set notify.smtp.ca_file to the CA that signed it, or verify_tls: false for a test server"
            ) from None
        except smtplib.SMTPAuthenticationError as exc:
            _close_quietly(conn)
            raise MailError(
                f"{CONFIG_PROBLEM}SMTP server {self.where} refused the login of user {cfg.username!r}: "
                f"{exc.smtp_code} {_text(exc.smtp_error)}; check notify.smtp.username and password"
            ) from None
        except smtplib.SMTPNotSupportedError as exc:
            _close_quietly(conn)
            raise MailError(
                f"{CONFIG_PROBLEM}SMTP server {self.where}: {exc}; it offers no AUTH on this connection "
                "(many servers offer it only after STARTTLS: set notify.smtp.security)"
            ) from None
        except smtplib.SMTPResponseException as exc:  # greeting, HELO, STARTTLS refused
            _close_quietly(conn)
            raise MailError(
                f"SMTP server {self.where} refused the session: {exc.smtp_code} {_text(exc.smtp_error)}"
            ) from None
        except (smtplib.SMTPException, OSError) as exc:
            _close_quietly(conn)
            raise MailError(
                f"cannot connect to SMTP server {self.where}: {_describe(exc)}; "
                "check notify.smtp.host, port and security, and that the server runs"
            ) from None

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        _close_quietly(conn)

    def close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            try:
                conn.quit()
            except (smtplib.SMTPException, OSError):
                _close_quietly(conn)


class _DeadlinePassed(Exception):
    """The send's deadline passed before DATA: nothing was handed over."""


class _Deadline:
    """The overall deadline of one send (a ``time.monotonic()`` value, or None: none).

    Within ``with``, a timer shuts the watched connection's socket down when the deadline
    passes: a read blocked on a server that trickles its reply then fails at once (the
    per-read ``notify.smtp.timeout`` never fires while bytes keep coming). ``cut`` says
    it did; :class:`_GuardedSMTP` refuses to start DATA once it passed.
    """

    def __init__(self, deadline: float | None):
        self.deadline = deadline
        self.budget = max(0.0, deadline - time.monotonic()) if deadline is not None else float("inf")
        self.cut = False
        self._conn: smtplib.SMTP | None = None
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def passed(self) -> bool:
        return self.deadline is not None and time.monotonic() >= self.deadline

    def watch(self, conn: smtplib.SMTP) -> None:
        with self._lock:
            self._conn = conn
            conn._wf_guard = self  # type: ignore[attr-defined]
            if self.cut:
                _shut(conn)

    def _fire(self) -> None:
        with self._lock:
            self.cut = True
            if self._conn is not None:
                _shut(self._conn)

    def __enter__(self) -> _Deadline:
        if self.deadline is not None:
            self._timer = threading.Timer(max(0.0, self.deadline - time.monotonic()), self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        with self._lock:
            if self._conn is not None:
                self._conn._wf_guard = None  # type: ignore[attr-defined]
            self._conn = None


def _shut(conn: smtplib.SMTP) -> None:
    sock = conn.sock
    if sock is None:
        return
    try:  # the plain socket's shutdown, also for TLS: SSLSocket.shutdown would drop its state under a reader
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _GuardMixin:
    """Never starts DATA after the send's deadline (e.g. the process was stopped meanwhile)."""

    _wf_guard: _Deadline | None = None

    def data(self, msg):  # type: ignore[no-untyped-def]
        if self._wf_guard is not None and self._wf_guard.passed():
            raise _DeadlinePassed()
        return super().data(msg)  # type: ignore[misc]


class _GuardedSMTP(_GuardMixin, smtplib.SMTP):
    pass


class _GuardedSMTP_SSL(_GuardMixin, smtplib.SMTP_SSL):
    pass


def _login(conn: smtplib.SMTP, user: str, password: str) -> None:
    if (user + password).isascii():
        conn.login(user, password)
        return
    # smtplib encodes credentials as ASCII and fails on any other character; RFC 4616
    # AUTH PLAIN carries UTF-8, so non-ASCII credentials go that way, by hand.
    if not conn.has_extn("auth"):
        raise smtplib.SMTPNotSupportedError("SMTP AUTH extension not supported by server.")
    mechanisms = conn.esmtp_features["auth"].upper().split()
    if "PLAIN" not in mechanisms:
        raise MailError(
            f"the SMTP server offers AUTH {' '.join(mechanisms)} but not PLAIN, the only mechanism "
            "that carries a non-ASCII username or password; use an ASCII password"
        )
    token = base64.b64encode(f"\0{user}\0{password}".encode()).decode("ascii")
    code, reply = conn.docmd("AUTH", "PLAIN " + token)
    if code != 235:
        raise smtplib.SMTPAuthenticationError(code, reply)


def _close_quietly(conn: smtplib.SMTP | None) -> None:
    if conn is None:
        return
    try:
        conn.close()
    except OSError:
        pass


def _is_permanent(code: int) -> bool:
    return 500 <= code < 600


def _text(reply: bytes | str) -> str:
    if isinstance(reply, bytes):
        return reply.decode("utf-8", "replace")
    return str(reply)


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def create_transport(config: Any) -> Transport | None:
    """The transport named by ``notify.transport``; ``None`` for ``none`` (mails stay in the outbox)."""
    notify = config.notify
    if notify.transport == "folder":
        return FolderTransport(notify.outbox_dir, FileModes.for_group(config.file_group))
    if notify.transport == "smtp":
        return SmtpTransport(notify.smtp)
    if notify.transport == "none":
        return None
    raise ValueError(f"notify.transport: unknown transport {notify.transport!r}; use folder, smtp or none")
