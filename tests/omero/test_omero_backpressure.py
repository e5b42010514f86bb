"""Back-pressure against the OMERO double: the server down with jobs queued, and the cap on imports.

The double is switched down with its fault switch (listener closed, connections
refused); the service's child gets real Ice connection errors, its probe (the
child's ``--ping``) too. Scaled down for the suite: set
``WATCHFOLDER_BP_JOBS`` and ``WATCHFOLDER_BP_DOWN`` (seconds) for the full drill
(50 jobs, 120 s).
"""

from __future__ import annotations

import os
import time

import pytest
from conftest import ADMIN_PASSWORD
from helpers import wait_until

from watchfolder.job import Target
from watchfolder.service import Parts, Service
from watchfolder.status import collect_status

pytestmark = pytest.mark.omero
JOBS = int(os.environ.get("WATCHFOLDER_BP_JOBS", "8"))
DOWN_SECONDS = float(os.environ.get("WATCHFOLDER_BP_DOWN", "3"))


def test_omero_down_pauses_without_burning_attempts_and_resumes_at_the_cap(
    make_config, make_spec, omero_python, double
):
    config = make_config(
        importer={
            "kind": "omero",
            "omero": {"host": "127.0.0.1", "port": double.port, "admin_user": "admin",
                      "admin_password": ADMIN_PASSWORD, "python": omero_python, "connect_timeout": 5,
                      "idle_timeout": 60, "max_concurrent": 2},
            "pause": {"probe_interval": 0.5, "after_failures": 3, "alert_after": 0},
        },
        workers={"count": 4, "poll_interval": 0.05},
    )
    double.faults(down=True, import_delay=0.3)
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    specs = [make_spec(files={f"img_{i}.fake": b"i" * (i + 1)}, group="lab", importer="omero",
                       target=Target(dataset=f"bp {i % 3}")) for i in range(JOBS)]
    jobs = [service.store.enqueue(s)[0] for s in specs]
    service.start()
    try:
        wait_until(lambda: service.gate.paused, timeout=60, message="the target pauses")
        wait_until(lambda: service.store.counts()["running"] == 0, timeout=60)
        (target,) = collect_status(service.config, service.store)["importer"]["targets"]
        assert target["paused"] and target["target"] == f"omero:127.0.0.1:{double.port}"
        assert "OMERO" in target["reason"]
        deadline = time.monotonic() + DOWN_SECONDS
        while time.monotonic() < deadline:  # while down: nothing fails, nothing burns an attempt
            counts = service.store.counts()
            assert counts["failed"] == 0 and counts["retry_wait"] == 0 and counts["succeeded"] == 0
            time.sleep(0.2)
        assert all(service.store.get(j.id).attempts == 0 for j in jobs)
        double.faults(down=False)
        wait_until(lambda: service.store.counts()["succeeded"] == JOBS, timeout=60 + 5 * JOBS,
                   message="every job after the server came back")
    finally:
        service.stop()
    assert [service.store.get(j.id).attempts for j in jobs] == [1] * JOBS
    counters = double.state()["counters"]
    assert counters["max_imports_in_progress"] <= 2 and counters["imports"] == JOBS
    assert service.gate.peak <= 2
    subjects = [m.subject for m in service.store.outbox_list(limit=10_000) if m.kind == "admin_alert"]
    assert any("paused" in s for s in subjects) and any("resumed" in s for s in subjects)
