"""Services on a PostgreSQL store as an admin meets them: a wrong store.url, a database outage,
standby watchers, a web server started before its database.

Real processes (``python -m watchfolder``) against a real throwaway PostgreSQL; they
skip with the reason where none can run (``pg_server`` in conftest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install -e '.[test]')")

PASSWORD_ROLE = "wf_pw"
PASSWORD = "right-horse-battery"


def _config(tmp_path: Path, url: str, **extra) -> Path:
    raw = {
        "data_dir": str(tmp_path / "data"),
        "importer": {"kind": "archive"},
        "notify": {"transport": "none"},
        "server": {"enabled": False, "listen": "127.0.0.1:0"},
        "store": {"url": url, "password": {"env": "WF_TEST_DB_PASSWORD"}},
        **extra,
    }
    path = tmp_path / "watchfolder.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def _watchfolder(config: Path, *args: str, password: str = "wrong", timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")}
    env["WF_TEST_DB_PASSWORD"] = password
    try:
        return subprocess.run([sys.executable, "-m", "watchfolder", "--config", str(config), *args],
                              capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"`watchfolder {' '.join(args)}` still waiting after {timeout} s for a connection that "
                    f"will never work; stderr: {exc.stderr!r}")


def _refusals(server) -> list[tuple[str, str, str]]:
    """(store.url, the server's reason, the fix) for each permanent refusal."""
    port = server.port
    return [
        (f"postgresql://postgres@127.0.0.1:{port}/no_such_db", 'database "no_such_db" does not exist',
         "create it (createdb -O postgres no_such_db) or correct the database name in store.url"),
        (f"postgresql://no_such_role@127.0.0.1:{port}/postgres", 'role "no_such_role" does not exist',
         "create the role (createuser --pwprompt no_such_role) or correct the user name in store.url"),
        (f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{port}/postgres",
         f'password authentication failed for user "{PASSWORD_ROLE}"',
         f"set store.password ({{env: VARIABLE}} or {{file: PATH}}) to the password of role {PASSWORD_ROLE}"),
    ]


# Every command meets every refusal through the same store opening; each command once and each refusal
# with two commands keep this to seven processes.
@pytest.mark.parametrize("command, refusal", [
    ("check-config", "database"), ("status", "role"), ("run", "password"), ("work", "database"),
    ("serve", "role"), ("status", "password"), ("check-config", "password"),
])
def test_a_refused_connection_is_one_line_naming_the_url_the_reason_and_the_fix(pg_server, tmp_path, command,
                                                                                 refusal):
    # Before: every command waited for a pool timeout ("couldn't get a connection after 10.00 sec"),
    # run/work/serve retried forever, and check-config did not connect at all.
    pg_server.require_password(PASSWORD_ROLE, PASSWORD)
    url, reason, fix = _refusals(pg_server)[["database", "role", "password"].index(refusal)]
    result = _watchfolder(_config(tmp_path, url), command)
    assert result.returncode == 1, result
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert errors == [f"watchfolder: error: store.url {url}: the server refused the connection: {reason}; {fix}"], \
        result.stderr
    assert PASSWORD not in result.stderr + result.stdout and "wrong" not in result.stderr
    assert "valid" not in result.stdout


def test_the_right_password_connects_and_check_config_says_what_is_there(pg_server, tmp_path):
    pg_server.require_password(PASSWORD_ROLE, PASSWORD)
    url = f"postgresql://{PASSWORD_ROLE}@127.0.0.1:{pg_server.port}/postgres"
    result = _watchfolder(_config(tmp_path, url), "check-config", password=PASSWORD)
    assert result.returncode == 0, result.stderr
    assert f"# store.url {url}: connected (PostgreSQL " in result.stdout
    assert PASSWORD not in result.stdout + result.stderr


def test_an_unreachable_server_is_a_warning_for_check_config_and_an_error_for_status(tmp_path):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://wf@127.0.0.1:{port}/wf"
    checked = _watchfolder(_config(tmp_path, url), "check-config")
    assert checked.returncode == 0 and "watchfolder.yaml: valid" in checked.stdout
    assert checked.stderr.strip() == (f"watchfolder: warning: PostgreSQL at {url} is unreachable: Connection refused"
                                      " (now; the services wait for it)")
    status = _watchfolder(_config(tmp_path, url), "status")
    assert status.returncode == 1
    assert status.stderr.strip() == f"watchfolder: error: PostgreSQL at {url} is unreachable: Connection refused"
