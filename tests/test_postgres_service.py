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
    # run, work and serve retried forever, and check-config did not connect at all.
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


class _Service:
    """``python -m watchfolder ARGS`` in the background, its log (stderr) collected line by line."""

    def __init__(self, config: Path, *args: str):
        import threading

        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")}
        env["WF_TEST_DB_PASSWORD"] = "unused-with-trust"
        self.proc = subprocess.Popen([sys.executable, "-m", "watchfolder", "--config", str(config), *args],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        self.lines: list[str] = []
        self.stdout: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stderr, self.lines), daemon=True),
                         threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True)]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line.rstrip("\n"))

    def matching(self, text: str, level: str | None = None) -> list[str]:
        return [line for line in list(self.lines) if text in line and (level is None or f" {level} " in line)]

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(5)


def test_a_database_outage_is_one_warning_then_one_info_line_with_its_duration(own_server, tmp_path):
    # Before: every worker thread, heartbeat, watcher, the outbox, the event dispatcher, the LISTEN
    # thread and psycopg's pool each logged the outage, on every retry.
    from helpers import wait_until

    url = own_server.create_database()
    drop = tmp_path / "drop"
    drop.mkdir()
    config = _config(tmp_path, url, log_level="debug", workers={"count": 3, "poll_interval": 0.2},
                     notify={"transport": "folder"},
                     watch=[{"path": str(drop), "mode": "polling", "poll_interval": 0.2}])
    service = _Service(config, "run")
    try:
        wait_until(lambda: any("running (3 worker(s)" in line for line in service.stdout)
                   or service.proc.poll() is not None and pytest.fail("\n".join(service.lines)),
                   60, interval=0.1, message="the service up")
        start = len(service.lines)
        own_server.stop("fast")
        # Let the outage last through many retries of every part (seen in the DEBUG lines), then end it.
        wait_until(lambda: len([line for line in service.lines[start:] if "unreachable" in line]) >= 12,
                   60, interval=0.1,
                   message="the parts retrying during the outage")
        own_server.start()
        wait_until(lambda: service.matching("reachable again after", "INFO"), 60, interval=0.1,
                   message="the INFO line when the store is back")
        during = service.lines[start:]
        warnings = [line for line in during if " WARNING " in line or " ERROR " in line or " CRITICAL " in line]
        assert len(warnings) == 1, "\n".join(warnings)
        assert f"PostgreSQL at {url}" in warnings[0] and "waiting for it" in warnings[0]
        assert len([line for line in during if "reachable again after" in line]) == 1
    finally:
        service.stop()


def test_an_outage_reminds_with_backoff_and_a_late_success_of_an_old_call_ends_nothing(caplog):
    import logging

    from watchfolder.store.outage import Outage

    now = [0.0]
    outage = Outage("db", logging.getLogger("test.outage"), clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="test.outage"):
        for t in (0, 1, 30, 59, 61, 100, 180, 182, 400, 430):
            now[0] = t
            if t == 100:
                outage.up(started=50.0)  # a call under way before the latest failure (at 61)
            outage.down(f"PostgreSQL at db is unreachable ({t})")
        now[0] = 500.0
        outage.up(started=430.0)
        outage.up(started=431.0)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        ("WARNING", "PostgreSQL at db is unreachable (0); waiting for it, retrying with backoff (nothing is lost)"),
        ("WARNING", "still, after 61 s: PostgreSQL at db is unreachable (61)"),
        ("WARNING", "still, after 3 min: PostgreSQL at db is unreachable (182)"),
        ("WARNING", "still, after 7 min: PostgreSQL at db is unreachable (430)"),
        ("INFO", "store db reachable again after 8 min"),
    ]


def _get(url: str, token: str | None = None):
    """(status, headers, JSON body) of a GET."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, json.loads(exc.read())


def test_serve_listens_at_once_and_answers_503_until_the_database_is_reachable(own_server, tmp_path):
    # Before: serve did not listen at all while waiting for the database.
    import re

    from helpers import wait_until

    from watchfolder.web.auth import new_token

    url = own_server.create_database()
    own_server.stop("fast")
    token, snippet = new_token("admin", "admin")
    config = _config(tmp_path, url, server={"enabled": True, "listen": "127.0.0.1:0",
                                            "tokens": yaml.safe_load(snippet)})
    service = _Service(config, "serve")
    try:
        found = wait_until(lambda: service.matching("web server listening on ")
                           or service.proc.poll() is not None and pytest.fail("\n".join(service.lines)),
                           60, interval=0.1, message="serve listening before its database answers")
        base = re.search(r"listening on (http://\S+);", found[0]).group(1)
        status, headers, body = _get(f"{base}/api/v1/health")
        assert status == 503 and headers["Retry-After"] == "5"
        assert body["checks"]["store"]["ok"] is False
        assert f"PostgreSQL at {url} is unreachable" in body["checks"]["store"]["detail"]
        for route in ("/api/v1/jobs", "/api/v1/status"):
            status, headers, body = _get(base + route, token)
            assert status == 503 and headers["Retry-After"] == "5", (route, body)
            assert set(body) == {"error", "detail"}  # the API's error shape
            assert body["error"].startswith("the job store is not reachable yet: PostgreSQL at ")
        assert _get(f"{base}/api/v1/jobs")[0] == 401  # no token: still refused first
        assert _get(f"{base}/api/v1/openapi.yaml".replace("openapi.yaml", "whoami"), token)[0] == 200

        own_server.start()
        wait_until(lambda: _get(f"{base}/api/v1/health")[0] == 200, 60, interval=0.2,
                   message="/health fine once the database answers")
        status, _, body = _get(f"{base}/api/v1/jobs", token)
        assert status == 200 and body["jobs"] == []
        assert service.proc.poll() is None
    finally:
        service.stop()
    assert service.proc.returncode == 0, "\n".join(service.lines)
