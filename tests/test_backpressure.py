"""Back-pressure: the cap on concurrent imports, the probe-checked circuit breaker, the archive's free space.

Jobs run through real workers and a real SQLite store. The OMERO side of this
(the double switched down) is in ``tests/omero/test_omero_backpressure.py``;
here the target is the archive volume, or a small importer whose target we
switch off and on (the importer boundary: what a real server does is covered
against the double).
"""

from __future__ import annotations

import email
import email.policy
import threading
from typing import Any

import pytest
from helpers import wait_until

from watchfolder.backpressure import TargetGate
from watchfolder.errors import PermanentImportError, TransientImportError
from watchfolder.importers.base import Importer
from watchfolder.service import Parts, Service
from watchfolder.status import collect_status
from watchfolder.web.metrics import exposition, make_registry
from watchfolder.worker import WorkerPool


class SwitchableTarget(Importer):
    """An importer whose target can be taken down: then jobs fail as "unavailable" and probes fail.

    ``hold`` keeps every job running until it is set (to see how many run at once);
    ``broken`` names jobs whose own files break the connection while the target is up.
    """

    name = "switchable"

    def __init__(self, cap: int | None = None):
        self.down = False
        self.cap = cap
        self.hold = threading.Event()
        self.hold.set()
        self.running = 0
        self.peak = 0
        self.probes = 0
        self.broken: set[int] = set()
        self.lock = threading.Lock()

    def target(self) -> str:
        return "switchable:test"

    def max_concurrent(self) -> int | None:
        return self.cap

    def probe(self) -> str | None:
        self.probes += 1
        return "connection refused" if self.down else None

    def run(self, job, ctx) -> dict[str, Any]:
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            self.hold.wait(30)
            if self.down or job.id in self.broken:
                raise TransientImportError("lost the connection to the server", unavailable=True)
            return {"ok": True}
        finally:
            with self.lock:
                self.running -= 1


def pool_for(store, importer, *, workers=3, after_failures=3, probe_interval=0.05, alert=None):
    gate = TargetGate(importer, after_failures=after_failures, probe_interval=probe_interval,
                      alert_after=0.0, store=store, alert=alert)
    pool = WorkerPool(store, importer, workers, poll_interval=0.02, heartbeat_seconds=0.5, gate=gate)
    return gate, pool


def test_an_outage_pauses_the_target_and_burns_no_attempt(store, make_spec):
    importer = SwitchableTarget()
    alerts: list[tuple[str, bool]] = []
    gate, pool = pool_for(store, importer, alert=lambda target, status, resumed: alerts.append((target, resumed)))
    importer.down = True
    jobs = [store.enqueue(make_spec(files={f"f{i}.tif": b"x" * (i + 1)}))[0] for i in range(12)]
    pool.start()
    try:
        wait_until(lambda: gate.paused, timeout=10, message="the target pauses")
        wait_until(lambda: store.counts()["running"] == 0, timeout=10)
        wait_until(lambda: any(c["status"]["paused"] for c in store.components("target")), timeout=10,
                   message="the pause published")
        # Jobs wait in the queue, none is failing or waiting for a retry, no attempt is used.
        assert store.counts()["queued"] == 12 and store.counts()["retry_wait"] == 0
        assert all(store.get(j.id).attempts == 0 for j in jobs)
        (target,) = store.components("target")
        assert target["status"]["paused"] is True and "connection refused" in target["status"]["reason"]
        importer.down = False
        wait_until(lambda: store.counts()["succeeded"] == 12, timeout=20, message="resumed and drained")
    finally:
        pool.stop(5)
    assert all(store.get(j.id).attempts == 1 for j in jobs)
    assert not gate.paused and importer.probes >= 2
    assert alerts == [("switchable:test", False), ("switchable:test", True)]
    released = [h.message for h in store.get(jobs[0].id).history if "paused" in h.message]
    assert released == [] or "attempt not counted" in released[0]


def test_a_job_that_breaks_the_connection_while_the_server_is_up_still_fails(store, make_spec):
    importer = SwitchableTarget()
    gate, pool = pool_for(store, importer, workers=1, after_failures=99)
    store.retry_policy = store.retry_policy.__class__(3, (0.0,))
    job, _ = store.enqueue(make_spec())
    importer.broken.add(job.id)
    pool.start()
    try:
        done = wait_until(lambda: (j := store.get(job.id)).state.finished and j, timeout=20)
    finally:
        pool.stop(5)
    assert done.state == "failed" and done.attempts == 3  # the probe said the server is up: its own fault
    assert not gate.paused


class MisconfiguredTarget(SwitchableTarget):
    """Every job fails with a configuration error while ``wrong`` says why (e.g. an account
    without a privilege); the probe finds it when ``probe_sees`` (issue 14, low d)."""

    def __init__(self, wrong: str | None, probe_sees: bool = True):
        super().__init__()
        self.wrong = wrong
        self.probe_sees = probe_sees

    def probe(self) -> str | None:
        self.probes += 1
        return self.wrong if self.probe_sees else None

    def run(self, job, ctx) -> dict[str, Any]:
        if self.wrong:
            raise PermanentImportError(f"refused: {self.wrong}", config_error=True)
        return {"ok": True}


def test_a_configuration_error_pauses_the_target_and_mails_at_once(store, make_spec):
    importer = MisconfiguredTarget("the account lacks the Sudo privilege; grant it")
    alerts: list[tuple[bool, dict]] = []
    gate = TargetGate(importer, after_failures=3, probe_interval=0.05, alert_after=3600.0, store=store,
                      alert=lambda target, status, resumed: alerts.append((resumed, status)))
    pool = WorkerPool(store, importer, 2, poll_interval=0.02, heartbeat_seconds=0.5, gate=gate)
    jobs = [store.enqueue(make_spec(files={f"f{i}.tif": b"x" * (i + 1)}))[0] for i in range(5)]
    pool.start()
    try:
        wait_until(lambda: gate.paused, timeout=10, message="the target pauses")
        wait_until(lambda: store.counts()["running"] == 0, timeout=10)
        assert gate.status()["cause"] == "configuration"
        assert gate.status()["reason"] == "configuration error: the account lacks the Sudo privilege; grant it"
        assert store.counts()["queued"] == 5 and all(store.get(j.id).attempts == 0 for j in jobs)
        wait_until(lambda: importer.probes >= 4, timeout=10, message="probed again while paused")
        assert [resumed for resumed, _ in alerts] == [False]  # at once (not after alert_after), once
        importer.wrong = None
        wait_until(lambda: store.counts()["succeeded"] == 5, timeout=20, message="resumed and drained")
    finally:
        pool.stop(5)
    assert [resumed for resumed, _ in alerts] == [False, True]


def test_a_configuration_error_the_probe_does_not_find_fails_only_its_job(store, make_spec):
    importer = MisconfiguredTarget("the account owns no group of this job", probe_sees=False)
    gate, pool = pool_for(store, importer, workers=1)
    job, _ = store.enqueue(make_spec())
    pool.start()
    try:
        done = wait_until(lambda: (j := store.get(job.id)).state.finished and j, timeout=20)
    finally:
        pool.stop(5)
    assert done.state == "failed" and done.attempts == 1 and done.error.config_error
    assert not gate.paused and gate.last_probe == "ok"


def test_no_more_than_max_concurrent_imports_whatever_the_worker_count(store, make_spec):
    importer = SwitchableTarget(cap=2)
    importer.hold.clear()
    gate, pool = pool_for(store, importer, workers=5)
    for i in range(8):
        store.enqueue(make_spec(files={f"c{i}.tif": b"c" * (i + 1)}))
    pool.start()
    try:
        wait_until(lambda: importer.running == 2, timeout=10)
        wait_until(lambda: store.counts()["running"] == 2, timeout=10)
        assert store.counts()["queued"] == 6  # the other workers did not claim
        importer.hold.set()
        wait_until(lambda: store.counts()["succeeded"] == 8, timeout=20)
    finally:
        pool.stop(5)
    assert importer.peak == 2 and gate.peak == 2


@pytest.fixture
def archive_service(make_config):
    config = make_config(
        importer={"kind": "archive", "archive": {"min_free_bytes": 2**62},
                  "pause": {"probe_interval": 0.1, "alert_after": 0}},
        workers={"count": 2, "poll_interval": 0.05},
    )
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    service.start()
    yield service
    service.stop()


def test_a_nearly_full_archive_volume_pauses_its_jobs_and_says_why_everywhere(archive_service, make_spec):
    service = archive_service
    store = service.store
    jobs = [store.enqueue(make_spec(files={f"v{i}.tif": b"v" * (i + 1)}))[0] for i in range(3)]
    # The gate pauses, then publishes: wait for what the status view reads.
    wait_until(lambda: any(c["status"]["paused"] for c in store.components("target")), timeout=10,
               message="paused by the free-space check")
    status = collect_status(service.config, store)
    (target,) = status["importer"]["targets"]
    assert target["paused"] and "min_free_bytes" in target["reason"]
    assert any("paused" in p for p in status["problems"]) and not status["healthy"]
    assert b'watchfolder_importer_paused{target="archive:' in exposition(make_registry(service.config, store))
    assert store.counts()["queued"] == 3 and all(store.get(j.id).attempts == 0 for j in jobs)
    paused_mail = wait_until(lambda: [m for m in store.outbox_list() if m.kind == "admin_alert"], timeout=10)
    assert "paused" in paused_mail[0].subject
    body = email.message_from_bytes(paused_mail[0].raw, policy=email.policy.default).get_body(("plain",))
    assert "min_free_bytes" in body.get_content()

    service.importer.min_free_bytes = 0  # space was freed
    wait_until(lambda: store.counts()["succeeded"] == 3, timeout=20, message="resumed")
    assert all(store.get(j.id).attempts == 1 for j in jobs)
    subjects = wait_until(lambda: (s := [m.subject for m in store.outbox_list() if m.kind == "admin_alert"])
                          and len(s) == 2 and s, timeout=10)
    assert any("resumed" in s for s in subjects)
    (target,) = collect_status(service.config, store)["importer"]["targets"]
    assert target["paused"] is False
