"""kill -9 loops of `work` and `run`, a SIGSTOPped worker, and SMTP down longer than the retry budget.

Counts: `make test` runs a slice; `make faults` the counts of issue 11 (200 jobs / 20 kills of
`work`, 100 drops / 35 kills of `run`).
"""

from __future__ import annotations

import random
import signal
import socket
import time
from pathlib import Path

import pytest
from drills import (
    assert_invariants,
    cli,
    kill9,
    report,
    rows,
    scale,
    spec_for,
    start,
    stop,
    wait_for,
    write_config,
)
from helpers import write_manifest
from mailserver import EphemeralController, Recorder

from watchfolder import config as configmod
from watchfolder.mail.notify import Notifier
from watchfolder.service import open_store

pytestmark = pytest.mark.slow


def _acquisitions(tmp_path: Path, count: int, rng: random.Random) -> list[Path]:
    folders = []
    for i in range(count):
        files = {f"tile_{k}.tif": rng.randbytes(rng.choice((4096, 65536, 262144, 1048576))) for k in range(3)}
        folders.append(write_manifest(tmp_path / "acq" / f"acq-{i:03d}", files).parent)
    return folders


def _enqueue(config_path: Path, folders: list[Path]) -> None:
    config = configmod.load(config_path, environ={})
    store = open_store(config, Notifier(config))
    for folder in folders:
        store.enqueue(spec_for(folder))
    store.close()


def _finished(db: Path) -> int:
    return rows(db, "SELECT count(*) AS n FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled')")[0]["n"]


def _drain(config: Path, db: Path, expected: int, timeout: float) -> None:
    """`work --burst` until every job has finished (leases of killed workers expire first)."""
    deadline = time.monotonic() + timeout
    while _finished(db) < expected or rows(db, "SELECT count(*) AS n FROM outbox WHERE state != 'sent'")[0]["n"]:
        assert time.monotonic() < deadline, f"{_finished(db)} of {expected} jobs finished after {timeout} s"
        done = cli(config, "work", "--burst", timeout=timeout)
        assert done.returncode == 0, done.stderr[-2000:]
        time.sleep(0.5)  # a lease of a killed worker (2 s) has to run out


def test_kill9_loop_of_work(tmp_path):
    jobs, kills = scale(16, 200), scale(4, 20)
    rng = random.Random(11)
    config = write_config(tmp_path)
    db = tmp_path / "data" / "watchfolder.db"
    folders = _acquisitions(tmp_path, jobs, rng)
    _enqueue(config, folders)
    killed_mid_job = 0
    for _ in range(kills):
        proc = start(config, "work", log=tmp_path / "work.log")
        # Kill once this process is inside a job (or has finished everything).
        wait_for(lambda p=proc: rows(db, "SELECT count(*) AS n FROM jobs WHERE state = 'running' AND worker LIKE ?",
                                     (f"%:{p.pid}:%",))[0]["n"] or _finished(db) == jobs, 120, "the worker claims")
        time.sleep(rng.uniform(0.0, 0.4))
        killed_mid_job += rows(db, "SELECT count(*) AS n FROM jobs WHERE state = 'running' AND worker LIKE ?",
                               (f"%:{proc.pid}:%",))[0]["n"]
        kill9(proc)
    _drain(config, db, jobs, timeout=600)
    counts = assert_invariants(tmp_path, expected_jobs=jobs, mail_dir=tmp_path / "data" / "outbox")
    assert counts.get("succeeded") == jobs
    retried = rows(db, "SELECT count(*) AS n FROM jobs WHERE attempts > 1")[0]["n"]
    status = cli(config, "status")
    assert status.returncode == 0, status.stdout  # the killed workers' rows were pruned (their pids are gone)
    report("kill -9 work", kills=kills, killed_mid_job=killed_mid_job, retried=retried, **counts, health="ok")


def test_kill9_loop_of_run(tmp_path):
    drops, kills = scale(10, 100), scale(4, 35)
    rng = random.Random(35)
    drop = tmp_path / "drop"
    drop.mkdir()
    config = write_config(tmp_path, watch=[{"name": "drop", "path": str(drop), "quiet_period": 0.3,
                                            "poll_interval": 0.2, "mode": "polling"}])
    db = tmp_path / "data" / "watchfolder.db"
    per_round = max(1, drops // (kills + 1))
    written = 0
    lock = tmp_path / "data" / "watch.lock"
    for i in range(kills + 1):
        proc = start(config, "run", log=tmp_path / "run.log")
        wait_for(lambda p=proc: lock.exists() and f"pid {p.pid}" in lock.read_text(), 120, "run takes the lock")
        batch = per_round if i < kills else drops - written
        for _ in range(batch):
            write_manifest(drop / f"acq-{written:03d}", {f"img_{k}.tif": rng.randbytes(65536) for k in range(2)},
                           target={"project": "Drills", "dataset": f"acq-{written:03d}"})
            written += 1
        if i == kills:
            break
        time.sleep(rng.uniform(0.2, 1.5))  # kill at a random point: detecting, copying, mailing, moving
        kill9(proc)
    try:
        wait_for(lambda: _finished(db) == drops and not rows(
            db, "SELECT count(*) AS n FROM outbox WHERE state != 'sent'")[0]["n"] and not rows(
            db, "SELECT count(*) AS n FROM jobs WHERE followup = 'pending'")[0]["n"], 600,
            f"all {drops} drops imported and mailed")
    finally:
        stop(proc)
    counts = assert_invariants(tmp_path, expected_jobs=drops, mail_dir=tmp_path / "data" / "outbox")
    assert counts.get("succeeded") == drops
    receipts = list(drop.glob("*.watchfolder-receipt.json"))
    assert len(receipts) == drops
    status = cli(config, "status")
    assert status.returncode == 0, status.stdout
    report("kill -9 run", drops=drops, kills=kills, **counts, receipts=len(receipts), health="ok")


def test_sigstopped_worker_is_taken_over_cleanly(tmp_path):
    config = write_config(tmp_path, workers={"count": 1})
    db = tmp_path / "data" / "watchfolder.db"
    rng = random.Random(5)
    folder = write_manifest(tmp_path / "acq" / "big", {"stack.tif": rng.randbytes(48 * 1024 * 1024)}).parent
    _enqueue(config, [folder])
    first = start(config, "work", log=tmp_path / "first.log")
    wait_for(lambda: rows(db, "SELECT count(*) AS n FROM jobs WHERE state = 'running'")[0]["n"], 120, "claimed")
    first.send_signal(signal.SIGSTOP)
    second = start(config, "work", log=tmp_path / "second.log")
    try:
        wait_for(lambda: _finished(db) == 1, 300, "the second worker takes the job over and finishes it")
    finally:
        first.send_signal(signal.SIGCONT)
    stop(second)
    stop(first)
    _drain(config, db, 1, timeout=120)
    counts = assert_invariants(tmp_path, expected_jobs=1, mail_dir=tmp_path / "data" / "outbox")
    job = rows(db, "SELECT * FROM jobs")[0]
    assert job["state"] == "succeeded" and job["attempts"] == 2
    status = cli(config, "status")
    assert status.returncode == 0, status.stdout + status.stderr  # both stopped cleanly: health ok
    report("SIGSTOP work", takeovers=1, **counts, health="ok")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_smtp_down_longer_than_the_retry_budget_then_up(tmp_path):
    jobs = scale(8, 20)
    port = _free_port()
    config = write_config(tmp_path, notify={
        "transport": "smtp", "admin_email": "admin@example.org",
        "smtp": {"host": "127.0.0.1", "port": port, "timeout": 2},
        "retry": {"max_attempts": 3, "backoff": [0.2, 0.5]}, "claim_hold": 10,
    })
    db = tmp_path / "data" / "watchfolder.db"
    folders = _acquisitions(tmp_path, jobs, random.Random(3))
    _enqueue(config, folders)
    proc = start(config, "work", log=tmp_path / "work.log")
    try:
        # Beyond the retry budget: every owner mail failed more than max_attempts times and is still pending.
        wait_for(lambda: rows(db, "SELECT count(*) AS n FROM outbox WHERE attempts > 4 AND state = 'pending'")
                 [0]["n"] == jobs, 300, "every mail retried past max_attempts")
        assert rows(db, "SELECT count(*) AS n FROM outbox WHERE state = 'failed'")[0]["n"] == 0
        status = cli(config, "status")
        assert status.returncode == 1 and "still undelivered after 3 attempts or more" in status.stdout
        recorder = Recorder()
        server = EphemeralController(recorder, port=port)
        server.start()
        try:
            received = recorder.wait_for(jobs, timeout=120)
            wait_for(lambda: rows(db, "SELECT count(*) AS n FROM outbox WHERE state != 'sent'")[0]["n"] == 0,
                     60, "every mail marked sent")
        finally:
            server.stop()
    finally:
        stop(proc)
    ids = [r.message["Message-ID"] for r in received]
    assert len(ids) == len(set(ids)) == jobs  # each mail delivered once
    counts = assert_invariants(tmp_path, expected_jobs=jobs)
    attempts = rows(db, "SELECT max(attempts) AS n FROM outbox")[0]["n"]
    report("SMTP outage", **counts, delivered=len(ids), max_attempts_used=attempts)
