"""Names the service makes from a user's name (``run1 (2)``, ``run1.watchfolder-receipt.json``)
that must still fit the filesystem's limit on one name.

Linux filesystems allow at most ``NAME_MAX`` = 255 bytes per folder or file name.
An acquisition named with 240 bytes is fine by itself, but its receipt
(``<name>.watchfolder-receipt.json``, 25 bytes more) or a collision folder
``<name> (2)`` would not be. Such a name is shortened deterministically: the
user's part is cut on a UTF-8 character boundary and a short digest of the
whole original name is added (``<start of the name>~1a2b3c4d (2)``), so the
same original always gives the same shortened name (the watcher finds the
receipt it wrote) and two long names that start alike stay apart. Names that
fit are returned unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

#: Bytes per folder or file name (Linux ``NAME_MAX``; ext4, XFS, btrfs, NFS, CIFS).
NAME_MAX = 255
#: Hex digits of the original name's SHA-256 in a shortened name.
TAG_DIGITS = 8


def fit_name(name: str, suffix: str = "", *, limit: int = NAME_MAX) -> str:
    """``name + suffix`` when it fits ``limit`` bytes (as the OS encodes it), else ``name`` cut on a
    UTF-8 character boundary + ``~`` + the first 8 hex digits of its SHA-256 + ``suffix``.

    Raises ValueError when even the suffix and the tag do not fit (a suffix of ~245 bytes).
    """
    whole = name + suffix
    if len(whole) * 4 <= limit:  # a character is at most 4 bytes (UTF-8; 1 for an escaped byte)
        return whole
    raw = os.fsencode(name)
    if len(raw) + len(os.fsencode(suffix)) <= limit:
        return whole
    tag = "~" + hashlib.sha256(raw).hexdigest()[:TAG_DIGITS]
    room = limit - len(os.fsencode(tag + suffix))
    if room < 1:
        raise ValueError(f"a name ending in {suffix!r} cannot fit {limit} bytes")
    cut = room
    while cut > 0 and raw[cut] & 0xC0 == 0x80:  # never inside a UTF-8 character
        cut -= 1
    return os.fsdecode(raw[:cut]) + tag + suffix


def beside(path: str | os.PathLike, suffix: str) -> Path:
    """The file named ``<path's name><suffix>`` in ``path``'s folder (a receipt, an error report),
    shortened by :func:`fit_name` when that name would be too long."""
    return Path(beside_str(os.fspath(path), suffix))


def beside_str(path: str, suffix: str) -> str:
    """:func:`beside` as a string, without ``Path`` objects (for loops over thousands of
    folders, where building them costs more than the ``lstat``)."""
    path = path.rstrip("/") or path
    folder, sep, name = path.rpartition("/")
    return f"{folder}{sep}{fit_name(name, suffix)}"
