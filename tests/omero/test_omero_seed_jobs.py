"""Jobs of the seed-compatible API (POST /ome/import) through the omero importer, against the double.

Those jobs run in the client's own OMERO session (no sudo), may have no target at
all (orphaned images, as the seed imported them), and carry text annotations
(comment annotations) and ids of existing annotations to put on every image.
Everything runs for real: store -> worker -> importer -> child -> Ice -> double;
the last test starts the HTTP service and goes through /ome/import itself.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import uuid

import pytest
from api_support import Client, make_config
from conftest import run_job
from helpers import wait_until

from watchfolder.importers import create_importer
from watchfolder.job import JobState, Target
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.server import Server
from watchfolder.worker import Worker

pytestmark = pytest.mark.omero

EMAIL = "jdoe@example.org"
NOTES = "org.example.lab/notes"
STAIN = "org.example.lab/stain"




@pytest.fixture
def seed_spec(make_spec, double):
    """A spec shaped as watchfolder.web.seed builds it: jdoe's own session in 'lab', no target by default;
    the owner is the session's user (seed.py replaces the request's with it; the child refuses a
    session of another user than the owner)."""

    def make(files=None, *, key=None, text_annotations=(), annotation_ids=(), **fields):
        values = dict(
            owner="jdoe", email=EMAIL, source=f"seed:{EMAIL}", target=Target(), importer="omero",
            session_key=key or double.session("jdoe", "lab"), omero_host="127.0.0.1", omero_port=double.port,
            extra={"text_annotations": [list(p) for p in text_annotations],
                   "annotation_ids": list(annotation_ids)},
        )
        values.update(fields)
        return make_spec(files, **values)

    return make


def links_of(state, image_id):
    """The annotations linked to one image, as (kind, ns, text or None), sorted."""
    return sorted(
        (a["kind"], a["ns"] or "", a.get("text")) for a in state["annotations"] for i in a["images"] if i == image_id
    )


def test_no_target_imports_orphaned_images(store, importer, seed_spec, double):
    spec = seed_spec({"a.fake": b"a" * 300, "b.fake": b"b" * 200})
    assert spec.target.to_dict() == {}
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["orphaned"] is True and job.result["target"] is None
    assert "dataset_id" not in job.result and "screen_id" not in job.result
    state = double.state()
    assert sorted(job.result["image_ids"]) == sorted(i["id"] for i in state["images"])
    assert len(state["images"]) == 2
    assert all(i["dataset"] is None and i["plate"] is None for i in state["images"])
    assert all(f["target"] is None for f in state["filesets"])
    # Nothing was created to hold them.
    assert state["projects"] == state["datasets"] == state["screens"] == []
    # The job ran in the client's session: jdoe in lab, no sudo.
    lab, jdoe = state["groups"]["lab"]["id"], state["users"]["jdoe"]["id"]
    assert {(i["owner"], i["group"]) for i in state["images"]} == {(jdoe, lab)}
    assert job.result["sudo"] is False and job.result["owner"] == "jdoe"
    assert "as orphaned images (no dataset or screen was given)" in store.read_log(job.id)


def test_dataset_id_target_still_goes_into_the_dataset(store, importer, seed_spec, double):
    made = run_job(store, importer, seed_spec({"m.fake": b"m"}, target=Target(dataset="plates")))
    dataset_id = made.result["target"]["id"]
    job = run_job(store, importer, seed_spec({"n.fake": b"n"}, target=Target(dataset_id=dataset_id)))

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["orphaned"] is False and job.result["dataset_id"] == dataset_id
    image = next(i for i in double.state()["images"] if i["id"] in job.result["image_ids"])
    assert image["dataset"] == dataset_id
    assert f"into dataset {dataset_id}" in store.read_log(job.id)


def test_text_annotations_become_comment_annotations_on_every_image(store, importer, seed_spec, double):
    pairs = [(NOTES, "stained with DAPI"), (STAIN, "H&E"), (NOTES, "second note, same namespace")]
    job = run_job(store, importer, seed_spec({"a.fake": b"a", "b.fake": b"b"}, text_annotations=pairs))

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    comments = [a for a in state["annotations"] if a["kind"] == "comment"]
    # One comment annotation per pair, shared by both images.
    assert sorted((c["ns"], c["text"]) for c in comments) == sorted(pairs)
    images = sorted(job.result["image_ids"])
    assert len(images) == 2 and all(sorted(c["images"]) == images for c in comments)
    assert sorted(job.result["text_annotation_ids"]) == sorted(c["id"] for c in comments)
    lab, jdoe = state["groups"]["lab"]["id"], state["users"]["jdoe"]["id"]
    assert {(c["owner"], c["group"]) for c in comments} == {(jdoe, lab)}
    # Our provenance annotation is still there, one per fileset.
    maps = [a for a in state["annotations"] if a["kind"] == "map"]
    assert len(maps) == 2 and all(m["ns"] == "watchfolder.openmicroscopy.org/import" for m in maps)
    for image in images:
        assert [k for k, _, _ in links_of(state, image)].count("comment") == 3


def test_existing_annotations_are_linked_to_every_image(store, importer, seed_spec, double):
    tag = double.annotation("jdoe", "lab", kind="tag", text="experiment 42")
    note = double.annotation("jdoe", "lab", kind="comment", ns=NOTES, text="from the portal")
    # The same id twice is linked once: OMERO refuses a second identical link.
    job = run_job(store, importer, seed_spec({"a.fake": b"a", "b.fake": b"b"}, annotation_ids=[tag, note, tag],
                                             text_annotations=[(STAIN, "H&E")]))

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["linked_annotation_ids"] == [tag, note]
    state = double.state()
    by_id = {a["id"]: a for a in state["annotations"]}
    images = sorted(job.result["image_ids"])
    assert sorted(by_id[tag]["images"]) == sorted(by_id[note]["images"]) == images
    for image in images:
        assert links_of(state, image) == sorted([
            ("tag", "", "experiment 42"), ("comment", NOTES, "from the portal"), ("comment", STAIN, "H&E"),
            ("map", "watchfolder.openmicroscopy.org/import", None),
        ])
    assert f"existing annotations [{tag}, {note}]" in store.read_log(job.id)


@pytest.mark.parametrize("case", ["missing", "other_group", "not_linkable"])
def test_an_unusable_annotation_id_fails_permanently_before_any_upload(store, importer, seed_spec, double, case):
    own = double.annotation("jdoe", "lab", text="fine")
    if case == "missing":
        bad, words = 987654, "annotation 987654 (annotationIds) does not exist or 'jdoe' cannot see it"
        spec = seed_spec(annotation_ids=[own, bad])
    elif case == "other_group":
        # mary is in lab and imaging; her job runs in lab; the tag is in imaging.
        bad = double.annotation("mary", "imaging", text="imaging tag")
        words = f"annotation {bad} (annotationIds) is in another group"
        spec = seed_spec(annotation_ids=[bad], key=double.session("mary", "lab"), owner="mary",
                         email="mary@example.org")
    else:
        # lab is read-only for others (rwr---): jdoe sees mary's tag but may not link it.
        bad = double.annotation("mary", "lab", text="mary's tag")
        words = f"annotation {bad} (annotationIds) cannot be linked by 'jdoe' in group 'lab'"
        spec = seed_spec(annotation_ids=[own, bad])
    job = run_job(store, importer, spec)

    assert job.state is JobState.FAILED and job.error.kind == "permanent" and not job.error.config_error
    assert words in job.error.message and "annotationIds" in job.error.message
    state = double.state()
    assert state["filesets"] == [] and state["images"] == [] and state["counters"]["bytes_written"] == 0
    assert all(a["images"] == [] for a in state["annotations"])


def test_a_session_key_omero_rejects_fails_permanently_with_the_reason(store, importer, seed_spec, double):
    closed = double.session("jdoe", "lab")
    double.close_session(closed)
    unknown = str(uuid.uuid4())
    for key in (closed, unknown):
        job = run_job(store, importer, seed_spec(key=key))

        assert job.state is JobState.FAILED and job.attempts == 1
        assert job.error.kind == "permanent" and not job.error.config_error
        message = job.error.message
        assert "rejected this job's session key" in message and "fresh session key" in message
        # OMERO's own reason, with the key (a secret) taken out of it.
        assert "Password check failed for '<session key>'" in message
        assert key not in message and key not in store.read_log(job.id)
    assert double.state()["filesets"] == []


def test_a_retried_seed_job_whose_key_was_erased_says_it_imports_through_sudo(store, importer, seed_spec, double):
    # Second outside test of issue 10, F7: the key is erased when the job ends; an admin's
    # retry then imports as the owner through the service's admin session. The job log says so.
    closed = double.session("jdoe", "lab")
    double.close_session(closed)
    job = run_job(store, importer, seed_spec({"a.fake": b"pixels"}, key=closed))
    assert job.state is JobState.FAILED and job.spec.session_key is None
    store.retry(job.id, by="admin")
    Worker(store, importer, name="w1").loop()
    job = store.get(job.id)
    assert job.state is JobState.SUCCEEDED, job.error
    log = store.read_log(job.id)
    assert "session key was erased when this job ended earlier" in log
    assert "imports as jdoe through the service's admin session (sudo)" in log
    state = double.state()
    assert [i["owner"] for i in state["images"]] == [state["users"]["jdoe"]["id"]]


def test_retry_after_a_dropped_connection_links_everything_exactly_once(store, importer, seed_spec, double):
    tag = double.annotation("jdoe", "lab", text="experiment 42")
    double.faults(drop_after_bytes=3 * 1024 * 1024)
    spec = seed_spec({"a.fake": os.urandom(2 * 1024 * 1024), "b.fake": os.urandom(2 * 1024 * 1024)},
                     text_annotations=[(NOTES, "n")], annotation_ids=[tag])
    job = run_job(store, importer, spec, now=1000.0)
    assert job.state is JobState.RETRY_WAIT, job.error
    job = run_job(store, importer, spec, now=2000.0)

    assert job.state is JobState.SUCCEEDED, job.error
    assert [f["reused"] for f in job.result["filesets"]] == [True, False]
    state = double.state()
    assert len(state["images"]) == 2
    for image in job.result["image_ids"]:
        # a.fake's image was annotated in attempt 1, b.fake's in attempt 2: each once.
        assert links_of(state, image) == sorted([
            ("tag", "", "experiment 42"), ("comment", NOTES, "n"),
            ("map", "watchfolder.openmicroscopy.org/import", None),
        ])


# ---------------------------------------------------------------------------
# End to end: HTTP POST /ome/import -> store -> worker -> child -> double


@pytest.fixture
def seed_service(tmp_path, double, omero_python):
    config, _tokens, roots = make_config(tmp_path, importer="omero")
    omero = dataclasses.replace(config.importer.omero, host="127.0.0.1", port=double.port, python=omero_python,
                                connect_timeout=5, idle_timeout=60)
    config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
    store = SQLiteStore.from_config(config)
    server = Server(config, create_app(config, store))
    server.start()
    importer = create_importer(config)
    stop = threading.Event()
    worker = Worker(store, importer, name="seed-worker", poll_interval=0.05)
    thread = threading.Thread(target=worker.run, args=(stop,), name="seed-worker")
    thread.start()
    yield store, Client(server.url), roots
    stop.set()
    thread.join(60)
    importer.close()
    server.stop()
    store.close()


def test_seed_api_end_to_end_into_the_double(seed_service, double):
    store, client, roots = seed_service
    folder = roots["drop"] / "jdoe" / "run-7"
    folder.mkdir(parents=True)
    (folder / "tile_1.fake").write_bytes(b"tile one" * 1000)
    (folder / "tile_2.fake").write_bytes(b"tile two" * 1000)
    tag = double.annotation("jdoe", "lab", text="experiment 42")
    key = double.session("jdoe", "lab")
    rejected_key = str(uuid.uuid4())
    base = {"experimenterEmail": EMAIL, "targetUri": folder.as_uri(), "omeroHost": "127.0.0.1",
            "omeroPort": str(double.port)}
    # A key OMERO rejects is refused before anything is queued (issue 10); the good one is queued.
    r = client.post("/ome/import", [dict(base, sessionKey=rejected_key)])
    assert r.status == 403 and "rejected the session key" in r.json["reason"] and rejected_key not in r.text
    r = client.post("/ome/import", [
        dict(base, sessionKey=key, textAnnotations=[[NOTES, "stained with DAPI"]], annotationIds=[tag]),
    ])
    assert r.status == 200, r.text
    (good_uri,) = (a["statusUri"] for a in r.json)
    good = store.find("ome-import:" + good_uri.rsplit("/", 1)[1])
    wait_until(lambda: store.get(good.id).state.finished, timeout=120, message="the seed job to finish")
    good = store.get(good.id)

    assert good.state is JobState.SUCCEEDED, good.error
    assert good.result["orphaned"] is True and good.result["sudo"] is False
    state = double.state()
    images = sorted(good.result["image_ids"])
    assert sorted(i["id"] for i in state["images"]) == images and len(images) == 2
    assert all(i["dataset"] is None and i["plate"] is None for i in state["images"])
    for image in images:
        assert links_of(state, image) == sorted([
            ("tag", "", "experiment 42"), ("comment", NOTES, "stained with DAPI"),
            ("map", "watchfolder.openmicroscopy.org/import", None),
        ])

    log = client.get(good_uri)
    assert log.status == 200 and log.headers["content-type"].startswith("text/plain")
    assert f"omero: imported images {images} as orphaned images" in log.text
    assert f"existing annotations [{tag}]" in log.text
    assert key not in log.text

    # A key that expires after it was checked fails its job, as before.
    double.close_session(key)
    folder2 = roots["drop"] / "jdoe" / "run-8"
    folder2.mkdir(parents=True)
    (folder2 / "tile_1.fake").write_bytes(b"tile" * 100)
    late = store.enqueue(dataclasses.replace(good.spec, root=str(folder2), idempotency_key="late", session_key=key,
                                             files=(dataclasses.replace(good.spec.files[0], path="tile_1.fake",
                                                                        size=400),)))[0]
    wait_until(lambda: store.get(late.id).state.finished, timeout=120, message="the late job to finish")
    bad = store.get(late.id)
    assert bad.state is JobState.FAILED and bad.error.kind == "permanent"
    assert "rejected this job's session key" in store.read_log(bad.id) and key not in store.read_log(bad.id)
    assert bad.attempts == 1


# ---------------------------------------------------------------------------
# The same against a real OMERO, when one is configured (see test_real_omero.py)


@pytest.mark.real_omero
@pytest.mark.skipif(not os.environ.get("OMERO_HOST") or not os.environ.get("OMERO_PASSWORD"),
                    reason="no real OMERO: set OMERO_HOST, OMERO_USER, OMERO_PASSWORD (and OMERO_OWNER, "
                           "OMERO_GROUP, OMERO_PORT) to run this")
def test_real_omero_orphaned_import_with_text_and_linked_annotations(store, make_config, make_spec, omero_python):
    config = make_config(importer={"kind": "omero", "omero": {
        "host": os.environ["OMERO_HOST"], "port": int(os.environ.get("OMERO_PORT", "4064")),
        "admin_user": os.environ.get("OMERO_USER", "root"), "admin_password": os.environ["OMERO_PASSWORD"],
        "python": omero_python, "timeout": 600, "idle_timeout": 600}})
    importer = create_importer(config)
    owner = {"owner": os.environ.get("OMERO_OWNER") or os.environ.get("OMERO_USER", "root"),
             "group": os.environ.get("OMERO_GROUP") or None, "email": None}
    try:
        first = run_job(store, importer, make_spec(
            {"seed-first&sizeX=32&sizeY=32.fake": b""}, **owner, target=Target(),
            extra={"text_annotations": [[NOTES, "watchfolder real-OMERO test"]], "annotation_ids": []}))
        assert first.state is JobState.SUCCEEDED, (first.error, store.read_log(first.id))
        assert first.result["orphaned"] is True and len(first.result["text_annotation_ids"]) == 1
        # The second job links the first job's comment annotation: find("Annotation", id) on a real server.
        (comment,) = first.result["text_annotation_ids"]
        second = run_job(store, importer, make_spec(
            {"seed-second&sizeX=32&sizeY=32.fake": b""}, **owner, target=Target(),
            extra={"text_annotations": [], "annotation_ids": [comment]}))
        assert second.state is JobState.SUCCEEDED, (second.error, store.read_log(second.id))
        assert second.result["linked_annotation_ids"] == [comment]
        missing = run_job(store, importer, make_spec(
            {"seed-third&sizeX=32&sizeY=32.fake": b""}, **owner, target=Target(),
            extra={"annotation_ids": [2**62]}))
        assert missing.state is JobState.FAILED and f"annotation {2**62}" in missing.error.message
    finally:
        importer.close()
