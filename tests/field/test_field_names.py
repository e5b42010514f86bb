"""Cases 10 and 11: a bad entry is reported against its path and the rest carries on; names are escaped."""

from __future__ import annotations

import logging
import os
import re

import pytest
from drops import MODES, manifest, succeeded, tree
from helpers import wait_until

from watchfolder import cli


@pytest.mark.parametrize("mode", MODES)
def test_a_newline_in_a_file_name_forges_no_log_line_and_no_mail_line(field, mode):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    forged = "x.tif\n2026-12-01 00:00:00 job 1 succeeded: all good"
    tree(field.drop / "jdoe" / "day1", {forged: b"x" * 10, "y.tif": b"y" * 10})
    [job] = field.settled(1)
    log = field.store.read_log(job.id)
    assert not any(line.startswith("2026-12-01 00:00:00 job 1") for line in log.splitlines()), log
    assert "\\n" in log
    for mail in field.mails():
        assert "\n2026-12-01 00:00:00 job 1 succeeded" not in mail.replace("\r\n", "\n")


def _only_escaped(text: str, name: str) -> bool:
    """``name`` (holding a newline) shows in ``text`` only escaped, and at least once."""
    escaped = name.replace("\n", "\\n")
    tail = name.split("\n")[-1]
    return escaped in text and text.count(tail) == text.count(escaped)


@pytest.mark.parametrize("mode", MODES)
def test_a_newline_in_a_folder_name_stays_on_its_line_in_log_mail_and_cli(field, mode, monkeypatch, capsys):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    name = "day\nforged"
    tree(field.drop / "jdoe" / name, {"a.tif": b"x" * 10})
    [job] = field.settled(1)
    log = wait_until(lambda: t if "receipt" in (t := field.store.read_log(job.id)) else None, 10,
                     message="the receipt line")
    stamped = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ \S")
    assert all(stamped.match(line) for line in log.splitlines()), log  # no continuation lines
    assert _only_escaped(log, name), log  # the destination and the receipt lines
    [mail] = wait_until(field.mails, 10, message="the success mail")
    where = next(line for line in mail.splitlines() if line.startswith("Where:"))
    assert _only_escaped(where, name) and where.endswith('(dataset "day\\nforged")'), mail
    assert _only_escaped(mail, name), mail
    monkeypatch.setattr(cli, "load_config", lambda args, overrides=None: field.service.config)
    assert cli.main(["jobs", "list"]) == 0
    assert cli.main(["jobs", "show", str(job.id)]) == 0
    out = capsys.readouterr().out
    assert _only_escaped(out, name), out
    # The service log (the journal): one record, one line.
    record = logging.LogRecord("watchfolder.watch", logging.INFO, __file__, 1, "queued %s", (name,), None)
    assert cli._OneLineFormatter("%(levelname)s %(message)s").format(record) == "INFO queued day\\nforged"


@pytest.mark.parametrize("mode", MODES)
def test_a_file_name_that_is_not_utf8_does_not_stall_the_others(field, mode):
    field.start(mode, detection="layout", layout="{owner}/{dataset}/")
    bad = os.fsencode(field.drop / "jdoe" / "bad") + b"/\xff\xfe.tif"
    tree(field.drop / "jdoe" / "bad", {"ok.tif": b"ok" * 10})
    with open(bad, "wb") as f:
        f.write(b"latin-1 name")
    for i in range(3):
        tree(field.drop / "jdoe" / f"good{i}", {"a.tif": b"%d" % i * 10})
    jobs = field.settled(4)
    assert sorted(j.spec.target.dataset for j in succeeded(jobs)) == ["good0", "good1", "good2"], \
        [(j.spec.root, j.state.value, j.error) for j in jobs]
    assert field.reported("bad"), field.pending()


@pytest.mark.parametrize("mode", MODES)
def test_a_path_too_long_for_the_archive_is_reported_and_the_rest_carries_on(field, mode):
    field.start(mode)
    deep = field.drop / "deep"
    name = "n" * 250
    manifest(deep, {f"{name}/{name}/{name}/{name}/{name}/{name}/{name}/{name}/{name}/{name}/{name}/"
                    f"{name}/{name}/{name}/{name}/{name}/a.tif": b"deep"})
    manifest(field.drop / "fine", {"a.tif": b"fine"})
    jobs = field.settled(2)
    assert [j.spec.root.rsplit("/", 1)[-1] for j in succeeded(jobs)] == ["fine"] or len(succeeded(jobs)) == 2
    assert field.watcher_status()["health"] == "ok"


@pytest.mark.parametrize("mode", MODES)
def test_an_acquisition_folder_named_in_latin_1_is_reported_and_the_rest_carries_on(field, tmp_path, mode):
    field.start(mode)
    staging = tmp_path / "staging"
    manifest(staging / "ok", {"a.tif": b"fine"})
    manifest(staging / "bad", {"b.tif": b"bad name"})
    os.rename(os.fsencode(staging / "bad"), os.fsencode(field.drop) + b"/Messung_M\xfcller")
    os.rename(staging / "ok", field.drop / "ok")
    jobs = field.settled(1)
    field.quiet_for(1.0)
    jobs = field.jobs()
    assert [j.spec.root.rsplit("/", 1)[-1] for j in succeeded(jobs)] == ["ok"], [(j.spec.root, j.error) for j in jobs]
    assert field.reported("Messung_M"), field.pending()
    assert field.watcher_status()["health"] == "ok"


def _named(length: int) -> str:
    """A folder name of exactly ``length`` bytes, mostly two-byte characters (a cut must not split one)."""
    name = "Zellkultur-é" + "ü" * ((length - 13) // 2)
    return name + "x" * (length - len(name.encode()))


@pytest.mark.parametrize("length", [240, 253])
def test_a_long_acquisition_name_collides_into_a_shortened_folder_with_receipt_and_error_report(field, tmp_path,
                                                                                                length):
    # Found by an outside test: "<name> (2)" failed "the name is too long"; a 240-byte name got no
    # receipt ("post-action failed: File name too long"), nor an error report.
    from watchfolder.filenames import NAME_MAX

    name = _named(length)
    assert len(name.encode()) == length
    field.start("events")
    manifest(tmp_path / "staging" / name, {"a.tif": b"first run " * 50})
    os.rename(tmp_path / "staging" / name, field.drop / name)
    [first] = field.settled(1)
    assert first.state.value == "succeeded", first.error
    receipts = lambda: [p for p in field.drop.iterdir() if p.name.endswith(".watchfolder-receipt.json")]  # noqa: E731
    [receipt] = wait_until(receipts, 10, message="the receipt beside the acquisition")
    assert len(receipt.name.encode()) <= NAME_MAX and receipt.name.startswith("Zellkultur-é")
    receipt.name.encode("utf-8")  # cut on a character boundary: still valid UTF-8
    # The same name again with other content (removed and dropped again): the archive holds a
    # folder of that name with other files, so it goes into "<name> (2)", shortened.
    os.rename(field.drop / name, tmp_path / "first")
    receipt.unlink()
    manifest(tmp_path / "staging" / name, {"a.tif": b"second run " * 50})
    os.rename(tmp_path / "staging" / name, field.drop / name)
    first, second = field.settled(2)
    assert second.state.value == "succeeded", second.error
    destination = second.result["destination"]
    assert second.result["renamed_from"] == first.result["destination"] != destination
    assert destination.endswith(" (2)") and len(os.path.basename(destination).encode()) <= NAME_MAX
    wait_until(receipts, 10, message="the second receipt")
    # A failure of a long-named acquisition gets its error report too.
    bad = _named(length - 1)
    (tmp_path / "staging" / bad).mkdir(parents=True)
    (tmp_path / "staging" / bad / "a.tif").write_bytes(b"data")
    (tmp_path / "staging" / bad / "watchfolder.json").write_text('{"owner": "jdoe", ', encoding="utf-8")
    os.rename(tmp_path / "staging" / bad, field.drop / bad)
    jobs = field.settled(3)
    assert jobs[2].state.value == "failed"
    [report] = wait_until(lambda: [p for p in field.drop.iterdir() if p.name.endswith(".watchfolder-error.txt")], 10,
                          message="the error report beside the failed acquisition")
    assert len(report.name.encode()) <= NAME_MAX and f"job {jobs[2].id}" in report.read_text(encoding="utf-8")
    assert "post-action failed" not in " ".join(h.message for j in jobs for h in field.store.get(j.id).history)


@pytest.mark.parametrize("mode", MODES)
def test_a_fixed_acquisition_that_succeeds_keeps_only_its_receipt(field, mode):
    # Found by an outside test: the error report of the failed attempt stayed beside the receipt.
    field.start(mode)
    acq = field.drop / "acq"
    tree(acq, {"a.tif": b"a" * 100})
    (acq / "watchfolder.json").write_text('{"owner": "jdoe", ', encoding="utf-8")  # truncated JSON
    [failed] = field.settled(1)
    assert failed.state.value == "failed"
    report = field.drop / "acq.watchfolder-error.txt"
    wait_until(report.exists, 10, message="the error report")
    manifest(acq, {"a.tif": b"a" * 100})  # fixed
    failed, fixed = field.settled(2)
    assert fixed.state.value == "succeeded", fixed.error
    wait_until((field.drop / "acq.watchfolder-receipt.json").exists, 10, message="the receipt")
    wait_until(lambda: not report.exists(), 10, message="the stale error report removed")
    assert "removed the error report of an earlier attempt" in " ".join(
        h.message for h in field.store.get(fixed.id).history)
