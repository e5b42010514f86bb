"""File modes at rest: what the service writes that holds secrets or personal data is its user's only.

The job database (pending jobs hold OMERO session keys; SQLite gives its -wal and
-shm files the database's mode), job logs and the mail outbox are created 0600,
and an existing database that is wider is narrowed at start. Archive copies take
their source's permission bits (see ``importer.archive.file_mode``). The example
systemd units set ``UMask=0027`` for everything else.
"""

from __future__ import annotations

import os

PRIVATE_FILE = 0o600


def private_file(path: str | os.PathLike, *, create: bool = False) -> None:
    """Make ``path`` readable and writable by its owner only; create it empty when ``create``.

    Does nothing when the file does not exist and ``create`` is false. Never follows a symlink.
    """
    flags = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0) | (os.O_CREAT if create else 0)
    try:
        fd = os.open(path, flags, PRIVATE_FILE)
    except FileNotFoundError:
        if create:
            raise
        return
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


def open_private_append(path: str | os.PathLike, errors: str = "strict"):
    """Open ``path`` for appending text (UTF-8, ``errors`` as for ``open``), created 0600 when new."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), PRIVATE_FILE)
    return open(fd, "a", encoding="utf-8", errors=errors)


__all__ = ["PRIVATE_FILE", "private_file", "open_private_append"]
