"""Issue 10, cases 5 and 6: inputs that gave a 500 or the wrong answer, over real HTTP.

Every response is also checked against api/openapi.yaml by the test client.
"""

from __future__ import annotations

import json
import socket
import time

import pytest
from api_support import acquisition, start_service, stop_service

from watchfolder.web.http import MAX_JSON_DEPTH

BIG = "9223372036854775808"  # 2**63: one past SQLite's largest integer


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path)
    yield service
    stop_service(service)


def raw_request(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send bytes as they are (no client library fixing them up); the whole answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.parametrize(("method", "path"), [
    ("GET", f"/api/v1/jobs/{BIG}"),
    ("GET", f"/api/v1/jobs/{BIG}/log"),
    ("POST", f"/api/v1/jobs/{BIG}/retry"),
    ("POST", f"/api/v1/jobs/{BIG}/cancel"),
    ("GET", "/api/v1/jobs/%C2%B2"),  # '²': str.isdigit() says yes, int() says no
])
def test_ids_past_64_bits_are_404(svc, method, path):
    r = svc.client("admin").request(method, path)
    assert r.status == 404 and "no job" in r.json["error"]


@pytest.mark.parametrize("query", ["cursor=99999999999999999999999", "cursor=%C2%B2", "limit=%C2%B2",
                                   "since=nan", "since=1e999", "until=9999-12-31T23:59:59-23:59", "state=",
                                   "state=failed,", "owner="])
def test_bad_list_parameters_are_422_naming_the_parameter(svc, query):
    r = svc.client("admin").get(f"/api/v1/jobs?{query}")
    assert r.status == 422, r.text
    assert r.json["detail"][0]["field"] == query.split("=")[0]


@pytest.mark.parametrize("query", ["after=%C2%B2", "limit=%C2%B2", "after=99999999999999999999999", "after="])
def test_bad_event_parameters_are_422(svc, query):
    r = svc.client("admin").get(f"/api/v1/events?{query}")
    assert r.status == 422, r.text
    assert r.json["detail"][0]["field"] == query.split("=")[0]


def test_seed_delete_of_a_30_digit_id_is_204(svc):
    assert svc.client("admin").delete("/ome/failed/import/" + "1" * 30).status == 204


@pytest.mark.parametrize("nested", ["[" * 100_000 + "]" * 100_000,
                                    '{"a":' * 50_000 + "1" + "}" * 50_000,
                                    "[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)])
def test_deeply_nested_json_is_400(svc, nested):
    body = '{"path": "/x", "annotations": {"a": ' + nested + "}}"
    r = svc.client("portal").post("/api/v1/jobs", raw=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status == 400 and "nested" in r.json["error"]


@pytest.mark.parametrize("escape", ["\\ud800", "\\uDC00", "x\\udbff", "\\ude00\\ud83d"])
def test_unpaired_surrogates_in_json_strings_are_400(svc, escape):
    """Not text, and Ice crashes on them (the OMERO child died of SIGSEGV on a sessionKey of "\\ud800")."""
    folder = acquisition(svc.roots["drop"], "surrogate")
    body = json.dumps({"path": str(folder), "name": "a@b"}).replace("@", escape)
    r = svc.client("portal").post("/api/v1/jobs", raw=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status == 400 and "unpaired UTF-16 surrogate" in r.json["error"], r.text
    assert r.json["detail"]["message"] == "unpaired surrogate"  # /ome/import: tests/security/test_seed_abuse.py


def test_a_surrogate_pair_is_text(svc):
    folder = acquisition(svc.roots["drop"], "pair")
    body = json.dumps({"path": str(folder), "name": "smile @"}).replace("@", "\\ud83d\\ude00")
    r = svc.client("portal").post("/api/v1/jobs", raw=body.encode(), headers={"Content-Type": "application/json"})
    assert r.status == 202, r.text
    assert svc.store.get(r.json["id"]).spec.name == "smile \U0001F600"


def test_an_authorization_header_that_is_not_utf8_is_401(svc):
    answer = raw_request(svc.server.port, b"GET /api/v1/whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                          b"Authorization: Bearer \xff\xfe\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]


def test_query_strings_are_utf8(svc):
    folder = acquisition(svc.roots["drop"], "josé-1", owner="josé")
    admin = svc.client("admin")
    assert admin.post("/api/v1/jobs", {"path": str(folder)}).status == 202
    found = admin.get("/api/v1/jobs?owner=jos%C3%A9").json["jobs"]
    assert [j["owner"] for j in found] == ["josé"]
    r = admin.get("/api/v1/jobs?owner=jos%E9")  # Latin-1 é: not UTF-8
    assert r.status == 400 and "UTF-8" in r.json["error"]


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_job_bodies_must_be_declared_json(svc, content_type):
    folder = acquisition(svc.roots["drop"], "ct")
    headers = {"Content-Type": content_type} if content_type else {}
    r = svc.client("portal").post("/api/v1/jobs", raw=json.dumps({"path": str(folder)}).encode(), headers=headers)
    assert r.status == 415 and "application/json" in r.json["error"]
    assert svc.store.list_jobs()[0] == []


def test_empty_optional_texts_are_accepted_as_not_given(svc):
    folder = acquisition(svc.roots["drop"], "empties")
    r = svc.client("portal").post("/api/v1/jobs", {"path": str(folder), "email": "", "group": "", "name": "",
                                                   "description": ""})
    assert r.status == 202, r.text
    assert r.json["email"] is None and r.json["group"] is None


def test_a_dataset_id_past_64_bits_is_422(svc):
    folder = acquisition(svc.roots["drop"], "bigid")
    r = svc.client("portal").post("/api/v1/jobs", {"path": str(folder), "target": {"dataset_id": 2**63}})
    assert r.status == 422 and r.json["detail"][0]["field"] == "target.dataset_id"


@pytest.mark.parametrize("extra", [1, 10_000_000])
def test_bodies_over_the_limit_get_the_json_413(svc, extra):
    """Refused as soon as the length is announced (nothing buffered), in JSON, naming the setting."""
    size = svc.config.server.max_body_bytes + extra
    head = (f"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Authorization: Bearer {svc.tokens['portal']}\r\nContent-Length: {size}\r\n\r\n").encode()
    answer = raw_request(svc.server.port, head)
    status, rest = answer.split(b"\r\n", 1)
    assert status.startswith(b"HTTP/1.1 413 "), answer[:300]
    headers, body = rest.split(b"\r\n\r\n", 1)
    assert b"content-type: application/json" in headers.lower()
    assert "max_body_bytes" in json.loads(body)["error"]


def test_500_idle_connections_do_not_stop_health(svc):
    """Idle and half-open clients (a request line, no end of headers) hold connections, not the server."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < 2048:
        if hard != resource.RLIM_INFINITY and hard < 2048:
            pytest.skip(f"needs 2048 open files (this process may have {hard})")
        resource.setrlimit(resource.RLIMIT_NOFILE, (2048, hard))
    idle = []
    try:
        for i in range(500):
            s = socket.create_connection(("127.0.0.1", svc.server.port), timeout=5)
            if i % 2:
                s.sendall(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n")  # half a request
            idle.append(s)
        started = time.monotonic()
        answer = raw_request(svc.server.port, b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                             timeout=1.0)
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert time.monotonic() - started < 1.0
    finally:
        for s in idle:
            s.close()
