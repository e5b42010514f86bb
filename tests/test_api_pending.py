"""GET /api/v1/pending (owner-scoped) and the seed's GET /ome/failed/mail, over real HTTP."""

from __future__ import annotations

import time
from email.message import EmailMessage

import pytest
from api_support import start_service, stop_service

from watchfolder.store import Mail, PendingEntry


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path)
    yield service
    stop_service(service)


def _entry(path, owner, kind="waiting", reason="waiting for 1 of 2 files (missing: b.tif)", first_seen=None):
    now = time.time()
    return PendingEntry(watch="drop", path=path, kind=kind, reason=reason, first_seen=first_seen or now - 60,
                        last_change=now - 30, quiet_until=None if kind != "writing" else now + 30, owner=owner,
                        digest="00")


def test_pending_is_owner_scoped_and_reasons_are_current(svc):
    svc.store.pending_sync("drop", [
        _entry("jdoe/plate1", "jdoe", first_seen=time.time() - 120),
        _entry("asmith/slide", "asmith", kind="writing", reason="still being written"),
        _entry("bob/x", "bob"),
        _entry("nobody-yet", None, kind="sidecar", reason="sidecar names data file d.czi, which is missing"),
    ])
    admin = svc.client("admin").get("/api/v1/pending")
    assert admin.status == 200
    items = admin.json["pending"]
    assert [i["path"] for i in items] == ["jdoe/plate1", "asmith/slide", "bob/x", "nobody-yet"]
    assert items[0]["reason"] == "waiting for 1 of 2 files (missing: b.tif)" and items[0]["waiting_for"] >= 119
    # A "writing" entry is described as of the request, from its times.
    assert items[1]["reason"].startswith("still being written: last change 30 s ago, quiet until ")
    assert [i["path"] for i in svc.client("reader").get("/api/v1/pending?owner=bob").json["pending"]] == ["bob/x"]
    assert [i["watch"] for i in svc.client("reader").get("/api/v1/pending?watch=other").json["pending"]] == []

    # Tokens limited to owners see only those owners' entries, never one whose owner is unknown.
    lab = svc.client("lab-reader").get("/api/v1/pending").json["pending"]
    assert sorted(i["path"] for i in lab) == ["asmith/slide", "jdoe/plate1"]
    assert svc.client("lab-reader").get("/api/v1/pending?owner=bob").json["pending"] == []
    mine = svc.client("jdoe-only").get("/api/v1/pending").json["pending"]
    assert [i["path"] for i in mine] == ["jdoe/plate1"]
    assert svc.client("portal").get("/api/v1/pending").json["pending"] == []

    assert svc.client().get("/api/v1/pending").status == 401
    bad = svc.client("admin").get("/api/v1/pending?limit=0&colour=red")
    assert bad.status == 422 and {p["field"] for p in bad.json["detail"]} == {"limit", "colour"}


def test_seed_failed_mail_lists_and_shows_undeliverable_mails(svc):
    msg = EmailMessage()
    msg["From"] = "watchfolder@example.org"
    msg["To"] = "jdoe@example.org"
    msg["Subject"] = "Imported into the archive: slide 3"
    msg.set_content("your acquisition is in")
    svc.store.outbox_add([Mail("job_succeeded", ("jdoe@example.org",), msg)], job_id=None)
    svc.store.outbox_add([Mail("job_succeeded", ("ok@example.org",), msg)], job_id=None)
    first, second = sorted(m.id for m in svc.store.outbox_list())
    claimed = {m.id for m in svc.store.outbox_claim()}
    assert claimed == {first, second}
    svc.store.outbox_failed(first, "550 5.1.1 <jdoe@example.org>: user unknown", permanent=True)
    svc.store.outbox_sent(second)

    admin = svc.client("admin")
    listed = admin.get("/ome/failed/mail")
    assert listed.status == 200 and listed.json == [f"/ome/failed/mail/{first}"]
    one = admin.get(f"/ome/failed/mail/{first}")
    assert one.status == 200 and one.headers["content-type"].startswith("text/plain")
    text = one.body.decode()
    assert "to: jdoe@example.org" in text and "last error: 550 5.1.1 <jdoe@example.org>: user unknown" in text
    assert f"watchfolder mail resend {first}" in text and "Subject: Imported into the archive: slide 3" in text
    assert admin.get(f"/ome/failed/mail/{second}").status == 404  # sent, not failed
    assert svc.client("reader").get("/ome/failed/mail").status == 403
    assert svc.client().get("/ome/failed/mail").status == 401
