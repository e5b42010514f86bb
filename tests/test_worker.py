"""Workers: outcomes of a run, cancel, graceful shutdown, and a worker process killed mid-copy."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from helpers import wait_until

from watchfolder.errors import PermanentImportError, TransientImportError
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.importers.base import Importer
from watchfolder.job import JobState, RetryPolicy
from watchfolder.worker import Worker, WorkerPool

T0 = 1_800_000_000.0


class ScriptedImporter(Importer):
    """An importer whose behaviour each test sets: raise, or work until released."""

    name = "scripted"

    def __init__(self, outcome=None):
        self.outcome = outcome
        self.started = threading.Event()
        self.release = threading.Event()
        self.runs = 0

    def run(self, job, ctx):
        self.runs += 1
        self.started.set()
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        done = 0
        while not self.release.wait(0.01):
            done += 1
            ctx.progress("working", done, 0, 0, 1)  # the checkpoint where cancel/shutdown land
        return {"worked": done}


def test_worker_archives_a_job_end_to_end(store, make_spec, tmp_path):
    importer = ArchiveImporter(root=tmp_path / "archive")
    worker = Worker(store, importer, name="w1")
    job, _ = store.enqueue(make_spec())
    done = worker.loop()
    assert done.id == job.id and done.state == JobState.SUCCEEDED
    for entry in job.spec.files:
        copy = tmp_path / "archive" / "jdoe" / "Brain atlas" / "slide 3" / Path(job.spec.root).name / entry.path
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == entry.sha256
    assert done.progress.bytes_done == done.progress.bytes_total == 1200
    log = store.read_log(job.id)
    assert "attempt 1 of 3 started on w1" in log and "succeeded" in log
    assert worker.loop() is None


@pytest.mark.parametrize(
    ("outcome", "state", "kind"),
    [
        (TransientImportError("server unreachable"), JobState.RETRY_WAIT, "transient"),
        (PermanentImportError("unsupported file format"), JobState.FAILED, "permanent"),
        (ZeroDivisionError("bug"), JobState.RETRY_WAIT, "transient"),
    ],
)
def test_worker_records_failures_by_kind(store, make_spec, outcome, state, kind):
    job, _ = store.enqueue(make_spec())
    done = Worker(store, ScriptedImporter(outcome), name="w").loop()
    assert done.state == state and done.error.kind == kind
    if isinstance(outcome, ZeroDivisionError):
        assert "internal error: ZeroDivisionError: bug" in done.error.message
        assert "Traceback" in store.read_log(job.id)


def test_a_short_job_writes_no_progress_of_its_own_and_a_long_one_does(store, make_spec, tmp_path, monkeypatch):
    # The claim has just renewed the lease: a progress write in the job's first interval
    # was one more write transaction per job (issue 18: per-job overhead).
    writes = []
    real = store.report_progress

    def counting(job_id, worker, progress, **kw):
        writes.append(progress.phase if progress else None)
        return real(job_id, worker, progress, **kw)

    monkeypatch.setattr(store, "report_progress", counting)
    worker = Worker(store, ArchiveImporter(root=tmp_path / "archive"), name="w1")
    store.enqueue(make_spec())
    done = worker.loop()
    assert done.state == JobState.SUCCEEDED and writes == []
    assert done.progress.phase == "archived"  # the finishing write records the last progress
    importer = ScriptedImporter()
    long = Worker(store, importer, name="w2", heartbeat_seconds=60)
    store.enqueue(make_spec())
    thread = threading.Thread(target=long.loop)
    thread.start()
    assert importer.started.wait(10)
    wait_until(lambda: "working" in writes, timeout=10)
    importer.release.set()
    thread.join(10)


def test_cancel_reaches_a_running_job(store, make_spec):
    importer = ScriptedImporter()
    worker = Worker(store, importer, name="w", heartbeat_seconds=0.05)
    job, _ = store.enqueue(make_spec())
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("job", worker.loop()))
    thread.start()
    assert importer.started.wait(10)
    store.cancel(job.id, by="admin")
    thread.join(10)
    assert result["job"].state == JobState.CANCELLED
    assert [str(h.state) for h in store.get(job.id).history][-1] == "cancelled"


def test_pool_stop_lets_running_jobs_finish_within_the_grace_period(store, make_spec):
    importer = ScriptedImporter()
    pool = WorkerPool(store, importer, 1, poll_interval=0.05, heartbeat_seconds=0.05)
    job, _ = store.enqueue(make_spec())
    pool.start()
    assert importer.started.wait(10)
    stopper = threading.Thread(target=pool.stop, kwargs={"grace": 30})
    stopper.start()
    wait_until(lambda: pool.stop_claiming.is_set())
    other, _ = store.enqueue(make_spec())  # queued during shutdown: must not be claimed
    importer.release.set()
    stopper.join(30)
    assert not stopper.is_alive()
    assert store.get(job.id).state == JobState.SUCCEEDED
    assert store.get(other.id).state == JobState.QUEUED
    assert store.components("worker") == []


def test_pool_stop_releases_jobs_still_running_after_the_grace_period(store, make_spec):
    importer = ScriptedImporter()  # never released: works until interrupted
    pool = WorkerPool(store, importer, 2, poll_interval=0.05, heartbeat_seconds=0.05)
    job, _ = store.enqueue(make_spec())
    pool.start()
    assert importer.started.wait(10)
    assert pool.stop(grace=0.1)
    after = store.get(job.id)
    assert after.state == JobState.QUEUED and after.attempts == 0
    assert "released" in after.history[-1].message
    assert "worker stopping" in store.read_log(job.id)


def test_idle_worker_wakes_when_a_job_is_queued_in_its_process(store, make_spec):
    # The poll interval is far longer than the deadline: only the wake-up can meet it.
    importer = ScriptedImporter()
    importer.release.set()
    pool = WorkerPool(store, importer, 2, poll_interval=60, heartbeat_seconds=60)
    pool.start()
    try:
        wait_until(lambda: len(store.components("worker")) == 2, message="workers up")
        for _ in range(3):
            job, _ = store.enqueue(make_spec())
            wait_until(lambda job=job: store.get(job.id).state == JobState.SUCCEEDED, 5, message="job run at once")
    finally:
        assert pool.stop(grace=5)


def test_burst_mode_drains_the_queue_and_returns(store, make_spec, tmp_path):
    for _ in range(5):
        store.enqueue(make_spec())
    worker = Worker(store, ArchiveImporter(root=tmp_path / "archive"), name="burst", poll_interval=0.05)
    assert worker.run(threading.Event(), burst=True) == 5
    assert store.counts()["succeeded"] == 5


def test_heartbeat_keeps_the_lease_of_a_long_job(tmp_path, make_spec):
    from watchfolder.store import SQLiteStore

    short = SQLiteStore(tmp_path / "lease.db", lease_seconds=0.3)
    importer = ScriptedImporter()
    worker = Worker(short, importer, name="w", heartbeat_seconds=0.05, maintain_interval=0.05)
    job, _ = short.enqueue(make_spec())
    thread = threading.Thread(target=worker.run, args=(threading.Event(),), kwargs={"max_jobs": 1})
    thread.start()
    assert importer.started.wait(10)
    # Well past several lease lengths, the job is still this worker's.
    wait_until(lambda: short.get(job.id).updated_at > short.get(job.id).started_at + 1.0, timeout=10)
    short.maintain()
    assert short.get(job.id).state == JobState.RUNNING and short.get(job.id).worker == "w"
    importer.release.set()
    thread.join(10)
    assert short.get(job.id).state == JobState.SUCCEEDED and short.get(job.id).attempts == 1
    short.close()


# -- a real worker process, killed with SIGKILL in the middle of a copy ----------


def _write_config(tmp_path: Path, *, archive: dict | None = None, **workers) -> Path:
    data = tmp_path / "data"
    config = {
        "data_dir": str(data),
        "store": {"lease_seconds": 2},
        "workers": {"count": 1, "poll_interval": 0.1, "heartbeat_seconds": 0.5, "shutdown_grace": 30, **workers},
        "retry": {"max_attempts": 3, "backoff": [1]},
        "importer": {"kind": "archive", "archive": archive or {}},
        "notify": {"transport": "folder", "admin_email": "admin@example.org"},
        "server": {"enabled": False},
    }
    path = tmp_path / "watchfolder.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


PACED_RATE = 16 * 1024 * 1024  # bytes per second: importer.archive.max_bytes_per_second in the drills


def _big_acquisition(tmp_path: Path, size_mb: int = 256) -> tuple[Path, str]:
    root = tmp_path / "big-acquisition"
    root.mkdir()
    block = hashlib.sha256(b"seed").digest() * (1024 * 1024 // 32)
    digest = hashlib.sha256()
    with open(root / "stack.ome.tiff", "wb") as fh:
        for i in range(size_mb):
            chunk = bytes([i % 251]) + block[1:]
            fh.write(chunk)
            digest.update(chunk)
    return root, digest.hexdigest()


def _cli(config: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "watchfolder", "--config", str(config), *args],
        capture_output=True, text=True, timeout=120,
    )


def _start_worker(config: Path, **popen) -> subprocess.Popen:
    """`watchfolder work` as a real process."""
    popen.setdefault("stdout", subprocess.PIPE)
    popen.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(
        [sys.executable, "-m", "watchfolder", "--config", str(config), "work"],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, text=True, **popen,
    )


def _submit(config: Path, root: Path, *options: str) -> int:
    submitted = _cli(config, "submit", str(root), "--owner", "jdoe", "--json", *options)
    assert submitted.returncode == 0, submitted.stderr
    return json.loads(submitted.stdout)["id"]


def _job_row(db: Path, job_id: int) -> dict:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    row = dict(conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone())
    conn.close()
    return row


@pytest.mark.slow
def test_worker_process_killed_mid_copy_completes_exactly_once(tmp_path):
    # The copy is paced (64 MiB at 16 MiB/s: 4 s) so that "mid-copy" lasts seconds on any
    # machine: an unpaced copy can end before its first progress write (one interval after
    # the claim) and the kill would come too late to be a kill mid-copy.
    config = _write_config(tmp_path, archive={"max_bytes_per_second": PACED_RATE})
    root, digest = _big_acquisition(tmp_path, size_mb=64)
    job_id = _submit(config, root, "--email", "jdoe@example.org", "--dataset", "big")
    db = tmp_path / "data" / "watchfolder.db"
    total = 64 * 1024 * 1024
    first = _start_worker(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def mid_copy():
            row = _job_row(db, job_id)
            done = json.loads(row["progress"])["bytes_done"] if row["progress"] else 0
            return row["state"] == "running" and 0 < done < total

        wait_until(mid_copy, timeout=60, interval=0.005, message="the copy to start")
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()  # no-op after the SIGKILL; stops it when the wait above failed
        first.wait(30)
    killed = _job_row(db, job_id)
    assert killed["state"] == "running"  # nobody finished it: the lease is still held by the dead worker
    dest_dir = tmp_path / "data" / "archive" / "jdoe" / "_no_project" / "big" / root.name
    assert not (dest_dir / "stack.ome.tiff").exists()

    second = _start_worker(config, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _job_row(db, job_id)["state"] == "succeeded", timeout=120, message="the job to succeed")
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err

    final = _job_row(db, job_id)
    assert final["attempts"] == 2
    copy = dest_dir / "stack.ome.tiff"
    with open(copy, "rb") as fh:
        assert hashlib.file_digest(fh, "sha256").hexdigest() == digest
    assert sorted(p.name for p in dest_dir.iterdir()) == ["stack.ome.tiff"]  # no partial copies left
    result = json.loads(final["result"])
    assert result["files"][0]["sha256"] == digest
    shown = _cli(config, "jobs", "show", str(job_id))
    assert "expired" in shown.stdout and shown.stdout.count("running") == 2
    mails = list((tmp_path / "data" / "outbox").glob("*.eml"))
    assert len(mails) == 1  # one mail for one acquisition, despite two attempts


@pytest.mark.slow
def test_plate_of_20000_files_killed_mid_copy_is_archived_once_by_a_second_worker(tmp_path):
    # An HCS plate (issue 13): kill -9 while its files are being copied (some copied and
    # not yet flushed, one half-written under its temporary name), then another worker.
    config = _write_config(tmp_path)
    root = tmp_path / "plate"
    (root / "Images").mkdir(parents=True)
    count = 20_000
    for i in range(count):
        (root / "Images" / f"r{i // 2400 + 1:02d}c{i // 100 % 24 + 1:02d}f{i % 100 + 1:02d}.tiff").write_bytes(
            b"%08d" % i * 16
        )
    job_id = _submit(config, root, "--screen", "Plate 1")
    db = tmp_path / "data" / "watchfolder.db"
    first = _start_worker(config, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def mid_copy():
            row = _job_row(db, job_id)
            done = json.loads(row["progress"])["files_done"] if row["progress"] else 0
            return row["state"] == "running" and count // 10 < done < count // 2

        wait_until(mid_copy, timeout=120, interval=0.005, message="the copy to be under way")
        first.send_signal(signal.SIGKILL)
    finally:
        first.wait(30)
    killed = _job_row(db, job_id)
    assert killed["state"] == "running"
    assert json.loads(killed["progress"])["files_done"] < count  # killed in the middle, not after

    second = _start_worker(config, stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _job_row(db, job_id)["state"] == "succeeded", timeout=300, message="the job to succeed")
    finally:
        second.send_signal(signal.SIGTERM)
        _, err = second.communicate(timeout=60)
    assert second.returncode == 0, err
    assert _job_row(db, job_id)["attempts"] == 2
    archive = tmp_path / "data" / "archive"
    dest = archive / "jdoe" / "_screens" / "Plate 1" / "plate" / "Images"
    archived = sorted(os.listdir(dest))
    assert archived == sorted(os.listdir(root / "Images"))  # each once, nothing else: no temporary file
    for name in archived:
        assert (dest / name).read_bytes() == (root / "Images" / name).read_bytes(), name
    assert [str(p) for p in archive.rglob("*") if p.is_file() and p.parent != dest] == []
    log = _cli(config, "jobs", "log", str(job_id)).stdout
    assert f"{count} file(s) durable" in log and "already archived" in log


@pytest.mark.slow
def test_sigterm_lets_the_running_job_finish(tmp_path):
    config = _write_config(tmp_path)
    root, digest = _big_acquisition(tmp_path, size_mb=64)
    job_id = _submit(config, root, "--dataset", "d")
    db = tmp_path / "data" / "watchfolder.db"
    proc = _start_worker(config)
    try:
        wait_until(lambda: _job_row(db, job_id)["state"] == "running", timeout=60, interval=0.005)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopping" in out
    assert _job_row(db, job_id)["state"] == "succeeded"


@pytest.mark.slow
def test_sigterm_with_no_grace_releases_the_job_to_the_queue(tmp_path):
    # Paced (see above) so that the SIGTERM lands while the file is being copied, not after.
    config = _write_config(tmp_path, shutdown_grace=0, archive={"max_bytes_per_second": PACED_RATE})
    root, _ = _big_acquisition(tmp_path, size_mb=64)
    job_id = _submit(config, root, "--dataset", "d")
    db = tmp_path / "data" / "watchfolder.db"
    proc = _start_worker(config)
    try:
        def copying():
            row = _job_row(db, job_id)
            return row["state"] == "running" and json.loads(row["progress"])["bytes_done"] > 0

        wait_until(copying, timeout=60, interval=0.005)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    row = _job_row(db, job_id)
    assert row["state"] == "queued" and row["attempts"] == 0 and row["worker"] is None
    dest_dir = tmp_path / "data" / "archive" / "jdoe" / "_no_project" / "d" / root.name
    # The partial copy was removed; the job's ledger stays: the folder is its own when it runs again.
    assert not dest_dir.exists() or [p.name for p in dest_dir.iterdir()] == [".watchfolder-job-1.owned"]


# -- faults: a long lock, dead workers' rows (issue 11 cases 1 and 2) --------------


class SilentImporter(Importer):
    """Says nothing while it works, like OMERO's server-side import phase."""

    name = "silent"

    def __init__(self):
        self.started = threading.Event()
        self.release = threading.Event()

    def run(self, job, ctx):
        self.started.set()
        assert self.release.wait(30)
        return {"silent": True}


def test_heartbeat_survives_a_long_lock_and_renews_the_lease_of_a_silent_job(tmp_path, make_spec):
    from watchfolder.store import SQLiteStore

    db = tmp_path / "locked.db"
    store = SQLiteStore(db, lease_seconds=1.0, busy_timeout=0.05)
    other = SQLiteStore(db, lease_seconds=1.0, busy_timeout=5)  # another process's view: runs maintain
    importer = SilentImporter()
    worker = Worker(store, importer, name="w", heartbeat_seconds=0.1, maintain_interval=3600)
    job, _ = store.enqueue(make_spec())
    thread = threading.Thread(target=worker.run, args=(threading.Event(),), kwargs={"max_jobs": 1})
    thread.start()
    assert importer.started.wait(10)
    locker = sqlite3.connect(db, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    held_until = time.time() + 0.6  # several heartbeats fail with "database is locked"
    while time.time() < held_until:
        time.sleep(0.05)
    locker.execute("COMMIT")
    locker.close()
    unlocked = time.time()
    # The heartbeat thread came back: the worker row and the lease move on after the lock…
    wait_until(lambda: other.components("worker")[0]["updated_at"] > unlocked + 0.5, timeout=10)
    # …and for several lease lengths of importer silence, no maintain gives the job away.
    deadline = time.time() + 3.0
    while time.time() < deadline:
        other.maintain()
        current = other.get(job.id)
        assert current.state == JobState.RUNNING and current.worker == "w", current.history[-1]
        time.sleep(0.1)
    importer.release.set()
    thread.join(10)
    done = other.get(job.id)
    assert done.state == JobState.SUCCEEDED and done.attempts == 1
    store.close()
    other.close()


def test_rows_of_dead_workers_are_pruned_and_health_recovers(store, make_config, caplog):
    from watchfolder import status

    config = make_config()
    now = 1_900_000_000.0
    store.set_component("worker", "host:1234:w1", {"state": "busy", "heartbeat_seconds": 5}, now=now - 1800)
    store.set_component("worker", "host:1234:w2", {"state": "idle", "heartbeat_seconds": 5}, now=now - 30)
    store.set_component("worker", "host:99:w1", {"state": "idle", "heartbeat_seconds": 5}, now=now - 1)
    # A worker killed a minute ago is still reported (the admin should see it)…
    ok, body = status.health(config, store, now=now)
    assert not ok and "host:1234:w2: no heartbeat for 30 s" in body["checks"]["workers"]["detail"]
    assert "host:1234:w1" not in body["checks"]["workers"]["detail"]  # …one dead for 30 min is gone
    assert "forgot worker host:1234:w1 (pid" in caplog.text and "no heartbeat for 1800 s" in caplog.text
    # Ten minutes later nothing of the dead process is left and health is back to ok, with no worker process.
    later = now + 700
    store.set_component("worker", "host:99:w1", {"state": "idle", "heartbeat_seconds": 5}, now=later - 1)
    caplog.clear()
    view = status.collect_status(config, store, now=later)
    assert view["healthy"], view["problems"]
    assert [w["name"] for w in view["workers"]] == ["host:99:w1"]
    assert caplog.text.count("forgot worker") == 1  # reported once, when removed
    assert status.health(config, store, now=later)[0]


def test_prune_waits_ten_heartbeat_intervals_of_a_slow_worker(store):
    now = 1_900_000_000.0
    store.set_component("worker", "slow", {"state": "idle", "heartbeat_seconds": 120}, now=now - 900)
    assert store.prune_workers(now=now) == []
    assert [r["name"] for r in store.prune_workers(now=now + 400)] == ["slow"]


def test_rows_of_workers_whose_process_is_gone_on_this_host_are_pruned_at_once(store):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    store.set_component("worker", f"here:{pid}:w1", {"state": "busy", "heartbeat_seconds": 5})
    store._conn().execute("UPDATE components SET pid = ? WHERE name = ?", (pid, f"here:{pid}:w1"))
    store.set_component("worker", "alive", {"state": "idle", "heartbeat_seconds": 5})
    assert [r["name"] for r in store.prune_workers()] == [f"here:{pid}:w1"]
    assert [r["name"] for r in store.components("worker")] == ["alive"]


def test_a_dead_workers_pid_given_to_another_process_does_not_keep_its_row(store, make_spec):
    # Second outside test of issue 11, F6: a killed worker's pid reused by an unrelated process
    # kept the row ("no heartbeat", unhealthy for 10 min) and its running job's cancel waited.
    # The row records the process's start time (/proc/<pid>/stat): a later process with the
    # same pid is not it. Here the "later process" is this test's own process.
    from watchfolder.store.base import process_start

    me = os.getpid()
    started = process_start(me)
    if started is None:
        pytest.skip("no /proc/<pid>/stat here (not Linux): the start time cannot be read")
    name = f"{socket.gethostname()}:{me}:w9"
    store.set_component("worker", name, {"state": "busy", "heartbeat_seconds": 5, "process_start": started - 1})
    store.set_component("worker", "alive", {"state": "idle", "heartbeat_seconds": 5, "process_start": started})
    store._conn().execute("UPDATE components SET pid = ? WHERE name IN (?, 'alive')", (me, name))
    job, _ = store.enqueue(make_spec())
    store.claim(name)
    cancelled = store.cancel(job.id, by="cli:admin")  # its worker is gone: at once, not at lease expiry
    assert cancelled.state == JobState.CANCELLED, cancelled.history[-1].message
    assert f"pid {me} now belongs to another process" in cancelled.history[-1].message
    assert [r["name"] for r in store.prune_workers()] == [name]
    assert [r["name"] for r in store.components("worker")] == ["alive"]  # the same process: kept


def test_cancel_of_an_orphaned_running_job_is_at_once(tmp_path, make_spec):
    # Issue 11 case 5: it waited for the lease, was queued and claimed again (an attempt
    # burnt) before it became cancelled.
    from watchfolder.store import SQLiteStore

    store = SQLiteStore(tmp_path / "orphan.db", lease_seconds=600)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    worker = f"{socket.gethostname()}:{int(dead.stdout)}:w1"
    job, _ = store.enqueue(make_spec())
    store.claim(worker)
    cancelled = store.cancel(job.id, by="cli:admin")
    assert cancelled.state == JobState.CANCELLED and cancelled.attempts == 1
    assert "its worker" in cancelled.history[-1].message and "is gone" in cancelled.history[-1].message
    # A live worker's job only gets the request (it stops at its next checkpoint).
    other, _ = store.enqueue(make_spec())
    store.claim(f"{socket.gethostname()}:{os.getpid()}:w1")
    assert store.cancel(other.id).state == JobState.RUNNING
    # A lease that ran out also means nobody is working on it.
    third, _ = store.enqueue(make_spec())
    store.claim("remote-host:123:w1", now=time.time() - 700)
    assert store.cancel(third.id).state == JobState.CANCELLED
    store.close()


def test_a_job_failing_for_good_leaves_nothing_in_the_archive(store, make_spec, tmp_path):
    # Issue 11 case 5: the already-copied files of a half-done acquisition stayed (16 MB).
    from watchfolder.job import FileEntry

    spec = make_spec({"a.tif": b"a" * 5000, "b.tif": b"b" * 5000, "c.tif": b"c" * 5000})
    files = tuple(FileEntry(f.path, f.size, "0" * 64 if f.path == "c.tif" else f.sha256) for f in spec.files)
    job, _ = store.enqueue(spec.__class__(**{**spec.__dict__, "files": files}))
    archive = tmp_path / "archive"
    done = Worker(store, ArchiveImporter(root=archive), name="w").loop()
    assert done.state == JobState.FAILED and "does not match the manifest" in done.error.message
    assert [p for p in archive.rglob("*") if p.is_file()] == []
    assert [p for p in archive.rglob("*") if p.is_dir()] == []  # its folders went too
    assert "removed 2 file(s) this job had written" in store.read_log(job.id)


def test_files_of_another_job_found_identical_are_not_removed(store, make_spec, tmp_path):
    from watchfolder.job import FileEntry

    archive = tmp_path / "archive"
    importer = ArchiveImporter(root=archive)
    spec = make_spec({"a.tif": b"a" * 5000})
    first, _ = store.enqueue(spec)
    assert Worker(store, importer, name="w").loop().state == JobState.SUCCEEDED
    bad = spec.__class__(**{**spec.__dict__, "files": (*spec.files, FileEntry("b.tif", 1, "0" * 64))})
    (Path(spec.root) / "b.tif").write_bytes(b"b")
    second, _ = store.enqueue(bad, note="again")
    done = Worker(store, importer, name="w").loop()
    assert done.id == second.id and done.state == JobState.FAILED
    assert sorted(p.name for p in archive.rglob("*") if p.is_file()) == ["a.tif"]  # the first job's file stays


def test_an_orphan_cancelled_from_the_cli_is_cleaned_up_on_the_maintain_tick(tmp_path, make_spec):
    from watchfolder.store import SQLiteStore

    store = SQLiteStore(tmp_path / "orphan.db", lease_seconds=600)
    archive = tmp_path / "archive"
    importer = ArchiveImporter(root=archive)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    job, _ = store.enqueue(make_spec())
    job = store.claim(f"{socket.gethostname()}:{int(dead.stdout)}:w1")
    # What the killed attempt left: one file placed (in its ledger) and one half-written.
    dest = importer.destination(job)
    dest.mkdir(parents=True)
    (dest / "img_1.tif").write_bytes(b"pixels-1" * 100)
    (dest / f".watchfolder-job-{job.id}.owned").write_text('"img_1.tif"\n')
    (dest / f".img_2.tif.wf-{job.id}-1234abcd.part").write_bytes(b"half")
    assert store.cancel(job.id).state == JobState.CANCELLED
    Worker(store, importer, name="w", maintain_interval=0).loop()
    assert not archive.exists() or [p for p in archive.rglob("*") if p.is_file()] == []
    assert "removed 2 file(s)" in store.read_log(job.id)
    store.close()


# -- a store fault is never the job's fault (issue 11, follow-up A) ------------------

LOCKER = """
import sqlite3, sys
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.read()
conn.execute("COMMIT")
"""


def _lock_database(db: Path) -> subprocess.Popen:
    """Another process holding the database's write lock (``BEGIN EXCLUSIVE``) until its stdin closes."""
    proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(db)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _unlock(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    assert proc.wait(30) == 0


class LockingImporter(Importer):
    """Has the database locked by another process mid-import, then reports progress and logs."""

    name = "locking"

    def __init__(self, db: Path):
        self.db = db
        self.locker: subprocess.Popen | None = None
        self.returned = threading.Event()

    def run(self, job, ctx):
        self.locker = _lock_database(self.db)
        for step in range(5):
            ctx.progress("copying", (step + 1) * 10, 50, step + 1, 5)
            ctx.log(f"copied file {step + 1} of 5")
        self.returned.set()
        return {"files": [], "bytes": 50}


def test_a_store_locked_during_an_import_is_waited_out_and_costs_no_attempt(tmp_path, make_spec, caplog):
    from watchfolder.store import SQLiteStore

    db = tmp_path / "data" / "watchfolder.db"
    # One attempt only: before the fix a "database is locked" on a progress write failed the job for good.
    store = SQLiteStore(db, busy_timeout=0.05, retry=RetryPolicy(1, (0.1,)))
    importer = LockingImporter(db)
    worker = Worker(store, importer, name="w", heartbeat_seconds=0.1, maintain_interval=3600)
    job, _ = store.enqueue(make_spec())
    thread = threading.Thread(target=worker.run, args=(threading.Event(),), kwargs={"max_jobs": 1})
    thread.start()
    try:
        assert importer.returned.wait(30)
        # The finishing write meets the lock and waits it out (with backoff) instead of failing the job.
        wait_until(lambda: "the job store failed" in caplog.text and "trying again" in caplog.text, timeout=30)
    finally:
        if importer.locker is not None:
            _unlock(importer.locker)
    thread.join(30)
    assert not thread.is_alive()
    done = store.get(job.id)
    assert done.state == JobState.SUCCEEDED, done.history[-1]
    assert done.attempts == 1 and not done.error
    assert done.progress.bytes_done == 50  # the latest progress, saved with the outcome
    text = store.read_log(job.id)
    assert "unexpected error" not in text and "OperationalError" not in text
    assert all(f"copied file {n} of 5" in text for n in range(1, 6))
    assert "unexpected error" not in caplog.text
    store.close()


def test_a_store_fault_before_the_import_releases_the_job_without_using_an_attempt(tmp_path, make_spec, caplog):
    from watchfolder.store import SQLiteStore

    db = tmp_path / "data" / "watchfolder.db"
    store = SQLiteStore(db, busy_timeout=0.05, retry=RetryPolicy(1, (0.1,)))
    spec = make_spec()
    locker = None

    def redetect(job):  # reading the acquisition again; meanwhile another process locks the database
        nonlocal locker
        locker = _lock_database(db)
        return spec

    worker = Worker(store, ScriptedImporter(), name="w", redetect=redetect, maintain_interval=3600)
    job, _ = store.enqueue(dataclasses.replace(spec, files=()))  # re-read from disk before the import
    result = {}
    thread = threading.Thread(target=lambda: result.update(job=worker.process(store.claim("w"))))
    thread.start()
    try:
        wait_until(lambda: "the job store failed" in caplog.text, timeout=30)
    finally:
        if locker is not None:
            _unlock(locker)
    thread.join(30)
    released = store.get(job.id)
    assert released.state == JobState.QUEUED and released.attempts == 0, released.history[-1]
    assert "attempt not counted" in store.read_log(job.id)
    assert "unexpected error" not in caplog.text
    store.close()


def test_cleanup_of_a_job_whose_folder_cannot_exist_is_done_silently(store, make_spec, tmp_path, caplog):
    # Issue 11 outside test F8: a job failed with ENAMETOOLONG (its folder was never created)
    # was "cleaned up" again at every worker start, each time with a WARNING.
    from watchfolder.job import Target

    archive = tmp_path / "archive"
    importer = ArchiveImporter(root=archive)
    job, _ = store.enqueue(make_spec(target=Target(project="P", dataset="é" * 200)))
    done = Worker(store, importer, name="w").loop()
    assert done.state == JobState.FAILED and "too long" in done.error.message.lower()
    (archive / "jdoe").mkdir(parents=True, exist_ok=True)
    (archive / "jdoe" / "_no_project").write_bytes(b"a file where a folder would be")  # ENOTDIR
    other, _ = store.enqueue(make_spec(target=Target(dataset="D")))
    store.claim("w0")
    store.cancel(other.id)
    store.cancelled(other.id, "w0")
    for start in range(3):  # each a fresh worker, as after a restart
        caplog.clear()
        Worker(store, importer, name=f"w{start}", maintain_interval=0).loop()
        assert "cleaning up after it failed" not in caplog.text
    assert "could not remove" not in store.read_log(job.id)
    assert "could not remove" not in store.read_log(other.id)
    assert importer.cleanup(done) == [] and importer.cleanup(store.get(other.id)) == []


def test_a_stalled_workers_cancelled_job_is_cancelled_when_its_lease_expires_and_cleaned_up(tmp_path, make_spec):
    # Issue 11 outside test F5: the job was queued again and claimed by another worker (an
    # attempt burnt) before it became cancelled; its files stayed until then.
    from watchfolder.store import SQLiteStore

    store = SQLiteStore(tmp_path / "stall.db", lease_seconds=30)
    archive = tmp_path / "archive"
    importer = ArchiveImporter(root=archive)
    job, _ = store.enqueue(make_spec())
    t0 = time.time()
    # A live process (this one) whose worker stopped renewing: the cancel is only a request.
    job = store.claim(f"{socket.gethostname()}:{os.getpid()}:stalled", now=t0)
    dest = importer.destination(job)
    dest.mkdir(parents=True)
    (dest / "img_1.tif").write_bytes(b"pixels-1" * 100)
    (dest / f".watchfolder-job-{job.id}.owned").write_text('"img_1.tif"\n')
    assert store.cancel(job.id, now=t0 + 5).state == JobState.RUNNING
    other = Worker(store, importer, name="other", maintain_interval=0)
    assert other.loop(now=t0 + 31) is None  # nothing to claim: the lease ran out into the cancel
    done = store.get(job.id)
    assert done.state == JobState.CANCELLED and done.attempts == 1
    assert "expired" in done.history[-1].message and "cancel request" in done.history[-1].message
    assert [p for p in archive.rglob("*") if p.is_file()] == []
    assert "removed 1 file(s)" in store.read_log(job.id)
    store.close()
