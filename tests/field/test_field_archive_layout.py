"""Case 1: unrelated acquisitions never collide in the archive (written from the issue and README)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from drops import MODES, manifest, succeeded
from helpers import wait_until


@pytest.mark.parametrize("mode", MODES)
def test_two_runs_writing_the_same_file_name_into_one_dataset_both_succeed(field, mode):
    field.start(mode)
    manifest(field.drop / "run1", {"Image_001.tif": b"first run " * 100})
    manifest(field.drop / "run2", {"Image_001.tif": b"second run " * 100})
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    archived = field.archived()
    assert len(archived) == 2, archived
    # Apart by default: each acquisition has its own folder below the dataset.
    assert {a.rsplit("/", 2)[-2] for a in archived} == {"run1", "run2"}, archived
    contents = {(field.archive / a).read_bytes()[:5] for a in archived}
    assert contents == {b"first", b"secon"}


def test_a_layout_without_the_acquisition_resolves_a_collision_and_says_where(field):
    field.start("events", importer={"archive": {"root": str(field.archive), "layout": "{owner}/{project}/{dataset}"}})
    manifest(field.drop / "run1", {"Image_001.tif": b"first run " * 100})
    field.settled(1)
    manifest(field.drop / "run2", {"Image_001.tif": b"second run " * 100})
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    archived = field.archived()
    assert len(archived) == 2, archived
    second = jobs[1]
    where = [a for a in archived if (field.archive / a).read_bytes().startswith(b"second")][0]
    # The result and the receipt name where the second run's file went (the folder as
    # `destination`, each file's path relative to it).
    folder, _, name = where.rpartition("/")
    assert second.result["destination"] == str(field.archive / folder), second.result
    assert [f["path"] for f in second.result["files"]] == [name]
    receipt_file = field.drop / "run2.watchfolder-receipt.json"
    wait_until(receipt_file.exists, 10, message="the receipt of run2")
    receipt = receipt_file.read_text(encoding="utf-8")
    assert json.dumps(str(field.archive / folder), ensure_ascii=False) in receipt, receipt
    assert "Image_001" in field.store.read_log(second.id)


def test_200_acquisitions_with_identical_file_names_into_one_dataset(field):
    field.start("events")
    for i in range(200):
        manifest(field.drop / "bulk" / f"{i:04d}", {"x.tif": f"tile {i} ".encode() * 50,
                                                     "meta.txt": f"acquisition {i}".encode()})
    jobs = field.settled(200, timeout=120)
    assert len(jobs) == 200
    failed = [(j.id, j.error) for j in jobs if j.state.value != "succeeded"]
    assert failed == []
    assert len(succeeded(jobs)) == 200
    assert len(field.archived()) == 400


@pytest.mark.parametrize("mode", MODES)
def test_two_sidecar_pairs_of_one_stem_get_two_archive_folders(field, mode):
    # {acquisition} of a one-file acquisition is its data file's name without the extension:
    # cells.czi and cells.tif both give "cells". Each is an acquisition of its own, so neither
    # may end up in the other's folder (outside try of issue 12, case 1's kind).
    field.start(mode)
    sidecar = json.dumps({"owner": "jdoe", "target": {"project": "P", "dataset": "D"}})
    (field.drop / "cells.czi").write_bytes(b"czi " * 100)
    (field.drop / "cells.czi.json").write_text(sidecar, encoding="utf-8")
    first = field.settled(1)[0]
    (field.drop / "cells.tif").write_bytes(b"tif " * 100)
    (field.drop / "cells.tif.json").write_text(sidecar, encoding="utf-8")
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    destinations = [j.result["destination"] for j in jobs]
    assert destinations[0] == first.result["destination"]
    assert destinations[0] != destinations[1], destinations
    assert jobs[1].result["renamed_from"] == destinations[0]
    for job, name in zip(jobs, ("cells.czi", "cells.tif"), strict=True):
        held = sorted(p.name for p in Path(job.result["destination"]).iterdir())
        assert held == [name], held


def test_two_runs_of_one_name_with_different_subfolder_files_get_two_folders(field):
    # No file name in common (data/a.tif, data/b.tif), yet the same folder name: still two
    # acquisitions, so two folders; a retry of one finds its own copy in its own folder.
    field.start("events", quiet_period=0.3)
    manifest(field.drop / "day1" / "run1", {"data/a.tif": b"a" * 100})
    field.settled(1)
    manifest(field.drop / "day2" / "run1", {"data/b.tif": b"b" * 100})
    jobs = field.settled(2)
    assert [j.state.value for j in jobs] == ["succeeded", "succeeded"], [j.error for j in jobs]
    first, second = (Path(j.result["destination"]) for j in jobs)
    assert first != second and second.name == "run1 (2)"
    assert sorted(str(p.relative_to(first)) for p in first.rglob("*.tif")) == ["data/a.tif"]
    assert sorted(str(p.relative_to(second)) for p in second.rglob("*.tif")) == ["data/b.tif"]
