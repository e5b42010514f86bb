"""Content de-duplication: the same data under another name is not imported again.

Rule (per owner and target, switch ``watch[].deduplicate``, default on): a job
whose files — relative paths, sizes and SHA-256 — are exactly those of an
earlier *succeeded* job of the same owner, into the same target, is a
duplicate. It ends ``succeeded`` with ``result.duplicate_of`` = that job's id
and a short mail, and nothing is imported twice (with OMERO: no image twice).
While such an earlier job is still queued, running or waiting for a retry, the
later one waits for it (released, its attempt not counted) and decides then.

Checksums come from the manifest when it lists them, otherwise they are
computed, but only when an earlier job already matches on owner, target, group,
paths and sizes (the cheap test first), so an ordinary new acquisition is never
read twice. The earlier job's checksums come from its manifest or from its result
(the archive importer records each file's SHA-256): it recorded them as its
content key when it succeeded. An earlier job without known checksums is never
called a duplicate: better imported twice than lost.

Every look-up is exact and indexed (the store's ``shape_key`` and ``content_key``
columns, :func:`watchfolder.job.shape_key` and :func:`~watchfolder.job.content_key`):
a copy of an acquisition imported any number of jobs ago is found as surely as
one of the last job. A *renamed* imported acquisition (the same files: device,
inode, size and modification time as one of the newest ``RECENT_ALIKE`` earlier
successes of that shape) is its duplicate without reading its files again.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from typing import Any

from ..config import Config
from ..job import Job, JobState, content_key, imported_content_key, known_digests

#: Earlier successes of the same shape whose files' identities are compared (the rename test).
RECENT_ALIKE = 20
#: Earlier identical jobs still unfinished that are compared (each may cost reading its files).
RECENT_UNFINISHED = 20
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRY_WAIT.value)


def _same_inodes(job: Job, other: Job) -> bool:
    """Both jobs list the very same files (device, inode, size, mtime recorded when queued): a rename."""
    mine, theirs = job.spec.file_identities(), other.spec.file_identities()
    if not mine or not theirs or len(mine) != len(job.spec.files):
        return False
    norm = {unicodedata.normalize("NFC", p): ident for p, ident in theirs.items()}
    return all(norm.get(unicodedata.normalize("NFC", p)) == ident for p, ident in mine.items())


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


def find_duplicate(job: Job, *, config: Config, store: Any) -> Job | None:
    """The earlier job with exactly this job's content (owner, target, files), or None.

    A succeeded one makes this job a duplicate. An unfinished one (queued, running,
    waiting for a retry; an older job, so two identical jobs never wait on each other)
    is returned too: the caller waits for it to end before deciding -- if it succeeds
    this job is its duplicate, if it fails this job imports. Its checksums come from
    its manifest, or are computed from its source files.
    """
    spec = job.spec
    watch_name = spec.extra.get("watch")
    if not watch_name or not spec.files:
        return None
    watch = next((w for w in config.watch if w.name == watch_name), None)
    if watch is None or not watch.deduplicate:
        return None
    alike = store.alike(spec, states=(JobState.SUCCEEDED.value,), limit=RECENT_ALIKE)
    succeeded = [j for j in alike if j.id != job.id and not (j.result or {}).get("duplicate_of")]
    for other in succeeded:
        if _same_inodes(job, other) and imported_content_key(other.spec, other.result) is not None:
            return other  # renamed since: the files it imported, unchanged
    unfinished = store.alike(spec, states=UNFINISHED, before=job.id, limit=RECENT_UNFINISHED)
    if not alike and not unfinished:
        return None  # nothing of these names and sizes: an ordinary new acquisition, never read twice
    mine: dict[str, str] = {}
    try:
        for f in spec.files:
            mine[unicodedata.normalize("NFC", f.path)] = f.sha256 or _sha256(os.path.join(spec.root, f.path))
    except OSError:
        return None  # unreadable now: the import says why
    key = content_key(spec, mine)
    if alike and key is not None:
        earlier = store.imported_as(key)  # any age: an index seek
        if earlier is not None and earlier.id != job.id:
            return earlier
    for other in unfinished:
        theirs = known_digests(other.spec, other.result)
        if len(theirs) < len(other.spec.files):  # no checksums listed: read its files, stopping at the first difference
            if _same_files(other, mine):
                return other
        elif content_key(other.spec, theirs) == key:
            return other
    return None


def _same_files(other: Job, mine: dict[str, str]) -> bool:
    """True when each of ``other``'s source files has the SHA-256 in ``mine`` (read one by one)."""
    for f in other.spec.files:
        try:
            digest = f.sha256 or _sha256(os.path.join(other.spec.root, f.path))
        except OSError:
            return False  # its files are gone: it fails, and this job imports
        if digest != mine.get(unicodedata.normalize("NFC", f.path)):
            return False
    return True
