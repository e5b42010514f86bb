"""An HCS plate into OMERO (issue 13): one fileset of thousands of small files.

Through the real store, worker, importer and child over real Ice to the double. The
child uploads several files of the fileset at once (``importer.omero.parallel_upload``),
keeps each file's SHA-1 under its index for the fileset's one ``verifyUpload``, and
reports progress at a bounded rate; a failed upload stops the others and leaves the
fileset unverified, for the retry to delete and redo.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import time
from pathlib import Path

import pytest
from conftest import run_job

from watchfolder.importers import create_importer
from watchfolder.importers.base import ImportContext
from watchfolder.job import JobState

pytestmark = pytest.mark.omero

MAIN = "plate.fake"  # Bio-Formats' synthetic format: any content reads as an image


def plate_files(n: int) -> dict[str, bytes]:
    """``n`` small files of distinct content (an Operetta-style Images/ folder), after the main file."""
    files = {MAIN: b""}
    for i in range(n):
        name = f"Images/r{i // 240 + 1:02d}c{i // 10 % 24 + 1:02d}f{i % 10 + 1:02d}p01-ch1.tiff"
        files[name] = i.to_bytes(4, "little") * (50 + i % 200)
    return files


def plate_spec(make_spec, files):
    return make_spec(files, group="lab", filesets=(tuple(files),))


class TimedContext(ImportContext):
    """Records every progress call with the time it arrived."""

    def __init__(self, job, log_path: Path):
        self.job = job
        self.events: list[tuple] = []
        self._log_path = log_path

    def progress(self, phase, bytes_done=0, bytes_total=0, files_done=0, files_total=0):
        self.events.append((time.monotonic(), phase, bytes_done, bytes_total, files_done, files_total))

    def log(self, message):
        with open(self._log_path, "a") as f:
            f.write(message + "\n")

    @property
    def log_path(self):
        return str(self._log_path)


def assert_fileset_holds(fileset, root: Path, files: dict[str, bytes]) -> None:
    """The double's fileset has every file once, in order, with its bytes and SHA-1, on disk too."""
    assert fileset["client_paths"] == [str(root / rel) for rel in files]
    assert [(f["size"], f["sha1"]) for f in fileset["files"]] == [
        (len(data), hashlib.sha1(data).hexdigest()) for data in files.values()]
    for f, data in zip(fileset["files"], files.values(), strict=True):
        assert Path(f["path"]).read_bytes() == data


def test_a_plate_of_thousands_of_files_is_uploaded_in_parallel_each_file_once(
        store, importer, make_spec, double, child_module, tmp_path):
    files = plate_files(3000)
    spec = plate_spec(make_spec, files)
    job, _ = store.enqueue(spec)
    ctx = TimedContext(job, tmp_path / "job.log")
    result = importer.run(job, ctx)

    state = double.state()
    (fileset,) = state["filesets"]
    assert fileset["state"] == "imported" and result["fileset_ids"] == [fileset["id"]]
    assert_fileset_holds(fileset, Path(spec.root), files)
    assert result["filesets"][0]["sha1"] == [hashlib.sha1(d).hexdigest() for d in files.values()]
    counters = state["counters"]
    # Every file with data in one write (they are smaller than a block), the empty one in a
    # zero-byte write that creates it; nothing written twice.
    assert counters["writes"] == len(files) and counters["bytes_written"] == sum(map(len, files.values()))
    # Several files were in flight at once, never more than configured, and every uploader was closed.
    assert 2 <= counters["max_uploaders_open"] <= 4 and counters["uploaders_open"] == 0

    total = sum(map(len, files.values()))
    uploading = [e for e in ctx.events if e[1] == "uploading"]
    figures = [(b, f) for _, _, b, _, f, _ in uploading]
    assert figures[0] == (0, 0) and figures[-1] == (total, len(files))
    for column in zip(*figures, strict=True):  # bytes_done and files_done never go back
        assert list(column) == sorted(column)
    assert all(e[3] == total and e[5] == len(files) for e in uploading)
    # A bounded rate, not a line per file: at most one per interval (or per bytes step) of
    # the upload's span, beside the forced ones at its start and end.
    emitter = inspect.signature(child_module.Emitter).parameters
    span = uploading[-1][0] - uploading[0][0]
    bound = span / emitter["interval"].default + total / emitter["bytes_step"].default + 6
    assert len(uploading) <= bound, (len(uploading), span)
    assert ctx.events[-1][1:] == ("done", total, total, len(files), len(files))


@pytest.mark.parametrize("fault", ["fail_upload", "drop_after_bytes"])
def test_a_failed_upload_leaves_the_fileset_unverified_and_a_retry_succeeds(
        store, omero_config, make_spec, double, fault):
    # One upload fails (the server's disk, or the connection) while others are in flight:
    # the attempt ends transient with the fileset never verified; the retry deletes it and
    # uploads the plate again, every file once more and whole.
    files = plate_files(800)
    names = list(files)
    if fault == "fail_upload":
        double.faults(fail_upload=os.path.basename(names[400]))
    else:
        double.faults(drop_after_bytes=sum(len(files[n]) for n in names[:400]))
    importer = create_importer(omero_config(parallel_upload=3))
    spec = plate_spec(make_spec, files)
    job = run_job(store, importer, spec, now=1000.0)

    assert job.state is JobState.RETRY_WAIT and job.error.kind == "transient", job.error
    state = double.state()
    (fileset,) = state["filesets"]
    assert fileset["state"] == "uploading" and state["images"] == []
    # The files after the failure were never started.
    assert state["counters"]["writes"] < len(files)
    if fault == "fail_upload":
        assert "No space left on device" in job.error.message
        assert state["counters"]["uploaders_open"] == 0  # the others stopped and closed theirs
    else:
        assert "lost the connection" in job.error.message

    job = run_job(store, importer, spec, now=2000.0)

    assert job.state is JobState.SUCCEEDED, job.error
    state = double.state()
    assert [f["state"] for f in state["filesets"]] == ["deleted", "imported"]
    assert_fileset_holds(state["filesets"][1], Path(spec.root), files)
    assert len(state["images"]) == 1 and job.attempts == 2
    assert job.progress.files_done == job.progress.files_total == len(files)


def test_one_upload_at_a_time_when_configured(store, omero_config, make_spec, double):
    files = plate_files(50)
    importer = create_importer(omero_config(parallel_upload=1))
    job = run_job(store, importer, plate_spec(make_spec, files))

    assert job.state is JobState.SUCCEEDED, job.error
    counters = double.state()["counters"]
    assert counters["max_uploaders_open"] == 1 and counters["writes"] == len(files)
