"""Why is my data not in yet: pending reasons from real drops, kept in the store, shown by `pending` and `explain`."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

import pytest
import yaml
from helpers import TARGET, wait_until

from watchfolder import config as configmod
from watchfolder.job import JobState
from watchfolder.store import open_store
from watchfolder.watch.detector import Detector
from watchfolder.watch.explain import explain
from watchfolder.watch.watcher import Watcher

T0 = 1_000_000.0  # an injected clock far from the files' real mtimes


def jobs_of(store):
    return store.list_jobs(limit=1000)[0]


def _watch(name, path, **kw):
    entry = {"name": name, "path": str(path), "mode": "events", "quiet_period": 0.3, "poll_interval": 0.1,
             "missing_timeout": 600}
    entry.update(kw)
    return entry


@pytest.fixture
def drops(tmp_path):
    out = {}
    for name in ("manifest", "sidecar", "slow"):
        out[name] = tmp_path / "drop" / name
        out[name].mkdir(parents=True)
    return out


@pytest.fixture
def config(tmp_path, drops, clean_env):
    """A config file on disk (the CLI reads it in another process) with three watch folders."""
    raw = {
        "data_dir": str(tmp_path / "data"),
        "importer": {"kind": "archive", "archive": {"root": str(tmp_path / "archive")}},
        "notify": {"transport": "folder", "admin_email": "admin@example.org"},
        "watch": [
            _watch("manifest", drops["manifest"], sidecars=False),
            _watch("sidecar", drops["sidecar"], detection="sidecar"),
            _watch("slow", drops["slow"], quiet_period=3600),
        ],
    }
    path = tmp_path / "watchfolder.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return configmod.load(path, environ={})


@pytest.fixture
def store(config):
    s = open_store(config)
    yield s
    s.close()


@pytest.fixture
def watchers(config, store):
    started = [Watcher(w, store, health_interval=0.1, status_interval=0.1) for w in config.watch]
    for w in started:
        w.start()
    for w in started:
        wait_until(lambda w=w: w.status().get("health") == "ok", 10, message="watcher healthy")
    yield {w.name: w for w in started}
    for w in started:
        w.stop()


def _manifest(folder, present: dict[str, bytes], listed: dict[str, int], owner="jdoe"):
    folder.mkdir(parents=True, exist_ok=True)
    for rel, data in present.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    files = [{"path": rel, "size": size} for rel, size in listed.items()]
    (folder / "watchfolder.json").write_text(json.dumps({"owner": owner, "target": TARGET, "files": files}))


def _pending_reason(store, watch, path, pattern):
    def find():
        for e in store.pending_list(watch=watch):
            if e.path == path and re.search(pattern, e.reason):
                return e
        return None
    return wait_until(find, 10, message=f"pending {watch}:{path} matching {pattern!r}")


def _polling_site(make_config, tmp_path, **watch):
    """A store and a polling watch folder "w" (quiet 10 s) driven with an injected clock."""
    store = open_store(make_config())
    drop = tmp_path / "drop"
    drop.mkdir(exist_ok=True)
    entry = {"name": "w", "path": str(drop), "mode": "polling", "quiet_period": 10, "poll_interval": 1,
             "missing_timeout": 100, "rescan_interval": 1000, **watch}
    return store, drop, make_config(watch=[entry])


def cli(config_path, *args):
    return subprocess.run([sys.executable, "-m", "watchfolder", *args, "--config", str(config_path)],
                          capture_output=True, text=True, timeout=60)


def test_each_pending_reason_from_a_real_drop_in_the_store_pending_and_explain(
        watchers, store, config, drops, tmp_path):
    # Waiting for files: 2 of 5 listed files are not there.
    five = {"a.tif": 10, "b/c.tif": 10, "d.tif": 10, "e.tif": 10, "f.tif": 10}
    _manifest(drops["manifest"] / "plate1", {k: b"x" * 10 for k in ("d.tif", "e.tif", "f.tif")}, five)
    # Wrong size: the file is there but shorter than listed.
    _manifest(drops["manifest"] / "short", {"x.tif": b"x" * 1000}, {"x.tif": 4096})
    # A sidecar whose data file has not arrived.
    (drops["sidecar"] / "d.czi.json").write_text(json.dumps({"owner": "asmith", "target": TARGET}))
    # Still being written: a quiet period of an hour has not passed (sizes without
    # checksums prove nothing, so the quiet period applies).
    _manifest(drops["slow"] / "live", {"a.tif": b"a"}, {"a.tif": 1})

    missing = _pending_reason(store, "manifest", "plate1", r"^waiting for 2 of 5 files \(missing: a\.tif, b/c\.tif\)$")
    assert missing.kind == "waiting" and missing.owner == "jdoe"
    short = _pending_reason(store, "manifest", "short", r"^size of x\.tif is 1,000 bytes, manifest says 4,096$")
    assert short.kind == "size"
    sidecar = _pending_reason(store, "sidecar", "d.czi", r"^sidecar names data file d\.czi, which is missing$")
    assert sidecar.owner == "asmith"
    live = _pending_reason(store, "slow", "live", r"^still being written: last change \d+ s ago, quiet until")
    assert live.kind == "writing" and live.quiet_until >= live.last_change + 3600
    assert jobs_of(store) == []

    # explain: the same words for the acquisitions and any path inside them, plus what is not one.
    (drops["manifest"] / "scan.tmp").write_bytes(b"t")
    (drops["manifest"] / "loose.czi").write_bytes(b"c")
    (drops["manifest"] / "loose.czi.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    answers = {
        "plate1/d.tif": ("pending", "part of acquisition plate1: waiting for 2 of 5 files (missing: a.tif, b/c.tif)"),
        "short": ("pending", "size of x.tif is 1,000 bytes, manifest says 4,096"),
        "scan.tmp": ("ignored", "ignored: matches exclude pattern *.tmp"),
        "loose.czi": ("not_acquisition", "not an acquisition here: loose.czi + loose.czi.json is a sidecar pair, but "
                      "watch folder 'manifest' takes watchfolder.json manifests only (sidecars: false); set sidecars: "
                      "true on the watch folder"),
        # The pair's descriptor: the same answer as its data file (outside test finding 10).
        "loose.czi.json": ("not_acquisition", "not an acquisition here: loose.czi + loose.czi.json is a sidecar "
                           "pair, but watch folder 'manifest' takes watchfolder.json manifests only (sidecars: false); "
                           "set sidecars: true on the watch folder"),
    }
    for rel, (verdict, reason) in answers.items():
        got = explain(config, store, str(drops["manifest"] / rel))
        assert (got.verdict, got.watch) == (verdict, "manifest"), got
        assert got.reason.startswith(reason), got.reason
    # The pair is listed as pending with the same words and fix (finding 9).
    stray = _pending_reason(store, "manifest", "loose.czi", r"^not an acquisition here: loose\.czi \+ loose\.czi\.json "
                            r"is a sidecar pair, .*sidecars: false\); set sidecars: true")
    assert stray.kind == "not_acquisition"
    got = explain(config, store, str(drops["sidecar"] / "d.czi.json"))
    assert got.reason == "part of acquisition d.czi: sidecar names data file d.czi, which is missing"
    got = explain(config, store, str(drops["slow"] / "live" / "a.tif"))
    assert got.verdict == "pending" and "still being written: last change" in got.reason
    assert explain(config, store, str(tmp_path)).verdict == "outside"
    assert explain(config, store, str(drops["manifest"] / "nothere")).verdict == "not_found"
    # A name with a newline cannot forge lines in explain's output.
    odd = drops["manifest"] / "acq\nforged: imported"
    odd.mkdir()
    out = cli(config.path, "explain", str(odd))
    assert out.returncode == 0 and "acq\\nforged: imported" in out.stdout
    assert not any(line.startswith("forged") for line in out.stdout.splitlines())

    # The command line shows the same, from another process.
    out = cli(config.path, "pending")
    assert out.returncode == 0, out.stderr
    assert "manifest: plate1  (owner jdoe)" in out.stdout
    assert "    waiting for 2 of 5 files (missing: a.tif, b/c.tif)" in out.stdout
    assert "    sidecar names data file d.czi, which is missing" in out.stdout
    data = json.loads(cli(config.path, "pending", "--owner", "asmith", "--json").stdout)
    assert [(e["watch"], e["path"]) for e in data["pending"]] == [("sidecar", "d.czi")]
    out = cli(config.path, "explain", str(drops["manifest"] / "scan.tmp"), str(drops["manifest"] / "short"))
    assert out.returncode == 0, out.stderr
    assert "ignored: matches exclude pattern *.tmp" in out.stdout
    assert "size of x.tif is 1,000 bytes, manifest says 4,096" in out.stdout
    data = json.loads(cli(config.path, "explain", "--json", str(drops["manifest"] / "loose.czi")).stdout)
    assert data["paths"][0]["verdict"] == "not_acquisition"

    # Once the files arrive the entry leaves the list and explain names the job.
    for rel in ("a.tif", "b/c.tif"):
        (drops["manifest"] / "plate1" / rel).parent.mkdir(parents=True, exist_ok=True)
        (drops["manifest"] / "plate1" / rel).write_bytes(b"x" * 10)
    wait_until(lambda: jobs_of(store), 15, message="plate1 queued")
    wait_until(lambda: all(e.path != "plate1" for e in store.pending_list(watch="manifest")), 10)
    got = explain(config, store, str(drops["manifest"] / "plate1"))
    assert got.verdict == "job" and got.job_id == jobs_of(store)[0].id
    assert got.reason == f"became job {got.job_id}, queued"


def test_failures_that_waiting_cannot_fix_fail_after_the_quiet_period(watchers, store, drops):
    # A complete file (the listed size matches) with other content: fails now, not after missing_timeout (600 s).
    folder = drops["manifest"] / "corrupt"
    good = b"original"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"corrupt!")
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [
        {"path": "a.tif", "size": len(good), "sha256": hashlib.sha256(good).hexdigest()}]}))
    (job,) = wait_until(lambda: jobs_of(store), 15, message="the checksum failure")
    assert job.state == JobState.FAILED
    assert job.error.message.startswith("checksum of a.tif does not match the manifest: the size is right")
    # The job shows the files detection saw (the outside try saw "0 file(s), 0 B" on rejected jobs).
    assert [(f.path, f.size) for f in job.spec.files] == [("a.tif", 8)]

    # A file larger than the manifest says: waiting cannot shrink it (finding 10).
    big = drops["manifest"] / "big"
    big.mkdir()
    (big / "x.tif").write_bytes(b"x" * 5000)
    (big / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [
        {"path": "x.tif", "size": 4096}]}))
    failed_big = wait_until(lambda: [j for j in jobs_of(store) if j.spec.extra.get("acquisition") == "big"], 15,
                            message="the oversize failure")
    assert failed_big[0].state == JobState.FAILED
    assert failed_big[0].error.message.startswith("x.tif is 5,000 bytes, the manifest says 4,096: larger than listed")
    assert [(f.path, f.size) for f in failed_big[0].spec.files] == [("x.tif", 5000)]  # as found on disk

    # A sidecar whose data file was there and is gone after the quiet period.
    data = drops["sidecar"] / "cells.czi"
    sidecar = drops["sidecar"] / "cells.czi.json"
    data.write_bytes(b"pixels")
    sidecar.write_text(json.dumps({"owner": "jdoe", "target": TARGET,
                                   "files": [{"path": "cells.czi", "size": 99}]}))
    _pending_reason(store, "sidecar", "cells.czi", r"^size of cells\.czi is 6 bytes, sidecar says 99$")
    data.unlink()
    failed = wait_until(lambda: [j for j in jobs_of(store) if j.spec.extra.get("acquisition") == "cells.czi"], 15,
                        message="the sidecar failure")
    assert failed[0].state == JobState.FAILED
    assert failed[0].error.message.startswith("sidecar names data file cells.czi, which is missing (it was there")


def test_a_restart_keeps_the_first_sighting_and_the_missing_timeout_clock(make_config, tmp_path):
    store, drop, cfg = _polling_site(make_config, tmp_path)
    first = Watcher(cfg.watch[0], store)
    first.loop(now=T0)
    _manifest(drop / "acq", {}, {"later.tif": 3})
    first.loop(now=T0 + 1)
    first.loop(now=T0 + 12)
    (entry,) = store.pending_list(watch="w")
    assert (entry.first_seen, entry.reason) == (T0 + 1, "waiting for 1 of 1 file (missing: later.tif)")
    first.stop()

    # The service restarts 50 s later: the acquisition was first seen at T0 + 1, not now.
    second = Watcher(cfg.watch[0], store)
    second.loop(now=T0 + 60)
    second.loop(now=T0 + 75)
    (entry,) = store.pending_list(watch="w")
    assert entry.first_seen == T0 + 1
    assert jobs_of(store) == []
    # missing_timeout (100 s) counts from before the restart: it fails at T0 + 101, not T0 + 160.
    second.loop(now=T0 + 102)
    (job,) = jobs_of(store)
    assert job.state == JobState.FAILED and "waiting for 1 of 1 file (missing: later.tif)" in job.error.message
    second.loop(now=T0 + 103)
    assert store.pending_list(watch="w") == []
    store.close()


def test_a_name_that_is_not_utf8_is_listed_escaped_and_never_blocks_the_others(make_config, tmp_path, caplog):
    store, drop, cfg = _polling_site(make_config, tmp_path)
    bad = bytes(drop) + b"/bad\xff\xfename"
    os.makedirs(bad)
    with open(bad + b"/watchfolder.json", "w") as fh:
        fh.write(json.dumps({"owner": "jdoe", "files": [{"path": "a.tif"}]}))
    first = Watcher(cfg.watch[0], store)
    first.loop(now=T0)
    _manifest(drop / "acq", {}, {"later.tif": 3})
    first.loop(now=T0 + 1)
    first.loop(now=T0 + 12)
    listed = {e.path: e for e in store.pending_list(watch="w")}
    assert set(listed) == {"bad\\udcff\\udcfename", "acq"}
    assert listed["bad\\udcff\\udcfename"].kind == "unreadable"
    assert "is not valid UTF-8" in listed["bad\\udcff\\udcfename"].reason
    assert listed["acq"].reason == "waiting for 1 of 1 file (missing: later.tif)"
    status_paths = {p["path"] for p in first.status()["pending_acquisitions"]}
    assert status_paths == {"bad\\udcff\\udcfename", "acq"}
    first.stop()

    # A restart keeps both first sightings (the clock of missing_timeout goes on).
    second = Watcher(cfg.watch[0], store)
    second.loop(now=T0 + 60)
    assert {e.path: e.first_seen for e in store.pending_list(watch="w")} == {
        "bad\\udcff\\udcfename": T0, "acq": T0 + 1}

    # A store that refuses the list says so in the log, once, and the next step records it.
    real = store.pending_sync
    calls = []

    def refuse(*args, **kw):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("disk I/O error")
        return real(*args, **kw)

    store.pending_sync = refuse
    (drop / "acq" / "later.tif").write_bytes(b"ab")
    with caplog.at_level("WARNING", logger="watchfolder"):
        second.loop(now=T0 + 62)
        second.loop(now=T0 + 75)
    assert "cannot record its 2 pending acquisitions in the store (RuntimeError: disk I/O error)" in caplog.text
    assert len(calls) >= 2
    assert {e.path for e in store.pending_list(watch="w")} == {"bad\\udcff\\udcfename", "acq"}
    second.stop()
    store.close()


def test_no_retry_for_a_cause_in_the_files_survives_a_retry_that_fails_again(watchers, store, config, drops):
    """Finding 7: a checksum failure retried unchanged fails again and still says 'no retry'."""
    import functools

    from watchfolder.importers import create_importer
    from watchfolder.watch.redetect import redetect
    from watchfolder.worker import Worker

    folder = drops["manifest"] / "badsum"
    folder.mkdir()
    (folder / "a.tif").write_bytes(b"corrupt!")
    (folder / "watchfolder.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET, "files": [
        {"path": "a.tif", "size": 8, "sha256": hashlib.sha256(b"original").hexdigest()}]}))
    (job,) = wait_until(lambda: jobs_of(store), 15, message="the checksum failure")
    assert job.state == JobState.FAILED and job.to_dict()["cause_in_files"] is True
    store.retry(job.id, by="api:admin")
    worker = Worker(store, create_importer(config), name="w1", redetect=functools.partial(redetect, config=config))
    worker.loop()
    again = store.get(job.id)
    assert again.state == JobState.FAILED and again.attempts >= 1
    assert "checksum of a.tif does not match" in again.error.message
    assert again.to_dict()["cause_in_files"] is True
    # Fixed on disk, a retry imports it, and the mark is gone with the cause.
    (folder / "a.tif").write_bytes(b"original")
    store.retry(job.id, by="api:admin")
    worker.loop()
    fixed = store.get(job.id)
    assert fixed.state == JobState.SUCCEEDED and fixed.to_dict()["cause_in_files"] is False


def test_a_sidecars_data_file_gone_within_the_quiet_period_fails_after_it(make_config, tmp_path):
    """Finding 8: data file and sidecar arrive, the data file is removed 4 s later (quiet period 8 s):
    the sidecar's data file was there, waiting cannot bring it back, so it fails after the quiet period."""
    store = open_store(make_config())
    drop = tmp_path / "side"
    drop.mkdir()
    cfg = make_config(watch=[{"name": "side", "path": str(drop), "mode": "events", "detection": "sidecar",
                              "quiet_period": 8, "missing_timeout": 3600}])
    watcher = Watcher(cfg.watch[0], store)
    watcher.loop(now=T0)
    (drop / "gone2.czi").write_text("data\n")
    (drop / "gone2.czi.json").write_text(json.dumps({"owner": "jdoe", "target": {"dataset": "G"}}))

    def seen(now):
        watcher.loop(now=now)
        return "gone2.czi" in watcher.detector.known or None
    wait_until(lambda: seen(T0 + 1), 10, message="the pair seen by events")
    before = watcher.counters["events"]
    (drop / "gone2.czi").unlink()

    def removal_seen():
        watcher.loop(now=T0 + 4)
        return watcher.counters["events"] > before
    wait_until(removal_seen, 10, message="the removal seen")
    watcher.loop(now=T0 + 30)
    (job,) = jobs_of(store)
    assert job.state == JobState.FAILED
    assert job.error.message.startswith("sidecar names data file gone2.czi, which is missing (it was there")
    assert job.owner == "jdoe"
    assert store.pending_list(watch="side") == []
    watcher.stop()
    store.close()


def test_a_failed_acquisition_stays_accounted_for_across_a_restart(make_config, tmp_path):
    """Finding 3: failed on missing_timeout, then a restart: not pending again, not counted, explain names the job."""
    store, drop, cfg = _polling_site(make_config, tmp_path)
    first = Watcher(cfg.watch[0], store)
    first.loop(now=T0)
    _manifest(drop / "acq", {}, {"later.tif": 3})
    for t in (1, 12, 102, 103, 200):
        first.loop(now=T0 + t)
    (job,) = jobs_of(store)
    assert job.state == JobState.FAILED
    wait_until(lambda: (drop / "acq.watchfolder-error.txt").exists() or first.loop(now=T0 + 210), 10,
               message="the error report beside the acquisition")
    first.stop()

    second = Watcher(cfg.watch[0], store)
    for t in (300, 301, 320, 420, 520):
        second.loop(now=T0 + t)
        assert store.pending_list(watch="w") == [], t
        assert second.status()["pending"] == 0 and second.status()["pending_acquisitions"] == []
    assert [j.id for j in jobs_of(store)] == [job.id]
    got = explain(cfg, store, str(drop / "acq"))
    assert (got.verdict, got.job_id) == ("job", job.id)
    assert got.reason.startswith(f"became job {job.id}, failed: incomplete after 100 s")
    second.stop()

    # Without the error report (removed by a user) it is looked at once, then accounted for too.
    (drop / "acq.watchfolder-error.txt").unlink()
    third = Watcher(cfg.watch[0], store)
    for t in (600, 601, 620, 640):
        third.loop(now=T0 + t)
    assert store.pending_list(watch="w") == [] and [j.id for j in jobs_of(store)] == [job.id]
    third.stop()
    store.close()


def test_a_restart_writes_no_change_note_and_lists_no_imported_acquisition(make_config, tmp_path):
    """Finding 6: an imported, kept acquisition is neither 'changed after this import' nor pending after a start."""
    store, drop, cfg = _polling_site(make_config, tmp_path)
    _manifest(drop / "acq", {"a.tif": b"abc"}, {"a.tif": 3})
    first = Watcher(cfg.watch[0], store)
    for t in (0, 1, 12, 13):
        first.loop(now=T0 + t)
    (job,) = jobs_of(store)
    assert store.claim("w1", now=T0 + 14).id == job.id
    store.succeed(job.id, "w1", {"archive_path": "/x"}, now=T0 + 15)
    wait_until(lambda: (drop / "acq.watchfolder-receipt.json").exists() or first.loop(now=T0 + 20), 10,
               message="the receipt beside the acquisition")
    first.stop()

    for start in (100, 200, 300):  # three restarts
        again = Watcher(cfg.watch[0], store)
        for t in (0, 1, 12, 13, 30):
            again.loop(now=T0 + start + t)
            assert store.pending_list(watch="w") == [], (start, t)
            assert again.status()["pending"] == 0
        again.stop()
    assert "changed after this import" not in store.read_log(job.id)
    assert [j.id for j in jobs_of(store)] == [job.id]

    # A real change (a viewer's cache file) is still noted, once, and not imported again.
    (drop / "acq" / "thumbs.db").write_bytes(b"cache")
    last = Watcher(cfg.watch[0], store)
    for t in (0, 1, 12, 13, 30):
        last.loop(now=T0 + 400 + t)
    last.stop()
    assert store.read_log(job.id).count("changed after this import") == 1
    assert [j.id for j in jobs_of(store)] == [job.id]
    store.close()


def test_explain_follows_the_watchers_rule_for_sidecar_pairs_in_a_manifest_folder(make_config, tmp_path):
    """Finding 4: with sidecars: true (the default) explain names the pair's job or its pending reason."""
    store, drop, cfg = _polling_site(make_config, tmp_path, missing_timeout=600)
    (drop / "m2").mkdir()
    (drop / "single").mkdir()
    (drop / "m2" / "ok.czi").write_bytes(b"pixels")
    (drop / "m2" / "ok.czi.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    (drop / "single" / "d.czi.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    watcher = Watcher(cfg.watch[0], store)
    for t in (0, 1, 12, 13, 25):
        watcher.loop(now=T0 + t)
    (job,) = jobs_of(store)
    assert job.spec.extra["acquisition"] == "m2/ok.czi"
    assert [e.path for e in store.pending_list(watch="w")] == ["single/d.czi"]
    for rel in ("m2/ok.czi", "m2/ok.czi.json"):
        got = explain(cfg, store, str(drop / rel))
        assert (got.verdict, got.job_id) == ("job", job.id), (rel, got)
    for rel in ("single/d.czi.json",):
        got = explain(cfg, store, str(drop / rel))
        assert got.verdict == "pending", (rel, got)
        assert got.reason.endswith("sidecar names data file d.czi, which is missing"), got.reason
    got = explain(cfg, store, str(drop / "m2"))
    assert got.verdict == "not_acquisition" and "and sidecar pairs" in got.reason
    watcher.stop()
    store.close()


def _owners(store, watch):
    return {e.path: (e.kind, e.owner) for e in store.pending_list(watch=watch)}


@pytest.mark.parametrize("mode", ["polling", "events"])
def test_an_entry_carries_its_owner_as_soon_as_it_is_named_for_every_kind(make_config, tmp_path, mode, monkeypatch):
    """Outside test finding 1: "still being written", excluded and held entries name their owner
    (manifest, sidecar or layout path) before the quiet period ends, so owner-limited tokens see them."""
    store = open_store(make_config())
    roots = {n: tmp_path / n for n in ("drop", "side", "lay", "manonly")}
    for root in roots.values():
        root.mkdir()
    common = {"mode": mode, "quiet_period": 30, "poll_interval": 1, "missing_timeout": 600,
              "rescan_interval": 100000}
    cfg = make_config(watch=[
        {"name": "drop", "path": str(roots["drop"]), **common},
        {"name": "side", "path": str(roots["side"]), "detection": "sidecar", **common},
        {"name": "lay", "path": str(roots["lay"]), "detection": "layout", "layout": "{owner}/{dataset}", **common},
        {"name": "manonly", "path": str(roots["manonly"]), "sidecars": False, **common},
    ])
    watchers = {w.name: Watcher(w, store) for w in cfg.watch}
    reads = []
    real_read = Detector._read_owner

    def counting(self, path):  # the real read, counted
        reads.append(os.path.relpath(path, self.root))
        return real_read(self, path)
    monkeypatch.setattr(Detector, "_read_owner", counting)
    t = T0
    for w in watchers.values():
        w.loop(now=t)

    # Being written: a manifest folder, a sidecar pair, a layout folder, a manifest folder's pair.
    (roots["drop"] / "wr2").mkdir()
    (roots["drop"] / "wr2" / "watchfolder.json").write_text(
        json.dumps({"owner": "alice", "target": {"dataset": "W"}, "files": [{"path": "w.tif"}]}))
    (roots["drop"] / "sc.czi.json").write_text(json.dumps({"owner": "alice", "target": {"dataset": "S"}}))
    (roots["drop"] / "sc.czi").write_bytes(b"x")
    (roots["side"] / "sz.czi.json").write_text(json.dumps({"owner": "bob", "target": {"dataset": "S"}}))
    (roots["side"] / "sz.czi").write_bytes(b"x")
    (roots["lay"] / "alice" / "ds2").mkdir(parents=True)
    (roots["lay"] / "alice" / "ds2" / "a.tif").write_bytes(b"x")
    # Excluded: a folder still named *.tmp whose manifest names its owner; a layout folder named *.tmp.
    (roots["drop"] / "acq1.tmp").mkdir()
    (roots["drop"] / "acq1.tmp" / "watchfolder.json").write_text(
        json.dumps({"owner": "alice", "target": {"dataset": "T"}}))
    (roots["lay"] / "alice" / "tmpdir.tmp").mkdir()
    # Not an acquisition here: a sidecar pair in a manifests-only folder.
    (roots["manonly"] / "cells.czi").write_bytes(b"x")
    (roots["manonly"] / "cells.czi.json").write_text(json.dumps({"owner": "carol", "target": {"dataset": "C"}}))

    want = {
        "drop": {"wr2": ("writing", "alice"), "sc.czi": ("writing", "alice"), "acq1.tmp": ("excluded", "alice")},
        "side": {"sz.czi": ("writing", "bob")},
        "lay": {"alice/ds2": ("writing", "alice"), "alice/tmpdir.tmp": ("excluded", "alice")},
        "manonly": {"cells.czi": ("not_acquisition", "carol")},
    }

    def step():
        nonlocal t
        t += 1
        (roots["drop"] / "wr2" / "w.tif").open("ab").write(b"more")  # still being written, every tick
        for w in watchers.values():
            w.loop(now=t)
        return all(_owners(store, n) == want[n] for n in want) or None
    wait_until(step, 10, message="every entry listed with its owner")
    assert t < T0 + 30  # well before the quiet period ends
    # The manifest is not read again on every tick while a file in its folder is being written.
    reads.clear()
    for _ in range(5):
        step()
    assert _owners(store, "drop")["wr2"] == ("writing", "alice")
    assert "wr2/watchfolder.json" not in reads
    # A new owner in the manifest is seen at its next change (the descriptor changed: read again).
    (roots["drop"] / "wr2" / "watchfolder.json").write_text(
        json.dumps({"owner": "dave", "target": {"dataset": "W"}, "files": [{"path": "w.tif"}]}))
    wait_until(lambda: (step(), _owners(store, "drop")["wr2"] == ("writing", "dave"))[1] or None, 10,
               message="the new owner")
    assert reads.count("wr2/watchfolder.json") >= 1 and t < T0 + 30
    for w in watchers.values():
        w.stop()
    store.close()


@pytest.mark.parametrize("detection", ["sidecar", "manifest"])
@pytest.mark.parametrize("mode", ["polling", "events"])
def test_failed_sidecar_acquisitions_without_an_error_report_are_not_pending_after_a_restart(
        make_config, tmp_path, mode, detection):
    """Outside test finding 4: a sidecar whose data file was removed, and one whose data file never
    came, both failed (no error report: the data file is not there to write it beside). After a
    restart, unchanged, they are not listed as "still being written" again, not for a moment."""
    store = open_store(make_config())
    drop = tmp_path / "side"
    drop.mkdir()
    entry = {"name": "side", "path": str(drop), "mode": "polling", "detection": detection, "quiet_period": 10,
             "poll_interval": 1, "missing_timeout": 100, "rescan_interval": 100000}
    first = Watcher(make_config(watch=[entry]).watch[0], store)
    first.loop(now=T0)
    (drop / "never.czi.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    (drop / "gone.czi").write_bytes(b"pixels")
    (drop / "gone.czi.json").write_text(json.dumps({"owner": "jdoe", "target": TARGET}))
    first.loop(now=T0 + 1)
    (drop / "gone.czi").unlink()
    for t in (2, 3, 14, 15, 103, 104, 120):
        first.loop(now=T0 + t)
    jobs = jobs_of(store)
    assert sorted(j.spec.extra["acquisition"] for j in jobs) == ["gone.czi", "never.czi"]
    assert all(j.state == JobState.FAILED for j in jobs)
    assert store.pending_list(watch="side") == []
    first.stop()

    second = Watcher(make_config(watch=[{**entry, "mode": mode}]).watch[0], store)
    for t in (300, 301, 302, 305, 311, 312, 320, 420):
        second.loop(now=T0 + t)
        assert store.pending_list(watch="side") == [], t
        assert second.status()["pending"] == 0, t
    assert sorted(j.id for j in jobs_of(store)) == sorted(j.id for j in jobs)
    second.stop()

    # A real change is looked at again: the data file comes back, a new job imports the pair.
    (drop / "gone.czi").write_bytes(b"pixels")
    third = Watcher(make_config(watch=[{**entry, "mode": mode}]).watch[0], store)
    third.loop(now=T0 + 500)
    assert [e.path for e in store.pending_list(watch="side")] == ["gone.czi"]
    for t in (501, 512, 513, 530):
        third.loop(now=T0 + 500 + t)
    assert len(jobs_of(store)) == 3
    third.stop()
    store.close()


def test_a_restart_keeps_the_first_sighting_of_a_data_json_that_is_not_a_sidecar(make_config, tmp_path):
    # instr.tif + instr.tif.json holding the instrument's own metadata (not a sidecar): listed as
    # not_acquisition. A restart looked at it as a candidate first, which took its remembered
    # entry, so its first sighting became the restart (outside try of issue 15).
    store, drop, cfg = _polling_site(make_config, tmp_path)
    (drop / "instr.tif").write_bytes(b"pixels")
    (drop / "instr.tif.json").write_text(json.dumps({"Exposure": 20}))
    first = Watcher(cfg.watch[0], store)
    first.loop(now=T0)
    first.loop(now=T0 + 12)
    (entry,) = store.pending_list(watch="w")
    assert entry.kind == "not_acquisition" and entry.first_seen == T0
    first.stop()
    second = Watcher(cfg.watch[0], store)
    second.loop(now=T0 + 60)
    second.loop(now=T0 + 75)
    (entry,) = store.pending_list(watch="w")
    assert (entry.kind, entry.first_seen, entry.last_change) == ("not_acquisition", T0, T0)
    store.close()
