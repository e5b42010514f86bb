"""Configuration: every invalid config names its key and the fix; env overrides, secrets, paths.

Configs are real YAML files in tmp_path read by ``config.load`` (or raw mappings
given to ``config.parse`` with an explicit ``environ``), and ``check-config`` runs
both in-process and as a real ``python -m watchfolder`` subprocess.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from watchfolder import cli
from watchfolder import config as configmod
from watchfolder.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cr3t-Value-never-printed"


def problems_of(raw, tmp_path: Path, environ: dict[str, str] | None = None) -> list[str]:
    """The problem lines of an invalid raw config (fails the test when it is valid)."""
    with pytest.raises(ConfigError) as info:
        configmod.parse(raw, path=tmp_path / "watchfolder.yaml", environ=environ or {})
    return info.value.problems


def base(tmp_path: Path, **sections) -> dict:
    """A valid raw config under tmp_path, with sections replaced."""
    raw = {
        "data_dir": str(tmp_path / "data"),
        "importer": {"kind": "archive"},
        "notify": {"transport": "folder"},
        "server": {"enabled": False},
    }
    raw.update(sections)
    return raw


def write(tmp_path: Path, text: str, name: str = "watchfolder.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def drop(tmp_path) -> Path:
    folder = tmp_path / "drop"
    folder.mkdir()
    return folder


# -- one problem each ------------------------------------------------------------


INVALID = {
    "workers_count_word": (
        {"workers": {"count": "two"}},
        "workers.count: must be a positive integer, got 'two'",
    ),
    "workers_count_zero": (
        {"workers": {"count": 0}},
        "workers.count: must be a positive integer, got 0",
    ),
    "workers_count_bool": (
        {"workers": {"count": True}},
        "workers.count: must be a positive integer, got True",
    ),
    "unknown_key_did_you_mean": (
        {"workers": {"cuont": 3}},
        "workers.cuont: unknown key; did you mean 'count'?",
    ),
    "unknown_top_key_did_you_mean": (
        {"notfiy": {}},
        "notfiy: unknown key; did you mean 'notify'?",
    ),
    "unknown_key_without_close_match": (
        {"store": {"zzz": 1}},
        "store.zzz: unknown key; known keys: busy_timeout, lease_seconds, logs_dir, password, path, synchronous, url",
    ),
    "bad_enum_transport": (
        {"notify": {"transport": "pigeon"}},
        "notify.transport: must be one of folder, smtp, none, got 'pigeon'",
    ),
    "bad_enum_importer": (
        {"importer": {"kind": "ftp"}},
        "importer.kind: must be one of archive, omero, noop, got 'ftp'",
    ),
    "bad_enum_log_level": (
        {"log_level": "loud"},
        "log_level: must be one of debug, info, warning, error, got 'loud'",
    ),
    "bad_listen": (
        {"server": {"listen": "localhost"}},
        "server.listen: must be HOST:PORT such as 127.0.0.1:8470, got 'localhost'",
    ),
    "bad_listen_port": (
        {"server": {"listen": "127.0.0.1:99999"}},
        "server.listen: port must be between 0 and 65535, got '127.0.0.1:99999'",
    ),
    "bad_token_hash": (
        {"server": {"tokens": [{"name": "portal", "role": "submit", "hash": "wf_plaintexttoken"}]}},
        "server.tokens[0].hash: must be sha256:<64 hex digits>, as printed by `watchfolder token new`; "
        "never the token itself",
    ),
    "token_hash_missing": (
        {"server": {"tokens": [{"name": "portal", "role": "submit"}]}},
        "server.tokens[0].hash: missing; create one with `watchfolder token new --name NAME --role ROLE`",
    ),
    "bad_token_role": (
        {"server": {"tokens": [{"name": "portal", "role": "root", "hash": "sha256:" + "0" * 64}]}},
        "server.tokens[0].role: must be one of submit, read, admin, got 'root'",
    ),
    "secret_env_not_set": (
        {"notify": {"transport": "smtp", "smtp": {"username": "u", "password": {"env": "WF_TEST_UNSET_PW"}}}},
        "notify.smtp.password: environment variable 'WF_TEST_UNSET_PW' is not set; export it or use {file: PATH}",
    ),
    "secret_bad_form": (
        {"notify": {"smtp": {"username": "u", "password": {"vault": "x"}}}},
        "notify.smtp.password: must be {env: VARIABLE} or {file: PATH} (or an inline string, discouraged)",
    ),
    "password_without_username": (
        {"notify": {"smtp": {"password": "inline"}}},
        "notify.smtp.username: required when notify.smtp.password is set",
    ),
    "layout_placeholder_unknown": (
        {"importer": {"archive": {"layout": "{owner}/{projet}"}}},
        "importer.archive.layout: unknown placeholder(s) projet; use {acquisition}, {dataset}, {date}, {group}, "
        "{job_id}, {owner}, {project}, {screen}",
    ),
    "layout_escapes": (
        {"importer": {"archive": {"layout": "../{owner}"}}},
        "importer.archive.layout: must be a relative layout without '..', got '../{owner}'",
    ),
    "omero_without_admin_password": (
        {"importer": {"kind": "omero"}},
        "importer.omero.admin_password: required when importer.kind is omero; set {env: OMERO_ADMIN_PASSWORD}",
    ),
    "omero_bad_port": (
        {"importer": {"omero": {"port": 70000}}},
        "importer.omero.port: must be a port number between 1 and 65535, got 70000",
    ),
    "omero_sudo_ttl_below_the_keep_alive": (  # issue 14, low (b): it was raised to 12000 silently
        {"importer": {"omero": {"sudo_ttl_ms": 5000}}},
        "importer.omero.sudo_ttl_ms: must be a whole number of milliseconds of at least 12000 (the owner's "
        "session's idle timeout: omero-py keeps it alive every 6 s at the most often, so less would let it "
        "expire between two keep-alives); the default is 600000, got 5000",
    ),
    "bad_email": (
        {"notify": {"admin_email": "admin"}},
        "notify.admin_email: must be an email address such as admin@example.org, got 'admin'",
    ),
    "empty_backoff": (
        {"retry": {"backoff": []}},
        "retry.backoff: must be a non-empty list of seconds such as [30, 120, 600], got list",
    ),
    "negative_backoff": (
        {"retry": {"backoff": [10, -1]}},
        "retry.backoff: must be a number of seconds (0 or more), got -1",
    ),
    "section_not_mapping": (
        {"workers": [1, 2]},
        "workers: must be a mapping of keys, got list",
    ),
    "synchronous_enum": (
        {"store": {"synchronous": "off"}},
        "store.synchronous: must be one of full, normal, got 'off'",
    ),
    "watch_not_list": (
        {"watch": {"path": "x"}},
        "watch: must be a list of watch folders, got dict",
    ),
}


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_config_names_key_and_fix(name, tmp_path):
    sections, expected = INVALID[name]
    raw = base(tmp_path)
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(raw.get(key), dict):
            raw[key] = {**raw[key], **value}
        else:
            raw[key] = value
    assert problems_of(raw, tmp_path) == [expected]


def test_watch_path_missing(tmp_path, drop):
    raw = base(tmp_path, watch=[{"name": "scope"}])
    assert problems_of(raw, tmp_path) == ["watch[0].path: missing; name the drop folder to watch"]


def test_watch_path_that_does_not_exist_is_not_a_config_error(tmp_path):
    # A share not mounted yet, a folder moved away for a while: the watcher waits for it,
    # and every command (status, jobs, pending) keeps working (outside report b12 item 6).
    missing = tmp_path / "nowhere"
    config = configmod.parse(base(tmp_path, watch=[{"path": str(missing)}]), path=tmp_path / "w.yaml", environ={})
    assert config.watch[0].path == missing
    assert configmod.missing_watch_paths(config) == [
        f"watch folder nowhere: {missing} does not exist now (removed, or its share is not mounted); "
        "the service waits for it to come back; create it or fix the path if it is a typo"
    ]


def test_watch_path_is_a_file(tmp_path):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    raw = base(tmp_path, watch=[{"path": str(file)}])
    assert problems_of(raw, tmp_path) == [f"watch[0].path: {file} is not a folder; fix the path"]


def test_watch_folder_inside_another_is_refused_with_the_fix(tmp_path):
    # Outside report b12 item 10: `del` (delete on success) on drop, `nested` (keep) on
    # drop/inner gave one acquisition two jobs, two mails, and deleted the kept data.
    outer = tmp_path / "drop"
    inner = outer / "inner"
    inner.mkdir(parents=True)
    raw = base(tmp_path, watch=[{"name": "del", "path": str(outer)}, {"name": "nested", "path": str(inner)}])
    assert problems_of(raw, tmp_path) == [
        f"watch[1].path: {inner} and watch[0].path ({outer}) overlap: watch[1] is inside watch[0], so both "
        "would import its acquisitions; give them folders side by side (not one inside the other), or remove one entry"
    ]
    # The other order, and the inner one not created yet, are the same mistake.
    raw = base(tmp_path, watch=[{"name": "n", "path": str(outer / "later")}, {"name": "d", "path": str(outer)}])
    assert problems_of(raw, tmp_path) == [
        f"watch[1].path: {outer} and watch[0].path ({outer / 'later'}) overlap: watch[0] is inside watch[1], so "
        "both would import its acquisitions; give them folders side by side (not one inside the other), "
        "or remove one entry"
    ]


def test_same_watch_folder_twice_through_a_symlink_is_refused(tmp_path):
    real = tmp_path / "drop"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    raw = base(tmp_path, watch=[{"name": "a", "path": str(real)}, {"name": "b", "path": str(link)}])
    assert problems_of(raw, tmp_path) == [
        f"watch[1].path: {link} is the same folder as watch[0].path ({real}); "
        "watch each folder once: remove one of the two entries"
    ]


def test_watch_folders_side_by_side_are_fine(tmp_path):
    (tmp_path / "drop").mkdir()
    (tmp_path / "drop-2").mkdir()  # a shared name prefix is not nesting
    raw = base(tmp_path, watch=[{"name": "a", "path": str(tmp_path / "drop")},
                                {"name": "b", "path": str(tmp_path / "drop-2")}])
    config = configmod.parse(raw, path=tmp_path / "w.yaml", environ={})
    assert [w.name for w in config.watch] == ["a", "b"]


def test_watch_path_under_data_dir_may_be_created_at_start(tmp_path):
    # The demo's drop folder lives in data_dir and is created by the service.
    config = configmod.parse(base(tmp_path, watch=[{"path": str(tmp_path / "data" / "drop")}]),
                             path=tmp_path / "w.yaml", environ={})
    assert config.watch[0].path == tmp_path / "data" / "drop"
    assert config.watch[0].name == "drop"


def test_move_action_without_folder(tmp_path, drop):
    raw = base(tmp_path, watch=[{"path": str(drop), "on_success": {"action": "move"}}])
    assert problems_of(raw, tmp_path) == [
        "watch[0].on_success.folder: required when action is move; name the folder to move acquisitions to"
    ]


def test_on_failure_cannot_delete(tmp_path, drop):
    # Bad input never disappears: a failed acquisition may be kept or moved, not deleted.
    raw = base(tmp_path, watch=[{"path": str(drop), "on_failure": "delete"}])
    assert problems_of(raw, tmp_path) == ["watch[0].on_failure.action: must be one of keep, move, got 'delete'"]


def test_duplicate_watch_names(tmp_path, drop):
    other = tmp_path / "other"
    other.mkdir()
    raw = base(tmp_path, watch=[{"name": "scope", "path": str(drop)}, {"name": "scope", "path": str(other)}])
    assert problems_of(raw, tmp_path) == [
        "watch[1].name: duplicate watch name 'scope'; give each watch folder its own name"
    ]


def test_layout_detection_needs_layout(tmp_path, drop):
    raw = base(tmp_path, watch=[{"path": str(drop), "detection": "layout"}])
    assert problems_of(raw, tmp_path) == [
        "watch[0].layout: required when detection is layout, e.g. '{owner}/{dataset}/'"
    ]


def test_watch_target_invalid(tmp_path, drop):
    raw = base(tmp_path, watch=[{"path": str(drop), "target": {"project": "P"}}])
    (problem,) = problems_of(raw, tmp_path)
    assert problem.startswith("watch[0].target: keys ['project'] do not form a target; use one of")


def test_secret_file_missing(tmp_path):
    raw = base(tmp_path, notify={"smtp": {"username": "u", "password": {"file": "missing-password.txt"}}})
    (problem,) = problems_of(raw, tmp_path)
    assert problem.startswith("notify.smtp.password: cannot read secret file 'missing-password.txt'")
    assert "No such file or directory" in problem


def test_duplicate_token_names(tmp_path):
    token = {"name": "portal", "role": "read", "hash": "sha256:" + "a" * 64}
    raw = base(tmp_path, server={"tokens": [token, dict(token)]})
    assert problems_of(raw, tmp_path) == [
        "server.tokens[1].name: duplicate token name 'portal'; names must be unique"
    ]


def test_all_problems_reported_at_once(tmp_path, drop):
    raw = base(
        tmp_path,
        log_level="loud",
        workers={"count": "two", "cuont": 3},
        importer={"kind": "omero", "archive": {"layout": "{owner}/{projet}"}},
        notify={"transport": "pigeon", "admin_email": "nope"},
        server={"listen": "localhost", "tokens": [{"name": "a", "role": "admin", "hash": "abc"}]},
        watch=[{"name": "d", "path": str(drop), "on_success": {"action": "move"}}, {"name": "d", "path": str(drop)}],
    )
    problems = problems_of(raw, tmp_path)
    assert sorted(p.split(":")[0] for p in problems) == sorted([
        "log_level",
        "workers.cuont",
        "workers.count",
        "importer.archive.layout",
        "importer.omero.admin_password",
        "notify.transport",
        "notify.admin_email",
        "server.tokens[0].hash",
        "server.listen",
        "watch[0].on_success.folder",
        "watch[1].path",  # the same folder twice
        "watch[1].name",
    ])
    # The exception's text lists every problem, one per line, for the command line.
    with pytest.raises(ConfigError) as info:
        configmod.parse(raw, path=tmp_path / "w.yaml", environ={})
    text = str(info.value)
    assert text.startswith("invalid configuration:\n")
    assert all(f"\n  {p}" in text for p in problems)


# -- files: YAML errors, missing file ------------------------------------------------


def test_invalid_yaml_names_line_and_column(tmp_path):
    path = write(tmp_path, "data_dir: data\nworkers:\n  count: 2\n   poll_interval: 1\n")
    with pytest.raises(ConfigError) as info:
        configmod.load(path, environ={})
    (problem,) = info.value.problems
    assert problem.startswith(f"{path}: invalid YAML at line 4, column 17: ")
    assert "mapping values are not allowed here" in problem


def test_yaml_not_a_mapping(tmp_path):
    path = write(tmp_path, "- just\n- a list\n")
    with pytest.raises(ConfigError) as info:
        configmod.load(path, environ={})
    assert info.value.problems == ["the config file must be a YAML mapping of keys (data_dir:, workers:, …)"]


def test_config_file_missing_names_the_fix(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        configmod.load(missing, environ={})
    assert info.value.problems == [
        f"config file {missing} does not exist; copy config/watchfolder.example.yaml there"
    ]


def test_no_config_given(tmp_path):
    with pytest.raises(ConfigError) as info:
        configmod.load(None, environ={})
    assert info.value.problems == ["no config file given; pass --config PATH or set WATCHFOLDER_CONFIG"]


def test_config_path_from_environment(tmp_path):
    path = write(tmp_path, "data_dir: somewhere\n")
    config = configmod.load(None, environ={"WATCHFOLDER_CONFIG": str(path)})
    assert config.data_dir == tmp_path / "somewhere"


def test_empty_file_gives_defaults(tmp_path):
    config = configmod.load(write(tmp_path, ""), environ={})
    assert config.workers.count == 2
    assert config.importer.kind == "archive"
    assert config.data_dir == tmp_path / "watchfolder-data"
    assert config.store.path == tmp_path / "watchfolder-data" / "watchfolder.db"


# -- environment overrides ----------------------------------------------------------


def test_env_override_sets_typed_value(tmp_path):
    config = configmod.parse(base(tmp_path, workers={"count": 2}), path=tmp_path / "w.yaml",
                             environ={"WATCHFOLDER__WORKERS__COUNT": "4"})
    assert config.workers.count == 4


def test_env_override_creates_missing_section_and_list_items(tmp_path, drop):
    raw = base(tmp_path, watch=[{"path": str(drop), "quiet_period": 30}])
    environ = {
        "WATCHFOLDER__RETRY__BACKOFF": "[1, 2, 3]",
        "WATCHFOLDER__WATCH__0__QUIET_PERIOD": "2.5",
        "WATCHFOLDER__SERVER__ENABLED": "true",
        "UNRELATED": "x",
    }
    config = configmod.parse(raw, path=tmp_path / "w.yaml", environ=environ)
    assert config.retry.backoff == (1.0, 2.0, 3.0)
    assert config.watch[0].quiet_period == 2.5
    assert config.server.enabled is True


def test_env_override_is_validated_like_the_file(tmp_path):
    problems = problems_of(base(tmp_path), tmp_path, environ={"WATCHFOLDER__WORKERS__COUNT": "two"})
    assert problems == ["workers.count: must be a positive integer, got 'two'"]


def test_env_override_through_a_scalar_is_refused(tmp_path):
    with pytest.raises(ConfigError) as info:
        configmod.parse(base(tmp_path, log_level="info"), path=tmp_path / "w.yaml",
                        environ={"WATCHFOLDER__LOG_LEVEL__X": "1"})
    assert info.value.problems == [
        "WATCHFOLDER__LOG_LEVEL__X: cannot override log_level.x; that key is not a mapping"
    ]


def test_env_override_applies_to_loaded_file(tmp_path):
    path = write(tmp_path, "workers:\n  count: 2\n")
    config = configmod.load(path, environ={"WATCHFOLDER__WORKERS__COUNT": "4"})
    assert config.workers.count == 4


# -- secrets -------------------------------------------------------------------------


def smtp_with_secret(tmp_path: Path, password) -> dict:
    return base(tmp_path, notify={"transport": "smtp", "smtp": {"host": "mail", "username": "wf", "password": password}})


def test_secret_from_env_given_to_parse(tmp_path):
    # The environ passed to parse is the environment: overrides and secrets alike.
    config = configmod.parse(smtp_with_secret(tmp_path, {"env": "WF_TEST_SMTP_PW"}), path=tmp_path / "w.yaml",
                             environ={"WF_TEST_SMTP_PW": SECRET})
    assert config.notify.smtp.password.reveal() == SECRET


def test_secret_from_env_and_its_redaction(tmp_path, monkeypatch):
    monkeypatch.setenv("WF_TEST_SMTP_PW", SECRET)
    config = configmod.parse(smtp_with_secret(tmp_path, {"env": "WF_TEST_SMTP_PW"}), path=tmp_path / "w.yaml",
                             environ=dict(os.environ))
    password = config.notify.smtp.password
    assert password.reveal() == SECRET
    assert SECRET not in repr(password) and SECRET not in str(password) and SECRET not in repr(config)
    dumped = configmod.to_dict(config)
    assert dumped["notify"]["smtp"]["password"] == "<redacted: env WF_TEST_SMTP_PW>"
    assert SECRET not in yaml.safe_dump(dumped)


def test_secret_from_file_relative_to_config_and_its_redaction(tmp_path):
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "omero.txt").write_text(SECRET + "\n")
    config = configmod.parse(
        base(tmp_path, importer={"kind": "omero", "omero": {"admin_password": {"file": "secrets/omero.txt"}}}),
        path=tmp_path / "w.yaml",
        environ={},
    )
    assert config.importer.omero.admin_password.reveal() == SECRET  # trailing newline stripped
    dumped = configmod.to_dict(config)
    assert dumped["importer"]["omero"]["admin_password"] == f"<redacted: file {secrets_dir / 'omero.txt'}>"
    assert SECRET not in yaml.safe_dump(dumped)


def test_inline_secret_is_redacted_too(tmp_path):
    config = configmod.parse(smtp_with_secret(tmp_path, SECRET), path=tmp_path / "w.yaml", environ={})
    assert configmod.to_dict(config)["notify"]["smtp"]["password"] == "<redacted: inline>"


def secret_config_file(tmp_path: Path) -> Path:
    (tmp_path / "pw").write_text(SECRET)
    return write(
        tmp_path,
        "data_dir: data\n"
        "server: {enabled: false}\n"
        "importer:\n  kind: omero\n  omero:\n    admin_password: {file: pw}\n"
        "notify:\n  transport: smtp\n  smtp:\n    host: mail.example.org\n    username: wf\n"
        "    password: {env: WF_TEST_SMTP_PW}\n",
    )


def test_check_config_prints_effective_config_redacted(tmp_path, capsys, clean_env, monkeypatch):
    monkeypatch.setenv("WF_TEST_SMTP_PW", SECRET)
    monkeypatch.setenv("WATCHFOLDER__WORKERS__COUNT", "7")
    path = secret_config_file(tmp_path)
    assert cli.main(["--config", str(path), "check-config"]) == 0
    out = capsys.readouterr().out
    assert SECRET not in out
    header, _, body = out.partition("\n")
    assert header == f"# {path.resolve()}: valid"
    effective = yaml.safe_load(body)
    assert effective["workers"]["count"] == 7
    assert effective["data_dir"] == str(tmp_path / "data")
    assert effective["notify"]["smtp"]["password"] == "<redacted: env WF_TEST_SMTP_PW>"
    assert effective["importer"]["omero"]["admin_password"] == f"<redacted: file {tmp_path / 'pw'}>"


def test_check_config_reports_problems_and_exits_1(tmp_path, capsys, clean_env):
    path = write(tmp_path, "workers:\n  count: two\nnotify:\n  transprot: folder\n")
    assert cli.main(["--config", str(path), "check-config"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "watchfolder: error: invalid configuration:\n"
        "  workers.count: must be a positive integer, got 'two'\n"
        "  notify.transprot: unknown key; did you mean 'transport'?\n"
    )


def test_check_config_subprocess_redacts_secrets(tmp_path):
    path = secret_config_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")}
    env["WF_TEST_SMTP_PW"] = SECRET
    proc = subprocess.run(
        [sys.executable, "-m", "watchfolder", "--config", str(path), "check-config"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert SECRET not in proc.stdout + proc.stderr
    effective = yaml.safe_load(proc.stdout.partition("\n")[2])
    assert effective["notify"]["smtp"]["password"] == "<redacted: env WF_TEST_SMTP_PW>"
    assert effective["importer"]["omero"]["admin_password"] == f"<redacted: file {tmp_path / 'pw'}>"


def test_check_config_subprocess_missing_env_secret(tmp_path):
    path = secret_config_file(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER") and k != "WF_TEST_SMTP_PW"}
    proc = subprocess.run(
        [sys.executable, "-m", "watchfolder", "--config", str(path), "check-config"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert ("notify.smtp.password: environment variable 'WF_TEST_SMTP_PW' is not set; "
            "export it or use {file: PATH}") in proc.stderr


# -- paths ---------------------------------------------------------------------------


def test_relative_paths_resolve_against_config_folder(tmp_path, monkeypatch):
    conf_dir = tmp_path / "etc" / "watchfolder"
    conf_dir.mkdir(parents=True)
    (conf_dir / "drops" / "scope1").mkdir(parents=True)
    (conf_dir / "templates").mkdir()
    path = write(
        conf_dir,
        "data_dir: ../../var/wf\n"
        "store: {path: db/jobs.db}\n"
        "importer: {archive: {root: ../../archive}}\n"
        "notify: {outbox_dir: mail, templates_dir: templates}\n"
        "server: {allowed_roots: [drops]}\n"
        "watch:\n  - path: drops/scope1\n    on_success: {action: move, folder: done}\n",
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the working directory must not matter
    config = configmod.load(path, environ={})
    assert config.data_dir == tmp_path / "var" / "wf"
    assert config.store.path == conf_dir / "db" / "jobs.db"
    assert config.importer.archive.root == tmp_path / "archive"
    assert config.notify.outbox_dir == conf_dir / "mail"
    assert config.notify.templates_dir == conf_dir / "templates"
    assert config.server.allowed_roots == (conf_dir / "drops",)
    assert config.watch[0].path == conf_dir / "drops" / "scope1"
    assert config.watch[0].on_success.folder == conf_dir / "done"
    # Defaults that hang off data_dir follow it.
    assert config.logs_dir == tmp_path / "var" / "wf" / "logs"


def test_defaults_follow_data_dir(tmp_path):
    config = configmod.load(write(tmp_path, "data_dir: d\n"), environ={})
    assert config.store.path == tmp_path / "d" / "watchfolder.db"
    assert config.importer.archive.root == tmp_path / "d" / "archive"
    assert config.notify.outbox_dir == tmp_path / "d" / "outbox"


def test_config_is_immutable(make_config):
    config = make_config()
    with pytest.raises(AttributeError):
        config.workers.count = 9  # type: ignore[misc]


# -- shipped configs -------------------------------------------------------------------


def test_demo_config_validates():
    config = configmod.load(REPO / "config" / "demo.yaml", environ={})
    assert config.importer.kind == "archive"
    assert config.notify.transport == "folder"
    # Everything under one local directory, next to the repository.
    for path in (config.store.path, config.importer.archive.root, config.notify.outbox_dir,
                 *(w.path for w in config.watch)):
        assert path.is_relative_to(config.data_dir), path


EXAMPLE = REPO / "config" / "watchfolder.example.yaml"


def load_example(tmp_path: Path) -> configmod.Config:
    """The example config, with the environment it asks for and its site folders moved into tmp_path."""
    assert EXAMPLE.is_file(), "config/watchfolder.example.yaml is missing; the project ships it (issue 2)"
    raw = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    environ = {name: "example-secret" for name in _env_names(raw)}
    # A webhook secret has a format of its own (Standard Webhooks): give it one.
    environ["LIMS_WEBHOOK_SECRET"] = "whsec_" + "c2VjcmV0" * 5
    # Watch folders must exist; the example names the site's (/srv/...), as it should.
    for i, _ in enumerate(raw.get("watch") or []):
        folder = tmp_path / f"watch{i}"
        folder.mkdir()
        environ[f"WATCHFOLDER__WATCH__{i}__PATH"] = str(folder)
    return configmod.load(EXAMPLE, environ=environ)


def test_example_config_validates(tmp_path):
    config = load_example(tmp_path)
    assert config.watch, "the example shows at least one watch folder"
    assert configmod.to_dict(config)


def test_example_config_names_every_option(tmp_path):
    text = EXAMPLE.read_text(encoding="utf-8")
    keys: set[str] = set()

    def collect(node):
        if isinstance(node, dict):
            keys.update(node)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for value in node:
                collect(value)

    collect(configmod.to_dict(load_example(tmp_path)))
    yaml_name = {"sender": "from"}  # dataclass field -> YAML key, where they differ
    missing = sorted(
        yaml_name.get(k, k) for k in keys if not re.search(rf"\b{re.escape(yaml_name.get(k, k))}:", text)
    )
    assert not missing, f"config/watchfolder.example.yaml does not show: {', '.join(missing)}"


def _env_names(node):
    if isinstance(node, dict):
        if set(node) == {"env"} and isinstance(node["env"], str):
            yield node["env"]
        for value in node.values():
            yield from _env_names(value)
    elif isinstance(node, list):
        for value in node:
            yield from _env_names(value)


@pytest.mark.parametrize(
    ("events", "message"),
    [
        ({"webhooks": [{"url": "ftp://x", "secret": "whsec_" + "QUJD" * 11}]},
         "events.webhooks[0].url: must be an http:// or https:// URL"),
        ({"webhooks": [{"url": "https://lims.example.org/h", "secret": "hunter2"}]},
         "events.webhooks[0].secret: must be a Standard Webhooks secret"),
        ({"webhooks": [{"url": "https://lims.example.org/h"}]}, "events.webhooks[0].secret: missing"),
        ({"mqtt": {"port": 1883}}, "events.mqtt.host: missing"),
        ({"mqtt": {"host": "m", "topic_prefix": "lab/#"}}, "events.mqtt.topic_prefix: must be an MQTT topic"),
        ({"progress_milestones": [0, 50]}, "events.progress_milestones: must be a list of percentages"),
        ({"webhook": []}, "events.webhook: unknown key; did you mean 'webhooks'?"),
        ({"webhooks": [{"url": "https://lims.example.org/h", "secret": "whsec_" + "QUJD" * 11,
                        "types": ["org.watchfolder.job.succeded"]}]},
         "events.webhooks[0].types: 'org.watchfolder.job.succeded' matches no event type"),
        ({"webhooks": [{"url": "http://user:pw@127.0.0.1:8/x", "secret": "whsec_" + "QUJD" * 11}]},
         "events.webhooks[0].url: must not carry a user or password"),
        ({"mqtt": {"host": "m", "ca_file": "/nonexistent/ca.pem"}}, "events.mqtt.ca_file: /nonexistent/ca.pem is not a file"),
        ({"mqtt": {"host": "m", "password": "pw"}}, "events.mqtt.username: required when events.mqtt.password is set"),
    ],
)
def test_events_config_errors_name_the_key_and_the_fix(tmp_path, events, message):
    with pytest.raises(ConfigError) as info:
        configmod.parse({"events": events}, path=tmp_path / "watchfolder.yaml", environ={})
    assert any(p.startswith(message) for p in info.value.problems), info.value.problems


def test_back_pressure_settings_are_validated(tmp_path):
    with pytest.raises(ConfigError) as info:
        configmod.parse({"importer": {"pause": {"after_failures": 0, "probe_intervall": 3},
                                      "omero": {"max_concurrent": -1}, "archive": {"min_free_bytes": "1G"}}},
                        path=tmp_path / "watchfolder.yaml", environ={})
    problems = "\n".join(info.value.problems)
    for key in ("importer.pause.after_failures", "importer.pause.probe_intervall: unknown key; did you mean "
                "'probe_interval'?", "importer.omero.max_concurrent", "importer.archive.min_free_bytes"):
        assert key in problems


# -- store.url ------------------------------------------------------------------------


def test_store_url_sqlite_and_postgresql(tmp_path):
    config = configmod.parse(base(tmp_path, store={"url": "sqlite:///db/jobs.db"}),
                             path=tmp_path / "watchfolder.yaml", environ={})
    assert config.store.backend == "sqlite" and config.store.path == tmp_path / "db" / "jobs.db"
    assert config.store.display_url == f"sqlite:///{tmp_path / 'db' / 'jobs.db'}"
    raw = base(tmp_path, store={"url": "postgresql://watchfolder@db.example.org/watchfolder",
                                "password": {"env": "WF_DB_PASSWORD"}, "logs_dir": "/shared/logs"})
    config = configmod.parse(raw, path=tmp_path / "watchfolder.yaml", environ={"WF_DB_PASSWORD": SECRET})
    assert config.store.backend == "postgresql" and config.store.password.reveal() == SECRET
    assert config.logs_dir == Path("/shared/logs") and SECRET not in repr(config)
    default = configmod.parse(base(tmp_path), path=tmp_path / "watchfolder.yaml", environ={})
    assert default.store.backend == "sqlite" and default.logs_dir == tmp_path / "data" / "logs"


@pytest.mark.parametrize(
    "store, expected",
    [
        ({"url": "postgresql://wf:hunter2@db/wf"}, "store.url: carries a password; give it as store.password"),
        ({"url": "postgresql://wf@db/wf?password=hunter2"}, "store.url: carries a password; give it as store.password"),
        ({"url": "mysql://db/wf"}, "store.url: unknown scheme 'mysql'; use sqlite:///PATH or postgresql://"),
        ({"url": "sqlite://jobs.db"}, "store.url: a SQLite URL is sqlite:///PATH (three slashes)"),
        ({"url": "postgresql:///wf"}, "store.url: names no host"),
        ({"url": "sqlite:///a.db", "path": "b.db"}, "store.url: and store.path both name the SQLite file"),
        ({"password": "x"}, "store.password: is only used with store.url: postgresql://"),
        ({"url": "sqlite:///a.db", "password": "x"}, "store.password: is only used with store.url: postgresql://"),
        # A rejected URL is the one problem: not also "store.password is only used with postgresql".
        ({"url": "postgresql://wf:hunter2@db/wf", "password": "x"}, "store.url: carries a password"),
        ({"url": "postgresql:///wf", "password": "x"}, "store.url: names no host"),
        ({"url": "mysql://db/wf", "password": "x"}, "store.url: unknown scheme 'mysql'"),
        ({"url": 5}, "store.url: must be sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE, got 5"),
    ],
)
def test_store_url_problems_name_the_fix(tmp_path, store, expected):
    (problem,) = problems_of(base(tmp_path, store=store), tmp_path)
    assert problem.startswith(expected), problem
    assert "hunter2" not in problem


def test_the_several_hosts_example_is_a_valid_config(tmp_path):
    raw = yaml.safe_load((REPO / "examples" / "deploy" / "several-hosts.yaml").read_text(encoding="utf-8"))
    raw["watch"][0]["path"] = str(tmp_path)  # the share is not mounted here
    config = configmod.parse(raw, path=tmp_path / "watchfolder.yaml",
                             environ={"WATCHFOLDER_DB_PASSWORD": SECRET, "SMTP_PASSWORD": "x"})
    assert config.store.backend == "postgresql" and config.store.password.reveal() == SECRET
    assert config.logs_dir == Path("/mnt/shared/watchfolder/logs")


@pytest.mark.parametrize("where", ["archive", "outbox", "store", "watch-in-archive"])
def test_what_the_service_writes_may_not_be_inside_a_watch_folder(make_config, tmp_path, where):
    # An archive root under the drop folder: the service imported its own archive as owner
    # "archive", then "archive/archive" (outside try of issue 12). Refused with the fix.
    drop = tmp_path / "drop"
    drop.mkdir()
    overrides = {"watch": [{"name": "w", "path": str(drop), "owner": "jdoe", "target": {"dataset": "d"}}]}
    if where == "archive":
        overrides["importer"] = {"kind": "archive", "archive": {"root": str(drop / "archive")}}
    elif where == "outbox":
        overrides["notify"] = {"transport": "folder", "outbox_dir": str(drop / "outbox"),
                               "admin_email": "admin@example.org"}
    elif where == "store":
        overrides["store"] = {"path": str(drop / "jobs.db")}
    else:
        overrides["importer"] = {"kind": "archive", "archive": {"root": str(tmp_path)}}
    with pytest.raises(ConfigError) as info:
        make_config(**overrides)
    text = str(info.value)
    assert "watch[0].path" in text and ("outside every watch folder" in text or "outside the archive" in text), text


@pytest.mark.parametrize("sender, fix", [
    ("watchfolder@exämple.org", "write the domain in its ASCII (IDNA) form such as watchfolder@xn--exmple-cua.org"),
    ("wätchfolder@example.org", "use an address whose part before the @ is ASCII"),
])
def test_non_ascii_sender_is_refused_with_the_fix(sender, fix, tmp_path):
    # Every mail's From is this address: Python's formataddr refuses a non-ASCII one, so the
    # service started and then could not compose a single mail ("it is not sent").
    problems = problems_of(base(tmp_path, notify={"from": sender}), tmp_path)
    assert len(problems) == 1 and problems[0].startswith("notify.from: must be an address in ASCII")
    assert fix in problems[0]
    assert configmod.parse(base(tmp_path, notify={"from": "watchfolder@xn--exmple-cua.org"}),
                           path=tmp_path / "watchfolder.yaml", environ={}).notify.sender == \
        "watchfolder@xn--exmple-cua.org"
