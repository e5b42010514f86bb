"""Two watchers on one drop folder (as on two hosts): one holds the folder's lease and
watches; when it dies, the other takes over within a bound, rescans, and queues
nothing twice. Real watchers on a temp folder, a real store (SQLite, and
PostgreSQL when a server can run). The drill with ``watch`` processes and
``kill -9`` is in the fault suite (``make faults``)."""

from __future__ import annotations

import pytest
from helpers import wait_until, write_manifest

from watchfolder.status import collect_status
from watchfolder.store import SQLiteStore
from watchfolder.watch.watcher import Watcher

LEASE = 1.0


@pytest.fixture(params=["sqlite", "postgresql"])
def shared_store(request, tmp_path):
    """What both 'hosts' open: the same database, one handle each."""
    if request.param == "sqlite":
        def make():
            return SQLiteStore(tmp_path / "db" / "watchfolder.db")
    else:
        from watchfolder.store.postgres import PostgresStore

        url = request.getfixturevalue("pg_url")

        def make():
            return PostgresStore(url, logs_dir=tmp_path / "logs")
    stores = []

    def opened():
        s = make()
        stores.append(s)
        return s

    yield opened
    for s in stores:
        s.close()


def _kill(watcher: Watcher) -> None:
    """Stop a watcher's thread the way kill -9 would: no release, no goodbye."""
    watcher._stop.set()
    watcher.wake.set()
    watcher._thread.join(10)
    watcher._thread = None
    watcher._deactivate()


def test_the_other_watcher_takes_over_when_the_holder_dies(tmp_path, shared_store, make_config):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = make_config(watch=[{"name": "drop", "path": str(drop), "mode": "polling", "quiet_period": 0.3,
                                 "poll_interval": 0.1}])
    store_a, store_b = shared_store(), shared_store()
    a = Watcher(config.watch[0], store_a, holder="host-a", lease_seconds=LEASE, health_interval=0.1,
                status_interval=0.2)
    a.start()
    wait_until(lambda: a.status()["health"] == "ok", 10, message="host-a watching")
    b = Watcher(config.watch[0], store_b, holder="host-b", lease_seconds=LEASE, health_interval=0.1,
                status_interval=0.2)
    b.start()
    try:
        wait_until(lambda: b.status()["health"] == "standby", 10, message="host-b standing by")
        for i in range(3):
            write_manifest(drop / f"before-{i}", {"img.tif": b"x" * (i + 1)})
        wait_until(lambda: store_a.counts()["queued"] == 3, 15, message="host-a queues the first drops")
        assert not b.status()["holding"] and b.counters["rescans"] == 0

        status = collect_status(config, store_a)
        (held,) = status["folders"]
        assert held["folder"] == "drop" and held["holder"] == "host-a" and not held["expired"]
        names = {w["name"]: w for w in status["watchers"]}
        assert names["drop"]["health"] == "ok" and names["drop@host-b"]["health"] == "standby"
        # Per host: the folders its watchers hold and those they stand by for, and which process does which.
        (host,) = status["hosts"]  # both 'hosts' are processes of this machine
        assert host["folders"] == ["drop"] and host["standby"] == ["drop"], host
        assert host["watchers"] == [
            {"holder": "host-a", "pid": held["pid"], "holds": ["drop"], "standby": []},
            {"holder": "host-b", "pid": names["drop@host-b"]["pid"], "holds": [], "standby": ["drop"]},
        ]

        _kill(a)
        for i in range(3):
            write_manifest(drop / f"after-{i}", {"img.tif": b"y" * (i + 1)})
        wait_until(lambda: b.status()["health"] == "ok", 10, message="host-b takes over after the lease")
        wait_until(lambda: store_b.counts()["queued"] == 6, 15, message="host-b queues the drops made meanwhile")
        assert b.counters["rescans"] >= 1  # it rescanned on taking over ...
        jobs, _ = store_b.list_jobs(limit=100)
        assert len({j.spec.root for j in jobs}) == 6  # ... and queued nothing twice
        assert [h["holder"] for h in store_b.folder_holders()] == ["host-b"]
        names = {w["name"] for w in collect_status(config, store_b)["watchers"]}
        assert "drop@host-b" not in names  # its standby row went when it took over

        # A clean stop releases the folder: another watcher need not wait for the lease.
        b.stop()
        assert store_a.folder_holders() == []
    finally:
        b.stop()
        a.stop()


def test_post_actions_at_shutdown_are_left_to_the_watcher_that_took_over(tmp_path, make_config):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = make_config(watch=[{"name": "drop", "path": str(drop), "mode": "polling"}])
    store = SQLiteStore(tmp_path / "db" / "watchfolder.db")
    try:
        mine = Watcher(config.watch[0], store, holder="host-a", lease_seconds=30)
        applied = []
        mine._followups = lambda now: applied.append(now)
        mine.finish_followups(1.0)  # free: held for the post-actions, then released
        assert applied == [1.0] and store.folder_holders() == []
        assert store.hold_folder("drop", "host-b", ttl=30, now=2.0)  # another watcher took over
        mine.finish_followups(3.0)
        assert applied == [1.0]  # the other's to apply now
    finally:
        store.close()
