"""Issue 10, D: an OMERO that hangs or is down does not stall the API (the real session child, real HTTP).

Found: unauthenticated POST /ome/import requests whose session checks hung held all
of waitress's threads until server.seed_session_timeout, and GET /api/v1/health took
29 s. The checks now run a few at once behind a breaker (watchfolder/web/gate.py).
The hanging OMERO is a TCP listener that accepts connections and never answers (Ice
waits for the server's validation message); the down one is the double's ``down`` fault.
"""

from __future__ import annotations

import dataclasses
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from api_support import Client, make_config

from watchfolder.importers import create_importer
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.server import Server

pytestmark = pytest.mark.omero

WAIT = 120  # seconds a test waits at most for what it expects (a guard, not a measure)


def until(condition, timeout: float = WAIT) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


@pytest.fixture
def silent_omero():
    """A port that accepts connections and never says a byte (an OMERO hung before its Ice handshake)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)
    held: list[socket.socket] = []

    def accept():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            held.append(conn)

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in held:
        conn.close()


def serve(tmp_path, omero_python, port: int, **server):
    config, tokens, roots = make_config(tmp_path, importer="omero", extra_server={
        "threads": 4, "seed_rate_per_minute": 10_000, **server})
    omero = dataclasses.replace(config.importer.omero, host="127.0.0.1", port=port, python=omero_python,
                                connect_timeout=30)
    config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
    store = SQLiteStore.from_config(config)
    importer = create_importer(config)
    app = create_app(config, store, importer)
    http = Server(config, app)
    http.start()

    def stop():
        http.stop()
        importer.close()
        store.close()

    folder = roots["drop"] / "run"
    folder.mkdir()
    (folder / "a.ome.tiff").write_bytes(b"pixels")
    item = {"experimenterEmail": "jdoe@example.org", "targetUri": folder.as_uri(), "omeroHost": "127.0.0.1",
            "omeroPort": port}
    return app.config["watchfolder.api"], store, Client(http.url), tokens, item, importer, stop


def test_a_hanging_omero_holds_at_most_the_limit_and_health_answers_throughout(tmp_path, omero_python,
                                                                               silent_omero):
    api, store, client, tokens, item, importer, stop = serve(
        tmp_path, omero_python, silent_omero, seed_session_timeout=8, seed_session_pause=600)
    gate = api.session_gate
    admin = Client(client.base, tokens["admin"])
    try:
        with ThreadPoolExecutor(24) as pool:
            posts = [pool.submit(client.post, "/ome/import", [dict(item, sessionKey=str(uuid.uuid4()))])
                     for _ in range(20)]
            # Two checks wait for the silent OMERO; the other 18 requests were answered at once.
            assert until(lambda: sum(f.done() for f in posts) >= 18)
            health = [client.get("/api/v1/health") for _ in range(5)]
            jobs = admin.get("/api/v1/jobs")
            held = gate.in_flight  # still waiting for OMERO when /health answered
            answers = [f.result(WAIT) for f in posts]
        assert [h.status for h in health] == [200] * 5 and jobs.status == 200
        assert held == 2, "the checks ended before /health was asked (the test proves less)"
        assert [r.status for r in answers] == [503] * 20
        assert all(r.headers.get("retry-after") for r in answers)
        assert gate.stats["peak"] == 2 and gate.stats["run"] == 2 and gate.stats["busy"] == 18
        assert importer._sessions.stats["asked"] <= 4  # two checks, each sent once more to a fresh child

        # One more failure makes three in a row: the breaker opens, and checks are refused
        # at once without asking OMERO (no request waits the timeout any more).
        third = client.post("/ome/import", [dict(item, sessionKey=str(uuid.uuid4()))])
        assert third.status == 503 and gate.state == "open"
        asked = importer._sessions.stats["asked"]
        with ThreadPoolExecutor(8) as pool:
            paused = list(pool.map(lambda _: client.post("/ome/import", [dict(item, sessionKey=str(uuid.uuid4()))]),
                                   range(16)))
        assert [r.status for r in paused] == [503] * 16
        assert all("server.seed_session_pause" in r.json["reason"] for r in paused)
        assert all(int(r.headers["retry-after"]) > 1 for r in paused)
        assert importer._sessions.stats["asked"] == asked and gate.stats["open"] == 16
        assert client.get("/api/v1/health").status == 200
        assert store.list_jobs()[0] == []
    finally:
        stop()


def test_after_the_pause_one_probe_finds_omero_back_and_imports_resume(tmp_path, omero_python, double):
    double.faults(down=True)  # the listener is closed: connections are refused
    api, store, client, _tokens, item, importer, stop = serve(
        tmp_path, omero_python, double.port, seed_session_timeout=10, seed_session_pause=2)
    gate = api.session_gate
    try:
        key = double.session("jdoe", "lab")
        for _ in range(3):
            r = client.post("/ome/import", [dict(item, sessionKey=key)])
            assert r.status == 503 and "cannot reach the OMERO server" in r.json["reason"], r.text
        assert gate.state == "open"
        r = client.post("/ome/import", [dict(item, sessionKey=key)])
        assert r.status == 503 and "server.seed_session_pause" in r.json["reason"]
        double.faults(down=None)
        assert until(lambda: gate.state == "half-open")
        r = client.post("/ome/import", [dict(item, sessionKey=key)])  # the probe: OMERO answers
        assert r.status == 200, r.text
        assert gate.state == "closed"
        (job,) = store.list_jobs()[0]
        assert job.spec.owner == "jdoe"
    finally:
        stop()
