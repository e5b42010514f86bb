"""The archive on a nearly full volume (issue 11 case 5), on a real tmpfs (root only)."""

from __future__ import annotations

import hashlib
import threading

from drills import fill, report

from watchfolder.importers.archive import ArchiveImporter
from watchfolder.job import Target
from watchfolder.worker import JobContext


def test_a_retry_checks_identity_before_copying_on_a_nearly_full_volume(tmpfs, store, make_spec):
    volume = tmpfs("archive-volume", 1024 * 1024)
    data = hashlib.sha256(b"seed").digest() * (400 * 1024 // 32)  # 400 KiB
    spec = make_spec({"stack.tif": data, "meta.txt": b"m" * 100}, target=Target(project="P", dataset="D"))
    store.enqueue(spec)
    job = store.claim("w")
    ctx = JobContext(store, job, "w", threading.Event(), min_interval=0.0)
    importer = ArchiveImporter(root=volume)
    dest = importer.destination(job)
    dest.mkdir(parents=True)
    (dest / "stack.tif").write_bytes(data)  # archived by the attempt that then hit "no space left"
    (dest / f".watchfolder-job-{job.id}.owned").write_text('"stack.tif"\n')  # that attempt's ledger
    filler = fill(volume)
    filler.write_bytes(filler.read_bytes()[: -(8 * 1024)])  # 8 KiB free: room for meta.txt, not a second stack
    result = importer.run(job, ctx)
    assert [f["path"] for f in result["files"]] == ["stack.tif", "meta.txt"]
    assert (dest / "stack.tif").read_bytes() == data
    assert not list(dest.glob(".*.part"))
    report("archive identity before copy", free_bytes=8192, reused=1, copied=1)


def test_a_probe_left_by_a_killed_worker_is_swept(tmp_path):
    # Found by the kill -9 loop of `work`: a worker killed between the O_TMPFILE probe's
    # link and unlink left `.wf-probe-…` in an acquisition's archive folder.
    import subprocess
    import sys

    from watchfolder.importers import archive

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    folder = tmp_path / "dest"
    folder.mkdir()
    (folder / f".wf-probe-{int(dead.stdout)}-0123abcd").write_bytes(b"")
    live = folder / f".wf-probe-{__import__('os').getpid()}-4567ef01"
    live.write_bytes(b"")
    archive._anonymous_files_work(folder)
    assert sorted(p.name for p in folder.iterdir()) == [live.name]
