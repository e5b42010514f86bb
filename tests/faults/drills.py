"""Helpers of the fault drills: real `watchfolder` processes on loopback and temp dirs, killed, stopped,
starved of disk and mail server, and the invariants every drill must keep.

``make test`` runs a bounded slice (small counts); ``make faults`` runs the counts of
issue 11 (``WATCHFOLDER_FAULTS=full``). Each drill prints one line of counts.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import yaml
from helpers import wait_until

FULL = os.environ.get("WATCHFOLDER_FAULTS") in ("1", "full")  # `make faults` sets 1


def scale(slice_value: int, full_value: int) -> int:
    """The drill's count: a slice in `make test`, the issue's count in `make faults`."""
    return full_value if FULL else slice_value


def report(drill: str, **counts) -> None:
    """One line per drill, collected by `make faults` (and shown with -s)."""
    line = f"DRILL {drill}: " + ", ".join(f"{k}={v}" for k, v in counts.items())
    print(line)
    out = os.environ.get("WATCHFOLDER_FAULTS_REPORT")
    if out:
        with open(out, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def write_config(tmp_path: Path, **sections) -> Path:
    """A config for drills: fast clocks, archive importer, folder mail; sections override."""
    data = tmp_path / "data"
    raw = {
        "data_dir": str(data),
        "store": {"lease_seconds": 2, "busy_timeout": 30},
        "workers": {"count": 2, "poll_interval": 0.05, "heartbeat_seconds": 0.3, "shutdown_grace": 5},
        "retry": {"max_attempts": 5, "backoff": [0.2]},
        "importer": {"kind": "archive", "archive": {"root": str(tmp_path / "archive")}},
        # A mail claimed by a killed sender is sent again after the hold: seconds here, not 5 min.
        "notify": {"transport": "folder", "admin_email": "admin@example.org", "claim_hold": 3},
        "server": {"enabled": False},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    path = tmp_path / "watchfolder.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(config: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watchfolder", "--config", str(config), *args],
                          capture_output=True, text=True, timeout=timeout)


def start(config: Path, *args: str, log: Path | None = None) -> subprocess.Popen:
    """A long-running command (`work`, `run`, `watch`) as a real process; output to ``log``."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "watchfolder", "--config", str(config), *args],
                                stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        if log:
            out.close()


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)


def stop(proc: subprocess.Popen, timeout: float = 60) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill9(proc)


def rows(db: Path, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
    conn = sqlite3.connect(db, timeout=30)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def health(port: int) -> tuple[int, dict]:
    """``GET /api/v1/health`` of a service on ``port``: (status, body); (0, {}) when nothing answers."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/health", timeout=5) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as exc:
        return exc.code, json.load(exc)
    except OSError:
        return 0, {}


def wait_for(predicate, timeout: float, message: str, interval: float = 0.1):
    """helpers.wait_until with the drills' argument order."""
    return wait_until(predicate, timeout=timeout, interval=interval, message=message)


def assert_invariants(tmp_path: Path, *, expected_jobs: int, mail_dir: Path | None = None,
                      allow_failed: bool = False) -> dict:
    """What every drill must keep; returns the counts for the report.

    - every job finished: succeeded exactly once, or failed/cancelled with a reason;
    - each archived file once, inside its job's destination folder, with the source's checksum;
    - no ``.part`` file anywhere in the archive;
    - one owner mail per finished job (outbox rows and, with the folder transport, .eml files).
    """
    db = tmp_path / "data" / "watchfolder.db"
    archive = tmp_path / "archive"
    jobs = rows(db, "SELECT * FROM jobs ORDER BY id")
    assert len(jobs) == expected_jobs, f"{len(jobs)} jobs, expected {expected_jobs}"
    states = {}
    for job in jobs:
        states[job["state"]] = states.get(job["state"], 0) + 1
        assert job["state"] in ("succeeded", "failed", "cancelled"), f"job {job['id']} is {job['state']}"
        if job["state"] != "succeeded":
            assert allow_failed and job["error_message"], f"job {job['id']} {job['state']} without a reason"
    destinations = {}
    for job in jobs:
        if job["state"] == "succeeded":
            result = json.loads(job["result"])
            dest = Path(result["destination"])
            assert dest.is_relative_to(archive)
            assert dest not in destinations, f"jobs {destinations.get(dest)} and {job['id']} share {dest}"
            destinations[dest] = job["id"]
            for entry in result["files"]:
                assert (dest / entry["path"]).resolve().is_relative_to(dest.resolve())
    archived = [p for p in archive.rglob("*") if p.is_file()] if archive.exists() else []
    parts = [p for p in archived if p.name.endswith(".part")]
    assert parts == [], f"{len(parts)} .part files left: {parts[:3]}"
    outside = [p for p in archived if not any(p.is_relative_to(d) for d in destinations)]
    assert outside == [], f"files outside any succeeded job's folder: {outside[:5]}"
    expected_files = sum(len(json.loads(j["result"])["files"]) for j in jobs if j["state"] == "succeeded")
    assert len(archived) == expected_files, f"{len(archived)} archived files, expected {expected_files}"
    owner_mails = rows(db, "SELECT job_id, count(*) AS n FROM outbox WHERE kind LIKE 'job_%' GROUP BY job_id")
    per_job = {r["job_id"]: r["n"] for r in owner_mails}
    assert all(per_job.get(j["id"]) == 1 for j in jobs), \
        f"owner mails per job: {[(j['id'], per_job.get(j['id'])) for j in jobs if per_job.get(j['id']) != 1][:5]}"
    sent = rows(db, "SELECT count(*) AS n FROM outbox WHERE kind LIKE 'job_%' AND state = 'sent'")[0]["n"]
    if mail_dir is not None:
        # The folder transport writes one file per mail (a resend replaces its file).
        all_sent = rows(db, "SELECT count(*) AS n FROM outbox WHERE state = 'sent'")[0]["n"]
        assert len(list(mail_dir.glob("*.eml"))) == all_sent
        assert list(mail_dir.glob(".*.tmp")) == []
    duplicated = len(archived) - len({p.relative_to(archive) for p in archived})
    return {"jobs": len(jobs), **states, "lost": 0, "duplicated": duplicated, "mails": sent}


def spec_for(folder: Path):
    """The JobSpec of an acquisition folder (every file but the manifest, with size and SHA-256)."""
    import hashlib

    from watchfolder.job import FileEntry, JobSpec, Target

    entries = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != "watchfolder.json"):
        data = path.read_bytes()
        entries.append(FileEntry(str(path.relative_to(folder)), len(data), hashlib.sha256(data).hexdigest()))
    return JobSpec(owner="jdoe", root=str(folder), files=tuple(entries), email="jdoe@example.org",
                   target=Target(project="Drills", dataset=folder.name), source="cli:drill")


def fill(folder: Path) -> Path:
    """Fill the filesystem holding ``folder`` to the last byte; returns the filler file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler
