"""Issue 10, case 3: POST /ome/import checks the session key with OMERO (the real child, over Ice, the double)."""

from __future__ import annotations

import dataclasses
import time
import uuid

import pytest
from api_support import Client, make_config

from watchfolder.errors import PermanentImportError
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.server import Server

pytestmark = pytest.mark.omero


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
    config, _tokens, roots = make_config(tmp_path, importer="omero")
    omero = dataclasses.replace(config.importer.omero, host="127.0.0.1", port=double.port, python=omero_python,
                                connect_timeout=5)
    config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
    store = SQLiteStore.from_config(config)
    server = Server(config, create_app(config, store))  # the default checker: the omero importer's child
    server.start()
    yield store, Client(server.url), roots
    server.stop()
    store.close()


def test_the_seed_route_queues_only_for_sessions_omero_accepts(served, double):
    store, client, roots = served
    folder = roots["drop"] / "run-1"
    folder.mkdir(parents=True)
    (folder / "a.ome.tiff").write_bytes(b"pixels")
    base = {"experimenterEmail": "attacker@evil.example", "targetUri": folder.as_uri(),
            "omeroHost": "127.0.0.1", "omeroPort": double.port}
    r = client.post("/ome/import", [dict(base, sessionKey=str(uuid.uuid4()))])
    assert r.status == 400 and "rejected the session key" in r.json["reason"]
    assert store.list_jobs()[0] == []
    r = client.post("/ome/import", [dict(base, sessionKey=double.session("jdoe", "lab"))])
    assert r.status == 200, r.text
    (job,) = store.list_jobs()[0]
    assert (job.spec.owner, job.spec.email, job.spec.group) == ("jdoe", "jdoe@example.org", "lab")
