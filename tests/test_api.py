"""REST API over real HTTP on an ephemeral port, a real store in tmp_path; every response
is checked against api/openapi.yaml by the client (api_support.Client)."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time

import pytest
import yaml
from api_support import CONTRACT, OPENAPI, Client, acquisition, start_service, stop_service
from helpers import write_manifest

from watchfolder import config as wconfig
from watchfolder.errors import PermanentImportError, WatchfolderError
from watchfolder.job import Progress
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.auth import TokenVerifier, Unauthorized, hash_token, new_token


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path)
    yield service
    stop_service(service)


def submit(client, path, **fields):
    return client.post("/api/v1/jobs", {"path": str(path), **fields})


# -- submitting and polling ---------------------------------------------------


def test_submit_then_poll_a_job(svc):
    portal = svc.client("portal")
    folder = acquisition(svc.roots["drop"], "jdoe/slide3")
    r = submit(portal, folder, email="jdoe@example.org", annotations={"objective": "63x"})
    assert r.status == 202
    job = r.json
    assert r.headers["location"] == f"/api/v1/jobs/{job['id']}"
    assert job["state"] == "queued"
    assert job["owner"] == "jdoe"  # from the manifest
    assert job["source"] == "api:portal"
    assert job["target"] == {"project": "Brain atlas", "dataset": "slide 3"}
    assert job["annotations"] == {"objective": "63x"}
    assert [f["path"] for f in job["files"]] == ["tile_001.ome.tiff"]

    polled = portal.get(r.headers["location"])
    assert polled.status == 200
    assert polled.json["id"] == job["id"]
    assert polled.json["history"][0]["state"] == "queued"
    assert "token portal" in polled.json["history"][0]["message"]


def test_same_acquisition_twice_answers_the_existing_job(svc):
    portal = svc.client("portal")
    folder = acquisition(svc.roots["drop"], "jdoe/a")
    first = submit(portal, folder)
    again = submit(portal, folder)
    assert (first.status, again.status) == (202, 200)
    assert again.json["id"] == first.json["id"]
    assert again.headers["location"] == first.headers["location"]
    assert svc.store.counts()["queued"] == 1


def test_idempotency_key_is_scoped_to_the_token(svc):
    folder_a = acquisition(svc.roots["drop"], "jdoe/a")
    folder_b = acquisition(svc.roots["drop"], "jdoe/b")
    a = submit(svc.client("portal"), folder_a, idempotency_key="order-17")
    same = submit(svc.client("portal"), folder_b, idempotency_key="order-17")
    other = submit(svc.client("other-portal"), folder_b, idempotency_key="order-17")
    assert a.status == 202 and same.status == 200 and same.json["id"] == a.json["id"]
    assert other.status == 202 and other.json["id"] != a.json["id"]
    assert a.json["idempotency_key"] == "api:portal:order-17"


def test_fields_override_the_manifest(svc):
    folder = acquisition(svc.roots["drop"], "plain", owner=None, manifest=False)
    missing = submit(svc.client("portal"), folder)
    assert missing.status == 422
    assert missing.json["detail"][0]["field"] == "owner"
    r = submit(svc.client("portal"), folder, owner="asmith", target={"dataset_id": 12}, name="scan")
    assert r.status == 202
    assert (r.json["owner"], r.json["target"], r.json["name"]) == ("asmith", {"dataset_id": 12}, "scan")


def test_log_is_plain_text(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a")
    job = submit(svc.client("portal"), folder).json
    svc.store.log(job["id"], "copying tile_001.ome.tiff")
    r = svc.client("portal").get(f"/api/v1/jobs/{job['id']}/log")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    assert "copying tile_001.ome.tiff" in r.text
    assert svc.client("reader").get("/api/v1/jobs/9999/log").status == 404


def test_unknown_job_is_404(svc):
    r = svc.client("admin").get("/api/v1/jobs/424242")
    assert r.status == 404
    assert "424242" in r.json["error"]


# -- tokens, roles, scopes ----------------------------------------------------


def test_no_token_and_bad_token_are_401(svc):
    anonymous = svc.client()
    for r in (
        anonymous.get("/api/v1/jobs"),
        anonymous.get("/api/v1/jobs", token="wf_not-a-token"),
        anonymous.get("/api/v1/jobs", headers={"Authorization": "Basic dXNlcjpwdw=="}),
        anonymous.post("/api/v1/jobs", {"path": "/x"}),
        anonymous.get("/api/v1/status"),
    ):
        assert r.status == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json["error"]


def test_roles(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a")
    job = submit(svc.client("portal"), folder).json
    reader, portal, admin = svc.client("reader"), svc.client("portal"), svc.client("admin")

    assert submit(reader, folder).status == 403  # read cannot submit
    assert reader.get(f"/api/v1/jobs/{job['id']}").status == 200
    assert reader.get("/api/v1/status").status == 200
    forbidden = reader.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert forbidden.status == 403 and "admin" in forbidden.json["error"]
    assert reader.post(f"/api/v1/jobs/{job['id']}/retry").status == 403

    assert portal.get("/api/v1/status").status == 403
    assert portal.post(f"/api/v1/jobs/{job['id']}/cancel").status == 403

    assert admin.get("/api/v1/status").status == 200
    assert admin.post(f"/api/v1/jobs/{job['id']}/cancel").json["state"] == "cancelled"
    assert admin.get("/api/v1/whoami").json == {
        "name": "admin", "role": "admin", "owners": [], "roots": [],
        "permissions": ["manage", "read", "read_own", "status", "submit"],
    }


def test_submit_token_sees_only_its_own_jobs(svc):
    mine = submit(svc.client("portal"), acquisition(svc.roots["drop"], "jdoe/a")).json
    theirs = submit(svc.client("other-portal"), acquisition(svc.roots["drop"], "jdoe/b")).json
    portal = svc.client("portal")
    assert [j["id"] for j in portal.get("/api/v1/jobs").json["jobs"]] == [mine["id"]]
    assert portal.get("/api/v1/jobs?source=api:other-portal").json["jobs"] == []
    assert portal.get("/api/v1/jobs?source=api:*").json["jobs"][0]["id"] == mine["id"]
    assert portal.get(f"/api/v1/jobs/{theirs['id']}").status == 404
    assert portal.get(f"/api/v1/jobs/{theirs['id']}/log").status == 404
    everyone = svc.client("reader").get("/api/v1/jobs").json["jobs"]
    assert {j["id"] for j in everyone} == {mine["id"], theirs["id"]}


def test_owner_limits(svc):
    limited = svc.client("jdoe-only")
    asmith = acquisition(svc.roots["drop"], "asmith/a", owner="asmith")
    r = submit(limited, asmith)  # owner from the manifest
    assert r.status == 403 and "'asmith'" in r.json["error"]
    r = submit(limited, asmith, owner="asmith")
    assert r.status == 403
    r = submit(limited, asmith, owner="jdoe")  # may not reassign asmith's described data (issue 10, I)
    assert r.status == 422 and r.json["detail"][0]["field"] == "owner"
    assert svc.store.counts().get("queued", 0) == 0


def test_read_token_limited_to_owners_pages_through_other_owners(svc):
    admin = svc.client("admin")
    made = {}
    for i, owner in enumerate(["jdoe", "bob", "bob", "asmith", "bob", "bob", "jdoe", "bob"]):
        folder = acquisition(svc.roots["drop"], f"{owner}/{i}", owner=owner)
        made[submit(admin, folder).json["id"]] = owner
    lab = svc.client("lab-reader")
    seen, cursor, pages = [], None, 0
    while True:
        page = lab.get("/api/v1/jobs?limit=2" + (f"&cursor={cursor}" if cursor else "")).json
        seen += [j["id"] for j in page["jobs"]]
        assert all(j["owner"] in ("jdoe", "asmith") for j in page["jobs"])
        cursor, pages = page["next_cursor"], pages + 1
        if cursor is None:
            break
    assert seen == sorted((i for i, o in made.items() if o != "bob"), reverse=True)
    assert lab.get("/api/v1/jobs?owner=bob").json["jobs"] == []
    bob_job = next(i for i, o in made.items() if o == "bob")
    assert lab.get(f"/api/v1/jobs/{bob_job}").status == 404


def test_new_token_snippet_is_valid_config_and_verifies(tmp_path):
    token, snippet = new_token("portal", "submit", owners=["jdoe"], roots=[str(tmp_path)])
    assert token not in snippet
    entries = yaml.safe_load(snippet)
    assert entries[0]["hash"] == hash_token(token)
    config = wconfig.parse({"data_dir": str(tmp_path), "server": {"tokens": entries}}, environ={})
    verifier = TokenVerifier(config.server.tokens)
    principal = verifier.verify(f"Bearer {token}")
    assert (principal.name, principal.role, principal.owners) == ("portal", "submit", ("jdoe",))
    with pytest.raises(Unauthorized):
        verifier.verify(f"Bearer {token}x")
    with pytest.raises(Unauthorized):
        verifier.verify(None)
    with pytest.raises(WatchfolderError, match="role"):
        new_token("x", "superuser")
    with pytest.raises(WatchfolderError, match="name"):
        new_token("bad name", "read")
    other, _ = new_token("portal", "submit")
    assert other != token


# -- paths --------------------------------------------------------------------


def test_path_outside_the_allowed_roots_is_403(svc):
    outside = acquisition(svc.roots["elsewhere"], "secret")
    r = submit(svc.client("portal"), outside)
    assert r.status == 403
    assert "outside the allowed roots" in r.json["error"]


def test_dotdot_escape_is_403(svc):
    acquisition(svc.roots["elsewhere"], "secret")
    sneaky = f"{svc.roots['drop']}/../elsewhere/secret"
    r = submit(svc.client("portal"), sneaky)
    assert r.status == 403
    assert "elsewhere" in r.json["error"]


def test_symlink_escape_is_403(svc):
    outside = acquisition(svc.roots["elsewhere"], "secret")
    link = svc.roots["drop"] / "innocent"
    link.symlink_to(outside)
    r = submit(svc.client("portal"), link)
    assert r.status == 403
    assert "resolves to" in r.json["error"]


def test_symlinked_file_inside_an_acquisition_pointing_out_is_refused(svc):
    (svc.roots["elsewhere"] / "passwd").write_text("root:x:0:0")
    folder = svc.roots["drop"] / "jdoe" / "trap"
    folder.mkdir(parents=True)
    (folder / "data.tif").symlink_to(svc.roots["elsewhere"] / "passwd")
    r = submit(svc.client("portal"), folder, owner="jdoe", target={"dataset": "d"})
    assert r.status in (403, 422)
    assert "outside" in r.json["error"] + json.dumps(r.json["detail"])
    assert svc.store.counts()["queued"] == 0


def test_token_roots(svc):
    drop_only = svc.client("drop-only")
    assert submit(drop_only, acquisition(svc.roots["drop"], "jdoe/ok")).status == 202
    r = submit(drop_only, acquisition(svc.roots["drop"], "asmith/no"))
    assert r.status == 403 and "token's roots" in r.json["error"]


def test_relative_and_missing_paths_are_422(svc):
    r = submit(svc.client("portal"), "jdoe/slide3")
    assert r.status == 422 and r.json["detail"][0]["field"] == "path"
    r = submit(svc.client("portal"), svc.roots["drop"] / "nothing-here")
    assert r.status == 422 and "does not exist" in r.json["detail"][0]["message"]


def test_no_allowed_roots_means_no_paths(tmp_path):
    service = start_service(tmp_path, extra_server={"allowed_roots": []})
    try:
        r = submit(service.client("portal"), acquisition(service.roots["drop"], "jdoe/a"))
        assert r.status == 403 and "allowed_roots is empty" in r.json["error"]
    finally:
        stop_service(service)


# -- bodies -------------------------------------------------------------------


def test_invalid_json_is_400_with_line_and_column(svc):
    raw = b'{\n  "path": "/x",\n  "owner": jdoe\n}'
    r = svc.client("portal").post("/api/v1/jobs", raw=raw, headers={"Content-Type": "application/json"})
    assert r.status == 400
    assert r.json["detail"]["line"] == 3 and r.json["detail"]["column"] == 12
    assert "line 3, column 12" in r.json["error"]
    r = svc.client("portal").post("/api/v1/jobs", raw=b'{"path": "\xff"}', headers={"Content-Type": "application/json"})
    assert r.status == 400 and "UTF-8" in r.json["error"]


def test_unknown_and_invalid_fields_are_422_naming_each(svc):
    r = submit(svc.client("portal"), "relative", ownr="jdoe", target={"project": "P"}, annotations={"a": 1}, email=5)
    assert r.status == 422
    fields = {p["field"] for p in r.json["detail"]}
    assert fields == {"ownr", "path", "target", "annotations.a", "email"}
    assert "did you mean 'owner'" in next(p["message"] for p in r.json["detail"] if p["field"] == "ownr")
    r = svc.client("portal").post("/api/v1/jobs", ["not", "an", "object"])
    assert r.status == 422 and r.json["detail"][0]["field"] == "(body)"


def test_body_size_limit_is_413(tmp_path):
    service = start_service(tmp_path, extra_server={"max_body_bytes": 1024})
    try:
        portal = service.client("portal")
        r = portal.post("/api/v1/jobs", {"path": "/x", "description": "x" * 2000})
        assert r.status == 413 and "1024" in r.json["error"]
        r = portal.post("/api/v1/jobs", raw=b"{" + b" " * 5000 + b"}")
        assert r.status == 413
        assert service.store.counts()["queued"] == 0
    finally:
        stop_service(service)


def test_session_key_is_kept_secret(tmp_path):
    service = start_service(tmp_path, importer="omero")
    try:
        secret = "0f1e2d3c-session-key-4b5a"
        folder = acquisition(service.roots["drop"], "jdoe/a")
        r = submit(service.client("portal"), folder, session_key=secret)
        assert r.status == 202
        assert r.json["uses_session_key"] is True
        job_id = r.json["id"]
        stored = service.store.get(job_id).spec
        assert (stored.session_key, stored.omero_host, stored.omero_port) == (secret, "omero.example.org", 4064)
        admin = service.client("admin")
        for path in (f"/api/v1/jobs/{job_id}", "/api/v1/jobs", f"/api/v1/jobs/{job_id}/log", "/api/v1/status", "/metrics"):
            assert secret not in admin.get(path).text
    finally:
        stop_service(service)


def test_session_key_refused_without_omero(svc):
    r = submit(svc.client("portal"), acquisition(svc.roots["drop"], "jdoe/a"), session_key="abc")
    assert r.status == 422 and r.json["detail"][0]["field"] == "session_key"


# -- listing ------------------------------------------------------------------


def test_paging_and_filters(svc):
    admin = svc.client("admin")
    ids = [submit(admin, acquisition(svc.roots["drop"], f"jdoe/{i}")).json["id"] for i in range(7)]
    pages, cursor = [], None
    while True:
        page = admin.get("/api/v1/jobs?limit=3" + (f"&cursor={cursor}" if cursor else "")).json
        pages.append([j["id"] for j in page["jobs"]])
        assert all("history" not in j for j in page["jobs"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[:1]]

    admin.post(f"/api/v1/jobs/{ids[2]}/cancel")
    assert [j["id"] for j in admin.get("/api/v1/jobs?state=cancelled").json["jobs"]] == [ids[2]]
    both = admin.get("/api/v1/jobs?state=cancelled&state=queued&limit=100").json["jobs"]
    assert len(both) == 7
    assert len(admin.get("/api/v1/jobs?state=cancelled,queued").json["jobs"]) == 7
    assert admin.get("/api/v1/jobs?owner=nobody").json["jobs"] == []
    assert len(admin.get("/api/v1/jobs?source=api:admin").json["jobs"]) == 7
    assert len(admin.get("/api/v1/jobs?source=api:*").json["jobs"]) == 7
    assert admin.get("/api/v1/jobs?source=watch:*").json["jobs"] == []
    created = svc.store.get(ids[3]).created_at
    after = admin.get(f"/api/v1/jobs?since={created}&limit=100").json["jobs"]
    assert sorted(j["id"] for j in after) == ids[3:]
    before = admin.get(f"/api/v1/jobs?until={created}&limit=100").json["jobs"]
    assert sorted(j["id"] for j in before) == ids[:3]
    iso = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created + 3600))
    assert admin.get(f"/api/v1/jobs?since={iso}").json["jobs"] == []


@pytest.mark.parametrize(
    "query, field",
    [("limit=0", "limit"), ("limit=501", "limit"), ("limit=x", "limit"), ("state=done", "state"),
     ("since=yesterday", "since"), ("cursor=abc", "cursor"), ("colour=red", "colour")],
)
def test_bad_list_parameters_are_422(svc, query, field):
    r = svc.client("admin").get(f"/api/v1/jobs?{query}")
    assert r.status == 422
    assert [p["field"] for p in r.json["detail"]] == [field]


# -- retry and cancel ------------------------------------------------------------


def test_cancel_and_retry(svc):
    admin = svc.client("admin")
    job = submit(admin, acquisition(svc.roots["drop"], "jdoe/a")).json
    assert admin.post(f"/api/v1/jobs/{job['id']}/retry").status == 409  # queued: nothing to retry
    cancelled = admin.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled.status == 200 and cancelled.json["state"] == "cancelled"
    again = admin.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert again.status == 409 and "already cancelled" in again.json["error"]
    retried = admin.post(f"/api/v1/jobs/{job['id']}/retry")
    assert retried.status == 200 and retried.json["state"] == "queued"
    assert "retry requested by api:admin" in retried.json["history"][-1]["message"]
    assert admin.post("/api/v1/jobs/999/retry").status == 404


def test_a_store_locked_past_its_timeout_is_503_on_every_writing_route(tmp_path):
    # Second outside test of issue 11, F3b: with the database locked by another process past
    # store.busy_timeout, retry, cancel and dismiss answered 500 (submit and a full disk: 503).
    service = start_service(tmp_path)
    service.store.busy_timeout = 0.2  # the server threads' connections are made with it
    try:
        admin = service.client("admin")
        job = submit(admin, acquisition(service.roots["drop"], "jdoe/a")).json
        locker = sqlite3.connect(service.store.path, isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            answers = {route: admin.post(f"/api/v1/jobs/{job['id']}/{route}") for route in ("cancel", "retry",
                                                                                          "dismiss")}
            answers["submit"] = submit(admin, acquisition(service.roots["drop"], "jdoe/b"))
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        for route, r in answers.items():
            assert r.status == 503 and r.headers.get("retry-after"), (route, r.status, r.body[:300])
            assert "try again" in r.json["error"], (route, r.json)
        assert admin.post(f"/api/v1/jobs/{job['id']}/cancel").status == 200  # and it works once released
    finally:
        stop_service(service)


def test_cancel_a_running_job_asks_its_worker(svc):
    admin = svc.client("admin")
    job = submit(admin, acquisition(svc.roots["drop"], "jdoe/a")).json
    assert svc.store.claim("w1").id == job["id"]
    r = admin.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert r.status == 200
    assert (r.json["state"], r.json["cancel_requested"]) == ("running", True)


def test_retry_a_failed_job(svc):
    admin = svc.client("admin")
    job = submit(admin, acquisition(svc.roots["drop"], "jdoe/a")).json
    svc.store.claim("w1")
    svc.store.fail(job["id"], "w1", PermanentImportError("unsupported file format"))
    failed = admin.get(f"/api/v1/jobs/{job['id']}").json
    assert failed["error"] == {"kind": "permanent", "message": "unsupported file format", "config_error": False,
                               "group": "unsupported file format"}
    r = admin.post(f"/api/v1/jobs/{job['id']}/retry")
    assert (r.status, r.json["state"], r.json["error"], r.json["attempts"]) == (200, "queued", None, 0)


# -- status, health, metrics, documents ------------------------------------------


def test_owner_limited_tokens_see_the_outbox_of_their_owners_mails_only(svc, make_spec):
    """Issue 15 outside test, finding 11: a token limited to owners saw every owner's outbox figures and
    problems (another owner's undeliverable mail). Same rule as the queue counts: their jobs' mails only."""
    import dataclasses
    from email.message import EmailMessage

    from watchfolder.store.base import Mail

    def mail(job_id, to):
        message = EmailMessage()
        message["From"], message["To"], message["Subject"] = "wf@example.org", to, f"job {job_id}"
        svc.store.outbox_add([Mail("job_failed", (to,), message)], job_id=job_id)

    jobs = {}
    for owner in ("jdoe", "bob"):
        jobs[owner], _ = svc.store.reject(dataclasses.replace(make_spec(owner=owner), idempotency_key=owner), "bad")
    mail(jobs["jdoe"].id, "jdoe@example.org")
    mail(jobs["bob"].id, "bob@example.org")
    mail(jobs["bob"].id, "bob2@example.org")
    mail(None, "admin@example.org")  # an admin digest: no job, no owner
    claimed = {m.recipients[0]: m for m in svc.store.outbox_claim(limit=10)}
    svc.store.outbox_failed(claimed["bob@example.org"].id, "550 no such user", permanent=True)
    for _ in range(svc.config.notify.retry.max_attempts):  # bob2's stays undelivered: the backlog problem
        svc.store.outbox_failed(claimed["bob2@example.org"].id, "421 try later", permanent=False, now=0)
        svc.store.outbox_claim(limit=10, now=time.time() + 10_000)
    svc.store.outbox_hold([claimed["bob2@example.org"].id], until=time.time() + 10_000)

    admin = svc.client("admin").get("/api/v1/status").json
    assert admin["outbox"]["counts"]["failed"] == 1 and admin["outbox"]["backlog"]["count"] == 1
    assert sum(admin["outbox"]["counts"].values()) == 4
    outbox_problems = [p for p in admin["problems"] if p.startswith("outbox: ")]
    assert outbox_problems[0] == "outbox: 1 mail(s) could not be sent" and "still undelivered" in outbox_problems[1]
    limited = svc.client("lab-reader").get("/api/v1/status").json  # jdoe and asmith
    assert sum(limited["outbox"]["counts"].values()) == 1 and limited["outbox"]["counts"]["failed"] == 0
    assert limited["outbox"]["backlog"]["count"] == 0
    assert not [p for p in limited["problems"] if p.startswith("outbox")]


def test_a_job_id_too_large_says_so(svc):
    """Issue 15 outside test, finding 12: the answer names the id as given and why it names no job."""
    r = svc.client("admin").get("/api/v1/jobs/99999999999999999999")
    assert r.status == 404
    assert "no job '99999999999999999999': the id is too large (job ids go up to 9223372036854775807)" in r.text
    r = svc.client("admin").get("/api/v1/jobs/0")
    assert r.status == 404 and "job ids are whole numbers from 1 to" in r.text


def test_status_view(svc):
    now = time.time()
    svc.store.set_component("worker", "w-fresh", {"state": "busy", "job_id": 3, "heartbeat_seconds": 5}, now=now)
    svc.store.set_component("worker", "w-stale", {"state": "idle", "heartbeat_seconds": 5}, now=now - 60)
    svc.store.set_component(
        "watcher", "drop", {"path": "/data/drop", "mode": "polling", "health": "ok", "pending": 2,
                            "events": 40, "rescans": 3, "last_event": now - 5, "last_scan": now - 50}, now=now)
    svc.store.set_component("watcher", "share", {"health": "unhealthy", "error": "/mnt/share does not exist"}, now=now)
    svc.store.set_component("watcher", "quiet", {"health": "ok"}, now=now - 7200)
    # The pending count is the store's pending list (what GET /pending lists), not the count a
    # watcher publishes (issue 15 outside test, finding 5): 2 acquisitions, 1 path not taken.
    from watchfolder.store.base import PendingEntry
    svc.store.pending_sync("drop", [
        PendingEntry("drop", "a", "waiting", "waiting for 1 of 2 files", now, now, owner="jdoe"),
        PendingEntry("drop", "b", "writing", "", now, now),
        PendingEntry("drop", "c.tmp", "excluded", "ignored: matches exclude pattern *.tmp", now, now),
    ], now=now)
    svc.store.set_component("importer", "archive", {"ok": False, "error": "archive root not writable"}, now=now)
    submit(svc.client("admin"), acquisition(svc.roots["drop"], "jdoe/a"))
    status = svc.client("reader").get("/api/v1/status").json
    assert status["queue"]["counts"]["queued"] == 1
    assert status["queue"]["oldest_queued_age"] >= 0
    workers = {w["name"]: w for w in status["workers"]}
    assert workers["w-fresh"]["healthy"] and workers["w-fresh"]["current_job"] == 3
    assert not workers["w-stale"]["healthy"] and "no heartbeat" in workers["w-stale"]["problem"]
    watchers = {w["name"]: w for w in status["watchers"]}
    assert watchers["drop"]["pending"] == 2 and watchers["drop"]["healthy"]
    assert watchers["drop"]["not_imported"] == 1 and status["pending"] == {"acquisitions": 2, "not_imported": 1}
    limited = svc.client("lab-reader").get("/api/v1/status").json  # jdoe's only, as GET /pending
    assert {w["name"]: w["pending"] for w in limited["watchers"]}["drop"] == 1
    assert limited["pending"] == {"acquisitions": 1, "not_imported": 0}
    assert watchers["drop"]["last_event_at"] == pytest.approx(now - 5)
    assert not watchers["share"]["healthy"] and watchers["share"]["problem"] == "/mnt/share does not exist"
    assert not watchers["quiet"]["healthy"] and "no report for" in watchers["quiet"]["problem"]
    assert status["importer"]["ok"] is False
    assert {d["label"] for d in status["disk"]} == {"data_dir", "archive"}
    assert all(d["free"] > 0 for d in status["disk"])
    assert not status["healthy"]
    assert any("w-stale" in p for p in status["problems"])
    assert any("archive root not writable" in p for p in status["problems"])


def test_health(svc):
    anonymous = svc.client()
    r = anonymous.get("/api/v1/health")
    assert r.status == 200 and r.json["status"] == "ok"
    now = time.time()
    svc.store.set_component("worker", "w1", {"state": "idle", "heartbeat_seconds": 5}, now=now)
    assert anonymous.get("/api/v1/health").status == 200
    svc.store.set_component("worker", "w1", {"state": "idle", "heartbeat_seconds": 5}, now=now - 60)  # dead for a minute; pruned after 10 min
    r = anonymous.get("/api/v1/health")
    assert r.status == 503
    assert r.json["checks"]["workers"]["ok"] is False and "w1" in r.json["checks"]["workers"]["detail"]
    svc.store.remove_component("worker", "w1")
    assert anonymous.get("/api/v1/health").status == 200


def test_health_is_503_when_the_store_is_gone(svc):
    svc.store.close()
    for suffix in ("", "-wal", "-shm"):
        path = svc.store.path.with_name(svc.store.path.name + suffix)
        if path.exists():
            path.unlink()
    svc.store.path.mkdir()  # where the database was, a folder: SQLite cannot open it
    r = svc.client().get("/api/v1/health")
    assert r.status == 503
    assert r.json["status"] == "unhealthy" and r.json["checks"]["store"]["ok"] is False
    assert "watchfolder_store_up 0.0" in svc.client().get("/metrics").text


def test_a_full_data_disk_is_503_with_the_reason_not_500(tmp_path):
    # Issue 11 follow-up C: a submission the full disk refuses was a 500 "see the server log".
    import subprocess

    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(data)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    svc = start_service(tmp_path)
    try:
        portal, anonymous = svc.client("portal"), svc.client()
        filler = data / "filler"
        fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
        for size in (65536, 4096, 1):  # to the last byte
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
        os.close(fd)
        statuses = []
        for n in range(200):  # the first ones may fit in the WAL's free pages
            r = submit(portal, acquisition(svc.roots["drop"], f"jdoe/full-{n}"), email="jdoe@example.org")
            statuses.append(r.status)
            if r.status != 202:
                break
        assert statuses[-1] == 503 and set(statuses[:-1]) <= {202}, statuses
        assert r.headers["retry-after"] and "no space left on the disk holding it" in r.json["error"]
        health = anonymous.get("/api/v1/health")
        assert health.status == 503
        assert health.json["checks"]["store"]["detail"].startswith(
            f"job database {svc.store.path}: no space left on the disk holding it ({data}, ")
        filler.unlink()
        r = submit(portal, acquisition(svc.roots["drop"], "jdoe/after"), email="jdoe@example.org")
        assert r.status == 202
        assert anonymous.get("/api/v1/health").status == 200
    finally:
        stop_service(svc)
        subprocess.run(["umount", "-l", str(data)], check=False)


def test_metrics(svc):
    admin = svc.client("admin")
    job = submit(admin, acquisition(svc.roots["drop"], "jdoe/a")).json
    submit(admin, acquisition(svc.roots["drop"], "jdoe/b"))
    svc.store.claim("w1")
    svc.store.succeed(job["id"], "w1", {"images": [1]}, progress=Progress("done", 600, 600, 1, 1))
    svc.store.set_component("watcher", "drop", {"health": "ok", "events": 17, "rescans": 2})
    r = svc.client().get("/metrics")
    assert r.status == 200
    lines = set(r.text.splitlines())
    assert 'watchfolder_jobs{state="succeeded"} 1.0' in lines
    assert 'watchfolder_jobs{state="queued"} 1.0' in lines
    assert "watchfolder_job_duration_seconds_count 1.0" in lines
    assert "watchfolder_imported_bytes_total 600.0" in lines
    assert 'watchfolder_watcher_events_total{watcher="drop"} 17.0' in lines
    assert 'watchfolder_watcher_rescans_total{watcher="drop"} 2.0' in lines
    assert 'watchfolder_outbox_mails{state="pending"} 0.0' in lines
    assert "watchfolder_store_up 1.0" in lines


def test_openapi_document_is_served_and_is_the_contract(svc):
    r = svc.client().get("/api/v1/openapi.yaml")
    assert r.status == 200
    assert r.body == OPENAPI.read_bytes()
    doc = yaml.safe_load(r.body)
    assert doc["openapi"].startswith("3.1")
    # The documented request examples are valid requests.
    example = doc["paths"]["/api/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]["example"]
    assert CONTRACT.check_request("post", "/api/v1/jobs", example) == []
    assert CONTRACT.check_request("post", "/api/v1/jobs", {"path": "/x", "bogus": 1}) != []


def test_every_reference_in_the_contract_resolves():
    refs = []

    def walk(node):
        if isinstance(node, dict):
            if "$ref" in node:
                refs.append(node["$ref"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(CONTRACT.doc)
    assert refs
    for ref in refs:
        CONTRACT._deref({"$ref": ref})  # raises KeyError for a dangling reference
    for template, item in CONTRACT.doc["paths"].items():
        for method, operation in item.items():
            if method in ("get", "post", "delete"):
                assert operation.get("operationId") and operation.get("responses"), f"{method} {template}"


def test_every_documented_route_answers(svc):
    """Each path of the contract exists on the server (no documented-but-missing route)."""
    admin = svc.client("admin")
    job = submit(admin, acquisition(svc.roots["drop"], "jdoe/a")).json
    concrete = {"{id}": str(job["id"]), "{importId}": str(job["id"]), "{file}": "dashboard.js"}
    for template, item in CONTRACT.doc["paths"].items():
        path = template
        for k, v in concrete.items():
            path = path.replace(k, v)
        for method in item:
            if method not in ("get", "post", "delete"):
                continue
            r = admin.request(method.upper(), path, check=False)
            assert r.status != 404 or "no such endpoint" not in r.text, f"{method} {template} is not served"
            assert r.status != 405, f"{method} {template} is not served"


def test_dashboard_page_and_static_files(svc):
    anonymous = svc.client()
    page = anonymous.get("/")
    assert page.status == 200 and page.headers["content-type"].startswith("text/html")
    assert "static/dashboard.js" in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert anonymous.get("/static/dashboard.js").headers["content-type"].startswith("text/javascript")
    assert anonymous.get("/static/dashboard.css").status == 200
    assert anonymous.get("/static/nope.js").status == 404
    assert anonymous.get("/static/..%2fapi.py").status == 404


def test_unknown_route_and_method_are_json(svc):
    client = svc.client("admin")
    r = client.get("/api/v1/nothing", check=False)
    assert r.status == 404 and json.loads(r.body)["error"].startswith("no such endpoint")
    r = client.request("DELETE", "/api/v1/jobs", check=False)
    assert r.status == 405 and "not allowed" in json.loads(r.body)["error"]


def test_concurrent_submissions_each_get_their_job_once(svc):
    """Many request threads at once (the enqueue group commit): no job lost, none doubled."""
    folders = [acquisition(svc.roots["drop"], f"jdoe/{i}") for i in range(12)]
    same = acquisition(svc.roots["drop"], "jdoe/same")
    barrier = threading.Barrier(24)
    results: dict[int, tuple[int, int]] = {}

    def go(i: int) -> None:
        client = svc.client("portal")
        barrier.wait(timeout=30)
        r = submit(client, folders[i] if i < 12 else same)
        results[i] = (r.status, r.json["id"])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    distinct = [results[i] for i in range(12)]
    assert all(status == 202 for status, _ in distinct)
    assert len({job_id for _, job_id in distinct}) == 12
    repeated = [results[i] for i in range(12, 24)]
    assert sorted(status for status, _ in repeated) == [200] * 11 + [202]
    assert len({job_id for _, job_id in repeated}) == 1
    assert svc.store.counts()["queued"] == 13


def test_server_binds_an_ephemeral_port_and_stops(tmp_path):
    from watchfolder.web.server import Server

    service = start_service(tmp_path)
    url, port = service.server.url, service.server.port
    assert port > 0 and url == f"http://127.0.0.1:{port}"
    assert service.client().get("/api/v1/health").status == 200
    stop_service(service)
    with socket.socket() as s:  # the port is free again
        s.bind(("127.0.0.1", port))
    # serve_forever in a thread of our own, stopped from outside
    store = SQLiteStore.from_config(service.config)
    other = Server(service.config, create_app(service.config, store))
    runner = threading.Thread(target=other.serve_forever)
    runner.start()
    try:
        assert Client(other.url).get("/api/v1/health").status == 200
    finally:
        other.stop()
        runner.join(timeout=10)
        store.close()
    assert not runner.is_alive()


def test_listen_conflict_names_the_address(tmp_path):
    from watchfolder.web.server import Server

    service = start_service(tmp_path)
    try:
        with pytest.raises(WatchfolderError, match=f"127.0.0.1:{service.server.port}"):
            Server(service.config, create_app(service.config, service.store), listen=f"127.0.0.1:{service.server.port}")
    finally:
        stop_service(service)


def test_run_token_is_only_made_for_a_loopback_server_without_tokens(make_config):
    import urllib.request

    from watchfolder.service import Parts, Service

    parts = Parts(workers=False, watch=False, server=True, mail=False)
    service = Service(make_config(server={"enabled": True, "listen": "127.0.0.1:0"}), parts)
    service.start()
    try:
        request = urllib.request.Request(service.server.url + "/api/v1/status",
                                         headers={"Authorization": f"Bearer {service.run_token}"})
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200
    finally:
        service.stop()
    configured = make_config(server={"enabled": True, "listen": "127.0.0.1:0", "tokens": [
        {"name": "ops", "role": "admin", "hash": "sha256:" + "0" * 64}]})
    service = Service(configured, parts)
    service.start()
    try:
        assert service.run_token is None
    finally:
        service.stop()


def test_a_port_in_use_stops_the_service_cleanly_with_the_reason(make_config):
    from watchfolder.errors import ConfigError
    from watchfolder.service import Service

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        config = make_config(server={"enabled": True, "listen": f"127.0.0.1:{port}"})
        service = Service(config)
        with pytest.raises(ConfigError, match="Address already in use"):
            service.start()
        # Nothing that keeps the process alive was left running (workers are not daemon threads).
        assert service.pool is None
        lingering = [t.name for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
        assert lingering == []


def test_health_is_503_not_500_when_the_wal_is_deleted_under_it(svc, caplog):
    # Outside test a11 F3: `rm watchfolder.db-wal` under a running service made every
    # health poll a 500 ("disk I/O error", a traceback per poll). The store now finds the
    # -wal it has open gone (SQLiteStore.check_file, the health tick): 503 naming it, one
    # CRITICAL line, no traceback.
    svc.store.set_component("worker", "w1", {"state": "idle", "heartbeat_seconds": 5}, now=time.time())
    for _ in range(12):  # every server thread has its connection open, as in a running service
        assert svc.client().get("/api/v1/health").status == 200
    wal = svc.store.path.with_name(svc.store.path.name + "-wal")
    wal.unlink()
    answers = [svc.client().get("/api/v1/health") for _ in range(6)]
    assert [r.status for r in answers] == [503] * 6, [(r.status, r.body[:200]) for r in answers]
    store = answers[-1].json["checks"]["store"]
    assert store["ok"] is False and "lost its -wal file" in store["detail"], store
    assert answers[-1].headers.get("retry-after")
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    said = [r for r in caplog.records if "-wal" in r.getMessage() and r.levelno >= 30]
    assert len(said) == 1, [r.getMessage() for r in said]  # once, not per poll


def test_health_is_503_not_500_when_a_read_fails_after_the_ping(svc, caplog):
    # The same kind: the store answered the ping, then a read failed ("disk I/O error", as
    # SQLite gave it there): 503 with the error, said once per streak, no traceback.
    svc.store.set_component("worker", "w1", {"state": "idle", "heartbeat_seconds": 5}, now=time.time())
    real = svc.store.components

    def failing(kind=None):
        raise sqlite3.OperationalError("disk I/O error")

    svc.store.components = failing
    try:
        answers = [svc.client().get("/api/v1/health") for _ in range(6)]
    finally:
        svc.store.components = real
    assert [r.status for r in answers] == [503] * 6, [(r.status, r.body[:200]) for r in answers]
    store = answers[-1].json["checks"]["store"]
    assert store["ok"] is False and "disk I/O error" in store["detail"], store
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log"
    said = [r for r in caplog.records if "health" in r.getMessage() and r.levelno >= 30]
    assert len(said) == 1, [r.getMessage() for r in said]  # once per streak, not per poll
    assert svc.client().get("/api/v1/health").status == 200  # and back once the store answers


def test_health_names_the_error_when_the_database_does_not_answer(svc):
    # The -wal deleted before a server thread opened its connection: the health tick names
    # what happened (the file the store had open is gone), not only SQLite's I/O error.
    wal = svc.store.path.with_name(svc.store.path.name + "-wal")
    svc.store.set_component("worker", "w1", {"state": "idle", "heartbeat_seconds": 5}, now=time.time())
    wal.unlink()
    r = svc.client().get("/api/v1/health")
    assert r.status == 503, r.body
    detail = r.json["checks"]["store"]["detail"]
    assert "lost its -wal file" in detail and "start them again" in detail, detail


def test_annotation_keys_and_values_are_capped_naming_the_field_and_the_cap(svc):
    # Outside test a10 F6: a 900,000-character key was queued and mailed (a 1.8 MB mail).
    portal = svc.client("portal")
    folder = acquisition(svc.roots["drop"], "jdoe/long-annotations")
    long_key = "k" * 900_000
    r = submit(portal, folder, annotations={long_key: "v", "note": "x" * 5000, "ok": "63x"})
    assert r.status == 422, r.status
    problems = {p["field"]: p["message"] for p in r.json["detail"]}
    assert set(problems) == {"annotations." + "k" * 40 + "…", "annotations.note"}, list(problems)
    assert "at most 255 characters, got 900000" in problems["annotations." + "k" * 40 + "…"]
    assert "at most 4096 characters, got 5000" in problems["annotations.note"]
    assert len(r.body) < 2000  # the refusal does not echo the key
    assert svc.store.counts()["queued"] == 0
    r = submit(portal, folder, annotations={"k" * 255: "x" * 4096})
    assert r.status == 202, r.json


def test_a_manifest_with_an_over_long_annotation_is_refused(svc):
    # The same cap for annotations from the acquisition's own manifest (watch folders and the API).
    folder = svc.roots["drop"] / "jdoe" / "manifest-annotations"
    write_manifest(folder, {"a.tif": b"x"}, annotations={"k" * 300: "v"})
    r = submit(svc.client("portal"), folder)
    assert r.status == 422, r.status
    assert "at most 255 characters, got 300" in r.text and "k" * 300 not in r.text
