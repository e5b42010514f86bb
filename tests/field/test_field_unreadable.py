"""Paths the service cannot read, and drop folders that are not there (issue 12 items 10 and 12;
outside report b12 items 4, 5 and 6): each is reported against its own path with why, the
rest of the watch folder (and every other watch folder) carries on, and a fix is seen without
a restart -- through the real watcher in events and polling mode.

Reading a file whatever its mode is what root does: as root, the permission cases run again
in a child without CAP_DAC_OVERRIDE (test_unreadable_cases_without_privileges).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from drops import MODES, QUIET, can_read_unreadable, manifest, run_without_dac_override
from helpers import wait_until

from watchfolder import config as configmod
from watchfolder.watch.detector import Detector
from watchfolder.watch.explain import explain


@pytest.fixture
def unprivileged(tmp_path):
    if can_read_unreadable(tmp_path):
        pytest.skip("this process reads files whatever their mode (root with CAP_DAC_OVERRIDE); "
                    "test_unreadable_cases_without_privileges runs it without")


def _pending(field, path: str) -> dict | None:
    return next((e for e in field.pending() if e["path"] == path), None)


@pytest.mark.parametrize("mode", MODES)
def test_unreadable_data_file_fails_at_once_and_the_owner_hears(field, unprivileged, mode):
    # b12 item 5: the manifest was readable, so the job keeps its owner, target and files,
    # and the owner (not only the admin) is mailed.
    field.start(mode, quiet_period=QUIET)
    folder = field.drop / "p1"
    manifest(folder, {"a.tif": b"a" * 100, "b.tif": b"b" * 50}, email="jdoe@example.org")
    (folder / "b.tif").chmod(0)
    [job] = field.settled(1)
    assert job.state.value == "failed", job.state
    assert job.error.kind.value == "permanent" and job.attempts <= 1
    assert "b.tif" in job.error.message and "permission denied" in job.error.message
    assert job.spec.owner == "jdoe"
    assert job.spec.target.to_dict() == {"project": "Atlas", "dataset": "day1"}
    assert sorted(f.path for f in job.spec.files) == ["a.tif", "b.tif"]
    assert sum(f.size or 0 for f in job.spec.files) == 150
    wait_until(lambda: any(m.startswith("To: jdoe@example.org") and "b.tif" in m for m in field.mails()), 10,
               message="the owner's mail")


@pytest.mark.parametrize("mode", MODES)
def test_folder_made_unreadable_in_place_is_listed_and_taken_once_fixed(field, unprivileged, mode):
    # b12 item 4: chmod 000 on a folder in place was silent in events mode, and after the fix
    # (chmod 755) the acquisition stayed stuck until a restart. A quiet period long enough that
    # the chmod below lands within it even on a loaded machine.
    field.start(mode, quiet_period=2)
    p3 = field.drop / "p3"
    # Files not listed: the quiet period is waited (a listed file with its checksum proves the
    # acquisition complete at once, and the job could be queued before the chmod below lands --
    # then it fails as unreadable, test_unreadable_data_file_fails_at_once_... above).
    manifest(p3, {"a.tif": b"a" * 100}, listed=False)
    p3.chmod(0)
    p7 = field.drop / "p7"
    p7.mkdir()
    p7.chmod(0)
    try:
        wait_until(lambda: (_pending(field, "p3") or {}).get("waiting", "").find("permission denied") >= 0
                   and _pending(field, "p7") is not None, 15, message="p3 and p7 listed as unreadable")
        assert "p7" in _pending(field, "p7")["waiting"] and "permission denied" in _pending(field, "p7")["waiting"]
        assert field.jobs() == []  # a folder it cannot read yet is not failed: it may be fixed
        # explain says what pending says (it said "not an acquisition here").
        answer = explain(field.service.config, field.store, str(p3))
        assert answer.verdict == "unreadable" and "permission denied" in answer.reason, answer
    finally:
        p3.chmod(0o755)
        p7.chmod(0o755)
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    assert job.spec.extra["acquisition"] == "p3"
    wait_until(lambda: _pending(field, "p3") is None and _pending(field, "p7") is None, 15,
               message="the unreadable notes gone once fixed")


def test_known_candidate_made_unreadable_is_listed_not_forgotten(tmp_path, unprivileged):
    # The order the events-mode field test above meets only by chance: the acquisition is
    # already a candidate (its files' events came first) when chmod 000 lands. Its look
    # found no manifest it could see and forgot it as "gone", silently (then nothing listed it).
    drop = tmp_path / "drop"
    drop.mkdir()
    watch = configmod.parse({"data_dir": str(tmp_path / "data"), "importer": {"kind": "archive",
                             "archive": {"root": str(tmp_path / "archive")}},
                             "watch": [{"name": "d", "path": str(drop), "quiet_period": 1}]}).watch[0]
    detector = Detector(watch, str(drop), trust_events=True)
    p3 = drop / "p3"
    manifest(p3, {"a.tif": b"a" * 10})
    detector.touch("p3", 100.0)
    p3.chmod(0)
    try:
        assert detector.loop(102.0) == []
        [entry] = detector.pending_entries(102.0)
        assert (entry.path, entry.kind) == ("p3", "unreadable") and "permission denied" in entry.reason, entry
        assert "p3" in detector.known
    finally:
        p3.chmod(0o755)
    [outcome] = detector.loop(200.0)  # fixed: looked at again and taken
    assert (outcome.kind, outcome.rel) == ("enqueue", "p3"), outcome


@pytest.mark.parametrize("mode", MODES)
def test_unreadable_folder_moved_in_is_listed_and_taken_once_fixed(field, unprivileged, mode):
    # Unreadable when it arrives (and so, in events mode, without a watch of its own).
    field.start(mode, quiet_period=QUIET)
    outside = field.tmp_path / "outside" / "p5"
    manifest(outside, {"a.tif": b"a" * 10})
    outside.chmod(0o300)  # not listable; writable, so the folder can be moved (its ".." changes)
    try:
        os.rename(outside, field.drop / "p5")
        wait_until(lambda: "permission denied" in (_pending(field, "p5") or {}).get("waiting", ""), 15,
                   message="p5 listed as unreadable")
    finally:
        (field.drop / "p5").chmod(0o755)
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error


@pytest.mark.parametrize("mode", MODES)
def test_unreadable_folder_at_start_is_watched_once_fixed(field, unprivileged, mode):
    # Unreadable when the service starts: listed; fixed and then written to, it is taken.
    p6 = field.drop / "p6"
    p6.mkdir()
    p6.chmod(0)
    try:
        field.start(mode, quiet_period=QUIET)
        wait_until(lambda: "permission denied" in (_pending(field, "p6") or {}).get("waiting", ""), 15,
                   message="p6 listed as unreadable")
    finally:
        p6.chmod(0o755)
    wait_until(lambda: _pending(field, "p6") is None, 15, message="p6 no longer listed")
    manifest(p6, {"a.tif": b"a" * 10})  # written after the fix: seen in events mode too
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error


def test_unreadable_cases_without_privileges(tmp_path):
    """As root, run the tests above in a child without the capabilities that bypass file modes."""
    result = run_without_dac_override(
        tmp_path, __file__,
        "-k", "unreadable_data or made_unreadable or unreadable_folder_moved_in or unreadable_folder_at_start")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "9 passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]


@pytest.mark.parametrize("mode", MODES)
def test_watch_folder_missing_at_start_is_waited_for_and_the_others_go_on(field, mode):
    # b12 item 6: a missing watch folder was a config error, so a restart during an outage
    # stopped every watch folder; it is waited for like one that disappears while running.
    later = field.tmp_path / "later"
    field.start(mode, others=[{"name": "later", "path": str(later), "mode": mode, "quiet_period": QUIET,
                               "poll_interval": 0.1, "missing_timeout": 600}])
    manifest(field.drop / "acq1", {"a.tif": b"a" * 10})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error
    waiting = field.service.watch.watchers[1].status()
    assert waiting["health"] == "unhealthy"
    assert f"{later} does not exist" in waiting["error"] and "waiting for it to come back" in waiting["error"]
    later.mkdir()
    wait_until(lambda: field.service.watch.watchers[1].status()["health"] == "ok", 30,
               message="the missing watch folder watched once it is there")
    manifest(later / "acq2", {"b.tif": b"b" * 10})
    jobs = field.settled(2)
    assert [j.spec.extra["watch"] for j in jobs] == ["scope", "later"]
    assert all(j.state.value == "succeeded" for j in jobs), [j.error for j in jobs]


def _deep_folder(top: Path, levels: int, name_bytes: int) -> str:
    """``levels`` nested folders of ``name_bytes``-byte names under ``top`` (past PATH_MAX, made
    folder by folder with directory descriptors); returns the path relative to ``top``."""
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    parts = []
    try:
        for i in range(levels):
            name = f"{i:02d}" + "d" * (name_bytes - 2)
            os.mkdir(name, dir_fd=fd)
            nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
            parts.append(name)
        with open(os.open("a.tif", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"x" * 10)
    finally:
        os.close(fd)
    return "/".join(parts)


@pytest.mark.parametrize("mode", MODES)
def test_path_longer_than_path_max_is_reported_once_with_its_own_reason(field, mode):
    # b12 L6: 18 nested folders of 243 bytes were reported with the NAME_MAX reason ("at most
    # 255 bytes per folder or file name ... change importer.archive.layout") and listed twice.
    field.start(mode, quiet_period=QUIET)
    deep = _deep_folder(field.drop, 18, 243)
    manifest(field.drop / "ok", {"a.tif": b"a" * 10})
    [job] = field.settled(1)
    assert job.state.value == "succeeded", job.error  # the rest carries on

    def too_long():
        return [e for e in field.pending() if "too long" in e.get("waiting", "")]

    found = wait_until(too_long, 15, message="the deep path listed")
    assert len(found) == 1, [(e["path"].count("/"), e.get("kind"), e["waiting"][:60]) for e in found]
    [entry] = found
    assert deep.startswith(entry["path"])
    assert "the path is too long" in entry["waiting"] and "at most 4095 bytes" in entry["waiting"]
    assert "255 bytes per folder or file name" not in entry["waiting"]
    assert "importer.archive.layout" not in entry["waiting"]
    field.quiet_for(1.0)
    assert len(too_long()) == 1, field.pending()
    # What `watchfolder pending` shows (the store): once too.
    stored = [p for p in field.store.pending_list() if "too long" in p.reason]
    assert [p.kind for p in stored] == ["unreadable"], stored


def test_a_name_it_cannot_handle_stays_noted_without_restarting_the_observer(field):
    # Noted unreadable too, but no permission fix changes it: the recheck of unreadable
    # folders leaves it noted (no "can be read again" every few seconds, no observer restart).
    field.start("events", quiet_period=QUIET)
    bad = os.path.join(os.fsencode(field.drop), b"bad\xfename")
    os.mkdir(bad)
    manifest(Path(os.fsdecode(bad)), {"a.tif": b"a" * 10})
    wait_until(lambda: any("UTF-8" in e.get("waiting", "") for e in field.pending()), 15,
               message="the name listed")
    watcher = field.service.watch.watchers[0]
    source = watcher.source_obj
    field.quiet_for(2.5)  # several rechecks (at least every quiet period, 1 s at the least)
    assert watcher.source_obj is source
    assert [e for e in field.pending() if "UTF-8" in e.get("waiting", "")]
    assert field.jobs() == []
