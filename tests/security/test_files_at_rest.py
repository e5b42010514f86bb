"""Issue 10, case 4: secrets and files at rest (real SQLite files, real archive copies, real units)."""

from __future__ import annotations

import dataclasses
import grp
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from watchfolder.errors import ConfigError, PermanentImportError
from watchfolder.filemodes import FileModeError, FileModes
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.mail.transports import FolderTransport, create_transport
from watchfolder.store import SQLiteStore, open_store

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


def test_existing_wide_logs_and_outbox_folders_are_narrowed_at_start(tmp_path, wide_umask):
    """Folders made 0755 before these rules (or by hand) are narrowed when the service starts, as new ones are."""
    logs, outbox = tmp_path / "db" / "logs", tmp_path / "outbox"
    for folder in (logs, outbox):
        folder.mkdir(parents=True)
        os.chmod(folder, 0o755)
    os.chmod(tmp_path / "db", 0o755)
    SQLiteStore(tmp_path / "db" / "watchfolder.db").close()
    FolderTransport(outbox).sweep()  # what the mail sender does at start
    assert (mode(logs), mode(outbox)) == (0o700, 0o700)
    assert mode(tmp_path / "db") == 0o755  # the data_dir may hold more than ours: left as it is


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


def test_a_burst_leaves_no_session_key_on_disk_while_serve_holds_the_database(tmp_path, make_spec):
    """`serve` keeps its connection open (so the WAL outlives `work --burst`), and the burst exits before
    its housekeeping truncates the WAL: the key is wiped when the job's end is recorded."""
    import yaml

    from watchfolder import config as configmod
    from watchfolder.service import open_store as open_service_store

    raw = {"data_dir": str(tmp_path / "data"), "workers": {"count": 1, "poll_interval": 0.05},
           "importer": {"kind": "noop"}, "server": {"enabled": False}}
    path = tmp_path / "watchfolder.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = configmod.load(path, environ={})
    serving = open_service_store(config)  # stands for `serve`: open before, during and after the burst
    try:
        job, _ = serving.enqueue(dataclasses.replace(make_spec(), session_key=SECRET_KEY))
        db = Path(config.store.path)
        assert SECRET_KEY.encode() in Path(f"{db}-wal").read_bytes()  # on disk while the job waits
        done = subprocess.run([sys.executable, "-m", "watchfolder", "--config", str(path), "work", "--burst"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert serving.get(job.id).state == "succeeded"
        for suffix in ("", "-wal", "-shm"):
            file = Path(f"{db}{suffix}")
            if file.exists():
                assert SECRET_KEY.encode() not in file.read_bytes(), f"the key is still in {file.name}"
    finally:
        serving.close()


@pytest.mark.parametrize(("umask", "source_mode", "file_mode", "expected"), [
    (0o022, 0o600, None, 0o600),   # never wider than the source (the umask alone would give 0644)
    (0o022, 0o640, None, 0o640),
    (0o022, 0o644, 0o640, 0o640),  # narrowed by importer.archive.file_mode
    (0o022, 0o600, 0o644, 0o600),  # the setting never widens
    (0o022, 0o4755, None, 0o755),  # no set-id bits
    # a10 F2: a 0777 (or 2777) source was archived 0777 whatever the umask.
    (0o022, 0o777, None, 0o755),
    (0o022, 0o2777, None, 0o755),
    (0o022, 0o1777, 0o640, 0o640),  # no sticky bit; file_mode narrows further
    (0o027, 0o777, None, 0o750),   # UMask=0027 of the example units
    (0o027, 0o666, None, 0o640),
    (0o027, 0o644, 0o664, 0o640),
    (0o027, 0o000, None, 0o000),
])
def test_archive_copies_keep_their_sources_mode_less_the_umask(tmp_path, store, make_spec,
                                                               umask, source_mode, file_mode, expected):
    spec = make_spec({"a.tif": b"pixels"})
    os.chmod(Path(spec.root) / "a.tif", source_mode)
    store.enqueue(spec)
    job = store.claim("w")
    old = os.umask(umask)
    try:
        importer = ArchiveImporter(root=tmp_path / "archive")
    finally:
        os.umask(old)
    assert importer.umask == umask
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


def test_the_umask_is_read_without_changing_it_in_a_process_of_its_own(tmp_path):
    # /proc/self/status on Linux: no set-and-restore window another thread could create a file in.
    probe = ("import os, sys; from watchfolder import filemodes;"
             "os.umask = lambda *a: sys.exit('os.umask called');"
             "print(oct(filemodes.current_umask()))")
    for umask in ("022", "027", "077"):
        done = subprocess.run(["sh", "-c", f'umask {umask} && exec "$0" -c "$1"', sys.executable, probe],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == oct(int(umask, 8))


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


# -- file_group: 0640 with a group the admin chooses ------------------------------

GROUP = "wf-test-admins"


@pytest.fixture(scope="module")
def admin_group():
    """A real group for the files (created with groupadd when missing, removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root: giving files to a group the test user is not in, and groupadd, take root")
    if shutil.which("groupadd") is None:
        pytest.skip("needs groupadd (Debian's passwd package) to create a test group")
    created = False
    try:
        grp.getgrnam(GROUP)
    except KeyError:
        subprocess.run(["groupadd", "--system", GROUP], check=True, capture_output=True)
        created = True
    yield GROUP, grp.getgrnam(GROUP).gr_gid
    if created:
        subprocess.run(["groupdel", GROUP], check=False, capture_output=True)


@pytest.fixture
def narrow_umask():
    old = os.umask(0o077)  # the strictest umask: the group bits must still be set by the code
    yield
    os.umask(old)


def owner_mode_group(path) -> tuple[int, int]:
    st = os.stat(path)
    return stat.S_IMODE(st.st_mode), st.st_gid


def test_file_group_gives_database_wal_shm_logs_and_outbox_0640_to_the_group(make_config, make_spec, admin_group,
                                                                             narrow_umask, tmp_path):
    name, gid = admin_group
    config = make_config(file_group=name, notify={"transport": "folder", "outbox_dir": str(tmp_path / "outbox")})
    assert config.file_group == name
    store = open_store(config)
    try:
        job, _ = store.enqueue(make_spec())
        store.log(job.id, "hello")
        create_transport(config).send(b"Subject: hi\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n", "a@x", ("b@x",))
        (mail,) = (tmp_path / "outbox").iterdir()
        db = Path(config.store.path)
        files = [db, Path(f"{db}-wal"), Path(f"{db}-shm"), store.log_path(job.id), mail]
        assert {str(f): owner_mode_group(f) for f in files} == {str(f): (0o640, gid) for f in files}
        for folder in (db.parent, config.logs_dir, tmp_path / "outbox"):
            assert owner_mode_group(folder) == (0o750, gid), folder
    finally:
        store.close()


def test_file_group_brings_existing_wide_logs_and_outbox_folders_to_0750(make_config, admin_group, wide_umask,
                                                                          tmp_path):
    name, gid = admin_group
    config = make_config(file_group=name, notify={"transport": "folder", "outbox_dir": str(tmp_path / "outbox")})
    for folder in (Path(config.logs_dir), tmp_path / "outbox"):
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o755)
    open_store(config).close()
    create_transport(config).sweep()
    for folder in (Path(config.logs_dir), tmp_path / "outbox"):
        assert owner_mode_group(folder) == (0o750, gid), folder


def test_setting_and_unsetting_file_group_fixes_an_existing_database(admin_group, wide_umask, tmp_path):
    name, gid = admin_group
    path = tmp_path / "watchfolder.db"
    SQLiteStore(path).close()
    assert owner_mode_group(path) == (0o600, os.getegid())
    SQLiteStore(path, files=FileModes.for_group(name)).close()
    assert owner_mode_group(path) == (0o640, gid)
    SQLiteStore(path).close()  # file_group removed again: the group loses read access
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_an_existing_data_dir_keeps_its_group_and_a_closed_one_is_warned_about(admin_group, tmp_path, caplog):
    """The data_dir may be systemd's StateDirectory: a changed group there makes systemd chown the whole
    tree (archive included) back on the next start. So only the folders of our own files change."""
    name, gid = admin_group
    data = tmp_path / "state"
    data.mkdir(mode=0o700)
    os.chmod(data, 0o700)
    before = owner_mode_group(data)
    store = SQLiteStore(data / "watchfolder.db", files=FileModes.for_group(name))
    store.close()
    assert owner_mode_group(data) == before
    assert owner_mode_group(data / "watchfolder.db") == (0o640, gid)
    assert owner_mode_group(data / "logs") == (0o750, gid)  # ours alone: given to the group
    assert f"members of {name} cannot pass through {data}" in caplog.text
    caplog.clear()
    os.chmod(data, 0o755)
    SQLiteStore(data / "watchfolder.db", files=FileModes.for_group(name)).close()
    assert "cannot pass through" not in caplog.text


def test_a_group_that_does_not_exist_is_refused_at_start(make_config):
    with pytest.raises(ConfigError) as info:
        make_config(file_group="wf-no-such-group-here")
    assert "file_group: there is no group 'wf-no-such-group-here' on this host; create it (groupadd " \
        "wf-no-such-group-here)" in str(info.value)
    with pytest.raises(FileModeError, match="no group"):
        FileModes.for_group("wf-no-such-group-here")


def test_check_config_refuses_a_missing_group_in_one_line(tmp_path):
    cfg = tmp_path / "watchfolder.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nfile_group: wf-no-such-group-here\n", encoding="utf-8")
    out = subprocess.run([sys.executable, "-m", "watchfolder", "--config", str(cfg), "check-config"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "file_group: there is no group 'wf-no-such-group-here'" in out.stderr
    assert "Traceback" not in out.stderr


def test_a_service_user_outside_the_group_is_refused(admin_group, request):
    """A non-root process may not give files to a group it is not in (chown(2)): said before and when it happens."""
    name, gid = admin_group
    nobody = 65534
    # pytest's tmp_path is under a 0700 folder of root's: the unprivileged child needs one it can reach.
    reachable = Path(tempfile.mkdtemp(prefix="wf-file-group-"))
    request.addfinalizer(lambda: shutil.rmtree(reachable, ignore_errors=True))
    os.chmod(reachable, 0o711)
    target = reachable / "owned-by-nobody.db"
    target.write_bytes(b"")
    os.chown(target, nobody, nobody)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a real unprivileged process, refused by the kernel
        try:
            os.close(read)
            os.setgroups([])
            os.setgid(nobody)
            os.setuid(nobody)
            answer = {"problem": None, "error": None}
            try:
                FileModes.for_group(name)
            except FileModeError as exc:
                answer["problem"] = str(exc)
            try:
                FileModes(name, gid).secure_file(target)
            except FileModeError as exc:
                answer["error"] = str(exc)
            os.write(write, json.dumps(answer).encode())
        except BaseException as exc:  # said to the parent, which fails with it
            os.write(write, json.dumps({"crashed": repr(exc)}).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as fh:
        answer = json.loads(fh.read() or "{}")
    os.waitpid(pid, 0)
    assert "crashed" not in answer, answer
    assert "is not a member of group 'wf-test-admins'" in answer["problem"]
    assert "usermod -aG wf-test-admins" in answer["problem"] and "unset file_group" in answer["problem"]
    assert answer["error"].startswith(f"cannot give {target} to group 'wf-test-admins' (file_group)")
    assert owner_mode_group(target)[1] == nobody  # nothing changed
