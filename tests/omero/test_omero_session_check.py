"""Issue 10, case 3: POST /ome/import checks the session key with OMERO (the real child, over Ice, the double).

The checks go to one long-lived child (watchfolder/importers/omero_sessions.py):
reused, restarted when killed, killed when hung, and a short cache of accepted keys.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import time
import uuid

import pytest
from api_support import Client, make_config

from watchfolder.errors import PermanentImportError, TransientImportError
from watchfolder.importers import create_importer
from watchfolder.importers.omero_sessions import SessionChecker
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.server import Server

pytestmark = pytest.mark.omero


def _gone(pid: int, deadline: float = 15.0) -> bool:
    """True once ``pid`` has exited (polled with a deadline; the checker reaps its children)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def checker(omero_python, double):
    made = []

    def make(**kw):
        c = SessionChecker(lambda: omero_python, "127.0.0.1", double.port, connect_timeout=5, **kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_session_info_reads_the_sessions_user_from_omero(importer, double):
    key = double.session("mary", "imaging")
    started = time.monotonic()
    assert importer.session_info(key) == {"user": "mary", "email": "mary@example.org", "group": "imaging"}
    print(f"session check took {time.monotonic() - started:.2f} s (child start included)")
    # Only the child's reference was released: the client's session still works.
    assert importer.session_info(key)["user"] == "mary"


def test_a_rejected_or_closed_key_is_a_permanent_refusal_without_the_key(importer, double):
    forged = str(uuid.uuid4())
    with pytest.raises(PermanentImportError, match="rejected the session key") as info:
        importer.session_info(forged)
    assert forged not in str(info.value)
    closed = double.session("jdoe", "lab")
    double.close_session(closed)
    with pytest.raises(PermanentImportError, match="rejected the session key"):
        importer.session_info(closed)


@pytest.fixture
def served(tmp_path, double, omero_python):
    # A short deadline for the hung-child case; the cache as configured by default.
    config, _tokens, roots = make_config(tmp_path, importer="omero", extra_server={"seed_session_timeout": 3})
    omero = dataclasses.replace(config.importer.omero, host="127.0.0.1", port=double.port, python=omero_python,
                                connect_timeout=5)
    config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
    store = SQLiteStore.from_config(config)
    importer = create_importer(config)  # the default checker: the omero importer's session child
    server = Server(config, create_app(config, store, importer))
    server.start()
    yield store, Client(server.url), roots
    server.stop()
    importer.close()
    store.close()


def _seed_item(roots, double, name: str, email: str) -> dict:
    """A seed request (without its sessionKey) for a one-file folder ``name`` under the drop root."""
    folder = roots["drop"] / name
    folder.mkdir(parents=True)
    (folder / "a.ome.tiff").write_bytes(b"pixels")
    return {"experimenterEmail": email, "targetUri": folder.as_uri(), "omeroHost": "127.0.0.1",
            "omeroPort": double.port}


def test_the_seed_route_queues_only_for_sessions_omero_accepts(served, double):
    store, client, roots = served
    base = _seed_item(roots, double, "run-1", "attacker@evil.example")
    r = client.post("/ome/import", [dict(base, sessionKey=str(uuid.uuid4()))])
    assert r.status == 403 and "rejected the session key" in r.json["reason"]
    assert store.list_jobs()[0] == []
    r = client.post("/ome/import", [dict(base, sessionKey=double.session("jdoe", "lab"))])
    assert r.status == 200, r.text
    (job,) = store.list_jobs()[0]
    assert (job.spec.owner, job.spec.email, job.spec.group) == ("jdoe", "jdoe@example.org", "lab")


def test_checks_share_one_long_lived_child_and_accepted_keys_are_cached(checker, double, caplog):
    caplog.set_level(logging.DEBUG, logger="watchfolder")
    c = checker(cache_ttl=30)
    mary, jdoe = double.session("mary", "imaging"), double.session("jdoe", "lab")
    assert c.check(mary, now=100.0) == {"user": "mary", "email": "mary@example.org", "group": "imaging"}
    pid = c.pid
    assert pid is not None
    assert c.check(jdoe, now=100.0)["user"] == "jdoe"
    assert c.pid == pid and c.stats == {"cached": 0, "asked": 2, "started": 1}  # one child for both

    # Within the TTL an accepted key is not asked again, even if closed meanwhile (documented);
    # once the entry expires, OMERO's answer counts again.
    double.close_session(mary)
    assert c.check(mary, now=129.0)["user"] == "mary"
    assert c.stats["cached"] == 1 and c.stats["asked"] == 2
    with pytest.raises(PermanentImportError, match="rejected the session key"):
        c.check(mary, now=131.0)

    # The cache holds a keyed hash of each key, never the key; nothing logged carries a key.
    assert len(c._cache) == 1
    for digest in c._cache:
        assert jdoe.encode() not in digest and mary.encode() not in digest
    assert jdoe not in repr(vars(c)) and mary not in caplog.text and jdoe not in caplog.text


def test_a_rejected_key_is_not_cached(checker, double):
    c = checker(cache_ttl=30)
    forged = str(uuid.uuid4())
    for _ in range(2):
        with pytest.raises(PermanentImportError, match="rejected the session key") as info:
            c.check(forged)
        assert forged not in str(info.value)
    assert c.stats["asked"] == 2 and c.stats["cached"] == 0 and not c._cache
    with pytest.raises(PermanentImportError, match="not an OMERO session key"):
        c.check("k" * 100_000)  # refused without a (large) write to the child
    assert c.stats["asked"] == 2


def test_an_unreachable_omero_is_a_transient_answer_not_a_hung_child(omero_python):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    c = SessionChecker(lambda: omero_python, "127.0.0.1", port, connect_timeout=5, timeout=10)
    try:
        with pytest.raises(TransientImportError, match="cannot reach the OMERO server"):
            c.check(str(uuid.uuid4()))
        pid = c.pid
        with pytest.raises(TransientImportError, match="cannot reach the OMERO server"):
            c.check(str(uuid.uuid4()))
        assert c.pid == pid and c.stats["started"] == 1  # an answer, not a reason to restart
    finally:
        c.close()


def test_a_killed_child_is_replaced_by_the_next_check(checker, double):
    c = checker(cache_ttl=0)
    key = double.session("jdoe", "lab")
    assert c.check(key)["user"] == "jdoe"
    first = c.pid
    os.kill(first, signal.SIGKILL)
    assert _gone(first)
    assert c.check(key)["user"] == "jdoe"  # answered, by a fresh child
    assert c.pid not in (None, first) and c.stats["started"] == 2


def test_a_key_that_crashes_the_child_is_a_transient_failure_and_the_next_check_works(checker, double):
    """omero-py's Ice dies of SIGSEGV marshalling an unpaired surrogate: the check is sent to a fresh
    child once, then fails as transient (the HTTP layer refuses such keys before they get here)."""
    c = checker(cache_ttl=0)
    with pytest.raises(TransientImportError, match="the session checker exited"):
        c.check("\ud800")
    assert c.stats["started"] == 2
    assert c.check(double.session("jdoe", "lab"))["user"] == "jdoe"


def test_a_hung_child_times_out_as_transient_and_is_replaced(checker, double):
    c = checker(cache_ttl=0, timeout=2)
    key = double.session("jdoe", "lab")
    assert c.check(key)["user"] == "jdoe"
    hung = c.pid
    os.kill(hung, signal.SIGSTOP)
    try:
        with pytest.raises(TransientImportError, match="did not answer the session check within 2 s"):
            c.check(key)
        assert _gone(hung)  # killed (SIGKILL ends a stopped process), not left behind
    finally:
        try:
            os.kill(hung, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert c.check(key)["user"] == "jdoe"
    assert c.pid != hung and c.stats["started"] == 2


def test_close_ends_the_child(checker, double):
    c = checker()
    c.check(double.session("jdoe", "lab"))
    pid = c.pid
    c.close()
    assert _gone(pid) and c.pid is None
    with pytest.raises(TransientImportError, match="shut down"):
        c.check(str(uuid.uuid4()))


def test_the_seed_route_survives_a_killed_and_a_hung_checker(served, double, caplog):
    """Over HTTP: bad key 403, killed child → next request answered, hung child → 503 (not a stuck thread)."""
    caplog.set_level(logging.INFO, logger="watchfolder")
    store, client, roots = served
    base = _seed_item(roots, double, "run-2", "x@example.org")

    def post(key):
        return client.post("/ome/import", [dict(base, sessionKey=key)])

    assert post(double.session("jdoe", "lab")).status == 200
    forged = str(uuid.uuid4())
    r = post(forged)
    assert r.status == 403 and set(r.json) == {"reason"} and "rejected the session key" in r.json["reason"]
    for odd in ("x" * 10_000, "a\nb\x00c", "é"):  # a long key, control characters, not ASCII
        r = post(odd)
        assert r.status == 403 and set(r.json) == {"reason"}, (odd[:20], r.status, r.text[:200])

    pid = _checker_pid(caplog)
    os.kill(pid, signal.SIGKILL)
    assert _gone(pid)
    assert post(double.session("mary", "lab")).status == 200  # a fresh child answered

    pid = _checker_pid(caplog)
    os.kill(pid, signal.SIGSTOP)
    try:
        r = post(double.session("jdoe", "lab"))  # not cached: a new key
        assert r.status == 503 and set(r.json) == {"reason"} and "try again later" in r.json["reason"]
        assert _gone(pid)
    finally:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
    assert post(double.session("jdoe", "lab")).status == 200
    assert len(store.list_jobs()[0]) == 3
    assert forged not in caplog.text


def _checker_pid(caplog) -> int:
    """The pid of the newest session checker, from its start log line."""
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("OMERO session checker started")]
    assert starts, "no session checker was started"
    return int(starts[-1].split("(pid ", 1)[1].split(",", 1)[0])
