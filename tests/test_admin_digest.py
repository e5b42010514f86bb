"""The admin digest: a burst of permanent failures gives one mail per period, over real SMTP."""

from __future__ import annotations

import dataclasses

import pytest
from mailserver import EphemeralController, Recorder

from watchfolder import config as wconfig
from watchfolder.config import SmtpConfig
from watchfolder.job import RetryPolicy
from watchfolder.mail.notify import Notifier
from watchfolder.mail.outbox import OutboxSender
from watchfolder.mail.transports import SmtpTransport
from watchfolder.store import SQLiteStore

T0 = 1_795_000_000.0


@pytest.fixture
def smtp_server():
    recorder = Recorder()
    controller = EphemeralController(recorder)
    controller.start()
    yield recorder, controller.port
    controller.stop()


def test_a_burst_of_failures_gives_the_admin_one_digest_per_period(tmp_path, smtp_server, make_spec):
    recorder, port = smtp_server
    config = wconfig.parse({
        "data_dir": str(tmp_path / "data"), "importer": {"kind": "archive"},
        "notify": {"transport": "smtp", "from": "wf@example.org", "admin_email": "admin@example.org",
                   "admin_digest_after": 3, "admin_digest_minutes": 10, "smtp": {"host": "127.0.0.1", "port": port}},
    }, path=tmp_path / "watchfolder.yaml", environ={})
    notifier = Notifier(config)
    store = SQLiteStore(tmp_path / "db.sqlite", retry=RetryPolicy(3, (10.0,)), composer=notifier.compose)
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, timeout=10.0))
    sender = OutboxSender(store, transport, notifier=notifier)

    def fail(i, when, reason):
        spec = dataclasses.replace(make_spec(), idempotency_key=f"k{i}", email=f"user{i}@example.org")
        store.reject(spec, reason, now=when)

    def admin_mails():
        return [r for r in recorder.received if r.rcpt_tos == ["admin@example.org"]]

    try:
        # Up to the threshold: one admin mail per failure, as before.
        for i in range(3):
            fail(i, T0, f"scan_{i}.xyz: no reader accepts this file")
        sender.loop(now=T0)
        recorder.wait_for(6)
        assert len(admin_mails()) == 3
        # A burst: 8 more within the period: the owners get theirs, the admin one digest.
        for i in range(3, 11):
            fail(i, T0 + 30, "checksum of a.tif does not match the manifest" if i % 2 else "unknown owner 'x'")
        while sender.loop(now=T0 + 31):
            pass
        recorder.wait_for(6 + 8 + 1)
        (digest,) = admin_mails()[3:]
        assert digest.message["Subject"] == "[watchfolder] 8 imports failed in the last 10 min"
        text = digest.text()
        assert "4 x checksum of a.tif does not match the manifest" in text and "4 x unknown owner 'x'" in text
        # Finding 6 (issue 15 outside test): the 8 single admin mails were not delivered, the digest
        # was: they are 'digested' with its id, not 'sent'.
        mails = store.outbox_list(limit=100)
        (digest_row,) = [m for m in mails if m.kind == "admin_digest"]
        folded = [m for m in mails if m.state == "digested"]
        assert len(folded) == 8 and {m.kind for m in folded} == {"admin_failure"}
        assert {m.digest_id for m in folded} == {digest_row.id} and all(m.sent_at is None for m in folded)
        assert folded[0].to_dict()["digest_id"] == digest_row.id
        assert {m.state for m in mails if m.state != "digested"} == {"sent"}
        counts = store.outbox_counts()
        assert (counts["sent"], counts["digested"]) == (3 + 3 + 8 + 1, 8)
        # More failures in the same period wait for the next digest...
        for i in range(11, 16):
            fail(i, T0 + 60, "scan.xyz: no reader accepts this file")
        while sender.loop(now=T0 + 61):
            pass
        recorder.wait_for(6 + 8 + 1 + 5)
        assert len(admin_mails()) == 4
        held = [m for m in store.outbox_list(limit=100) if m.kind == "admin_failure" and m.state == "pending"]
        assert len(held) == 5 and all(m.next_attempt_at == pytest.approx(T0 + 31 + 600) for m in held)
        assert all(m.attempts == 0 for m in held)  # waiting is not a failed attempt
        # ...which goes out when the period is over, with all five.
        while sender.loop(now=T0 + 700):
            pass
        recorder.wait_for(6 + 8 + 1 + 5 + 1)
        assert store.outbox_counts()["digested"] == 8 + 5
        last = admin_mails()[-1]
        assert last.message["Subject"] == "[watchfolder] 5 imports failed in the last 10 min"
        assert "5 x scan.xyz: no reader accepts this file" in last.text()
    finally:
        transport.close()
        store.close()


def test_owner_mails_redirected_to_the_admin_join_the_digest_and_advise_what_is_true(tmp_path, smtp_server, make_spec):
    """Finding 5: failures with no owner: the admin gets the digest only, not one redirected mail each."""
    recorder, port = smtp_server
    config = wconfig.parse({
        "data_dir": str(tmp_path / "data"), "importer": {"kind": "archive"},
        "notify": {"transport": "smtp", "from": "wf@example.org", "admin_email": "admin@example.org",
                   "default_domain": "example.org", "admin_digest_after": 3, "admin_digest_minutes": 10,
                   "smtp": {"host": "127.0.0.1", "port": port}},
    }, path=tmp_path / "watchfolder.yaml", environ={})
    notifier = Notifier(config)
    store = SQLiteStore(tmp_path / "db.sqlite", retry=RetryPolicy(3, (10.0,)), composer=notifier.compose)
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, timeout=10.0))
    sender = OutboxSender(store, transport, notifier=notifier)
    try:
        # One alone (below the threshold): the redirected mail says what is true for this config.
        store.reject(dataclasses.replace(make_spec(), owner="", email=None, idempotency_key="one"),
                     "watchfolder.json: invalid JSON at line 1, column 2", now=T0)
        while sender.loop(now=T0):
            pass
        recorder.wait_for(2)
        texts = [r.text() for r in recorder.received]
        redirected = [t for t in texts if "meant for the owner" in t]
        assert len(redirected) == 1 and "the acquisition names none" in redirected[0]
        assert "set notify.default_domain" not in redirected[0]
        # Six more in one burst: the admin gets one digest, with each failure once.
        for i in range(6):
            store.reject(dataclasses.replace(make_spec(), owner="", email=None, idempotency_key=f"bj{i}"),
                         "watchfolder.json: invalid JSON at line 1, column 2", now=T0 + 30)
        while sender.loop(now=T0 + 31):
            pass
        recorder.wait_for(3)
        assert len(recorder.received) == 3, [r.message["Subject"] for r in recorder.received]
        digest = recorder.received[-1]
        assert digest.message["Subject"] == "[watchfolder] 6 imports failed in the last 10 min"
        assert "6 x watchfolder.json: invalid JSON at line 1, column 2" in digest.text()
        states = [m.state for m in store.outbox_list(limit=100)]
        assert states.count("digested") == 2 * 6 and set(states) == {"sent", "digested"}  # redirected + admin
    finally:
        transport.close()
        store.close()


# Finding 2 (issue 15 outside test): names with spaces, dashes, digits, several names or markup
# split alike failures into groups. The reasons are the detector's own (listed_reason,
# checksum_reason, size_reason), wrapped as the detector fails them after missing_timeout.
_NAMES = ["Image 001.tif", "img002.tif", "Slide 3 - Region 1.czi", "a b/c d (2).tif",
          "<b>x</b> y.ome.tiff", "run-7_ch 2.nd2", "data, final.czi"]


def _incomplete(*absent):
    from watchfolder.watch import acquisition as acq
    from watchfolder.watch.detector import listed_reason
    _, reason = listed_reason(acq.ListedCheck(present=[], missing=[f"{a} (missing)" for a in absent],
                                              absent=list(absent)), 2 + len(absent), "manifest")
    return (f"incomplete after 90 s without change: {reason}; "
            "copy the missing files and drop the acquisition again, or fix the descriptor")


def test_alike_reasons_group_together_whatever_the_names_in_them():
    from watchfolder.job import reason_group
    from watchfolder.watch.detector import checksum_reason, oversize_reason, size_reason
    shapes = [
        [_incomplete(n) for n in _NAMES] + [_incomplete(*_NAMES[:3]), _incomplete(*_NAMES, *"abcdefgh")],
        [checksum_reason([n], "manifest") for n in _NAMES] + [checksum_reason(_NAMES, "manifest")],
        [size_reason(n, 1000, 4096, "manifest") for n in _NAMES],
        [oversize_reason([(n, 5000, 4096)], "manifest") for n in _NAMES]
        + [oversize_reason([(n, 5000, 4096) for n in _NAMES], "manifest")],
        [f"sidecar names data file {n}, which is missing" for n in _NAMES],
    ]
    groups = [{reason_group(r) for r in shape} for shape in shapes]
    for shape, group in zip(shapes, groups, strict=True):
        assert len(group) == 1, (shape[:3], group)
    assert len(set().union(*groups)) == len(shapes)  # and the different reasons stay apart
    assert "…" in groups[0].pop() and "Region" not in str(groups)


def test_the_digest_counts_the_testers_three_incomplete_manifests_as_one_reason(tmp_path, smtp_server, make_spec):
    recorder, port = smtp_server
    config = wconfig.parse({
        "data_dir": str(tmp_path / "data"), "importer": {"kind": "archive"},
        "notify": {"transport": "smtp", "from": "wf@example.org", "admin_email": "admin@example.org",
                   "admin_digest_after": 2, "admin_digest_minutes": 10, "smtp": {"host": "127.0.0.1", "port": port}},
    }, path=tmp_path / "watchfolder.yaml", environ={})
    notifier = Notifier(config)
    store = SQLiteStore(tmp_path / "db.sqlite", retry=RetryPolicy(3, (10.0,)), composer=notifier.compose)
    transport = SmtpTransport(SmtpConfig(host="127.0.0.1", port=port, timeout=10.0))
    sender = OutboxSender(store, transport, notifier=notifier)
    try:
        jobs = [store.reject(dataclasses.replace(make_spec(), idempotency_key=f"m{i}", email=f"u{i}@example.org"),
                             _incomplete(name), now=T0)[0].id
                for i, name in enumerate(["Image 001.tif", "img002.tif", "Slide 3 - Region 1.czi"])]
        assert len({store.get(j).to_dict()["error"]["group"] for j in jobs}) == 1
        while sender.loop(now=T0 + 1):
            pass
        recorder.wait_for(4)
        (digest,) = [r for r in recorder.received if r.rcpt_tos == ["admin@example.org"]]
        assert "3 x incomplete after 90 s without change: waiting for 1 of 3 files (missing: Image 001.tif)" \
            in digest.text()
    finally:
        transport.close()
        store.close()
