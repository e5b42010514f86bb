"""GET /api/v1/pending (owner-scoped) and the seed's GET|DELETE /ome/failed/mail, over real HTTP."""

from __future__ import annotations

import time
from email.message import EmailMessage

import pytest
from api_support import TOKEN_SPECS, acquisition, start_service, stop_service

from watchfolder.status import collect_status
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
    # A watch folder no one knows is an error naming those there are; an empty filter too (as /jobs?owner=).
    svc.store.set_component("watcher", "drop", {"health": "ok"})
    assert len(svc.client("reader").get("/api/v1/pending?watch=drop").json["pending"]) == 4
    nosuch = svc.client("reader").get("/api/v1/pending?watch=nosuch")
    assert nosuch.status == 422 and nosuch.json["detail"] == [
        {"field": "watch", "message": "unknown watch folder 'nosuch'; known: drop"}]
    for query in ("owner=", "watch="):
        assert svc.client("reader").get(f"/api/v1/pending?{query}").status == 422, query
    assert svc.client("reader").get("/api/v1/jobs?owner=").status == 422

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


def _failed_mail(store, job_id, to):
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "watchfolder@example.org", to, f"Import failed ({to})"
    msg.set_content("it failed")
    store.outbox_add([Mail("job_failed", (to,), msg)], job_id=job_id)
    (mail,) = [m for m in store.outbox_claim(limit=100) if m.recipients == (to,)]
    return store.outbox_failed(mail.id, f"550 5.1.1 <{to}>: user unknown", permanent=True).id


def _job_of(svc, name, owner):
    r = svc.client("admin").post("/api/v1/jobs", {"path": str(acquisition(svc.roots["drop"], name, owner=owner))})
    assert r.status == 202, r.text
    return r.json["id"]


def test_seed_failed_mail_delete_dismisses_within_the_tokens_owners(tmp_path):
    svc = start_service(tmp_path, token_specs={**TOKEN_SPECS, "jdoe-admin": ("admin", ("jdoe",), ())})
    try:
        jdoe_mail = _failed_mail(svc.store, _job_of(svc, "j1", "jdoe"), "jdoe@example.org")
        alice_mail = _failed_mail(svc.store, _job_of(svc, "a1", "alice"), "alice@example.org")
        alert = _failed_mail(svc.store, None, "admin@example.org")  # a watcher alert: no job, no owner
        admin, jdoe_admin = svc.client("admin"), svc.client("jdoe-admin")
        assert "outbox: 3 mail(s) could not be sent" in collect_status(svc.config, svc.store)["problems"]

        # A token limited to jdoe sees, reads and drops jdoe's mail only.
        assert jdoe_admin.get("/ome/failed/mail").json == [f"/ome/failed/mail/{jdoe_mail}"]
        assert jdoe_admin.get(f"/ome/failed/mail/{alice_mail}").status == 404
        assert jdoe_admin.get(f"/ome/failed/mail/{alert}").status == 404
        assert jdoe_admin.delete(f"/ome/failed/mail/{alice_mail}").status == 204  # answers the same...
        assert jdoe_admin.delete(f"/ome/failed/mail/{alert}").status == 204
        assert {m.id for m in svc.store.outbox_list(state="failed")} == {jdoe_mail, alice_mail, alert}  # ...but no
        assert jdoe_admin.delete(f"/ome/failed/mail/{jdoe_mail}").status == 204
        assert jdoe_admin.get(f"/ome/failed/mail/{jdoe_mail}").status == 404
        assert jdoe_admin.get("/ome/failed/mail").json == []

        # Neither read tokens nor anonymous callers drop anything; bad ids are a 204 with nothing done.
        assert svc.client("reader").delete(f"/ome/failed/mail/{alice_mail}").status == 403
        assert svc.client("lab-reader").delete(f"/ome/failed/mail/{alice_mail}").status == 403
        assert svc.client().delete(f"/ome/failed/mail/{alice_mail}").status == 401
        for bad in ("0", "-1", "9223372036854775808", "1" * 30, "x", "%C2%B2"):
            assert admin.delete(f"/ome/failed/mail/{bad}").status == 204
        assert admin.get("/ome/failed/mail").json == [f"/ome/failed/mail/{alert}", f"/ome/failed/mail/{alice_mail}"]

        # The unlimited admin drops the rest; the mails stay in the outbox as dismissed, off the problems.
        assert admin.delete(f"/ome/failed/mail/{alice_mail}").status == 204
        assert admin.delete(f"/ome/failed/mail/{alert}").status == 204
        assert admin.get("/ome/failed/mail").json == []
        assert not any(p.startswith("outbox:") for p in collect_status(svc.config, svc.store)["problems"])
        kept = svc.store.outbox_list(state="dismissed")
        assert sorted(m.id for m in kept) == sorted([jdoe_mail, alice_mail, alert])
        assert all(m.last_error.startswith("550 5.1.1") for m in kept)
        assert svc.store.outbox_resend(alice_mail).state == "pending"  # `watchfolder mail resend` still works
    finally:
        stop_service(svc)


def test_an_owner_limited_token_sees_its_acquisition_while_it_is_still_being_written(svc, make_config, tmp_path):
    """Outside test finding 1, over HTTP: a real drop still being written, seen by a real watcher,
    is listed to the owner's token at once (its manifest names jdoe), not only after the quiet period."""
    from watchfolder.watch.watcher import Watcher

    drop = svc.roots["drop"]
    watch = make_config(watch=[{"name": "drop", "path": str(drop), "mode": "polling", "quiet_period": 60,
                                "poll_interval": 1, "rescan_interval": 100000}]).watch[0]
    watcher = Watcher(watch, svc.store)
    now = time.time()
    watcher.loop(now=now)
    folder = acquisition(drop, "wr2", owner="jdoe", files={"w.tif": b"x"})
    (drop / "bob1").mkdir()
    (drop / "bob1" / "watchfolder.json").write_text('{"owner": "bob", "target": {"dataset": "B"}}')
    for t in range(1, 4):
        (folder / "w.tif").open("ab").write(b"more")
        watcher.loop(now=now + t)
    kinds = {e.path: (e.kind, e.owner) for e in svc.store.pending_list(watch="drop")}
    assert kinds == {"wr2": ("writing", "jdoe"), "bob1": ("writing", "bob")}
    mine = svc.client("jdoe-only").get("/api/v1/pending").json["pending"]
    assert [(i["path"], i["kind"], i["owner"]) for i in mine] == [("wr2", "writing", "jdoe")]
    assert [i["path"] for i in svc.client("lab-reader").get("/api/v1/pending").json["pending"]] == ["wr2"]
    watcher.stop()


def test_a_misplaced_file_in_a_layout_drop_is_its_owners_to_see(svc, make_config):
    """Outside test of issue 15: jdoe/loose.tif (a file where the layout expects dataset folders)
    was listed with owner null, so jdoe's token never saw it; the path names the owner."""
    from watchfolder.watch.watcher import Watcher

    drop = svc.roots["drop"]
    watch = make_config(watch=[{"name": "drop", "path": str(drop), "mode": "polling", "quiet_period": 60,
                                "poll_interval": 1, "rescan_interval": 100000, "detection": "layout",
                                "layout": "{owner}/{dataset}/", "target": {"project": "P"}}]).watch[0]
    (drop / "jdoe").mkdir(parents=True, exist_ok=True)
    (drop / "jdoe" / "loose.tif").write_bytes(b"x")
    watcher = Watcher(watch, svc.store)
    watcher.loop(now=time.time())
    kinds = {e.path: (e.kind, e.owner) for e in svc.store.pending_list(watch="drop")}
    assert kinds["jdoe/loose.tif"] == ("misplaced", "jdoe"), kinds
    mine = svc.client("jdoe-only").get("/api/v1/pending").json["pending"]
    assert ("jdoe/loose.tif", "misplaced") in [(i["path"], i["kind"]) for i in mine]
    assert [p["owner"] for p in watcher.status()["pending_acquisitions"] if p["path"] == "jdoe/loose.tif"] == ["jdoe"]
    watcher.stop()
