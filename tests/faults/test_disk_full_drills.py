"""Disk full under a running service: the data directory, the archive volume (issue 11 follow-up C, D).

What `status`, `/api/v1/health`, the job logs, the mails and the service log say
while full and after space is freed: each names the file or volume, the problem
(no space left) and the fix, once; health is 503 with that reason while the data
directory is full and recovers by itself; no job loses an attempt, none is lost.
"""

from __future__ import annotations

import email
import os
import socket
import sqlite3
from pathlib import Path

import yaml
from drills import cli, fill, health, kill9, report, rows, start, stop, wait_for, write_config
from helpers import write_manifest


def _port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _drop(drop: Path, name: str, size: int) -> None:
    write_manifest(drop / name, {"img.tif": os.urandom(size)}, target={"project": "Drills", "dataset": name})


def _jobs(db: Path) -> list[sqlite3.Row]:
    try:
        return rows(db, "SELECT id, state, attempts FROM jobs ORDER BY id")
    except sqlite3.OperationalError:  # not created yet
        return []


def _status(config: Path) -> tuple[int, dict]:
    done = cli(config, "status")
    assert "Traceback" not in done.stderr, done.stderr
    return done.returncode, yaml.safe_load(done.stdout) or {}


def _service(tmp_path: Path, **sections) -> tuple[Path, Path, int]:
    drop = tmp_path / "drop"
    drop.mkdir()
    port = _port()
    config = write_config(tmp_path, watch=[{"name": "drop", "path": str(drop), "quiet_period": 0.3,
                                            "poll_interval": 0.2, "mode": "polling"}],
                          server={"enabled": True, "listen": f"127.0.0.1:{port}"}, **sections)
    return config, drop, port


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line or " CRITICAL " in line]


def test_data_dir_full_while_running(tmp_path, tmpfs):
    volume = tmpfs("data-volume", 3 * 1024 * 1024)
    data = volume / "data"
    config, drop, port = _service(tmp_path, data_dir=str(data))
    db = data / "watchfolder.db"
    output = tmp_path / "run.log"
    proc = start(config, "run", log=output)
    try:
        _drop(drop, "a1", 2000)
        wait_for(lambda: [j["state"] for j in _jobs(db)] == ["succeeded"], 60, "the first job imported")
        wait_for(lambda: health(port)[0] == 200, 30, "health ok")
        filler = fill(volume)
        for name in ("a2", "a3", "a4"):
            _drop(drop, name, 2000)

        def full_said():
            code, body = health(port)
            detail = (body.get("checks") or {}).get("store", {}).get("detail") or ""
            return code == 503 and detail.startswith(f"job database {db}: no space left on the disk holding it")

        wait_for(full_said, 60, "health 503 naming the full data disk")
        wait_for(lambda: "no space left on the disk holding it" in output.read_text(), 60, "the service log says it")
        detail = health(port)[1]["checks"]["store"]["detail"]
        assert f"({data}, " in detail and "free space on that filesystem" in detail
        assert "carries on by itself" in detail
        code, status = _status(config)
        assert code == 1 and status["problems"][0].startswith(detail.split(" free)")[0].rsplit(",", 1)[0])
        listed = cli(config, "jobs", "list")  # reads still work
        assert listed.returncode == 0 and "Traceback" not in listed.stderr

        filler.unlink()  # the admin frees space: everything carries on by itself
        wait_for(lambda: health(port)[0] == 200, 60, "health recovers by itself")
        wait_for(lambda: [j["state"] for j in _jobs(db)] == ["succeeded"] * 4, 60, "every job imported")
        code, status = _status(config)
        assert code == 0 and status["problems"] == [], status["problems"]
        assert all(w["problem"] is None for w in status["watchers"])
        wait_for(lambda: len(list((data / "outbox").glob("*.eml"))) == 4, 60, "one mail per job")
    finally:
        stop(proc)
    text = output.read_text()
    assert "Traceback" not in text, text[-3000:]
    warnings = _warnings(text)
    full = [line for line in warnings if "full" in line or "no space" in line]
    said = [line for line in full if " watchfolder.store.sqlite: " in line]
    # Said once by the store; the mail sender, when a mail file met the full disk first, once too.
    assert len(said) == 1, "\n".join(warnings)
    assert f"job database {db}: no space left on the disk holding it" in said[0]
    mails = [line for line in full if " watchfolder.mail.outbox: " in line]
    assert len(mails) <= 1 and len(full) == len(said) + len(mails), "\n".join(warnings)
    assert all("no space left on the device; free space there (notify.outbox_dir)" in line for line in mails)
    assert "space is back" in text
    assert all(j["attempts"] == 1 for j in _jobs(db))  # no attempt burnt, none lost
    for log in (data / "logs").glob("*.log"):
        assert "failed" not in log.read_text(), log.read_text()
    report("data dir full while running", jobs=4, succeeded=4, warnings=len(said), mail_warnings=len(mails),
           health_503="yes",
           recovered="yes", tracebacks=0)


def test_status_on_a_full_data_disk_with_a_dead_workers_row(tmp_path, tmpfs):
    # Forgetting the dead worker is a write the full disk refuses: `status` used to end on
    # that one error (and a warning saying the service waits) instead of showing the status.
    volume = tmpfs("data-volume", 2 * 1024 * 1024)
    config = write_config(tmp_path, data_dir=str(volume / "data"))
    worker = start(config, "work")
    db = volume / "data" / "watchfolder.db"
    wait_for(lambda: db.exists() and rows(db, "SELECT count(*) AS n FROM components WHERE kind = 'worker'")[0]["n"],
             30, "the worker's row")
    kill9(worker)
    fill(volume)
    done = cli(config, "status")
    assert done.returncode == 1 and done.stderr == "", done.stderr
    problems = yaml.safe_load(done.stdout)["problems"]
    assert problems[0].startswith(f"job database {db}: no space left on the disk holding it ({volume / 'data'}, ")
    report("status on a full data disk", exit=done.returncode, stderr_lines=0)


def test_archive_volume_full_while_running(tmp_path, tmpfs):
    volume = tmpfs("archive-volume", 3 * 1024 * 1024)
    root = volume / "archive"
    # min_free_bytes 0: nothing holds the target before the volume is full (follow-up D).
    config, drop, port = _service(
        tmp_path,
        importer={"kind": "archive", "archive": {"root": str(root), "min_free_bytes": 0},
                  "pause": {"probe_interval": 0.5, "alert_after": 1}},
    )
    db = tmp_path / "data" / "watchfolder.db"
    output = tmp_path / "run.log"
    proc = start(config, "run", log=output)
    try:
        _drop(drop, "a1", 2000)
        wait_for(lambda: [j["state"] for j in _jobs(db)] == ["succeeded"], 60, "the first job imported")
        filler = fill(volume)
        for name in ("a2", "a3", "a4"):
            _drop(drop, name, 200_000)

        def paused():
            targets = ((_status(config)[1].get("importer") or {}).get("targets")) or []
            return targets and targets[0]["paused"] and targets[0]["need_bytes"] == 200_000 and targets[0]

        target = wait_for(paused, 60, "the archive target paused for space")
        assert target["reason"].startswith(f"no space left for the job on the archive volume ({root}): 0 B free")
        assert target["reason"].endswith("; free space there")
        code, status = _status(config)
        assert code == 1 and any(p.startswith("importer target archive:") and "no space left" in p
                                 for p in status["problems"])
        assert health(port)[0] == 200  # the service itself is fine: the jobs wait, queued
        wait_for(lambda: len(_admin_mails(tmp_path, "paused")) == 1, 60, "the admin told once")
        filler.unlink()
        wait_for(lambda: [j["state"] for j in _jobs(db)] == ["succeeded"] * 4, 60, "every job imported")
        wait_for(lambda: len(_admin_mails(tmp_path, "resumed")) == 1, 60, "the admin told it resumed")
    finally:
        stop(proc)
    text = output.read_text()
    assert "Traceback" not in text, text[-3000:]
    warnings = _warnings(text)
    assert len(warnings) == 2 and "watching" in warnings[0] and "paused: no space left" in warnings[1], warnings
    assert "resumed after" in text
    assert all(j["attempts"] == 1 for j in _jobs(db))  # the full volume burnt no attempt
    logs = "".join((tmp_path / "data" / "logs" / f"{j['id']}.log").read_text() for j in _jobs(db)[1:])
    assert "attempt not counted" in logs and "failed" not in logs
    report("archive volume full while running", jobs=4, succeeded=4, attempts_burnt=0, admin_mails=2,
           tracebacks=0)


def _admin_mails(tmp_path: Path, word: str) -> list[str]:
    subjects = []
    for path in (tmp_path / "data" / "outbox").glob("*.eml"):
        subject = email.message_from_bytes(path.read_bytes())["Subject"] or ""
        if subject.startswith("[watchfolder] Imports to archive:") and subject.endswith(word):
            subjects.append(subject)
    return subjects


def test_a_mail_folder_on_a_full_disk_says_so_not_permissions(tmpfs):
    from watchfolder.mail.message import MailError
    from watchfolder.mail.transports import FolderTransport

    volume = tmpfs("mail-volume", 256 * 1024)
    fill(volume)
    transport = FolderTransport(volume)
    raw = b"Message-ID: <1@x>\r\nDate: Tue, 01 Dec 2026 10:00:00 +0000\r\nSubject: s\r\n\r\n" + b"x" * 65536
    try:
        transport.send(raw, "wf@example.org", ("admin@example.org",))
    except MailError as exc:
        failure = exc
    else:
        raise AssertionError("a mail was written to a full disk")
    assert not failure.permanent
    assert str(failure).startswith(f"cannot write mail to {volume / transport.file_name(raw)}: no space left on the "
                                   "device; free space there (notify.outbox_dir); the mail waits in the outbox")
    assert "writable" not in str(failure)
    assert list(volume.glob(".*.eml.tmp")) == []


def test_a_command_started_on_a_full_disk_beside_a_cleanly_stopped_database(tmp_path, tmpfs):
    # Issue 11 outside test F4: with no -shm left by a clean stop, SQLite cannot size a new
    # one on the full disk and answers SQLITE_IOERR: every command said "an I/O error on the
    # job database (failing disk, or a network filesystem ...)" and none could read.
    volume = tmpfs("data-volume", 2 * 1024 * 1024)
    data = volume / "data"
    config = write_config(tmp_path, data_dir=str(data))
    db = data / "watchfolder.db"
    acq = tmp_path / "acq"
    write_manifest(acq, {"img.tif": b"pixels" * 100}, target={"project": "Drills", "dataset": "full"})
    assert cli(config, "submit", str(acq)).returncode == 0  # creates it, and closes it cleanly
    assert db.exists() and not Path(f"{db}-shm").exists() and not Path(f"{db}-wal").exists()
    filler = fill(volume)
    no_space = "no space left on the disk holding the job database"
    # Reads go on (read-only, without the -shm the full disk cannot hold).
    listed = cli(config, "jobs", "list")
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr
    assert "queued" in listed.stdout and "dataset \"full\"" in listed.stdout, listed.stdout
    shown = cli(config, "jobs", "show", "1")
    assert shown.returncode == 0 and "queued" in shown.stdout, shown.stderr
    code, status = _status(config)
    assert code == 1 and status["problems"][0].startswith(f"job database {db}: no space left on the disk holding it")
    # Writes and the service: the one line saying no space, never "failing disk".
    for command in (("jobs", "cancel", "1"), ("work", "--burst")):
        done = cli(config, *command)
        text = done.stderr + done.stdout
        assert done.returncode != 0 and "Traceback" not in text, text
        assert no_space in text and "failing disk" not in text and "I/O error on the job" not in text, text
    filler.unlink()  # space is back: the database is whole, the job untouched, writes go on
    assert [(j["state"], j["attempts"]) for j in _jobs(db)] == [("queued", 0)]
    assert cli(config, "work", "--burst").returncode == 0
    assert [j["state"] for j in _jobs(db)] == ["succeeded"]
    report("command started on a full disk, database cleanly stopped", reads="go on", writes="no space line")
