"""Field drops: real acquisitions written into a real drop folder, seen by the real watcher
(inotify or polling), imported by real workers into a real archive, mailed to a folder outbox.

Each test here is one case of issue 12 (or a further case of the same kind): it drops
files the way instruments and people do (write, copy, move in, rename, link) and then
reads what a user or an admin would read: the jobs, the archive, the mails, the status.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers import wait_until

from watchfolder.job import Job, JobState
from watchfolder.service import Parts, Service

MODES = ["events", "polling"]
QUIET = 0.3


class Field:
    """One service (watcher + workers + mail outbox folder) on a drop folder under tmp_path."""

    def __init__(self, tmp_path: Path, make_config: Callable[..., Any]):
        self.tmp_path = tmp_path
        self.make_config = make_config
        self.drop = tmp_path / "drop"
        self.drop.mkdir()
        self.archive = tmp_path / "archive"
        self.outbox = tmp_path / "outbox"
        self.service: Service | None = None

    def start(self, mode: str = "events", *, importer: dict | None = None, others: list[dict] | None = None,
              **watch: Any) -> Service:
        """Start the service on the drop folder (watch[0]); ``others``: more watch folders."""
        entry = {
            "name": "scope", "path": str(self.drop), "mode": mode, "quiet_period": QUIET,
            "poll_interval": 0.1, "missing_timeout": 600,
        }
        entry.update(watch)
        cfg = self.make_config(
            watch=[entry, *(others or [])],
            importer={"kind": "archive", "archive": {"root": str(self.archive)}, **(importer or {})},
            workers={"count": 2, "poll_interval": 0.05},
            notify={"transport": "folder", "outbox_dir": str(self.outbox), "admin_email": "admin@example.org",
                    "default_domain": "example.org"},
        )
        self.service = Service(cfg, Parts(server=False))
        self.service.start()
        wait_until(lambda: self.watcher_status().get("health") == "ok", 10, message="watcher healthy")
        return self.service

    def stop(self) -> None:
        if self.service is not None:
            self.service.stop()
            self.service = None

    # -- what a user or admin reads ---------------------------------------------------

    @property
    def store(self):
        return self.service.store

    def jobs(self, **kw: Any) -> list[Job]:
        jobs, _ = self.store.list_jobs(limit=10_000, **kw)
        return sorted(jobs, key=lambda j: j.id)

    def settled(self, count: int, timeout: float = 20.0) -> list[Job]:
        """Wait until ``count`` jobs exist and all are finished; return them (oldest first)."""

        def done():
            jobs = self.jobs()
            return jobs if len(jobs) >= count and all(j.state.finished for j in jobs) else None

        jobs = wait_until(done, timeout, interval=0.05, message=f"{count} finished job(s)")
        return jobs

    def quiet_for(self, seconds: float) -> None:
        """Let the service run ``seconds`` more (several quiet periods and polls) before a negative check.

        Waiting for something *not* to happen has no event to wait on; this is the one place it sleeps.
        """
        time.sleep(seconds)

    def watcher_status(self) -> dict[str, Any]:
        if not self.service or not self.service.watch:
            return {}
        return self.service.watch.watchers[0].status()

    def pending(self) -> list[dict[str, Any]]:
        return list(self.watcher_status().get("pending_acquisitions") or [])

    def archived(self) -> list[str]:
        if not self.archive.exists():
            return []
        return sorted(str(p.relative_to(self.archive)) for p in self.archive.rglob("*") if p.is_file())

    def mails(self) -> list[str]:
        """Each mail as its recipients, subject and plain-text body (decoded)."""
        if not self.outbox.exists():
            return []
        out = []
        for path in sorted(self.outbox.rglob("*.eml")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            body = message.get_body(("plain",))
            out.append(f"To: {message['To']}\nSubject: {message['Subject']}\n\n"
                       + (body.get_content() if body is not None else ""))
        return out

    def reported(self, fragment: str) -> str | None:
        """Where ``fragment`` (a path or a word) is explained to the admin: a failed job's reason or a pending entry."""
        for job in self.jobs():
            if job.error and fragment in (job.error.message + " " + job.spec.root):
                return f"job {job.id}: {job.error.message}"
        for entry in self.pending():
            if fragment in json.dumps(entry, ensure_ascii=False):
                return json.dumps(entry, ensure_ascii=False)
        for pending in self.store.pending_list():
            if fragment in pending.path:
                return f"pending {pending.path}: {pending.kind}: {pending.reason}"
        return None



def manifest(folder: Path, files: dict[str, bytes], *, listed: bool = True, name: str = "watchfolder.json",
             **fields: Any) -> Path:
    """Write the files, then the manifest last (as the contract asks)."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    body: dict[str, Any] = {"owner": "jdoe", "target": {"project": "Atlas", "dataset": "day1"}, **fields}
    if listed:
        body["files"] = entries
    path = folder / name
    path.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    return path


def tree(folder: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def succeeded(jobs: list[Job]) -> list[Job]:
    return [j for j in jobs if j.state == JobState.SUCCEEDED]


def files_of(job: Job) -> list[str]:
    return sorted(f.path for f in job.spec.files)



def can_read_unreadable(tmp_path: Path) -> bool:
    """Whether this process reads a file of mode 000 (root with CAP_DAC_OVERRIDE does)."""
    probe = tmp_path / "probe"
    probe.write_bytes(b"x")
    probe.chmod(0)
    try:
        probe.read_bytes()
        return True
    except PermissionError:
        return False
    finally:
        probe.chmod(0o600)
        probe.unlink()


def run_without_dac_override(tmp_path: Path, *selection: str, timeout: float = 300):
    """Run pytest ``selection`` (node ids, ``-k`` expressions) as root without the capabilities
    that bypass file modes (``setpriv``), so permission cases run as for a service user.

    Skips when not root (those tests run directly) or without ``setpriv``; returns the
    ``CompletedProcess`` (stdout, stderr as text).
    """
    import os
    import shutil
    import subprocess
    import sys

    import pytest

    if os.geteuid() != 0:
        pytest.skip("not root: the permission tests run directly")
    setpriv = shutil.which("setpriv")
    if not setpriv:
        pytest.skip("setpriv (util-linux) is needed to drop CAP_DAC_OVERRIDE")
    drop = "-dac_override,-dac_read_search"
    return subprocess.run(
        [setpriv, "--inh-caps", drop, "--bounding-set", drop, sys.executable, "-m", "pytest", "-q",
         "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "inner"), "-rs", *selection],
        capture_output=True, text=True, timeout=timeout, cwd=Path(__file__).parent.parent.parent,
    )
