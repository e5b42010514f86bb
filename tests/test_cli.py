"""The command line: help for every command, the README, and each command against a real store.

Quick commands run in-process through ``watchfolder.cli.main`` (capsys);
``submit``/``work --burst`` and ``jobs show --follow`` run as real
``python -m watchfolder`` subprocesses on a config in tmp_path.
"""

from __future__ import annotations

import argparse
import email
import email.policy
import hashlib
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from watchfolder import __version__, cli
from watchfolder import config as configmod
from watchfolder.errors import PermanentImportError
from watchfolder.job import JobState, Progress
from watchfolder.service import make_notifier, open_store
from watchfolder.web.auth import TokenVerifier, hash_token

REPO = Path(__file__).resolve().parent.parent
SLIDE3 = REPO / "examples" / "acquisitions" / "slide3"
WORKER = "test-worker"


# -- fixtures ------------------------------------------------------------------------


@pytest.fixture
def cfg_path(tmp_path, clean_env) -> Path:
    """A config file for a tmp data dir: archive importer, folder outbox, no HTTP server."""
    path = tmp_path / "watchfolder.yaml"
    path.write_text(
        "data_dir: data\n"
        "workers: {count: 1, poll_interval: 0.1, heartbeat_seconds: 0.5}\n"
        "retry: {max_attempts: 3, backoff: [10, 60]}\n"
        "importer: {kind: archive}\n"
        "notify: {transport: folder, admin_email: admin@example.org}\n"
        "server: {enabled: false}\n",
        encoding="utf-8",
    )
    return path


@pytest.fixture
def config(cfg_path) -> configmod.Config:
    return configmod.load(cfg_path, environ={})


@pytest.fixture
def jobstore(config):
    """The store the CLI uses, mails composed like the service does."""
    s = open_store(config, make_notifier(config))
    yield s
    s.close()


def run_cli(cfg_path: Path, *args: str) -> int:
    return cli.main(["--config", str(cfg_path), *args])


def subprocess_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")}


def run_sub(cfg_path: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "watchfolder", "--config", str(cfg_path), *args],
        capture_output=True, text=True, env=subprocess_env(), cwd=cfg_path.parent, timeout=timeout,
    )


# -- help and docs -----------------------------------------------------------------------


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """Every (command path, parser) under ``parser``, the top level included."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, path + (name,))


def subcommand_actions(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        choice
        for action in parser._actions
        if isinstance(action, argparse._SubParsersAction)
        for choice in action._choices_actions
    ]


COMMANDS = [path for path, _ in walk(cli.build_parser())]


def test_parser_has_the_commands_of_the_issue():
    expected = {
        ("run",), ("work",), ("submit",), ("jobs", "list"), ("jobs", "show"), ("jobs", "retry"),
        ("jobs", "cancel"), ("jobs", "log"), ("status",), ("check-config",), ("mail", "list"),
        ("mail", "resend"), ("token", "new"),
    }
    assert expected <= set(COMMANDS)


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(p) or "watchfolder")
def test_every_command_has_help_naming_its_options(path, capsys):
    parser = dict(walk(cli.build_parser()))[path]
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*path, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: watchfolder" + "".join(f" {p}" for p in path))
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            continue
        if action.option_strings:
            longest = max(action.option_strings, key=len)
            assert longest in out, f"{' '.join(path)} --help does not mention {longest}"
        else:
            assert (action.metavar or action.dest) in out
    for choice in subcommand_actions(parser):
        assert choice.help, f"{' '.join(path)} {choice.dest} has no help line"
        assert choice.dest in out


def test_readme_mentions_every_top_level_command():
    readme = REPO / "README.md"
    assert readme.is_file(), "README.md is missing; the project ships it (issue 2)"
    text = readme.read_text(encoding="utf-8")
    top = [path[0] for path in COMMANDS if len(path) == 1]
    missing = [
        command for command in top
        if not re.search(rf"watchfolder(\s+(-c|--config)\s+\S+)?\s+{re.escape(command)}\b", text)
        and not re.search(rf"`{re.escape(command)}\b", text)  # a table row: `status [--json]`
    ]
    assert not missing, f"README.md does not mention: {', '.join(missing)}"


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"watchfolder {__version__}"


def test_no_command_prints_help_and_exits_2(capsys):
    assert cli.main([]) == 2
    assert "commands:" in capsys.readouterr().out


# -- submit and work, as real processes ------------------------------------------------------


def test_submit_then_work_burst_archives_and_mails_the_owner(tmp_path, cfg_path, config):
    acquisition = tmp_path / "incoming" / "slide3"
    shutil.copytree(SLIDE3, acquisition)
    manifest = json.loads((acquisition / "watchfolder.json").read_text())

    submitted = run_sub(cfg_path, "submit", str(acquisition), "--json")
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["state"] == "queued"
    assert job["owner"] == "jdoe"

    worked = run_sub(cfg_path, "work", "--burst")
    assert worked.returncode == 0, worked.stderr

    store = open_store(config)
    try:
        final = store.get(job["id"])
        assert final.state == JobState.SUCCEEDED, final.error
        assert final.attempts == 1
        mails = store.outbox_list()
    finally:
        store.close()

    archive = config.importer.archive.root / "jdoe" / "Brain atlas" / "2026-11-28 slide 3" / "slide3"
    assert sorted(p.name for p in archive.iterdir()) == ["tile_001.ome.tiff", "tile_002.ome.tiff"]
    for entry in manifest["files"]:
        copy = archive / entry["path"]
        assert hashlib.sha256(copy.read_bytes()).hexdigest() == entry["sha256"]
        assert copy.read_bytes() == (acquisition / entry["path"]).read_bytes()  # source left in place
    assert {f["sha256"] for f in final.result["files"]} == {e["sha256"] for e in manifest["files"]}

    # The burst worker delivered the mail before exiting: one .eml, to the owner.
    assert [(m.kind, m.state) for m in mails] == [("job_succeeded", "sent")]
    emls = list(config.notify.outbox_dir.glob("*.eml"))
    assert len(emls) == 1
    message = email.message_from_bytes(emls[0].read_bytes(), policy=email.policy.default)
    assert message["To"].addresses[0].addr_spec == "jdoe@example.org"

    # Submitting the same acquisition again returns the existing job.
    again = run_sub(cfg_path, "submit", str(acquisition))
    assert again.returncode == 0, again.stderr
    assert again.stdout.startswith(f"job {job['id']} already known:")


def test_submit_text_output(tmp_path, cfg_path, capsys):
    acquisition = tmp_path / "slide3"
    shutil.copytree(SLIDE3, acquisition)
    assert run_cli(cfg_path, "submit", str(acquisition), "--annotation", "stain=DAPI") == 0
    out = capsys.readouterr().out
    assert out == 'job 1 queued: 2 file(s) of jdoe → project "Brain atlas" / dataset "2026-11-28 slide 3" [queued]\n'


def test_submit_overrides_from_options(tmp_path, cfg_path, jobstore, capsys):
    acquisition = tmp_path / "plain"
    acquisition.mkdir()
    (acquisition / "a.tif").write_bytes(b"a" * 10)
    code = run_cli(cfg_path, "submit", str(acquisition), "--owner", "alice", "--screen", "Plate 7",
                   "--email", "alice@example.org", "--annotation", "stain=DAPI", "--annotation", "note=a=b")
    assert code == 0, capsys.readouterr().err
    job = jobstore.get(1)
    assert job.owner == "alice"
    assert job.spec.target.screen == "Plate 7"
    assert job.spec.email == "alice@example.org"
    assert job.spec.annotations == {"stain": "DAPI", "note": "a=b"}
    assert job.source.startswith("cli:")


def test_submit_reports_descriptor_warnings_and_logs_them(tmp_path, cfg_path, jobstore, capsys):
    acquisition = tmp_path / "slide3"
    shutil.copytree(SLIDE3, acquisition)
    manifest = json.loads((acquisition / "watchfolder.json").read_text())
    manifest["objektive"] = "63x"  # an unknown field: a warning, not an error
    (acquisition / "watchfolder.json").write_text(json.dumps(manifest))
    assert run_cli(cfg_path, "submit", str(acquisition)) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "objektive" in err
    assert "objektive" in jobstore.read_log(1)


def test_submit_without_owner_names_the_option(tmp_path, cfg_path, capsys):
    acquisition = tmp_path / "plain"
    acquisition.mkdir()
    (acquisition / "a.tif").write_bytes(b"a")
    assert run_cli(cfg_path, "submit", str(acquisition), "--dataset", "d") == 1
    err = capsys.readouterr().err
    assert err.startswith("watchfolder: error: ")
    assert "no owner" in err and "--owner" in err


def test_submit_bad_annotation(tmp_path, cfg_path, capsys):
    acquisition = tmp_path / "slide3"
    shutil.copytree(SLIDE3, acquisition)
    assert run_cli(cfg_path, "submit", str(acquisition), "--annotation", "objective") == 1
    assert capsys.readouterr().err == (
        "watchfolder: error: --annotation 'objective': write KEY=VALUE, e.g. --annotation objective=63x\n"
    )


def test_submit_bad_target_options(tmp_path, cfg_path, capsys):
    acquisition = tmp_path / "slide3"
    shutil.copytree(SLIDE3, acquisition)
    assert run_cli(cfg_path, "submit", str(acquisition), "--project", "P") == 1
    err = capsys.readouterr().err
    assert "--project" in err and "use --dataset, --project with --dataset" in err


def test_submit_nonexistent_path(tmp_path, cfg_path, capsys):
    missing = tmp_path / "no-such-acquisition"
    assert run_cli(cfg_path, "submit", str(missing), "--owner", "jdoe", "--dataset", "d") == 1
    assert capsys.readouterr().err == f"watchfolder: error: {missing}: does not exist; check the path\n"


def test_submit_with_invalid_config_exits_1_without_traceback(tmp_path, clean_env):
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: {count: two}\n")
    proc = run_sub(bad, "submit", str(SLIDE3))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "workers.count: must be a positive integer, got 'two'" in proc.stderr


# -- jobs -------------------------------------------------------------------------------------


@pytest.fixture
def five_jobs(jobstore, make_spec):
    """Jobs 1..5: owners and sources differ; job 2 carries a session key (a secret)."""
    specs = [
        make_spec(owner="jdoe", source="cli:jdoe"),
        make_spec(owner="alice", source="api:portal", session_key="omero-session-SECRET"),
        make_spec(owner="jdoe", source="watch:drop"),
        make_spec(owner="alice", source="api:portal"),
        make_spec(owner="bob", source="watch:other"),
    ]
    return [jobstore.enqueue(spec)[0] for spec in specs]


def list_json(cfg_path, capsys, *args) -> dict:
    assert run_cli(cfg_path, "jobs", "list", "--json", *args) == 0
    return json.loads(capsys.readouterr().out)


def test_jobs_list_pages_with_cursor(cfg_path, five_jobs, capsys):
    page = list_json(cfg_path, capsys, "--limit", "2")
    assert [j["id"] for j in page["jobs"]] == [5, 4]
    assert page["next_cursor"]
    page = list_json(cfg_path, capsys, "--limit", "2", "--cursor", page["next_cursor"])
    assert [j["id"] for j in page["jobs"]] == [3, 2]
    page = list_json(cfg_path, capsys, "--limit", "2", "--cursor", page["next_cursor"])
    assert [j["id"] for j in page["jobs"]] == [1]
    assert page["next_cursor"] is None


def test_jobs_list_filters(cfg_path, jobstore, five_jobs, capsys):
    jobstore.cancel(2)
    assert [j["id"] for j in list_json(cfg_path, capsys, "--owner", "alice")["jobs"]] == [4, 2]
    assert [j["id"] for j in list_json(cfg_path, capsys, "--source", "watch:*")["jobs"]] == [5, 3]
    assert [j["id"] for j in list_json(cfg_path, capsys, "--source", "watch:drop")["jobs"]] == [3]
    assert [j["id"] for j in list_json(cfg_path, capsys, "--state", "cancelled")["jobs"]] == [2]
    both = list_json(cfg_path, capsys, "--state", "cancelled", "--state", "queued", "--owner", "alice")
    assert [(j["id"], j["state"]) for j in both["jobs"]] == [(4, "queued"), (2, "cancelled")]


def test_jobs_list_json_never_shows_session_key(cfg_path, five_jobs, capsys):
    assert run_cli(cfg_path, "jobs", "list", "--json") == 0
    out = capsys.readouterr().out
    assert "omero-session-SECRET" not in out
    assert '"session_key"' not in out
    uses = {j["id"]: j["uses_session_key"] for j in json.loads(out)["jobs"]}
    assert uses == {1: False, 2: True, 3: False, 4: False, 5: False}


def test_jobs_list_text_with_next_page_hint(cfg_path, five_jobs, capsys):
    assert run_cli(cfg_path, "jobs", "list", "--limit", "3") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "STATE", "OWNER", "CREATED", "SOURCE", "TARGET"]
    assert [line.split()[:3] for line in lines[1:4]] == [
        ["5", "queued", "bob"], ["4", "queued", "alice"], ["3", "queued", "jdoe"]
    ]
    assert lines[4] == f"more: watchfolder --config {cfg_path.resolve()} jobs list --limit 3 --cursor 3"
    assert len(lines) == 5


def test_the_next_page_hint_repeats_the_filters_and_config_and_pasted_gives_the_next_page(
        tmp_path, jobstore, five_jobs, capsys, monkeypatch):
    """Finding 7 (issue 15 outside test): the hint lost the filters and --config."""
    import shlex
    jobstore.cancel(2)
    odd = tmp_path / "my conf's dir"
    odd.mkdir()
    cfg = odd / "wf.yaml"
    cfg.write_text((tmp_path / "watchfolder.yaml").read_text().replace("data_dir: data", f"data_dir: {tmp_path / 'data'}"))
    monkeypatch.delenv("WATCHFOLDER_CONFIG", raising=False)
    argv = ["jobs", "list", "--config", str(cfg), "--state", "queued", "--state", "cancelled",
            "--source", "api*", "--limit", "1"]
    seen = []
    while True:
        assert cli.main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        seen += [int(line.split()[0]) for line in lines[1:] if not line.startswith("more:")]
        if not lines[-1].startswith("more: "):
            break
        hint = shlex.split(lines[-1][len("more: "):])
        assert hint[:3] == ["watchfolder", "--config", str(cfg.resolve())]
        assert "'api*'" in lines[-1] and shlex.quote(str(cfg.resolve())) in lines[-1]
        argv = hint[1:]
    assert seen == [4, 2]  # every api job of those states, one page each, no other


def test_mail_list_shows_a_mail_folded_into_a_digest_as_such(cfg_path, jobstore, make_spec, capsys):
    """Finding 6 (issue 15 outside test): folded admin mails showed as `sent`."""
    import dataclasses

    from watchfolder.mail.outbox import OutboxSender
    from watchfolder.mail.transports import FolderTransport
    config = configmod.load(cfg_path, environ={})
    config = dataclasses.replace(config, notify=dataclasses.replace(config.notify, admin_digest_after=1))
    notifier = make_notifier(config)
    for i in range(3):
        jobstore.reject(dataclasses.replace(make_spec(owner="jdoe"), idempotency_key=f"d{i}"), "bad manifest",
                        mails=notifier.compose)
    sender = OutboxSender(jobstore, FolderTransport(config.data_dir / "outbox-test"), notifier=notifier)
    while sender.loop():
        pass
    (digest,) = [m for m in jobstore.outbox_list(limit=100) if m.kind == "admin_digest"]
    assert digest.state == "sent"
    assert run_cli(cfg_path, "mail", "list", "--state", "digested") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all(f"(in digest {digest.id}, not sent on its own)" in line for line in lines)
    assert all(line.split()[1] == "digested" for line in lines)
    assert run_cli(cfg_path, "mail", "list", "--json", "--state", "digested") == 0
    rows = json.loads(capsys.readouterr().out)["mails"]
    assert {(m["kind"], m["state"], m["digest_id"], m["sent_at"]) for m in rows} == \
        {("admin_failure", "digested", digest.id, None)}


def test_mail_list_pages_like_jobs_list(cfg_path, jobstore, make_spec, capsys):
    """Finding 7: `mail list` stopped at 20 rows with no hint and had no --cursor."""
    import dataclasses
    import shlex
    for i in range(3):
        jobstore.reject(dataclasses.replace(make_spec(owner="jdoe"), idempotency_key=f"r{i}"), "bad manifest")
    total = [m.id for m in jobstore.outbox_list(limit=1000)]
    assert len(total) >= 3
    argv, seen = ["--config", str(cfg_path), "mail", "list", "--limit", "2"], []
    while True:
        assert cli.main(argv) == 0
        lines = capsys.readouterr().out.splitlines()
        seen += [int(line.split()[0]) for line in lines if not line.startswith("more:")]
        if not lines[-1].startswith("more: "):
            break
        argv = shlex.split(lines[-1][len("more: "):])[1:]
    assert seen == total
    assert run_cli(cfg_path, "mail", "list", "--limit", "2", "--json") == 0
    page = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in page["mails"]] == total[:2] and page["next_cursor"] == total[1]
    assert run_cli(cfg_path, "mail", "list", "--cursor", str(total[1]), "--json", "--limit", "1000") == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)["mails"]] == total[2:]


def test_jobs_list_empty_and_bad_cursor(cfg_path, capsys):
    assert run_cli(cfg_path, "jobs", "list") == 0
    assert capsys.readouterr().out == "no jobs\n"
    assert run_cli(cfg_path, "jobs", "list", "--cursor", "abc") == 1
    assert "invalid cursor 'abc'" in capsys.readouterr().err


def test_jobs_show_text_and_json(cfg_path, five_jobs, capsys):
    assert run_cli(cfg_path, "jobs", "show", "2") == 0
    out = capsys.readouterr().out
    assert out.startswith("job 2  queued\n")
    assert "  owner:    alice\n" in out
    assert '  target:   project "Brain atlas" / dataset "slide 3"\n' in out
    assert "  source:   api:portal\n" in out
    assert "  attempts: 0/3\n" in out
    assert "omero-session-SECRET" not in out
    assert re.search(r"history:\n\s+\S+ \S+\s+queued\s+queued from api:portal", out)

    assert run_cli(cfg_path, "jobs", "show", "2", "--json") == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    assert (data["id"], data["state"], data["owner"]) == (2, "queued", "alice")
    assert [h["state"] for h in data["history"]] == ["queued"]
    assert "omero-session-SECRET" not in out


def test_jobs_show_running_has_progress_and_failed_has_error(cfg_path, jobstore, five_jobs, capsys):
    job = jobstore.claim(WORKER)
    jobstore.report_progress(job.id, WORKER, Progress("copying", 250, 1000, 0, 2))
    assert run_cli(cfg_path, "jobs", "show", str(job.id)) == 0
    out = capsys.readouterr().out
    assert "  progress: [########......................]  25.0%  250 B / 1000 B  0/2 files  copying" in out

    jobstore.fail(job.id, WORKER, PermanentImportError("tile_9.tif is not a supported format"))
    assert run_cli(cfg_path, "jobs", "show", str(job.id)) == 0
    assert "  error (permanent): tile_9.tif is not a supported format\n" in capsys.readouterr().out


def test_jobs_show_unknown_job(cfg_path, capsys):
    assert run_cli(cfg_path, "jobs", "show", "99") == 1
    assert capsys.readouterr().err == "watchfolder: error: no job with id 99\n"


def test_jobs_show_follow_draws_progress_until_the_job_ends(cfg_path, jobstore, make_spec):
    job, _ = jobstore.enqueue(make_spec())
    job = jobstore.claim(WORKER)
    jobstore.report_progress(job.id, WORKER, Progress("copying", 500, 1000, 1, 2))

    proc = subprocess.Popen(
        [sys.executable, "-m", "watchfolder", "--config", str(cfg_path), "jobs", "show", str(job.id), "--follow"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(), cwd=cfg_path.parent,
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read():
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        first = lines.get(timeout=30)
        assert first is not None, proc.stderr.read()
        assert first.startswith(f"job {job.id} running")
        assert "[###############...............]  50.0%  500 B / 1000 B  1/2 files  copying" in first

        # The job ends from another thread, as a worker would end it.
        finisher = threading.Thread(
            target=jobstore.succeed,
            args=(job.id, WORKER, {"files": []}),
            kwargs={"progress": Progress("copying", 1000, 1000, 2, 2)},
        )
        finisher.start()
        finisher.join(30)
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    rest = []
    while (line := lines.get(timeout=5)) is not None:
        rest.append(line)
    assert rest, "no line after the job ended"
    assert rest[-1].startswith(f"job {job.id} succeeded")
    assert "[##############################] 100.0%  1000 B / 1000 B  2/2 files" in rest[-1]


def test_jobs_follow_of_finished_job_returns_at_once(cfg_path, jobstore, make_spec, capsys):
    job, _ = jobstore.enqueue(make_spec())
    jobstore.cancel(job.id)
    assert run_cli(cfg_path, "jobs", "show", str(job.id), "--follow") == 0
    out = capsys.readouterr().out
    assert out.startswith(f"job {job.id} cancelled")
    assert out.count("\n") == 1


def test_jobs_retry(cfg_path, jobstore, make_spec, capsys):
    job, _ = jobstore.enqueue(make_spec())
    assert run_cli(cfg_path, "jobs", "retry", str(job.id)) == 1
    assert capsys.readouterr().err == (
        f"watchfolder: error: job {job.id} is queued; only failed, cancelled or waiting jobs can be retried\n"
    )
    jobstore.claim(WORKER)
    jobstore.fail(job.id, WORKER, PermanentImportError("owner jdoe is unknown"))
    assert run_cli(cfg_path, "jobs", "retry", str(job.id)) == 0
    assert capsys.readouterr().out == f"job {job.id} queued again\n"
    again = jobstore.get(job.id)
    assert (again.state, again.attempts, again.error) == (JobState.QUEUED, 0, None)
    assert again.history[-1].message.startswith("retry requested by cli:")


def test_jobs_cancel(cfg_path, jobstore, make_spec, capsys):
    queued, _ = jobstore.enqueue(make_spec())
    running, _ = jobstore.enqueue(make_spec())
    assert jobstore.claim(WORKER).id == queued.id  # oldest first; claim it, then queue is `running`

    assert run_cli(cfg_path, "jobs", "cancel", str(running.id)) == 0
    assert capsys.readouterr().out == f"job {running.id}: cancelled\n"
    assert jobstore.get(running.id).state == JobState.CANCELLED

    assert run_cli(cfg_path, "jobs", "cancel", str(queued.id)) == 0
    assert capsys.readouterr().out == f"job {queued.id}: cancel requested (running)\n"
    assert jobstore.get(queued.id).cancel_requested

    assert run_cli(cfg_path, "jobs", "cancel", str(running.id)) == 1
    assert capsys.readouterr().err == (
        f"watchfolder: error: job {running.id} is already cancelled; only unfinished jobs can be cancelled\n"
    )


def test_jobs_log(cfg_path, jobstore, make_spec, capsys):
    job, _ = jobstore.enqueue(make_spec())
    jobstore.log(job.id, "first line\nstill the first")
    jobstore.log(job.id, ["second line", "third line"])
    assert run_cli(cfg_path, "jobs", "cancel", str(job.id)) == 0
    capsys.readouterr()
    assert run_cli(cfg_path, "jobs", "log", str(job.id)) == 0
    lines = capsys.readouterr().out.splitlines()
    # A newline inside a message is escaped (a name cannot break a line); a sequence is one line each.
    assert [line.split(" ", 1)[1] for line in lines[:3]] == ["first line\\nstill the first", "second line",
                                                            "third line"]
    assert lines[3].split(" ", 1)[1].startswith("cancelled by cli:")
    assert run_cli(cfg_path, "jobs", "log", "42") == 1
    assert capsys.readouterr().err == "watchfolder: error: no job with id 42\n"


# -- mail -------------------------------------------------------------------------------------


def test_mail_list_and_resend(cfg_path, jobstore, make_spec, capsys):
    job, _ = jobstore.enqueue(make_spec())
    jobstore.claim(WORKER)
    jobstore.fail(job.id, WORKER, PermanentImportError("file format not supported"))
    assert run_cli(cfg_path, "mail", "list") == 0
    lines = capsys.readouterr().out.splitlines()
    # The owner's mail and the admin's, both pending, newest first.
    assert [line.split()[:2] for line in lines] == [["2", "pending"], ["1", "pending"]]
    assert "admin_failure" in lines[0] and "admin@example.org" in lines[0]
    assert "job_failed" in lines[1] and "jdoe@example.org" in lines[1]

    assert run_cli(cfg_path, "mail", "resend", "1") == 1
    assert "mail 1 does not exist or is not failed, dismissed, digested or sent" in capsys.readouterr().err

    (mail, *_) = jobstore.outbox_claim(limit=1)
    jobstore.outbox_failed(mail.id, "550 no such user", permanent=True)
    assert run_cli(cfg_path, "mail", "list", "--state", "failed") == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split()[:2] == ["1", "failed"] and line.endswith("(550 no such user)")

    assert run_cli(cfg_path, "mail", "resend", "1") == 0
    assert capsys.readouterr().out == "mail 1 queued again for jdoe@example.org\n"
    assert [m.id for m in jobstore.outbox_list(state="pending")] == [2, 1]


def test_mail_list_empty(cfg_path, capsys):
    assert run_cli(cfg_path, "mail", "list") == 0
    assert capsys.readouterr().out == "no mails\n"


# -- status, token -----------------------------------------------------------------------------


def test_status_json(cfg_path, jobstore, make_spec, capsys):
    first, _ = jobstore.enqueue(make_spec())
    jobstore.enqueue(make_spec())
    jobstore.cancel(first.id)
    code = run_cli(cfg_path, "status", "--json")
    status = json.loads(capsys.readouterr().out)
    assert code == (0 if status["healthy"] else 1)
    assert status["healthy"] is True, status["problems"]
    assert status["version"] == __version__
    assert status["queue"]["counts"] == {
        "queued": 1, "running": 0, "retry_wait": 0, "succeeded": 0, "failed": 0, "cancelled": 1
    }
    assert status["queue"]["oldest_queued_at"] is not None
    assert status["outbox"]["counts"]["pending"] == 1  # the owner's cancellation mail
    assert status["importer"]["ok"] is True


def test_status_text_is_yaml(cfg_path, capsys):
    assert run_cli(cfg_path, "status") == 0
    status = yaml.safe_load(capsys.readouterr().out)
    assert status["queue"]["counts"]["queued"] == 0
    # For people: local times, IEC sizes and percentages, not epoch floats and raw bytes (--json has those).
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", status["generated_at"])
    disk = status["disk"][0]
    assert re.fullmatch(r"[\d.]+ (B|KiB|MiB|GiB|TiB|PiB)", disk["free"]), disk
    assert disk["free_fraction"].endswith(" %")


def test_token_new_prints_token_and_a_snippet_that_validates(tmp_path, capsys):
    assert cli.main(["token", "new", "--name", "portal", "--role", "submit", "--owner", "jdoe"]) == 0
    out = capsys.readouterr().out
    first, second, snippet = out.split("\n", 2)
    prefix = "token (shown once; give it to the client): "
    assert first.startswith(prefix)
    token = first[len(prefix):]
    assert len(token) > 30
    assert second == "add this under server.tokens in the config file:"
    assert token not in snippet
    entries = yaml.safe_load(snippet)
    assert entries == [{"name": "portal", "role": "submit", "hash": hash_token(token), "owners": ["jdoe"]}]

    config = configmod.parse(
        {"data_dir": str(tmp_path / "d"), "server": {"tokens": entries}}, path=tmp_path / "w.yaml", environ={}
    )
    principal = TokenVerifier(config.server.tokens).verify(f"Bearer {token}")
    assert (principal.name, principal.role, principal.owners) == ("portal", "submit", ("jdoe",))


def test_token_new_rejects_bad_name(capsys):
    assert cli.main(["token", "new", "--name", "bad name", "--role", "read"]) == 1
    assert "token name 'bad name' is not valid" in capsys.readouterr().err


def test_commands_work_while_a_watch_folder_is_missing(cfg_path, tmp_path, capsys):
    # Outside report b12 item 6: a watch folder moved away (or its share unmounted) made every
    # command exit 1 "invalid configuration"; the service waits for the folder, so must the CLI.
    gone = tmp_path / "scope-drop"
    cfg_path.write_text(cfg_path.read_text(encoding="utf-8") + f"watch: [{{name: scope, path: '{gone}'}}]\n",
                        encoding="utf-8")
    for args in (("status",), ("jobs", "list"), ("pending",)):
        assert run_cli(cfg_path, *args) == 0, args
    capsys.readouterr()
    assert run_cli(cfg_path, "check-config") == 0
    err = capsys.readouterr().err
    assert f"warning: watch folder scope: {gone} does not exist now" in err
    assert "the service waits for it to come back" in err


def test_a_job_of_a_killed_worker_is_named_with_when_it_comes_back(cfg_path, jobstore, make_spec, capsys):
    # Outside test: after a `kill -9` of `work`, `work --burst` exited 0 at once saying nothing of
    # the job still held by the dead worker's lease, and `status` said healthy with running: 1.
    job, _ = jobstore.enqueue(make_spec())
    claimed = jobstore.claim("vm:4242:w1")  # a worker that never published a row: its process is gone
    assert claimed is not None and claimed.id == job.id
    assert run_cli(cfg_path, "work", "--burst") == 0
    err = capsys.readouterr().err
    assert (f"job {job.id} is still running on worker vm:4242:w1, which is gone (no heartbeat); it goes back "
            "to the queue when its lease ends at ") in err
    assert "run 'work --burst' again after that" in err
    assert jobstore.get(job.id).state == JobState.RUNNING  # not taken over before its lease ends
    assert run_cli(cfg_path, "status", "--json") == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [p for p in problems if p.startswith(f"job {job.id} is running on worker vm:4242:w1, which is gone; "
                                                "it goes back to the queue when its lease ends at ")]
    # A worker that is there (its row published) is not named.
    jobstore.set_component("worker", "vm:4242:w1", {"heartbeat_seconds": 60, "process_start": None})
    run_cli(cfg_path, "status", "--json")
    assert not [p for p in json.loads(capsys.readouterr().out)["problems"] if "which is gone" in p]


def test_status_text_shows_since_times_as_local_times():
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", cli._human(1796237657.97, "paused_since"))
    assert cli._human({"targets": [{"paused_since": 1796237657.97}]})["targets"][0]["paused_since"] != 1796237657.97
