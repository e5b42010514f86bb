"""Issue 10, D: session checks that hang must not stall the API (real HTTP, a checker that blocks).

The real child against an OMERO that never answers is in tests/omero/test_omero_seed_hang.py;
here the checker blocks on an event, so the test decides how long OMERO "hangs".
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_support import acquisition, make_config, start_service, stop_service

from watchfolder.errors import ConfigError, PermanentImportError, TransientImportError
from watchfolder.web.gate import CheckGate, GateClosed

JDOE = {"user": "jdoe", "email": "jdoe@example.org", "group": "lab"}
WAIT = 60  # seconds a test waits at most for something it expects (a guard, not a measure)


def item(folder, key: str) -> dict:
    return {"experimenterEmail": "jdoe@example.org", "targetUri": folder.as_uri(),
            "omeroHost": "omero.example.org", "omeroPort": 4064, "sessionKey": key}


class HangingOmero:
    """A session checker that blocks every check until :meth:`release` (as a hung OMERO would)."""

    def __init__(self) -> None:
        self.released = threading.Event()
        self.entered = 0
        self._lock = threading.Lock()
        self.arrived = threading.Condition(self._lock)

    def __call__(self, key: str) -> dict:
        with self._lock:
            self.entered += 1
            self.arrived.notify_all()
        self.released.wait(WAIT)
        raise TransientImportError("OMERO at omero.example.org:4064 did not answer the session check within 10 s")

    def wait_for(self, n: int) -> bool:
        with self._lock:
            return self.arrived.wait_for(lambda: self.entered >= n, WAIT)

    def release(self) -> None:
        self.released.set()


def test_checks_that_hang_hold_at_most_the_limit_and_health_keeps_answering(tmp_path):
    hang = HangingOmero()
    service = start_service(tmp_path, importer="omero", session_checker=hang,
                            extra_server={"threads": 4, "seed_rate_per_minute": 1000})
    try:
        gate = service.app.config["watchfolder.api"].session_gate
        assert gate.limit == 2  # half of server.threads by default
        folder = acquisition(service.roots["drop"], "jdoe/a", manifest=False)
        client = service.client()
        with ThreadPoolExecutor(20) as pool:
            posts = [pool.submit(client.post, "/ome/import", [item(folder, f"key-{i}")]) for i in range(20)]
            assert hang.wait_for(2)  # two checks wait for OMERO now
            # The other 18 are answered while both checks hang (OMERO is never released before).
            assert until(lambda: sum(f.done() for f in posts) == 18)
            refused = [f.result() for f in posts if f.done()]
            # /health and the authenticated API answer too: the checks cannot take every thread.
            health = [client.get("/api/v1/health") for _ in range(10)]
            jobs = service.client("admin").get("/api/v1/jobs")
            assert gate.in_flight == 2 and hang.entered == 2 and not hang.released.is_set()
            hang.release()
            answers = [f.result() for f in posts]
        assert [h.status for h in health] == [200] * 10
        assert jobs.status == 200
        assert [r.status for r in refused] == [503] * 18
        assert all("server.seed_session_checks" in r.json["reason"] for r in refused)
        assert all(r.headers["retry-after"] == "1" for r in refused)
        assert [r.status for r in answers] == [503] * 20  # the two hung checks ended as OMERO's failure
        assert all("retry-after" in r.headers for r in answers)
        assert gate.stats["peak"] == 2 and gate.stats["busy"] == 18 and gate.stats["run"] == 2
        assert service.store.list_jobs()[0] == []
    finally:
        hang.release()
        stop_service(service)


def until(condition, timeout: float = WAIT) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds passed (False): a guard, not a measure."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_failed_checks_in_a_row_open_the_breaker_and_omero_is_not_asked(tmp_path):
    asked = []

    def unreachable(key):
        asked.append(key)
        raise TransientImportError("cannot reach the OMERO server (ConnectTimeoutException)")

    service = start_service(tmp_path, importer="omero", session_checker=unreachable,
                            extra_server={"seed_session_pause": 600, "seed_rate_per_minute": 1000})
    try:
        folder = acquisition(service.roots["drop"], "jdoe/a", manifest=False)
        client = service.client()
        first = [client.post("/ome/import", [item(folder, f"key-{i}")]) for i in range(3)]
        assert [r.status for r in first] == [503] * 3 and len(asked) == 3
        # The third failure opened the breaker: its answer already says to wait the pause.
        assert 590 <= int(first[-1].headers["retry-after"]) <= 600
        later = [client.post("/ome/import", [item(folder, f"key-{i}")]) for i in range(3, 10)]
        assert [r.status for r in later] == [503] * 7 and len(asked) == 3  # refused without asking
        assert all("server.seed_session_pause" in r.json["reason"] for r in later)
        assert all(1 <= int(r.headers["retry-after"]) <= 600 for r in later)
        assert client.get("/api/v1/health").status == 200
        assert service.store.list_jobs()[0] == []
    finally:
        stop_service(service)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _fail(key):
    raise TransientImportError("cannot reach the OMERO server")


def test_the_breaker_lets_one_probe_through_after_the_pause():
    clock = Clock()
    gate = CheckGate(2, failures=3, pause=30, clock=clock)
    for _ in range(3):
        with pytest.raises(TransientImportError):
            gate.run(_fail, "k")
    assert gate.state == "open"
    with pytest.raises(GateClosed) as info:
        gate.run(lambda key: JDOE, "k")
    assert info.value.retry_after == 30
    clock.now += 30
    assert gate.state == "half-open"

    # One probe goes; while it runs, the others are refused at once.
    probing, finish = threading.Event(), threading.Event()

    def probe(key):
        probing.set()
        finish.wait(WAIT)
        return JDOE

    with ThreadPoolExecutor(1) as pool:
        result = pool.submit(gate.run, probe, "k")
        assert probing.wait(WAIT)
        with pytest.raises(GateClosed, match="probing"):
            gate.run(lambda key: JDOE, "k")
        finish.set()
        assert result.result(WAIT) == JDOE
    assert gate.state == "closed" and gate.run(lambda key: JDOE, "k") == JDOE


def test_a_failed_probe_opens_the_breaker_again_and_a_rejected_key_counts_as_an_answer():
    clock = Clock()
    gate = CheckGate(1, failures=2, pause=10, clock=clock)
    for _ in range(2):
        with pytest.raises(TransientImportError):
            gate.run(_fail, "k")
    clock.now += 10
    with pytest.raises(TransientImportError):
        gate.run(_fail, "k")  # the probe fails
    assert gate.state == "open" and gate.retry_after() == 10
    clock.now += 10

    def rejected(key):
        raise PermanentImportError("OMERO rejected the session key")

    with pytest.raises(PermanentImportError):
        gate.run(rejected, "k")  # OMERO answered: it works
    assert gate.state == "closed"
    with pytest.raises(TransientImportError):
        gate.run(_fail, "k")
    assert gate.state == "closed"  # one failure after an answer: the count started again


def test_session_checks_must_stay_below_the_server_threads(tmp_path):
    with pytest.raises(ConfigError, match="server.seed_session_checks: 4 is not below server.threads"):
        make_config(tmp_path, importer="omero", extra_server={"threads": 4, "seed_session_checks": 4})
    config, _, _ = make_config(tmp_path, importer="omero", extra_server={"threads": 8})
    assert config.server.session_checks == 4
    config, _, _ = make_config(tmp_path, importer="omero", extra_server={"threads": 8, "seed_session_checks": 1})
    assert config.server.session_checks == 1
