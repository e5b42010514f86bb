"""Issue 10, case 2: every route × every kind of token; an owner limit holds on every one of them.

The routes come from the application itself, so a route added later without an
entry here fails ``test_every_route_is_covered``.
"""

from __future__ import annotations

from email.message import EmailMessage

import pytest
from api_support import TOKEN_SPECS, acquisition, start_service, stop_service

from watchfolder.store.base import Mail
from watchfolder.web.app import create_app
from watchfolder.web.seed import import_id

TOKENS = {
    **TOKEN_SPECS,
    "jdoe-admin": ("admin", ("jdoe",), ()),
    "jdoe-reader": ("read", ("jdoe",), ()),
}
OWNER_LIMITED = ("jdoe-admin", "jdoe-reader", "jdoe-only", "lab-reader")  # none of them may see alice
KINDS = [None, *TOKENS]

# rule -> path, with {id} for alice's failed job and {mail} for the failed mail about it (None: not per owner)
ROUTES = {
    ("POST", "/api/v1/jobs"): None,  # submitting: covered by the owner checks of the submit tests
    ("GET", "/api/v1/jobs"): "/api/v1/jobs?limit=500",
    ("GET", "/api/v1/jobs/<ident>"): "/api/v1/jobs/{id}",
    ("GET", "/api/v1/jobs/<ident>/log"): "/api/v1/jobs/{id}/log",
    ("POST", "/api/v1/jobs/<ident>/retry"): "/api/v1/jobs/{id}/retry",
    ("POST", "/api/v1/jobs/<ident>/cancel"): "/api/v1/jobs/{id}/cancel",
    ("POST", "/api/v1/jobs/<ident>/dismiss"): "/api/v1/jobs/{id}/dismiss",
    ("GET", "/api/v1/pending"): None,  # owner-scoped entries, not jobs: tests/test_api_pending.py
    ("GET", "/api/v1/throughput"): None,  # counts only, no job
    ("GET", "/api/v1/events"): "/api/v1/events?limit=500",
    ("GET", "/api/v1/status"): None,  # counts only, no job
    ("GET", "/api/v1/whoami"): None,
    ("GET", "/api/v1/health"): None,
    ("GET", "/api/v1/openapi.yaml"): None,
    ("GET", "/metrics"): None,
    ("GET", "/"): None,
    ("GET", "/static/<name>"): None,
    ("POST", "/ome/import"): None,  # no token: the OMERO session is the credential
    ("GET", "/ome/import/<ident>"): None,  # an unguessable UUID is the credential
    ("GET", "/ome/failed/import"): "/ome/failed/import",
    ("GET", "/ome/failed/import/<ident>"): "/ome/failed/import/{id}",
    ("DELETE", "/ome/failed/import/<ident>"): "/ome/failed/import/{id}",
    ("GET", "/ome/failed/mail"): "/ome/failed/mail",
    ("GET", "/ome/failed/mail/<ident>"): "/ome/failed/mail/{mail}",
    ("DELETE", "/ome/failed/mail/<ident>"): "/ome/failed/mail/{mail}",
}


@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    service = start_service(tmp_path_factory.mktemp("authz"), token_specs=TOKENS)
    folder = acquisition(service.roots["drop"], "alice-1", owner="alice")
    r = service.client("portal").post("/api/v1/jobs", {"path": str(folder)})
    assert r.status == 202
    job, _ = service.store.reject(
        service.store.get(r.json["id"]).spec.__class__(**{**service.store.get(r.json["id"]).spec.__dict__,
                                                          "idempotency_key": "alice-failed"}),
        "failed on purpose for the authorisation test",
    )
    service.alice = job
    service.mails = {
        "alice": failed_mail(service.store, "alice@example.org", job.id),
        "digest": failed_mail(service.store, "admin@example.org", None),
    }
    jdoe = acquisition(service.roots["drop"], "jdoe-1", owner="jdoe")
    r = service.client("portal").post("/api/v1/jobs", {"path": str(jdoe)})
    assert r.status == 202
    service.mails["jdoe"] = failed_mail(service.store, "jdoe@example.org", r.json["id"])
    service.alice_mail = service.mails["alice"]
    yield service
    stop_service(service)


def failed_mail(store, to: str, job_id: int | None) -> int:
    """A mail the SMTP server refused for good (a failed outbox mail) of ``job_id``; its id."""
    msg = EmailMessage()
    msg["From"], msg["To"], msg["Subject"] = "watchfolder@example.org", to, f"mail to {to}"
    msg.set_content("body")
    store.outbox_add([Mail("job_succeeded", (to,), msg)], job_id=job_id)
    mail_id = max(m.id for m in store.outbox_list())
    assert mail_id in {m.id for m in store.outbox_claim(limit=100)}
    store.outbox_failed(mail_id, f"550 5.1.1 <{to}>: user unknown", permanent=True)
    return mail_id


def test_every_route_is_covered(svc):
    app = create_app(svc.config, svc.store)
    routes = {(r.method, r.rule) for r in app.routes}
    assert routes == set(ROUTES), f"routes without an authorisation case: {routes ^ set(ROUTES)}"


# Writes by unlimited tokens would change alice's job under the other cases: their
# effect is tested in test_api/test_seed; here every kind reads, the limited ones also write.
CASES = [(kind, method, rule) for (method, rule), path in ROUTES.items() if path for kind in KINDS
         if method == "GET" or kind is None or kind in OWNER_LIMITED]


@pytest.mark.parametrize(("kind", "method", "rule"), CASES)
def test_owner_limited_tokens_never_reach_another_owners_job(svc, kind, method, rule):
    alice = svc.alice
    template = ROUTES[(method, rule)]
    per_job = "{id}" in template or "{mail}" in template
    limited = kind is None or kind in OWNER_LIMITED
    mail = svc.mails["alice"]
    r = (svc.client(kind) if kind else svc.client()).request(method, template.format(id=alice.id, mail=mail))
    listed = r.status < 300 and (f'"id":{alice.id},' in r.text or f'"job_id":{alice.id},' in r.text
                                 or f'/ome/failed/import/{import_id(alice)}"' in r.text
                                 or f'/ome/failed/mail/{mail}"' in r.text or "alice@example.org" in r.text)
    if limited:
        if per_job:
            assert r.status in (401, 403, 404) or (method == "DELETE" and r.status == 204), (kind, r.status)
        assert not listed, f"{kind} sees alice's job on {method} {template}"
        assert svc.store.get(alice.id).dismissed_at is None, f"{kind} dismissed alice's failed job"
        assert svc.store.get(alice.id).state.value == "failed", f"{kind} changed alice's job"
        assert svc.alice_mail in [m.id for m in svc.store.outbox_list(state="failed")], \
            f"{kind} dismissed alice's failed mail"
    elif kind == "admin":
        # The positive control: the unlimited admin does reach it, so the checks above can fail.
        assert r.status == 200 and (per_job or listed), r.text[:300]


def test_failed_mails_of_no_job_only_for_unlimited_admins_and_own_mails_for_limited_ones(svc):
    mails = svc.mails
    everything = svc.client("admin").get("/ome/failed/mail").json
    assert set(everything) >= {f"/ome/failed/mail/{m}" for m in mails.values()}
    limited = svc.client("jdoe-admin")
    assert limited.get("/ome/failed/mail").json == [f"/ome/failed/mail/{mails['jdoe']}"]
    assert limited.get(f"/ome/failed/mail/{mails['jdoe']}").status == 200
    assert limited.get(f"/ome/failed/mail/{mails['digest']}").status == 404
    assert svc.client("admin").get(f"/ome/failed/mail/{mails['digest']}").status == 200


def test_counts_charts_and_pending_of_the_status_view_are_scoped_to_the_tokens_owners(tmp_path):
    """GET /status and /throughput: an owner-limited token counts and lists its owners' only (finding 2)."""
    from watchfolder.store.base import PendingEntry
    service = start_service(tmp_path, token_specs=TOKENS)
    try:
        store = service.store
        for owner in ("alice", "alice", "jdoe"):
            folder = acquisition(service.roots["drop"], f"{owner}-{len(store.list_jobs()[0])}", owner=owner)
            assert service.client("admin").post("/api/v1/jobs", {"path": str(folder)}).status == 202
        job = store.claim("w1")  # alice's first: running, then succeeded
        assert job.owner == "alice"
        store.succeed(job.id, "w1", {"archive_path": "/x"})
        store.set_component("worker", "w1", {"state": "busy", "job_id": store.list_jobs()[0][1].id})
        pending = [{"path": "a-acq", "since": 1.0, "last_change": 1.0, "waiting": "waiting", "owner": "alice"},
                   {"path": "nobody", "since": 1.0, "last_change": 1.0, "waiting": "excluded", "owner": None},
                   {"path": "j-acq", "since": 1.0, "last_change": 1.0, "waiting": "waiting", "owner": "jdoe"}]
        store.set_component("watcher", "drop", {"health": "ok", "pending": 3, "pending_acquisitions": pending})
        store.pending_sync("drop", [PendingEntry("drop", p["path"], "waiting", "w", 1.0, 1.0, owner=p["owner"])
                                    for p in pending])

        def view(kind):
            status = service.client(kind).get("/api/v1/status")
            chart = service.client(kind).get("/api/v1/throughput?hours=24")
            assert status.status == 200 and chart.status == 200, (kind, status.text, chart.text)
            (watcher,) = status.json["watchers"]
            return (status.json["queue"]["counts"], [p["path"] for p in watcher["pending_acquisitions"]],
                    watcher["pending"], sum(b["jobs"] for b in chart.json["buckets"]),
                    [w["current_job"] for w in status.json["workers"]])

        counts, paths, n, done, current = view("admin")  # the positive control: everything
        assert (counts["queued"], counts["succeeded"], paths, n, done) == (2, 1, ["a-acq", "nobody", "j-acq"], 3, 1)
        assert current == [store.list_jobs()[0][1].id]
        for kind in ("jdoe-admin", "jdoe-reader", "lab-reader"):
            counts, paths, n, done, current = view(kind)
            assert (counts["queued"], counts["succeeded"], paths, n, done) == (1, 0, ["j-acq"], 1, 0), kind
            assert current == [None], kind  # the worker imports one of alice's
    finally:
        stop_service(service)
