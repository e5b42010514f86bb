"""The job database under faults: corrupt, full, deleted, and two watchers on one data dir (issue 11 cases 6-8)."""

from __future__ import annotations

import sqlite3

import pytest
from drills import cli, fill, kill9, report, start, wait_for, write_config

from watchfolder.errors import StoreError
from watchfolder.store import SQLiteStore
from watchfolder.worker import Worker

COMMANDS = [
    ("jobs", "list"),
    ("jobs", "show", "1"),
    ("status",),
    ("mail", "list"),
    ("work", "--burst"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c))
def test_corrupt_database_is_one_line_naming_file_problem_and_fix(tmp_path, command):
    config = write_config(tmp_path)
    db = tmp_path / "data" / "watchfolder.db"
    db.parent.mkdir(parents=True)
    db.write_bytes(b"this is not a database, it was overwritten\n" * 200)
    done = cli(config, *command)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"watchfolder: error: job database {db}: the file is not an SQLite database")
    assert "restore the last backup" in lines[0]
    report(f"corrupt database: {' '.join(command)}", exit=done.returncode, lines=len(lines), traceback=0)


@pytest.mark.parametrize("command", COMMANDS[:3], ids=lambda c: " ".join(c))
def test_data_dir_full_at_start_is_one_line(tmp_path, tmpfs, command):
    volume = tmpfs("data-volume", 1024 * 1024)
    config = write_config(tmp_path, data_dir=str(volume / "data"))
    (volume / "data").mkdir()
    fill(volume)
    done = cli(config, *command)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert str(volume / "data") in lines[0]
    assert "full" in lines[0] or "no space left" in lines[0]
    assert "free space" in lines[0]
    report(f"data dir full: {' '.join(command)}", exit=done.returncode, lines=len(lines), traceback=0)


def test_a_write_failing_for_space_truncates_the_wal(tmp_path, tmpfs, make_spec):
    volume = tmpfs("db-volume", 2 * 1024 * 1024)
    store = SQLiteStore(volume / "watchfolder.db", logs_dir=tmp_path / "logs")
    filler = volume / "filler"
    filler.write_bytes(b"\0" * (1024 * 1024))
    big = {"annotations": {"note": "x" * 20000}}
    with pytest.raises(sqlite3.OperationalError, match="full"):
        for _ in range(1000):
            store.enqueue(make_spec(extra=big))
    wal = volume / "watchfolder.db-wal"
    assert wal.stat().st_size > 500_000  # the disk is full of WAL; no checkpoint can run yet
    filler.unlink()  # the admin frees space: the next maintain tick gives the WAL's space back
    store.maintain()
    assert wal.stat().st_size == 0, f"WAL kept {wal.stat().st_size} bytes"
    report("database disk full", wal_truncated="yes")
    for _ in range(5):
        store.enqueue(make_spec())
    store.close()


def test_database_deleted_while_running_is_noticed(tmp_path, make_spec, make_config, caplog):
    from watchfolder import status

    config = make_config()
    store = SQLiteStore(config.store.path, logs_dir=config.logs_dir)
    job, _ = store.enqueue(make_spec())
    store.log(job.id, "queued")
    for suffix in ("", "-wal", "-shm"):
        store.path.with_name(store.path.name + suffix).unlink(missing_ok=True)
    # The health tick notices: unhealthy, with what happened and what to do.
    ok, body = status.health(config, store)
    assert not ok
    assert f"the job database {store.path} was deleted while this process" in body["checks"]["store"]["detail"]
    assert "restore the database from the backup" in body["checks"]["store"]["detail"]
    assert "CRITICAL" in caplog.text
    # It stops claiming and records nothing more.
    worker = Worker(store, None, name="w")
    with pytest.raises(StoreError, match="was deleted"):
        worker.loop()
    with pytest.raises(StoreError, match="was deleted"):
        store.enqueue(make_spec())
    assert not store.path.exists()  # nothing recreated it
    # Another process (the CLI) refuses to start a new database where job ids would restart.
    with pytest.raises(StoreError, match="is missing, but .* holds logs of earlier jobs"):
        SQLiteStore(config.store.path, logs_dir=config.logs_dir)
    report("database deleted", health="unhealthy (503)", claims_after=0, new_database="refused")


def test_database_replaced_while_running_is_noticed(tmp_path, make_spec):
    store = SQLiteStore(tmp_path / "db" / "watchfolder.db")
    store.enqueue(make_spec())
    replacement = tmp_path / "db" / "restored.db"
    SQLiteStore(replacement).close()
    replacement.replace(store.path)
    assert store.ping() is False
    assert "was replaced by another file" in store.broken


def test_two_runs_on_one_data_dir(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = write_config(tmp_path, watch=[{"name": "drop", "path": str(drop), "quiet_period": 0.5}])
    lock = tmp_path / "data" / "watch.lock"
    first = start(config, "run", log=tmp_path / "first.log")
    try:
        wait_for(lambda: lock.exists() and f"pid {first.pid}" in lock.read_text(), 60, "the first run takes the lock")
        second = cli(config, "run", timeout=60)
        assert second.returncode == 1
        assert "Traceback" not in second.stderr
        assert f"data directory {tmp_path / 'data'} is already used by `watchfolder run` (pid {first.pid}" \
            in second.stderr
        assert "stop that one first, or give this one its own data_dir" in second.stderr
        watch = cli(config, "watch", timeout=60)
        assert watch.returncode == 1 and "is already used by" in watch.stderr
    finally:
        kill9(first)
    # The kernel released the lock with the killed process: no stale lock to clear.
    third = start(config, "watch", log=tmp_path / "third.log")
    try:
        wait_for(lambda: f"pid {third.pid}" in lock.read_text(), 60, "a new watch takes the lock")
    finally:
        kill9(third)
    report("two runs on one data dir", second_run_exit=second.returncode, lock_after_kill9="released")
