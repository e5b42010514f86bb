"""The omero importer against a real OMERO server, when one is configured.

    OMERO_HOST=omero.example.org OMERO_PORT=4064 OMERO_USER=root OMERO_PASSWORD=... \
    OMERO_OWNER=jdoe OMERO_GROUP=lab .venv/bin/python -m pytest tests/omero/test_real_omero.py

OMERO_USER must be an admin (or a restricted admin with Sudo); OMERO_OWNER
(default: OMERO_USER) owns the imported images, in OMERO_GROUP (default: their
default group). Only a real server checks Bio-Formats, permissions and HQL.
"""

from __future__ import annotations

import os
import time

import pytest

from watchfolder.importers import create_importer
from watchfolder.job import JobState, Target
from watchfolder.worker import Worker

pytestmark = [
    pytest.mark.real_omero,
    pytest.mark.skipif(not os.environ.get("OMERO_HOST") or not os.environ.get("OMERO_PASSWORD"),
                       reason="no real OMERO: set OMERO_HOST, OMERO_USER, OMERO_PASSWORD (and OMERO_OWNER, "
                              "OMERO_GROUP, OMERO_PORT) to run these"),
]


@pytest.fixture
def real_importer(make_config, omero_python):
    config = make_config(importer={"kind": "omero", "omero": {
        "host": os.environ["OMERO_HOST"], "port": int(os.environ.get("OMERO_PORT", "4064")),
        "admin_user": os.environ.get("OMERO_USER", "root"), "admin_password": os.environ["OMERO_PASSWORD"],
        "python": omero_python, "timeout": 600, "idle_timeout": 600}})
    importer = create_importer(config)
    yield importer
    importer.close()


def owner_fields():
    owner = os.environ.get("OMERO_OWNER") or os.environ.get("OMERO_USER", "root")
    return {"owner": owner, "group": os.environ.get("OMERO_GROUP") or None, "email": None}


def test_fake_image_is_imported_and_annotated(store, real_importer, make_spec):
    # Bio-Formats' "fake" reader makes an image from the file name alone.
    spec = make_spec({"watchfolder&sizeX=64&sizeY=64&sizeZ=2.fake": b""}, **owner_fields(),
                     target=Target(project="watchfolder tests", dataset=f"run {int(time.time())}"),
                     annotations={"test": "real omero"})
    job, _ = store.enqueue(spec)
    Worker(store, real_importer, name="real").loop()
    job = store.get(job.id)

    assert job.state is JobState.SUCCEEDED, (job.error, store.read_log(job.id))
    assert job.result["image_ids"] and all(i > 0 for i in job.result["image_ids"])
    assert job.result["filesets"][0]["annotation_id"]


def test_unreadable_file_is_a_permanent_failure(store, real_importer, make_spec):
    spec = make_spec({"noise.xyz": os.urandom(4096)}, **owner_fields(), target=Target(dataset="watchfolder tests"))
    job, _ = store.enqueue(spec)
    Worker(store, real_importer, name="real").loop()
    job = store.get(job.id)

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert "noise.xyz" in job.error.message
