"""Case 5, one rule in every mode: a kept acquisition that changes after its import.

"The same acquisition" (README, Imported once) is the same folder still holding the very
manifest or sidecar that was imported, or one of the imported files, unchanged (inode and
modification time): a change to it is noted once in the importing job's log, never imported
again. A descriptor rewritten with every imported file is a new acquisition: a new job. Events
and polling reach the same outcome for each kind of change.
"""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
from drops import MODES, manifest, tree
from helpers import wait_until

NOTE = "changed after this import"


def _sidecar_pair(folder, name="c1.czi", data=b"czi " * 100):
    tree(folder, {name: data})
    (folder / f"{name}.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "cells"}}),
                                         encoding="utf-8")


def _atomic_replace(path, data):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _only(field, job):
    jobs = field.jobs()
    assert [j.id for j in jobs] == [job.id], [(j.id, j.state.value, j.spec.root) for j in jobs]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("detection", ["sidecar", None], ids=["sidecar-folder", "default-folder"])
def test_a_sidecar_pairs_data_file_replaced_atomically_is_noted_not_imported_again(field, mode, detection):
    # The tester's case 2: write a temporary file, rename it over the data file; the sidecar untouched.
    field.start(mode, **({"detection": detection} if detection else {}))
    _sidecar_pair(field.drop)
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until((field.drop / "c1.czi.watchfolder-receipt.json").exists, 10, message="the receipt")
    archived, mails = field.archived(), len(wait_until(field.mails, 10, message="the success mail"))
    _atomic_replace(field.drop / "c1.czi", os.urandom(500))
    wait_until(lambda: NOTE in field.store.read_log(job.id), 10 if mode == "events" else 20,
               message="the change noted in the importing job's log")
    field.quiet_for(1.0)
    _only(field, job)
    assert field.archived() == archived
    assert len(field.mails()) == mails


@pytest.mark.parametrize("mode", MODES)
def test_a_sidecar_pair_removed_and_dropped_again_is_a_new_job(field, tmp_path, mode):
    field.start(mode, detection="sidecar")
    _sidecar_pair(field.drop)
    [first] = field.settled(1)
    wait_until((field.drop / "c1.czi.watchfolder-receipt.json").exists, 10, message="the receipt")
    for name in ("c1.czi", "c1.czi.json"):
        os.remove(field.drop / name)
    _sidecar_pair(tmp_path / "again", data=b"second " * 100)
    for name in ("c1.czi", "c1.czi.json"):  # the data file first, the sidecar last
        os.rename(tmp_path / "again" / name, field.drop / name)
    first, second = field.settled(2)
    assert second.state.value == "succeeded", second.error
    assert NOTE not in field.store.read_log(first.id)


def _rewrite_in_place(path, data):
    with open(path, "r+b") as f:  # the same inode: truncate and write
        f.truncate(0)
        f.write(data)


@pytest.mark.parametrize("mode", MODES)
def test_a_kept_acquisition_rewritten_in_place_with_a_new_manifest_is_the_same_outcome_in_both_modes(field, mode):
    # The tester's case 7: every file and the manifest rewritten in place (same inodes). Nothing of
    # what was imported is left unchanged: by the README's rule a new acquisition, a new job.
    field.start(mode, rescan_interval=3600)
    folder = field.drop / "acq"
    manifest(folder, {"a.tif": b"a" * 100, "b.tif": b"b" * 100})
    [first] = field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    field.quiet_for(2.5)  # past polling's guard that lists a just-changed folder again on every poll
    new = {"a.tif": os.urandom(900), "b.tif": os.urandom(900)}
    for name, data in new.items():
        _rewrite_in_place(folder / name, data)
    body = json.loads((folder / "watchfolder.json").read_text(encoding="utf-8"))
    body["files"] = [{"path": n, "size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in new.items()]
    _rewrite_in_place(folder / "watchfolder.json", json.dumps(body).encode())
    first, second = field.settled(2)
    assert second.state.value == "succeeded", second.error
    assert sorted(f.size for f in second.spec.files) == [900, 900]


@pytest.mark.parametrize("mode", MODES)
def test_a_data_file_rewritten_in_place_is_noted_in_both_modes(field, mode):
    # The manifest untouched (the very one imported): the same acquisition, changed. Polling
    # sees a file rewritten in place, which no folder mtime shows, as events do.
    field.start(mode, rescan_interval=3600, missing_timeout=1.0)
    folder = field.drop / "acq"
    manifest(folder, {"a.tif": b"a" * 100, "b.tif": b"b" * 100})
    [job] = field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    field.quiet_for(2.5)  # past polling's guard that lists a just-changed folder again on every poll
    _rewrite_in_place(folder / "a.tif", b"A" * 100)
    wait_until(lambda: NOTE in field.store.read_log(job.id), 20, message="the change noted")
    field.quiet_for(1.5)
    _only(field, job)


@pytest.mark.parametrize("mode", MODES)
def test_a_change_is_noted_once_not_once_per_restart(field, mode):
    # The tester's L2: each restart looked at the same old change and wrote the note again.
    field.start(mode)
    manifest(field.drop / "acq", {"a.tif": b"a" * 100})
    [job] = field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    tree(field.drop / "acq", {"notes.txt": b"a user adds a note"})
    wait_until(lambda: NOTE in field.store.read_log(job.id), 20, message="the change noted")
    for _ in range(2):
        field.stop()
        field.start(mode)
        field.quiet_for(1.0)
    assert field.store.read_log(job.id).count(NOTE) == 1, field.store.read_log(job.id)
    _only(field, job)
    # A further change is a further note.
    tree(field.drop / "acq", {"more.txt": b"another note"})
    wait_until(lambda: field.store.read_log(job.id).count(NOTE) == 2, 20, message="the second change noted")


@pytest.mark.parametrize("mode", MODES)
def test_an_excluded_folder_renamed_and_imported_is_no_longer_listed_as_pending(field, tmp_path, mode):
    # The tester's L1: polling kept listing a2.tmp ("matches exclude pattern *.tmp") after the
    # rename to a2 and its import, until a restart; events dropped it at once.
    field.start(mode)
    manifest(tmp_path / "a2", {"a.tif": b"a" * 100})
    os.rename(tmp_path / "a2", field.drop / "a2.tmp")
    wait_until(lambda: field.reported("a2.tmp"), 10, message="a2.tmp listed as excluded")
    os.rename(field.drop / "a2.tmp", field.drop / "a2")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until(lambda: not field.reported("a2.tmp"), 10, message="a2.tmp no longer listed")


@pytest.mark.parametrize("kind", ["layout", "sidecar", "manifest"])
def test_a_deleted_receipt_does_not_make_a_changed_kept_acquisition_new_after_a_restart(field, kind):
    # Someone tidies the drop folder and deletes the receipts; the acquisitions change (a file
    # added, one rewritten); the service restarts. The job store still knows each import: the
    # same folder and descriptor or files (inode, mtime) are the same acquisition, noted, not
    # imported again (outside try of issue 12, case 5's kind).
    if kind == "layout":
        field.start("polling", detection="layout", layout="{owner}/{dataset}/")
        tree(field.drop / "jdoe" / "plate_C4", {"w1.tif": b"w1 " * 100, "w2.tif": b"w2 " * 100})
        rel, receipt = "jdoe/plate_C4", field.drop / "jdoe" / "plate_C4.watchfolder-receipt.json"
    elif kind == "sidecar":
        field.start("polling")
        _sidecar_pair(field.drop)
        rel, receipt = "c1.czi", field.drop / "c1.czi.watchfolder-receipt.json"
    else:
        field.start("polling")
        manifest(field.drop / "C3", {"Image_001.tif": b"1" * 100, "Image_002.tif": b"2" * 100})
        rel, receipt = "C3", field.drop / "C3.watchfolder-receipt.json"
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until(receipt.exists, 10, message="the receipt")
    archived, mails = field.archived(), len(wait_until(field.mails, 10, message="the success mail"))
    field.stop()
    receipt.unlink()
    if kind == "layout":
        tree(field.drop / "jdoe" / "plate_C4", {"w3.tif": b"w3 " * 100})
    elif kind == "sidecar":
        _atomic_replace(field.drop / "c1.czi", os.urandom(500))
    else:
        tree(field.drop / "C3", {"notes.txt": b"a note"})
        (field.drop / "C3" / "Image_001.tif").write_bytes(b"9" * 100)  # same size, other bytes
    field.start("polling", **({"detection": "layout", "layout": "{owner}/{dataset}/"} if kind == "layout" else {}))
    wait_until(lambda: NOTE in field.store.read_log(job.id), 20, message=f"the change of {rel} noted")
    field.quiet_for(1.0)
    _only(field, job)
    assert field.archived() == archived
    assert len(field.mails()) == mails


def test_a_folder_removed_and_dropped_again_without_its_receipt_is_still_a_new_job(field, tmp_path):
    # The store's memory of an import follows the same identity rule as the receipt: new
    # folder, new files -> a new acquisition, after a restart too.
    field.start("polling")
    manifest(field.drop / "acq", {"a.tif": b"a" * 100})
    [first] = field.settled(1)
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    field.stop()
    (field.drop / "acq.watchfolder-receipt.json").unlink()
    manifest(tmp_path / "again", {"a.tif": b"new data " * 20})
    import shutil
    shutil.rmtree(field.drop / "acq")
    os.rename(tmp_path / "again", field.drop / "acq")
    field.start("polling")
    jobs = field.settled(2)
    assert jobs[1].state.value == "succeeded" and not (jobs[1].result or {}).get("duplicate_of")


def test_a_folder_dropped_again_with_a_freed_inode_back_is_a_new_job_after_a_restart(field, tmp_path):
    # rm -rf jdoe/redrop (and its receipt), then cp -p a corrected copy back while the service is
    # down: a file can get its old inode back with its old mtime (cp -p keeps it). The store's
    # memory of the import must not take it for the imported file: its ctime is newer than the
    # import (outside try, round 3: the corrected b.tif was never imported, no word said).
    layout = {"detection": "layout", "layout": "{owner}/{dataset}/"}
    field.start("polling", **layout)
    folder = field.drop / "jdoe" / "redrop"
    tree(folder, {"a.tif": b"a" * 100, "b.tif": b"b" * 100})
    [first] = field.settled(1)
    receipt = field.drop / "jdoe" / "redrop.watchfolder-receipt.json"
    wait_until(receipt.exists, 10, message="the receipt")
    a = folder / "a.tif"
    st = a.stat()
    field.stop()
    time.sleep(1.5)  # a ctime later than the import, by more than the rule's one-second slack
    # The same inode, the same mtime (as a reused inode and cp -p give), a corrected b.tif.
    a.write_bytes(b"a" * 100)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    (folder / "b.tif").write_bytes(b"B" * 100)
    receipt.unlink()
    assert a.stat().st_ino == st.st_ino and a.stat().st_mtime_ns == st.st_mtime_ns
    field.start("polling", **layout)
    jobs = field.settled(2)
    assert jobs[1].state.value == "succeeded", jobs[1].error
