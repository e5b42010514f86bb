"""The one OS-error classifier: errno decides permanent vs transient, the message says what to change."""

from __future__ import annotations

import errno
import os

import pytest

from watchfolder.errors import PermanentImportError, TransientImportError, classify_os_error


@pytest.mark.parametrize(
    ("code", "kind", "fix"),
    [
        (errno.ENAMETOOLONG, PermanentImportError, "shorten the project, dataset or file name"),
        (errno.EINVAL, PermanentImportError, "rename the acquisition, project or dataset"),
        (errno.EILSEQ, PermanentImportError, "rename it using plain letters"),
        (errno.EACCES, PermanentImportError, "give the user watchfolder runs as access"),
        (errno.EPERM, PermanentImportError, "give the user watchfolder runs as access"),
        (errno.EROFS, PermanentImportError, "remount it read-write"),
        (errno.ENOTDIR, PermanentImportError, "move that file away"),
        (errno.ENOSPC, TransientImportError, "free space there"),
        (errno.EDQUOT, TransientImportError, "raise the quota"),
        (errno.EIO, TransientImportError, "check the disk or the share"),
        (errno.ESTALE, TransientImportError, os.strerror(errno.ESTALE)),  # not listed: kept, retried
    ],
)
def test_classify_by_errno(code, kind, fix):
    exc = OSError(code, os.strerror(code), "/archive/x")
    failure = classify_os_error(exc, "/archive/x", "create archive folder")
    assert type(failure) is kind
    assert failure.message.startswith("cannot create archive folder /archive/x: ")
    assert fix in failure.message
    assert "\n" not in failure.message


def test_errno_none_is_transient_with_the_os_text():
    failure = classify_os_error(OSError("something odd"), "/x", "read")
    assert isinstance(failure, TransientImportError)
    assert failure.message == "cannot read /x: something odd"


def test_name_too_long_says_which_limit_and_the_fix_for_the_action():
    # Outside report b12 L6: a path past PATH_MAX (18 folders of 243 bytes) was given the
    # NAME_MAX reason and the archive layout as the fix, while reading a drop folder.
    exc = OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG))
    deep = "/drop/" + "/".join("d" * 243 for _ in range(18))
    read = str(classify_os_error(exc, deep, "read"))
    assert f"the path is too long ({len(deep)} bytes; at most 4095 bytes for a whole path" in read
    assert read.endswith("; move the data up, into fewer or shorter nested folders")
    create = str(classify_os_error(exc, "/archive/" + deep, "create archive folder"))
    assert "the path is too long" in create and "importer.archive.layout" in create
    long_name = "/drop/" + "n" * 300
    read = str(classify_os_error(exc, long_name, "read"))
    assert "at most 255 bytes per folder or file name" in read and read.endswith("; rename it shorter")
    create = str(classify_os_error(exc, long_name, "create archive folder"))
    assert "255 bytes per folder or file name" in create and "importer.archive.layout" in create
