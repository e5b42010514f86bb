"""Case 2: a symlink is never followed into an acquisition, in every mode, and never silently."""

from __future__ import annotations

import os
import shutil

import pytest
from drops import MODES, manifest, succeeded, tree
from helpers import wait_until

LAYOUT = {"detection": "layout", "layout": "{owner}/{dataset}/", "target": {"project": "Atlas"}}


def user_folder(base, outside):
    jdoe = base / "jdoe"
    tree(jdoe / "2026-11-28_plate", {"A1.tif": b"plate " * 100, "A2.tif": b"plate2 " * 100})
    tree(jdoe / "2026-11-29_slide", {"s.tif": b"slide " * 100})
    tree(outside, {"secret.tif": b"not yours " * 100})
    os.symlink("2026-11-28_plate", jdoe / "latest")
    os.symlink(outside, jdoe / "reference")
    return jdoe


@pytest.mark.parametrize("how", ["moved-events", "moved-polling", "present-at-start"])
def test_linked_folders_in_a_user_folder_are_reported_not_imported(field, tmp_path, how):
    staging = tmp_path / "staging"
    jdoe = user_folder(staging, tmp_path / "elsewhere")
    mode = "polling" if how == "moved-polling" else "events"
    if how == "present-at-start":
        shutil.move(str(jdoe), field.drop / "jdoe")
        field.start(mode, **LAYOUT)
    else:
        field.start(mode, **LAYOUT)
        os.rename(jdoe, field.drop / "jdoe")
    jobs = field.settled(2)
    field.quiet_for(1.0)
    jobs = field.jobs()
    ok = succeeded(jobs)
    assert sorted(j.spec.target.dataset for j in ok) == ["2026-11-28_plate", "2026-11-29_slide"], \
        [(j.spec.root, j.state.value) for j in jobs]
    assert not any("not yours" in (field.archive / a).read_bytes().decode() for a in field.archived())
    for link in ("latest", "reference"):
        assert field.reported(link), f"{link} neither pending nor a failed job: {field.pending()}"


@pytest.mark.parametrize("mode", MODES)
def test_a_loop_link_inside_an_acquisition_is_not_a_second_job(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging" / "acqA"
    manifest(staging, {"a.tif": b"a" * 100})
    os.symlink(".", staging / "loop")
    os.rename(staging, field.drop / "acqA")
    jobs = field.settled(1)
    field.quiet_for(1.0)
    jobs = field.jobs()
    assert len(jobs) == 1, [j.spec.root for j in jobs]
    assert jobs[0].state.value == "succeeded"
    assert field.archived() and all("loop" not in a for a in field.archived())


@pytest.mark.parametrize("mode", MODES)
def test_links_and_excluded_folders_made_while_running_are_reported_at_once(field, tmp_path, mode):
    # Made in place while the service runs (not moved in, not present at start): events
    # mode must record the same refusals as polling, without waiting for a restart.
    field.start(mode, **LAYOUT)
    jdoe = tree(field.drop / "jdoe" / "2026-11-28_plate", {"A1.tif": b"plate " * 100}).parent
    [job] = field.settled(1)
    tree(tmp_path / "elsewhere", {"secret.tif": b"not yours " * 100})
    os.symlink("2026-11-28_plate", jdoe / "latest")
    os.symlink(tmp_path / "elsewhere", jdoe / "reference")
    os.symlink(jdoe, field.drop / "jdoe-link")
    (jdoe / "scan.tmp").mkdir()
    (jdoe / "scan.tmp" / "a.tif").write_bytes(b"still copying")
    (field.drop / ".incoming").mkdir()
    wanted = {"jdoe/latest": "symlink", "jdoe/reference": "symlink", "jdoe-link": "symlink",
              "jdoe/scan.tmp": "excluded", ".incoming": "excluded"}

    def listed():
        entries = {e["path"]: e for e in field.pending()}
        return entries if all(entries.get(p, {}).get("kind") == k for p, k in wanted.items()) else None

    try:
        entries = wait_until(listed, 5, message=f"{sorted(wanted)} listed as pending with their reasons")
    except AssertionError:
        raise AssertionError([(e["path"], e.get("kind")) for e in field.pending()]) from None
    assert "never followed" in entries["jdoe/latest"]["waiting"]
    assert "exclude pattern" in entries["jdoe/scan.tmp"]["waiting"]
    field.quiet_for(1.0)
    assert [j.id for j in field.jobs()] == [job.id]


@pytest.mark.parametrize("mode", MODES)
def test_a_link_to_a_file_of_the_acquisition_does_not_import_it_twice(field, mode):
    # jdoe/symds/{a.tif, alias.tif -> a.tif, deep/up.tif -> ../a.tif}: one file, imported once
    # by its own name; the links are named in the job log with why (outside try of issue 12).
    field.start(mode, **LAYOUT)
    staging = field.tmp_path / "staging" / "symds"
    tree(staging, {"a.tif": b"pixels " * 100})
    (staging / "deep").mkdir()
    os.symlink("a.tif", staging / "alias.tif")
    os.symlink("../a.tif", staging / "deep" / "up.tif")
    (field.drop / "jdoe").mkdir()
    os.rename(staging, field.drop / "jdoe" / "symds")
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert [f.path for f in job.spec.files] == ["a.tif"]
    assert [a.rsplit("/", 1)[-1] for a in field.archived()] == ["a.tif"]
    log = field.store.read_log(job.id)
    assert "alias.tif (a symbolic link to a.tif, not followed" in log, log
    assert "deep/up.tif (a symbolic link to a.tif, not followed" in log, log


@pytest.mark.parametrize("mode", MODES)
def test_a_sidecar_linked_in_place_fails_its_pair_in_every_mode(field, mode):
    # q.czi written, then q.czi.json made as a link to a sidecar elsewhere: the same outcome as
    # a scan finds (the pair's job fails: the sidecar is never read), in events mode too, where
    # only a pending "symlink" note was left (outside try of issue 12, case 2's kind).
    elsewhere = field.tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "q.czi.json").write_text('{"owner": "jdoe", "target": {"dataset": "D"}}', encoding="utf-8")
    field.start(mode)
    (field.drop / "q.czi").write_bytes(b"czi " * 100)
    os.symlink(elsewhere / "q.czi.json", field.drop / "q.czi.json")
    [job] = field.settled(1)
    assert job.state.value == "failed", job.state
    assert "symbolic link" in job.error.message, job.error
    assert field.archived() == []
