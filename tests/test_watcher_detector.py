"""Detection driven step by step with an injected clock: quiet periods, timeouts, polling, mounts."""

from __future__ import annotations

import json
import os
import time
import unicodedata

import pytest
from helpers import BlockedWriter

from watchfolder.filenames import fit_name
from watchfolder.job import JobState
from watchfolder.watch.detector import LayoutRule, Patterns, estimate_change, snapshot_folder
from watchfolder.watch.mounts import is_network_fs, mount_of, parse_mountinfo
from watchfolder.watch.watcher import Watcher, WatchService

T0 = 1_000_000.0  # an arbitrary clock far from the files' real mtimes


def jobs_of(store):
    jobs, _ = store.list_jobs(limit=1000)
    return jobs


@pytest.fixture
def drop(tmp_path):
    d = tmp_path / "drop"
    d.mkdir()
    return d


def polling_watcher(store, make_config, drop, **watch):
    entry = {"name": "w", "path": str(drop), "mode": "polling", "quiet_period": 10, "poll_interval": 1,
             "missing_timeout": 100, "rescan_interval": 1000}
    entry.update(watch)
    cfg = make_config(watch=[entry])
    return Watcher(cfg.watch[0], store)


def test_quiet_period_restarts_on_every_change(store, make_config, drop):
    w = polling_watcher(store, make_config, drop, detection="layout", layout="{owner}/{dataset}/",
                        target={"project": "P"})
    w.loop(now=T0)
    assert w.status()["health"] == "ok" and w.status()["mode"] == "polling"
    folder = drop / "jdoe" / "d1"
    folder.mkdir(parents=True)
    data = folder / "a.tif"
    data.write_bytes(b"1")
    w.loop(now=T0 + 1)  # the poll sees the new folder: pending from now (its mtimes are not in (T0, T0+1])
    assert w.status()["pending"] == 1
    t = T0 + 1
    for step in range(5):
        t += 8  # less than the quiet period each time
        with open(data, "ab") as fh:
            fh.write(b"more")
        w.loop(now=t)
        assert jobs_of(store) == [], f"queued during writing (step {step})"
    w.loop(now=t + 9.9)
    assert jobs_of(store) == []
    w.loop(now=t + 10)
    (job,) = jobs_of(store)
    assert job.spec.files[0].size == 1 + 5 * 4
    assert job.spec.target.to_dict() == {"project": "P", "dataset": "d1"}
    # Nothing changes any more: no second job, however long we go on.
    for k in range(1, 30):
        w.loop(now=t + 10 + k * 7)
    assert len(jobs_of(store)) == 1


def test_mtime_between_looks_dates_the_change():
    assert estimate_change(105.0, since=100.0, now=110.0) == 105.0
    assert estimate_change(95.0, since=100.0, now=110.0) == 110.0  # copied mtime: unknown, be safe
    assert estimate_change(120.0, since=100.0, now=110.0) == 110.0  # clock skew: be safe
    assert estimate_change(105.0, since=None, now=110.0) == 110.0  # startup: be safe


def test_missing_files_timeout_with_injected_clock(store, make_config, drop):
    w = polling_watcher(store, make_config, drop, missing_timeout=100)
    w.loop(now=T0)
    folder = drop / "acq"
    folder.mkdir()
    (folder / "watchfolder.json").write_text(json.dumps({
        "owner": "jdoe", "target": {"dataset": "d"}, "files": [{"path": "later.tif", "size": 3}],
    }))
    w.loop(now=T0 + 1)
    w.loop(now=T0 + 12)
    pending = w.status()["pending_acquisitions"]
    assert pending and pending[0]["waiting"] == "waiting for 1 of 1 file (missing: later.tif)"
    w.loop(now=T0 + 60)
    assert jobs_of(store) == []
    w.loop(now=T0 + 102)
    (job,) = jobs_of(store)
    assert job.state == JobState.FAILED
    assert "incomplete after 100 s without change" in job.error.message
    assert "waiting for 1 of 1 file (missing: later.tif)" in job.error.message
    assert (folder / "watchfolder.json").exists()


def test_polling_stats_folders_and_looks_again_at_settled_acquisitions_in_turn(store, make_config, drop):
    # Folder mtimes are compared with the clock (a folder changed in the last
    # seconds is listed again), so this test's clock starts at the real time.
    T0 = time.time()
    w = polling_watcher(store, make_config, drop, rescan_interval=500)
    w.loop(now=T0)
    folder = drop / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"aaaa")
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "d"}}))
    w.loop(now=T0 + 1)
    w.loop(now=T0 + 11)
    assert len(jobs_of(store)) == 1
    assert w.scanner.dirs == {str(drop.resolve()): w.scanner.dirs[str(drop.resolve())],
                              str(folder.resolve()): w.scanner.dirs[str(folder.resolve())]}
    # Rewrite a file in place: no folder mtime changes, but settled acquisitions are looked
    # at again in turn (Detector.recheck_settled), so polling sees it as inotify would…
    st = os.stat(folder)
    with open(folder / "a.tif", "r+b") as fh:
        fh.write(b"bbbbbb")
    os.utime(folder, ns=(st.st_atime_ns, st.st_mtime_ns))
    w.loop(now=T0 + 13)
    assert w.status()["pending"] == 1 and len(jobs_of(store)) == 1
    # …and the changed acquisition (a job not started yet, no import to keep) is a new job.
    w.loop(now=T0 + 24)
    jobs = jobs_of(store)
    assert len(jobs) == 2 and jobs[0].spec.files[0].size == 6


def test_restart_does_not_requeue(store, make_config, drop):
    (drop / "acq").mkdir()
    (drop / "acq" / "a.tif").write_bytes(b"a")
    (drop / "acq" / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "d"}}))
    w = polling_watcher(store, make_config, drop)
    w.loop(now=T0)
    w.loop(now=T0 + 10)  # startup: quiet period counted from the first look
    assert len(jobs_of(store)) == 1
    w2 = polling_watcher(store, make_config, drop)
    w2.loop(now=T0 + 100)
    w2.loop(now=T0 + 110)
    assert len(jobs_of(store)) == 1
    assert w2.status()["pending"] == 0 and w2.status()["known"] == 1


def test_unhealthy_alert_without_notifier_does_not_fail(store, make_config, drop):
    cfg = make_config(watch=[{"name": "w", "path": str(drop), "mode": "polling"}],
                      notify={"watcher_unhealthy_after": 5})
    service = WatchService(cfg, store, None)
    w = service.watchers[0]
    w.loop(now=T0)
    drop.rmdir()
    w.loop(now=T0 + 1)
    assert w.status()["health"] == "unhealthy" and w.status()["unhealthy_since"] == T0 + 1
    assert "does not exist" in w.status()["error"]
    assert service.loop(now=T0 + 7) == ["w"]
    assert store.outbox_list() == []
    # Backoff: retries are spaced out, and each failure is still reported.
    w.loop(now=T0 + 1.5)
    assert w.status()["health"] == "unhealthy"
    drop.mkdir()
    w.loop(now=T0 + 30)
    assert w.status()["health"] == "ok" and w.status()["unhealthy_since"] is None
    assert service.loop(now=T0 + 31) == []


# ---------------------------------------------------------------------------
# Rules, patterns, snapshots


def test_layout_rule_values(make_config, drop):
    cfg = make_config(watch=[{"path": str(drop), "detection": "layout", "layout": "{owner}/{project}-{dataset}/"}])
    rule = LayoutRule(cfg.watch[0], Patterns((), ()))
    assert rule.depth == 2
    assert rule.values("jdoe/atlas-slide-3") == {"owner": "jdoe", "project": "atlas", "dataset": "slide-3"}
    assert rule.values("jdoe") is None and rule.values("jdoe/nodash") is None
    nfd = unicodedata.normalize("NFD", "zoë")
    assert rule.values(f"{nfd}/p-d")["owner"] == unicodedata.normalize("NFC", "zoë")
    assert rule.candidate_for("jdoe/p-d/sub/x.tif", {}, False) == "jdoe/p-d"
    assert rule.candidate_for("jdoe/stray.tif", {}, False) is None


def test_snapshot_counts_temp_files_but_not_own_receipts(tmp_path):
    folder = tmp_path / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"a")
    patterns = Patterns((), ("*.part", ".*"))
    first = snapshot_folder(str(folder), patterns)
    (folder / "b.tif.part").write_bytes(b"partial")
    second = snapshot_folder(str(folder), patterns)
    assert first.digest != second.digest  # a temp file being written is activity
    (folder / "x.watchfolder-receipt.json").write_text("{}")
    os.utime(folder, ns=(0, os.stat(folder).st_mtime_ns))
    third = snapshot_folder(str(folder), patterns)
    assert third.files == second.files
    (folder / ".snapshot").mkdir()
    (folder / ".snapshot" / "huge").write_bytes(b"x")
    assert snapshot_folder(str(folder), patterns).files == second.files
    assert snapshot_folder(str(tmp_path / "missing"), patterns) is None


MOUNTINFO = r"""22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw
40 27 0:50 / /mnt/scope\040share rw,relatime - cifs //nas/scope rw,vers=3.1.1
41 27 0:51 / /mnt/nfs rw - nfs4 nas:/export rw
42 41 0:52 / /mnt/nfs/local rw - ext4 /dev/vdb rw
43 27 0:53 / /home/u/remote rw - fuse.sshfs u@host:/data rw
"""


@pytest.mark.parametrize(
    "path, fs_type, network",
    [
        ("/mnt/scope share/drop", "cifs", True),
        ("/mnt/nfs/drop", "nfs4", True),
        ("/mnt/nfs/local/drop", "ext4", False),
        ("/mnt/nfsother", "ext4", False),
        ("/home/u/remote/x", "fuse.sshfs", True),
        ("/", "ext4", False),
    ],
)
def test_mount_of(path, fs_type, network):
    mount = mount_of(path, MOUNTINFO)
    assert mount.fs_type == fs_type and mount.is_network is network


def test_mountinfo_and_network_types():
    mounts = parse_mountinfo(MOUNTINFO)
    assert mounts[2].mount_point == "/mnt/scope share" and mounts[2].source == "//nas/scope"
    for fs in ("cifs", "smb3", "nfs", "nfs4", "fuse.sshfs", "sshfs", "9p", "fuse.whatever"):
        assert is_network_fs(fs)
    for fs in ("ext4", "xfs", "btrfs", "tmpfs", "zfs"):
        assert not is_network_fs(fs)
    assert mount_of("/", "") is None


def test_polling_rechecks_a_bounded_number_of_pending_acquisitions_per_tick(store, make_config, drop, monkeypatch):
    # Thousands in their quiet period must not make every tick read them all.
    import watchfolder.watch.detector as detector_module

    monkeypatch.setattr(detector_module, "RECHECK_PER_TICK", 20)
    for i in range(100):
        (drop / "jdoe" / f"ds{i:03d}").mkdir(parents=True)
        (drop / "jdoe" / f"ds{i:03d}" / "a.tif").write_bytes(b"a")
    w = polling_watcher(store, make_config, drop, detection="layout", layout="{owner}/{dataset}/",
                        target={"project": "P"}, quiet_period=60)
    # A real clock, past the scanner's guard for fresh folder mtimes (an injected clock
    # far from the files' mtimes would make every folder look freshly changed).
    t0 = time.time() + 5
    w.loop(now=t0)
    assert len(w.detector.pending) == 100
    looks = []
    real = w.detector.rule.snapshot
    monkeypatch.setattr(w.detector.rule, "snapshot", lambda *a, **k: looks.append(a[1]) or real(*a, **k))
    w.loop(now=t0 + 3)  # new folders are listed again until 2 s after they were first seen
    for tick in range(4, 10):
        looks.clear()
        w.loop(now=t0 + tick)
        assert len(looks) <= 20 + 5, f"tick {tick} looked at {len(looks)} acquisitions"
    # Every one is looked at in turn (the longest unobserved first).
    observed = {c.observed_at for c in w.detector.known.values()}
    assert min(observed) > t0
    # An in-place append is still noticed: at the latest when the quiet period ends.
    with open(drop / "jdoe" / "ds007" / "a.tif", "ab") as fh:
        fh.write(b"more")
    w.loop(now=t0 + 61)
    w.loop(now=t0 + 62)
    queued = {j.spec.target.dataset for j in jobs_of(store)}
    assert "ds007" not in queued and len(queued) == 99


def test_a_scan_does_not_lstat_again_the_folders_it_walked_and_still_refuses_links(store, make_config, drop,
                                                                                  monkeypatch):
    # The scan reaches each acquisition entry by entry, each seen not to be a link: checking
    # every component again with lstat cost two system calls per new acquisition (issue 13).
    from watchfolder.watch import detector as detector_module

    w = polling_watcher(store, make_config, drop, detection="layout", layout="{owner}/{dataset}/",
                        target={"project": "P"})
    for i in range(20):
        folder = drop / "jdoe" / f"d{i:02d}"
        folder.mkdir(parents=True)
        (folder / "a.tif").write_bytes(b"1")
    elsewhere = drop.parent / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "b.tif").write_bytes(b"2")
    os.symlink(elsewhere, drop / "jdoe" / "linked")
    # Two finished by an earlier run: a receipt beside one, an error report (its name fitted to
    # 255 bytes) beside the other; found in the listing of their folder, not by an lstat.
    (drop / "jdoe" / "d00.watchfolder-receipt.json").write_text("{}")
    long_name = "L" * 240
    (drop / "jdoe" / long_name).mkdir()
    (drop / "jdoe" / long_name / "a.tif").write_bytes(b"1")
    (drop / "jdoe" / fit_name(long_name, ".watchfolder-error.txt")).write_text("failed")
    calls = []
    real_lstat = os.lstat

    def counting_lstat(path, *a, **k):
        calls.append(path)
        return real_lstat(path, *a, **k)

    monkeypatch.setattr(detector_module.os, "lstat", counting_lstat)
    w.loop(now=T0)
    assert w.status()["pending"] == 19
    assert w.detector.known["jdoe/d00"].handled_before and w.detector.known[f"jdoe/{long_name}"].handled_before
    assert not w.detector.known["jdoe/d01"].handled_before
    # Besides the watch folder's mount found once at start (its parents), nothing: the look for a
    # receipt or an error report beside each new acquisition reads its folder's listing.
    assert not [c for c in calls if str(c).endswith((".watchfolder-receipt.json", ".watchfolder-error.txt"))]
    walked = [c for c in calls if str(c).startswith(str(drop))]
    assert len(walked) < 20, walked
    skipped = w.detector.skipped
    assert list(skipped) == ["jdoe/linked"] and skipped["jdoe/linked"][1] == "symlink"


def test_a_fifo_or_socket_in_a_folder_is_left_out_with_its_reason_and_never_opened(store, make_config, drop):
    import socket

    w = polling_watcher(store, make_config, drop, detection="layout", layout="{owner}/{dataset}/",
                        target={"project": "P"})
    w.loop(now=T0)
    folder = drop / "jdoe" / "d1"
    folder.mkdir(parents=True)
    (folder / "a.tif").write_bytes(b"1234")
    os.mkfifo(folder / "pipe.tif")
    writer = BlockedWriter(folder / "pipe.tif")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(folder / "live.sock"))
    try:
        w.loop(now=T0 + 1)
        w.loop(now=T0 + 12)
        (job,) = jobs_of(store)
        assert [f.path for f in job.spec.files] == ["a.tif"]
        assert sorted(job.spec.extra["left_out"]) == [
            "live.sock (a socket, not a regular file: not imported)",
            "pipe.tif (a named pipe (FIFO), not a regular file: not imported)",
        ]
        assert not writer.opened.is_set()
    finally:
        sock.close()
        writer.release()


def test_a_manifest_listing_a_fifo_is_refused_at_once_without_opening_it(store, make_config, drop):
    w = polling_watcher(store, make_config, drop)
    w.loop(now=T0)
    folder = drop / "acq"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"1234")
    os.mkfifo(folder / "b.tif")
    writer = BlockedWriter(folder / "b.tif")
    (folder / "watchfolder.json").write_text(json.dumps({
        "owner": "jdoe", "target": {"dataset": "d"}, "files": [{"path": "a.tif"}, {"path": "b.tif"}],
    }))
    try:
        w.loop(now=T0 + 1)
        w.loop(now=T0 + 12)  # no waiting for the missing timeout: a FIFO never becomes a file
        (job,) = jobs_of(store)
        assert job.state == JobState.FAILED
        assert "lists b.tif (a named pipe (FIFO)), which is not a regular file" in job.error.message
        assert "Remove it from the manifest's files" in job.error.message
        assert not writer.opened.is_set()
    finally:
        writer.release()


@pytest.mark.parametrize("skew", [5, 600])
def test_an_entry_added_in_the_listing_second_is_found_although_another_folder_is_dated_ahead(
        store, make_config, drop, skew):
    # An outside try of a faster start (settling at once every folder older, by the 2 s guard,
    # than the newest mtime seen in the scan) lost this: one folder dated ahead of the rest
    # (copied with its times from an instrument PC with a fast clock, or `touch -d`) made every
    # folder after it look old, and a manifest added in the same (coarse) timestamp tick as the
    # scan's listing waited for the next full rescan. Every folder is listed again once after
    # a full scan: found on the first ticks.
    ahead = time.time() + skew
    for name in ("000skewed", "mmmskewed", "zzzskewed"):
        (drop / name).mkdir()
        os.utime(drop / name, (ahead, ahead))
    acq = drop / "acq_new"
    acq.mkdir()
    second = int(time.time()) - 1
    os.utime(acq, (second, second))
    T0 = time.time()
    w = polling_watcher(store, make_config, drop, rescan_interval=3600)
    w.loop(now=T0)
    # Written right after the scan listed it; the folder's mtime put back (same server second).
    (acq / "a.tif").write_bytes(b"aaaa")
    (acq / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "d"}}))
    os.utime(acq, (second, second))
    w.loop(now=T0 + 1)
    w.loop(now=T0 + 12)
    assert [os.path.basename(j.spec.root) for j in jobs_of(store)] == ["acq_new"]
