"""Outside test of issue 15, findings 8 and 10: `explain` suggests renaming only where a rename
would make the path imported, and answers for a sidecar pair's descriptor as for its data file."""

from __future__ import annotations

import os

import pytest
from drops import MODES, manifest
from helpers import wait_until

from watchfolder.watch.explain import explain

RENAME = "rename it (e.g. when the copy is finished) to have it imported"


@pytest.mark.parametrize("mode", MODES)
def test_no_rename_advice_inside_an_imported_acquisition(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging" / "acq"
    manifest(staging, {"a.tif": b"pixels"}, listed=False)
    os.rename(staging, field.drop / "acq")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    (field.drop / "acq" / "late.tmp").write_bytes(b"written after the import")
    (field.drop / "copying.tmp").mkdir()  # a folder still being copied: renaming it does help
    cfg = field.service.config
    got = explain(cfg, field.store, str(field.drop / "acq" / "late.tmp"))
    assert got.verdict == "ignored", got
    assert RENAME not in got.reason and "rename it" not in got.reason, got.reason
    assert got.reason.endswith(f"renaming it would not import it: it is part of acquisition acq, imported as job "
                               f"{job.id}, and a change after an import is not imported again (drop it as a new "
                               "acquisition to import it)"), got.reason
    got = explain(cfg, field.store, str(field.drop / "copying.tmp"))
    assert got.verdict == "ignored" and got.reason.endswith(RENAME), got.reason
    # A top-level file in a manifest folder is never an acquisition, renamed or not.
    (field.drop / "notes.tmp").write_bytes(b"x")
    got = explain(cfg, field.store, str(field.drop / "notes.tmp"))
    assert "renaming it would not import it: a single file is imported only with a sidecar" in got.reason, got
    wait_until(lambda: field.reported("copying.tmp"), 10, message="the excluded folder listed")
    [entry] = [e for e in field.store.pending_list() if e.path == "copying.tmp"]
    assert entry.reason.endswith(RENAME)


@pytest.mark.parametrize("mode", MODES)
def test_no_rename_advice_for_a_file_where_files_are_never_acquisitions_in_a_layout(field, mode):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    (field.drop / "alice").mkdir()
    (field.drop / "alice" / "tmpfile.tmp").write_bytes(b"x")  # a file at the dataset level
    (field.drop / "alice" / "ds.tmp").mkdir()  # a dataset folder still being copied
    cfg = field.service.config
    got = explain(cfg, field.store, str(field.drop / "alice" / "tmpfile.tmp"))
    assert "rename it" not in got.reason and "renaming it would not import it: acquisitions here are folders " \
        "2 level(s) deep" in got.reason, got.reason
    got = explain(cfg, field.store, str(field.drop / "alice" / "ds.tmp"))
    assert got.reason.endswith(RENAME), got.reason
    wait_until(lambda: field.reported("alice/ds.tmp"), 10, message="the excluded folder listed")
    [entry] = [e for e in field.store.pending_list() if e.path == "alice/ds.tmp"]
    assert entry.reason.endswith(RENAME) and entry.owner == "alice"
