"""Watch folders with real observers (inotify and polling) on temp dirs and a real job store."""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from helpers import TARGET, wait_until, write_manifest

from watchfolder.errors import PermanentImportError
from watchfolder.job import JobState
from watchfolder.mail.notify import Notifier
from watchfolder.watch.mounts import Mount
from watchfolder.watch.watcher import EventSource, Watcher, WatchLimitError, WatchService

MODES = ["events", "polling"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "acquisitions"


def jobs_of(store, **kw):
    jobs, _ = store.list_jobs(limit=10_000, **kw)
    return jobs


class Harness:
    """Builds watchers on a drop folder; stops them at the end of the test."""

    def __init__(self, tmp_path: Path, store, make_config):
        self.tmp_path = tmp_path
        self.store = store
        self.make_config = make_config
        self.drop = tmp_path / "drop"
        self.drop.mkdir()
        self.watchers: list[Watcher] = []

    def config(self, mode: str = "events", **watch):
        entry = {
            "name": "drop", "path": str(self.drop), "mode": mode, "quiet_period": 0.4,
            "poll_interval": 0.1, "missing_timeout": 600,
        }
        entry.update(watch)
        return self.make_config(watch=[entry])

    def watcher(self, mode: str = "events", *, start: bool = True, options: dict | None = None, **watch) -> Watcher:
        cfg = self.config(mode, **watch)
        w = Watcher(cfg.watch[0], self.store, restart_backoff=(0.2, 0.4), health_interval=0.1, **(options or {}))
        self.watchers.append(w)
        if start:
            w.start()
            wait_until(lambda: w.status().get("health") == "ok", 10, message="watcher healthy")
        return w

    def stop(self):
        for w in self.watchers:
            w.stop()


@pytest.fixture
def harness(tmp_path, store, make_config):
    h = Harness(tmp_path, store, make_config)
    yield h
    h.stop()


def one_job(store, timeout=15.0, **kw):
    jobs = wait_until(lambda: jobs_of(store, **kw), timeout, message="a job")
    return jobs


# ---------------------------------------------------------------------------
# Show: the scenarios, on both observers


@pytest.mark.parametrize("mode", MODES)
def test_writer_appending_for_seconds_yields_one_job_after_it_stops(harness, store, mode):
    w = harness.watcher(mode, detection="layout", layout="{owner}/{dataset}/", quiet_period=0.6,
                        target={"project": "Brain atlas"})
    folder = harness.drop / "jdoe" / "slide 3"
    folder.mkdir(parents=True)
    data = folder / "stack.ome.tiff"
    chunk = os.urandom(64 * 1024)
    deadline = time.monotonic() + 3.0
    appended = 0
    with open(data, "ab") as fh:
        while time.monotonic() < deadline:
            # Each step waits for the watcher to have noticed it (an event, or a poll after it).
            seen = w.counters["events"] + w.counters["polls"]
            fh.write(chunk)
            fh.flush()
            appended += 1
            wait_until(lambda seen=seen: w.counters["events"] + w.counters["polls"] > seen, 5, interval=0.01)
            assert jobs_of(store) == [], "a job was queued while the file was still being written"
            time.sleep(0.2)  # the writer's pace (not a synchronisation)
    last_write = os.stat(data).st_mtime
    jobs = one_job(store)
    assert appended >= 10
    assert len(jobs) == 1
    job = jobs[0]
    assert job.spec.owner == "jdoe"
    assert job.spec.target.to_dict() == {"project": "Brain atlas", "dataset": "slide 3"}
    assert [(f.path, f.size) for f in job.spec.files] == [("stack.ome.tiff", appended * len(chunk))]
    assert job.created_at >= last_write + 0.6 - 0.05  # never before the quiet period
    w.rescan_requested = True
    w.wake.set()
    wait_until(lambda: w.counters["rescans"] >= 2, 5)
    assert len(jobs_of(store)) == 1


@pytest.mark.parametrize("mode", MODES)
def test_sidecar_written_before_its_data_waits_for_the_data(harness, store, mode):
    w = harness.watcher(mode, detection="sidecar")
    sidecar = harness.drop / "cells_01.czi.json"
    sidecar.write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "cells"}}), encoding="utf-8")
    wait_until(lambda: any(p["waiting"] for p in w.status()["pending_acquisitions"]), 10,
               message="sidecar waiting for its data")
    assert w.status()["pending_acquisitions"][0]["waiting"] == "sidecar names data file cells_01.czi, which is missing"
    assert jobs_of(store) == []
    (harness.drop / "cells_01.czi").write_bytes(b"czi-pixels")
    jobs = one_job(store)
    assert [(f.path, f.size) for f in jobs[0].spec.files] == [("cells_01.czi", 10)]
    assert jobs[0].spec.root == str(harness.drop.resolve())


@pytest.mark.parametrize("mode", MODES)
def test_manifest_written_before_its_files_waits_for_them(harness, store, mode):
    w = harness.watcher(mode)
    folder = harness.drop / "slide3"
    folder.mkdir()
    files = {"tile_1.tif": b"1" * 1000, "sub/tile_2.tif": b"2" * 2000}
    entries = [{"path": k, "size": len(v)} for k, v in files.items()]
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": entries}))
    wait_until(lambda: any("missing" in p["waiting"] for p in w.status()["pending_acquisitions"]), 10,
               message="manifest waiting for files")
    waiting = w.status()["pending_acquisitions"][0]["waiting"]
    assert waiting == "waiting for 2 of 2 files (missing: tile_1.tif, sub/tile_2.tif)"
    # First file arrives, the second one only half.
    (folder / "tile_1.tif").write_bytes(files["tile_1.tif"])
    (folder / "sub").mkdir()
    (folder / "sub" / "tile_2.tif").write_bytes(files["sub/tile_2.tif"][:500])
    wait_until(lambda: "size of sub/tile_2.tif is 500 bytes, manifest says 2,000" in str(
        w.status()["pending_acquisitions"]), 10)
    assert jobs_of(store) == []
    with open(folder / "sub" / "tile_2.tif", "ab") as fh:
        fh.write(files["sub/tile_2.tif"][500:])
    jobs = one_job(store)
    assert sorted((f.path, f.size) for f in jobs[0].spec.files) == [("sub/tile_2.tif", 2000), ("tile_1.tif", 1000)]


@pytest.mark.parametrize("mode", MODES)
def test_manifest_with_sizes_and_checksums_is_queued_without_the_quiet_period(harness, store, mode):
    # A quiet period far beyond the deadline: only the proof can meet it.
    harness.watcher(mode, quiet_period=120)
    folder = harness.drop / "proven"
    write_manifest(folder, {"a.tif": b"a" * 1000, "sub/b.tif": b"b" * 2000})
    written = os.stat(folder / "watchfolder.json").st_mtime
    job = one_job(store, timeout=10)[0]
    assert job.state == JobState.QUEUED and job.created_at - written < 10
    assert sorted(f.path for f in job.spec.files) == ["a.tif", "sub/b.tif"]


@pytest.mark.parametrize("mode", MODES)
def test_checksummed_manifest_waits_until_its_files_match(harness, store, mode):
    w = harness.watcher(mode, quiet_period=120)
    folder = harness.drop / "slide"
    folder.mkdir()
    data = b"z" * 4000
    entry = {"path": "z.tif", "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "z.tif").write_bytes(data[:1000])  # still being copied
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [entry]}))
    wait_until(lambda: "slide" in w.detector.known
               and w.detector.known["slide"].proof_after > 0, 10, message="a proof attempt that failed")
    # Same size, other content: the checksum tells.
    (folder / "z.tif").write_bytes(b"y" * 4000)
    wait_until(lambda: w.detector.known["slide"].proof_backoff >= 0.2, 10, message="a second failed proof")
    assert jobs_of(store) == []
    (folder / "z.tif").write_bytes(data)
    job = one_job(store, timeout=10)[0]
    assert [(f.path, f.size, f.sha256) for f in job.spec.files] == [("z.tif", 4000, entry["sha256"])]


@pytest.mark.parametrize("detection", ["manifest without checksums", "sidecar without checksum", "layout"])
def test_nothing_proves_completeness_the_quiet_period_applies(harness, store, detection):
    if detection == "layout":
        w = harness.watcher("events", detection="layout", layout="{owner}/{dataset}/", quiet_period=120,
                            target={"project": "P"})
        (harness.drop / "jdoe" / "ds").mkdir(parents=True)
        (harness.drop / "jdoe" / "ds" / "a.tif").write_bytes(b"a")
        rel = "jdoe/ds"
    elif detection.startswith("sidecar"):
        w = harness.watcher("events", detection="sidecar", quiet_period=120)
        (harness.drop / "a.czi").write_bytes(b"czi")
        (harness.drop / "a.czi.json").write_text(json.dumps(
            {"owner": "jdoe", "target": TARGET, "files": [{"path": "a.czi", "size": 3}]}))
        rel = "a.czi"
    else:
        w = harness.watcher("events", quiet_period=120)
        (harness.drop / "m").mkdir()
        (harness.drop / "m" / "a.tif").write_bytes(b"a")
        (harness.drop / "m" / "watchfolder.json").write_text(json.dumps(
            {"owner": "jdoe", "target": TARGET, "files": [{"path": "a.tif", "size": 1}]}))
        rel = "m"
    wait_until(lambda: rel in w.detector.known and w.detector.known[rel].proof_at is None
               and w.counters["events"] > 0 and not w.events, 10, message="events handled")
    wait_until(lambda: w.detector.next_due() is not None and w.detector.next_due() > time.time() + 60, 10,
               message="only the quiet period left")
    assert jobs_of(store) == []


@pytest.mark.parametrize("mode", MODES)
def test_500_acquisitions_at_once_yield_500_jobs_without_duplicates(harness, store, mode, tmp_path):
    staging = tmp_path / "staging"
    for i in range(500):
        write_manifest(staging / f"acq {i:03d}", {"a.tif": f"a{i}".encode(), "b.tif": f"b{i}".encode()})
    w = harness.watcher(mode, quiet_period=0.5)
    for i in range(500):
        os.rename(staging / f"acq {i:03d}", harness.drop / f"acq {i:03d}")
    wait_until(lambda: len(jobs_of(store)) >= 500, 60, interval=0.1, message="500 jobs")
    # A full rescan and a restart must not requeue anything.
    w.rescan_requested = True
    w.wake.set()
    wait_until(lambda: w.counters["rescans"] >= 2, 10)
    w.stop()
    w2 = harness.watcher(mode, quiet_period=0.5)
    wait_until(lambda: w2.status()["known"] == 500 and w2.status()["pending"] == 0, 30, interval=0.1,
               message="restarted watcher settled")
    jobs = jobs_of(store)
    assert len(jobs) == 500
    assert len({j.idempotency_key for j in jobs}) == 500
    assert sorted(Path(j.spec.root).name for j in jobs) == [f"acq {i:03d}" for i in range(500)]
    assert all(j.state == JobState.QUEUED for j in jobs)


@pytest.mark.parametrize("mode", MODES)
def test_files_dropped_while_stopped_are_picked_up_on_start(harness, store, mode):
    write_manifest(harness.drop / "before", {"a.tif": b"a"})
    w = harness.watcher(mode)
    one_job(store)
    w.stop()
    write_manifest(harness.drop / "while stopped", {"b.tif": b"b"})
    harness.watcher(mode)
    wait_until(lambda: len(jobs_of(store)) == 2, 10, message="second job")
    roots = sorted(Path(j.spec.root).name for j in jobs_of(store))
    assert roots == ["before", "while stopped"]


@pytest.mark.parametrize("mode", MODES)
def test_root_removed_and_recreated_unhealthy_then_recovers(harness, store, mode):
    w = harness.watcher(mode)
    write_manifest(harness.drop / "first", {"a.tif": b"a"})
    one_job(store)
    shutil.rmtree(harness.drop)
    wait_until(lambda: w.status()["health"] == "unhealthy", 10, message="unhealthy")
    status = store.components("watcher")[0]["status"]
    assert status["health"] == "unhealthy"
    assert str(harness.drop) in status["error"]
    # While the folder is away, restarts keep failing and the watcher says so.
    restarts_before = w.counters["restarts"]
    harness.drop.mkdir()
    write_manifest(harness.drop / "meanwhile", {"b.tif": b"b"})
    wait_until(lambda: w.status()["health"] == "ok", 10, message="recovered")
    assert w.counters["restarts"] == restarts_before + 1
    wait_until(lambda: len(jobs_of(store)) == 2, 10, message="job for what arrived meanwhile")
    # And it watches the new folder, not the old one.
    write_manifest(harness.drop / "after", {"c.tif": b"c"})
    wait_until(lambda: len(jobs_of(store)) == 3, 10, message="job after recovery")
    assert w.status()["mode"] == mode


# ---------------------------------------------------------------------------
# Never twice, and changed re-drops


@pytest.mark.parametrize("mode", MODES)
def test_changed_redrop_is_a_new_job_unchanged_is_not(harness, store, mode):
    w = harness.watcher(mode)
    folder = harness.drop / "acq"
    write_manifest(folder, {"a.tif": b"first"})
    first = one_job(store)[0]
    w.rescan_requested = True
    w.wake.set()
    wait_until(lambda: w.counters["rescans"] >= 2, 5)
    assert len(jobs_of(store)) == 1
    # The instrument writes the acquisition again, with new content.
    shutil.rmtree(folder)
    write_manifest(folder, {"a.tif": b"second!"})
    wait_until(lambda: len(jobs_of(store)) == 2, 10, message="second job")
    second = jobs_of(store)[0]
    assert second.idempotency_key != first.idempotency_key
    assert second.spec.files[0].size == 7


def test_key_depends_on_folder_path_and_content(harness, store):
    w = harness.watcher("events")
    write_manifest(harness.drop / "x", {"a.tif": b"same"})
    write_manifest(harness.drop / "y", {"a.tif": b"same"})
    wait_until(lambda: len(jobs_of(store)) == 2, 10)
    keys = {j.idempotency_key for j in jobs_of(store)}
    assert len(keys) == 2 and all(k.startswith("watch:") for k in keys)
    assert w.status()["known"] == 2


# ---------------------------------------------------------------------------
# Odd inputs through the watcher


@pytest.mark.parametrize("mode", MODES)
def test_invalid_json_manifest_becomes_failed_job_with_line_and_column(harness, store, mode):
    harness.watcher(mode)
    folder = harness.drop / "bad"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"a")
    (folder / "watchfolder.json").write_text('{"owner": "jdoe",\n "target": {"dataset": "d"},,\n}')
    job = one_job(store)[0]
    assert job.state == JobState.FAILED
    assert "invalid JSON at line 2, column 29" in job.error.message
    assert (folder / "a.tif").exists() and (folder / "watchfolder.json").exists()  # nothing lost


def test_manifest_with_bom_unknown_fields_and_unicode_names(harness, store):
    harness.watcher("events")
    folder = harness.drop / unicodedata.normalize("NFD", "Zoë's slide")
    folder.mkdir()
    nfd = unicodedata.normalize("NFD", "tête 1.tif")
    (folder / nfd).write_bytes(b"x" * 10)
    (folder / "empty.tif").write_bytes(b"")
    body = {
        "owner": "jdoe",
        "target": TARGET,
        "microscope_serial": "123",
        "files": [{"path": unicodedata.normalize("NFC", "tête 1.tif"), "size": 10}, {"path": "empty.tif", "size": 0}],
    }
    (folder / "watchfolder.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(body, ensure_ascii=False).encode())
    job = one_job(store)[0]
    assert job.state == JobState.QUEUED
    assert [f.path for f in job.spec.files] == [nfd, "empty.tif"]
    # The watcher appends the warnings to the log right after queueing the job.
    wait_until(lambda: "unknown field 'microscope_serial' ignored" in store.read_log(job.id), 10)


def test_owner_not_allowed_is_rejected_with_reason(harness, store):
    harness.watcher("events", allowed_owners=["alice", "bob"])
    write_manifest(harness.drop / "acq", {"a.tif": b"a"})
    job = one_job(store)[0]
    assert job.state == JobState.FAILED
    assert "owner 'jdoe' is not allowed in watch folder 'drop' (allowed: alice, bob)" in job.error.message


def test_os_owner_check(harness, store):
    import pwd

    me = pwd.getpwuid(os.getuid()).pw_name
    harness.watcher("events", check_os_owner=True)
    write_manifest(harness.drop / "mine", {"a.tif": b"a"}, owner=me)
    write_manifest(harness.drop / "claimed", {"a.tif": b"b"}, owner="someone-else")
    wait_until(lambda: len(jobs_of(store)) == 2, 10)
    by_root = {Path(j.spec.root).name: j for j in jobs_of(store)}
    assert by_root["mine"].state == JobState.QUEUED
    assert by_root["claimed"].state == JobState.FAILED
    assert f"belongs to system user {me!r}" in by_root["claimed"].error.message


def test_symlink_escaping_root_is_rejected(harness, store, tmp_path):
    harness.watcher("events")
    secret = tmp_path / "secret.tif"
    secret.write_bytes(b"not yours")
    folder = harness.drop / "acq"
    folder.mkdir()
    (folder / "a.tif").symlink_to(secret)
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    job = one_job(store)[0]
    assert job.state == JobState.FAILED
    assert "symlink points outside" in job.error.message
    assert secret.exists() and (folder / "a.tif").is_symlink()


def test_zero_file_manifest_and_empty_folder_are_rejected(harness, store):
    harness.watcher("events")
    zero = harness.drop / "zero"
    zero.mkdir()
    (zero / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": []}))
    empty = harness.drop / "empty"
    empty.mkdir()
    (empty / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    wait_until(lambda: len(jobs_of(store)) == 2, 10)
    messages = sorted(j.error.message for j in jobs_of(store))
    assert all(j.state == JobState.FAILED for j in jobs_of(store))
    assert "files: the list is empty" in messages[1] or "files: the list is empty" in messages[0]
    assert any("holds none to import" in m for m in messages)


def test_deep_long_paths_and_temp_files(harness, store):
    harness.watcher("polling", detection="layout", layout="{owner}/{dataset}/", target={"project": "P"})
    folder = harness.drop / "jdoe" / "deep dataset"
    deep = folder.joinpath(*[f"level {i:02d} " + "y" * 30 for i in range(25)])
    deep.mkdir(parents=True)
    (deep / "image.tif").write_bytes(b"deep")
    (folder / "~$notes.docx").write_bytes(b"office lock")
    (folder / "copy.part").write_bytes(b"partial")
    (folder / ".DS_Store").write_bytes(b"mac")
    # copy.part: a copy in progress, so the acquisition waits for it (renamed or removed).
    time.sleep(1.0)
    assert jobs_of(store) == []
    (folder / "copy.part").unlink()
    job = one_job(store)[0]
    rel = str(deep.relative_to(folder) / "image.tif")
    assert [f.path for f in job.spec.files] == [rel]
    assert len(rel) > 800


def test_sidecar_that_is_instrument_data_is_not_a_job(harness, store):
    w = harness.watcher("events", detection="sidecar")
    (harness.drop / "scan.czi").write_bytes(b"pixels")
    (harness.drop / "scan.czi.json").write_text(json.dumps({"Exposure": 20, "Laser": 488}))
    wait_until(lambda: w.counters["ignored"] == 1, 10, message="data JSON ignored")
    shutil.copy(EXAMPLES / "sidecar" / "cells_01.ome.tiff", harness.drop)
    shutil.copy(EXAMPLES / "sidecar" / "cells_01.ome.tiff.json", harness.drop)
    job = one_job(store)[0]
    assert [f.path for f in job.spec.files] == ["cells_01.ome.tiff"]
    assert len(jobs_of(store)) == 1


def test_missing_files_timeout_becomes_failed_job_listing_them(harness, store):
    harness.watcher("polling", missing_timeout=1.0)
    folder = harness.drop / "acq"
    folder.mkdir()
    (folder / "present.tif").write_bytes(b"p")
    (folder / "watchfolder.json").write_text(json.dumps({
        "owner": "jdoe", "target": TARGET,
        "files": [{"path": "present.tif", "size": 1}, {"path": "lost 1.tif", "size": 5}, {"path": "lost 2.tif"}],
    }))
    job = one_job(store)[0]
    assert job.state == JobState.FAILED
    assert "waiting for 2 of 3 files (missing: lost 1.tif, lost 2.tif)" in job.error.message
    assert (folder / "present.tif").exists()
    # The failed job shows what was listed, with the size found where the file is there (the
    # outside try of issue 15 saw "0 file(s), 0 B" and no files).
    assert [(f.path, f.size) for f in job.spec.files] == [("present.tif", 1), ("lost 1.tif", 5), ("lost 2.tif", None)]
    # A restart finds that failure: no second job for the acquisition as it is.
    harness.stop()
    harness.watcher("polling", missing_timeout=1.0)
    time.sleep(2.5)
    assert len(jobs_of(store)) == 1


def test_checksum_mismatch_of_a_complete_file_fails_after_the_quiet_period(harness, store):
    harness.watcher("events", missing_timeout=3600.0)  # not waited for: waiting cannot fix it
    folder = harness.drop / "acq"
    write_manifest(folder, {"a.tif": b"original"})
    manifest = json.loads((folder / "watchfolder.json").read_text())
    (folder / "a.tif").write_bytes(b"corrupt!")  # same size, other bytes
    (folder / "watchfolder.json").write_text(json.dumps(manifest))
    job = one_job(store)[0]
    assert job.state == JobState.FAILED
    assert job.error.message.startswith("checksum of a.tif does not match the manifest")


# ---------------------------------------------------------------------------
# Post-actions


def finish(store, job, ok=True, result=None):
    """Play the worker: claim the job and end it."""
    claimed = store.claim("test-worker")
    assert claimed is not None and claimed.id == job.id
    if ok:
        return store.succeed(job.id, "test-worker", result or {"verified": True, "image_ids": [1]})
    return store.fail(job.id, "test-worker", PermanentImportError("unsupported file format"))


def finish_all(store, outcomes: dict):
    """Claim every queued job and end it by its folder name: a result dict, or an exception to fail with."""
    for _ in range(len(outcomes)):
        job = store.claim("test-worker")
        outcome = outcomes[Path(job.spec.root).name]
        if isinstance(outcome, Exception):
            store.fail(job.id, "test-worker", outcome)
        else:
            store.succeed(job.id, "test-worker", outcome)


def test_keep_writes_a_receipt_and_is_not_requeued(harness, store):
    w = harness.watcher("events")
    folder = harness.drop / "acq"
    write_manifest(folder, {"a.tif": b"a"})
    job = one_job(store)[0]
    finish(store, job)
    receipt = harness.drop / "acq.watchfolder-receipt.json"
    wait_until(receipt.exists, 10, message="receipt")
    data = json.loads(receipt.read_text())
    assert data["job_id"] == job.id and data["state"] == "succeeded" and data["result"]["image_ids"] == [1]
    assert (folder / "a.tif").exists()
    w.rescan_requested = True
    w.wake.set()
    wait_until(lambda: w.counters["rescans"] >= 2, 5)
    assert len(jobs_of(store)) == 1
    assert store.followups("watch:drop") == []


def test_move_on_success_and_on_failure(harness, store, tmp_path):
    done, failed = tmp_path / "done", tmp_path / "failed"
    harness.watcher("events", on_success={"action": "move", "folder": str(done)},
                    on_failure={"action": "move", "folder": str(failed)})
    write_manifest(harness.drop / "good", {"a.tif": b"a"})
    write_manifest(harness.drop / "bad", {"b.tif": b"b"})
    wait_until(lambda: len(jobs_of(store)) == 2, 10)
    finish_all(store, {"good": {"verified": True}, "bad": PermanentImportError("unsupported file format")})
    wait_until(lambda: store.followups("watch:drop") == [], 10, message="post-actions done")
    assert (done / "good" / "a.tif").exists() and (failed / "bad" / "b.tif").exists()
    assert json.loads((done / "good.watchfolder-receipt.json").read_text())["state"] == "succeeded"
    assert "unsupported file format" in (failed / "bad.watchfolder-error.txt").read_text()
    assert not (harness.drop / "good").exists() and not (harness.drop / "bad").exists()
    # Moving away is not a change that makes new jobs.
    assert len(jobs_of(store)) == 2


def test_move_never_overwrites(harness, store, tmp_path):
    done = tmp_path / "done"
    (done / "acq").mkdir(parents=True)
    (done / "acq" / "older.tif").write_bytes(b"older")
    harness.watcher("events", on_success={"action": "move", "folder": str(done)})
    write_manifest(harness.drop / "acq", {"a.tif": b"a"})
    finish(store, one_job(store)[0])
    wait_until(lambda: store.followups("watch:drop") == [], 10, message="post-action done")
    assert (done / "acq (2)" / "a.tif").exists()
    assert (done / "acq" / "older.tif").read_bytes() == b"older"


def test_failure_moves_to_failed_folder_with_error_report(harness, store, tmp_path):
    failed = tmp_path / "failed"
    harness.watcher("events", on_failure={"action": "move", "folder": str(failed)})
    write_manifest(harness.drop / "bad", {"b.tif": b"b"})
    job = one_job(store)[0]
    finish(store, job, ok=False)
    wait_until(lambda: (failed / "bad.watchfolder-error.txt").exists(), 10, message="error report")
    assert (failed / "bad" / "b.tif").exists()
    report = (failed / "bad.watchfolder-error.txt").read_text()
    assert f"job {job.id}" in report and "unsupported file format" in report


def test_rejected_input_kept_with_error_report(harness, store):
    harness.watcher("events")
    folder = harness.drop / "bad"
    folder.mkdir()
    (folder / "watchfolder.json").write_text("{not json")
    one_job(store)
    report = harness.drop / "bad.watchfolder-error.txt"
    wait_until(report.exists, 10, message="error report")
    assert "invalid JSON at line 1, column 2" in report.read_text()
    assert (folder / "watchfolder.json").read_text() == "{not json"


def test_delete_only_after_verified_success(harness, store):
    harness.watcher("events", on_success="delete")
    write_manifest(harness.drop / "verified", {"a.tif": b"a", "sub/b.tif": b"b"})
    write_manifest(harness.drop / "unverified", {"c.tif": b"c"})
    write_manifest(harness.drop / "failed", {"d.tif": b"d"})
    write_manifest(harness.drop / "changed", {"e.tif": b"e"})
    (harness.drop / "verified" / "notes.txt").write_bytes(b"not listed, not imported")
    wait_until(lambda: len(jobs_of(store)) == 4, 10)
    by_root = {Path(j.spec.root).name: j for j in jobs_of(store)}
    # Rewritten after detection (same size, new mtime): what was imported is not what is there.
    st = os.stat(harness.drop / "changed" / "e.tif")
    (harness.drop / "changed" / "e.tif").write_bytes(b"E")
    os.utime(harness.drop / "changed" / "e.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    finish_all(store, {"verified": {"verified": True}, "unverified": {"verified": False},
                       "failed": PermanentImportError("boom"), "changed": {}})
    wait_until(lambda: store.followups("watch:drop") == [], 10, message="post-actions done")
    # followup_done commits, then appends its note to the log file: wait for the last note.
    wait_until(lambda: "the files changed since" in store.read_log(by_root["changed"].id), 10)
    wait_until(lambda: "deleted 3 file(s)" in store.read_log(by_root["verified"].id), 10)
    verified = harness.drop / "verified"
    assert not (verified / "a.tif").exists() and not (verified / "sub").exists()
    assert not (verified / "watchfolder.json").exists()
    assert (verified / "notes.txt").read_bytes() == b"not listed, not imported"
    assert "deleted 3 file(s)" in store.read_log(by_root["verified"].id)
    assert (harness.drop / "unverified" / "c.tif").exists()
    assert "not deleted (the importer did not verify the copy)" in store.read_log(by_root["unverified"].id)
    assert (harness.drop / "changed" / "e.tif").read_bytes() == b"E"
    assert "the files changed since they were detected" in store.read_log(by_root["changed"].id)
    assert (harness.drop / "failed" / "d.tif").exists()
    assert (harness.drop / "failed.watchfolder-error.txt").exists()


# ---------------------------------------------------------------------------
# Never lose one: overflow, watch limits, network shares, alerts


class DeafEventSource(EventSource):
    """Real inotify, but events can be dropped, as the kernel does when its queue overflows."""

    deaf = threading.Event()

    def __init__(self, root, sink):
        def filtered(*event):
            if not DeafEventSource.deaf.is_set():
                sink(*event)

        super().__init__(root, filtered)


def test_overflow_triggers_a_rescan_that_finds_lost_acquisitions(harness, store):
    DeafEventSource.deaf.clear()
    w = harness.watcher("events", options={"event_source": DeafEventSource}, rescan_interval=3600)
    DeafEventSource.deaf.set()
    try:
        write_manifest(harness.drop / "lost in overflow", {"a.tif": b"a"})
        # Show that the events were really lost: nothing becomes pending.
        events = w.counters["events"]
        w.wake.set()
        wait_until(lambda: w.status()["known"] == 0 and w.counters["events"] == events, 2)
        assert jobs_of(store) == []
    finally:
        DeafEventSource.deaf.clear()
    # What watchdog logs when the kernel reports IN_Q_OVERFLOW.
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")
    job = one_job(store)[0]
    assert Path(job.spec.root).name == "lost in overflow"
    assert w.counters["overflows"] == 1 and w.counters["catchups"] == 1 and w.counters["rescans"] == 1


def _overflow():
    # What watchdog logs when the kernel reports IN_Q_OVERFLOW.
    logging.getLogger("watchdog.observers.inotify_c").warning("Inotify queue overflowed; filesystem events were lost")


def test_reading_the_tree_queues_no_events(tmp_path):
    # Listing folders and reading manifests (what every scan does) must not queue
    # inotify events: on a big tree they overflowed the kernel's queue, and the
    # catch-up scan overflowed it again.
    for i in range(20):
        (tmp_path / f"acq{i}").mkdir()
        (tmp_path / f"acq{i}" / "watchfolder.json").write_text("{}")
    seen = []
    changed = threading.Event()

    def sink(event_type, src, dest, is_dir):
        seen.append((event_type, src))
        if src.endswith("marker"):
            changed.set()

    source = EventSource(str(tmp_path), sink)
    source.start()
    try:
        for i in range(20):
            os.listdir(tmp_path / f"acq{i}")
            (tmp_path / f"acq{i}" / "watchfolder.json").read_bytes()
        (tmp_path / "marker").write_bytes(b"")  # a change, so we know the events before it arrived
        assert changed.wait(5), "the observer saw no change"
    finally:
        source.stop()
    assert [e for e in seen if not e[1].endswith("marker") and e[1] != str(tmp_path)] == []


def test_overflows_coalesce_into_one_catch_up(harness, store):
    import watchfolder.watch.watcher as watcher_module

    w = harness.watcher("events", options={"event_source": DeafEventSource}, rescan_interval=3600)
    DeafEventSource.deaf.set()
    try:
        write_manifest(harness.drop / "lost", {"a.tif": b"a"})
        for _ in range(watcher_module.OVERFLOW_LIMIT - 1):
            _overflow()
    finally:
        DeafEventSource.deaf.clear()
    one_job(store)
    wait_until(lambda: not w.overflow_pending, 5, message="overflows caught up")
    assert w.counters["overflows"] == watcher_module.OVERFLOW_LIMIT - 1
    # One catch-up, or two when the watcher's step ran between the overflows; never a full rescan.
    assert 1 <= w.counters["catchups"] <= 2 and w.counters["rescans"] == 1
    assert w.status()["mode"] == "events"


def test_repeated_overflows_switch_to_polling_and_name_the_sysctl(harness, store):
    import watchfolder.watch.watcher as watcher_module

    w = harness.watcher("events", rescan_interval=3600)
    for _ in range(watcher_module.OVERFLOW_LIMIT):
        _overflow()
    w.wake.set()
    wait_until(lambda: w.status()["mode"] == "polling", 5, message="polling after repeated overflows")
    status = w.status()
    assert status["health"] == "ok"
    assert "fs.inotify.max_queued_events" in status["warning"] and "sysctl -w" in status["warning"]
    assert w.source_obj is None
    write_manifest(harness.drop / "acq", {"a.tif": b"a"})
    one_job(store)


class LimitedEventSource:
    """An observer that cannot start: inotify's watch limit is reached."""

    def __init__(self, root, sink):
        self.root = root

    def start(self):
        from watchfolder.watch.watcher import _limit_message

        raise WatchLimitError(errno.ENOSPC, _limit_message(OSError(errno.ENOSPC, "limit"), self.root))


def test_watch_limit_names_the_sysctl_and_falls_back_to_polling(harness, store):
    w = harness.watcher("events", options={"event_source": LimitedEventSource})
    status = w.status()
    assert status["mode"] == "polling" and status["health"] == "ok"
    assert "fs.inotify.max_user_watches" in status["warning"] and "sysctl -w" in status["warning"]
    write_manifest(harness.drop / "acq", {"a.tif": b"a"})
    one_job(store)


def test_auto_mode_polls_network_shares_and_watches_local_disks(harness, store):
    local = harness.watcher("auto")
    assert local.status()["mode"] == "events"
    local.stop()
    share = harness.watcher("auto", options={"mount_lookup": lambda p: Mount("/mnt/share", "cifs", "//nas/x")})
    assert share.status()["mode"] == "polling" and share.status()["fs_type"] == "cifs"
    write_manifest(harness.drop / "acq", {"a.tif": b"a"})
    one_job(store)


def test_unmounted_share_stays_unhealthy_until_mounted_again(harness, store):
    mounted = threading.Event()
    mounted.set()

    def lookup(path):
        return Mount("/mnt/share", "nfs4", "nas:/x") if mounted.is_set() else Mount("/", "ext4", "/dev/vda")

    w = harness.watcher("auto", options={"mount_lookup": lookup})
    assert w.status()["mode"] == "polling"
    # Unmount: the mount point is an empty local folder again (a new inode).
    mounted.clear()
    os.rename(harness.drop, harness.tmp_path / "share-data")
    harness.drop.mkdir()
    wait_until(lambda: w.status()["health"] == "unhealthy", 10)
    wait_until(lambda: "share is not mounted" in (w.status()["error"] or ""), 10, message="names the unmounted share")
    # Mount again, with an acquisition that arrived on the server meanwhile.
    write_manifest(harness.tmp_path / "share-data" / "meanwhile", {"a.tif": b"a"})
    harness.drop.rmdir()
    os.rename(harness.tmp_path / "share-data", harness.drop)
    mounted.set()
    wait_until(lambda: w.status()["health"] == "ok", 10)
    one_job(store)


def test_service_mails_admin_when_a_watcher_stays_unhealthy(tmp_path, store, make_config):
    drop = tmp_path / "drop"
    drop.mkdir()
    cfg = make_config(
        watch=[{"name": "scope1", "path": str(drop), "mode": "polling", "quiet_period": 0.2, "poll_interval": 0.1}],
        notify={"watcher_unhealthy_after": 30},
    )
    service = WatchService(cfg, store, Notifier(cfg), restart_backoff=(0.2,), health_interval=0.1)
    service.start()
    try:
        w = service.watchers[0]
        wait_until(lambda: w.status()["health"] == "ok", 10)
        drop.rmdir()
        wait_until(lambda: w.status()["health"] == "unhealthy", 10)
        since = w.status()["unhealthy_since"]
        assert service.loop(now=since + 10) == []  # not long enough yet
        assert service.loop(now=since + 31) == ["scope1"]
        assert service.loop(now=since + 60) == []  # once per unhealthy period
        mails = store.outbox_list()
        assert len(mails) == 1
        assert "admin@example.org" in mails[0].recipients
        assert "scope1" in mails[0].subject or "scope1" in mails[0].raw.decode("utf-8", "replace")
        drop.mkdir()
        wait_until(lambda: w.status()["health"] == "ok", 10)
        assert service.status()[0]["name"] == "scope1"
    finally:
        service.stop()
    assert store.components("watcher")[0]["status"]["health"] == "stopped"


def test_acquisitions_found_together_are_queued_in_one_transaction(harness, store):
    # Issue 13: a share that comes back with thousands of finished acquisitions was
    # queued one transaction (one commit) per acquisition.
    for i in range(30):
        (harness.drop / f"acq {i:02d}").mkdir()
        (harness.drop / f"acq {i:02d}" / "a.tif").write_bytes(b"%d" % i)
        (harness.drop / f"acq {i:02d}" / "watchfolder.json").write_text(json.dumps({"owner": "jdoe",
                                                                                  "target": TARGET}))
    batches, singles = [], []
    real_many, real_one = store.enqueue_many, store.enqueue
    failures = ["database is locked"]  # the first batch meets a busy store

    def enqueue_many(items, **kwargs):
        items = list(items)
        if failures:
            raise sqlite3.OperationalError(failures.pop())
        batches.append(len(items))
        return real_many(items, **kwargs)

    store.enqueue_many = enqueue_many
    store.enqueue = lambda *a, **k: singles.append(a) or real_one(*a, **k)
    w = harness.watcher("polling", start=False)
    start = time.time()
    w.loop(now=start)  # the start-up scan finds all 30, not quiet yet
    w.loop(now=start + 1)  # quiet: all 30 complete in one step; the store is busy
    assert jobs_of(store) == [] and w.status()["pending"] == 30 and "database is locked" in w.error
    w.loop(now=start + 1 + 5.5)  # tried again after STORE_RETRY_SECONDS: one batch
    assert batches == [30] and singles == []
    jobs = jobs_of(store)
    assert sorted(Path(j.spec.root).name for j in jobs) == [f"acq {i:02d}" for i in range(30)]
    assert len({j.idempotency_key for j in jobs}) == 30
