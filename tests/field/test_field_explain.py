"""Outside test of issue 15, findings 8 and 10: `explain` suggests renaming only where a rename
would make the path imported, and answers for a sidecar pair's descriptor as for its data file."""

from __future__ import annotations

import json
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
    # Inside an acquisition not queued yet (it holds no other file): renaming in time does help.
    (field.drop / "alice" / "ds2").mkdir()
    (field.drop / "alice" / "ds2" / "part.tmp").write_bytes(b"x")
    got = explain(cfg, field.store, str(field.drop / "alice" / "ds2" / "part.tmp"))
    assert got.reason.endswith("it is part of acquisition alice/ds2: rename it before that is queued to have it "
                               "imported with it"), got.reason
    wait_until(lambda: field.reported("alice/ds.tmp"), 10, message="the excluded folder listed")
    [entry] = [e for e in field.store.pending_list() if e.path == "alice/ds.tmp"]
    assert entry.reason.endswith(RENAME) and entry.owner == "alice"


def _same_answer(cfg, store, data):
    a = explain(cfg, store, str(data))
    b = explain(cfg, store, str(data) + ".json")
    assert (b.verdict, b.reason, b.details, b.job_id) == (a.verdict, a.reason, a.details, a.job_id), (a, b)
    assert b.path == str(data) + ".json"
    return a


@pytest.mark.parametrize("mode", MODES)
def test_explain_answers_for_a_pairs_descriptor_as_for_its_data_file(field, mode):
    field.start(mode, sidecars=False)
    (field.drop / "cells.czi").write_bytes(b"pixels")
    (field.drop / "cells.czi.json").write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}}))
    wait_until(lambda: field.reported("cells.czi"), 10, message="the pair listed")
    cfg = field.service.config
    got = _same_answer(cfg, field.store, field.drop / "cells.czi")
    assert got.verdict == "not_acquisition" and "set sidecars: true" in got.reason, got
    [entry] = wait_until(lambda: [e for e in field.store.pending_list() if e.path == "cells.czi" and e.owner], 10,
                         message="the pair listed with its owner")
    assert entry.reason == got.reason and entry.owner == "carol"
    # An excluded data file: its descriptor is not explained as a pair waiting to be imported.
    (field.drop / "sub").mkdir()
    (field.drop / "sub" / "scan.tmp").write_bytes(b"pixels")
    (field.drop / "sub" / "scan.tmp.json").write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}}))
    got = _same_answer(cfg, field.store, field.drop / "sub" / "scan.tmp")
    assert got.verdict == "ignored" and "exclude pattern *.tmp" in got.reason, got
    # Inside a manifest folder the descriptor is a file of the acquisition, not a pair's: not mapped.
    manifest(field.drop / "m", {"x.czi": b"pixels", "x.czi.json": b'{"owner": "carol"}'})
    [job] = field.settled(1)
    for rel in ("m/x.czi", "m/x.czi.json"):
        got = explain(cfg, field.store, str(field.drop / rel))
        assert (got.verdict, got.job_id, got.path) == ("job", job.id, str(field.drop / rel)), got


def test_explain_answers_for_a_pairs_descriptor_as_for_its_data_file_in_a_sidecar_folder(field):
    field.start("events", detection="sidecar")
    (field.drop / "scan.tmp").write_bytes(b"pixels")
    (field.drop / "scan.tmp.json").write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}}))
    cfg = field.service.config
    got = _same_answer(cfg, field.store, field.drop / "scan.tmp")
    assert got.verdict == "ignored" and got.reason.endswith("rename it and scan.tmp.json alike to have them "
                                                            "imported"), got


@pytest.mark.parametrize("mode", MODES)
def test_explain_after_a_sidecar_edit_names_the_job_that_imported_it(field, mode):
    # Issue 12 L4, the part left last time: once imported, a sidecar edited in place (a new
    # description) is a change after the import -- never imported again -- but explain said
    # "complete: queued once nothing has changed ..." (the edited sidecar gives a new key).
    field.start(mode, detection="sidecar")
    (field.drop / "scan.czi").write_bytes(b"pixels" * 100)
    sidecar = field.drop / "scan.czi.json"
    sidecar.write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}}))
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until(lambda: list(field.drop.glob("*.watchfolder-receipt.json")), 10, message="the receipt")
    sidecar.write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}, "description": "edited"}))
    cfg = field.service.config
    for rel in ("scan.czi", "scan.czi.json"):
        got = explain(cfg, field.store, str(field.drop / rel))
        assert (got.verdict, got.job_id) == ("job", job.id), got
        assert f"became job {job.id}, succeeded; changed after that import, so not imported again" in got.reason, got
    wait_until(lambda: "changed after this import" in field.store.read_log(job.id), 10,
               message="the watcher's own note of the change")
    assert len(field.jobs()) == 1  # and the watcher agrees: nothing queued again
    got = explain(cfg, field.store, str(field.drop / "scan.czi"))
    assert (got.verdict, got.job_id) == ("job", job.id), got


def test_explain_on_the_missing_data_file_of_a_waiting_sidecar_points_to_the_sidecar(field):
    # "does not exist (check the spelling…)" left the scientist without the sidecar that waits
    # for that very name (outside try of issue 15).
    field.start("events")
    (field.drop / "ghost.czi.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "d"}}))
    got = explain(field.service.config, field.store, str(field.drop / "ghost.czi"))
    assert got.verdict == "not_found"
    assert "its sidecar ghost.czi.json is there and waits for it" in got.reason, got.reason
