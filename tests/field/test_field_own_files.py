"""Outside test of issue 10 (a10, F6): the service's own files (receipts, error reports) beside
acquisitions are never listed in pending -- they were, as "ignored: matches exclude pattern a file
watchfolder writes", a sentence that names no pattern and advises about renaming."""

from __future__ import annotations

import time

import pytest
from drops import MODES, manifest, tree
from helpers import wait_until


@pytest.mark.parametrize("mode", MODES)
def test_receipts_and_error_reports_are_not_pending(field, mode):
    field.start(mode)
    manifest(field.drop / "good", {"a.tif": b"pixels"})
    (field.drop / "bad").mkdir()
    (field.drop / "bad" / "watchfolder.json").write_text("{not json")
    wait_until(lambda: (field.drop / "good.watchfolder-receipt.json").exists()
               and (field.drop / "bad.watchfolder-error.txt").exists(), 20, message="the receipt and the error report")
    # A change to them (an admin touching the receipt) is not an acquisition either.
    (field.drop / "good.watchfolder-receipt.json").touch()
    # Planted (an attacker, or a copy from another drop folder): the same names, no acquisition.
    (field.drop / "ghost.watchfolder-receipt.json").write_text("{}")
    (field.drop / "ghost.watchfolder-error.txt").symlink_to("/etc/hostname")
    (field.drop / "good" / "inner.watchfolder-error.txt").write_text("x")
    time.sleep(1.0)  # a few ticks (poll interval 0.1 s) and the touch's events
    listed = [e for e in field.pending() if "watchfolder-" in e["path"]]
    assert listed == [], listed


@pytest.mark.parametrize("mode", MODES)
def test_a_folder_named_like_a_receipt_is_noted_not_silently_skipped(field, mode):
    # trap.watchfolder-receipt.json/ holding data: never imported (the name is the service's),
    # but listed as pending with why, in every mode (outside try of issue 12).
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    tree(field.drop / "jdoe" / "trap.watchfolder-receipt.json", {"t.tif": b"data " * 20})
    wait_until(lambda: [e for e in field.pending() if e["path"] == "jdoe/trap.watchfolder-receipt.json"], 10,
               message="the folder listed as pending")
    [entry] = [e for e in field.pending() if e["path"] == "jdoe/trap.watchfolder-receipt.json"]
    assert entry["kind"] == "excluded" and "rename the folder" in entry["waiting"], entry
    assert field.jobs() == []
    from watchfolder.watch.explain import explain

    got = explain(field.service.config, field.store, str(field.drop / "jdoe" / "trap.watchfolder-receipt.json"))
    assert got.verdict == "ignored" and got.reason == entry["waiting"], got
