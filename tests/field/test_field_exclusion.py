"""Cases 3 and 4: one exclusion decision for every path; a known container format is never filtered inside."""

from __future__ import annotations

import json
import os

import pytest
from drops import MODES, manifest, succeeded, tree
from helpers import wait_until


@pytest.mark.parametrize("mode", MODES)
def test_excluded_names_moved_in_and_renamed_later_are_one_job_each(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging"
    manifest(staging / "acq1", {"a.tif": b"one " * 100})
    manifest(staging / "acq2", {"b.tif": b"two " * 100})
    os.rename(staging / "acq1", field.drop / "acq1.tmp")
    (field.drop / ".incoming").mkdir()
    os.rename(staging / "acq2", field.drop / ".incoming" / "acq2")
    field.quiet_for(1.0)  # several quiet periods: an excluded name must not become a job meanwhile
    assert field.jobs() == []
    assert field.reported("acq1.tmp"), field.pending()
    os.rename(field.drop / "acq1.tmp", field.drop / "acq1")
    os.rename(field.drop / ".incoming" / "acq2", field.drop / "acq2")
    jobs = field.settled(2)
    field.quiet_for(0.8)
    jobs = field.jobs()
    assert len(jobs) == 2 and len(succeeded(jobs)) == 2, [(j.spec.root, j.error) for j in jobs]
    wait_until(lambda: len(field.mails()) >= 2, 10, message="two mails")
    assert all("missing" not in m for m in field.mails())


def zarr_plate(folder):
    attrs = json.dumps({"plate": {"rows": [{"name": "A"}], "columns": [{"name": "1"}]}}).encode()
    return tree(folder, {
        ".zgroup": b'{"zarr_format": 2}', ".zattrs": attrs,
        "A/.zgroup": b'{"zarr_format": 2}', "A/1/.zgroup": b'{"zarr_format": 2}',
        "A/1/0/.zgroup": b'{"zarr_format": 2}', "A/1/0/.zattrs": b'{"multiscales": []}',
        "A/1/0/0/.zarray": b'{"chunks": [1, 1, 1, 64, 64]}',
        **{f"A/1/0/0/0.0.0.{y}.{x}": bytes([y, x]) * 64 for y in range(2) for x in range(4)},
    })


@pytest.mark.parametrize("mode", MODES)
def test_ome_zarr_moved_into_a_layout_drop_keeps_its_metadata(field, tmp_path, mode):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    staging = tmp_path / "staging" / "jdoe" / "plates"
    zarr_plate(staging / "plate.ome.zarr")
    tree(staging, {".DS_Store": b"finder"})
    (field.drop / "jdoe").mkdir()
    os.rename(staging, field.drop / "jdoe" / "plates")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    names = [a.rsplit("/", 1)[-1] for a in field.archived()]
    assert names.count(".zgroup") == 4 and ".zarray" in names and ".zattrs" in names, names
    assert len([n for n in names if n.startswith("0.0.0.")]) == 8
    assert ".DS_Store" not in names
    # What was left out is said: in the job log and in the mail.
    assert ".DS_Store" in field.store.read_log(job.id)
    wait_until(lambda: any(".DS_Store" in m for m in field.mails()), 10, message="the mail listing .DS_Store")


def test_ome_zarr_in_a_manifest_without_a_file_list(field, tmp_path):
    field.start("events")
    staging = tmp_path / "staging" / "acq"
    zarr_plate(staging / "plate.ome.zarr")
    manifest(staging, {}, listed=False)
    os.rename(staging, field.drop / "acq")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    files = [f.path for f in job.spec.files]
    assert "plate.ome.zarr/.zattrs" in files and "plate.ome.zarr/A/1/0/0/.zarray" in files, files


@pytest.mark.parametrize("mode", MODES)
def test_a_dot_folder_inside_a_zarr_written_in_place_is_imported_not_listed_as_excluded(field, mode):
    # Written in place while the service runs (events see each folder made): a container is
    # never filtered inside, so nothing in it is an "excluded" pending entry, in either mode.
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    plates = field.drop / "jdoe" / "plates"
    zarr_plate(plates / "plate.ome.zarr")
    tree(plates / "plate.ome.zarr" / "A" / ".tiles", {"t0": b"tile " * 10})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert "plate.ome.zarr/A/.tiles/t0" in [f.path for f in job.spec.files]
    field.quiet_for(0.5)
    assert not [e for e in field.pending() if "zarr" in e["path"]], field.pending()


@pytest.mark.parametrize("mode", MODES)
def test_an_acquisition_that_is_itself_a_zarr_keeps_its_metadata(field, tmp_path, mode):
    # The dataset folder is the container (jdoe/plate.ome.zarr/ with layout {owner}/{dataset}/):
    # every .zgroup/.zattrs/.zarray in it is the format's, none is "excluded" (outside try).
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    staging = tmp_path / "staging" / "plate.ome.zarr"
    zarr_plate(staging)
    (field.drop / "jdoe").mkdir()
    os.rename(staging, field.drop / "jdoe" / "plate.ome.zarr")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    files = [f.path for f in job.spec.files]
    assert ".zgroup" in files and ".zattrs" in files and "A/1/0/0/.zarray" in files, files
    assert len(files) == 7 + 8, files  # 4 .zgroup, 2 .zattrs, 1 .zarray, 8 chunks
    names = [a.rsplit("/", 1)[-1] for a in field.archived()]
    assert names.count(".zgroup") == 4 and names.count(".zattrs") == 2, names
    assert "excluded" not in field.store.read_log(job.id)


def test_a_submitted_zarr_folder_keeps_its_metadata(tmp_path):
    from watchfolder.job import Target
    from watchfolder.watch.acquisition import from_path

    zarr_plate(tmp_path / "image.zarr")
    spec = from_path(tmp_path / "image.zarr", source="cli:t", owner="jdoe", target=Target(dataset="d"))
    assert ".zattrs" in [f.path for f in spec.files] and "A/1/0/0/.zarray" in [f.path for f in spec.files]


@pytest.mark.parametrize("mode", MODES)
def test_files_windows_explorer_writes_are_neither_imported_nor_misplaced(field, mode):
    # Explorer on the instrument PC writes Thumbs.db and desktop.ini into the folders it shows,
    # at the owner level of a layout drop too: not data, not a "misplaced file" to move.
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    tree(field.drop / "jdoe", {"Thumbs.db": b"thumbs", "desktop.ini": b"[.ShellClassInfo]"})
    tree(field.drop / "jdoe" / "slide1", {"a.tif": b"pixels " * 50, "Thumbs.db": b"thumbs",
                                          "ehthumbs.db": b"thumbs"})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert [f.path for f in job.spec.files] == ["a.tif"]
    field.quiet_for(0.5)
    assert field.pending() == [], field.pending()


@pytest.mark.parametrize("mode", MODES)
def test_what_an_os_makes_at_the_top_of_a_share_is_neither_a_job_nor_pending(field, mode):
    # Windows' recycle bin and System Volume Information, macOS's Icon\r: in a layout drop they
    # became jobs under owner "$RECYCLE.BIN" (deleted data archived) or failed jobs mailed to the
    # admin (outside try of issue 12, second round). Excluded by default, and not listed either.
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    tree(field.drop / "$RECYCLE.BIN" / "S-1-5-21-1004", {"$RZ1X2Y.tif": b"deleted " * 20})
    tree(field.drop / "System Volume Information" / "x", {"IndexerVolumeGuid": b"guid"})
    tree(field.drop / "jdoe" / "slide1", {"a.tif": b"pixels " * 50, "Icon\r": b""})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert job.spec.owner == "jdoe" and [f.path for f in job.spec.files] == ["a.tif"]
    field.quiet_for(1.0)
    assert len(field.jobs()) == 1
    assert field.pending() == [], field.pending()


def test_a_folder_holding_only_what_is_never_imported_says_so(field):
    # Only Thumbs.db, .DS_Store and ~$notes.docx in a dataset folder: "the folder holds none yet"
    # read as if it were empty (outside try of issue 12, second round); the names are given.
    field.start("events", detection="layout", layout="{owner}/{dataset}/")
    tree(field.drop / "jdoe" / "junk", {"Thumbs.db": b"t", ".DS_Store": b"d", "~$notes.docx": b"n"})
    wait_until(lambda: [e for e in field.pending() if e["path"] == "jdoe/junk" and "never imported" in
                        (e.get("waiting") or "")], 10, message="the pending reason naming what it holds")
    [entry] = [e for e in field.pending() if e["path"] == "jdoe/junk"]
    assert "Thumbs.db" in entry["waiting"] and ".DS_Store" in entry["waiting"], entry


@pytest.mark.parametrize("name", ["lost+found", "$RECYCLE.BIN"])
def test_a_dataset_named_like_a_system_folder_is_listed_not_hidden(field, name):
    # jdoe/lost+found/b.tif: excluded (the name is the OS's), but a person made it there, so it
    # is listed as pending with why, not hidden (outside try, round 3).
    field.start("events", detection="layout", layout="{owner}/{dataset}/")
    tree(field.drop / "jdoe" / name, {"b.tif": b"data " * 10})
    wait_until(lambda: [e for e in field.pending() if e["path"] == f"jdoe/{name}"], 10,
               message="the folder listed as pending")
    [entry] = [e for e in field.pending() if e["path"] == f"jdoe/{name}"]
    assert entry["kind"] == "excluded" and name in entry["waiting"], entry
