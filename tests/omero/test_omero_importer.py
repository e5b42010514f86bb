"""The omero importer, through the real omero-py client in the child, against the server double.

Jobs go through the real store and a real worker, so these are end-to-end:
acquisition folder -> SQLiteStore -> Worker -> OmeroImporter -> child -> Ice -> double.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
from pathlib import Path

import pytest
from conftest import ADMIN_PASSWORD, run_job
from helpers import wait_until

from watchfolder.errors import PermanentImportError
from watchfolder.importers import create_importer
from watchfolder.importers.base import ImportContext
from watchfolder.job import FileEntry, JobState, Target
from watchfolder.worker import Worker

pytestmark = pytest.mark.omero




def dataset_named(state, name):
    return [d for d in state["datasets"] if d["name"] == name]


def test_single_file_import_ends_succeeded_with_image_ids(store, importer, make_spec, double):
    spec = make_spec({"cells.fake": b"\x00pixels" * 5000}, target=Target(project="Brain atlas", dataset="slide 3"),
                     group="lab", importer="omero")
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    assert job.result["image_ids"] == [i["id"] for i in state["images"]]
    assert len(job.result["image_ids"]) == 1
    (fileset,) = state["filesets"]
    assert fileset["state"] == "imported" and fileset["client_paths"] == [str(Path(spec.root) / "cells.fake")]
    assert fileset["files"][0]["size"] == 35000
    (dataset,) = dataset_named(state, "slide 3")
    assert state["images"][0]["dataset"] == dataset["id"] == job.result["target"]["id"]
    assert [p["name"] for p in state["projects"]] == ["Brain atlas"]
    assert state["project_dataset"] == [[state["projects"][0]["id"], dataset["id"]]]
    assert job.progress.phase == "done" and job.progress.bytes_done == 35000
    log = store.read_log(job.id)
    assert "imported images" in log and ADMIN_PASSWORD not in log


@pytest.mark.parametrize("bioformats", [True, False], ids=["bioformats", "suffix-rules"])
def test_multi_fileset_acquisition(store, omero_config, make_spec, double, bioformats):
    # The manifest's filesets win, with or without Bio-Formats; the rest are grouped
    # (each .fake file is an image of its own for Bio-Formats and for the suffix rules).
    files = {
        "a.fake": b"a" * 100,
        "b.fake": b"b" * 200,
        "custom/one.fake": b"1",
        "custom/two.fake": b"22",
    }
    importer = create_importer(omero_config(bioformats=bioformats))
    spec = make_spec(files, group="lab", filesets=(("custom/one.fake", "custom/two.fake"),))
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["grouping"] == ("bioformats" if bioformats else "suffix rules")
    groups = sorted(sorted(fs["files"]) for fs in job.result["filesets"])
    assert groups == [["a.fake"], ["b.fake"], ["custom/one.fake", "custom/two.fake"]]
    state = double.state()
    assert len(state["filesets"]) == 3 and len(state["images"]) == 3
    assert sorted(job.result["image_ids"]) == sorted(i["id"] for i in state["images"])
    assert job.progress.files_done == job.progress.files_total == 4
    assert job.progress.bytes_done == sum(len(v) for v in files.values())


def test_sudo_into_the_owners_group(store, importer, make_spec, double):
    spec = make_spec(owner="mary", group="imaging", email=None, target=Target(dataset="runs"))
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    imaging, mary = state["groups"]["imaging"]["id"], state["users"]["mary"]["id"]
    sudo = [s for s in state["sessions"] if s.get("sudo_by") is not None]
    assert [(s["user"], s["group"]) for s in sudo] == [(mary, imaging)]
    assert {(i["owner"], i["group"]) for i in state["images"]} == {(mary, imaging)}
    assert job.result["group"] == "imaging" and job.result["owner"] == "mary" and job.result["sudo"] is True
    # The job had no email: the owner's is looked up in OMERO.
    assert job.result["email"] == "mary@example.org"
    # Her other group is untouched.
    assert all(d["group"] == imaging for d in state["datasets"])


def test_dataset_created_on_first_use_and_reused_after(store, importer, make_spec, double):
    first = run_job(store, importer, make_spec({"1.fake": b"1"}, group="lab"))
    second = run_job(store, importer, make_spec({"2.fake": b"2"}, group="lab"))

    assert first.state is second.state is JobState.SUCCEEDED
    assert first.result["target"]["created"] is True and second.result["target"]["created"] is False
    state = double.state()
    assert len(state["projects"]) == 1 and len(dataset_named(state, "slide 3")) == 1
    assert {i["dataset"] for i in state["images"]} == {first.result["target"]["id"]}


def test_annotations_and_provenance_on_each_image(store, importer, make_spec, double):
    data = b"some pixels" * 1000
    spec = make_spec({"x.fake": data}, group="lab", annotations={"microscope": "LSM 980", "objective": "63x"},
                     source="watch:lsm980")
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    (ann,) = double.state()["annotations"]
    assert ann["ns"] == "watchfolder.openmicroscopy.org/import"
    assert ann["images"] == job.result["image_ids"]
    assert ann["values"] == [
        ["microscope", "LSM 980"], ["objective", "63x"], ["watchfolder.job_id", str(job.id)],
        ["watchfolder.source", "watch:lsm980"], ["watchfolder.path", os.path.join(spec.root, "x.fake")],
        ["watchfolder.sha1", hashlib.sha1(data).hexdigest()],
    ]


def test_server_import_error_is_a_permanent_failure_with_the_message(store, importer, make_spec, double):
    double.faults(import_error="Unknown file format: no reader for odd.xyz")
    job = run_job(store, importer, make_spec({"odd.fake": b"?"}, group="lab"))

    assert job.state is JobState.FAILED
    assert job.error.kind == "permanent" and not job.error.config_error
    assert "Unknown file format: no reader for odd.xyz" in job.error.message
    assert "odd.fake" in job.error.message and "convert" in job.error.message
    # Found case 6: the fileset the failed import left is deleted, not left in OMERO.
    assert double.live_filesets() == []
    assert double.state()["counters"]["deleted_filesets"] == 1


def test_wrong_admin_password_is_a_permanent_config_error(store, omero_config, make_spec, double):
    importer = create_importer(omero_config(admin_password="not-the-password"))
    job = run_job(store, importer, make_spec(group="lab"))

    assert job.state is JobState.FAILED
    assert job.error.config_error is True and job.error.kind == "permanent"
    assert "importer.omero.admin_password" in job.error.message
    assert "not-the-password" not in job.error.message + store.read_log(job.id)
    assert double.state()["counters"]["failed_logins"] == 1


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"owner": "nobody"}, "OMERO has no user 'nobody'"),
        ({"owner": "jdoe", "group": "imaging"}, "not a member of group 'imaging'"),
        ({"owner": "jdoe", "group": "ghosts"}, "OMERO has no group 'ghosts'"),
    ],
)
def test_unknown_owner_or_group_is_permanent(store, importer, make_spec, double, fields, words):
    job = run_job(store, importer, make_spec(**fields))

    assert job.state is JobState.FAILED and job.error.kind == "permanent" and not job.error.config_error
    assert words in job.error.message


def test_target_by_id_must_exist_and_be_writable(store, importer, make_spec, double):
    made = run_job(store, importer, make_spec({"m.fake": b"m"}, owner="mary", group="lab", target=Target(dataset="hers")))
    theirs = made.result["target"]["id"]

    missing = run_job(store, importer, make_spec(group="lab", target=Target(dataset_id=999999)))
    readonly = run_job(store, importer, make_spec(owner="jdoe", group="lab", target=Target(dataset_id=theirs)))
    own = run_job(store, importer, make_spec({"o.fake": b"o"}, owner="mary", group="lab",
                                             target=Target(dataset_id=theirs)))

    assert "dataset 999999 does not exist" in missing.error.message
    assert "not writable by 'jdoe'" in readonly.error.message
    assert readonly.error.kind == "permanent"
    assert own.state is JobState.SUCCEEDED and own.result["target"]["created"] is False


def test_server_down_then_up_is_retried_and_succeeds_once(store, importer, make_spec, double):
    double.faults(down=True)
    spec = make_spec({"one.fake": b"1" * 1000}, group="lab")
    job = run_job(store, importer, spec, now=1000.0)

    assert job.state is JobState.RETRY_WAIT and job.error.kind == "transient"
    assert "cannot reach the OMERO server" in job.error.message
    double.faults(down=None)
    job = run_job(store, importer, spec, now=2000.0)  # enqueue is idempotent: the same job runs again

    assert job.state is JobState.SUCCEEDED and job.attempts == 2
    assert len(double.live_filesets()) == 1 and len(double.state()["images"]) == 1


def test_connection_dropped_mid_upload_is_retried_without_duplicates(store, importer, make_spec, double):
    double.faults(drop_after_bytes=3 * 1024 * 1024)
    spec = make_spec({"a.fake": os.urandom(2 * 1024 * 1024), "b.fake": os.urandom(2 * 1024 * 1024)}, group="lab")
    job = run_job(store, importer, spec, now=1000.0)

    assert job.state is JobState.RETRY_WAIT and "lost the connection" in job.error.message
    job = run_job(store, importer, spec, now=2000.0)

    assert job.state is JobState.SUCCEEDED, job.error
    # a.fake's fileset was complete after attempt 1 and is reused; b.fake's half upload is deleted.
    live = double.live_filesets()
    assert sorted(os.path.basename(f["client_paths"][0]) for f in live) == ["a.fake", "b.fake"]
    assert len(double.state()["images"]) == 2
    assert [f["reused"] for f in job.result["filesets"]] == [True, False]
    assert len(double.state()["annotations"]) == 2


def test_upload_keeps_writes_in_flight_and_the_file_arrives_whole(store, importer, make_spec, double):
    # The double holds each upload's first block back until a later block has been
    # written: a child that waited for every write would stall on it (and the
    # counters would show no overlap); one that keeps writes in flight sees its
    # blocks land out of order, positionally, and the server's SHA-1 still agrees.
    double.faults(hold_first_write=30)
    content = os.urandom(5 * 1024 * 1024 + 12345)
    spec = make_spec({"big.fake": content}, group="lab")
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    counters = double.state()["counters"]
    assert counters["overlapped_writes"] >= 1 and counters["out_of_order_writes"] >= 1
    assert counters["bytes_written"] == len(content)
    (fileset,) = double.state()["filesets"]
    assert [(f["size"], f["sha1"]) for f in fileset["files"]] == [(len(content), hashlib.sha1(content).hexdigest())]
    assert job.result["filesets"][0]["sha1"] == [hashlib.sha1(content).hexdigest()]
    assert job.progress.bytes_done == len(content)


def test_child_killed_mid_upload_is_retried_and_leaves_one_fileset(store, importer, make_spec, double):
    double.faults(slow=0.05)  # each 1 MiB block takes a while: time to kill the child mid-way
    spec = make_spec({"big.fake": os.urandom(8 * 1024 * 1024)}, group="lab")
    job, _ = store.enqueue(spec, now=1000.0)
    seen: dict[str, bytes] = {}

    def killer():
        wait_until(lambda: importer.child_pid(job.id), timeout=30, message="the child to start")
        pid = importer.child_pid(job.id)
        seen["cmdline"] = Path(f"/proc/{pid}/cmdline").read_bytes()
        seen["environ"] = Path(f"/proc/{pid}/environ").read_bytes()
        wait_until(lambda: double.state()["counters"]["bytes_written"] > 0, timeout=30, message="upload to start")
        os.kill(pid, 9)

    thread = threading.Thread(target=killer)
    thread.start()
    Worker(store, importer, name="w1").loop(now=1000.0)
    thread.join()
    job = store.get(job.id)

    assert job.state is JobState.RETRY_WAIT and "killed by signal 9" in job.error.message
    # The password reached the child through stdin only.
    assert ADMIN_PASSWORD.encode() not in seen["cmdline"] + seen["environ"]
    assert double.state()["filesets"][0]["state"] == "uploading"
    double.faults(slow=None)
    job = run_job(store, importer, spec, now=2000.0)

    assert job.state is JobState.SUCCEEDED, job.error
    assert len(double.live_filesets()) == 1
    assert [f["state"] for f in double.state()["filesets"]] == ["deleted", "imported"]


def test_hung_server_child_is_killed_after_the_idle_timeout(store, omero_config, make_spec, double):
    importer = create_importer(omero_config(idle_timeout=1.0))
    double.faults(slow=30)
    job = run_job(store, importer, make_spec(group="lab"))

    assert job.state is JobState.RETRY_WAIT and "no progress for 1 s" in job.error.message
    assert importer.child_pid(job.id) is None


def test_session_key_job_imports_as_that_session(store, importer, make_spec, double):
    key = double.session("jdoe", "lab")
    spec = make_spec({"k.fake": b"k"}, group=None, session_key=key, email=None)
    job = run_job(store, importer, spec)

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["sudo"] is False and job.result["owner"] == "jdoe" and job.result["email"] == "jdoe@example.org"
    assert not [s for s in double.state()["sessions"] if s.get("sudo_by") is not None]
    assert key not in store.read_log(job.id)

    bad = run_job(store, importer, make_spec({"k2.fake": b"k"}, session_key="no-such-session"))
    assert bad.state is JobState.FAILED and "session key" in bad.error.message


class RecordingContext(ImportContext):
    """A context without a store: records every progress call."""

    def __init__(self, job, log_path: Path):
        self.job = job
        self.events: list[tuple] = []
        self._log_path = log_path

    def progress(self, phase, bytes_done=0, bytes_total=0, files_done=0, files_total=0):
        self.events.append((phase, bytes_done, bytes_total, files_done, files_total))

    def log(self, message):
        with open(self._log_path, "a") as f:
            f.write("".join(line + "\n" for line in ([message] if isinstance(message, str) else message)))

    @property
    def log_path(self):
        return str(self._log_path)


def test_a_200_mb_file_streams_progress_events(store, importer, make_spec, double, tmp_path):
    size = 200 * 1024 * 1024
    spec = make_spec({"placeholder.txt": b""}, group="lab")
    big = Path(spec.root) / "big.fake"
    with open(big, "wb") as f:
        f.truncate(size)  # sparse: no 200 MB write to disk
    spec = dataclasses.replace(spec, files=(FileEntry("big.fake", size),))
    job, _ = store.enqueue(spec)
    ctx = RecordingContext(job, tmp_path / "job.log")
    result = importer.run(job, ctx)

    uploading = [e for e in ctx.events if e[0] == "uploading"]
    done = [e[1] for e in uploading]
    # At least one event per 16 MiB, however fast the upload.
    assert done == sorted(done) and len(set(done)) >= size // (16 * 1024 * 1024)
    assert done[0] == 0 and done[-1] == size
    assert all(e[2] == size for e in uploading)
    assert double.state()["filesets"][0]["files"][0]["size"] == size
    assert result["bytes"] == size and len(result["image_ids"]) == 1


def test_no_interpreter_with_omero_is_a_config_error(make_config, make_spec, tmp_path, store):
    config = make_config(importer={"kind": "omero", "omero": {"admin_password": "x",
                                                              "python": str(tmp_path / "nope" / "python")}})
    importer = create_importer(config)
    job, _ = store.enqueue(make_spec())
    with pytest.raises(PermanentImportError) as err:
        importer.run(job, RecordingContext(job, tmp_path / "log"))
    assert err.value.config_error and "importer.omero.python" in err.value.message
    assert importer.health()["ok"] is False


def test_health_reports_omero_py(importer):
    health = importer.health()
    assert health["ok"] is True and health["omero_py"] and health["ice"].startswith("3.6")
