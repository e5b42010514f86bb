"""Events out: CloudEvents in the store, Standard Webhooks delivery to a real receiver, GET /api/v1/events.

Every job runs through a real Service (worker threads, archive importer, the
event dispatcher); the receiver is a real HTTP server that verifies each
signature with the ``standardwebhooks`` package, as a LIMS would.
"""

from __future__ import annotations

import email
import email.policy
import os
import threading
import urllib.parse

import pytest
from api_support import start_service, stop_service
from events_support import SECRET, Receiver
from helpers import wait_until

from watchfolder.events.cloudevents import envelope
from watchfolder.service import Parts, Service

JOBS = int(os.environ.get("WATCHFOLDER_EVENTS_JOBS", "40"))
LIFECYCLE = ["queued", "running", "succeeded"]


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.stop()


def events_config(make_config, receiver: Receiver, **webhook):
    hook = {"name": "lims", "url": receiver.url, "secret": SECRET, **webhook}
    return make_config(
        events={"webhooks": [hook], "retry": {"backoff": [0.1, 0.2]}},
        workers={"count": 2, "poll_interval": 0.05},
    )


def finished(receiver: Receiver, jobs) -> dict[int, list[str]] | None:
    """The receiver's events by job once every job's last one is ``succeeded``, else None."""
    by_job = receiver.by_job()
    return by_job if all(by_job.get(j.id, [])[-1:] == ["succeeded"] for j in jobs) else None


def run_service(config) -> Service:
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    service.start()
    service.dispatcher.poll_interval = 0.05
    return service


def test_every_job_state_change_reaches_the_webhook_signed_and_in_order(make_config, make_spec, receiver):
    config = events_config(make_config, receiver)
    service = run_service(config)
    try:
        jobs = [service.store.enqueue(make_spec(files={f"img_{i}.tif": b"x" * (i + 1)}))[0] for i in range(JOBS)]
        by_job = wait_until(lambda: finished(receiver, jobs), timeout=60, message="all succeeded")
    finally:
        service.stop()
    assert {j.id: by_job[j.id] for j in jobs} == {j.id: LIFECYCLE for j in jobs}
    assert receiver.rejected == []
    first = next(e for e in receiver.events() if e["type"] == "org.watchfolder.job.succeeded")
    assert first["specversion"] == "1.0" and first["source"] == "urn:watchfolder"
    assert first["datacontenttype"] == "application/json" and first["time"].endswith("Z")
    assert first["_headers"]["webhook-id"] == first["id"]
    data = first["data"]
    assert data["state"] == "succeeded" and data["owner"] == "jdoe" and data["result"]["destination"]
    assert "files" not in data["result"]
    # Ids increase in delivery order: one sink delivers in the store's order.
    ids = [int(e["id"]) for e in receiver.events()]
    assert ids == sorted(ids)


def test_receiver_down_then_up_loses_nothing_and_repeats_only_with_the_same_id(make_config, make_spec, receiver):
    config = events_config(make_config, receiver)
    service = run_service(config)
    try:
        jobs = [service.store.enqueue(make_spec(files={f"a{i}.tif": b"y" * (i + 1)}))[0] for i in range(JOBS // 2)]
        wait_until(lambda: len(receiver.events()) >= 5, timeout=30, message="first deliveries")
        receiver.stop()  # killed mid-run: connections refused
        more = [service.store.enqueue(make_spec(files={f"b{i}.tif": b"z" * (i + 1)}))[0] for i in range(JOBS // 2)]
        wait_until(lambda: service.store.counts()["succeeded"] == JOBS, timeout=60, message="jobs done")
        (sink,) = service.store.sinks()
        wait_until(lambda: service.store.sinks()[0]["failing_since"] is not None, timeout=10,
                   message="the sink records the outage")
        receiver.start()  # back on the same port
        by_job = wait_until(lambda: finished(receiver, jobs + more), timeout=60,
                            message="every event after the restart")
        assert service.store.sinks()[0]["failing_since"] is None
    finally:
        service.stop()
    assert all(by_job[j.id] == LIFECYCLE for j in jobs + more)
    delivered_ids = {e["id"] for e in receiver.events()}
    stored = {str(e["id"]) for e in service.store.events_after(0, limit=10_000) if e["subject"].startswith("job/")}
    assert stored <= delivered_ids  # none lost


def test_a_failing_endpoint_is_disabled_with_one_admin_mail_and_resumes_where_it_stopped(
    make_config, make_spec, receiver
):
    receiver.fail_with = 503
    config = events_config(make_config, receiver, disable_after=0.5)
    service = run_service(config)
    try:
        job, _ = service.store.enqueue(make_spec())
        wait_until(lambda: service.store.sinks() and service.store.sinks()[0]["disabled_at"], timeout=30,
                   message="the sink is disabled")
        (sink,) = service.store.sinks()
        assert sink["name"] == "webhook:lims" and "503" in sink["last_error"]
        alerts = wait_until(lambda: [m for m in service.store.outbox_list() if m.kind == "admin_alert"],
                            timeout=10, message="the admin's mail")
        assert len(alerts) == 1 and "webhook:lims" in alerts[0].subject
        text = email.message_from_bytes(alerts[0].raw, policy=email.policy.default).get_body(("plain",))
        assert "watchfolder events enable webhook:lims" in text.get_content()
        receiver.fail_with = None
        wait_until(lambda: service.store.counts()["succeeded"] == 1, timeout=30)
        assert receiver.events() == []  # disabled: nothing goes out
        service.store.sink_reset("webhook:lims")
        wait_until(lambda: receiver.by_job().get(job.id) == LIFECYCLE, timeout=30, message="resumed")
    finally:
        service.stop()


def test_filters_by_type_and_owner(make_config, make_spec, receiver):
    config = events_config(make_config, receiver, types=["org.watchfolder.job.succeeded"], owners=["alice"])
    service = run_service(config)
    try:
        mine, _ = service.store.enqueue(make_spec(owner="alice"))
        other, _ = service.store.enqueue(make_spec(owner="jdoe"))
        wait_until(lambda: service.store.counts()["succeeded"] == 2, timeout=30)
        wait_until(lambda: receiver.events(), timeout=10)
        last = service.store.last_event_id()
        wait_until(lambda: service.store.sinks()[0]["last_id"] == last, timeout=10, message="all passed over")
    finally:
        service.stop()
    assert [(e["subject"], e["type"]) for e in receiver.events()] == [
        (f"job/{mine.id}", "org.watchfolder.job.succeeded")
    ]


def test_progress_milestones_become_events(make_config, make_spec, receiver):
    config = make_config(
        events={"webhooks": [{"url": receiver.url, "secret": SECRET}], "progress_milestones": [50],
                "progress_min_bytes": 2 * 1024 * 1024},
        workers={"poll_interval": 0.05},
    )
    service = run_service(config)
    try:
        job, _ = service.store.enqueue(make_spec(files={"big.tif": b"p" * (3 * 1024 * 1024)}))
        small, _ = service.store.enqueue(make_spec(files={"small.tif": b"p" * (1024 * 1024)}))
        wait_until(lambda: finished(receiver, [job, small]), timeout=30)
    finally:
        service.stop()
    assert receiver.by_job()[job.id] == ["queued", "running", "progress", "succeeded"]
    assert receiver.by_job()[small.id] == LIFECYCLE  # under progress_min_bytes: no milestone
    progress = next(e for e in receiver.events() if e["type"].endswith("progress"))
    assert progress["data"]["percent"] == 50 and progress["data"]["bytes_total"] == 3 * 1024 * 1024


def test_signatures_fail_with_another_secret(make_config, make_spec):
    wrong = Receiver(secret="whsec_" + "QUJD" * 11)  # a receiver that holds another secret
    try:
        config = make_config(events={"webhooks": [{"url": wrong.url, "secret": SECRET}]})
        service = run_service(config)
        try:
            service.store.enqueue(make_spec())
            wait_until(lambda: wrong.rejected, timeout=30, message="a rejected delivery")
        finally:
            service.stop()
        assert wrong.received == [] and "signature" in wrong.rejected[0].lower()
    finally:
        wrong.stop()


# -- GET /api/v1/events ------------------------------------------------------------


@pytest.fixture
def api(tmp_path):
    svc = start_service(tmp_path)
    yield svc
    stop_service(svc)


def test_events_endpoint_pages_and_scopes_by_owner(api, make_spec):
    store = api.store
    for owner in ("jdoe", "asmith", "bob", "jdoe"):
        job, _ = store.enqueue(make_spec(owner=owner))
        store.claim("w")
        store.succeed(job.id, "w", {"archive_path": f"/a/{owner}"})
    store.set_component("watcher", "lsm", {"health": "ok", "path": "/drop"})
    admin = api.client("admin").get("/api/v1/events?limit=5")
    assert admin.status == 200
    page = admin.json
    assert len(page["events"]) == 5 and page["has_more"] is True
    rest = api.client("admin").get(f"/api/v1/events?after={page['next_after']}&limit=500").json
    every = page["events"] + rest["events"]
    assert rest["has_more"] is False and len(every) == 13  # 4 jobs x 3 changes + 1 watcher event
    assert [int(e["id"]) for e in every] == sorted(int(e["id"]) for e in every)
    assert every == [envelope(e, "urn:watchfolder") for e in store.events_after(0)]
    lab = api.client("lab-reader").get("/api/v1/events?limit=500").json["events"]
    assert {e["data"]["owner"] for e in lab} == {"jdoe", "asmith"}  # no bob, no watcher events
    assert api.client("portal").get("/api/v1/events").json["events"] == []  # submitted nothing


def test_a_position_past_the_newest_event_is_a_conflict_not_an_empty_page(api, make_spec):
    job, _ = api.store.enqueue(make_spec())
    newest = api.store.last_event_id()
    assert api.client("admin").get(f"/api/v1/events?after={newest}").json["events"] == []
    answer = api.client("admin").get(f"/api/v1/events?after={newest + 1000}")
    assert answer.status == 409  # a poller restored against another store would otherwise wait forever
    assert "after=0" in answer.json["error"] and str(newest) in answer.json["error"]


@pytest.mark.parametrize("query", [{"after": "-1"}, {"after": "9" * 30}, {"limit": "0"}, {"limit": "x"},
                                   {"since": "1"}])
def test_events_endpoint_refuses_bad_parameters(api, query):
    answer = api.client("admin").get("/api/v1/events?" + urllib.parse.urlencode(query))
    assert answer.status == 422
    assert answer.json["detail"][0]["field"] == next(iter(query))


def test_sinks_are_registered_before_any_job_can_be_queued(make_config, make_spec, receiver, monkeypatch):
    # A new sink starts after the newest event. Registered lazily by the dispatcher's first
    # pass, it skipped the events of jobs queued and started before that pass (seen under load).
    from watchfolder.events.dispatcher import EventDispatcher

    passes = threading.Event()
    real_run = EventDispatcher.run

    def late_run(self, stop):  # the dispatcher thread is scheduled late, as under load
        passes.wait(30)
        real_run(self, stop)

    monkeypatch.setattr(EventDispatcher, "run", late_run)
    config = events_config(make_config, receiver)
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    before = service.store.last_event_id()
    service.start()
    try:
        job, _ = service.store.enqueue(make_spec())
        wait_until(lambda: service.store.counts()["succeeded"] == 1, timeout=30)
        assert [(s["name"], s["last_id"]) for s in service.store.sinks()] == [("webhook:lims", before)]
        passes.set()
        wait_until(lambda: finished(receiver, [job]), timeout=30)
    finally:
        passes.set()
        service.stop()
    assert receiver.by_job()[job.id] == LIFECYCLE


def test_a_redirect_is_not_a_delivery(make_config, make_spec, receiver):
    # Following a 302 turned the POST into a GET without the event, and counted it delivered.
    elsewhere = Receiver()
    receiver.redirect_to = elsewhere.url
    config = events_config(make_config, receiver)
    service = run_service(config)
    try:
        service.store.enqueue(make_spec())
        wait_until(lambda: (s := service.store.sinks()) and s[0]["last_error"], timeout=30, message="a failure")
        (sink,) = service.store.sinks()
        assert "302" in sink["last_error"] and elsewhere.url in sink["last_error"] and sink["delivered"] == 0
        receiver.redirect_to = None
        wait_until(lambda: service.store.sinks()[0]["delivered"] == 3, timeout=30, message="delivered once fixed")
    finally:
        service.stop()
        elsewhere.stop()
    assert elsewhere.events() == [] and [e["type"].rsplit(".", 1)[1] for e in receiver.events()] == LIFECYCLE


def test_a_hanging_endpoint_delays_only_its_own_events(make_config, make_spec, receiver):
    fast = Receiver()
    receiver.hold = threading.Event()  # this endpoint never answers until released
    config = make_config(
        events={"webhooks": [{"name": "slow", "url": receiver.url, "secret": SECRET, "timeout": 30},
                             {"name": "fast", "url": fast.url, "secret": SECRET}]},
        workers={"poll_interval": 0.05},
    )
    service = run_service(config)
    try:
        jobs = [service.store.enqueue(make_spec(files={f"h{i}.tif": b"h" * (i + 1)}))[0] for i in range(3)]
        wait_until(lambda: finished(fast, jobs), timeout=30, message="the fast endpoint gets every event")
        assert receiver.events() == []
        receiver.hold.set()
        wait_until(lambda: finished(receiver, jobs), timeout=60, message="the slow one catches up")
    finally:
        receiver.hold.set()
        service.stop()
        fast.stop()
