"""The seed system's import API (/ome/import, /ome/failed/import) over real HTTP, mapped onto jobs."""

from __future__ import annotations

import json
import uuid

import pytest
from api_support import KnownSessions, acquisition, start_service, stop_service

from watchfolder.errors import PermanentImportError

SESSION = "8b2f6a1e-5c4d-4e3f-9a8b-7c6d5e4f3a2b"
# Whose SESSION is, as OMERO would answer (the real check: tests/omero/test_omero_session_check.py).
JDOE = {"user": "jdoe", "email": "jdoe@example.org", "group": "lab"}


@pytest.fixture
def svc(tmp_path):
    service = start_service(tmp_path, importer="omero", session_checker=KnownSessions({SESSION: JDOE}))
    yield service
    stop_service(service)


def seed_request(path, **fields):
    request = {
        "experimenterEmail": "jdoe@example.org",
        "targetUri": path.as_uri() if hasattr(path, "as_uri") else str(path),
        "omeroHost": "omero.example.org",
        "omeroPort": "4064",
        "sessionKey": SESSION,
    }
    request.update(fields)
    return request


def test_import_round_trip(svc):
    first = acquisition(svc.roots["drop"], "jdoe/slide3", manifest=False)
    second = acquisition(svc.roots["drop"], "jdoe/slide4", manifest=False)
    client = svc.client()  # no bearer token: the session key is the credential
    body = [
        seed_request(first, datasetId="51", name="slide 3", description="left hemisphere",
                     textAnnotations=[["org.example/notes", "stained"]], annotationIds=["7", 8]),
        None,  # the seed skipped nulls
        seed_request(str(second), screenId=9, omeroPort=4064),
    ]
    r = client.post("/ome/import", body)
    assert r.status == 200
    answers = r.json
    assert [a["targetUri"] for a in answers] == [first.as_uri(), str(second)]
    status_uri = answers[0]["statusUri"]
    assert status_uri.startswith("/ome/import/")
    uuid.UUID(status_uri.rsplit("/", 1)[1])  # an opaque id, not a countable job number

    job = svc.store.find("ome-import:" + status_uri.rsplit("/", 1)[1])
    spec = job.spec
    assert (spec.session_key, spec.omero_host, spec.omero_port, spec.importer) == (
        SESSION, "omero.example.org", 4064, "omero")
    assert spec.target.dataset_id == 51 and (spec.name, spec.description) == ("slide 3", "left hemisphere")
    assert spec.extra["text_annotations"] == [["org.example/notes", "stained"]]
    assert spec.extra["annotation_ids"] == [7, 8]
    # The session's user, not the body's address, owns the job.
    assert (spec.owner, spec.email, spec.group, spec.source) == ("jdoe", "jdoe@example.org", "lab", "seed:jdoe")
    assert job.to_dict()["uses_session_key"] is True
    other = svc.store.find("ome-import:" + answers[1]["statusUri"].rsplit("/", 1)[1])
    assert other.spec.target.screen_id == 9

    svc.store.log(job.id, "uploading tile_001.ome.tiff")
    log = client.get(status_uri)
    assert log.status == 200 and log.headers["content-type"].startswith("text/plain")
    assert "uploading tile_001.ome.tiff" in log.text
    assert SESSION not in log.text


def test_without_a_container_the_import_is_orphaned(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [seed_request(folder)])
    assert r.status == 200
    job = svc.store.find("ome-import:" + r.json[0]["statusUri"].rsplit("/", 1)[1])
    assert job.spec.target.to_dict() == {}


def test_empty_or_null_body_answers_an_empty_array(svc):
    assert svc.client().post("/ome/import", []).json == []
    assert svc.client().post("/ome/import", raw=b"null", headers={"Content-Type": "application/json"}).json == []
    assert svc.store.counts()["queued"] == 0


def test_validation_errors_are_400_with_reason_and_nothing_is_queued(svc):
    good = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    bad = {"targetUri": "relative/path", "omeroHost": "omero.example.org", "datasetId": "x", "screenId": "4",
           "textAnnotations": [["only-namespace"]], "annotationIds": ["-1"]}
    r = svc.client().post("/ome/import", [seed_request(good), bad])
    assert r.status == 400
    reason = r.json["reason"]
    for expected in ("request 1: experimenterEmail: required", "request 1: sessionKey: required",
                     "request 1: datasetId", "request 1: textAnnotations[0]", "request 1: annotationIds[0]",
                     "request 1: targetUri"):
        assert expected in reason
    assert "request 0" not in reason
    assert svc.store.counts()["queued"] == 0


def test_dataset_and_screen_are_exclusive(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    r = svc.client().post("/ome/import", [seed_request(folder, datasetId=1, screenId=2)])
    assert r.status == 400 and "mutually exclusive" in r.json["reason"]


def test_another_omero_server_is_refused(svc):
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    for fields in ({"omeroHost": "evil.example.net"}, {"omeroPort": "4065"}):
        r = svc.client().post("/ome/import", [seed_request(folder, **fields)])
        assert r.status == 400 and "not the OMERO server this service imports into" in r.json["reason"]


def test_paths_obey_the_allowed_roots(svc):
    outside = acquisition(svc.roots["elsewhere"], "secret", manifest=False)
    link = svc.roots["drop"] / "link"
    link.symlink_to(outside)
    for uri in (outside.as_uri(), str(link), f"{svc.roots['drop']}/../elsewhere/secret",
                "file://fileserver/data/x"):
        r = svc.client().post("/ome/import", [seed_request(uri)])
        assert r.status == 400, uri
        assert "targetUri" in r.json["reason"]
    assert svc.store.counts()["queued"] == 0


def test_invalid_json_and_non_arrays_are_400(svc):
    r = svc.client().post("/ome/import", raw=b'[{"targetUri": }]', headers={"Content-Type": "application/json"})
    assert r.status == 400 and "line 1, column 16" in r.json["reason"]
    r = svc.client().post("/ome/import", {"targetUri": "/x"})
    assert r.status == 400 and "JSON array" in r.json["reason"]


def test_refused_when_the_importer_is_not_omero(tmp_path):
    service = start_service(tmp_path, importer="archive")
    try:
        folder = acquisition(service.roots["drop"], "jdoe/a", manifest=False)
        r = service.client().post("/ome/import", [seed_request(folder)])
        assert r.status == 400 and "not into OMERO" in r.json["reason"]
    finally:
        stop_service(service)


def test_status_of_unknown_import_is_404(svc):
    client = svc.client()
    assert client.get(f"/ome/import/{uuid.uuid4()}").status == 404
    folder = acquisition(svc.roots["drop"], "jdoe/a")
    job_id = svc.client("portal").post("/api/v1/jobs", {"path": str(folder)}).json["id"]
    # Job numbers are countable; the unauthenticated route does not answer to them.
    assert client.get(f"/ome/import/{job_id}").status == 404


def _failed_seed_import(svc) -> str:
    folder = acquisition(svc.roots["drop"], "jdoe/a", manifest=False)
    status_uri = svc.client().post("/ome/import", [seed_request(folder)]).json[0]["statusUri"]
    job = svc.store.find("ome-import:" + status_uri.rsplit("/", 1)[1])
    assert svc.store.claim("w1").id == job.id
    svc.store.log(job.id, "import failed: session key rejected by OMERO")
    svc.store.fail(job.id, "w1", PermanentImportError("OMERO rejected the session key"))
    return status_uri.rsplit("/", 1)[1]


def test_failed_import_routes_need_an_admin_token(svc):
    ident = _failed_seed_import(svc)
    for method in ("GET", "DELETE"):
        for path in ("/ome/failed/import", f"/ome/failed/import/{ident}"):
            if method == "DELETE" and path == "/ome/failed/import":
                continue
            anonymous = svc.client().request(method, path)
            assert anonymous.status == 401
            assert svc.client("reader").request(method, path).status == 403


def test_failed_imports_list_read_delete(svc):
    ident = _failed_seed_import(svc)
    # A failed job from another source is listed by its job id.
    folder = acquisition(svc.roots["drop"], "jdoe/b")
    other = svc.client("portal").post("/api/v1/jobs", {"path": str(folder)}).json["id"]
    svc.store.claim("w1")
    svc.store.fail(other, "w1", PermanentImportError("unsupported format"))

    admin = svc.client("admin")
    listed = admin.get("/ome/failed/import")
    assert listed.status == 200
    assert sorted(listed.json) == sorted([f"/ome/failed/import/{ident}", f"/ome/failed/import/{other}"])

    log = admin.get(f"/ome/failed/import/{ident}")
    assert log.status == 200 and "session key rejected" in log.text
    assert admin.get(f"/ome/failed/import/{other}").status == 200

    assert admin.delete(f"/ome/failed/import/{ident}").status == 204
    assert admin.get("/ome/failed/import").json == [f"/ome/failed/import/{other}"]
    assert admin.get(f"/ome/failed/import/{ident}").status == 404
    assert admin.delete(f"/ome/failed/import/{ident}").status == 204  # as the seed: nothing left to drop
    assert admin.delete(f"/ome/failed/import/{uuid.uuid4()}").status == 204
    # The job itself and its log stay.
    job = svc.store.find("ome-import:" + ident)
    assert job.state == "failed"
    assert "session key rejected" in svc.store.read_log(job.id)


def test_unknown_failed_import_is_404(svc):
    admin = svc.client("admin")
    assert admin.get(f"/ome/failed/import/{uuid.uuid4()}").status == 404
    assert admin.get("/ome/failed/import/999").status == 404
    folder = acquisition(svc.roots["drop"], "jdoe/a")
    queued = svc.client("portal").post("/api/v1/jobs", {"path": str(folder)}).json["id"]
    assert admin.get(f"/ome/failed/import/{queued}").status == 404  # not failed
    assert json.loads(admin.get("/ome/failed/import").body) == []
