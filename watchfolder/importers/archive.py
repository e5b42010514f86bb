"""The ``archive`` importer: copy an acquisition into ``<root>/<layout>/…`` with checksums.

Each file is copied to a temporary name in its destination folder while its
SHA-256 is computed, read back and hashed again, then linked into place
(``link`` fails if the name exists, so a different existing file is never
overwritten) and the temporary name removed. A file that is already there
with the same checksum counts as copied, so an attempt interrupted by a crash
completes on the next one without duplicating anything.

Durability is batched per acquisition: once every file is written and
verified, they are made durable together — one ``fsync`` per file and per
folder for an acquisition of a few files, one ``syncfs`` of the archive volume
(Linux) for one of many (``SYNCFS_MIN_FILES``; ``syncfs`` also waits for
whatever else is being written to that volume, which a few fsyncs do not), and
per-file ``fsync`` wherever ``syncfs`` is missing or fails. Nothing is reported archived (log lines, result, progress phase
``archived``) before that sync returned; a crash before it leaves files that
the next attempt checks and reuses, and the temporary names of an attempt
are removed by the next one, once per destination folder.

Per-file work is constant: no listing of the destination per file, one
``realpath`` per source folder (not per file), and progress handed to the
context, which writes it to the store at a bounded rate whatever the file
count.

Sources are read through :class:`watchfolder.safefs.SourceTree`: no symlink is
followed out of the job's allowed root or the acquisition folder, whatever was
swapped in since the job was queued, and the size recorded is the one read from
the opened file.

Layout placeholders: ``{owner}``, ``{group}``, ``{project}``, ``{dataset}``,
``{screen}``, ``{acquisition}`` (the acquisition's folder name, or a one-file
acquisition's file name without its extension), ``{job_id}``, ``{date}``
(YYYY-MM-DD of the job's creation, UTC). A target without a project files under
project ``_no_project``; a screen target uses project ``_screens`` and the
screen as dataset; an id target becomes ``dataset-<id>`` / ``screen-<id>``.

Two acquisitions never share a folder by default (the default layout ends in
``{acquisition}``). When the destination already holds a file of the same name
with other content (two runs called ``run1`` in one dataset, or a layout without
``{acquisition}``), the job is not failed: its files go to the first free
``<destination> (2)``, ``(3)``… folder (a name that would then exceed 255 bytes
is cut and tagged with a digest of it: :func:`~watchfolder.filenames.fit_name`),
and the log and the result (``renamed_from``) say so. A folder "fits" when every file the job would write
there is absent or already identical, so a retry finds its own earlier copy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import itertools
import json
import os
import shutil
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .. import defaults as D
from .. import safefs
from ..errors import PermanentImportError, TransientImportError, classify_os_error, source_vanished
from ..filemodes import current_umask
from ..filenames import fit_name
from ..job import Job
from ..store.base import process_exists
from ..units import format_size
from . import register
from .base import NOTHING_THERE, ImportContext, Importer

_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
# Small files between two progress calls (each also a cancel checkpoint).
PROGRESS_EVERY_FILES = 16  # Linux ≥ 3.11 on ext4, XFS, Btrfs, tmpfs; not NFS or SMB


def _component(value: str | None, fallback: str) -> str:
    """A safe single path component: no separators, no NUL, no '.'/'..'."""
    text = (value or "").strip().replace("/", "_").replace("\\", "_").replace("\x00", "_")
    if not text or set(text) == {"."}:
        return fallback
    return text


# How many "<destination> (n)" folders are tried before a job fails for good.
MAX_COLLISION_SUFFIX = 1000


class _Occupied(Exception):
    """A destination file appeared with other content while this job was copying (another worker won)."""


def _within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both already resolved)."""
    root = root.rstrip(os.sep) or os.sep
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _fsync_path(path: str | os.PathLike, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags | _O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _load_syncfs():
    """libc's ``syncfs(int fd)`` (Linux ≥ 2.6.39, glibc ≥ 2.14), or None where there is none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        func = libc.syncfs
    except (OSError, AttributeError):
        return None
    func.argtypes = [ctypes.c_int]
    func.restype = ctypes.c_int
    return func


_SYNCFS = _load_syncfs()


def syncfs(path: str | os.PathLike) -> bool:
    """Flush the whole filesystem holding ``path`` to stable storage (``syncfs(2)``).

    Returns False where the call does not exist; raises :class:`OSError` when it
    fails (since Linux 5.8 it also reports write-back errors, as ``fsync`` does).
    """
    if _SYNCFS is None:
        return False
    fd = os.open(path, os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOSYS:
                return False
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
    return True


def _link_unnamed(fd: int, dest: str) -> None:
    """Give the ``O_TMPFILE`` file open as ``fd`` the name ``dest`` (``linkat`` with ``AT_SYMLINK_FOLLOW``).

    ``os.link`` calls plain ``link(2)``, which would link the ``/proc`` symlink itself,
    unless a directory fd is passed: the paths are absolute, so the fd only selects
    ``linkat``.
    """
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=_PROC_FD, follow_symlinks=True)


def _open_proc_fd() -> int | None:
    try:
        return os.open("/proc/self/fd", os.O_RDONLY | _O_DIRECTORY | _O_CLOEXEC)
    except OSError:
        return None


_PROC_FD = _open_proc_fd() if _O_TMPFILE else None


#: Filesystems (``st_dev``) where O_TMPFILE files were seen to work: a property of the volume,
#: probed once per process instead of with two directory writes per job. A failed probe is not
#: remembered (it may be a full disk); where O_TMPFILE is unsupported it fails without writing.
_ANONYMOUS_DEVICES: set[int] = set()


def _anonymous_files_work(folder: str | os.PathLike) -> bool:
    """True when an ``O_TMPFILE`` file can be made in ``folder`` and linked to a name there.

    Probed once per filesystem and process; probes left in ``folder`` by a killed process
    are swept on every call (a listing, no write)."""
    if not _O_TMPFILE or _PROC_FD is None:
        return False
    _sweep_probes(folder)
    try:
        device = os.stat(folder).st_dev
    except OSError:
        return False
    if device in _ANONYMOUS_DEVICES:
        return True
    if not _probe_anonymous(folder):
        return False
    _ANONYMOUS_DEVICES.add(device)
    return True


def _probe_anonymous(folder: str | os.PathLike) -> bool:
    probe = os.path.join(folder, f".wf-probe-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        fd = os.open(folder, os.O_RDWR | _O_TMPFILE | _O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        _link_unnamed(fd, probe)
    except OSError:
        return False
    finally:
        os.close(fd)
    os.unlink(probe)
    return True


def _sweep_probes(folder: str | os.PathLike) -> None:
    """Remove probes left in ``folder`` by a process killed between link and unlink (issue 11:
    nothing but the job's files in its folder); a probe of a live process is left alone."""
    try:
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if e.name.startswith(".wf-probe-")
                     and not _probe_writer_alive(e.name)]
    except OSError:
        return
    for path in stale:
        try:
            os.unlink(path)
        except OSError:
            pass


def _probe_writer_alive(name: str) -> bool:
    pid = name[len(".wf-probe-"):].partition("-")[0]
    return pid.isdigit() and process_exists(int(pid))


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        data = data[written:]


class _Throttle:
    """Holds a job's reads from the drop folder to ``rate`` bytes per second (0: no limit),
    averaged from the start of the attempt; waits in short slices that honour a stop or cancel
    (``ctx.checkpoint``)."""

    SLICE = 0.1  # seconds: the longest wait between two checkpoints

    def __init__(self, rate: int, ctx: ImportContext):
        self.rate = rate
        self.ctx = ctx
        self.start = time.monotonic()
        self.done = 0

    def read(self, n: int) -> None:
        if not self.rate:
            return
        self.done += n
        while (ahead := self.done / self.rate - (time.monotonic() - self.start)) > 0:
            time.sleep(min(ahead, self.SLICE))
            self.ctx.checkpoint()


LOG_LINES_PER_WRITE = 1000  # archived-file lines per job-log write

#: A copy at least this big (bytes) is flushed to disk while it is read back for verification.
EARLY_SYNC_BYTES = 64 * 1024 * 1024



def _hash_fd_overlapped(fd: int, buf: bytearray) -> str:
    """SHA-256 (hex) of what ``fd`` reads from its offset on, each chunk hashed in a thread while
    the next is read into a second buffer (for big files; ``buf`` and one more of its size)."""
    digest = hashlib.sha256()
    buffers = (buf, bytearray(len(buf)))
    with ThreadPoolExecutor(1, thread_name_prefix="archive-hash") as pool:
        hashing = None
        turn = 0
        while True:
            target = buffers[turn]
            n = os.readv(fd, [target])  # the other buffer is being hashed meanwhile
            if hashing is not None:
                hashing.result()
            if not n:
                break
            hashing = pool.submit(digest.update, memoryview(target)[:n])
            turn ^= 1
    return digest.hexdigest()

class _BackgroundFsync:
    """``fsync(2)`` of a just-written copy in a thread, while the caller reads the copy back to
    verify it: the disk writes while the CPU hashes, instead of one after the other (a 1 GiB copy
    spent 1.8 s in its final flush, after 1 to 1.4 s of reading back). :meth:`join` waits and
    raises the flush's :class:`OSError`; the caller always joins before it reports anything, so
    nothing is called archived before it is on stable storage."""

    def __init__(self, fd: int) -> None:
        self._fd = os.dup(fd)  # its own descriptor: the caller may close fd on an error
        self.error: OSError | None = None
        self._thread = threading.Thread(target=self._run, name="archive-fsync", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            os.fsync(self._fd)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(self._fd)

    def join(self) -> None:
        self._thread.join()
        if self.error is not None:
            raise self.error


def _size_changed(path: str, size: int, queued: int) -> str:
    return (f"{path} is {size} bytes but was {queued} bytes when queued: the acquisition "
            "changed after it was queued; submit it again once it is complete")


def _ledger_name(job_id: int) -> str:
    return f".watchfolder-job-{job_id}.owned"


def _claimable(folder: str, paths: set[str], job_id: int) -> bool:
    """For a layout that gives each acquisition its own folder: True when ``folder`` is absent,
    or is this job's: it holds the job's ledger (an earlier attempt claimed it), or every file
    the job lists and nothing else (an attempt that copied all and was stopped before its
    success was recorded, its ledger already removed). Anything else there, some of the job's
    names only (another job's copy of a file of the same name), or nothing at all (another job
    that has just made it; its ledger follows at once) makes it taken. An unreadable subfolder
    or a link counts as foreign. Symbolic links are not followed."""
    ledger, tag = _ledger_name(job_id), f".wf-{job_id}-"
    owned = False
    present: set[str] = set()
    stack = [(folder, "")]
    while stack:
        path, prefix = stack.pop()
        try:
            with os.scandir(path) as it:
                entries = list(it)
        except FileNotFoundError:
            if not prefix:
                return True
            continue
        except OSError:
            return False
        for entry in entries:
            name = entry.name
            rel = prefix + name
            try:
                if entry.is_dir(follow_symlinks=False):
                    stack.append((entry.path, rel + "/"))
                    continue
            except OSError:
                return False
            if name == ledger:
                owned = True
            elif rel in paths:
                present.add(rel)
            elif not (name.startswith(".") and tag in name and name.endswith(".part")):
                return False
    return owned or (bool(present) and present == paths)


class _Ledger:
    """The files a job placed in its archive folder, one JSON string per line (any name fits).
    Appended without fsync: a crash may lose the last line, never invent one."""

    def __init__(self, path: str):
        self.path = path
        self.fd = -1

    def open(self) -> None:
        """Create the ledger (empty, or keep the one there) and hold it open for appends."""
        if self.fd < 0:
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _O_CLOEXEC, 0o644)

    def add(self, rel: str) -> None:
        self.open()
        os.write(self.fd, (json.dumps(rel) + "\n").encode())

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _is_folder(path: Path) -> bool:
    """Whether ``path`` is a folder; False also when it cannot exist (a name too long, a file
    where a folder would be: :data:`NOTHING_THERE`); other errors (EACCES, EIO) raise."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError as exc:
        if exc.errno in NOTHING_THERE:
            return False
        raise


def _remove_empty(folder: str, root: str) -> None:
    """rmdir ``folder`` and its parents while empty, never ``root`` or above."""
    while _within(folder, root) and os.path.normpath(folder) != os.path.normpath(root):
        try:
            os.rmdir(folder)
        except OSError:
            return
        folder = os.path.dirname(folder)


@register("archive")
class ArchiveImporter(Importer):
    """``sync``: ``"auto"`` (``syncfs`` for an acquisition of at least ``syncfs_min_files`` files,
    where available; else per-file ``fsync``) or ``"fsync"``.

    ``anonymous_temp``: write each copy as an unnamed file (``O_TMPFILE``) that gets
    its name only when verified — one directory operation per file instead of three
    (create, link, unlink), and nothing left behind by a crash. Used where the
    archive volume supports it (checked once per attempt); named temporaries
    otherwise, or when false.
    """

    def __init__(self, config=None, *, root: Path | None = None, layout: str | None = None,
                 chunk_bytes: int = D.COPY_CHUNK_BYTES, sync: str = "auto", anonymous_temp: bool = True,
                 min_free_bytes: int | None = None, max_bytes_per_second: int | None = None,
                 syncfs_min_files: int = D.SYNCFS_MIN_FILES):
        archive = config.importer.archive if config is not None else None
        self.config = config
        self.file_mode = archive.file_mode if archive is not None else None
        self.umask = current_umask()  # the service's (UMask= in the units); copies never get its bits
        self.root = Path(root or archive.root)
        self.layout = layout or (archive.layout if archive else D.ARCHIVE_LAYOUT)
        self.chunk_bytes = chunk_bytes
        if sync not in ("auto", "fsync"):
            raise ValueError(f"sync must be 'auto' or 'fsync', got {sync!r}")
        self.sync = sync
        self.syncfs_min_files = syncfs_min_files
        self.min_free_bytes = (min_free_bytes if min_free_bytes is not None
                               else archive.min_free_bytes if archive is not None else 0)
        self.anonymous_temp = anonymous_temp
        self.max_bytes_per_second = (max_bytes_per_second if max_bytes_per_second is not None
                                     else archive.max_bytes_per_second if archive is not None else 0)

    def health(self) -> dict[str, Any]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            ok = os.access(self.root, os.W_OK)
            return {"ok": ok, "root": str(self.root), **({} if ok else {"error": f"{self.root} is not writable"})}
        except OSError as exc:
            return {"ok": False, "root": str(self.root), "error": f"cannot create {self.root}: {exc.strerror}"}

    # -- back-pressure ------------------------------------------------------------

    def target(self) -> str:
        return f"archive:{self.root}"

    def pause_reason(self) -> str | None:
        """Below ``importer.archive.min_free_bytes`` free on the archive volume, hold its jobs."""
        if not self.min_free_bytes:
            return None
        return self.space_reason(0)

    def _volume(self) -> Path:
        probe = self.root
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        return probe

    def space_reason(self, need_bytes: int) -> str | None:
        """Why ``need_bytes`` cannot be archived now: the volume's free space (statvfs, as an
        unprivileged user may use it) is under ``need_bytes + importer.archive.min_free_bytes``."""
        probe = self._volume()
        try:
            free = shutil.disk_usage(probe).free
        except OSError as exc:
            return f"cannot read the free space of {probe}: {exc.strerror}"
        if free >= need_bytes + self.min_free_bytes:
            return None
        if need_bytes:
            reserve = (f" plus importer.archive.min_free_bytes ({format_size(self.min_free_bytes)})"
                       if self.min_free_bytes else "")
            return (f"no space left for the job on the archive volume ({probe}): {format_size(free)} free, the job "
                    f"needs {format_size(need_bytes)}{reserve}; free space there")
        return (f"the archive volume ({probe}) has {format_size(free)} free, less than importer.archive."
                f"min_free_bytes ({format_size(self.min_free_bytes)}); free space there or move the archive root")

    def _check_space(self, job: Job, dest_root: Path, sources: list) -> None:
        """Before copying: the bytes still to write (files not yet at ``dest_root`` with their
        size) must fit with ``min_free_bytes`` to spare, or the target pauses (the job keeps
        its attempt); a job larger than the whole volume fails for good."""
        need = self._remaining(dest_root, sources)
        if not need:
            return
        reason = self.space_reason(need)
        if reason is None:
            return
        try:
            total = shutil.disk_usage(self._volume()).total
        except OSError:
            total = None
        if total is not None and need + self.min_free_bytes > total:
            raise PermanentImportError(
                f"the acquisition ({format_size(need)}) does not fit on the archive volume ({self._volume()}, "
                f"{format_size(total)} in all, min_free_bytes {format_size(self.min_free_bytes)}); "
                "archive it to a larger volume"
            )
        raise TransientImportError(reason, full=True, need_bytes=need)

    @staticmethod
    def _remaining(folder: Path, sources: list) -> int:
        """Bytes still to write into ``folder``: the files not there yet with their size."""
        need = 0
        for entry, _src, size in sources:
            try:
                if os.lstat(os.path.join(folder, entry.path)).st_size == size:
                    continue
            except OSError:
                pass
            need += size
        return need

    def destination(self, job: Job) -> Path:
        t = job.spec.target
        if t.screen or t.screen_id:
            project = "_screens"
            dataset = t.screen or f"screen-{t.screen_id}"
        else:
            project = t.project or "_no_project"
            dataset = t.dataset or f"dataset-{t.dataset_id}"
        values = {
            "owner": _component(job.spec.owner, "_unknown_owner"),
            "group": _component(job.spec.group, "_default_group"),
            "project": _component(project, "_no_project"),
            "dataset": _component(dataset, "_no_dataset"),
            "screen": _component(t.screen or (f"screen-{t.screen_id}" if t.screen_id else None), "_no_screen"),
            "acquisition": _component(job.spec.acquisition_name, f"job-{job.id}"),
            "job_id": str(job.id),
            "date": time.strftime("%Y-%m-%d", time.gmtime(job.created_at)),
        }
        return self.root.joinpath(*[p for p in self.layout.format(**values).split("/") if p])

    # -- the run ------------------------------------------------------------------------

    def _tree(self, job: Job) -> safefs.SourceTree:
        """The acquisition folder, opened under the job's allowed root (PermanentImportError if refused)."""
        try:
            allowed = safefs.allowed_root_for(job.spec.source, job.spec.root, self.config)
            return safefs.SourceTree(allowed, os.fspath(job.spec.root), job.spec.file_identities())
        except safefs.UnsafePath as exc:
            raise PermanentImportError(str(exc)) from None
        except OSError as exc:
            raise classify_os_error(exc, job.spec.root, "read") from None

    @staticmethod
    def _open_source(tree: safefs.SourceTree, entry, expect=None) -> tuple[int, os.stat_result]:
        """Open a listed file through ``tree``: ``(fd, fstat)``; the size (and ``expect``, the identity
        recorded when queued) must be the one queued.

        Raises PermanentImportError when the path is refused or the file changed; OSError as ``open``.
        """
        try:
            fd, st = tree.open(entry.path, expect)
        except safefs.UnsafePath as exc:
            raise PermanentImportError(str(exc)) from None
        if entry.size is not None and st.st_size != entry.size:
            os.close(fd)
            raise PermanentImportError(_size_changed(entry.path, st.st_size, entry.size))
        return fd, st

    @staticmethod
    def _check_source(tree: safefs.SourceTree, entry) -> os.stat_result:
        """:meth:`_open_source`'s checks without opening the file (``SourceTree.check``): the copy opens it."""
        try:
            st = tree.check(entry.path)
        except safefs.UnsafePath as exc:
            raise PermanentImportError(str(exc)) from None
        if entry.size is not None and st.st_size != entry.size:
            raise PermanentImportError(_size_changed(entry.path, st.st_size, entry.size))
        return st

    def _sources(self, job: Job, tree: safefs.SourceTree) -> list[tuple[Any, str, int]]:
        """``(entry, source path, size)`` of every listed file; raises before anything is copied."""
        src_root = os.fspath(job.spec.root)
        sources = []
        missing = []
        for entry in job.spec.files:
            rel = entry.path
            if os.path.isabs(rel) or ".." in rel.split("/"):
                # It would be copied outside the destination folder (the acquisition parsers refuse these too).
                raise PermanentImportError(
                    f"{rel}: listed paths must be relative to the acquisition folder, without '..'"
                )
            try:
                st = self._check_source(tree, entry)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(rel)
                continue
            except OSError as exc:
                raise classify_os_error(exc, os.path.join(src_root, rel), "read") from None
            sources.append((entry, os.path.join(src_root, rel), st.st_size))
        if missing:
            raise PermanentImportError(
                f"{len(missing)} listed file(s) missing from {src_root}: {', '.join(missing[:20])}"
                + (" …" if len(missing) > 20 else "")
            )
        return sources

    def run(self, job: Job, ctx: ImportContext) -> dict[str, Any]:
        with self._tree(job) as tree:
            return self._run(job, ctx, tree)

    def _run(self, job: Job, ctx: ImportContext, tree: safefs.SourceTree) -> dict[str, Any]:
        sources = self._sources(job, tree)
        dest_root = self.destination(job)
        self._check_space(job, dest_root, sources)
        buf = bytearray(self.chunk_bytes)
        # A layout naming each acquisition (or job) gives it a folder of its own: a folder that holds
        # anything else (another acquisition of the same name, cells.czi beside this cells.tif) is taken.
        exclusive = "{acquisition}" in self.layout or "{job_id}" in self.layout
        for n in itertools.count(1):
            if n > MAX_COLLISION_SUFFIX:
                raise PermanentImportError(
                    f"{dest_root} and {MAX_COLLISION_SUFFIX - 1} numbered folders beside it all hold other files "
                    "of the same names; add {acquisition} or {job_id} to importer.archive.layout"
                )
            # A name too long for " (n)" is shortened, deterministically (filenames.fit_name).
            candidate = dest_root if n == 1 else dest_root.with_name(fit_name(dest_root.name, f" ({n})"))
            existed = _is_folder(candidate)
            if not self._fits(candidate, sources, buf, tree, own=job.id if exclusive else None):
                continue
            if n > 1:
                held = "another acquisition's files" if exclusive else "other files of the same names"
                ctx.log(f"{dest_root} already holds {held}: archiving into {candidate}")
            placed: list[str] = []
            try:
                result = self._copy_all(job, ctx, candidate, sources, buf, placed, tree,
                                        exclusive=exclusive and not existed, claim=exclusive)
            except TransientImportError as exc:
                if exc.full and exc.need_bytes is None:
                    # The volume filled mid-copy: what is placed stays for the next attempt
                    # (identity-checked), so the target resumes once the rest fits.
                    exc.need_bytes = self._remaining(candidate, sources)
                raise
            except _Occupied as exc:
                ctx.log(f"{exc}: another job took {candidate}; trying the next folder")
                for path in [*placed, os.path.join(candidate, _ledger_name(job.id))]:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                continue
            if n > 1:
                result["renamed_from"] = str(dest_root)
            return result
        raise AssertionError("unreachable")

    def _fits(self, folder: Path, sources: list, buf: bytearray, tree: safefs.SourceTree,
              own: int | None = None) -> bool:
        """True when every file of the job is absent from ``folder`` or already there, identical;
        with ``own`` (the job's id, for a layout that gives each acquisition its folder), only
        when the folder is absent or holds this job's files and nothing else (:func:`_claimable`:
        an earlier attempt's copies, ledger and temporary files).

        Costs one ``lstat`` when the folder does not exist yet (the usual case), a walk of
        the folder when it does, and a hash only for a same-named file of the same size
        (a retry's own copy).
        """
        try:
            st = os.lstat(folder)
        except OSError:
            return True  # not there (or unusable above it: creating it says why, classified)
        if not stat.S_ISDIR(st.st_mode):
            return False
        if own is not None and not _claimable(os.fspath(folder), {entry.path for entry, _, _ in sources}, own):
            return False
        for entry, _src, size in sources:
            dest = os.path.join(folder, entry.path)
            try:
                st = os.lstat(dest)
            except FileNotFoundError:
                continue
            except NotADirectoryError:
                return False  # a file where the job needs a folder
            except OSError:
                return True  # e.g. a name too long: copying reports it, classified
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                return False
            if self._hash_path(dest, buf) != (entry.sha256 or self._hash_source(tree, entry, buf)):
                return False
        return True

    def _hash_path(self, path: str, buf: bytearray) -> str:
        fd = os.open(path, os.O_RDONLY | _O_CLOEXEC)
        try:
            return self._hash_fd(fd, buf)
        finally:
            os.close(fd)

    def _hash_source(self, tree: safefs.SourceTree, entry, buf: bytearray) -> str:
        try:
            fd, _ = self._open_source(tree, entry)
        except (FileNotFoundError, NotADirectoryError):
            raise source_vanished(entry.path) from None
        try:
            return self._hash_fd(fd, buf)
        finally:
            os.close(fd)

    def _copy_all(self, job: Job, ctx: ImportContext, dest_root: Path, sources: list, buf: bytearray,
                  placed: list[str], tree: safefs.SourceTree, *, exclusive: bool = False,
                  claim: bool = False) -> dict[str, Any]:
        """Copy every source into ``dest_root``; ``placed`` collects the files this attempt linked there.

        ``exclusive``: the folder, absent when looked at, is this acquisition's alone: whoever makes
        it owns it, and a folder another job made meanwhile (empty, or holding its files) raises
        :class:`_Occupied`. ``claim``: create the job's ledger in it before the first file.
        """
        total = sum(size for _, _, size in sources)
        count = len(sources)
        try:
            if exclusive:
                dest_root.parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.mkdir(dest_root)
                except FileExistsError:
                    if not _claimable(os.fspath(dest_root), {entry.path for entry, _, _ in sources}, job.id):
                        raise _Occupied(f"{dest_root} was made by another job meanwhile") from None
            else:
                dest_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, dest_root, "create archive folder") from None
        ctx.log(f"archiving {count} file(s), {total} bytes, to {dest_root}")
        tag = f".wf-{job.id}-"
        anonymous = self.anonymous_temp and _anonymous_files_work(dest_root)
        # What this job owns in the folder, across attempts: what cleanup() removes if it
        # ends without success (created with the first file placed).
        ledger = _Ledger(os.path.join(dest_root, _ledger_name(job.id)))
        try:
            if claim:
                # The folder is this job's from now on: its ledger says so before any file is in it
                # (a copy without a name, O_TMPFILE, leaves nothing else), so a retry after a crash
                # finds its own folder, not an empty one that another job may have just made.
                try:
                    ledger.open()
                except OSError as exc:
                    raise classify_os_error(exc, dest_root, "write to archive folder") from None
            result = self._copy_each(job, ctx, dest_root, sources, buf, placed, tag, ledger, total, count,
                                     anonymous, tree)
        finally:
            ledger.close()
        ledger.remove()  # succeeded: the files are the job's result now
        return result

    def _copy_each(self, job: Job, ctx: ImportContext, dest_root: Path, sources: list, buf: bytearray,
                   placed: list[str], tag: str, ledger: _Ledger, total: int, count: int,
                   anonymous: bool, tree: safefs.SourceTree) -> dict[str, Any]:
        folders: set[str] = set()  # destination folders prepared in this attempt
        done_bytes = 0
        copied = []
        reused_flags = bytearray()  # per copied file: 1 when an earlier attempt had archived it
        reused_count = 0
        throttle = _Throttle(self.max_bytes_per_second, ctx)
        for index, (entry, src, _queued_size) in enumerate(sources):
            dest = os.path.join(dest_root, entry.path)
            parent = os.path.dirname(dest)
            if parent not in folders:
                self._prepare_folder(parent, tag)
                folders.add(parent)
            digest, reused, size = self._copy_one(ctx, tag if not anonymous else None, src, dest, entry.sha256, buf,
                                                  done_bytes, total, index, count, source=(tree, entry),
                                                  throttle=throttle)
            if not reused:
                placed.append(dest)
                try:
                    ledger.add(entry.path)
                except OSError as exc:
                    raise classify_os_error(exc, dest_root, "write to archive folder") from None
            done_bytes += size
            reused_count += reused
            copied.append({"path": entry.path, "size": size, "sha256": digest})
            reused_flags.append(reused)
            if index % PROGRESS_EVERY_FILES == 0 or size >= self.chunk_bytes:
                # Every few files (the context throttles the store writes; this bounds the calls).
                ctx.progress("copying", done_bytes, total, index + 1, count)
        ctx.progress("syncing", done_bytes, total, count, count)
        how = self._make_durable(ctx, dest_root, copied, folders)
        # Only now is anything reported archived: every line below is on stable storage. Written
        # a thousand lines at a time (a plate's 100,000 lines at once cost tens of MB of memory).
        for start in range(0, len(copied), LOG_LINES_PER_WRITE):
            ctx.log([f"{'already archived' if reused_flags[i] else 'archived'} {item['path']} sha256={item['sha256']}"
                     for i, item in enumerate(copied[start:start + LOG_LINES_PER_WRITE], start)])
        ctx.log(f"{count} file(s) durable ({how}); {reused_count} were already archived by an earlier attempt")
        ctx.progress("archived", done_bytes, total, count, count)
        return {"destination": str(dest_root), "files": copied, "bytes": total}

    def cleanup(self, job: Job) -> list[str]:
        """Remove the files ``job`` placed (its ledger lists them) and its ``.part`` files from
        its destination folder(s), then the folders left empty up to the archive root.
        Files it found already archived (another job's, identical) are not its own and stay."""
        removed: list[str] = []
        base = self.destination(job)
        tag = f".wf-{job.id}-"
        for n in range(1, MAX_COLLISION_SUFFIX + 1):
            folder = base if n == 1 else base.with_name(f"{base.name} ({n})")
            if not _is_folder(folder):
                if n > 1:
                    break
                continue
            ledger = folder / _ledger_name(job.id)
            owned = []
            if ledger.exists():
                owned = [json.loads(line) for line in ledger.read_text(encoding="utf-8").splitlines() if line]
            for rel in owned:
                path = folder / rel
                if path.is_relative_to(folder) and os.path.lexists(path):
                    path.unlink()
                    removed.append(str(path))
            for current, _dirs, names in os.walk(folder):
                for name in names:
                    if name.startswith(".") and tag in name and name.endswith(".part"):
                        os.unlink(os.path.join(current, name))
                        removed.append(os.path.join(current, name))
            ledger.unlink(missing_ok=True)
            for current, _dirs, _names in sorted(os.walk(folder), key=lambda t: -len(t[0])):
                _remove_empty(current, os.fspath(self.root))
        return removed

    def _prepare_folder(self, folder: str, tag: str) -> None:
        """Create ``folder`` and remove this job's temporary files left in it by an interrupted attempt."""
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, folder, "create archive folder") from None
        try:
            with os.scandir(folder) as entries:
                stale = [e.path for e in entries if e.name.startswith(".") and tag in e.name
                         and e.name.endswith(".part")]
        except OSError as exc:
            raise classify_os_error(exc, folder, "list archive folder") from None
        for path in stale:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    def _make_durable(self, ctx: ImportContext, dest_root: Path, copied: list[dict], folders: set[str]) -> str:
        """Flush every copied file and folder (and the folders above them) to stable storage."""
        try:
            if self.sync == "auto" and len(copied) >= self.syncfs_min_files and syncfs(dest_root):
                return "syncfs"
            for index, item in enumerate(copied):
                _fsync_path(os.path.join(dest_root, item["path"]))
                if index % 256 == 0:
                    ctx.checkpoint()
            dirs = set()
            root = os.fspath(self.root)
            for folder in folders:
                # Every folder up to the archive root's parent: mkdir may have created any of them.
                while folder not in dirs:
                    dirs.add(folder)
                    if not _within(folder, root) or folder == os.path.dirname(folder):
                        break
                    folder = os.path.dirname(folder)
            for folder in sorted(dirs, key=len, reverse=True):
                _fsync_path(folder, _O_DIRECTORY)
            return "fsync"
        except OSError as exc:
            raise classify_os_error(exc, exc.filename or dest_root, "flush to disk") from None

    def _copy_one(self, ctx: ImportContext, tag: str | None, src: str, dest: str, expected: str | None,
                  buf: bytearray, done_before: int, total: int, index: int, count: int,
                  *, source, throttle: _Throttle | None = None) -> tuple[str, bool, int]:
        """Copy, verify and place one file: ``(sha256, already archived, bytes read)``.

        ``tag`` names a temporary file, None makes it anonymous; ``source`` is ``(SourceTree, entry)``;
        ``throttle`` paces the reads from the source (``importer.archive.max_bytes_per_second``).
        """
        folder, name = os.path.split(dest)
        tmp = os.path.join(folder, f".{name}{tag}{uuid.uuid4().hex[:8]}.part") if tag else None
        view = memoryview(buf)
        source_hash = hashlib.sha256()
        done = 0
        fin = fout = -1
        try:
            try:
                fin, before = self._open_source(*source)
            except (FileNotFoundError, NotADirectoryError):
                raise source_vanished(source[1].path) from None
            except OSError as exc:
                raise classify_os_error(exc, src, "read") from None
            # Identity first: a retry whose file is already archived reads instead of
            # writing (a temporary copy would fail on a nearly full volume).
            same = self._already_there(dest, before.st_size, expected, fin, buf)
            if same:
                return same, True, before.st_size
            if tmp is None:
                fout = os.open(folder, os.O_RDWR | _O_TMPFILE | _O_CLOEXEC, 0o600)
            else:
                fout = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC, 0o600)
            os.fchmod(fout, self.copy_mode(before))
            # A big file's chunks are hashed in a thread while they are written (both release the
            # GIL; both only read the buffer, which is not refilled before both are done).
            hashing = (ThreadPoolExecutor(1, thread_name_prefix="archive-hash")
                       if before.st_size >= EARLY_SYNC_BYTES else None)
            try:
                while n := os.readv(fin, [buf]):
                    chunk = view[:n]
                    if hashing is None:
                        source_hash.update(chunk)
                        _write_all(fout, chunk)
                    else:
                        hashed = hashing.submit(source_hash.update, chunk)
                        try:
                            _write_all(fout, chunk)
                        finally:
                            hashed.result()
                    done += n
                    if throttle is not None:
                        throttle.read(n)
                    if n == len(buf):  # a file of several chunks: report within it (and honour a cancel)
                        ctx.progress("copying", done_before + done, total, index, count)
            finally:
                if hashing is not None:
                    hashing.shutdown()
            after = os.fstat(fin)
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or done != after.st_size:
                raise TransientImportError(f"{src} changed while it was being copied; it is still being written, "
                                            "or something else writes to the drop folder")
            digest = source_hash.hexdigest()
            if expected and digest != expected.lower():
                raise PermanentImportError(
                    f"{os.path.basename(src)}: checksum {digest} does not match the manifest's {expected}; "
                    "the file is corrupt or the manifest is wrong: export the acquisition again"
                )
            flushing = _BackgroundFsync(fout) if done >= EARLY_SYNC_BYTES else None
            try:
                os.lseek(fout, 0, os.SEEK_SET)
                copied = self._hash_fd(fout, buf) if flushing is None else _hash_fd_overlapped(fout, buf)
            finally:
                if flushing is not None:
                    flushing.join()  # its OSError is a write error of dest, as below
            if copied != digest:
                raise TransientImportError(f"the copy of {os.path.basename(src)} does not match its source (disk error?)")
            if tmp is None:
                return digest, self._place(fout, dest, digest, buf), done
            os.close(fout)
            fout = -1
            return digest, self._place(tmp, dest, digest, buf), done
        except OSError as exc:
            if exc.filename == src:
                raise classify_os_error(exc, src, "read") from None
            raise classify_os_error(exc, dest, "write") from None
        finally:
            for fd in (fin, fout):
                if fd >= 0:
                    os.close(fd)
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except FileNotFoundError:
                    pass

    def copy_mode(self, source: os.stat_result) -> int:
        """Permission bits of a copy (an int, e.g. ``0o640``): the source's less the umask the
        importer was made under (as ``cp`` without ``-p``: a 0777 source is not copied
        world-writable), narrowed further by ``importer.archive.file_mode`` when set; never
        setuid, setgid or sticky. The copy is fchmod'ed to it, which the umask does not touch."""
        mode = stat.S_IMODE(source.st_mode) & 0o777 & ~self.umask
        return mode & self.file_mode if self.file_mode is not None else mode

    def _already_there(self, dest: str, size: int, expected: str | None, fin: int, buf: bytearray) -> str | None:
        """The checksum when ``dest`` already holds exactly the source's bytes, else None."""
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return None
        digest = self._hash_path(dest, buf)
        if expected:
            return digest if digest == expected.lower() else None
        source = self._hash_fd(fin, buf)
        os.lseek(fin, 0, os.SEEK_SET)
        return digest if digest == source else None

    def _place(self, tmp: str | int, dest: str, digest: str, buf: bytearray) -> bool:
        """Move the verified copy (a temporary name, or the fd of an unnamed file) into place.

        True when an identical file was already there.
        """
        try:
            if isinstance(tmp, int):
                _link_unnamed(tmp, dest)
            else:
                os.link(tmp, dest)
        except FileExistsError:
            return self._place_existing(dest, digest, buf)
        except OSError as exc:
            if isinstance(tmp, int) or exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # Filesystems without hard links (some network shares): check, then rename.
            if os.path.lexists(dest):
                return self._place_existing(dest, digest, buf)
            os.replace(tmp, dest)
        return False

    def _place_existing(self, dest: str, digest: str, buf: bytearray) -> bool:
        fd = os.open(dest, os.O_RDONLY | _O_CLOEXEC)
        try:
            same = self._hash_fd(fd, buf) == digest
        finally:
            os.close(fd)
        if same:
            return True
        raise _Occupied(f"{dest} already exists with different content")

    @staticmethod
    def _hash_fd(fd: int, buf: bytearray) -> str:
        digest = hashlib.sha256()
        view = memoryview(buf)
        while n := os.readv(fd, [buf]):
            digest.update(view[:n])
        return digest.hexdigest()
