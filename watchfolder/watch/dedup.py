"""Content de-duplication: the same data under another name is not imported again.

Rule (per owner and target, switch ``watch[].deduplicate``, default on): a job
whose files — relative paths, sizes and SHA-256 — are exactly those of an
earlier *succeeded* job of the same owner, into the same target, is a
duplicate. It ends ``succeeded`` with ``result.duplicate_of`` = that job's id
and a short mail, and nothing is imported twice (with OMERO: no image twice).
While such an earlier job is still queued, running or waiting for a retry, the
later one waits for it (released, its attempt not counted) and decides then.

Checksums come from the manifest when it lists them, otherwise they are
computed, but only when a candidate earlier job already matches on paths and
sizes (the cheap test first), so an ordinary new acquisition is never read
twice. The earlier job's checksums come from its manifest or from its result
(the archive importer records each file's SHA-256). An earlier job without
known checksums is never called a duplicate: better imported twice than lost.
Only the owner's most recent ``RECENT_JOBS`` successes are compared.
"""

from __future__ import annotations

import hashlib
import os
import unicodedata
from typing import Any

from ..config import Config
from ..job import Job, JobState

RECENT_JOBS = 200
RECENT_UNFINISHED = 20
UNFINISHED = (JobState.QUEUED.value, JobState.RUNNING.value, JobState.RETRY_WAIT.value)


def _shape(job: Job) -> list[tuple[str, int | None]]:
    return sorted((unicodedata.normalize("NFC", f.path), f.size) for f in job.spec.files)


def _known_digests(job: Job) -> dict[str, str] | None:
    """Path -> sha256 of an earlier job's files, from its spec or its result; None when any is unknown."""
    digests = {unicodedata.normalize("NFC", f.path): f.sha256 for f in job.spec.files if f.sha256}
    for entry in (job.result or {}).get("files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("path"), str):
            digests.setdefault(unicodedata.normalize("NFC", entry["path"]), entry["sha256"])
    if len(digests) < len(job.spec.files):
        return None
    return digests


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
    shape = _shape(job)
    total = spec.total_bytes()
    earlier = store.recent_successes_like(spec, recent=RECENT_JOBS)
    # Older identical jobs still queued or running: the newest few of the same shape (in a burst of
    # same-shaped acquisitions each such comparison may read a file of the other job).
    unfinished = [j for j in store.recent_like(spec, recent=RECENT_JOBS, states=UNFINISHED)
                  if j.id < job.id][:RECENT_UNFINISHED]
    mine: dict[str, str] | None = None
    for other in [*earlier, *unfinished]:
        if other.id == job.id or other.spec.target != spec.target or (other.spec.group or None) != (spec.group or None):
            continue
        if len(other.spec.files) != len(spec.files) or other.spec.total_bytes() != total:
            continue
        if (other.result or {}).get("duplicate_of") or _shape(other) != shape:
            continue
        theirs = _known_digests(other)
        if theirs is None and other.state.finished:
            continue
        if mine is None:
            mine = {}
            try:
                for f in spec.files:
                    mine[unicodedata.normalize("NFC", f.path)] = f.sha256 or _sha256(os.path.join(spec.root, f.path))
            except OSError:
                return None  # unreadable now: the import says why
        if theirs is None:  # not finished, no checksums listed: read its files, stopping at the first difference
            if _same_files(other, mine):
                return other
        elif mine == theirs:
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
