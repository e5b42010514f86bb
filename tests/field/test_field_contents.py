"""What an acquisition contains: a multi-file format's companions come with its sidecar pair,
and whatever is left out (a FIFO too) is said in the job log and the mail (b12 findings 3, L5)."""

from __future__ import annotations

import json
import os

import pytest
from drops import MODES, files_of, manifest, tree
from helpers import wait_until

from watchfolder.watch.explain import explain

SIDECAR = {"owner": "jdoe", "target": {"project": "Atlas", "dataset": "slides"}}


def pair(folder, name, data=b"main " * 50):
    """Write a data file, then its sidecar last."""
    tree(folder, {name: data})
    (folder / f"{name}.json").write_text(json.dumps(SIDECAR), encoding="utf-8")


@pytest.mark.parametrize("detection", ["sidecar", "manifest"])
@pytest.mark.parametrize("mode", MODES)
def test_a_vsi_pair_moved_in_brings_its_companion_folder(field, tmp_path, mode, detection):
    field.start(mode, detection=detection)
    staging = tmp_path / "staging" / "run"
    tree(staging, {"_slide_/stack1/frame_t_0.ets": b"ets " * 200, "_slide_/stack1/.hidden.ets": b"h" * 10})
    pair(staging, "slide.vsi")
    os.rename(staging, field.drop / "run")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert files_of(job) == ["_slide_/stack1/.hidden.ets", "_slide_/stack1/frame_t_0.ets", "slide.vsi"]
    archived = [a.rsplit("/", 1)[-1] for a in field.archived()]
    assert "frame_t_0.ets" in archived and "slide.vsi" in archived, archived
    # explain on a companion names the pair it belongs to.
    got = explain(field.service.config, field.store, str(field.drop / "run" / "_slide_" / "stack1" / "frame_t_0.ets"))
    assert "run/slide.vsi" in got.reason and got.verdict == "job", (got.verdict, got.reason)


@pytest.mark.parametrize("mode", MODES)
def test_an_ics_pair_written_in_place_waits_for_its_ids_and_then_takes_it(field, mode):
    field.start(mode, detection="sidecar")
    pair(field.drop, "img.ics", b"ics_version\t1.0\nfilename\timg\n")
    wait_until(lambda: any("img.ids" in json.dumps(p) for p in field.pending()), 10,
               message="img.ics listed as waiting for img.ids")
    assert field.jobs() == []
    got = explain(field.service.config, field.store, str(field.drop / "img.ics"))
    assert "img.ids" in got.reason, got.reason
    tree(field.drop, {"img.ids": b"\0" * 4096})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert files_of(job) == ["img.ics", "img.ids"]
    got = explain(field.service.config, field.store, str(field.drop / "img.ids"))
    assert got.acquisition == "img.ics" and got.verdict == "job", (got.verdict, got.reason)


def test_formats_that_keep_their_pixels_need_nothing_beside_them(field):
    field.start("events", detection="sidecar")
    pair(field.drop, "one.ics", b"ics_version\t2.0\nfilename\tone\n")
    pair(field.drop, "two.dv", b"dv " * 100)
    pair(field.drop, "three.mhd", b"ObjectType = Image\nElementDataFile = LOCAL\n")
    jobs = field.settled(3)
    assert all(j.state.value == "succeeded" for j in jobs), [j.error for j in jobs]
    assert sorted(f for j in jobs for f in files_of(j)) == ["one.ics", "three.mhd", "two.dv"]
    # A header that names its <stem>.raw waits for it.
    pair(field.drop, "four.mhd", b"ObjectType = Image\nElementDataFile = four.raw\n")
    wait_until(lambda: any("four.raw" in json.dumps(p) for p in field.pending()), 10,
               message="four.mhd listed as waiting for four.raw")


@pytest.mark.parametrize("mode", MODES)
def test_a_fifo_in_a_manifest_folder_without_a_file_list_is_said_left_out(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging" / "acq"
    manifest(staging, {}, listed=False)
    tree(staging, {"a.tif": b"a" * 100, ".DS_Store": b"finder"})
    os.mkfifo(staging / "pipe")
    os.rename(staging, field.drop / "acq")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert files_of(job) == ["a.tif"]
    log = field.store.read_log(job.id)
    assert "pipe (a named pipe (FIFO), not a regular file: not imported)" in log and ".DS_Store" in log, log
    wait_until(lambda: any("pipe (a named pipe (FIFO), not a regular file" in m for m in field.mails()), 10,
               message="the mail naming pipe")


def noted(field, path):
    """The pending entry the store lists for ``path`` (kind, reason), or None."""
    for entry in field.store.pending_list():
        if entry.path == path:
            return entry.kind, entry.reason
    return None


def explained(field, rel):
    return explain(field.service.config, field.store, str(field.drop / rel))


@pytest.mark.parametrize("mode", MODES)
def test_data_in_the_wrong_place_of_a_layout_is_listed_as_misplaced(field, tmp_path, mode):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    staging = tmp_path / "staging"
    tree(staging / "jdoe" / "plates", {"a.tif": b"a" * 100})
    tree(staging / "mary", {"loose.tif": b"l" * 10})
    tree(staging / "zed", {"cells.czi": b"c" * 10})
    manifest(staging / "wr2", {"w.tif": b"w" * 10})
    for name in ("jdoe", "mary", "zed", "wr2"):
        os.rename(staging / name, field.drop / name)
    tree(field.drop, {"stray.tif": b"s" * 10})
    [job] = field.settled(1)
    assert job.state.value == "succeeded" and files_of(job) == ["a.tif"], job.error
    for rel in ("stray.tif", "mary/loose.tif", "zed/cells.czi", "wr2"):
        wait_until(lambda rel=rel: noted(field, rel) is not None, 10, message=f"{rel} listed as pending")
        kind, reason = noted(field, rel)
        assert kind == "misplaced" and "move it" in reason, (rel, kind, reason)
        got = explained(field, rel)
        assert got.verdict == "not_acquisition" and reason in got.reason, (rel, got.reason)
    assert "mary/{dataset}/loose.tif" in noted(field, "mary/loose.tif")[1]
    assert "manifest" in noted(field, "wr2")[1]
    assert noted(field, "wr2/w.tif") is None and noted(field, "wr2/watchfolder.json") is None
    assert "part of wr2" in explained(field, "wr2/w.tif").reason
    assert len(field.jobs()) == 1
    # Moved away: no longer listed (events: its removal; polling: the folder listed again).
    os.rename(field.drop / "stray.tif", tmp_path / "stray.tif")
    wait_until(lambda: noted(field, "stray.tif") is None, 10, message="stray.tif no longer pending")


@pytest.mark.parametrize("mode", MODES)
def test_a_sidecar_folder_lists_a_non_sidecar_json_and_a_manifest_folder(field, tmp_path, monkeypatch, mode):
    from watchfolder.watch import detector

    looks = []
    real = detector.SidecarRule.build
    monkeypatch.setattr(detector.SidecarRule, "build",
                        lambda self, root, rel, now: looks.append(rel) or real(self, root, rel, now))
    field.start(mode, detection="sidecar")
    tree(field.drop, {"c3.czi": b"c" * 100})
    (field.drop / "c3.czi.json").write_text(json.dumps({"exposure": 12}), encoding="utf-8")
    staging = tmp_path / "staging" / "wr1"
    manifest(staging, {"a.tif": b"a" * 10})
    os.rename(staging, field.drop / "wr1")
    wait_until(lambda: (noted(field, "c3.czi") or ("",))[0] == "not_acquisition" and noted(field, "wr1"), 10,
               message="c3.czi and wr1 listed as not acquisitions")
    kind, reason = noted(field, "c3.czi")
    assert kind == "not_acquisition" and "not a sidecar" in reason and '"owner"' in reason, reason
    assert reason in explained(field, "c3.czi").reason
    kind, reason = noted(field, "wr1")
    assert kind == "not_acquisition" and "manifest" in reason and "sidecar" in reason, reason
    assert reason in explained(field, "wr1/watchfolder.json").reason
    assert noted(field, "wr1/watchfolder") is None
    # Listed once when seen: not looked at again on every tick while nothing changes.
    looks.clear()
    field.quiet_for(1.0)
    assert looks.count("c3.czi") == 0, looks
    assert field.jobs() == []
    # Made a sidecar: imported, and no longer listed.
    (field.drop / "c3.czi.json").write_text(json.dumps(SIDECAR), encoding="utf-8")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until(lambda: noted(field, "c3.czi") is None, 10, message="c3.czi no longer pending")


@pytest.mark.parametrize("mode", MODES)
def test_an_excluded_folder_renamed_and_imported_is_no_longer_listed(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging" / "a2"
    manifest(staging, {"a.tif": b"a" * 100})
    os.rename(staging, field.drop / "a2.tmp")
    wait_until(lambda: noted(field, "a2.tmp") is not None, 10, message="a2.tmp listed as excluded")
    os.rename(field.drop / "a2.tmp", field.drop / "a2")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    wait_until(lambda: noted(field, "a2.tmp") is None, 10, message="a2.tmp no longer listed")


def test_a_non_sidecar_json_stays_listed_across_full_rescans(field):
    field.start("events", detection="sidecar", rescan_interval=0.2)
    tree(field.drop, {"c4.czi": b"c" * 100})
    (field.drop / "c4.czi.json").write_text(json.dumps({"exposure": 12}), encoding="utf-8")
    wait_until(lambda: (noted(field, "c4.czi") or ("",))[0] == "not_acquisition", 10, message="c4.czi listed")
    rescans = field.watcher_status()["counters"]["rescans"]
    field.quiet_for(1.0)  # several full rescans
    assert field.watcher_status()["counters"]["rescans"] > rescans
    assert noted(field, "c4.czi") is not None and field.jobs() == []
