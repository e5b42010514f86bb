"""A throwaway PostgreSQL server for tests, drills and benchmarks.

Started from the installed server binaries (``initdb``, ``pg_ctl``: on PATH,
or Debian's ``/usr/lib/postgresql/<major>/bin``) in a temp dir, listening on
127.0.0.1 on an ephemeral port, with trust authentication. Both refuse to
run as root, so as root (CI) the data dir belongs to the ``postgres`` user
and they run through ``runuser``. Durability settings are relaxed (fsync
off): a test server dies with its tests.

``PgServer.find()`` says why a server cannot be had (the reason a test skips
with) or returns one ready to ``start()``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path


def _bindir() -> Path | str:
    """The folder holding initdb and pg_ctl, or the reason there is none."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return Path(found).parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if candidates:
        return Path(candidates[-1]).parent
    return "PostgreSQL server binaries (initdb, pg_ctl) not found; install Debian's postgresql (make test-deps)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgServer:
    def __init__(self, bindir: Path, run_as: str | None):
        self.bindir = bindir
        self.run_as = run_as
        self.dir = Path(tempfile.mkdtemp(prefix="watchfolder-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self.user = "postgres"
        if run_as:
            entry = pwd.getpwnam(run_as)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    @classmethod
    def find(cls) -> PgServer | str:
        """A server ready to start, or why there cannot be one here."""
        bindir = _bindir()
        if isinstance(bindir, str):
            return bindir
        run_as = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("postgres")
            except KeyError:
                return "running as root and there is no 'postgres' user to run initdb/pg_ctl as"
            if not shutil.which("runuser"):
                return "running as root without runuser (util-linux) to start PostgreSQL as 'postgres'"
            run_as = "postgres"
        return cls(bindir, run_as)

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self.run_as:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, check=check, cwd=self.dir)

    def start(self) -> None:
        if not self.data.exists():
            self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", self.user, "-E", "UTF8", "--no-sync")
        self._pg_ctl("start")

    def _pg_ctl(self, action: str, *extra: str) -> None:
        options = (
            f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        )
        result = self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", *extra, action,
            check=False,
        )
        if result.returncode != 0:
            log = (self.dir / "server.log").read_text(errors="replace")[-2000:] if (self.dir / "server.log").exists() else ""
            raise RuntimeError(f"pg_ctl {action} failed: {result.stderr.strip()}\n{log}")

    def restart(self) -> None:
        """``pg_ctl restart`` (fast shutdown: every session is cut off, as in a real restart)."""
        self._pg_ctl("restart", "-m", "fast")

    def stop(self, mode: str = "immediate") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def require_password(self, role: str, password: str) -> None:
        """Create ``role`` (LOGIN, ``password``) that must give its password over TCP (scram-sha-256).

        Every other role keeps trust authentication: the rule goes first in pg_hba.conf
        (the first matching line wins), then the server reloads it.
        """
        import psycopg

        hba = self.data / "pg_hba.conf"
        rule = f"host all {role} 127.0.0.1/32 scram-sha-256\n"
        text = hba.read_text()
        if rule not in text:
            hba.write_text(rule + text)  # written in place: the file stays the server user's
        with psycopg.connect(self.url(), autocommit=True) as conn:
            exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,)).fetchone()
            verb = "ALTER" if exists else "CREATE"
            conn.execute(f"{verb} ROLE \"{role}\" LOGIN PASSWORD '{password}'")
            conn.execute("SELECT pg_reload_conf()")

    def create_database(self) -> str:
        """A fresh empty database; returns its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)
