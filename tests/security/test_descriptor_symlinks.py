"""Issue 10 (second round), finding A: a manifest or sidecar that is a symlink is never read.

Real folders and real symlinks; the drop-folder rules the watcher runs, and the API
over real HTTP. The outside files stand in for a secret (``/etc/shadow``) and for a
descriptor of someone else's: neither may be read, parsed or echoed.
"""

from __future__ import annotations

import json
import os

import pytest
from api_support import acquisition, start_service, stop_service

from watchfolder import safefs
from watchfolder.watch import acquisition as acq
from watchfolder.watch.detector import Patterns, make_rule

OUTSIDE_DESCRIPTOR = {"owner": "mallory", "target": {"project": "Stolen", "dataset": "outside"},
                      "db_password": "hunter2"}
SHADOW = b"root:$6$not-for-you:19000:0:99999:7:::\n"
REASON = "is a symbolic link; replace it with the file itself"


@pytest.fixture
def outside(tmp_path):
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.json").write_text(json.dumps(OUTSIDE_DESCRIPTOR), encoding="utf-8")
    (folder / "shadow").write_bytes(SHADOW)
    return folder


def drop_rule(make_config, drop, detection):
    config = make_config(watch=[{"name": "scope", "path": str(drop), "detection": detection}])
    watch = config.watch[0]
    return make_rule(watch, Patterns(watch.include, watch.exclude))


def assert_not_read(reason: str, spec) -> None:
    assert "Stolen" not in reason and "db_password" not in reason and "JSON" not in reason, reason
    if spec is not None:
        assert spec.owner != "mallory"
        assert spec.target is None or "Stolen" not in spec.target.label


@pytest.mark.parametrize("points_to", ["secret.json", "shadow"])
def test_drop_folder_manifest_symlinked_out_is_rejected_unread(tmp_path, outside, make_config, points_to):
    drop = tmp_path / "drop"
    folder = drop / "acq"
    folder.mkdir(parents=True)
    (folder / "a.tif").write_bytes(b"a")
    (folder / "watchfolder.json").symlink_to(outside / points_to)
    outcome = drop_rule(make_config, drop, "manifest").build(str(drop), "acq", now=0.0)
    assert outcome.kind == "reject", outcome
    assert "manifest " + REASON in outcome.reason, outcome.reason
    assert_not_read(outcome.reason, outcome.spec)


def test_a_manifest_symlinked_inside_the_folder_is_refused_too(tmp_path, make_config):
    drop = tmp_path / "drop"
    folder = acquisition(drop, "acq")
    (folder / "real.json").write_bytes((folder / "watchfolder.json").read_bytes())
    (folder / "watchfolder.json").unlink()
    (folder / "watchfolder.json").symlink_to("real.json")
    outcome = drop_rule(make_config, drop, "manifest").build(str(drop), "acq", now=0.0)
    assert outcome.kind == "reject" and "manifest " + REASON in outcome.reason


def test_drop_folder_sidecar_symlinked_out_is_rejected_unread(tmp_path, outside, make_config):
    drop = tmp_path / "drop"
    drop.mkdir()
    (drop / "cells3.czi").write_bytes(b"czi")
    (drop / "cells3.czi.json").symlink_to(outside / "secret.json")
    outcome = drop_rule(make_config, drop, "sidecar").build(str(drop), "cells3.czi", now=0.0)
    assert outcome.kind == "reject", outcome
    assert "sidecar " + REASON in outcome.reason, outcome.reason
    assert_not_read(outcome.reason, outcome.spec)


@pytest.mark.parametrize("kind", ["manifest", "sidecar", "sidecar-named"])
def test_api_descriptor_symlinked_out_is_422_unread(tmp_path, outside, kind):
    service = start_service(tmp_path)
    try:
        jdoe = service.roots["drop"] / "jdoe"
        if kind == "manifest":
            folder = jdoe / "acq"
            folder.mkdir(parents=True)
            (folder / "a.tif").write_bytes(b"a")
            (folder / "watchfolder.json").symlink_to(outside / "secret.json")
            path = folder
        else:
            jdoe.mkdir(parents=True)
            (jdoe / "cells3.czi").write_bytes(b"czi")
            (jdoe / "cells3.czi.json").symlink_to(outside / "secret.json")
            path = jdoe / ("cells3.czi" if kind == "sidecar" else "cells3.czi.json")
        r = service.client("drop-only").post("/api/v1/jobs", {"path": str(path), "owner": "jdoe",
                                                              "target": {"dataset": "mine"}})
        text = r.text
        if kind == "sidecar-named":  # naming the link itself: resolved out of the token's roots
            assert r.status == 403, text
        else:
            assert r.status == 422, text
            assert REASON in text, text
        assert "Stolen" not in text and "mallory" not in text
        assert service.store.counts().get("queued", 0) == 0
    finally:
        stop_service(service)


def test_read_descriptor_refuses_fifos_and_folders(tmp_path):
    os.mkfifo(tmp_path / "watchfolder.json")
    with pytest.raises(acq.AcquisitionError, match="not a regular file"):
        acq.read_descriptor(tmp_path / "watchfolder.json", what="manifest")


def test_the_helper_refuses_a_symlink_at_any_level_below_its_root(tmp_path, outside):
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop" / "link").symlink_to(outside)
    with pytest.raises(safefs.UnsafePath):
        safefs.read_file(str(tmp_path / "drop" / "link" / "secret.json"), 1024, within=str(tmp_path / "drop"))
    with pytest.raises(safefs.UnsafePath, match="not under"):
        safefs.read_file(str(outside / "secret.json"), 1024, within=str(tmp_path / "drop"))
    assert safefs.read_file(str(outside / "secret.json"), 1 << 20) == json.dumps(OUTSIDE_DESCRIPTOR).encode()
