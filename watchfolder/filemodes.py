"""File modes at rest: what the service writes that holds secrets or personal data is its user's only.

The job database (pending jobs hold OMERO session keys), its ``-wal`` and ``-shm``
files, job logs and the mail outbox are created 0600 in folders 0700 — or, with
``file_group`` set, 0640 in folders 0750, given to that group, so the admins in
it can read them (``sqlite3 -readonly``, ``less``) without being the service
user. Existing files are brought to that mode and group when the service opens
them (an existing wider database is narrowed at start). Archive copies take
their source's permission bits less the process's umask, as ``cp`` does (see
``importer.archive.file_mode``, :func:`current_umask`). The example systemd units
set ``UMask=0027`` for everything else.

A process can give a file it owns to a group only when it is root or a member
of that group (chown(2)); :func:`group_problem` says so before anything starts,
and :class:`FileModeError` names the file and the fix when the system refuses.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import WatchfolderError

PRIVATE_FILE = 0o600
PRIVATE_DIR = 0o700
GROUP_FILE = 0o640
GROUP_DIR = 0o750
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

log = logging.getLogger(__name__)


class FileModeError(WatchfolderError):
    """A file or folder of the service cannot be given the mode or group it must have."""


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return str(os.geteuid())


def group_problem(group: str) -> str | None:
    """Why this process cannot give its files to ``group``, or None when it can."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return f"there is no group {group!r} on this host; create it (groupadd {group}) or fix the name"
    if os.geteuid() != 0 and gid != os.getegid() and gid not in os.getgroups():
        user = _user()
        return (f"the service user {user} is not a member of group {group!r}, so it cannot give its files to "
                f"that group; add it (usermod -aG {group} {user}) and start again, or unset file_group")
    return None


_FALLBACK_UMASK: int | None = None


def current_umask() -> int:
    """The process's umask (permission bits, e.g. ``0o027``), read without changing it.

    Linux (4.7 and later) shows it in ``/proc/self/status`` (``Umask:``), so no other
    thread ever sees a changed umask. Elsewhere it is read once, the first time, with
    ``os.umask`` set-and-restore (call it at start, before threads create files) and
    remembered.
    """
    global _FALLBACK_UMASK
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    if _FALLBACK_UMASK is None:
        old = os.umask(0o077)
        os.umask(old)
        _FALLBACK_UMASK = old & 0o777
    return _FALLBACK_UMASK


@dataclass(frozen=True)
class FileModes:
    """How the service's own files and folders are made: private (the default), or shared with ``group``."""

    group: str | None = None
    gid: int | None = None

    @classmethod
    def for_group(cls, group: str | None) -> FileModes:
        """The modes for ``file_group`` (None: private); raises FileModeError when the group cannot be used."""
        if not group:
            return PRIVATE
        problem = group_problem(group)
        if problem:
            raise FileModeError(f"file_group: {problem}")
        return cls(group, grp.getgrnam(group).gr_gid)

    @property
    def file_mode(self) -> int:
        return PRIVATE_FILE if self.gid is None else GROUP_FILE

    @property
    def dir_mode(self) -> int:
        return PRIVATE_DIR if self.gid is None else GROUP_DIR

    def secure_fd(self, fd: int, path: str | os.PathLike, *, exact: bool = False) -> None:
        """Bring the open file or folder ``fd`` (named ``path`` in errors) to these modes.

        Private: narrowed to its owner only when it is wider (never widened).
        With a group: given to the group, a file exactly 0640, a folder readable
        and searchable by the group (its bits for others untouched, unless
        ``exact``: a folder holding only the service's files is made 0750).
        """
        st = os.fstat(fd)
        current = stat.S_IMODE(st.st_mode)
        folder = stat.S_ISDIR(st.st_mode)
        try:
            if self.gid is None:
                if current & 0o077:
                    os.fchmod(fd, current & 0o700)
                return
            if st.st_gid != self.gid:
                os.fchown(fd, -1, self.gid)
            # A folder may hold more than our files (data_dir): its bits for others stay as they are.
            if not folder or exact:
                wanted = GROUP_DIR if folder else GROUP_FILE
            else:
                wanted = (current & ~0o020 | 0o050) & 0o7777
            if current != wanted:
                os.fchmod(fd, wanted)
        except PermissionError:
            what = f"give {os.fspath(path)} to group {self.group!r} (file_group)" if self.gid is not None else \
                f"make {os.fspath(path)} private (0600)"
            raise FileModeError(
                f"cannot {what}: it belongs to uid {st.st_uid}, and the service runs as {_user()}; "
                "chown it to the service user" + (", or unset file_group" if self.gid is not None else "")
            ) from None

    def secure_file(self, path: str | os.PathLike, *, create: bool = False) -> None:
        """Bring ``path`` to these modes; create it empty when ``create``.

        Does nothing when the file does not exist and ``create`` is false. Never follows a symlink.
        """
        flags = os.O_RDONLY | os.O_NOFOLLOW | _CLOEXEC | (os.O_CREAT if create else 0)
        try:
            fd = os.open(path, flags, self.file_mode)
        except FileNotFoundError:
            if create:
                raise
            return
        try:
            self.secure_fd(fd, path)
        finally:
            os.close(fd)

    def open_append(self, path: str | os.PathLike, errors: str = "strict"):
        """Open ``path`` for appending text (UTF-8, ``errors`` as for ``open``), created with these modes."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _CLOEXEC, self.file_mode)
        if self.gid is not None:  # the umask may have narrowed it, and the group is the creator's
            try:
                self.secure_fd(fd, path)
            except BaseException:
                os.close(fd)
                raise
        return open(fd, "a", encoding="utf-8", errors=errors)

    def make_dir(self, path: str | os.PathLike, *, own: bool = True) -> None:
        """Create the folder ``path`` (and missing parents) with these modes.

        When ``own`` says it holds only the service's files (logs, outbox),
        ``path`` is brought to ``dir_mode`` also when it already exists: an
        older folder left 0755 (made before these rules, or by hand) is
        narrowed to 0700 — 0750 and given to the group with one. With a group,
        the parents made here are given to it too (the group must reach the
        files inside). A folder that may hold more (the data_dir, which
        systemd's ``StateDirectory=`` owns: it chowns everything below again,
        recursively, when it finds the folder's group changed) is left as it
        is; a warning says when the group cannot pass through it. Raises
        FileModeError when the system refuses (the folder is someone else's).
        """
        path = Path(path)
        missing = []
        probe = path
        while not probe.exists() and probe != probe.parent:
            missing.append(probe)
            probe = probe.parent
        path.mkdir(parents=True, exist_ok=True, mode=self.dir_mode)
        if self.gid is None and not own:
            return  # mkdir made the missing ones dir_mode (the umask can only narrow it)
        folders = [path] if own else []
        if self.gid is not None:
            folders += missing
        for folder in dict.fromkeys(folders):
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
            try:
                self.secure_fd(fd, folder, exact=folder == path and own)
            finally:
                os.close(fd)
        if path not in missing and not own:
            st = os.stat(path)
            if not (st.st_mode & 0o001 or (st.st_gid == self.gid and st.st_mode & 0o010)):
                log.warning("file_group: members of %s cannot pass through %s (mode %04o, group %d): give the "
                            "folder o+x, or g+x with that group, for them to read the files in it", self.group,
                            path, stat.S_IMODE(st.st_mode), st.st_gid)


#: The default: everything the service's user's only.
PRIVATE = FileModes()


__all__ = ["PRIVATE", "PRIVATE_FILE", "GROUP_FILE", "FileModes", "FileModeError", "group_problem"]
