"""CLI habits: --config after the command, --follow waiting for a job, a closed pipe, the banner, --json."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cli_support import SLIDE3, env
from helpers import wait_until


def sub(*args: str, cwd: Path, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "watchfolder", *args], capture_output=True, text=True, env=env(),
                          cwd=cwd, timeout=timeout, **kw)


def test_config_after_the_command_and_json(site_cfg, tmp_path):
    out = sub("submit", str(SLIDE3), "--config", str(site_cfg), "--json", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    job = json.loads(out.stdout)
    out = sub("jobs", "list", "--json", "-c", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert [j["id"] for j in json.loads(out.stdout)["jobs"]] == [job["id"]]
    out = sub("jobs", "cancel", str(job["id"]), "--json", "--config", str(site_cfg), cwd=tmp_path)
    assert json.loads(out.stdout)["state"] == "cancelled"
    out = sub("jobs", "retry", str(job["id"]), "--json", "--config", str(site_cfg), cwd=tmp_path)
    assert json.loads(out.stdout)["state"] == "queued"
    out = sub("mail", "list", "--json", "--config", str(site_cfg), cwd=tmp_path)
    assert [m["kind"] for m in json.loads(out.stdout)["mails"]] == ["job_cancelled"]
    out = sub("check-config", "--json", "--config", str(site_cfg), cwd=tmp_path)
    assert json.loads(out.stdout)["importer"]["kind"] == "archive"
    # Before the command still works, and the one after the command wins.
    other = tmp_path / "missing.yaml"
    out = sub("--config", str(other), "jobs", "list", "--config", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 0 and f"{job['id']:>6}  queued" in out.stdout, out.stderr


def test_closed_pipe_ends_quietly(site_cfg, tmp_path, site_store):
    from watchfolder.watch.acquisition import from_path

    # More output than a pipe holds (64 KiB): the writer must still be writing when the
    # reader goes away, whatever the timing (300 lines fitted, and sometimes all got out).
    spec = from_path(SLIDE3, source="cli:test")
    site_store.enqueue_many([(dataclasses.replace(spec, idempotency_key=f"k{i}"), "") for i in range(1000)])
    proc = subprocess.Popen([sys.executable, "-m", "watchfolder", "jobs", "list", "--limit", "1000",
                             "--config", str(site_cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env(), cwd=tmp_path)
    proc.stdout.readline()  # `| head -1`: read one line, then close the pipe
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr, stderr


def test_follow_waits_for_a_job_about_to_appear(site_cfg, tmp_path, site_store):
    proc = subprocess.Popen([sys.executable, "-m", "watchfolder", "jobs", "show", "1", "--follow",
                             "--config", str(site_cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env(), cwd=tmp_path)
    told = proc.stderr.readline()
    assert told.startswith("waiting for job 1 to appear"), told
    out = sub("submit", str(SLIDE3), "--config", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    work = sub("work", "--burst", "--config", str(site_cfg), cwd=tmp_path)
    assert work.returncode == 0, work.stderr
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert "job 1 succeeded" in stdout.splitlines()[-1]


def test_banner_names_the_real_executable_and_a_stopped_line_ends_the_run(site_cfg, tmp_path):
    script = Path(sys.executable).parent / "watchfolder"
    if not script.exists():
        pytest.skip("the watchfolder console script is not installed next to this Python")
    # `watch` prints the banner and runs no workers, so it starts fast.
    proc = subprocess.Popen([str(script), "watch", "--config", str(site_cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    wait_until(lambda: any("Stop with Ctrl-C" in line for line in lines), 30, message="the banner")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    reader.join(10)
    text = "".join(lines)
    assert f"{os.path.realpath(script)} --config {site_cfg.resolve()} jobs list" in text
    assert f"{os.path.realpath(script)} --config {site_cfg.resolve()} pending" in text
    assert lines[-1].strip().endswith("stopped"), lines[-3:]


@pytest.mark.parametrize("args, name", [
    (("jobs", "show", "9" * 20), "id"),
    (("jobs", "retry", "²"), "id"),
    (("jobs", "list", "--limit", "0"), "--limit"),
    (("jobs", "list", "--cursor", "9" * 20), "cursor"),
    (("mail", "list", "--limit", "9" * 20), "--limit"),
    (("pending", "--limit", "-1"), "--limit"),
    (("events", "list", "--after", "9" * 20), "--after"),
    (("events", "list", "--limit", "-5"), "--limit"),
    (("submit", str(SLIDE3), "--dataset-id", "9" * 20), "--dataset-id"),
])
def test_every_number_on_the_command_line_is_checked_before_the_store_sees_it(site_cfg, tmp_path, args, name):
    out = sub(*args, "-c", str(site_cfg), cwd=tmp_path)
    assert out.returncode in (1, 2), out
    assert "Traceback" not in out.stderr and name in out.stderr, out.stderr


def test_events_list_past_the_newest_event_says_the_store_changed(site_cfg, tmp_path, site_store):
    out = sub("submit", str(SLIDE3), "-c", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    newest = site_store.last_event_id()
    out = sub("events", "list", "--after", str(newest), "-c", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout == "", out
    out = sub("events", "list", "--after", str(newest + 1), "-c", str(site_cfg), cwd=tmp_path)
    assert out.returncode == 1 and "past the newest event id" in out.stderr and "--after 0" in out.stderr


def test_pending_names_the_known_watch_folders_and_job_id_zero_is_refused(tmp_path, make_config):
    """Finding 10: `pending --watch nosuch` and `jobs show 0 --follow` answer at once with what to do."""
    import subprocess
    import sys

    import yaml
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "importer": {"kind": "archive"},
                                   "watch": [{"name": "lsm980", "path": str(drop)}]}))

    def run(*args):
        return subprocess.run([sys.executable, "-m", "watchfolder", *args, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)
    out = run("pending", "--watch", "nosuch")
    assert out.returncode == 2 and "unknown watch folder 'nosuch'; known: lsm980" in out.stderr
    out = run("jobs", "show", "0", "--follow")
    assert out.returncode == 2 and "'0' is not an id from 1" in out.stderr


def test_pending_with_a_filter_that_matches_nothing_says_others_are_pending(tmp_path, make_config):
    """Outside test of issue 15: `pending --owner nobody` said "nothing pending: every acquisition
    the watchers know of is queued or done" while 11 entries waited; `--owner ""` was accepted."""
    import subprocess
    import sys
    import time

    import yaml

    from watchfolder.store import PendingEntry, SQLiteStore

    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data_dir": str(tmp_path / "data"), "importer": {"kind": "archive"},
                                   "watch": [{"name": "lsm980", "path": str(drop)}]}))
    (tmp_path / "data").mkdir()
    store = SQLiteStore(tmp_path / "data" / "watchfolder.db")
    now = time.time()
    store.pending_sync("lsm980", [PendingEntry(watch="lsm980", path="acq", kind="waiting", reason="waiting for b.tif",
                                               first_seen=now, last_change=now, owner="jdoe")], now=now)
    store.close()

    def run(*args):
        return subprocess.run([sys.executable, "-m", "watchfolder", *args, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60)
    out = run("pending", "--owner", "nobody")
    assert out.returncode == 0 and "nothing pending for owner 'nobody' (1 pending for other" in out.stdout, out
    out = run("pending", "--owner", "")
    assert out.returncode == 2 and "--owner is empty" in out.stderr, out
    out = run("pending", "--owner", "jdoe")
    assert "acq" in out.stdout and "waiting for b.tif" in out.stdout, out
