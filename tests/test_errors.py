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
