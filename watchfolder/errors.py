"""Exceptions of watchfolder.

Every error the package raises derives from :class:`WatchfolderError`.
Control-flow signals (a job was cancelled, a lease was lost) derive from
:class:`JobInterrupt` instead, so ``except WatchfolderError`` never swallows
them by accident.
"""

from __future__ import annotations

import errno as _errno
import os


class WatchfolderError(Exception):
    """Base of every error raised by watchfolder."""


class ConfigError(WatchfolderError):
    """The configuration is invalid. ``problems`` lists one line per bad key."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class StoreError(WatchfolderError):
    """The job store refused an operation."""


class StoreUnavailable(StoreError):
    """The store cannot be reached now (database server down, restarting, network). Try again later."""


class StoreRefused(StoreError):
    """The database server refused this store's connection for a reason waiting will not fix.

    No such database or role, a wrong or missing password, a host the server does
    not admit: a configuration error. The message names ``store.url`` (password
    redacted), the server's reason and the fix. Services stop at once instead of
    waiting, unlike :class:`StoreUnavailable`.
    """


class StoreBroken(StoreError):
    """The store's database is gone, replaced, emptied or corrupt under this process: every
    operation refuses until an admin restores it (said once, in a CRITICAL log line)."""


class JobNotFound(StoreError):
    def __init__(self, job_id: int):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class InvalidTransition(StoreError):
    """The job is not in a state that allows the operation (e.g. retry a running job)."""


class AcquisitionError(WatchfolderError):
    """A sidecar, manifest or submitted job is invalid. The message says why and how to fix it."""


class ImportFailure(WatchfolderError):
    """An importer failed. Subclasses say whether trying again can help."""

    transient = False

    def __init__(self, message: str, *, config_error: bool = False, unavailable: bool = False,
                 full: bool = False, need_bytes: int | None = None):
        super().__init__(message)
        self.message = message
        # The target is out of space (ENOSPC, EDQUOT, or too little free for the job):
        # a target condition, never the job's; the target pauses until the job fits.
        self.full = full
        self.need_bytes = need_bytes  # what must fit before the job can run (None: the job's size)
        unavailable = unavailable or full
        # A permanent failure caused by the service's configuration (e.g. wrong
        # OMERO admin password) rather than by the acquisition: the admin must act.
        self.config_error = config_error
        # The importer's target itself is down (OMERO unreachable, connection lost,
        # archive volume full), not this job: counts toward pausing the target
        # (see watchfolder.backpressure), and a job failing so while the target is
        # paused goes back to the queue without losing its attempt.
        self.unavailable = unavailable


class TransientImportError(ImportFailure):
    """Worth retrying later: server unreachable, connection lost, timeout."""

    transient = True


class PermanentImportError(ImportFailure):
    """Retrying cannot help: unsupported file, unknown user, missing file."""


class JobInterrupt(BaseException):
    """Control flow: stop working on the current job now. Not an error."""


class JobCancelled(JobInterrupt):
    """The job was cancelled while running."""


class LeaseLost(JobInterrupt):
    """This worker no longer holds the job's lease (it expired and another may run it)."""


class ShuttingDown(JobInterrupt):
    """The worker is stopping and the grace period is over: release the job."""


# -- OS errors -----------------------------------------------------------------

# errno -> (permanent?, what is wrong, what to change). Permanent causes are the
# ones no retry can cure: the name, the permissions or the mount must change.
# Anything not listed is treated as transient (a share that went away, a
# timeout): the job is kept and retried, never failed on a guess.
_OS_ERRORS: dict[int, tuple[bool, str, str]] = {
    _errno.ENAMETOOLONG: (
        True, "the name is too long for the filesystem (at most 255 bytes per folder or file name)",
        "shorten the project, dataset or file name, or change importer.archive.layout",
    ),
    _errno.EINVAL: (
        True, "the name is not valid on this filesystem (e.g. ':', '*', '?', '\"', '<', '>', '|' "
        "or a trailing dot or space on a Windows/SMB share)",
        "rename the acquisition, project or dataset without those characters",
    ),
    _errno.EILSEQ: (
        True, "the name's characters cannot be stored on this filesystem (encoding)",
        "rename it using plain letters, digits, '-' and '_'",
    ),
    _errno.EACCES: (
        True, "permission denied",
        "give the user watchfolder runs as access to it (or fix the folder's owner/mode)",
    ),
    _errno.EPERM: (
        True, "operation not permitted",
        "give the user watchfolder runs as access to it (or fix the folder's owner/mode)",
    ),
    _errno.EROFS: (
        True, "the filesystem is mounted read-only",
        "remount it read-write or point the configuration at a writable folder",
    ),
    _errno.ENOTDIR: (
        True, "a file is in the way where a folder is expected",
        "move that file away",
    ),
    _errno.EISDIR: (
        True, "a folder is in the way where a file is expected",
        "move that folder away",
    ),
    _errno.ELOOP: (
        True, "too many levels of symbolic links",
        "fix the symbolic link loop",
    ),
    _errno.EFBIG: (
        True, "the file is too large for this filesystem (e.g. FAT32's 4 GiB limit)",
        "archive to a filesystem that supports large files",
    ),
    _errno.ENOSPC: (
        False, "no space left on the device",
        "free space there",
    ),
    _errno.EDQUOT: (
        False, "the disk quota is exceeded",
        "free space or raise the quota",
    ),
    _errno.EIO: (
        False, "an I/O error (failing disk or a network share that dropped)",
        "check the disk or the share",
    ),
}


def describe_os_error(exc: OSError, path: object, action: str) -> tuple[bool, str]:
    """``(permanent, "cannot <action> <path>: <problem>; <fix>")`` for an ``OSError`` (one line).

    The rule is by ``errno`` (POSIX, ``errno(3)``): a name too long or invalid, a
    permission refused, a read-only mount and a file in the way are permanent —
    retrying cannot help, and the fix says what to change; no space, quota and I/O
    errors are transient; an errno not listed is transient too.
    """
    permanent, problem, fix = _OS_ERRORS.get(exc.errno or 0, (False, exc.strerror or str(exc), ""))
    if exc.errno == _errno.ENAMETOOLONG:
        problem, fix = _name_too_long(path, action, problem, fix)
    return permanent, f"cannot {action} {path}: {problem}" + (f"; {fix}" if fix else "")


# Linux's limits (linux/limits.h): a name of at most NAME_MAX bytes, a path of fewer than PATH_MAX.
NAME_MAX = 255
PATH_MAX = 4096


def _name_too_long(path: object, action: str, problem: str, fix: str) -> tuple[str, str]:
    """ENAMETOOLONG says which of two limits? A name past NAME_MAX, or a whole path past PATH_MAX
    with every name within it (18 nested folders of 243 bytes): each has its own words and fix,
    and reading something in a drop folder has nothing to do with the archive layout."""
    raw = os.fsencode(str(path))
    if raw and max(len(part) for part in raw.split(b"/")) <= NAME_MAX and len(raw) >= PATH_MAX:
        problem = (f"the path is too long ({len(raw)} bytes; at most {PATH_MAX - 1} bytes for a whole path, "
                   f"each folder or file name within {NAME_MAX})")
        fix = ("move the data up, into fewer or shorter nested folders" if action == "read" else
               "shorten the project, dataset or file names, or change importer.archive.layout "
               "(or importer.archive.root) to nest less")
    elif action == "read":
        fix = "rename it shorter"
    return problem, fix


def classify_os_error(exc: OSError, path: object, action: str) -> ImportFailure:
    """Turn an ``OSError`` met while ``action`` ("create archive folder", "read") on
    ``path`` into a :class:`PermanentImportError` or :class:`TransientImportError`
    (rule: :func:`describe_os_error`). The message says what is wrong and the fix, not
    whether the job is retried: the job's state says that (a last attempt is not).
    Returns the exception (the caller raises it, ``from None``).
    """
    permanent, message = describe_os_error(exc, path, action)
    if permanent:
        return PermanentImportError(message)
    # A full volume is the target's condition, not this job's fault: the target pauses
    # (watchfolder.backpressure) and the job goes back to the queue, its attempt kept.
    return TransientImportError(message, full=exc.errno in (_errno.ENOSPC, _errno.EDQUOT))


def source_vanished(path: object) -> PermanentImportError:
    """A listed source file that disappeared while its job ran: the acquisition was changed
    during import. Permanent -- the job's list no longer matches the acquisition, so no
    retry of it can succeed; a watch folder sees the change and imports the acquisition
    again once it is complete (one job at a time per acquisition). Returns the exception.
    """
    return PermanentImportError(
        f"file {path} disappeared while importing; the acquisition was changed during import "
        "(a watch folder imports it again once it is complete; otherwise submit it again)"
    )
