"""Shared fixtures: real SQLite stores, real acquisitions and configs in temp dirs."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until  # noqa: F401  (re-exported for tests)
from pgserver import PgServer

from watchfolder import config as configmod
from watchfolder.job import FileEntry, JobSpec, RetryPolicy, Target
from watchfolder.store import SQLiteStore


def _started_pg_server() -> PgServer:
    """A throwaway PostgreSQL server, started (see ``pgserver.py``); skips with the reason where none can run."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed (pip install -e '.[test]')")
    server = PgServer.find()
    if isinstance(server, str):
        pytest.skip(server)
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.cleanup()
        pytest.skip(f"could not start a throwaway PostgreSQL: {exc}")
    return server


@pytest.fixture(scope="session")
def pg_server():
    """One throwaway PostgreSQL server for the session."""
    server = _started_pg_server()
    yield server
    server.cleanup()


@pytest.fixture
def own_server():
    """A PostgreSQL server of this test's own, to stop and restart (skips with the reason where none can run)."""
    server = _started_pg_server()
    yield server
    server.cleanup()


@pytest.fixture
def pg_url(pg_server) -> str:
    """The URL of a fresh, empty database on the session's PostgreSQL server."""
    return pg_server.create_database()


@pytest.fixture
def store(tmp_path) -> SQLiteStore:
    s = SQLiteStore(tmp_path / "db" / "watchfolder.db", lease_seconds=30, retry=RetryPolicy(3, (10.0, 60.0)))
    yield s
    s.close()


def write_acquisition(folder: Path, files: dict[str, bytes]) -> list[FileEntry]:
    """Create the files under ``folder``; return entries with sizes and checksums."""
    entries = []
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append(FileEntry(rel, len(data), hashlib.sha256(data).hexdigest()))
    return entries


@pytest.fixture
def make_spec(tmp_path) -> Callable[..., JobSpec]:
    """Make a real acquisition folder and its JobSpec; keyword arguments override spec fields."""
    counter = {"n": 0}

    def make(files: dict[str, bytes] | None = None, **fields: Any) -> JobSpec:
        counter["n"] += 1
        root = tmp_path / "acq" / f"acquisition-{counter['n']}"
        entries = write_acquisition(root, files or {"img_1.tif": b"pixels-1" * 100, "img_2.tif": b"pixels-2" * 50})
        values: dict[str, Any] = {
            "owner": "jdoe",
            "root": str(root),
            "files": tuple(entries),
            "target": Target(project="Brain atlas", dataset="slide 3"),
            "source": "cli:test",
            "email": "jdoe@example.org",
        }
        values.update(fields)
        return JobSpec(**values)

    return make


@pytest.fixture
def make_config(tmp_path) -> Callable[..., configmod.Config]:
    """A valid config under tmp_path; pass nested dicts to override sections."""

    def make(**sections: Any) -> configmod.Config:
        raw: dict[str, Any] = {
            "data_dir": str(tmp_path / "data"),
            "importer": {"kind": "archive"},
            "notify": {"transport": "folder", "admin_email": "admin@example.org"},
            "server": {"enabled": False, "listen": "127.0.0.1:0"},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
        return configmod.parse(raw, path=tmp_path / "watchfolder.yaml", environ={})

    return make


@pytest.fixture
def clean_env(monkeypatch):
    """No WATCHFOLDER__* overrides from the developer's shell leak into a test."""
    for name in list(os.environ):
        if name.startswith("WATCHFOLDER"):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture
def site_cfg(tmp_path, clean_env) -> Path:
    """A site config for the CLI tests (cli_support.SITE_YAML): archive importer, folder outbox."""
    from cli_support import SITE_YAML

    path = tmp_path / "site.yaml"
    path.write_text(SITE_YAML, encoding="utf-8")
    return path


@pytest.fixture
def site_store(site_cfg):
    """The job store of :func:`site_cfg`, opened as the service opens it."""
    from watchfolder.service import make_notifier, open_store

    config = configmod.load(site_cfg, environ={})
    s = open_store(config, make_notifier(config))
    yield s
    s.close()
