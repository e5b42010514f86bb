"""Open an acquisition's files without following a symlink out of where they belong.

An acquisition's paths are checked when it is detected or submitted, and its
files are opened later, by a worker. Between the two, whoever can write to the
drop folder can swap a folder or a file for a symlink (``mv acq acq.orig;
ln -s /etc acq``). A plain ``open()`` would follow it. :func:`open_source`
therefore never follows a symlink it has not checked itself:

- the allowed root (a watch folder, one of ``server.allowed_roots``: config the
  admin wrote) is opened as named;
- every folder from there down to the acquisition's folder is opened with
  ``O_NOFOLLOW`` relative to its parent's descriptor (``dir_fd``): a folder that
  became a symlink is refused, whatever it points to;
- inside the acquisition, a symlink is followed only as the acquisition's own
  parser allows it (to a path still inside the acquisition folder), resolved
  here component by component with ``readlink(dir_fd=…)``, never by the kernel;
- the file itself must be a regular file before it is opened (``lstat``): a FIFO,
  socket or device file is refused, naming its kind, and never opened (opening a
  FIFO can block, opening a device can act on it); it is then opened with
  ``O_NOFOLLOW | O_NONBLOCK | O_NOCTTY`` (nothing swapped in since can block or
  become a terminal) and must still be a regular file; its ``fstat`` is what the
  caller records and compares, since the descriptor, not the name, is what gets read.

This module uses the standard library only and runs on Python 3.10: the OMERO
child process loads it by file path (:func:`load_by_path` in the child).
"""

from __future__ import annotations

import errno
import os
import stat

try:
    from .errors import WatchfolderError as _Base
except ImportError:  # loaded by file path, outside the package (the OMERO child)
    _Base = Exception

__all__ = ["UnsafePath", "SourceTree", "open_source", "read_file", "allowed_root_for", "same_file", "identity",
           "file_kind"]

# As Linux's own limit on symlinks followed while resolving one path.
MAX_SYMLINKS = 40
_PATH = getattr(os, "O_PATH", 0)  # search permission is enough to walk through a folder
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = (_PATH or os.O_RDONLY) | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | _CLOEXEC


def file_kind(mode: int) -> str:
    """What a file that is not a regular file is, in words: ``"a named pipe (FIFO)"``, ..."""
    for test, words in ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return words
    return "not a regular file"


def not_regular_reason(mode: int) -> str:
    """Why a non-regular file is refused, and the fix (it was not opened)."""
    return (f"is {file_kind(mode)}, not a regular file: refused and not opened; remove it from the "
            "acquisition (only regular files are imported)")


class UnsafePath(_Base):
    """A path left its allowed root, met a symlink where none may be, or is not a regular file.

    Permanent: trying again cannot make the path safe. ``path`` is the path as asked for.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def _within(path: str, root: str) -> bool:
    root = root.rstrip("/") or "/"
    return path == root or path.startswith(root if root == "/" else root + "/")


def _relative_to(path: str, root: str) -> list[str]:
    rest = path[len(root.rstrip("/")):]
    return [p for p in rest.split("/") if p]


def allowed_root_for(source: str, root: str, config=None) -> str:
    """The folder a job of ``source`` may read under, for :func:`open_source`'s ``allowed_root``.

    ``watch:<name>``: that watch folder. Other sources (``api:…``, ``seed:…``: HTTP
    clients): the entry of ``server.allowed_roots`` holding ``root``. ``cli:…`` (a
    local user who can read the config), a watch folder no longer configured, or no
    allowed roots at all: ``/`` (the walk from there still refuses every symlink
    down to ``root``, which was resolved when the job was queued). Raises
    :class:`UnsafePath` when allowed roots are configured but none holds ``root``
    any more (the config was narrowed since the job was queued).
    """
    kind, _, name = source.partition(":")
    if kind == "cli" or config is None:
        return "/"
    if kind == "watch":
        candidates = [w.path for w in getattr(config, "watch", ()) if w.name == name]
    else:
        candidates = list(getattr(getattr(config, "server", None), "allowed_roots", ()))
    if not candidates:
        return "/"
    for candidate in candidates:
        for form in (os.path.abspath(candidate), os.path.realpath(candidate)):
            if _within(root, form):
                return form
    where = f"watch folder {name!r}" if kind == "watch" else "server.allowed_roots"
    raise UnsafePath(root, f"is not under {where} any more; queue it again from an allowed folder")


def _open_dir(name: str, dir_fd: int, shown: str) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            raise UnsafePath(shown, "is no longer a folder (a symlink or a file now); it was a folder "
                                    "when the acquisition was queued, so it is not followed") from None
        raise


class SourceTree:
    """An acquisition folder opened once, its files opened by :meth:`open`; a context manager.

    Opening walks from ``allowed_root`` down to ``root`` with ``O_NOFOLLOW`` at
    every folder (:class:`UnsafePath` if one became a symlink) and keeps the
    acquisition folder's descriptor: every later open is relative to that very
    folder, whatever happens to its path. The last few subfolders' descriptors
    are kept too, so a plate of 100,000 files in 400 wells costs about one
    ``openat`` per file.
    """

    CACHED_FOLDERS = 8

    def __init__(self, allowed_root: str, root: str, expected: dict | None = None):
        self.root = root
        #: Each file's identity when queued (relative path -> :func:`identity`), checked by :meth:`open`.
        self.expected = dict(expected or {})
        if not os.path.isabs(allowed_root) or not os.path.isabs(root):
            raise UnsafePath(root, "the acquisition folder and its allowed root must be absolute paths")
        if not _within(root, allowed_root):
            raise UnsafePath(root, f"is not under its allowed root {allowed_root}")
        self._forms = {root.rstrip("/") or "/", os.path.realpath(root)}  # compared as text only
        self._folders: dict[str, int] = {}
        fd = os.open(allowed_root, (_PATH or os.O_RDONLY) | os.O_DIRECTORY | _CLOEXEC)
        try:
            current = allowed_root.rstrip("/") or "/"
            for part in _relative_to(root, allowed_root):
                if part in (".", ".."):
                    raise UnsafePath(root, "the acquisition folder must not contain '.' or '..'")
                current = os.path.join(current, part)
                parent, fd = fd, -1
                try:
                    fd = _open_dir(part, parent, current)
                finally:
                    os.close(parent)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise
        self._root_fd = fd

    def __enter__(self) -> SourceTree:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fd in self._folders.values():
            os.close(fd)
        self._folders.clear()
        if self._root_fd >= 0:
            os.close(self._root_fd)
            self._root_fd = -1

    def open(self, rel: str, expect: list[int] | tuple[int, ...] | None = None) -> tuple[int, os.stat_result]:
        """Open ``root/rel`` for reading: ``(fd, fstat)``; the caller closes ``fd``.

        ``rel`` may pass through symlinks that stay inside the acquisition folder.
        ``expect`` (default: ``expected[rel]``): the file's :func:`identity` when the job was queued; the opened
        file must still be that file (same device, inode, size and mtime), so a name
        pointed at another file since (a hard link to ``/etc/shadow``, a copy, a
        rewrite) is refused. Raises :class:`UnsafePath` (refused: permanent) or
        ``OSError`` (missing file, permissions, I/O error).
        """
        fd, st = self._open(rel)
        if expect is None:
            expect = self.expected.get(rel)
        # The device number alone may change when a share is mounted again between queuing and the run;
        # inode, size and mtime (ns) still name the same file then, and a writer of the drop folder cannot
        # make another file with all three.
        if expect is not None and identity(st)[1:] != tuple(expect)[1:]:
            os.close(fd)
            raise UnsafePath(os.path.join(self.root, rel), _CHANGED)
        return fd, st

    def check(self, rel: str, expect: list[int] | tuple[int, ...] | None = None) -> os.stat_result:
        """What :meth:`open` would find at ``root/rel`` (a regular file, the identity queued), without
        opening it where that is certain: one ``lstat`` beside the folder's descriptor for a plain
        name; a name that is a symlink or passes through one is opened and closed (:meth:`open`).
        Same errors as :meth:`open`. A check is not a licence: the copy opens through :meth:`open`."""
        folder, _, name = rel.rpartition("/")
        plain = (not os.path.isabs(rel) and name not in ("", ".", "..")
                 and not any(p in ("", ".", "..") for p in folder.split("/") if folder))
        if plain:
            shown = os.path.join(self.root, rel)
            dir_fd = self._folder(folder, shown) if folder else self._root_fd
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISREG(st.st_mode):
                if expect is None:
                    expect = self.expected.get(rel)
                if expect is not None and identity(st)[1:] != tuple(expect)[1:]:
                    raise UnsafePath(shown, _CHANGED)
                # Readable as the open would be (a permission problem is said before any copy).
                if not os.access(name, os.R_OK, dir_fd=dir_fd, effective_ids=True, follow_symlinks=False):
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), shown)
                return st
            if not stat.S_ISLNK(st.st_mode):
                raise UnsafePath(shown, not_regular_reason(st.st_mode))
        fd, st = self.open(rel, expect)
        os.close(fd)
        return st

    def _open(self, rel: str) -> tuple[int, os.stat_result]:
        shown = os.path.join(self.root, rel)
        if os.path.isabs(rel) or not rel:
            raise UnsafePath(shown, "a listed path must be relative to the acquisition folder")
        folder, _, name = rel.rpartition("/")
        plain = name not in ("", ".", "..") and not any(p in ("", ".", "..") for p in folder.split("/") if folder)
        if plain:
            # Fast path: the folder's descriptor (resolved safely once), then the name itself,
            # not following it. A symlink there takes the full walk below.
            dir_fd = self._folder(folder, shown) if folder else self._root_fd
            try:
                fd = _open_regular(name, dir_fd, shown)
            except OSError as exc:
                if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                    raise
            else:
                return self._regular(fd, shown)
        fd = self._resolve(rel, shown, want_dir=False)
        return self._regular(fd, shown)

    @staticmethod
    def _regular(fd: int, shown: str) -> tuple[int, os.stat_result]:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):  # swapped in between the check and the open
                raise UnsafePath(shown, not_regular_reason(st.st_mode))
            if getattr(os, "O_NONBLOCK", 0):
                os.set_blocking(fd, True)
        except BaseException:
            os.close(fd)
            raise
        return fd, st

    def _folder(self, folder: str, shown: str) -> int:
        fd = self._folders.pop(folder, None)
        if fd is None:
            fd = self._resolve(folder, shown, want_dir=True)
            while len(self._folders) >= self.CACHED_FOLDERS:
                os.close(self._folders.pop(next(iter(self._folders))))
        self._folders[folder] = fd  # most recently used last
        return fd

    def _resolve(self, rel: str, shown: str, *, want_dir: bool) -> int:
        """Walk ``rel`` from the acquisition folder, resolving symlinks here and refusing any way out."""
        fds: list[int] = []  # below the acquisition folder; its own fd is not ours to close

        def top() -> int:
            return fds[-1] if fds else self._root_fd

        pending = [p for p in rel.split("/") if p not in ("", ".")]
        links = 0
        try:
            while pending:
                part = pending.pop(0)
                if part == "..":
                    if not fds:
                        raise UnsafePath(shown, "leads out of the acquisition folder ('..')")
                    os.close(fds.pop())
                    continue
                as_dir = want_dir or bool(pending)
                try:
                    fd = os.open(part, _DIR_FLAGS, dir_fd=top()) if as_dir else _open_regular(part, top(), shown)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
                        raise
                    st = os.stat(part, dir_fd=top(), follow_symlinks=False)
                    if not stat.S_ISLNK(st.st_mode):
                        raise UnsafePath(shown, f"{part!r} is not a folder") from None
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise UnsafePath(shown, "too many levels of symlinks") from None
                    target = os.readlink(part, dir_fd=top())
                    if os.path.isabs(target):
                        target = os.path.normpath(target)
                        form = next((f for f in self._forms if _within(target, f)), None)
                        if form is None:
                            raise UnsafePath(shown, f"is a symlink out of the acquisition folder (to {target}); "
                                                    "copy the file into the folder instead") from None
                        for fd in fds:
                            os.close(fd)
                        fds.clear()
                        pending = _relative_to(target, form) + pending
                    else:
                        pending = [p for p in target.split("/") if p not in ("", ".")] + pending
                    continue
                fds.append(fd)
            if not fds:
                if want_dir:
                    return os.dup(self._root_fd)
                raise UnsafePath(shown, "is not a regular file")
            return fds.pop()
        finally:
            for fd in fds:
                os.close(fd)


_CHANGED = ("changed after it was queued (its name now leads to another file, or the file was "
            "rewritten); submit the acquisition again if the change is intended")


def _open_regular(name: str, dir_fd: int, shown: str) -> int:
    """Open ``name`` in ``dir_fd`` for reading if it is a regular file; never open anything else.

    A symlink raises ``OSError(ELOOP)`` (the caller resolves it); a FIFO, socket or
    device raises :class:`UnsafePath` without being opened.
    """
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if stat.S_ISLNK(st.st_mode):
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(shown, not_regular_reason(st.st_mode))
    return os.open(name, _FILE_FLAGS, dir_fd=dir_fd)


def open_source(allowed_root: str, root: str, rel: str, expect=None) -> tuple[int, os.stat_result]:
    """Open ``root/rel`` for reading once; ``(fd, fstat)``, the caller closes ``fd``.

    See :class:`SourceTree` (use it to open many files of one acquisition).
    """
    try:
        tree = SourceTree(allowed_root, root)
    except UnsafePath as exc:
        raise UnsafePath(os.path.join(root, rel), exc.reason) from None
    with tree:
        return tree.open(rel, expect)


def read_file(path: str | os.PathLike, limit: int, *, within: str | None = None, what: str = "file",
              allow_hard_links: bool = False) -> bytes:
    """The bytes of a small file the service reads back (a manifest, sidecar, receipt, record).

    By the data files' rule: the file itself is opened with ``O_NOFOLLOW`` and must be
    a regular file; a symlink is refused, never read, wherever it points (even inside
    the folder: a descriptor is the instrument's own file, not a link to one). With
    ``within`` (a watch folder, an allowed root), every folder from there down to the
    file's is walked as :class:`SourceTree` does, refusing a symlinked folder, and a
    path outside ``within`` is refused. At most ``limit + 1`` bytes are read (one more
    than allowed tells the caller "too big"). ``what`` names the file in the reason:
    "manifest is a symbolic link; replace it with the file itself". A file with
    several hard links (another name for a file that may live anywhere on the same
    filesystem) is refused too, unless ``allow_hard_links``.

    Raises :class:`UnsafePath` (refused) or ``OSError`` (missing, permissions).
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    if within is not None:
        try:
            tree = SourceTree(os.path.abspath(within), folder)
        except UnsafePath as exc:
            raise UnsafePath(path, exc.reason) from None
        dir_fd, tree._root_fd = tree._root_fd, -1
    else:
        dir_fd = os.open(folder, (_PATH or os.O_RDONLY) | os.O_DIRECTORY | _CLOEXEC)
    try:
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=dir_fd)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK):
                raise UnsafePath(path, f"{what} is a symbolic link; replace it with the file itself") from None
            raise
    finally:
        os.close(dir_fd)
    try:
        is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
        fd, st = SourceTree._regular(fd, path)  # closes fd when it refuses
    except UnsafePath:
        kind = "a folder, not a file" if is_dir else "not a regular file (a FIFO, socket or device)"
        raise UnsafePath(path, f"{what} is {kind}") from None
    if st.st_nlink > 1 and not allow_hard_links:
        os.close(fd)
        raise UnsafePath(path, f"{what} has {st.st_nlink} hard links (the same file under another name, perhaps "
                               "outside the drop folder); replace it with a copy of the file")
    try:
        chunks: list[bytes] = []
        got = 0
        ask = min(st.st_size, limit) + 1
        while got <= limit:
            chunk = os.read(fd, min(ask, limit + 1 - got))
            if not chunk:
                break
            chunks.append(chunk)
            got += len(chunk)
            if len(chunk) < ask:
                break  # a short read of a regular file is its end
            ask = 65536  # it grew meanwhile: read on, up to the limit
        return b"".join(chunks)
    finally:
        os.close(fd)


def identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What names one file's content: ``(st_dev, st_ino, st_size, st_mtime_ns)``, recorded when a job is queued."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    """True when two stats name the same file with the same content stamp (device, inode, size, mtime)."""
    return (a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns) == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns)
