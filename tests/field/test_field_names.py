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
