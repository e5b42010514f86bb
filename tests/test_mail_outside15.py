"""Issue 15, outside test: mails read back as they were meant, through the real store, outbox and SMTP.

1. A folded Subject keeps every space of the name (also between two encoded words, also
   runs of spaces), and nothing in a name can become a header of its own.
2. ``mail resend`` of a mail folded into an admin digest sends it on its own; no digest
   counts or lists a failure the admin was already told about.
3. The HTML part carries no raw control character from a name.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import hashlib
import re
from pathlib import Path

import pytest
from mailserver import EphemeralController, Recorder

from watchfolder import config as wconfig
from watchfolder.config import SmtpConfig
from watchfolder.importers import create_importer
from watchfolder.job import FileEntry, JobSpec, JobState, RetryPolicy, Target
from watchfolder.mail.notify import Notifier
from watchfolder.mail.outbox import OutboxSender
from watchfolder.mail.transports import SmtpTransport
from watchfolder.store import SQLiteStore
from watchfolder.worker import Worker

T0 = 1_795_000_000.0
ADMIN = "admin@example.org"
EVIL = "evil\nBcc: x@evil.org\r\nX: y"
SHOWN = "evil\\nBcc: x@evil.org\\r\\nX: y"  # how the text part writes it


class FlakyRecorder(Recorder):
    """The test SMTP server; answers 451 (try again later) once to the first mail holding ``flaky``."""

    flaky: bytes = b""

    async def handle_DATA(self, server, session, envelope):
        if self.flaky and self.flaky in envelope.original_content:
            self.flaky = b""
            return "451 4.3.0 try again later"
        return await super().handle_DATA(server, session, envelope)


@pytest.fixture
def smtp_server():
    recorder = FlakyRecorder()
    controller = EphemeralController(recorder)
    controller.start()
    yield recorder, controller.port
    controller.stop()


@pytest.fixture
def parts(tmp_path, smtp_server):
    """(config, store composing with the Notifier, sender over real SMTP, recorder)."""
    recorder, port = smtp_server

    def make(**notify):
        config = wconfig.parse({
            "data_dir": str(tmp_path / "data"),
            "importer": {"kind": "archive", "archive": {"root": str(tmp_path / "archive")}},
            "notify": {"transport": "smtp", "from": "wf@example.org", "admin_email": ADMIN,
                       "smtp": {"host": "127.0.0.1", "port": port}, **notify},
        }, path=tmp_path / "watchfolder.yaml", environ={})
        notifier = Notifier(config)
        store = SQLiteStore(tmp_path / "db.sqlite", retry=RetryPolicy(1, (10.0,)), composer=notifier.compose,
                            mail_retry=RetryPolicy(5, (10.0,)), logs_dir=tmp_path / "logs")
        transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, timeout=10.0))
        made.append((store, transport))
        return config, store, OutboxSender(store, transport, notifier=notifier), recorder

    made: list = []
    yield make
    for store, transport in made:
        transport.close()
        store.close()


def _acquisition(root: Path, **fields) -> JobSpec:
    files = {"tile_001.ome.tiff": b"p" * 5000, "tile_002.ome.tiff": b"q" * 3000}
    entries = []
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        entries.append(FileEntry(rel, len(data), hashlib.sha256(data).hexdigest()))
    values = {"owner": "jdoe", "root": str(root), "files": tuple(entries), "source": "cli:test",
              "target": Target(project="Brain atlas", dataset="slide 3"), "email": "jdoe@example.org", **fields}
    return JobSpec(**values)


def _import(config, store, spec) -> None:
    job, _ = store.enqueue(spec)
    Worker(store, create_importer(config), name="w1").loop()
    assert store.get(job.id).state is JobState.SUCCEEDED, store.get(job.id).error


def _parsed(raw: bytes):
    return email.message_from_bytes(raw, policy=email.policy.default)


def _deliver(sender, recorder, count: int, now: float | None = None):
    before = len(recorder.received)
    while sender.loop(now=now):
        pass
    return recorder.wait_for(before + count)[before:]


# ---------------------------------------------------------------- 1. subjects


LONG_NAMES = [
    # The tester's: the space between "Überlebensrate" and "Mäuse" was lost where the fold fell.
    "Zellkultur Überlebensrate Mäuse Hirnschnitt Färbung sehr langer Name mit doppelten Leerzeichen "
    "und Ümläuten 2027",
    # Runs of spaces, also between two words that must be encoded, are the name as given.
    "Zellkultur  Überlebensrate   Mäuse Hirnschnitt  Färbung sehr langer Name mit  doppelten "
    "Leerzeichen und Ümläuten 2027",
    "Ärger Öl Übel Äpfel Österreich Überlingen Ähre Öse Übung Ära Ödland Ümlaut Änderung Ölsardine Übertrag",
    "显微镜 采集 海马体 区域 小鼠 物镜 油浸 非常长的 名字 需要 折行 显微镜 采集 海马体 区域 小鼠 物镜 油浸",
    "Résumé " + "très_long_mot_sans_espace_" * 4 + " à la fin  é",
]


def test_long_non_ascii_subjects_read_back_as_the_name_given(tmp_path, parts):
    config, store, sender, recorder = parts()
    for i, name in enumerate(LONG_NAMES):
        _import(config, store, _acquisition(tmp_path / "acq" / f"a{i}", name=name))
    got = _deliver(sender, recorder, len(LONG_NAMES))
    stored = {m.job_id: m.raw for m in store.outbox_list(limit=100)}
    for name, received in zip(LONG_NAMES, sorted(got, key=lambda r: _parsed(r.raw)["X-Watchfolder-Job"]),
                              strict=True):
        assert received.raw in stored.values()
        message = _parsed(received.raw)
        assert message["Subject"] == f"Imported into the archive: {name}"
        assert f'your acquisition "{name}" is in the archive' in received.text()
        assert f"<b>{name}</b>" in received.html()
        header = received.raw.split(b"\r\n\r\n", 1)[0]
        assert all(len(line) <= 78 for line in header.split(b"\r\n")), header
    # The folding did fold (the test would prove nothing on one long line).
    assert b"?=\r\n =?utf-8?q?" in got[0].raw.split(b"\r\n\r\n", 1)[0]


def test_descriptions_and_annotations_keep_their_spaces_and_join_their_lines(tmp_path, parts):
    config, store, sender, recorder = parts()
    spec = _acquisition(tmp_path / "acq" / "d", name="Probe  A   (zwei  Leerzeichen)",
                        description="Hippocampus  CA1,   Maus 7\nzweite   Zeile",
                        annotations={"objective": "63x/1.4  oil"})
    _import(config, store, spec)
    (got,) = _deliver(sender, recorder, 1)
    assert _parsed(got.raw)["Subject"] == "Imported into the archive: Probe  A   (zwei  Leerzeichen)"
    text, html = got.text(), got.html()
    assert "Description: Hippocampus  CA1,   Maus 7 zweite   Zeile\n" in text
    assert "<p>Description: Hippocampus  CA1,   Maus 7 zweite   Zeile</p>" in html
    assert "  objective: 63x/1.4  oil\n" in text and "<b>objective</b>: 63x/1.4  oil" in html


def test_a_name_that_looks_like_an_encoded_word_stays_text_and_forges_no_header(tmp_path, parts):
    config, store, sender, recorder = parts()
    names = ["=?utf-8?q?a=0ABcc:_x@evil.org?=", "Über =?utf-8?q?b=0D=0AReply-To:_x@evil.org?= =?x?q?y?="]
    for i, name in enumerate(names):
        _import(config, store, _acquisition(tmp_path / "acq" / f"e{i}", name=name))
    got = _deliver(sender, recorder, len(names))
    subjects = sorted(_parsed(r.raw)["Subject"] for r in got)
    assert subjects == sorted(f"Imported into the archive: {n}" for n in names)
    for received in got:
        message = _parsed(received.raw)
        assert message["Bcc"] is None and message["Reply-To"] is None
        assert not re.search(rb"^(Bcc|Reply-To):", received.raw, re.M | re.I)


# ---------------------------------------------------------------- 2. digests and resend


def _listed(digest) -> set[int]:
    """The job ids a digest lists ("    jobs 2, 3, 4")."""
    return {int(n) for line in re.findall(r"^ +jobs ([\d, ]+)$", digest.text(), re.M) for n in line.split(", ")}


def test_a_resent_digested_mail_goes_out_on_its_own_and_no_digest_counts_it_again(tmp_path, parts, make_spec):
    _, store, sender, recorder = parts(admin_digest_after=3, admin_digest_minutes=10)

    def fail(i, when):
        spec = dataclasses.replace(make_spec(), idempotency_key=f"k{i}", email=f"user{i}@example.org")
        return store.reject(spec, f"scan_{i}.xyz: no reader accepts this file", now=when)[0].id

    def admin_mails():
        return [r for r in recorder.received if r.rcpt_tos == [ADMIN]]

    jobs = [fail(i, T0) for i in range(5)]
    _deliver(sender, recorder, 5 + 1, now=T0 + 1)
    (digest,) = admin_mails()
    assert digest.message["Subject"] == "[watchfolder] 5 imports failed in the last 10 min"
    (folded,) = [m for m in store.outbox_list(state="digested") if m.job_id == jobs[1]]

    # Within the same period: the admin resends job 2's mail, and four more jobs fail.
    store.outbox_resend(folded.id, now=T0 + 60)
    later = [fail(i, T0 + 60) for i in (5, 6, 7, 8)]
    _deliver(sender, recorder, 4 + 1, now=T0 + 61)
    resent = admin_mails()[-1]
    assert resent.message["Message-ID"] == _parsed(folded.raw)["Message-ID"]
    assert resent.message["X-Watchfolder-Job"] == str(jobs[1])
    assert [m.state for m in store.outbox_list(limit=100) if m.id == folded.id] == ["sent"]

    # The next digest (after the period) has the four new failures only.
    _deliver(sender, recorder, 1, now=T0 + 700)
    last = admin_mails()[-1]
    assert last.message["Subject"] == "[watchfolder] 4 imports failed in the last 10 min"
    assert _listed(last) == set(later)
    assert len(admin_mails()) == 3


def test_a_failure_the_admin_was_told_about_is_not_counted_in_a_later_digest(tmp_path, parts, make_spec):
    """One failure, two mails to the admin (no owner: the owner's mail is redirected). The admin's
    own went out; the redirected one met a 451 and comes back in a burst: it is not counted."""
    _, store, sender, recorder = parts(admin_digest_after=2, admin_digest_minutes=10)
    recorder.flaky = b"X-Watchfolder-Redirected: admin"
    alone = store.reject(dataclasses.replace(make_spec(), owner="", email=None, idempotency_key="alone"),
                         "watchfolder.json: invalid JSON at line 1, column 2", now=T0)[0].id
    _deliver(sender, recorder, 1, now=T0)
    assert [r.message["X-Watchfolder-Kind"] for r in recorder.received] == ["admin_failure"]
    burst = [store.reject(dataclasses.replace(make_spec(), idempotency_key=f"b{i}", email=f"u{i}@example.org"),
                          "scan.xyz: no reader accepts this file", now=T0 + 30)[0].id for i in range(3)]
    _deliver(sender, recorder, 3 + 1 + 1, now=T0 + 31)
    admin = [r for r in recorder.received if r.rcpt_tos == [ADMIN]]
    (digest,) = [r for r in admin if r.message["X-Watchfolder-Kind"] == "admin_digest"]
    assert digest.message["Subject"] == "[watchfolder] 3 imports failed in the last 10 min"
    assert _listed(digest) == set(burst) and alone not in _listed(digest)
    redirected = [r for r in admin if r.message["X-Watchfolder-Redirected"] == "admin"]
    assert len(redirected) == 1 and redirected[0].message["X-Watchfolder-Job"] == str(alone)


# ---------------------------------------------------------------- 3. HTML


def _assert_no_raw_breaks_from_the_name(html: str) -> None:
    assert "\r" not in html
    lines = html.split("\n")
    assert not any(line.startswith(("Bcc:", "X: y")) for line in lines), html
    assert SHOWN in html


def test_the_success_mail_html_escapes_control_characters_in_names(tmp_path, parts):
    config, store, sender, recorder = parts()
    root = tmp_path / "acq" / EVIL
    _import(config, store, _acquisition(root, target=Target(project="p", dataset=EVIL)))
    (got,) = _deliver(sender, recorder, 1)
    text, html = got.text(), got.html()
    assert SHOWN in _parsed(got.raw)["Subject"] and f"Folder: {tmp_path}/acq/{SHOWN}\n" in text
    _assert_no_raw_breaks_from_the_name(html)
    where = re.search(r"<th[^>]*>Where</th><td>(.*?)</td>", html, re.S).group(1)
    assert "\n" not in where and SHOWN in where
    assert f"Folder: <code>{tmp_path}/acq/{SHOWN}</code>" in html


def test_failure_mails_and_the_digest_html_escape_control_characters_in_names(tmp_path, parts, make_spec):
    _, store, sender, recorder = parts(admin_digest_after=2, admin_digest_minutes=10)

    def fail(i, when):
        root = tmp_path / "acq" / f"{EVIL} {i}"
        spec = dataclasses.replace(make_spec(), root=str(root), idempotency_key=f"f{i}",
                                   description=f"about {EVIL}", annotations={EVIL: EVIL})
        return store.reject(spec, f"{root.name}/a.xyz: no reader accepts this file", now=when)

    fail(0, T0)
    owner, admin = sorted(_deliver(sender, recorder, 2, now=T0), key=lambda r: r.rcpt_tos != ["jdoe@example.org"])
    for got in (owner, admin):
        html = got.html()
        _assert_no_raw_breaks_from_the_name(html)
        folder = re.search(r"<th[^>]*>Folder</th><td><code>(.*?)</code>", html, re.S).group(1)
        assert folder == f"{tmp_path}/acq/{SHOWN} 0"
    for i in (1, 2, 3):
        fail(i, T0 + 30)
    got = _deliver(sender, recorder, 3 + 1, now=T0 + 31)
    (digest,) = [r for r in got if r.message["X-Watchfolder-Kind"] == "admin_digest"]
    _assert_no_raw_breaks_from_the_name(digest.html())


def test_the_watcher_alert_html_escapes_control_characters_in_names(tmp_path, parts):
    config, store, sender, recorder = parts()
    mails = Notifier(config).compose_watcher_alert(
        EVIL, {"path": f"/drop/{EVIL}", "error": f"cannot list /drop/{EVIL}", "mode": "events"}, T0 - 900, now=T0)
    store.outbox_add(mails, now=T0)
    (got,) = _deliver(sender, recorder, 1, now=T0)
    _assert_no_raw_breaks_from_the_name(got.html())
