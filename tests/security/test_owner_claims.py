"""Issue 10 (second round), finding I: a request may not claim someone else's described data.

Real HTTP, real acquisitions. ``alice``'s manifest (or sidecar) names her as the
owner; a client asking for another owner gets 422 naming both, and a token limited
to jdoe is held to the owner the descriptor names.
"""

from __future__ import annotations

import json

import pytest
from api_support import TOKEN_SPECS, KnownSessions, acquisition, start_service, stop_service

SESSION = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0"


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path, token_specs=TOKEN_SPECS)
    yield service
    stop_service(service)


def queued(svc) -> int:
    return len(svc.store.list_jobs(limit=500)[0])


@pytest.mark.parametrize("token", ["jdoe-only", "portal"])
def test_a_request_owner_contradicting_the_manifest_is_422_naming_both(svc, token):
    folder = acquisition(svc.roots["drop"], "alice/acqA2", owner="alice")
    r = svc.client(token).post("/api/v1/jobs", {"path": str(folder), "owner": "jdoe"})
    assert r.status == 422, r.text
    (problem,) = r.json["detail"]
    assert problem["field"] == "owner" and "'jdoe'" in problem["message"] and "'alice'" in problem["message"]
    assert queued(svc) == 0


def test_the_token_limit_applies_to_the_owner_the_manifest_names(svc):
    folder = acquisition(svc.roots["drop"], "alice/acqA2", owner="alice")
    r = svc.client("jdoe-only").post("/api/v1/jobs", {"path": str(folder)})
    assert r.status == 403 and "'alice'" in r.json["error"]
    assert queued(svc) == 0


def test_a_sidecar_owner_is_held_too(svc):
    folder = svc.roots["drop"] / "alice"
    folder.mkdir()
    (folder / "cells3.czi").write_bytes(b"czi")
    (folder / "cells3.czi.json").write_text(json.dumps({"owner": "alice", "target": {"dataset": "d"}}))
    r = svc.client("jdoe-only").post("/api/v1/jobs", {"path": str(folder / "cells3.czi"), "owner": "jdoe"})
    assert r.status == 422 and "'alice'" in r.text
    assert queued(svc) == 0


def test_agreeing_owner_and_plain_data_still_work(svc):
    alice = acquisition(svc.roots["drop"], "alice/acqA3", owner="alice")
    assert svc.client("portal").post("/api/v1/jobs", {"path": str(alice), "owner": "alice"}).status == 202
    plain = acquisition(svc.roots["drop"], "jdoe/plain", owner=None, manifest=False)
    r = svc.client("jdoe-only").post("/api/v1/jobs", {"path": str(plain), "owner": "jdoe",
                                                      "target": {"dataset": "d"}})
    assert r.status == 202 and r.json["owner"] == "jdoe"


def test_seed_session_of_another_user_than_the_manifest_is_400(tmp_path):
    service = start_service(tmp_path, importer="omero",
                            session_checker=KnownSessions({SESSION: {"user": "jdoe", "email": "j@example.org"}}))
    try:
        folder = acquisition(service.roots["drop"], "alice/acqA2", owner="alice")
        item = {"experimenterEmail": "j@example.org", "targetUri": folder.as_uri(),
                "omeroHost": "omero.example.org", "omeroPort": 4064, "sessionKey": SESSION}
        r = service.client().post("/ome/import", [item])
        assert r.status == 400, r.text
        assert "'alice'" in r.json["reason"] and "'jdoe'" in r.json["reason"]
        assert queued(service) == 0
    finally:
        stop_service(service)
