"""Post-actions interrupted by a crash resume idempotently (issue 11 case 8).

``on_success: move`` to another filesystem (a tmpfs, root only) is copied then removed; a
kill -9 in between used to leave partial duplicates (``X (2)``, nested ``done/X/X``).
The crash points are set up on disk exactly as a killed process leaves them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from drills import report

from watchfolder.errors import PermanentImportError
from watchfolder.watch.followup import PostActions


@pytest.fixture
def moved(tmpfs, tmp_path, store, make_config, make_spec):
    """(drop folder, done folder on another filesystem, post-actions, a finished job of drop/acq)."""
    done = tmpfs("done-volume", 8 * 1024 * 1024)
    drop = tmp_path / "drop"
    drop.mkdir()
    config = make_config(watch=[{"name": "drop", "path": str(drop),
                                 "on_success": {"action": "move", "folder": str(done)},
                                 "on_failure": {"action": "move", "folder": str(done)}}])
    spec = make_spec({"a.tif": b"a" * 100_000, "sub/b.tif": b"b" * 100_000})
    acq = drop / "acq"
    Path(spec.root).rename(acq)
    spec = spec.__class__(**{**spec.__dict__, "root": str(acq), "source": "watch:drop",
                             "extra": {"watch": "drop", "acquisition": "acq", "detection": "manifest"}})

    def finished(ok=True):
        job, _ = store.enqueue(spec)
        store.claim("w")
        if ok:
            return store.succeed(job.id, "w", {"verified": True})
        return store.fail(job.id, "w", PermanentImportError("unsupported file format"))

    return drop, done, PostActions(config.watch[0], str(drop)), finished


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_move_across_filesystems_interrupted_mid_copy_resumes_into_the_same_folder(moved):
    drop, done, actions, finished = moved
    job = finished()
    # The killed attempt: destination recorded, half of the copy in the staging folder.
    (done / ".watchfolder-moves").mkdir()
    (done / ".watchfolder-moves" / f"{job.id}.json").write_text(json.dumps({"destination": str(done / "acq")}))
    staging = done / f".acq.wf-{job.id}.moving"
    staging.mkdir()
    (staging / "a.tif").write_bytes(b"a" * 1000)
    note = actions.apply(job)
    assert note == f"post-action: moved to {done / 'acq'}"
    assert _files(done) == ["acq.watchfolder-receipt.json", "acq/a.tif", "acq/sub/b.tif"]
    assert (done / "acq" / "a.tif").read_bytes() == b"a" * 100_000
    assert not (drop / "acq").exists()
    report("post-action killed mid-copy", duplicates=0, partial=0)


def test_move_interrupted_while_removing_the_source_does_not_duplicate(moved):
    drop, done, actions, finished = moved
    job = finished()
    (done / ".watchfolder-moves").mkdir()
    (done / ".watchfolder-moves" / f"{job.id}.json").write_text(json.dumps({"destination": str(done / "acq")}))
    (done / "acq" / "sub").mkdir(parents=True)
    (done / "acq" / "a.tif").write_bytes(b"a" * 100_000)
    (done / "acq" / "sub" / "b.tif").write_bytes(b"b" * 100_000)
    (drop / "acq" / "a.tif").unlink()  # the removal had started
    actions.apply(job)
    assert _files(done) == ["acq.watchfolder-receipt.json", "acq/a.tif", "acq/sub/b.tif"]
    assert not (drop / "acq").exists()


def test_a_failed_job_moved_says_so_in_its_error_report(moved):
    drop, done, actions, finished = moved
    job = finished(ok=False)
    actions.apply(job)
    report_text = (done / "acq.watchfolder-error.txt").read_text()
    assert "The files were moved here, unchanged." in report_text
    assert "left as they were" not in report_text
    assert _files(done) == ["acq.watchfolder-error.txt", "acq/a.tif", "acq/sub/b.tif"]
