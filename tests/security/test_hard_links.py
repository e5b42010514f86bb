"""Issue 10 (second round), finding H: hard links and files replaced after queuing are not imported.

Real hard links (``os.link``) on the test's own filesystem, the drop-folder rules
the watcher runs, the real archive importer and worker, and the API over real
HTTP. The outside file stands in for ``/etc/shadow``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from api_support import acquisition, start_service, stop_service

from watchfolder import safefs
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.job import JobState
from watchfolder.watch.detector import Patterns, make_rule
from watchfolder.worker import Worker

SECRET = b"root:$6$not-for-you:19000:0:99999:7:::\n" * 17 + b"x" * 12  # 675 bytes, like the finding


@pytest.fixture
def outside(tmp_path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "shadow").write_bytes(SECRET)
    return folder


def archived(root: Path) -> list[bytes]:
    return [p.read_bytes() for p in root.rglob("*") if p.is_file()]


def drop_setup(tmp_path, make_config, **watch):
    drop = tmp_path / "drop"
    drop.mkdir()
    config = make_config(watch=[{"name": "scope", "path": str(drop), "detection": "manifest", **watch}],
                         importer={"kind": "archive", "archive": {"root": str(tmp_path / "archive")}})
    w = config.watch[0]
    return drop, config, make_rule(w, Patterns(w.include, w.exclude))


def test_a_file_replaced_by_a_hard_link_after_queuing_is_not_copied(tmp_path, outside, make_config, store):
    drop, config, rule = drop_setup(tmp_path, make_config)
    acq = acquisition(drop, "acq", files={"shadow": b"h" * len(SECRET)})
    outcome = rule.build(str(drop), "acq", now=0.0)
    assert outcome.kind == "enqueue", outcome
    store.enqueue(outcome.spec)
    (acq / "shadow").unlink()
    os.link(outside / "shadow", acq / "shadow")  # same name, same size: another file
    done = Worker(store, ArchiveImporter(config), name="w").loop()
    assert done.state == JobState.FAILED and done.error.kind == "permanent"
    assert "changed after it was queued" in done.error.message
    assert SECRET not in archived(tmp_path / "archive")


def test_a_hard_link_present_at_detection_is_rejected_by_default(tmp_path, outside, make_config):
    drop, _config, rule = drop_setup(tmp_path, make_config)
    acq = acquisition(drop, "acq", files={"a.tif": b"a"})
    os.link(outside / "shadow", acq / "shadow")
    (acq / "watchfolder.json").unlink()
    acquisition(drop, "acq", files={"a.tif": b"a", "shadow": SECRET})  # rewrites a.tif and the manifest
    outcome = rule.build(str(drop), "acq", now=0.0)
    assert outcome.kind == "reject", outcome
    assert "shadow: has 2 hard links" in outcome.reason and "allow_hard_links" in outcome.reason


def test_allow_hard_links_lets_them_through(tmp_path, outside, make_config):
    drop, _config, rule = drop_setup(tmp_path, make_config, allow_hard_links=True)
    acq = acquisition(drop, "acq", files={"a.tif": b"a"})
    os.link(outside / "shadow", acq / "shadow")
    acquisition(drop, "acq", files={"a.tif": b"a", "shadow": SECRET})
    assert rule.build(str(drop), "acq", now=0.0).kind == "enqueue"


def test_api_submission_with_a_hard_link_is_422(tmp_path, outside):
    service = start_service(tmp_path)
    try:
        acq = acquisition(service.roots["drop"] / "jdoe", "acq", files={"a.tif": b"a"})
        os.link(outside / "shadow", acq / "shadow")
        acquisition(service.roots["drop"] / "jdoe", "acq", files={"a.tif": b"a", "shadow": SECRET})
        r = service.client("drop-only").post("/api/v1/jobs", {"path": str(acq)})
        assert r.status == 422, r.text
        assert "has 2 hard links" in r.text and "server.allow_hard_links" in r.text
    finally:
        stop_service(service)


def test_api_job_whose_file_becomes_a_hard_link_fails(tmp_path, outside):
    service = start_service(tmp_path)
    try:
        acq = acquisition(service.roots["drop"] / "jdoe", "acq", files={"shadow": b"h" * len(SECRET)})
        r = service.client("drop-only").post("/api/v1/jobs", {"path": str(acq)})
        assert r.status == 202, r.text
        (acq / "shadow").unlink()
        os.link(outside / "shadow", acq / "shadow")
        importer = ArchiveImporter(service.config)
        done = Worker(service.store, importer, name="w").loop()
        assert done.state == JobState.FAILED and "changed after it was queued" in done.error.message
        assert SECRET not in archived(importer.root)
    finally:
        stop_service(service)


def test_the_opener_checks_the_identity(tmp_path):
    (tmp_path / "acq").mkdir()
    f = tmp_path / "acq" / "a.tif"
    f.write_bytes(b"abc")
    before = safefs.identity(os.stat(f))
    with safefs.SourceTree(str(tmp_path), str(tmp_path / "acq"), {"a.tif": before}) as tree:
        fd, _ = tree.open("a.tif")
        os.close(fd)
        os.utime(f, ns=(0, 1))  # rewritten in place: same inode, another mtime
        with pytest.raises(safefs.UnsafePath, match="changed after it was queued"):
            tree.open("a.tif")


def test_a_manifest_hard_linked_to_an_outside_file_is_rejected_unread(tmp_path, make_config):
    drop, _config, rule = drop_setup(tmp_path, make_config)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "secret.json").write_text('{"owner": "mallory", "target": {"dataset": "Stolen"}}')
    acq = drop / "acq"
    acq.mkdir()
    (acq / "a.tif").write_bytes(b"a")
    os.link(outside / "secret.json", acq / "watchfolder.json")
    outcome = rule.build(str(drop), "acq", now=0.0)
    assert outcome.kind == "reject" and "manifest has 2 hard links" in outcome.reason, outcome
    assert "Stolen" not in outcome.reason and (outcome.spec is None or outcome.spec.owner != "mallory")
