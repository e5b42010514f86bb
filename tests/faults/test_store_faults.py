"""The job database under faults: corrupt, full, deleted, and two watchers on one data dir (issue 11 cases 6-8)."""

from __future__ import annotations

import os
import socket
import sqlite3

import pytest
from drills import cli, fill, health, kill9, report, rows, start, stop, wait_for, write_config
from helpers import write_manifest

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
    assert "no space left on the disk holding the job database" in lines[0]
    assert "free space on that filesystem" in lines[0] and "start again" not in lines[0]
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


def _drop(drop, name: str) -> None:
    write_manifest(drop / name, {"img_1.tif": name.encode() * 1000, "img_2.tif": b"pixels" * 500},
                   target={"project": "Drills", "dataset": name})


def _succeeded(db) -> int:
    try:
        return rows(db, "SELECT count(*) AS n FROM jobs WHERE state = 'succeeded'")[0]["n"]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _tables(db) -> list:
    try:
        return rows(db, "SELECT name FROM sqlite_master")
    except sqlite3.DatabaseError:
        return []


def _start_run(tmp_path):
    """`watchfolder run` on a polled drop folder with the API on a free port: (drop, port,
    config, database path, log path, process)."""
    drop = tmp_path / "drop"
    drop.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = write_config(tmp_path, watch=[{"name": "drop", "path": str(drop), "quiet_period": 0.3,
                                            "poll_interval": 0.2, "mode": "polling"}],
                          server={"enabled": True, "listen": f"127.0.0.1:{port}"})
    db = tmp_path / "data" / "watchfolder.db"
    output = tmp_path / "run.log"
    return drop, port, config, db, output, start(config, "run", log=output)


def test_database_emptied_while_running_is_one_critical_line_and_refused_after(tmp_path):
    drop, port, config, db, output, proc = _start_run(tmp_path)
    try:
        for name in ("a1", "a2", "a3"):
            _drop(drop, name)
        wait_for(lambda: _succeeded(db) == 3 and len(list(drop.glob("*.watchfolder-receipt.json"))) == 3,
                 60, "three acquisitions imported")
        wait_for(lambda: health(port)[0] == 200, 30, "health ok")
        os.truncate(db, 0)  # `: > watchfolder.db` under the running service
        _drop(drop, "a4")

        def unhealthy():
            code, body = health(port)
            detail = (body.get("checks") or {}).get("store", {}).get("detail") or ""
            return code == 503 and f"the job database {db} is empty (0 bytes)" in detail

        wait_for(unhealthy, 30, "health 503 naming the broken database")
        wait_for(lambda: output.read_text().count("heartbeat failed") >= 2, 30, "the workers meet the broken store")
        assert db.stat().st_size == 0  # nothing created a new database in its place
    finally:
        stop(proc)
    text = output.read_text()
    critical = [line for line in text.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1, critical
    assert f"the job database {db} is empty (0 bytes)" in critical[0]
    assert "restore the database from the backup" in critical[0]
    assert "Traceback" not in text, text[-3000:]
    # At rest, every command refuses the file: emptied (like a missing one, as logs/ shows a database
    # existed) or, when the stopping process's last WAL checkpoint wrote pages into it, corrupt.
    for command in (("jobs", "list"), ("status",)):
        done = cli(config, *command)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert str(db) in lines[0] and ("is empty (0 bytes), but" in lines[0] or "corrupt" in lines[0])
        assert "backup" in lines[0]
    assert "jobs" not in {r["name"] for r in _tables(db)}  # no fresh database was made
    report("database emptied", critical_lines=len(critical), tracebacks=0, new_database="refused")


@pytest.mark.parametrize("suffix", ["-shm", "-wal"])
def test_wal_index_deleted_while_running_is_said_and_health_turns_503(tmp_path, suffix):
    # Second outside test of issue 11, F0 (high): `rm watchfolder.db-shm` under `run`, then
    # `submit`: "job N queued", exit 0, but the service never saw those jobs (the new -shm is
    # another wal-index) and health stayed ok. Now the service names the lost file at its
    # next health tick (one CRITICAL line), health turns 503 and it records nothing more.
    drop, port, config, db, output, proc = _start_run(tmp_path)
    try:
        _drop(drop, "a1")
        wait_for(lambda: _succeeded(db) == 1, 60, "the first acquisition imported")
        wait_for(lambda: health(port)[0] == 200, 30, "health ok")
        os.unlink(f"{db}{suffix}")

        def unhealthy():
            code, body = health(port)
            detail = (body.get("checks") or {}).get("store", {}).get("detail") or ""
            return code == 503 and f"lost its {suffix} file" in detail

        wait_for(unhealthy, 30, "health 503 naming the lost file")
    finally:
        stop(proc)
    critical = [line for line in output.read_text().splitlines() if "CRITICAL" in line]
    assert len(critical) == 1 and f"lost its {suffix} file" in critical[0], critical
    assert "Traceback" not in output.read_text()
    report(f"{suffix} deleted while running", critical_lines=len(critical), health=503)


def _owner_mails(outbox) -> list:
    """The outcome mails (the drills' owner has no address of their own: they go to the admin)."""
    return list(outbox.glob("*.eml"))


def test_a_restored_backup_honours_receipts_and_never_reuses_a_log(tmp_path):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = write_config(tmp_path, watch=[{"name": "drop", "path": str(drop), "quiet_period": 0.3,
                                            "poll_interval": 0.2, "mode": "polling"}])
    db = tmp_path / "data" / "watchfolder.db"
    logs = tmp_path / "data" / "logs"
    outbox = tmp_path / "data" / "outbox"
    output = tmp_path / "run.log"

    def run_until(names: list[str], done: int) -> None:
        proc = start(config, "run", log=output)
        try:
            for name in names:
                _drop(drop, name)
            wait_for(lambda: len(list(drop.glob("*.watchfolder-receipt.json"))) == done
                     and len(_owner_mails(outbox)) >= min(done, 5), 60, f"{done} acquisitions imported and mailed")
        finally:
            stop(proc)

    run_until(["a1", "a2"], 2)
    backup = tmp_path / "backup.db"  # the nightly backup (sqlite3 .backup)
    source, target = sqlite3.connect(db), sqlite3.connect(backup)
    source.backup(target)
    source.close()
    target.close()
    run_until(["a3", "a4"], 4)
    # The README's restore: stop, move the database and its -wal/-shm aside, put the backup in place.
    for suffix in ("", "-wal", "-shm"):
        db.with_name(db.name + suffix).unlink(missing_ok=True)
    backup.replace(db)
    run_until(["a5"], 5)
    jobs = rows(db, "SELECT id, json_extract(spec, '$.extra.acquisition') AS acq FROM jobs ORDER BY id")
    by_acq = {r["acq"]: r["id"] for r in jobs}
    # a3 and a4 have receipts: honoured, not imported again; a5 starts past the highest log (4.log).
    assert sorted(by_acq) == ["a1", "a2", "a5"], by_acq
    assert by_acq["a5"] == 5
    for job_id in (3, 4):
        text = (logs / f"{job_id}.log").read_text()
        assert text.count("attempt 1 of") == 1, text  # no other job appended to it
        assert "according to its receipt" in text and "not imported again" in text
    assert len(_owner_mails(outbox)) == 5  # each owner mailed once
    assert output.read_text().count("according to its receipt") == 2
    report("backup restored", jobs_after=len(jobs), reimported=0, owner_mails=5, shared_logs=0)
