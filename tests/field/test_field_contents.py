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


def test_an_ics_version_2_and_a_dv_without_log_need_nothing_beside_them(field):
    field.start("events", detection="sidecar")
    pair(field.drop, "one.ics", b"ics_version\t2.0\nfilename\tone\n")
    pair(field.drop, "two.dv", b"dv " * 100)
    jobs = field.settled(2)
    assert all(j.state.value == "succeeded" for j in jobs), [j.error for j in jobs]
    assert sorted(f for j in jobs for f in files_of(j)) == ["one.ics", "two.dv"]


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
    assert "pipe (not a regular file: a named pipe (FIFO))" in log and ".DS_Store" in log, log
    wait_until(lambda: any("pipe (not a regular file" in m for m in field.mails()), 10, message="the mail naming pipe")
