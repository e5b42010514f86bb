"""Issue 14's found cases, end to end against the strict double: what a real OMERO
server would have refused or mangled, and what the importer now does instead.

Jobs go through the real store, worker, importer and child (with Bio-Formats when
Java, JPype and the jar are there) over real Ice to the double, which imports with
the same Bio-Formats jar. Test images are made here: Bio-Formats' synthetic
``.fake`` format (the file name carries the parameters) and its ``ImageConverter``.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import run_job, truncated_tiff
from helpers import BlockedWriter

from watchfolder.importers import create_importer
from watchfolder.job import JobState, Target

pytestmark = pytest.mark.omero

PLATE = "plate&plates=1&plateRows=2&plateCols=2&fields=1.fake"


def test_an_import_longer_than_the_configured_session_time_succeeds(store, omero_config, make_spec, double):
    # Found case 1, scaled down: sudo_ttl_ms used to be the owner's session's whole
    # lifetime, so an import that took longer died with "exceeded timeToLive". Now it
    # is the idle timeout (kept off by the client's keep-alive, every 6 s at least)
    # and the lifetime covers the job; the server-side import here takes longer.
    double.faults(import_delay=15)
    importer = create_importer(omero_config(sudo_ttl_ms=12000))
    job = run_job(store, importer, make_spec({"long.fake": b"x" * 1000}, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    (sudo,) = [s for s in state["sessions"] if s.get("sudo_by") is not None]
    assert sudo["ttl_ms"] >= 3600 * 1000 and sudo["tti_ms"] == 12000
    # ... and it is closed when the job ends, not left to time out.
    assert sudo["closed"] and sudo["ended_by"] == "closeSession"
    assert len(state["images"]) == 1


def test_an_empty_file_is_imported(store, importer, make_spec, double):
    # Found case 2: OMERO creates an uploaded file on the first write; an empty file
    # that is never written does not exist on the server and verifyUpload fails.
    job = run_job(store, importer, make_spec({"empty.fake": b"", "other.fake": b"data"}, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    assert sorted(f["files"][0]["size"] for f in state["filesets"]) == [0, 4]
    assert len(state["images"]) == 2


def test_a_screen_target_takes_only_plates(store, importer, make_spec, double, bioformats):
    # Found case 3: OMERO links only plates to a screen. A non-plate fileset is refused
    # before anything is uploaded; a plate lands in the screen.
    bad = run_job(store, importer, make_spec({"cells.fake": b"", PLATE: b""}, group="lab",
                                             target=Target(screen="HCS run")))
    assert bad.state is JobState.FAILED and bad.error.kind == "permanent"
    assert "cells.fake" in bad.error.message and "only plates" in bad.error.message
    assert double.state()["filesets"] == []

    good = run_job(store, importer, make_spec({PLATE: b""}, group="lab", target=Target(screen="HCS run")))
    assert good.state is JobState.SUCCEEDED, good.error
    state = double.state()
    (screen,) = state["screens"]
    (plate,) = state["plates"]
    assert plate["screen"] == screen["id"] == good.result["target"]["id"]
    assert len(state["images"]) == 4 and {i["plate"] for i in state["images"]} == {plate["id"]}


def test_a_screen_target_without_bioformats_refuses_a_non_plate_after_import(store, omero_config, make_spec,
                                                                              double, bioformats):
    # The same kind without Bio-Formats in the child: OMERO's answer shows no plate;
    # the fileset is deleted again and the job fails instead of reporting "screen N".
    importer = create_importer(omero_config(bioformats=False))
    job = run_job(store, importer, make_spec({"cells.fake": b""}, group="lab", target=Target(screen="S")))

    assert job.state is JobState.FAILED and "not a plate" in job.error.message
    assert double.live_filesets() == [] and double.state()["images"] == []


def test_files_that_are_not_images_are_attached_and_the_job_succeeds(store, importer, make_spec, double,
                                                                     bioformats):
    # Found case 4: tiles and a zz_metadata.json used to end "failed" after the
    # tiles were imported. Bio-Formats now decides before any upload.
    files = {"tile_1.fake": b"1", "tile_2.fake": b"2", "notes.txt": b"objective 63x\n",
             "zz_metadata.json": b'{"stage": 3}'}
    job = run_job(store, importer, make_spec(files, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    assert len(state["images"]) == 2 and len(state["filesets"]) == 2
    attached = sorted(a["file"] for a in job.result["attachments"])
    assert attached == ["notes.txt", "zz_metadata.json"]
    files_by_id = {f["id"]: f for f in state["original_files"]}
    annotations = [a for a in state["annotations"] if a["kind"] == "file"]
    assert sorted(files_by_id[a["file"]]["name"] for a in annotations) == attached
    assert all(files_by_id[a["file"]]["size"] == len(files[files_by_id[a["file"]]["name"]]) for a in annotations)
    dataset = job.result["target"]["id"]
    assert sorted(link[2] for link in state["container_links"]) == sorted(a["id"] for a in annotations)
    assert {tuple(link[:2]) for link in state["container_links"]} == {("dataset", dataset)}
    assert job.progress.files_done == job.progress.files_total == 4


@pytest.mark.parametrize("policy", ["ignore", "fail"])
def test_non_image_policy_ignore_or_fail_before_upload(store, omero_config, make_spec, double, bioformats, policy):
    importer = create_importer(omero_config(non_images=policy))
    job = run_job(store, importer, make_spec({"a.fake": b"", "notes.txt": b"n"}, group="lab"))

    if policy == "ignore":
        assert job.state is JobState.SUCCEEDED and job.result["ignored"] == ["notes.txt"]
        assert len(double.state()["images"]) == 1 and double.state()["original_files"] == []
    else:
        assert job.state is JobState.FAILED and "notes.txt" in job.error.message
        assert "non_images" in job.error.message and double.state()["filesets"] == []


def test_a_corrupt_tif_fails_before_upload_naming_file_and_reason(store, importer, make_spec, double, bioformats):
    job = run_job(store, importer, make_spec({"good.fake": b"", "broken.tif": os.urandom(600)}, group="lab"))

    assert job.state is JobState.FAILED and job.error.kind == "permanent"
    assert "broken.tif" in job.error.message and "Invalid TIFF file" in job.error.message
    state = double.state()
    assert state["filesets"] == [] and state["counters"]["bytes_written"] == 0


def test_a_multi_file_ome_tiff_is_one_fileset_and_one_image(store, importer, make_spec, double, converted):
    # Found case 5: three .ome.tiff sharing one OME-XML are one dataset for Bio-Formats.
    files = {p.name: p.read_bytes() for p in converted["multi"]}
    job = run_job(store, importer, make_spec(files, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    (fileset,) = job.result["filesets"]
    assert sorted(fileset["files"]) == sorted(files)
    state = double.state()
    assert len(state["filesets"]) == 1 and len(state["images"]) == 1


def test_a_multi_series_file_gives_one_image_per_series(store, importer, make_spec, double, bioformats):
    job = run_job(store, importer, make_spec({"stage&series=3.fake": b""}, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    names = sorted(i["name"] for i in double.state()["images"])
    assert len(job.result["image_ids"]) == 3 and len(names) == 3
    assert all(n.startswith("stage&series=3.fake [") for n in names)


def test_an_admin_without_sudo_pauses_the_target_and_alerts_once(make_config, make_spec, omero_python, double):
    # Outside tester, low (d): an admin account without the Sudo privilege failed every
    # job one by one. It is the target's configuration: the target pauses (the probe finds
    # the same), no job burns an attempt, the admin gets one mail, and granting the
    # privilege resumes the queue.
    from helpers import wait_until

    from watchfolder.service import Parts, Service

    double.seed(users=[{"name": "ops", "password": "ops-pw", "groups": ["system"], "admin": True,
                        "privileges": ["ModifyUser", "ReadSession"]}])
    config = make_config(
        importer={"kind": "omero",
                  "omero": {"host": "127.0.0.1", "port": double.port, "admin_user": "ops",
                            "admin_password": "ops-pw", "python": omero_python, "connect_timeout": 5,
                            "idle_timeout": 60},
                  "pause": {"probe_interval": 0.5, "alert_after": 3600}},
        workers={"count": 2, "poll_interval": 0.05},
    )
    service = Service(config, Parts(workers=True, watch=False, server=False, mail=True))
    jobs = [service.store.enqueue(make_spec({f"a{i}.fake": b""}, group="lab", importer="omero"))[0]
            for i in range(3)]
    service.start()
    try:
        wait_until(lambda: service.gate.paused, timeout=60, message="the target pauses")
        wait_until(lambda: service.store.counts()["running"] == 0, timeout=60)
        status = service.gate.status()
        assert status["cause"] == "configuration"
        assert "'ops'" in status["reason"] and "Sudo privilege" in status["reason"]
        assert "importer.omero.admin_user" in status["reason"]
        counts = service.store.counts()
        assert counts["failed"] == 0 and counts["retry_wait"] == 0
        assert all(service.store.get(j.id).attempts == 0 for j in jobs)
        service.gate.tick()  # probes again while paused: still no Sudo, still one mail
        alerts = [m for m in service.store.outbox_list(limit=100) if m.kind == "admin_alert"]
        assert len(alerts) == 1 and "configuration error" in alerts[0].subject
        body = email.message_from_bytes(alerts[0].raw, policy=email.policy.default).get_body(("plain",))
        assert "Sudo privilege" in body.get_content()

        double.seed(users=[{"name": "ops", "password": "ops-pw", "groups": ["system"], "admin": True,
                            "privileges": ["ModifyUser", "ReadSession", "Sudo"]}])
        wait_until(lambda: service.store.counts()["succeeded"] == len(jobs), timeout=120,
                   message="every job once the privilege is granted")
    finally:
        service.stop()
    assert [service.store.get(j.id).attempts for j in jobs] == [1] * len(jobs)
    alerts = sorted((m for m in service.store.outbox_list(limit=100) if m.kind == "admin_alert"), key=lambda m: m.id)
    assert len(alerts) == 2 and "resumed" in alerts[1].subject


def test_a_group_owner_outside_their_groups_fails_only_that_job(store, omero_config, make_spec, double):
    # The per-job mirror: a group owner may act for the groups they lead only. The probe
    # passes (they lead one), so the job fails by itself and the target is not paused.
    from watchfolder.backpressure import TargetGate

    double.seed(users=[{"name": "lead", "password": "lead-pw", "groups": ["imaging"], "owner_of": ["imaging"]}])
    importer = create_importer(omero_config(admin_user="lead", admin_password="lead-pw"))
    gate = TargetGate(importer, after_failures=3, probe_interval=30, alert_after=0)
    from watchfolder.worker import Worker

    job, _ = store.enqueue(make_spec({"a.fake": b""}, group="lab"))
    Worker(store, importer, name="w1", gate=gate).loop()
    job = store.get(job.id)

    assert job.state is JobState.FAILED and job.error.config_error is True
    assert "'lead'" in job.error.message and "owner of the group" in job.error.message
    assert not gate.paused and gate.last_probe == "ok"


def test_a_group_owner_may_act_for_the_groups_members(store, omero_config, make_spec, double):
    double.seed(users=[{"name": "lead", "password": "lead-pw", "groups": ["lab"], "owner_of": ["lab"]}])
    importer = create_importer(omero_config(admin_user="lead", admin_password="lead-pw"))
    job = run_job(store, importer, make_spec({"a.fake": b""}, group="lab"))

    assert job.state is JobState.SUCCEEDED, job.error
    assert job.result["owner"] == "jdoe"


def test_an_import_timeout_cancels_removes_and_fails_for_good(store, omero_config, make_spec, double):
    # Found case 6: it used to cancel the import and then say it "will try again".
    double.faults(import_delay=30)
    importer = create_importer(omero_config(timeout=2))
    job = run_job(store, importer, make_spec({"slow.fake": b""}, group="lab"))

    assert job.state is JobState.FAILED and job.error.kind == "permanent"
    assert "importer.omero.timeout" in job.error.message and "will try again" not in job.error.message
    assert job.attempts == 1
    state = double.state()
    assert double.live_filesets() == [] and state["counters"]["deleted_filesets"] == 1
    assert state["images"] == []


def test_a_dataset_of_another_group_is_named_as_such(store, importer, make_spec, double):
    # Found case 6: a real server answers "Cannot read" for another group's container.
    other = run_job(store, importer, make_spec({"m.fake": b""}, owner="mary", group="imaging",
                                               target=Target(dataset="hers")))
    assert other.state is JobState.SUCCEEDED, other.error
    job = run_job(store, importer, make_spec({"j.fake": b""}, owner="mary", group="lab",
                                             target=Target(dataset_id=other.result["target"]["id"])))

    assert job.state is JobState.FAILED and job.error.kind == "permanent"
    assert "is in another group than the import's group 'lab'" in job.error.message


def test_status_and_check_config_say_which_grouping_is_used(store, omero_config, omero_python, bioformats,
                                                             tmp_path, make_spec, double, capsys):
    from watchfolder.cli import main

    # Outside tester, low (c): status said "Bio-Formats" whenever the jar file existed, and
    # bioformats.ok / grouping "bioformats" with importer.omero.bioformats: false.
    ok = create_importer(omero_config()).health()
    assert ok["ok"] and ok["bioformats"]["state"] == "ok" and ok["bioformats"]["used"] is True
    assert ok["bioformats"]["version"].startswith("7.") and ok["bioformats"]["java"]
    assert ok["filesets"].startswith(f"Bio-Formats {ok['bioformats']['version']} (")
    # a14 F8: a configured jar that is not there is a typo, refused, not "unavailable" with a fallback.
    typo = create_importer(omero_config(bioformats_jar=str(tmp_path / "nowhere.jar"))).health()
    assert typo["bioformats"]["state"] == "broken" and not typo["ok"]
    assert "importer.omero.bioformats_jar: no file at" in typo["filesets"] and "every job fails" in typo["filesets"]
    job = run_job(store, create_importer(omero_config(bioformats_jar=str(tmp_path / "nowhere.jar"))),
                  make_spec({"t.fake": b""}, group="lab"))
    assert job.state is JobState.FAILED and job.error.config_error
    assert "importer.omero.bioformats_jar: no file at" in job.error.message
    off = create_importer(omero_config(bioformats=False)).health()
    assert off["filesets"] == "suffix rules (importer.omero.bioformats is false)"
    assert off["bioformats"]["used"] is False
    broken_jar = tmp_path / "broken.jar"
    broken_jar.write_bytes(b"not a jar")
    broken = create_importer(omero_config(bioformats_jar=str(broken_jar))).health()
    assert broken["bioformats"]["state"] == "broken" and not broken["ok"]
    assert broken["filesets"].startswith("none: Bio-Formats did not start") and "every job fails" in broken["filesets"]
    # ... which is what a job meets:
    job = run_job(store, create_importer(omero_config(bioformats_jar=str(broken_jar))),
                  make_spec({"a.fake": b""}, group="lab"))
    assert job.state is JobState.FAILED and job.error.config_error and "Bio-Formats did not start" in job.error.message

    def check_config(**omero):
        path = tmp_path / "wf.yaml"
        path.write_text(json.dumps({
            "data_dir": str(tmp_path / "data"),
            "importer": {"kind": "omero", "omero": {"python": omero_python, "admin_password": "x", **omero}},
            "notify": {"transport": "folder", "admin_email": "admin@example.org"},
            "server": {"enabled": False},
        }))
        return main(["--config", str(path), "check-config"]), capsys.readouterr()

    code, out = check_config(bioformats=False)
    assert code == 0 and "# importer.omero: filesets by suffix rules (importer.omero.bioformats is false)" in out.out
    # a14 F8: "every job fails" was printed with exit status 0 ("valid").
    for jar in (broken_jar, tmp_path / "nowhere.jar"):
        code, out = check_config(bioformats_jar=str(jar))
        assert code == 1 and "# importer.omero: filesets by none:" in out.out
        assert "every OMERO job would fail" in out.err


def test_an_acquisition_without_any_image_fails_before_upload(store, importer, make_spec, double, bioformats):
    job = run_job(store, importer, make_spec({"notes.txt": b"n", "meta.json": b"{}"}, group="lab"))

    assert job.state is JobState.FAILED and job.error.kind == "permanent"
    assert "none of the 2 file(s) is an image" in job.error.message and "notes.txt" in job.error.message
    assert double.state()["filesets"] == [] and double.state()["original_files"] == []


def test_a_retry_during_the_attachment_step_reuses_the_attachments(store, importer, make_spec, double,
                                                                 bioformats):
    # Outside tester, finding 1: a worker killed while attaching 150 notes left, after the
    # retry, every note attached twice. The connection drops here in the 4th of 6 notes.
    notes = {f"note{i:03d}.txt": (f"note {i}\n" * 150_000).encode()[:1024 * 1024] for i in range(6)}
    spec = make_spec({"img.fake": b"", **notes}, group="lab")
    double.faults(drop_after_bytes=int(3.5 * 1024 * 1024))
    job = run_job(store, importer, spec, now=1000.0)
    assert job.state is JobState.RETRY_WAIT, job.error

    job = run_job(store, importer, spec, now=2000.0)

    assert job.state is JobState.SUCCEEDED and job.attempts == 2, job.error
    state = double.state()
    files = {f["id"]: f for f in state["original_files"]}
    annotations = [a for a in state["annotations"] if a["kind"] == "file"]
    assert sorted(files[a["file"]]["name"] for a in annotations) == sorted(notes)
    assert all(files[a["file"]]["hash"] == hashlib.sha1(notes[files[a["file"]]["name"]]).hexdigest()
               for a in annotations)
    assert sorted(link[2] for link in state["container_links"]) == sorted(a["id"] for a in annotations)
    assert len(files) == len(notes)  # the note cut mid-upload was uploaded again into its own file
    assert any(a["reused"] for a in job.result["attachments"])
    assert sorted(a["file"] for a in job.result["attachments"]) == sorted(notes)


@pytest.mark.parametrize("bioformats_in_child", [True, False], ids=["before-upload", "suffix-rules"])
def test_a_plate_is_refused_for_a_dataset_target(store, omero_config, make_spec, double, bioformats,
                                                 bioformats_in_child):
    # Outside tester, finding 2 (the mirror of case 3): a plate "into dataset D" ended
    # succeeded, with the plate in no screen and its images in no dataset.
    importer = create_importer(omero_config(bioformats=bioformats_in_child))
    job = run_job(store, importer, make_spec({PLATE: b""}, group="lab",
                                             target=Target(project="P", dataset="plateds")))

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert PLATE in job.error.message and "--screen" in job.error.message
    assert double.live_filesets() == [] and double.state()["plates"] == []
    if bioformats_in_child:
        assert double.state()["filesets"] == []  # refused before anything was uploaded


@pytest.mark.parametrize("part", ["fifo", "symlink-out"])
def test_bioformats_sees_only_the_jobs_files(store, importer, make_spec, double, converted, tmp_path, part):
    # Outside tester, finding 5: the part a multi-file OME-TIFF names, when it is not
    # among the job's files, was opened anyway: a FIFO hung the child until the idle
    # timeout ("will try again"), a symlink out of the acquisition was parsed. Bio-Formats
    # now reads a private mirror of the checked files: the part is absent, and the job
    # fails before upload naming it.
    files = {p.name: p.read_bytes() for p in converted["multi"] if p.name != "out_Z1.ome.tiff"}
    spec = make_spec(files, group="lab")
    needed = Path(spec.root) / "out_Z1.ome.tiff"
    if part == "fifo":
        os.mkfifo(needed)
    else:
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / needed.name).write_bytes((converted["multi"][1]).read_bytes())
        needed.symlink_to(outside / needed.name)
    job = run_job(store, importer, spec)

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert "out_Z0.ome.tiff needs out_Z1.ome.tiff" in job.error.message
    assert "not among the job's files" in job.error.message
    assert double.state()["filesets"] == []


def test_checked_files_are_the_ones_read_after_a_swap(child_module, tmp_path):
    # The security tester's variant: after the check, a file swapped for a symlink to an
    # outside file. Bio-Formats' mirror and the upload still read the checked inode.
    root = tmp_path / "acq"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.tif").write_bytes(b"checked")
    (tmp_path / "outside.tif").write_bytes(b"outside")
    checked = child_module.CheckedFiles({"root": str(root), "allowed_root": str(tmp_path)}, ["sub/a.tif"])
    try:
        (root / "sub" / "a.tif").unlink()
        (root / "sub" / "a.tif").symlink_to(tmp_path / "outside.tif")
        mirror = Path(checked.mirror())
        assert (mirror / "sub" / "a.tif").read_bytes() == b"checked"
        assert sorted(p.name for p in mirror.rglob("*")) == ["a.tif", "sub"]
        assert oct(mirror.stat().st_mode & 0o777) == "0o700"
        with checked.open("sub/a.tif") as f:
            assert f.read() == b"checked"
    finally:
        checked.close()
    assert not mirror.exists()


def test_files_past_the_descriptor_budget_are_reopened_from_the_folder_and_compared(child_module, tmp_path,
                                                                                   monkeypatch):
    # A plate has more files than the process may keep open: those past the budget are
    # reopened relative to the acquisition folder's kept descriptor (not walked from the
    # root for each), and a file replaced since the check is refused.
    import resource

    root = tmp_path / "acq"
    (root / "Images").mkdir(parents=True)
    names = [f"Images/f{i}.tif" for i in range(6)]
    for name in names:
        (root / name).write_bytes(name.encode())
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    monkeypatch.setattr(child_module.CheckedFiles, "MARGIN", soft - 2)  # two kept open, four not
    checked = child_module.CheckedFiles({"root": str(root), "allowed_root": str(tmp_path)}, names)
    try:
        assert len(checked.fds) == 2 and checked.tree is not None
        for name in names:
            with checked.open(name) as f:
                assert f.read() == name.encode()
        (root / names[-1]).unlink()
        (root / names[-1]).write_bytes(b"replaced")
        with pytest.raises(child_module.Failure, match="changed after it was checked"):
            checked.open(names[-1])
    finally:
        checked.close()
    assert checked.tree is None


def test_a_truncated_tiff_fails_before_upload(store, importer, make_spec, double, converted):
    # Outside tester, finding 3: a cut-off TIFF passed the pre-check (Bio-Formats' setId
    # reads the header only) and was imported. OMERO's server reads every plane at import
    # (ManagedImportRequestI.pixelData), so the child now reads some before upload.
    good = converted["tile"][0].read_bytes()
    job = run_job(store, importer, make_spec({"good.tif": good, "bad.tif": truncated_tiff(good)}, group="lab"))

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert "bad.tif" in job.error.message and "pixel data" in job.error.message
    assert "good.tif" not in job.error.message
    state = double.state()
    assert state["filesets"] == [] and state["counters"]["bytes_written"] == 0


@pytest.mark.parametrize("special", ["fifo", "socket"])
def test_a_file_turned_special_after_detection_is_refused_and_never_opened(store, importer, make_spec, double,
                                                                           special):
    # Outside tester, finding 5 at import time: a file replaced by a FIFO (or a socket) after
    # the acquisition was detected. The child refuses it by its kind before opening anything.
    import socket

    spec = make_spec({"a.fake": b"", "b.fake": b""}, group="lab")
    b = Path(spec.root) / "b.fake"
    b.unlink()
    writer = sock = None
    if special == "fifo":
        os.mkfifo(b)
        writer = BlockedWriter(b)
    else:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(b))
    try:
        job = run_job(store, importer, spec)
        assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
        kind = "a named pipe (FIFO)" if special == "fifo" else "a socket"
        assert f"b.fake: is {kind}, not a regular file: refused and not opened" in job.error.message
        assert writer is None or not writer.opened.is_set()
        assert double.state()["filesets"] == []
    finally:
        if writer is not None:
            writer.release()
        if sock is not None:
            sock.close()


@pytest.mark.parametrize("temp_name", ["out_Z1.ome.tiff.part", ".out_Z1.ome.tiff.x7Gq2a"], ids=["part", "rsync"])
def test_a_part_still_under_a_temporary_name_is_named_and_never_read(store, importer, make_config, double,
                                                                     converted, tmp_path, temp_name):
    # Outside tester, finding 5: a multi-file OME-TIFF whose second part is still being
    # copied under a name the watcher excludes (a .part file; rsync's dot-file). Bio-Formats
    # reads only the job's files, so the excluded part is never pulled into the fileset; the
    # job fails before upload naming the part it needs and the excluded file beside it.
    from watchfolder.watch.detector import Patterns, make_rule

    drop = tmp_path / "drop"
    acq = drop / "acq"
    acq.mkdir(parents=True)
    for part in converted["multi"]:
        (acq / (temp_name if part.name == "out_Z1.ome.tiff" else part.name)).write_bytes(part.read_bytes())
    (acq / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "group": "lab", "target": {"dataset": "d"}}))
    config = make_config(watch=[{"name": "scope", "path": str(drop), "detection": "manifest"}])
    watch = config.watch[0]
    outcome = make_rule(watch, Patterns(watch.include, watch.exclude)).build(str(drop), "acq", now=0.0)
    if temp_name.endswith(".part"):
        # A *.part is a copy in progress: the watcher waits for it (issue 12) and queues nothing.
        assert (outcome.kind, outcome.why) == ("wait", "copying"), outcome
        assert temp_name in outcome.reason
        return
    assert outcome.kind == "enqueue", outcome
    assert [f.path for f in outcome.spec.files] == ["out_Z0.ome.tiff", "out_Z2.ome.tiff"]

    job = run_job(store, importer, outcome.spec)

    assert job.state is JobState.FAILED and job.error.kind == "permanent", job.error
    assert (f"out_Z0.ome.tiff needs out_Z1.ome.tiff, which is not there; beside it, left out of the job: "
            f"{temp_name} (excluded)") in job.error.message
    assert "wait until it has its final name" in job.error.message
    assert double.state()["filesets"] == []
