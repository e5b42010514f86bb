"""The data disk full, as a process says it (watchfolder/store/space.py): once, with the fix, and its end."""

from __future__ import annotations

import errno
import logging
import sqlite3
import sys

from watchfolder.store.outage import OutageNoise
from watchfolder.store.space import QUIET_SECONDS, DiskFull, io_error_from_full_disk, is_disk_full


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_refused_write_is_said_once_with_reminders_and_its_end(tmp_path, caplog):
    clock = Clock()
    disk = DiskFull("job database /srv/wf.db", tmp_path, "free space there", logging.getLogger("t"), clock=clock)
    assert disk.problem() is None  # plenty of room on the test's disk
    caplog.set_level(logging.INFO, logger="t")
    for _ in range(50):  # every thread meets it, every retry
        disk.failed(OSError(errno.ENOSPC, "No space left on device"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    # The test's disk has room: the writes were refused by a quota (the drills fill a real disk).
    assert warnings[0].startswith(f"job database /srv/wf.db: writes refused for space on the disk holding it "
                                  f"({tmp_path}, ")
    assert "; free space there; the service waits and carries on by itself" in warnings[0]
    # A quota refuses writes while the disk has room: full as long as writes are refused.
    assert disk.problem().startswith("job database /srv/wf.db: writes refused for space")
    clock.now += 61
    disk.failed("again")
    assert [r.getMessage() for r in caplog.records][-1].startswith("still, after 61 s: job database /srv/wf.db: ")
    clock.now += QUIET_SECONDS + 1  # no refused write since, and room on the disk: over, said once
    assert disk.problem() is None and disk.problem() is None
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and infos[0].startswith("job database /srv/wf.db: space is back (")


def test_what_counts_as_disk_full():
    full = sqlite3.OperationalError("database or disk is full")
    assert is_disk_full(full) and is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not is_disk_full(sqlite3.OperationalError("database is locked"))
    assert not is_disk_full(OSError(errno.EIO, "Input/output error")) and not is_disk_full(None)


def test_an_io_error_counts_as_no_space_only_while_the_disk_has_no_room(tmp_path, monkeypatch):
    # Issue 11 outside test F4 (the drill on a real full tmpfs is in tests/faults/test_disk_full_drills.py).
    import shutil
    from collections import namedtuple

    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorname = "SQLITE_IOERR_SHMSIZE"
    assert not io_error_from_full_disk(ioerr, tmp_path)  # the test's disk has room: a failing disk
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10 << 20, 10 << 20, 4096))
    assert io_error_from_full_disk(ioerr, tmp_path)
    assert io_error_from_full_disk(OSError(errno.EIO, "Input/output error"), tmp_path)
    assert not io_error_from_full_disk(sqlite3.OperationalError("database is locked"), tmp_path)
    assert not io_error_from_full_disk(None, tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: (_ for _ in ()).throw(OSError(errno.ENOENT, "gone")))
    assert not io_error_from_full_disk(ioerr, tmp_path)  # unknown free space: not said to be full


def test_the_other_threads_tracebacks_of_a_full_database_are_dropped():
    def record(exc):
        try:
            raise exc
        except Exception:
            info = sys.exc_info()
        return logging.LogRecord("watchfolder.mail.outbox", logging.ERROR, __file__, 1, "outbox sender loop failed",
                                 None, info)

    noise = OutageNoise()
    assert noise.filter(record(sqlite3.OperationalError("database or disk is full"))) is False
    assert noise.filter(record(sqlite3.OperationalError("no such table: jobs"))) is True


def test_a_write_that_goes_through_ends_it_at_once(tmp_path, caplog):
    clock = Clock()
    disk = DiskFull("job database /srv/wf.db", tmp_path, "free space there", logging.getLogger("t"), clock=clock)
    disk.failed("refused")
    disk.wrote()  # at the same instant: a write begun before the refusal proves nothing
    assert disk.problem() is not None
    clock.now += 1
    disk.wrote()
    caplog.set_level(logging.INFO, logger="t")
    assert disk.problem() is None
    assert [r.getMessage() for r in caplog.records][-1].startswith("job database /srv/wf.db: space is back")


def test_an_io_error_of_a_store_on_a_full_disk_is_raised_as_disk_full_and_said_once(tmp_path, monkeypatch, caplog):
    # Issue 11 outside test F4: one classification, so workers, the API and the outage noise
    # all take it for the full disk it is (not "failing disk").
    import shutil
    from collections import namedtuple

    import pytest

    from watchfolder.store import SQLiteStore

    store = SQLiteStore(tmp_path / "db" / "watchfolder.db")
    conn = store._conn()
    ioerr = sqlite3.OperationalError("disk I/O error")
    ioerr.sqlite_errorname = "SQLITE_IOERR_WRITE"
    conn._check(ioerr)  # room on the disk: a failing disk, left as it is
    assert store.disk_full.since is None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda folder: usage(10 << 20, 10 << 20, 0))
    caplog.set_level(logging.WARNING)
    with pytest.raises(sqlite3.OperationalError) as raised:
        conn._check(ioerr)
    assert raised.value.sqlite_errorname == "SQLITE_FULL" and is_disk_full(raised.value)
    assert store.is_fault(raised.value) and store.disk_full.since is not None
    assert "no space left on the disk holding it" in caplog.text
    store.close()
