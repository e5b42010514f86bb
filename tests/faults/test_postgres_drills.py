"""Drills on PostgreSQL with real processes: workers killed with SIGKILL, the watcher
holding a drop folder killed, the database server restarted mid-run.

``make faults`` runs them at the issue's size (``WATCHFOLDER_FAULTS=1``: 3 ``work``
processes, 300 jobs, 20 SIGKILLs and a ``pg_ctl restart``; two ``watch``
processes, 100 drops). ``make test`` runs the same drills on a bounded slice.
They skip with the reason where no PostgreSQL server can run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import wait_until, write_manifest

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")

from watchfolder.store.postgres import PostgresStore  # noqa: E402

FULL = os.environ.get("WATCHFOLDER_FAULTS") == "1"
JOBS, KILLS, WORKERS = (300, 20, 3) if FULL else (24, 3, 3)
DROPS = 100 if FULL else 8
# Short, so the drill is quick, but well above the heartbeat (0.4 s) even on a loaded machine.
LEASE = 4.0


def _config(tmp_path: Path, url: str, **extra: str) -> Path:
    lines = [
        "data_dir: data",
        f"store: {{url: '{url}', lease_seconds: {LEASE}, logs_dir: shared/logs}}",
        "workers: {count: 2, poll_interval: 0.5, heartbeat_seconds: 0.4, shutdown_grace: 5}",
        "retry: {max_attempts: 50, backoff: [1]}",
        "importer: {kind: archive, archive: {root: shared/archive}}",
        "notify: {transport: folder, admin_email: admin@example.org, outbox_dir: shared/outbox}",
        "server: {enabled: false}",
        *extra.values(),
    ]
    path = tmp_path / "watchfolder.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _start(config: Path, *args: str) -> subprocess.Popen:
    """A ``watchfolder`` process; its log goes to ``<name>.log`` beside the config (a pipe nobody reads would fill)."""
    log = open(config.parent / f"{args[-1]}.log", "w", encoding="utf-8")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "watchfolder", "--config", str(config), *args],
        stdout=subprocess.DEVNULL, stderr=log, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")},
    )
    log.close()
    proc.log_path = Path(log.name)
    return proc


def _kill(proc: subprocess.Popen) -> float:
    """SIGKILL; returns when it was sent (the process was alive until then, at the latest)."""
    at = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    return at


def _running_on(store: PostgresStore, process: str, *, deadline: float) -> bool:
    """Whether ``process`` holds a running job within ``deadline`` seconds (polled)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        try:
            running = store.list_jobs(states=["running"], limit=100)[0]
        except Exception:  # the database may be restarting
            running = []
        if any((job.worker or "").startswith(process + ":") for job in running):
            return True
        time.sleep(0.01)
    return False


def _stop(procs) -> None:
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_workers_on_three_hosts_killed_and_the_database_restarted(pg_server, tmp_path, make_spec):
    """3 ``work`` processes (named as three hosts), SIGKILLs spread over them, ``pg_ctl restart``
    half-way: every job succeeds once, no two runs of a job overlap, one mail per job."""
    url = pg_server.create_database()
    config = _config(tmp_path, url)
    store = PostgresStore(url, logs_dir=tmp_path / "shared" / "logs")
    specs = [make_spec(files={f"img_{i}.tif": b"%06d" % i * 64}, email=f"user{i}@example.org")
             for i in range(JOBS)]
    store.enqueue_many([(spec, "") for spec in specs])
    incarnation = itertools.count(1)
    killed_at: dict[str, float] = {}  # process name -> when it was killed
    procs: dict[str, tuple[str, subprocess.Popen]] = {}

    def launch(host: str) -> None:
        name = f"{host}.{next(incarnation)}"  # a restarted process is a new incarnation
        procs[host] = (name, _start(config, "work", "--name", name))

    for host in ("host-a", "host-b", "host-c"):
        launch(host)
    restarted = False
    expiring = False  # a kill has landed on a process holding a running job
    try:
        for kill in range(KILLS):
            target = (kill + 1) * JOBS // (KILLS + 2)
            wait_until(lambda target=target: _try_counts(store).get("succeeded", 0) >= target, 120, interval=0.05,
                       message=f"{target} jobs done before kill {kill + 1}")
            host = ("host-a", "host-b", "host-c")[kill % WORKERS]
            name, proc = procs[host]
            if not expiring:  # until one kill has landed on a running job, aim at one (a loaded machine's
                # workers spend much of their time between jobs, and the drill must exercise an expiry)
                expiring = _running_on(store, name, deadline=10)
            killed_at[name] = _kill(proc)
            launch(host)
            if not restarted and kill + 1 >= KILLS // 2:
                pg_server.restart()  # every connection of every process is cut off
                restarted = True
        wait_until(lambda: _try_counts(store).get("succeeded") == JOBS, 240, interval=0.2,
                   message="every job to succeed")
        # Every process up (a SIGTERM during its start-up would kill it before its handlers exist).
        wait_until(lambda: {c["name"].rsplit(":", 1)[0] for c in store.components("worker")}
                   >= {name for name, _ in procs.values()}, 60, message="the last processes started")
    finally:
        _stop(p for _, p in procs.values())
    for name, proc in procs.values():
        assert proc.returncode == 0, f"{name} exited {proc.returncode}: {proc.log_path.read_text()[-2000:]}"

    assert store.counts()["succeeded"] == JOBS and store.counts()["running"] == 0
    mails: dict[int, int] = {}
    for m in store.outbox_list(limit=10_000):
        mails[m.job_id] = mails.get(m.job_id, 0) + 1
    expiries = 0
    for job in store.list_jobs(limit=10_000)[0]:
        full = store.get(job.id)
        assert [str(h.state) for h in full.history].count("succeeded") == 1
        # An attempt ends with the job finished, or with its lease expiring; an expiry
        # must come after its worker's process was killed: then no two runs overlapped.
        for entry in full.history:
            found = re.match(r"lease of (\S+):w\d+ expired", entry.message)
            if found:
                expiries += 1
                process = found.group(1)
                assert process in killed_at, f"job {job.id}: the lease of a live process expired: {entry}"
                assert killed_at[process] <= entry.at, f"job {job.id}: expired before its kill: {entry}"
        assert mails.get(job.id) == 1, f"job {job.id}: {mails.get(job.id)} mails"
    assert expiries >= 1  # the kills did land on running jobs
    archived = [p.parent for p in (tmp_path / "shared" / "archive").rglob("img_*.tif")]
    assert len(archived) == JOBS and len(set(archived)) == JOBS
    store.close()


def _try_counts(store) -> dict:
    try:
        return store.counts()
    except Exception:  # the server restarting
        return {}


def test_two_watchers_on_one_folder_the_holder_killed(pg_server, tmp_path):
    """Two ``watch`` processes on one drop folder; the holder is killed with SIGKILL: the other
    takes over, and every drop is imported once."""
    url = pg_server.create_database()
    drop = tmp_path / "drop"
    drop.mkdir()
    config = _config(tmp_path, url, watch=(
        f"watch: [{{name: drop, path: '{drop}', mode: polling, poll_interval: 0.2, quiet_period: 0.5}}]"))
    store = PostgresStore(url, logs_dir=tmp_path / "shared" / "logs")
    watchers = {name: _start(config, "watch", "--name", name) for name in ("watch-a", "watch-b")}
    worker = _start(config, "work", "--name", "importer")
    try:
        holder = wait_until(lambda: store.folder_holders(), 60, message="a watcher to hold the folder")[0]["holder"]
        standby = next(n for n in watchers if n != holder)
        for i in range(DROPS // 2):
            write_manifest(drop / f"before-{i}", {"img.tif": b"a%04d" % i})
        wait_until(lambda: store.counts()["succeeded"] >= DROPS // 4, 120, message="the first drops imported")
        _kill(watchers[holder])
        for i in range(DROPS - DROPS // 2):
            write_manifest(drop / f"after-{i}", {"img.tif": b"b%04d" % i})
        wait_until(lambda: [h["holder"] for h in store.folder_holders()] == [standby], 60,
                   message="the standby watcher to take over")
        wait_until(lambda: store.counts()["succeeded"] == DROPS, 180, interval=0.2,
                   message="every drop imported")
        status = json.loads(subprocess.run(
            [sys.executable, "-m", "watchfolder", "--config", str(config), "status", "--json"],
            capture_output=True, text=True, timeout=60,
        ).stdout)
        (folder,) = status["folders"]
        assert folder["holder"] == standby and not folder["expired"]
        assert {h["host"] for h in status["hosts"]} and any(h["folders"] == ["drop"] for h in status["hosts"])
    finally:
        _stop([*watchers.values(), worker])
    jobs, _ = store.list_jobs(limit=10_000)
    roots = [j.spec.root for j in jobs]
    assert len(roots) == DROPS and len(set(roots)) == DROPS  # each drop queued once
    assert all(j.state == "succeeded" for j in jobs)
    store.close()
