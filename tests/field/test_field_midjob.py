"""An acquisition changed while its job runs: one job imports it, into one archive folder.

A source file deleted while the job copies is the acquisition changing under the job:
the job fails for good with the reason and removes what it wrote; the watcher queues
no second job while the first is unfinished, and imports the changed acquisition once
the first has ended. Never two archive folders for one acquisition.
"""

from __future__ import annotations

import pytest
from drops import MODES, succeeded, tree
from helpers import wait_until


@pytest.mark.parametrize("mode", MODES)
def test_a_file_deleted_while_its_job_runs_gives_one_import_in_one_folder(field, mode, paused_copy):
    held, go = paused_copy
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    files = {f"{n}.tif": n.encode() * 100 for n in "abcd"}
    tree(field.drop / "jdoe" / "del", files)
    assert held.wait(20), "the job started copying"
    (field.drop / "jdoe" / "del" / "d.tif").unlink()  # not copied yet
    # The watcher sees the change while job 1 runs: it says so instead of queueing a second job.
    wait_until(lambda: len(field.jobs()) > 1 or field.reported("changed while job"), 20,
               message="the watcher's answer to the change")
    if len(field.jobs()) == 1:  # held: explain says what pending says (it said "complete: queued once …")
        from watchfolder.watch.explain import explain

        held_answer = wait_until(
            lambda: a if "changed while job" in (a := explain(field.service.config, field.store,
                                                               str(field.drop / "jdoe" / "del"))).reason else None,
            10, message="explain naming the running job")
        assert "queued once" not in held_answer.reason
    go.set()
    jobs = wait_until(lambda: j if succeeded(j := field.jobs()) and all(x.state.finished for x in j) else None,
                      30, message="every job finished, one succeeded")
    first, *rest = jobs
    assert first.state.value == "failed", (first.state, first.error)
    assert "d.tif disappeared while importing; the acquisition was changed during import" in first.error.message
    assert [j.state.value for j in rest] == ["succeeded"], [(j.id, j.state.value, j.error) for j in jobs]
    [done] = rest
    assert sorted(f.path for f in done.spec.files) == ["a.tif", "b.tif", "c.tif"]
    # One archive folder, holding exactly the succeeded job's files (the first job's copies removed).
    assert field.archived() == [f"jdoe/_no_project/del/del/{n}.tif" for n in "abc"], field.archived()
    assert "removed 3 file(s) this job had written" in field.store.read_log(first.id)  # a, b, c: before d


@pytest.mark.parametrize("detection", ["layout", "sidecar"])
def test_a_file_filled_in_place_keeping_size_and_mtime_is_not_imported_half_written(field, detection):
    # robocopy /Z: the file is made at its final size with an old mtime, filled chunk by chunk,
    # its mtime set back after each write, and given its real mtime at the end. Names, sizes and
    # mtimes never change while it is written; only its ctime does. Polling (outside try of
    # issue 12, second round): imported half-written, then again into "robo (2)".
    import hashlib
    import os
    import time

    if detection == "layout":
        field.start("polling", detection="layout", layout="{owner}/{dataset}/")
        folder = field.drop / "carl" / "robo"
        folder.mkdir(parents=True)
        data = folder / "a.tif"
    else:
        field.start("polling", detection="sidecar")
        folder = field.drop
        data = folder / "robo.czi"
        (folder / "robo.czi.json").write_text('{"owner": "carl", "target": {"dataset": "D"}}', encoding="utf-8")
    old = time.mktime((1980, 1, 1, 0, 0, 0, 0, 0, -1))
    chunk, chunks = 1500, 10
    final = bytes(range(256)) * (chunk * chunks // 256) + bytes(chunk * chunks % 256)
    with open(data, "wb") as fh:
        fh.truncate(len(final))
    os.utime(data, (old, old))
    for i in range(chunks):
        time.sleep(0.15)  # under the quiet period (0.3 s): the file is never quiet while written
        with open(data, "r+b") as fh:
            fh.seek(i * chunk)
            fh.write(final[i * chunk:(i + 1) * chunk])
        os.utime(data, (old, old))
    os.utime(data, (old + 1e9, old + 1e9))
    [job] = field.settled(1)
    field.quiet_for(1.0)
    jobs = field.jobs()
    assert len(jobs) == 1, [(j.id, j.state.value, j.result) for j in jobs]
    assert job.state.value == "succeeded", job.error
    [archived] = field.archived()
    assert hashlib.sha256((field.archive / archived).read_bytes()).hexdigest() == hashlib.sha256(final).hexdigest()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detection", ["layout", "manifest-without-files"])
def test_an_acquisition_holding_a_copy_in_progress_waits_for_it(field, mode, detection):
    # a.tif copied, b.tif still arriving as b.tif.part, the transfer stalled past the quiet period:
    # not imported without b.tif (it was, and b.tif was then "changed after this import", never
    # imported). Pending says why; once renamed, both are imported in one job (outside try).
    import json
    import os

    if detection == "layout":
        field.start(mode, detection="layout", layout="{owner}/{dataset}/")
        folder = field.drop / "walt" / "stall"
        tree(folder, {"a.tif": b"a" * 100, "b.tif.part": b"b" * 50})
    else:
        field.start(mode)
        folder = field.drop / "stall"
        tree(folder, {"a.tif": b"a" * 100, "b.tif.part": b"b" * 50})
        (folder / "watchfolder.json").write_text(json.dumps({"owner": "walt", "target": {"dataset": "D"}}),
                                                 encoding="utf-8")
    rel = str(folder.relative_to(field.drop))
    wait_until(lambda: [e for e in field.pending() if e["path"] == rel and "b.tif.part" in (e.get("waiting") or "")],
               10, message="pending naming the copy in progress")
    field.quiet_for(1.0)
    assert field.jobs() == []
    with open(folder / "b.tif.part", "ab") as fh:
        fh.write(b"b" * 50)
    os.rename(folder / "b.tif.part", folder / "b.tif")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert sorted(f.path for f in job.spec.files if f.path.endswith(".tif")) == ["a.tif", "b.tif"]
