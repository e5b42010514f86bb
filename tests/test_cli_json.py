"""``--json``: every command that prints data takes it, and its stdout is then exactly one JSON document.

Each command runs as a real ``python -m watchfolder`` subprocess on a config in tmp_path;
the commands to check are read from the argparse parser, so a new one is checked too.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_support import SLIDE3, env
from helpers import wait_until

from watchfolder import cli
from watchfolder.errors import JobNotFound

# Long-running services: they print a banner and log lines until stopped, no data.
SERVICES = {("run",), ("work",), ("watch",), ("serve",)}
FOLLOWING = {"--wait", "--follow"}


def argv(site_cfg: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "watchfolder", *args, "--config", str(site_cfg)]


def sub(site_cfg: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv(site_cfg, *args), capture_output=True, text=True, env=env(), cwd=site_cfg.parent,
                          timeout=60)


def one_document(stdout: str):
    """The one JSON document stdout must be (``json.loads`` refuses anything before or after it)."""
    return json.loads(stdout)


def commands() -> list[tuple[tuple[str, ...], set[str]]]:
    """Every command the parser has (no command group), with its options."""
    found = []

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...]):
        groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if path and not groups:
            found.append((path, {o for a in parser._actions for o in a.option_strings}))
        for group in groups:
            for name, child in group.choices.items():
                walk(child, path + (name,))

    walk(cli.build_parser(), ())
    return found


def test_every_command_that_prints_data_takes_json_and_prints_one_document(site_cfg, tmp_path, site_store, make_spec):
    cancelled, _ = site_store.enqueue(make_spec())
    site_store.log(cancelled.id, ["first line", "second line"])
    site_store.cancel(cancelled.id)
    queued, _ = site_store.enqueue(make_spec())
    mail = site_store.outbox_claim()[0]
    site_store.outbox_sent(mail.id)
    site_store.sink_claim("webhook:lims", "test", hold=30)
    shutil.copytree(SLIDE3, tmp_path / "slide3")
    # How to run each command; the checks on what it printed are below.
    sample = {
        ("submit",): [str(tmp_path / "slide3")],
        ("jobs", "list"): [],
        ("jobs", "show"): [str(cancelled.id)],
        ("jobs", "log"): [str(cancelled.id)],
        ("jobs", "retry"): [str(cancelled.id)],
        ("jobs", "cancel"): [str(queued.id)],
        ("status",): [],
        ("check-config",): [],
        ("pending",): [],
        ("explain",): [str(tmp_path / "slide3")],
        ("store", "migrate"): [],
        ("mail", "list"): [],
        ("mail", "resend"): [str(mail.id)],
        ("events", "list"): [],
        ("events", "sinks"): [],
        ("events", "enable"): ["webhook:lims"],
        ("token", "new"): ["--name", "lims", "--role", "read"],
    }
    found = commands()
    assert SERVICES <= {path for path, _ in found}, "a service command is gone: update SERVICES"
    problems, printed = [], {}
    for path, options in found:
        name = " ".join(path)
        if path in SERVICES:
            continue
        if "--json" not in options:
            problems.append(f"`{name}` prints data but takes no --json")
            continue
        if path not in sample:
            problems.append(f"`{name}`: add how to run it to `sample` in this test")
            continue
        out = sub(site_cfg, *path, *sample[path], "--json")
        if out.returncode != 0:
            problems.append(f"`{name} --json` exited {out.returncode}: {out.stderr.strip()}")
            continue
        try:
            printed[path] = one_document(out.stdout)
        except ValueError as exc:
            problems.append(f"`{name} --json` printed no single JSON document ({exc}): {out.stdout[:200]!r}")
    assert not problems, "\n".join(problems)

    log = printed[("jobs", "log")]
    assert log["id"] == cancelled.id
    assert [line.split(" ", 1)[1] for line in log["lines"][:2]] == ["first line", "second line"]
    assert log["lines"][2].split(" ", 1)[1].startswith("cancelled")
    migrated = printed[("store", "migrate")]
    assert migrated["schema"] == site_store.describe()["schema"] and migrated["up_to_date"] is True
    assert migrated["store"]["location"] == site_store.describe()["location"] and migrated["copied"] is None
    events = printed[("events", "list")]
    assert events["events"] and all(e["specversion"] == "1.0" for e in events["events"])
    assert events["has_more"] is False and events["next_after"] == site_store.last_event_id()
    assert printed[("events", "enable")] == {"sink": "webhook:lims", "enabled": True}


def test_events_list_json_pages_like_the_api(site_cfg, site_store, make_spec):
    for _ in range(3):
        site_store.enqueue(make_spec())
    newest = site_store.last_event_id()
    assert newest >= 3
    page = one_document(sub(site_cfg, "events", "list", "--limit", "2", "--json").stdout)
    assert len(page["events"]) == 2 and page["has_more"] is True
    rest = one_document(sub(site_cfg, "events", "list", "--after", str(page["next_after"]), "--limit", "1000",
                            "--json").stdout)
    assert rest["has_more"] is False and rest["next_after"] == newest
    lines = sub(site_cfg, "events", "list", "--limit", "1000").stdout.splitlines()  # without --json: JSON lines
    assert [json.loads(line) for line in lines] == page["events"] + rest["events"]


def _job_appeared(store, job_id: int) -> bool:
    try:
        store.get(job_id)
    except JobNotFound:
        return False
    return True


def test_json_with_a_waiting_mode_prints_only_the_job_as_it_ended(site_cfg, tmp_path, site_store, make_spec):
    """`submit --wait/--follow --json`, `jobs show --follow --json`: the job as it ended, the progress on stderr."""
    cases = [(path, option) for path, options in commands() if "--json" in options
             for option in sorted(options & FOLLOWING)]
    assert {path for path, _ in cases} == {("submit",), ("jobs", "show")}, (
        f"commands with --json and a waiting mode changed: {cases}; add them here")
    for n, (path, option) in enumerate(cases):
        if path == ("submit",):
            acquisition = tmp_path / f"acquisition-{n}"
            shutil.copytree(SLIDE3, acquisition)
            args, job_id = ["submit", str(acquisition)], n + 1  # each case queues one job
        else:
            job, _ = site_store.enqueue(make_spec())
            args, job_id = [*path, str(job.id)], job.id
        proc = subprocess.Popen(argv(site_cfg, *args, option, "--json"), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
        try:
            wait_until(lambda: _job_appeared(site_store, job_id), 30, message=f"job {job_id}")  # noqa: B023
            cancel = sub(site_cfg, "jobs", "cancel", str(job_id))
            assert cancel.returncode == 0, cancel.stderr
            stdout, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        name = " ".join([*path, option, "--json"])
        ended = one_document(stdout)
        assert (ended["id"], ended["state"]) == (job_id, "cancelled"), name
        assert ended["history"][-1]["state"] == "cancelled", name
        assert proc.returncode == (1 if path == ("submit",) else 0), (name, stderr)
        assert f"job {job_id} cancelled" in stderr, (name, stderr)


@pytest.mark.parametrize("option", sorted(FOLLOWING))
def test_submit_waiting_with_json_prints_the_succeeded_job_and_the_progress_on_stderr(site_cfg, tmp_path, site_store,
                                                                                       option):
    proc = subprocess.Popen(argv(site_cfg, "submit", str(SLIDE3), option, "--json"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env(), cwd=tmp_path)
    try:
        wait_until(lambda: _job_appeared(site_store, 1), 30, message="job 1 queued")
        work = sub(site_cfg, "work", "--burst")
        assert work.returncode == 0, work.stderr
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    job = one_document(stdout)
    assert (job["id"], job["state"]) == (1, "succeeded")
    assert job["result"] and job["finished_at"]
    assert proc.returncode == 0, stderr
    assert "job 1 queued: 2 file(s) of jdoe" in stderr
    assert "job 1 succeeded" in stderr and "100.0%" in stderr
