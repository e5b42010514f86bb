"""Issue 14 re-test (a14): a job that fails or is cancelled leaves nothing in OMERO, its
messages say what really happened, its session is its owner's, and its failure mail
reaches the owner's OMERO address.

Real store, worker, importer and child over real Ice to the strict double.
"""

from __future__ import annotations

import threading
import time

import pytest
from conftest import run_job

from watchfolder.importers import create_importer
from watchfolder.job import JobState
from watchfolder.mail.notify import Notifier
from watchfolder.worker import Worker

pytestmark = pytest.mark.omero


def start_job(store, importer, spec):
    """Queue ``spec`` and run it in a worker thread; returns (job, thread)."""
    job, _ = store.enqueue(spec)
    thread = threading.Thread(target=Worker(store, importer, name="w1").loop, daemon=True)
    thread.start()
    return job, thread


def wait_for_phase(store, job_id, phase, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = store.get(job_id)
        if job.progress.phase == phase:
            return job
        assert not job.state.finished, (job.state, job.error)
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} never reached phase {phase!r}")


def test_manifest_filesets_splitting_one_dataset_fail_before_any_upload(store, importer, make_spec, double,
                                                                        converted):
    # F1: a multi-file OME-TIFF split over two given filesets was uploaded fileset by fileset;
    # the server refused the second, while the first stayed imported and annotated.
    files = {p.name: p.read_bytes() for p in converted["multi"]}
    files["aa_good.fake"] = b""
    z0, z1, z2 = sorted(p.name for p in converted["multi"])
    spec = make_spec(files, group="lab", filesets=(("aa_good.fake",), (z0,), (z1, z2)))
    job = run_job(store, importer, spec)

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    message = job.error.message
    assert "split one dataset" in message and f"filesets[1] [\"{z0}\"]" in message
    assert f"{z1} (in filesets[2])" in message and "Nothing was uploaded" in message
    assert "convert" not in message
    state = double.state()
    assert state["filesets"] == [] and state["counters"]["bytes_written"] == 0


def test_a_failed_job_removes_every_fileset_it_created(store, omero_config, make_spec, double):
    # F1, second half: the first fileset imported, the second failed on the server; the job
    # failed for good, so the first must not stay imported and annotated.
    importer = create_importer(omero_config(bioformats=False))  # no pre-check: the server refuses
    try:
        spec = make_spec({"a_good.fake": b"", "b_bad.tif": b"not a tiff at all"}, group="lab",
                         filesets=(("a_good.fake",), ("b_bad.tif",)))
        job = run_job(store, importer, spec)
    finally:
        importer.close()

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert "b_bad.tif" in job.error.message and "removed from OMERO" in job.error.message
    assert double.live_filesets() == []
    assert double.state()["counters"]["deleted_filesets"] == 2


def test_cancelling_a_running_import_stops_it_removes_its_fileset_and_closes_sessions(store, importer, make_spec,
                                                                                     double):
    # F2: the child was killed, OMERO's import went on and the image landed (without our
    # annotation) while the job said cancelled; the sessions stayed open.
    double.faults(import_delay=60)
    job, thread = start_job(store, importer, make_spec({"c.fake": b""}, group="lab"))
    wait_for_phase(store, job.id, "importing")
    store.cancel(job.id, by="test")
    thread.join(timeout=120)

    job = store.get(job.id)
    assert job.state is JobState.CANCELLED
    state = double.state()
    assert state["counters"]["cancelled_imports"] == 1
    assert double.live_filesets() == [] and state["images"] == []
    assert all(s["closed"] for s in state["sessions"]), state["sessions"]
    log = store.read_log(job.id)
    assert "asking the child to stop" in log and "this job's filesets" in log


def test_a_session_key_that_ends_mid_import_leaves_no_fileset_and_says_so(store, importer, make_spec, double):
    # F3: the job's own session ended during the server-side import; the clean-up ran in
    # that dead session, failed, and the fileset stayed; the message advised converting.
    double.faults(import_delay=6)
    key = double.session("jdoe", "lab")
    job, thread = start_job(store, importer, make_spec({"k.fake": b""}, group=None, session_key=key))
    wait_for_phase(store, job.id, "importing")
    double.close_session(key)
    thread.join(timeout=120)

    job = store.get(job.id)
    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    message = job.error.message
    assert "session" in message and "convert" not in message
    assert "removed from OMERO" in message
    assert double.live_filesets() == []
    assert "a session of the admin's acting as the owner" in store.read_log(job.id)


def test_an_import_timeout_says_whether_the_fileset_was_removed(store, omero_config, make_spec, double):
    # F3: "it was cancelled and its fileset removed" was said whether or not it was.
    double.faults(import_delay=30)
    importer = create_importer(omero_config(timeout=2))
    try:
        job = run_job(store, importer, make_spec({"slow.fake": b""}, group="lab"))
    finally:
        importer.close()
    assert job.state is JobState.FAILED
    (fileset,) = double.state()["filesets"]
    assert f"fileset {fileset['id']} was removed from OMERO" in job.error.message
    assert double.live_filesets() == []


def test_a_failure_mail_goes_to_the_owners_address_from_omero(store, importer, make_spec, double):
    # F4: success mails used OMERO's address, failure mails went to the admin ("no known
    # email address"): the address was known only from a result.
    double.faults(import_error="the server is unhappy")
    job = run_job(store, importer, make_spec({"a.fake": b""}, group="lab", email=None))
    assert job.state is JobState.FAILED, job.error

    owner_mail = next(m for m in Notifier(importer.config).compose(job) if m.kind == "job_failed")
    assert owner_mail.recipients == ("jdoe@example.org",)
    assert "no known email address" not in owner_mail.message.get_body(("plain",)).get_content()
    # Kept with the job (spec.extra), its files and owner untouched.
    assert job.spec.extra["owner_email"] == "jdoe@example.org"
    assert [f.path for f in job.spec.files] == ["a.fake"] and job.spec.owner == "jdoe"


def test_a_session_key_of_another_user_fails_before_upload(store, importer, make_spec, double):
    # F5: the import ran as mary while the job, its listing and its mails said jdoe.
    key = double.session("mary", "lab")
    job = run_job(store, importer, make_spec({"m.fake": b""}, group=None, owner="jdoe", session_key=key))

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert "'mary'" in job.error.message and "'jdoe'" in job.error.message
    assert "nothing was uploaded" in job.error.message
    state = double.state()
    assert state["filesets"] == [] and state["datasets"] == []


def test_job_log_wording_for_a_transient_failure_and_a_failed_fileset(store, omero_config, make_spec, double):
    # F7: a transient upload failure wrote a Python traceback into the job log; a fileset
    # deleted after this attempt's own failure was logged as "of an earlier attempt"; the
    # child's "permanent" read as final for a job the service then paused or retried.
    importer = create_importer(omero_config())
    try:
        double.faults(fail_upload="b.fake")
        job = run_job(store, importer, make_spec({"a.fake": b"a", "b.fake": b"b"}, group="lab"), now=1000.0)
        assert job.state is JobState.RETRY_WAIT, job.error
        log = store.read_log(job.id)
        assert "Traceback" not in log and "import failed (" not in log and "permanent failure" not in log

        double.faults(import_error="refused by the server")
        failed = run_job(store, importer, make_spec({"c.fake": b"c"}, group="lab"))
    finally:
        importer.close()
    assert failed.state is JobState.FAILED
    log = store.read_log(failed.id)
    assert "earlier attempt" not in log and "deleted this job's filesets" in log


def test_cancelling_during_the_upload_leaves_no_fileset(store, omero_config, make_spec, double):
    # F2, the other phase: a cancel while the files are still going up.
    importer = create_importer(omero_config(block_size=64 * 1024))
    try:
        double.faults(slow=1)  # every upload write (and login) takes a second
        job, thread = start_job(store, importer, make_spec({"u.fake": b"u" * (1024 * 1024)}, group="lab"))
        wait_for_phase(store, job.id, "uploading")
        store.cancel(job.id, by="test")
        thread.join(timeout=120)
    finally:
        importer.close()
    assert store.get(job.id).state is JobState.CANCELLED
    state = double.state()
    assert double.live_filesets() == [] and state["images"] == []
    assert all(s["closed"] for s in state["sessions"]), state["sessions"]
