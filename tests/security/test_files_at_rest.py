"""Issue 10, case 4: secrets and files at rest (real SQLite files, real archive copies, real units)."""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path

import pytest

from watchfolder.errors import PermanentImportError
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.mail.transports import FolderTransport
from watchfolder.store import SQLiteStore

REPO = Path(__file__).resolve().parents[2]
SECRET_KEY = "c0ffee00-session-key-that-must-not-stay-on-disk"


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def wide_umask():
    old = os.umask(0o022)  # the usual default: files 0644 unless the code says otherwise
    yield
    os.umask(old)


def test_database_wal_shm_and_logs_are_private(tmp_path, make_spec, wide_umask):
    store = SQLiteStore(tmp_path / "db" / "watchfolder.db")
    try:
        job, _ = store.enqueue(make_spec())
        store.log(job.id, "hello")
        files = [tmp_path / "db" / "watchfolder.db", tmp_path / "db" / "watchfolder.db-wal",
                 tmp_path / "db" / "watchfolder.db-shm", store.log_path(job.id)]
        assert {str(f): mode(f) for f in files} == {str(f): 0o600 for f in files}
    finally:
        store.close()


def test_an_existing_wide_database_is_narrowed_at_start(tmp_path, wide_umask):
    path = tmp_path / "watchfolder.db"
    SQLiteStore(path).close()
    os.chmod(path, 0o644)
    SQLiteStore(path).close()
    assert mode(path) == 0o600


def test_an_erased_session_key_leaves_no_copy_in_the_database_or_wal(tmp_path, make_spec):
    store = SQLiteStore(tmp_path / "watchfolder.db")
    try:
        spec = dataclasses.replace(make_spec(), session_key=SECRET_KEY)
        store.enqueue(spec)
        job = store.claim("w")
        assert job.spec.session_key == SECRET_KEY
        store.fail(job.id, "w", PermanentImportError("no such dataset"))
        store.maintain(now=10**10)  # the worker's housekeeping round
        for suffix in ("", "-wal", "-shm"):
            path = Path(f"{store.path}{suffix}")
            if path.exists():
                assert SECRET_KEY.encode() not in path.read_bytes(), f"the key is still in {path.name}"
    finally:
        store.close()


@pytest.mark.parametrize(("source_mode", "file_mode", "expected"), [
    (0o600, None, 0o600),   # never wider than the source (the umask alone would give 0644)
    (0o640, None, 0o640),
    (0o644, 0o640, 0o640),  # narrowed by importer.archive.file_mode
    (0o600, 0o644, 0o600),  # the setting never widens
    (0o4755, None, 0o755),  # no set-id bits
])
def test_archive_copies_keep_their_sources_mode_never_wider(tmp_path, store, make_spec, wide_umask,
                                                            source_mode, file_mode, expected):
    spec = make_spec({"a.tif": b"pixels"})
    os.chmod(Path(spec.root) / "a.tif", source_mode)
    store.enqueue(spec)
    job = store.claim("w")
    importer = ArchiveImporter(root=tmp_path / "archive")
    importer.file_mode = file_mode

    class Ctx:
        def progress(self, *a, **k):
            pass

        def checkpoint(self):
            pass

        def log(self, message):
            pass

    importer.run(job, Ctx())
    (copy,) = (tmp_path / "archive").rglob("a.tif")
    assert mode(copy) == expected


def test_archive_file_mode_is_read_from_the_config(make_config, tmp_path):
    config = make_config(importer={"kind": "archive", "archive": {"root": str(tmp_path / "a"), "file_mode": "0640"}})
    assert ArchiveImporter(config).file_mode == 0o640


def test_outbox_mails_are_private(tmp_path, wide_umask):
    transport = FolderTransport(tmp_path / "outbox")
    transport.send(b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n", "a@x", ("b@x",))
    (mail,) = (tmp_path / "outbox").iterdir()
    assert mode(mail) == 0o600


@pytest.mark.parametrize("unit", sorted((REPO / "examples" / "deploy").glob("*.service")), ids=lambda p: p.name)
def test_example_units_set_a_umask(unit):
    assert "\nUMask=0027\n" in unit.read_text(encoding="utf-8")
