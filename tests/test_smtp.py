"""The mail transports against a real SMTP server (aiosmtpd) and a real folder."""

from __future__ import annotations

import email
import email.policy
import logging
import socket
import time
from email.message import EmailMessage
from pathlib import Path

import pytest
from mailserver import (
    Credentials,
    EphemeralController,
    Recorder,
    ScriptedSmtpServer,
    self_signed_certificate,
    server_tls_context,
)

from watchfolder import config as wconfig
from watchfolder.config import Secret, SmtpConfig
from watchfolder.mail.message import MailError
from watchfolder.mail.transports import FolderTransport, SmtpTransport, create_transport

PASSWORD = "s3cret-Pässword"


def make_raw(subject: str = "Hello", to: str = "jdoe@example.org", message_id: str = "<m1@example.org>") -> bytes:
    msg = EmailMessage()
    msg["Subject"] = subject
    msg["From"] = "watchfolder@example.org"
    msg["To"] = to
    msg["Date"] = "Sat, 28 Nov 2026 14:13:49 +0000"
    msg["Message-ID"] = message_id
    msg.set_content("Body ✓\n", cte="quoted-printable")
    return msg.as_bytes(policy=email.policy.SMTP)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    return self_signed_certificate(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def serve(recorder):
    """Start an aiosmtpd server with the given options; stopped at the end of the test."""
    started = []

    def start(**kwargs) -> EphemeralController:
        controller = EphemeralController(recorder, **kwargs)
        controller.start()
        started.append(controller)
        return controller

    yield start
    for controller in started:
        if controller._thread is not None:
            controller.stop()


@pytest.fixture
def transports():
    made = []

    def make(**kwargs) -> SmtpTransport:
        kwargs.setdefault("host", "127.0.0.1")
        kwargs.setdefault("timeout", 10.0)
        transport = SmtpTransport(SmtpConfig(**kwargs))
        made.append(transport)
        return transport

    yield make
    for transport in made:
        transport.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------- plain


def test_plain_delivery_keeps_bytes_and_envelope(serve, recorder, transports):
    server = serve()
    transport = transports(port=server.port)
    raw = make_raw()
    transport.send(raw, "watchfolder@example.org", ("jdoe@example.org", "pi@example.org"))
    (got,) = recorder.wait_for(1)
    assert got.mail_from == "watchfolder@example.org"
    assert got.rcpt_tos == ["jdoe@example.org", "pi@example.org"]
    assert got.message["Message-ID"] == "<m1@example.org>"
    assert got.text() == "Body ✓\n"
    assert not got.tls


def test_envelope_sender_is_the_address_of_a_from_header(serve, recorder, transports):
    server = serve()
    transports(port=server.port).send(make_raw(), "watchfolder <w@example.org>", ("a@example.org",))
    assert recorder.wait_for(1)[0].mail_from == "w@example.org"


def test_kept_connection_is_replaced_when_the_server_restarts(serve, recorder, transports):
    server = serve()
    port = server.port
    transport = transports(port=port)
    transport.send(make_raw(message_id="<a@x>"), "w@example.org", ("a@example.org",))
    server.stop()
    serve(port=port)  # same port, new server: the kept connection is dead
    transport.send(make_raw(message_id="<b@x>"), "w@example.org", ("a@example.org",))
    got = recorder.wait_for(2)
    assert [r.message["Message-ID"] for r in got] == ["<a@x>", "<b@x>"]


def test_server_down_is_transient_and_names_the_server(transports):
    port = free_port()
    transport = transports(port=port)
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert not err.value.permanent
    assert f"127.0.0.1:{port}" in str(err.value)
    assert "notify.smtp.host" in str(err.value)


# ----------------------------------------------------------------------- TLS


def test_starttls_with_self_signed_certificate_trusted_by_ca_file(serve, recorder, transports, certificate):
    cert, key = certificate
    server = serve(tls_context=server_tls_context(cert, key), require_starttls=True)
    transport = transports(port=server.port, security="starttls", ca_file=cert)
    transport.send(make_raw(), "w@example.org", ("a@example.org",))
    (got,) = recorder.wait_for(1)
    assert got.tls


def test_starttls_refuses_an_untrusted_certificate(serve, recorder, transports, certificate):
    cert, key = certificate
    server = serve(tls_context=server_tls_context(cert, key), require_starttls=True)
    transport = transports(port=server.port, security="starttls")
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert not err.value.permanent
    assert "not trusted" in str(err.value) and "ca_file" in str(err.value)
    assert recorder.received == []


def test_starttls_without_verification_when_configured(serve, recorder, transports, certificate):
    cert, key = certificate
    server = serve(tls_context=server_tls_context(cert, key), require_starttls=True)
    transport = transports(port=server.port, security="starttls", verify_tls=False)
    transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert recorder.wait_for(1)[0].tls


def test_plain_client_against_server_requiring_starttls_is_a_config_problem(serve, recorder, transports, certificate):
    cert, key = certificate
    server = serve(tls_context=server_tls_context(cert, key), require_starttls=True)
    transport = transports(port=server.port, security="none")
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    # 530 is about the session, not this mail: it must stay pending until the config is fixed.
    assert not err.value.permanent
    assert "530" in str(err.value) and "notify.smtp.security" in str(err.value)


def test_starttls_requested_but_not_offered(serve, transports):
    server = serve()
    transport = transports(port=server.port, security="starttls")
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert not err.value.permanent
    assert "does not offer STARTTLS" in str(err.value)


def test_implicit_tls(serve, recorder, transports, certificate):
    cert, key = certificate
    server = serve(ssl_context=server_tls_context(cert, key))
    transport = transports(port=server.port, security="ssl", ca_file=cert)
    transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert recorder.wait_for(1)[0].tls


# ---------------------------------------------------------------------- AUTH


@pytest.fixture
def auth_server(serve, certificate):
    cert, key = certificate
    credentials = Credentials("mailer", PASSWORD)
    server = serve(
        tls_context=server_tls_context(cert, key),
        require_starttls=True,
        authenticator=credentials,
        auth_required=True,
        auth_require_tls=True,
    )
    return server, credentials, cert


@pytest.mark.parametrize("password", [PASSWORD, "plain-ascii-pw"], ids=["utf8", "ascii"])
def test_auth_over_starttls(auth_server, recorder, transports, password):
    server, credentials, cert = auth_server
    credentials.password = password.encode()
    transport = transports(
        port=server.port, security="starttls", ca_file=cert,
        username="mailer", password=Secret(password, "test"),
    )
    transport.send(make_raw(), "w@example.org", ("a@example.org",))
    (got,) = recorder.wait_for(1)
    assert got.tls and got.authenticated
    assert credentials.attempts[-1][1] == b"mailer"
    assert credentials.attempts[-1][0] in ("PLAIN", "LOGIN")


def test_wrong_password_is_reported_without_the_password(auth_server, recorder, transports, caplog):
    server, _, cert = auth_server
    wrong = "wrong-Pässword-42"
    transport = transports(
        port=server.port, security="starttls", ca_file=cert,
        username="mailer", password=Secret(wrong, "test"),
    )
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    message = str(err.value)
    assert "'mailer'" in message and "535" in message
    assert not err.value.permanent  # the login is the service's problem: keep the mail pending
    assert wrong not in message and wrong not in caplog.text
    assert recorder.received == []


def test_auth_is_not_offered_before_tls(auth_server, transports):
    server, _, _ = auth_server
    transport = transports(port=server.port, security="none", username="mailer", password=Secret(PASSWORD, "t"))
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert not err.value.permanent
    assert "STARTTLS" in str(err.value)
    assert PASSWORD not in str(err.value)


# ---------------------------------------------------------- classification


@pytest.mark.parametrize(
    "reply, permanent",
    [("450 4.2.1 Mailbox busy, try later", False), ("550 5.1.1 No such user here", True)],
)
def test_recipient_refused_4xx_transient_5xx_permanent(serve, recorder, transports, reply, permanent):
    recorder.rcpt_replies["gone@example.org"] = reply
    server = serve()
    transport = transports(port=server.port)
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("gone@example.org",))
    assert err.value.permanent is permanent
    assert reply in str(err.value)  # the server's own words reach the admin
    assert "gone@example.org" in str(err.value)
    # The connection stays usable for the next mail.
    transport.send(make_raw(), "w@example.org", ("ok@example.org",))
    assert recorder.wait_for(1)[0].rcpt_tos == ["ok@example.org"]


@pytest.mark.parametrize(
    "reply, permanent",
    [("451 4.3.0 Temporary local problem", False), ("554 5.6.0 Message content rejected", True)],
)
def test_data_refused_4xx_transient_5xx_permanent(serve, recorder, transports, reply, permanent):
    recorder.data_reply = reply
    server = serve()
    transport = transports(port=server.port)
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert err.value.permanent is permanent
    assert reply in str(err.value)


def test_partly_refused_recipients_count_as_sent(serve, recorder, transports, caplog):
    recorder.rcpt_replies["gone@example.org"] = "550 5.1.1 No such user"
    server = serve()
    transport = transports(port=server.port)
    with caplog.at_level(logging.WARNING, logger="watchfolder.mail.transports"):
        transport.send(make_raw(), "w@example.org", ("gone@example.org", "ok@example.org"))
    assert recorder.wait_for(1)[0].rcpt_tos == ["ok@example.org"]
    assert "gone@example.org" in caplog.text and "550" in caplog.text


def test_no_recipients_is_permanent(transports):
    transport = transports(port=free_port())
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ())
    assert err.value.permanent


# ------------------------------------------------------------------ Unicode


def test_unicode_subject_and_address_with_smtputf8(serve, recorder, transports):
    server = serve()  # aiosmtpd's Controller offers SMTPUTF8
    transport = transports(port=server.port)
    raw = make_raw(subject="Importiert: Gehirn-Atlas ü – 東京")
    transport.send(raw, "w@example.org", ("jörg@example.org",))
    (got,) = recorder.wait_for(1)
    assert got.rcpt_tos == ["jörg@example.org"]
    assert got.message["Subject"] == "Importiert: Gehirn-Atlas ü – 東京"
    assert got.raw.isascii()  # the subject travelled as an RFC 2047 encoded word


def test_unicode_address_without_smtputf8_is_permanent(serve, transports):
    server = serve(enable_SMTPUTF8=False)
    transport = transports(port=server.port)
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("jörg@example.org",))
    assert err.value.permanent
    assert "SMTPUTF8" in str(err.value)


# ------------------------------------------------------------------- folder


def test_folder_transport_writes_rfc5322_files_atomically(tmp_path):
    outbox = tmp_path / "outbox"
    transport = FolderTransport(outbox)
    first = make_raw(subject="Größe", message_id="<one@example.org>")
    transport.send(first, "w@example.org", ("a@example.org",))
    transport.send(first, "w@example.org", ("a@example.org",))  # a resend
    transport.send(make_raw(message_id="<two@example.org>"), "w@example.org", ("a@example.org",))
    files = sorted(outbox.iterdir())
    assert [f.suffix for f in files] == [".eml", ".eml"]  # no temp files, no duplicate
    assert all(f.name.startswith("20261128T141349-") for f in files)
    by_id = {
        email.message_from_bytes(f.read_bytes(), policy=email.policy.default)["Message-ID"]: f for f in files
    }
    assert set(by_id) == {"<one@example.org>", "<two@example.org>"}
    assert by_id["<one@example.org>"].read_bytes() == first
    parsed = email.message_from_bytes(first, policy=email.policy.default)
    assert parsed["Subject"] == "Größe"


def test_folder_transport_unwritable_is_transient(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    transport = FolderTransport(blocker / "outbox")
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
    assert not err.value.permanent
    assert "notify.outbox_dir" in str(err.value)


# ---------------------------------------------------------------- factory


@pytest.mark.parametrize("kind, cls", [("folder", FolderTransport), ("smtp", SmtpTransport), ("none", type(None))])
def test_create_transport(tmp_path, kind, cls):
    cfg = wconfig.parse(
        {"data_dir": "data", "notify": {"transport": kind, "smtp": {"host": "mail.example.org", "security": "ssl"}}},
        path=tmp_path / "watchfolder.yaml",
        environ={},
    )
    transport = create_transport(cfg)
    assert isinstance(transport, cls)
    if kind == "folder":
        assert transport.outbox_dir == tmp_path / "data" / "outbox"
    if kind == "smtp":
        assert (transport.config.host, transport.config.port) == ("mail.example.org", 465)


# ------------------------------------- who is at fault: the service or the mail (issue 11 F2)


@pytest.mark.parametrize(("replies", "security", "fix"), [
    ({"MAIL": "553 5.7.1 sender address rejected: not owned by user"}, "none", "notify.from"),
    ({"MAIL": "550 5.7.1 relaying denied for this sender"}, "none", "notify.from"),
    ({"EHLO": "554 5.7.1 no service for you", "HELO": "554 5.7.1 no service for you"}, "none", "refused the session"),
    ({"GREETING": "554 5.3.2 not accepting connections"}, "none", "refused the session"),
    ({"STARTTLS": "554 5.5.1 TLS refused"}, "starttls", "refused the session"),
], ids=["mail-from-553", "mail-from-550", "ehlo-554", "greeting-554", "starttls-554"])
def test_a_5xx_to_the_service_itself_keeps_the_mail_pending(transports, replies, security, fix):
    # A refusal of the sender address or of the session is the service's configuration, the
    # same for every mail: transient (pending until the admin fixes it), with what to fix.
    extensions = ("8BITMIME", "STARTTLS") if security == "starttls" else ("8BITMIME",)
    with ScriptedSmtpServer(replies=replies, extensions=extensions) as server:
        transport = transports(port=server.port, security=security)
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "w@example.org", ("a@example.org",))
        assert not err.value.permanent, str(err.value)
        assert fix in str(err.value)
        assert server.received == []


def test_a_sender_refusal_names_the_fix_and_goes_out_once_fixed(transports):
    with ScriptedSmtpServer(replies={"MAIL": "553 5.7.1 sender address rejected"}) as server:
        transport = transports(port=server.port)
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "wrong@example.org", ("a@example.org",))
        assert "configuration problem" in str(err.value) and "wrong@example.org" in str(err.value)
        server.replies.clear()  # the admin fixed notify.from (here: the server)
        transport.send(make_raw(), "w@example.org", ("a@example.org",))
        assert len(server.received) == 1


def test_a_recipient_5xx_still_fails_the_mail(transports):
    with ScriptedSmtpServer(replies={"RCPT": "550 5.1.1 no such user"}) as server:
        transport = transports(port=server.port)
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "w@example.org", ("nobody@example.org",))
        assert err.value.permanent


def test_a_mail_too_large_for_the_announced_size_fails_for_good(transports):
    # 552 at MAIL FROM with SIZE=n is about this mail, not the sender: retrying cannot help.
    replies = {"MAIL": "552 5.3.4 message size exceeds fixed maximum"}
    with ScriptedSmtpServer(replies=replies, extensions=("8BITMIME", "SIZE 100")) as server:
        transport = transports(port=server.port)
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "w@example.org", ("a@example.org",))
        assert err.value.permanent and "too large" in str(err.value)


# ------------------------------------------------- an overall deadline per send (issue 11 F1)


def _cut_off_before_data_then_sent_fresh(transport, server, deadline_after: float, bound: float) -> None:
    """A send cut off by its deadline while RCPT's reply trickles (~4.5 s), within ``bound``
    seconds: transient, said "too slow", the server took nothing; the next send opens a
    fresh connection (the cut one is dropped) and goes through."""
    started = time.monotonic()
    with pytest.raises(MailError) as err:
        transport.send(make_raw(), "w@example.org", ("a@example.org",), deadline=started + deadline_after)
    assert not err.value.permanent and "too slow" in str(err.value)
    assert time.monotonic() - started < bound
    time.sleep(0.5)
    assert server.received == []
    transport.send(make_raw(), "w@example.org", ("a@example.org",), deadline=time.monotonic() + 5)
    assert len(server.received) == 1


def test_a_trickling_server_is_cut_off_at_the_deadline_before_data(transports):
    # Each byte of RCPT's reply comes well within the read timeout (2 s): only the overall
    # deadline ends the send, before DATA, so the server never takes the mail.
    with ScriptedSmtpServer(trickle={"RCPT": 0.3}) as server:
        _cut_off_before_data_then_sent_fresh(transports(port=server.port, timeout=2.0), server, 0.8, 3.0)


def test_a_trickling_server_over_tls_is_cut_off_too(transports, certificate):
    cert, key = certificate
    with ScriptedSmtpServer(trickle={"RCPT": 0.3}, ssl_context=server_tls_context(cert, key)) as server:
        transport = transports(port=server.port, timeout=2.0, security="ssl", ca_file=cert)
        _cut_off_before_data_then_sent_fresh(transport, server, 1.0, 3.5)


def test_a_trickling_greeting_is_cut_off_too(transports):
    with ScriptedSmtpServer(trickle={"GREETING": 0.3}) as server:
        transport = transports(port=server.port, timeout=2.0)
        started = time.monotonic()
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "w@example.org", ("a@example.org",), deadline=started + 0.8)
        assert not err.value.permanent and "too slow" in str(err.value)
        assert time.monotonic() - started < 3.0


def test_a_deadline_already_passed_sends_nothing(transports):
    with ScriptedSmtpServer() as server:
        transport = transports(port=server.port)
        transport.send(make_raw(), "w@example.org", ("a@example.org",))  # a kept connection
        with pytest.raises(MailError) as err:
            transport.send(make_raw(), "w@example.org", ("a@example.org",), deadline=time.monotonic() - 1)
        assert not err.value.permanent
        assert len(server.received) == 1
