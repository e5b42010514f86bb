"""Issue 10, case 1: a folder or file swapped for a symlink after the check is never followed.

Real folders, real symlinks, the real archive importer (and, for the API case,
real HTTP and the real worker). The "outside" secret is a file of the test's own
outside every allowed root, standing in for ``/etc/shadow``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from api_support import acquisition, start_service, stop_service
from helpers import BlockedWriter

from watchfolder import safefs
from watchfolder.errors import PermanentImportError
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.importers.base import ImportContext
from watchfolder.job import JobState
from watchfolder.watch.detector import Patterns, make_rule
from watchfolder.worker import Worker

SECRET = b"root:$6$not-for-you:19000:0:99999:7:::\n"


def archived_bytes(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


# -- the helper itself ----------------------------------------------------------


@pytest.fixture
def tree(tmp_path):
    """allowed/acq/{a.tif, sub/b.tif, in_link -> a.tif, abs_link -> <abs>/a.tif}; outside/shadow."""
    allowed = tmp_path / "allowed"
    acq = allowed / "acq"
    (acq / "sub").mkdir(parents=True)
    (acq / "a.tif").write_bytes(b"a")
    (acq / "sub" / "b.tif").write_bytes(b"bb")
    (acq / "in_link").symlink_to("a.tif")
    (acq / "sub" / "up_link").symlink_to("../a.tif")
    (acq / "abs_link").symlink_to(acq / "sub" / "b.tif")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shadow").write_bytes(SECRET)
    return allowed, acq, outside


def read(allowed, acq, rel) -> bytes:
    fd, st = safefs.open_source(str(allowed), str(acq), rel)
    with os.fdopen(fd, "rb") as fh:
        data = fh.read()
    assert len(data) == st.st_size
    return data


@pytest.mark.parametrize(("rel", "data"), [("a.tif", b"a"), ("sub/b.tif", b"bb"), ("in_link", b"a"),
                                           ("sub/up_link", b"a"), ("abs_link", b"bb")])
def test_plain_files_and_symlinks_inside_the_acquisition_open(tree, rel, data):
    allowed, acq, _ = tree
    assert read(allowed, acq, rel) == data


@pytest.mark.parametrize("link", ["abs", "rel", "dotdot_dir"])
def test_file_symlinks_out_of_the_acquisition_are_refused(tree, link):
    allowed, acq, outside = tree
    if link == "abs":
        (acq / "x").symlink_to(outside / "shadow")
    elif link == "rel":
        (acq / "x").symlink_to("../../outside/shadow")
    else:
        (acq / "x").symlink_to("sub/../../acq/../../outside/shadow")
    with pytest.raises(safefs.UnsafePath):
        read(allowed, acq, "x")


def test_a_folder_swapped_for_a_symlink_is_refused_whatever_it_points_to(tree):
    allowed, acq, outside = tree
    acq.rename(allowed / "acq.orig")
    acq.symlink_to(outside)  # outside/shadow exists under the same relative name
    with pytest.raises(safefs.UnsafePath, match="no longer a folder"):
        read(allowed, acq, "shadow")
    # Even a symlink to a folder inside the allowed root: it was a folder when checked.
    acq.unlink()
    acq.symlink_to(allowed / "acq.orig")
    with pytest.raises(safefs.UnsafePath, match="no longer a folder"):
        read(allowed, acq, "a.tif")


def test_fifos_sockets_and_folders_are_refused_by_kind_and_never_opened(tree):
    import socket

    allowed, acq, _ = tree
    os.mkfifo(acq / "pipe")  # would block a plain open() for ever
    writer = BlockedWriter(acq / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(acq / "sub" / "live.sock"))
    os.symlink("pipe", acq / "to_pipe")  # a link inside the acquisition, to the FIFO
    try:
        for rel in ("pipe", "to_pipe"):
            with pytest.raises(safefs.UnsafePath, match=r"is a named pipe \(FIFO\), not a regular file: refused "
                                                         "and not opened; remove it from the acquisition"):
                read(allowed, acq, rel)
        with pytest.raises(safefs.UnsafePath, match="is a socket, not a regular file"):
            read(allowed, acq, "sub/live.sock")
        with pytest.raises(safefs.UnsafePath, match="is a folder, not a regular file"):
            read(allowed, acq, "sub")
        assert not writer.opened.is_set()
    finally:
        sock.close()
        writer.release()


def test_check_without_opening_agrees_with_open(tree):
    # SourceTree.check (the archive's pre-copy look at every listed file, an lstat instead of
    # an open) refuses exactly what open refuses, with the same reason, and opens no FIFO.
    import socket

    allowed, acq, outside = tree
    (acq / "out_abs").symlink_to(outside / "shadow")
    (acq / "out_rel").symlink_to("../../outside/shadow")
    os.mkfifo(acq / "pipe")
    writer = BlockedWriter(acq / "pipe")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(acq / "sub" / "live.sock"))

    def verdict(call):
        try:
            st = call()
        except (safefs.UnsafePath, OSError) as exc:
            return type(exc).__name__, str(exc)
        return "ok", st.st_size

    try:
        with safefs.SourceTree(str(allowed), str(acq)) as checker, safefs.SourceTree(str(allowed), str(acq)) as opener:
            def opened(rel):
                fd, st = opener.open(rel)
                os.close(fd)
                return st

            for rel in ("a.tif", "sub/b.tif", "in_link", "sub/up_link", "abs_link", "out_abs", "out_rel",
                        "pipe", "sub/live.sock", "sub", "missing.tif", "sub/missing/x.tif"):
                assert verdict(lambda r=rel: checker.check(r)) == verdict(lambda r=rel: opened(r)), rel
            # The identity recorded when queued: a rewritten file is refused by both.
            queued = safefs.identity(os.stat(acq / "a.tif"))
            (acq / "a.tif").write_bytes(b"A")
            os.utime(acq / "a.tif", ns=(1, 1))
            assert verdict(lambda: checker.check("a.tif", queued))[0] == "UnsafePath"
            assert verdict(lambda: checker.check("a.tif", queued)) == verdict(
                lambda: opener.open("a.tif", queued)[1])
        assert not writer.opened.is_set()
    finally:
        sock.close()
        writer.release()


def test_a_root_outside_the_allowed_root_is_refused(tree, tmp_path):
    _, acq, outside = tree
    with pytest.raises(safefs.UnsafePath, match="not under its allowed root"):
        safefs.open_source(str(outside), str(acq), "a.tif")


# -- the three cases of the issue, end to end ----------------------------------------


def test_api_job_whose_folder_becomes_a_symlink_to_etc_copies_nothing(tmp_path):
    """POST with a token limited to drop/jdoe; swap acqT for a symlink before the worker runs."""
    service = start_service(tmp_path)
    try:
        jdoe = service.roots["drop"] / "jdoe"
        acq = acquisition(jdoe, "acqT", files={"shadow": b"harmless"})
        r = service.client("drop-only").post("/api/v1/jobs", {"path": str(acq)})
        assert r.status == 202, r.text
        etc = tmp_path / "etc"
        etc.mkdir()
        (etc / "shadow").write_bytes(SECRET[: len(b"harmless")])  # same size: only the swap can tell
        acq.rename(jdoe / "acqT.orig")
        acq.symlink_to(etc)
        importer = ArchiveImporter(service.config)
        done = Worker(service.store, importer, name="w").loop()
        assert done.state == JobState.FAILED and done.error.kind == "permanent"
        assert "is no longer a folder" in done.error.message
        assert archived_bytes(importer.root) == []
    finally:
        stop_service(service)


def test_drop_folder_acquisition_swapped_after_detection_copies_nothing(tmp_path, make_config, store):
    drop = tmp_path / "drop"
    acq = acquisition(drop, "acqT", files={"shadow": b"harmless"})
    config = make_config(watch=[{"name": "scope", "path": str(drop), "detection": "manifest"}],
                         importer={"kind": "archive", "archive": {"root": str(tmp_path / "archive")}})
    watch = config.watch[0]
    outcome = make_rule(watch, Patterns(watch.include, watch.exclude)).build(str(drop), "acqT", now=0.0)
    assert outcome.kind == "enqueue", outcome
    store.enqueue(outcome.spec)
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "shadow").write_bytes(SECRET[: len(b"harmless")])
    acq.rename(drop / "acqT.orig")
    acq.symlink_to(etc)
    importer = ArchiveImporter(config)
    done = Worker(store, importer, name="w").loop()
    assert done.state == JobState.FAILED and "is no longer a folder" in done.error.message
    assert archived_bytes(tmp_path / "archive") == []


class SwapContext(ImportContext):
    """Runs ``swap`` once, when the first (big) file's copy is under way (its first chunks are written)."""

    def __init__(self, job, archive: Path, swap):
        self.job = job
        self.archive = archive
        self.swap = swap
        self.swapped = threading.Event()
        self.lines: list[str] = []

    def progress(self, phase, bytes_done=0, bytes_total=0, files_done=0, files_total=0):
        if not self.swapped.is_set() and phase == "copying" and 0 < bytes_done and files_done == 0:
            self.swap()
            self.swapped.set()

    def log(self, message):
        self.lines.extend([message] if isinstance(message, str) else message)

    @property
    def log_path(self):
        return os.devnull


def test_file_swapped_for_a_symlink_during_the_job_is_refused(tmp_path, store, make_spec):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(SECRET)
    spec = make_spec({"a_big.tif": os.urandom(256 * 1024), "z_small.tif": b"small"})
    small = Path(spec.root) / "z_small.tif"

    def swap():
        small.unlink()
        small.symlink_to(outside)

    store.enqueue(spec)
    job = store.claim("w")
    archive = tmp_path / "archive"
    ctx = SwapContext(job, archive, swap)
    with pytest.raises(PermanentImportError, match="symlink out of the acquisition folder"):
        ArchiveImporter(root=archive, chunk_bytes=4096).run(job, ctx)
    assert ctx.swapped.is_set()
    assert SECRET not in archived_bytes(archive)


def test_file_swapped_for_a_same_size_file_records_what_was_read(tmp_path, store, make_spec):
    """The size recorded is the opened file's; a content swap shows in the checksum, not silently."""
    spec = make_spec({"a_big.tif": os.urandom(64 * 1024), "z_small.tif": b"small"})
    small = Path(spec.root) / "z_small.tif"
    store.enqueue(spec)
    job = store.claim("w")
    archive = tmp_path / "archive"

    def grow():
        small.write_bytes(b"small but longer now")

    with pytest.raises(PermanentImportError, match="z_small.tif is 20 bytes but was 5 bytes when queued"):
        ArchiveImporter(root=archive, chunk_bytes=4096).run(job, SwapContext(job, archive, grow))


CHILD = Path(__file__).resolve().parents[2] / "watchfolder" / "omero_child" / "child.py"
CHILD_READ = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("child", sys.argv[1])
child = importlib.util.module_from_spec(spec)
spec.loader.exec_module(child)
req = json.loads(sys.argv[2])
try:
    f, size = child.open_source(req, sys.argv[3])
    print(json.dumps({"size": size, "data": f.read().decode()}))
except child.Failure as exc:
    print(json.dumps({"failure": exc.message, "transient": exc.transient}))
"""


def child_pythons() -> list[str]:
    import sys

    found = [sys.executable]  # any Python 3 runs the child's file-reading part
    repo = Path(__file__).resolve().parents[2]
    for python in (os.environ.get("WATCHFOLDER_OMERO_PYTHON"), str(repo / ".venv-omero" / "bin" / "python")):
        if python and os.path.exists(python):
            found.append(python)  # the interpreter the child really runs on (3.10)
            break
    return found


@pytest.mark.parametrize("python", child_pythons())
def test_the_omero_child_reads_by_the_same_rule(tree, python):
    """The child (run by file path, standard library only) opens files through safefs too."""
    import json
    import subprocess

    allowed, acq, outside = tree
    req = {"root": str(acq), "allowed_root": str(allowed)}

    def child_read(rel):
        out = subprocess.run([python, "-I", "-c", CHILD_READ, str(CHILD), json.dumps(req), rel],
                             capture_output=True, text=True, timeout=60, check=True, cwd="/")
        return json.loads(out.stdout)

    assert child_read("in_link") == {"size": 1, "data": "a"}
    acq.rename(allowed / "acq.orig")
    acq.symlink_to(outside)
    answer = child_read("shadow")
    assert "is no longer a folder" in answer["failure"] and answer["transient"] is False
