"""Cases 5 and 8: what is already in is never imported again (a change after success, a copy under another name)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from drops import MODES, manifest, tree
from helpers import wait_until


@pytest.mark.parametrize("mode", MODES)
def test_a_kept_acquisition_changed_after_success_is_not_imported_again(field, mode):
    field.start(mode)
    manifest(field.drop / "acq", {"a.tif": b"a" * 1000, "b.tif": b"b" * 1000})
    [job] = field.settled(1)
    assert job.state.value == "succeeded"
    mails = len(wait_until(field.mails, 10, message="the success mail"))
    archived = field.archived()
    (field.drop / "acq" / "a.tif").write_bytes(b"A" * 1000)  # a viewer rewrites a file
    tree(field.drop / "acq", {"thumbs.db": b"os", "notes.txt": b"a user adds a note"})
    field.quiet_for(1.5)
    jobs = field.jobs()
    assert [j.id for j in jobs] == [job.id], [(j.id, j.state.value, j.error) for j in jobs]
    assert field.archived() == archived
    assert len(field.mails()) == mails
    assert "after" in field.store.read_log(job.id).lower()  # the change is noted against the job


@pytest.mark.parametrize("mode", MODES)
def test_the_same_acquisition_copied_in_under_a_second_name_is_not_imported_twice(field, tmp_path, mode):
    field.start(mode)
    manifest(field.drop / "slide3", {"a.tif": b"a" * 1000, "b.tif": b"b" * 1000})
    [first] = field.settled(1)
    shutil.copytree(field.drop / "slide3", tmp_path / "copy")
    os.rename(tmp_path / "copy", field.drop / "slide3 copy")
    first, second = field.settled(2)
    assert second.state.value == "succeeded", second.error
    assert f"already imported as job {first.id}" in field.store.read_log(second.id)
    assert len(field.archived()) == 2
    wait_until(lambda: any(f"already imported as job {first.id}" in m for m in field.mails()), 10,
               message="the short mail naming the first job")


def test_deduplication_can_be_switched_off(field, tmp_path):
    field.start("events", deduplicate=False)
    manifest(field.drop / "slide3", {"a.tif": b"a" * 1000})
    field.settled(1)
    shutil.copytree(field.drop / "slide3", tmp_path / "copy")
    os.rename(tmp_path / "copy", field.drop / "again")
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"]
    assert len(field.archived()) == 2


def test_a_change_made_while_the_service_was_down_is_not_imported_again(field):
    field.start("events")
    manifest(field.drop / "acq", {"a.tif": b"a" * 1000})
    [job] = field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    field.stop()
    tree(field.drop / "acq", {"desktop.ini": b"os", "notes.txt": b"added while the service was down"})
    field.start("events")  # the start-up scan finds the change; the receipt says it was imported
    field.quiet_for(1.5)
    assert [j.id for j in field.jobs()] == [job.id]
    assert "changed after this import" in field.store.read_log(job.id)


def test_the_same_folder_removed_and_dropped_again_with_new_content_is_a_new_job(field, tmp_path):
    field.start("events")
    manifest(field.drop / "acq", {"a.tif": b"first " * 100})
    field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    shutil.rmtree(field.drop / "acq")
    manifest(tmp_path / "again", {"a.tif": b"second " * 100})
    os.rename(tmp_path / "again", field.drop / "acq")
    first, second = field.settled(2)
    assert second.state.value == "succeeded", second.error


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rewrite", [b"B" * 1000, b"longer now " * 200], ids=["same-size", "other-size"])
def test_a_kept_file_rewritten_so_the_manifest_no_longer_matches_is_noted_not_failed(field, mode, rewrite):
    # The only listed file rewritten after the import: nothing of the imported files is left
    # unchanged, but the manifest is the very one imported -- the same acquisition, changed.
    field.start(mode, missing_timeout=1.0)
    manifest(field.drop / "acq", {"a.tif": b"a" * 1000})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    mails = len(wait_until(field.mails, 10, message="the success mail"))
    (field.drop / "acq" / "a.tif").write_bytes(rewrite)
    wait_until(lambda: "changed after this import" in field.store.read_log(job.id), 10,
               message="the change noted in the importing job's log")
    field.quiet_for(2.5)  # past the missing timeout: a size that never matches again is no failure either
    jobs = field.jobs()
    assert [j.id for j in jobs] == [job.id], [(j.id, j.state.value, j.error) for j in jobs]
    assert len(field.mails()) == mails
    assert not field.reported("acq"), field.reported("acq")  # not pending, not failed


@pytest.mark.parametrize("mode", MODES)
def test_an_identical_copy_dropped_while_the_first_is_importing_is_not_imported_twice(field, tmp_path, mode,
                                                                                      paused_copy):
    held, go = paused_copy
    field.start(mode)
    manifest(field.drop / "slide3", {"a.tif": b"a" * 1000, "b.tif": b"b" * 1000})
    assert held.wait(20), "the first job started copying"
    shutil.copytree(field.drop / "slide3", tmp_path / "copy")
    os.rename(tmp_path / "copy", field.drop / "slide3 copy")
    # The second job is claimed while the first is still importing (a free worker takes it).
    wait_until(lambda: len(jobs := field.jobs()) == 2
               and any(h.state.value == "running" for h in field.store.get(jobs[1].id).history), 20,
               message="the second job claimed while the first runs")
    go.set()
    first, second = field.settled(2)
    assert (first.state.value, second.state.value) == ("succeeded", "succeeded"), (first.error, second.error)
    assert f"already imported as job {first.id}" in field.store.read_log(second.id)
    assert len(field.archived()) == 2, field.archived()  # the first job's two files, once


def test_copies_and_renames_of_acquisitions_imported_205_jobs_ago_are_not_imported_again(field, tmp_path,
                                                                                          monkeypatch):
    # Found by an outside test: de-duplication looked at the owner's newest 200 successes only.
    from watchfolder.watch import dedup

    read: list[str] = []
    real = dedup._sha256
    monkeypatch.setattr(dedup, "_sha256", lambda path: read.append(path) or real(path))
    field.start("events")
    manifest(field.drop / "listed", {"a.tif": b"listed " * 300, "b.tif": b"b" * 700})
    manifest(field.drop / "computed", {"x.tif": b"computed " * 300}, listed=False)  # checksums from the import
    first = field.settled(2)
    listed, computed = sorted(first, key=lambda j: j.spec.extra["acquisition"] != "listed")
    for n in range(205):  # unrelated acquisitions of the same owner into the same dataset
        manifest(tmp_path / "staging" / f"run-{n:03d}", {"x.tif": b"%08d" % n * 10})
        os.rename(tmp_path / "staging" / f"run-{n:03d}", field.drop / f"run-{n:03d}")
    assert all(j.state.value == "succeeded" for j in field.settled(207, timeout=240))
    archived = len(field.archived())
    shutil.copytree(field.drop / "listed", tmp_path / "copy")
    os.rename(tmp_path / "copy", field.drop / "listed copy")
    os.rename(field.drop / "computed", field.drop / "computed renamed")  # same files, same inodes
    jobs = field.settled(209, timeout=60)
    later = {j.spec.extra["acquisition"]: j for j in jobs[207:]}
    assert set(later) == {"listed copy", "computed renamed"}, later
    for name, earlier in (("listed copy", listed), ("computed renamed", computed)):
        job = later[name]
        assert job.state.value == "succeeded", job.error
        assert (job.result or {}).get("duplicate_of") == earlier.id, (name, job.result)
        assert f"already imported as job {earlier.id}" in field.store.read_log(job.id)
    assert len(field.archived()) == archived  # nothing archived twice
    assert not [p for p in read if "computed renamed" in p]  # the rename was known by its inodes, not re-read


@pytest.mark.parametrize("how", ["renamed", "copied"])
def test_a_sidecar_pair_renamed_or_copied_under_another_name_is_not_imported_twice(field, how):
    # A one-file acquisition's name is its data file's: renaming the pair (mv cells.czi
    # cells_renamed.czi, and its sidecar) or copying it under another name is the same data,
    # as for a folder (outside try of issue 12, case 8's kind).
    field.start("events")
    sidecar = json.dumps({"owner": "jdoe", "target": {"project": "P", "dataset": "D"}})
    folder = field.drop / "b"
    tree(folder, {"cells.czi": b"czi pixels " * 100})
    (folder / "cells.czi.json").write_text(sidecar, encoding="utf-8")
    [first] = field.settled(1)
    assert first.state.value == "succeeded", first.error
    move = os.rename if how == "renamed" else shutil.copyfile
    move(folder / "cells.czi", folder / "cells_renamed.czi")
    move(folder / "cells.czi.json", folder / "cells_renamed.czi.json")
    jobs = field.settled(2)
    second = jobs[1]
    assert second.state.value == "succeeded", second.error
    assert (second.result or {}).get("duplicate_of") == first.id, second.result
    assert len(field.archived()) == 1, field.archived()


def test_two_different_sidecar_pairs_are_not_duplicates_of_each_other(field):
    field.start("events")
    sidecar = json.dumps({"owner": "jdoe", "target": {"project": "P", "dataset": "D"}})
    for name, data in (("a.czi", b"first " * 100), ("b.czi", b"other " * 100)):
        (field.drop / name).write_bytes(data)
        (field.drop / f"{name}.json").write_text(sidecar, encoding="utf-8")
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"]
    assert not any((j.result or {}).get("duplicate_of") for j in jobs)
    assert len(field.archived()) == 2
