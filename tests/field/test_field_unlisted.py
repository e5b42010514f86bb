"""Outside test of issue 15, finding 3: files in a manifest acquisition's folder that its file list
does not name are not imported, and that is said (job log, owner's mail, explain), never silent."""

from __future__ import annotations

import os

import pytest
from drops import MODES, manifest, tree
from helpers import wait_until

from watchfolder.watch.explain import explain


@pytest.mark.parametrize("mode", MODES)
def test_unlisted_files_are_left_out_and_said_in_log_mail_and_explain(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging" / "extra"
    tree(staging, {"unlisted.dat": b"notes", "sub/also.dat": b"more"})
    manifest(staging, {"e.tif": b"pixels" * 10})
    os.rename(staging, field.drop / "extra")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert [f.path for f in job.spec.files] == ["e.tif"]
    log = field.store.read_log(job.id)
    assert "left out of the acquisition (2): unlisted.dat (not listed in the manifest), " \
           "sub/also.dat (not listed in the manifest)" in log, log
    wait_until(lambda: any("unlisted.dat (not listed in the manifest)" in m for m in field.mails()), 10,
               message="the owner's mail listing the unlisted file")
    cfg = field.service.config
    got = explain(cfg, field.store, str(field.drop / "extra" / "unlisted.dat"))
    assert got.verdict == "left_out" and got.job_id == job.id, got
    assert got.reason.startswith("not part of the import: unlisted.dat is not listed in the manifest "
                                 "(watchfolder.json lists 1 file(s)); acquisition extra became job"), got.reason
    assert "drop it as a new acquisition" in got.reason and "rename" not in got.reason
    # A listed file and the manifest itself are part of it.
    for rel in ("e.tif", "watchfolder.json"):
        got = explain(cfg, field.store, str(field.drop / "extra" / rel))
        assert (got.verdict, got.job_id) == ("job", job.id), (rel, got)


def test_explain_says_an_unlisted_file_will_be_left_out_before_the_acquisition_is_queued(field, tmp_path):
    field.start("events")
    staging = tmp_path / "staging" / "acq"
    tree(staging, {"notes.txt": b"n"})
    manifest(staging, {"a.tif": b"a"})
    body = (staging / "watchfolder.json").read_text()
    # Listed but not there yet: the acquisition waits; the unlisted file is said to be left out.
    (staging / "watchfolder.json").write_text(body.replace('"path": "a.tif"', '"path": "b.tif"'))
    os.rename(staging, field.drop / "acq")
    wait_until(lambda: field.reported("acq"), 10, message="acq pending")
    got = explain(field.service.config, field.store, str(field.drop / "acq" / "notes.txt"))
    assert got.verdict == "left_out", got
    assert "is imported without it" in got.reason and "add it to the manifest's \"files\"" in got.reason


@pytest.mark.parametrize("mode", MODES)
def test_explain_on_what_the_walk_left_out_says_left_out(field, tmp_path, mode):
    # runF/{a.tif, p.tif (a FIFO), alias.tif -> a.tif} with a manifest naming no files: the job
    # imported a.tif only; explain on p.tif said "became job N, succeeded" (outside try of
    # issue 15). It says what the job log says: left out, and why.
    import json
    import os

    from watchfolder.watch.explain import explain

    field.start(mode)
    staging = tmp_path / "staging" / "runF"
    staging.mkdir(parents=True)
    (staging / "a.tif").write_bytes(b"a" * 100)
    os.mkfifo(staging / "p.tif")
    os.symlink("a.tif", staging / "alias.tif")
    (staging / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "d"}}))
    os.rename(staging, field.drop / "runF")
    [job] = field.settled(1)
    assert job.state.value == "succeeded" and [f.path for f in job.spec.files] == ["a.tif"]
    cfg = field.service.config
    for name, why in (("p.tif", "named pipe"), ("alias.tif", "symbolic link")):
        got = explain(cfg, field.store, str(field.drop / "runF" / name))
        assert got.verdict == "left_out", (name, got)
        assert why in got.reason and f"became job {job.id}" in got.reason, got.reason
    assert explain(cfg, field.store, str(field.drop / "runF" / "a.tif")).verdict == "job"
