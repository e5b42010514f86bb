"""Issue 10, case 3: /ome/import is no longer open to anyone (real HTTP, nothing queued on refusal)."""

from __future__ import annotations

import json
import logging

import pytest
from api_support import KnownSessions, acquisition, start_service, stop_service

SESSION = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"
JDOE = {"user": "jdoe", "email": "jdoe@example.org", "group": "lab"}


@pytest.fixture
def svc(tmp_path):
    sessions = KnownSessions({SESSION: JDOE})
    service = start_service(tmp_path, importer="omero", session_checker=sessions,
                            extra_server={"seed_max_items": 5, "seed_rate_per_minute": 4})
    service.sessions = sessions
    yield service
    stop_service(service)


def item(folder, **fields):
    return {"experimenterEmail": "victim@example.org", "targetUri": folder.as_uri(),
            "omeroHost": "omero.example.org", "omeroPort": 4064, "sessionKey": SESSION, **fields}


def queued(svc) -> int:
    return len(svc.store.list_jobs(limit=500)[0])


def test_owner_and_mail_come_from_the_session_not_the_body(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [item(folder, experimenterEmail="attacker@evil.example")])
    assert r.status == 200, r.text
    (job,) = svc.store.list_jobs()[0]
    assert (job.spec.owner, job.spec.email, job.spec.source) == ("jdoe", "jdoe@example.org", "seed:jdoe")


def test_a_key_omero_rejects_queues_nothing_and_sends_no_mail(svc, caplog):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    caplog.set_level(logging.WARNING, logger="watchfolder.web.seed")
    forged = "11111111-2222-3333-4444-555555555555"
    r = svc.client().post("/ome/import", [item(folder), item(folder, sessionKey=forged)])
    assert r.status == 403 and "rejected the session key" in r.json["reason"]
    assert forged not in r.text
    assert queued(svc) == 0
    assert svc.store.outbox_claim(limit=100) == []
    assert "refused (403)" in caplog.text and forged not in caplog.text


def test_a_session_key_that_is_not_text_is_400_and_never_reaches_omero(svc):
    """An unpaired surrogate escape (\\ud800) crashed omero-py's Ice (SIGSEGV) in the session child."""
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    body = json.dumps([item(folder)]).replace(SESSION, "\\ud800")
    r = svc.client().post("/ome/import", raw=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status == 400 and "unpaired UTF-16 surrogate" in r.json["reason"], r.text
    assert queued(svc) == 0 and svc.sessions.asked == []


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x"])
def test_only_json_bodies_are_accepted(svc, content_type):
    """What a cross-site form or fetch without a preflight can send, refused before anything else."""
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", raw=json.dumps([item(folder)]).encode(),
                          headers={"Content-Type": content_type})
    assert r.status == 415 and "application/json" in r.json["reason"]
    assert queued(svc) == 0 and svc.sessions.asked == []


def test_too_many_items_is_413_and_queues_nothing(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [item(folder)] * 6)
    assert r.status == 413 and "server.seed_max_items" in r.json["reason"]
    assert queued(svc) == 0 and svc.sessions.asked == []


def test_a_client_over_the_rate_gets_429_with_retry_after(svc, caplog):
    caplog.set_level(logging.WARNING, logger="watchfolder.web.seed")
    client = svc.client()
    answers = [client.post("/ome/import", []) for _ in range(5)]
    assert [a.status for a in answers] == [200, 200, 200, 200, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    assert "server.seed_rate_per_minute" in answers[-1].json["reason"]
    assert "refused (429)" in caplog.text


def test_an_unreachable_omero_is_503_and_queues_nothing(tmp_path):
    from watchfolder.errors import TransientImportError

    def unreachable(key):
        raise TransientImportError("cannot reach the OMERO server (ConnectionRefusedException)")

    service = start_service(tmp_path, importer="omero", session_checker=unreachable)
    try:
        folder = acquisition(service.roots["drop"], "jdoe/a", manifest=False)
        r = service.client().post("/ome/import", [item(folder)])
        assert r.status == 503 and "try again later" in r.json["reason"]
        assert queued(service) == 0
    finally:
        stop_service(service)


@pytest.mark.parametrize("value", [2**63, "9" * 30, "²"])
def test_ids_past_64_bits_are_400(svc, value):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [item(folder, datasetId=value)])
    assert r.status == 400 and "datasetId" in r.json["reason"]
    assert queued(svc) == 0


def test_many_different_session_keys_in_one_request_are_413(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    keys = [f"0000000{i}-aaaa-bbbb-cccc-dddddddddddd" for i in range(5)]
    r = svc.client().post("/ome/import", [item(folder, sessionKey=k) for k in keys])
    assert r.status == 413 and "different session keys" in r.json["reason"]
    assert svc.sessions.asked == [] and queued(svc) == 0


# Outside test a10 F3 and F4: every refusal under /ome/ in the seed's shape and logged with all
# its reasons; on an archive instance the body's type and size are checked first, as on OMERO.


def raw_exchange(port: int, request: bytes) -> tuple[int, dict]:
    """Send ``request`` as is; the status and the JSON body of the answer."""
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def test_waitress_refusals_under_ome_answer_in_the_seed_shape_and_are_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    service = start_service(tmp_path, importer="omero", session_checker=KnownSessions({SESSION: JDOE}),
                            extra_server={"max_body_bytes": 1024})
    try:
        port = service.server.port
        r = service.client().post("/ome/import", raw=b"[" + b" " * 2000 + b"]",  # the contract is checked too
                                  headers={"Content-Type": "application/json"})
        assert r.status == 413 and "server.max_body_bytes" in r.json["reason"] and "error" not in r.json
        status, body = raw_exchange(port, b"POST /ome/import HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                                          b"\r\nContent-Length: -1\r\n\r\n[]")
        assert status == 400 and "Content-Length" in body["reason"], body
        status, body = raw_exchange(port, b"GET /ome/import/\xff HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400 and set(body) == {"reason"}, body
        status, body = raw_exchange(port, b"GET /api/v1/jobs/\xff HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 400 and "error" in body  # the API keeps its own shape
        logged = [r.getMessage() for r in caplog.records if "refused (" in r.getMessage()]
        assert any("POST /ome/import from 127.0.0.1 refused (413)" in m for m in logged), logged
        assert any("refused (400): Bad Request: Content-Length" in m for m in logged), logged
        assert any("GET /ome/import/" in m and "refused (400)" in m for m in logged), logged
        assert queued(service) == 0
    finally:
        stop_service(service)


def test_a_refusal_with_several_reasons_logs_every_one(svc, caplog):
    caplog.set_level(logging.WARNING, logger="watchfolder.web.seed")
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [item(folder, experimenterEmail="x", omeroHost="evil.example",
                                               targetUri="file:///etc")])
    assert r.status == 400
    (line,) = [m.getMessage() for m in caplog.records if "refused (400)" in m.getMessage()]
    assert "experimenterEmail" in line and "omeroHost" in line and "/etc" in line, line
    assert "\n" not in line


@pytest.mark.parametrize("kind", ["omero", "archive"])
def test_type_and_size_are_checked_before_the_importer_on_both_kinds(tmp_path, kind):
    service = start_service(tmp_path, importer=kind, session_checker=KnownSessions({SESSION: JDOE}),
                            extra_server={"seed_max_items": 5})
    try:
        folder = acquisition(service.roots["drop"], "jdoe/a", manifest=False)
        client = service.client()
        r = client.post("/ome/import", raw=json.dumps([item(folder)]).encode(), headers={"Content-Type": "text/plain"})
        assert r.status == 415, (r.status, r.json)
        r = client.post("/ome/import", [item(folder)] * 6)
        assert r.status == 413 and "server.seed_max_items" in r.json["reason"], (r.status, r.json)
        if kind == "archive":
            r = client.post("/ome/import", [item(folder)])
            assert r.status == 400 and "not into OMERO" in r.json["reason"]
        assert queued(service) == 0
    finally:
        stop_service(service)
