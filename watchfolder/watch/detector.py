"""Completion detection: which paths form an acquisition, and when one is complete.

A :class:`Detector` keeps one :class:`Candidate` per acquisition it has seen under
a watch folder (a folder for the ``manifest`` and ``layout`` modes, a data file
for ``sidecar``). Observers (events, polling, rescans) report what they saw; the
detector restarts the candidate's quiet period on every change, and once a
candidate has been quiet, checks the detection rule and returns an
:class:`Outcome`: a job spec to queue, bad input to reject, or nothing to do.

Proven completeness: when the descriptor lists every file with its size and
sha256 (a manifest, or a sidecar for its data file) and all of them are there
and match, the acquisition is complete whatever the clock says, so it is queued
at once (:data:`PROOF_DELAY` after the change that completed it, to let a burst
of events settle) instead of after the quiet period. Anything short of that
proof (a file missing, a size or checksum not matching yet, a manifest still
being written, no checksums, a layout rule) waits for the quiet period as
before; failed proofs are retried after changes, backing off up to the quiet
period, so a big file being written is not hashed over and over.

Nothing here touches the job store; the watcher applies outcomes. Time is always
passed in (``now``), so tests drive it.
"""

from __future__ import annotations

import bisect
import dataclasses
import fnmatch
import hashlib
import heapq
import json
import logging
import operator
import os
import pwd
import re
import stat
import time
import unicodedata
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import defaults as D
from .. import multifile, safefs
from ..config import WatchConfig
from ..errors import AcquisitionError, classify_os_error
from ..filenames import beside, beside_str, fit_name
from ..job import FileEntry, JobSpec, JobState, Target, printable, storable
from ..store.base import PendingEntry
from . import acquisition as acq

log = logging.getLogger(__name__)


def _os_reason(exc: OSError, path: Any) -> str:
    """An OS error on ``path`` in words, with what to do (the errno classes of ``classify_os_error``)."""
    return classify_os_error(exc, printable(os.fsdecode(path) if isinstance(path, bytes) else str(path)),
                             "read").message

# Files the watcher itself writes beside acquisitions; never part of one.
RECEIPT_SUFFIX = ".watchfolder-receipt.json"
RECEIPT_MAX_BYTES = 1024 * 1024  # a receipt is a few hundred bytes; anything bigger is not ours
ERROR_SUFFIX = ".watchfolder-error.txt"
# Finished jobs of a watch folder read at start (newest first), and by explain: failed ones to
# know which acquisitions an earlier run handled without a marker beside them (an older one is
# listed for one quiet period, until its first look finds its job); succeeded ones to know a
# kept acquisition whose receipt was deleted.
FINISHED_AT_START = 1000
OWN_MARKERS = (".watchfolder-receipt.json", ".watchfolder-error.txt")

# How often a candidate waiting for missing files is looked at again when no
# event arrives (events mode); polling looks at every tick anyway.
WAIT_RECHECK_SECONDS = 30.0
# Proven completeness: first look this long after a change (a burst of events
# settles), failed proofs retried no sooner than PROOF_RETRY, doubling up to the
# quiet period.
PROOF_DELAY = 0.05
PROOF_RETRY = 0.1
# Left-out paths kept in a job (the log line says how many in all).
MAX_LEFT_OUT = 200
# Skipped paths remembered for the pending list (a drop folder full of dot-folders stays bounded).
MAX_SKIPPED = 1000
# Polling: pending candidates re-looked at per tick (the longest unobserved first),
# so a backlog of thousands in their quiet period does not make every tick read
# them all. Each one is still looked at when its quiet period ends (a change seen
# then restarts it, dated by the newest mtime), so this only bounds how early an
# in-place append is noticed.
RECHECK_PER_TICK = 500
# Polling: files of settled candidates (queued, imported and kept, rejected) re-looked at
# per tick, in turn. No folder mtime shows a file rewritten in place (same inode) or a
# manifest rewritten: this is how polling sees what inotify reports, at a bounded cost
# (a 100,000-file tree of kept acquisitions is gone through once every 200 ticks).
SETTLED_FILES_PER_TICK = 500
# Outcomes per detector step: bounds memory (each holds a job spec) when
# thousands of acquisitions become due at once, and lets events in between.
OUTCOME_BATCH = 200


def is_own_file(name: str) -> bool:
    """True for receipts and error reports (and their temporary files)."""
    # Both markers share ".watchfolder-": one substring test rejects every other name.
    return ".watchfolder-" in name and any(marker in name for marker in OWN_MARKERS)


def own_name_folder_reason(name: str) -> str:
    """Why a real folder named like a receipt or error report is not imported (pending, explain)."""
    return (f"ignored: a folder named like watchfolder's own receipts and error reports "
            f"(*{RECEIPT_SUFFIX}, *{ERROR_SUFFIX}) is never imported, and it takes the place of the "
            f"receipt of {printable(name.split('.watchfolder-', 1)[0])}; rename the folder")


def _enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Snapshot:
    """What a candidate looked like at one moment: a digest of names, sizes and mtimes."""

    digest: bytes
    max_mtime: float  # newest mtime seen (files and folders), seconds
    dirs: tuple[tuple[str, int], ...] = ()  # (relative folder, mtime_ns), for the polling index
    files: int = 0
    denied: str | None = None  # why the top folder could not be listed (permission), else None
    # Newest ctime seen (ns), the file server's clock: not in the digest (a change of it alone is
    # not a change of the data), but any write moves it on, also one that keeps size and mtime
    # (robocopy /Z fills a file made at its final size and keeps setting its mtime back).
    max_ctime_ns: int = 0


class Patterns:
    """Include/exclude patterns of a watch folder, pre-split for speed."""

    def __init__(self, include: Iterable[str], exclude: Iterable[str]):
        self.include = tuple(include)
        self.exclude = tuple(exclude)
        # Plain names and simple "*.ext"/"prefix*" patterns are matched without fnmatch.
        self._exact = {p for p in self.exclude if not any(c in p for c in "*?[")}
        self._regex = re.compile("|".join(fnmatch.translate(p) for p in self.exclude)) if self.exclude else None

    def name_excluded(self, name: str) -> bool:
        """True when a single name (file or folder) is excluded."""
        if is_own_file(name):
            return True
        if name in self._exact:
            return True
        return bool(self._regex and self._regex.match(name))

    def path_excluded(self, relpath: str) -> str | None:
        """The pattern that excludes a path relative to the watch folder (any of its components), or None.

        The one decision for where an acquisition may be: the start-up scan, polling
        and events all ask it, so a folder moved in as ``acq1.tmp/`` or
        ``.incoming/acq2/`` is never an acquisition until it is renamed. Inside a known
        container format (``plate.ome.zarr/``) nothing is excluded: only the components
        up to the container count (:func:`~watchfolder.watch.acquisition.container_depth`).
        """
        parts = relpath.split("/")
        depth = acq.container_depth(parts)
        for part in parts if depth is None else parts[:depth]:
            if not part:
                continue
            if is_own_file(part):
                return "a file watchfolder writes"
            if part in self._exact:
                return part
            if self._regex and self._regex.match(part):
                return next((p for p in self.exclude if fnmatch.fnmatchcase(part, p)), "exclude")
        return None

    def parent_excluded(self, relpath: str) -> bool:
        """True when a folder above ``relpath`` is excluded (never entered), up to a known container."""
        parts = relpath.split("/")[:-1]
        depth = acq.container_depth(parts + [""])
        return any(self.name_excluded(part) for part in (parts if depth is None else parts[:depth]))

    def file_excluded(self, relpath: str) -> bool:
        """True when a file (relative path) is not part of acquisitions."""
        if is_own_file(relpath.rsplit("/", 1)[-1]):
            return True
        return acq.is_excluded(relpath, self.exclude, self.include)


_BY_NAME = operator.attrgetter("name")


def snapshot_folder(
    path: str, patterns: Patterns, rel: str = "", *, entries: list[os.DirEntry] | None = None
) -> Snapshot | None:
    """Walk a folder and digest every entry's name, size and mtime (None if it is gone).

    Excluded *files* count (a ``.part`` being written is activity) but excluded
    folders are not entered (``.snapshot`` on a NAS can be huge). Symlinks are not
    followed. ``rel`` prefixes the folder paths returned for the polling index;
    ``entries`` is the top folder's listing when the caller has it already.
    """
    try:
        top = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    if not stat.S_ISDIR(top.st_mode):
        return None
    digest = hashlib.blake2b(digest_size=16)
    max_ns = top.st_mtime_ns
    max_ctime = top.st_ctime_ns
    dirs = [(rel, top.st_mtime_ns)]
    files = 0
    denied = None
    stack = [(path, "")]
    while stack:
        folder, sub = stack.pop()
        try:
            if entries is not None:
                listing, entries = sorted(entries, key=_BY_NAME), None
            else:
                with os.scandir(folder) as it:
                    listing = sorted(it, key=_BY_NAME)
        except (FileNotFoundError, NotADirectoryError):
            if not sub:
                return None
            continue
        except PermissionError as exc:
            digest.update(b"?" + _enc(sub) + b"\n")
            if not sub:
                denied = _os_reason(exc, folder)
            continue
        subdirs = []
        parts = []  # digested once per folder: one update call instead of one per file
        prefix = sub + "/" if sub else ""
        for entry in listing:
            name = entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                if is_dir and patterns.name_excluded(name):
                    continue
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            mtime = st.st_mtime_ns
            if mtime > max_ns:
                max_ns = mtime
            if st.st_ctime_ns > max_ctime:
                max_ctime = st.st_ctime_ns
            if is_dir:
                child = prefix + name
                parts.append(f"D{child}\0{mtime}")
                dirs.append((f"{rel}/{child}" if rel else child, mtime))
                subdirs.append((entry.path, child))
            elif ".watchfolder-" in name and is_own_file(name):
                continue
            else:
                files += 1
                parts.append(f"F{prefix}{name}\0{st.st_size}\0{mtime}")
        if parts:
            parts.append("")
            digest.update("\n".join(parts).encode("utf-8", "surrogateescape"))
        stack.extend(reversed(subdirs))
    return Snapshot(digest.digest(), max_ns / 1e9, tuple(dirs), files, denied, max_ctime)


def snapshot_files(paths: Iterable[str]) -> Snapshot | None:
    """Digest of a few named files (a data file and its sidecar); missing ones count as missing."""
    digest = hashlib.blake2b(digest_size=16)
    max_ns = max_ctime = 0
    present = 0
    for path in paths:
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            digest.update(b"-\n")
            continue
        present += 1
        max_ns = max(max_ns, st.st_mtime_ns)
        max_ctime = max(max_ctime, st.st_ctime_ns)
        digest.update(b"F%d\0%d\0%d\n" % (st.st_mode, st.st_size, st.st_mtime_ns))
    if not present:
        return None
    return Snapshot(digest.digest(), max_ns / 1e9, (), present, max_ctime_ns=max_ctime)


# ---------------------------------------------------------------------------
# Outcomes


@dataclass
class Outcome:
    """What to do about a candidate that has been quiet.

    ``kind``: ``enqueue`` (spec), ``reject`` (spec + reason), ``wait`` (reason; not
    complete yet), ``ignore`` (note; e.g. a JSON that is data, not a sidecar),
    ``gone`` (the acquisition disappeared), or ``changed`` (a ``wait`` of an
    acquisition imported before: changed in place after its import, to be noted).
    """

    kind: str
    rel: str
    spec: JobSpec | None = None
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    why: str = ""  # a ``wait``'s pending kind: waiting (files), size, sidecar, empty
    proven: bool = False  # an enqueue whose completeness the descriptor's sizes and sha256 proved
    # A ``wait``'s spec with the files detection saw (listed, sizes found): what the failed job
    # shows when the wait ends on missing_timeout (it showed "0 file(s), 0 B").
    seen: JobSpec | None = None


@dataclass
class Candidate:
    rel: str
    first_seen: float
    last_change: float
    digest: bytes | None = None  # last observed snapshot; None: unknown since the last event
    observed_at: float = 0.0
    done_digest: bytes | None = None  # snapshot at the last outcome (job queued, rejected, ignored)
    waiting: str = ""  # why a quiet candidate is not complete yet
    job_id: int | None = None  # the job queued for it last
    waiting_kind: str = ""  # the pending kind of ``waiting`` (see :func:`pending_reason`)
    owner: str | None = None  # the owner named so far (from the last look at the descriptor)
    owner_at: float | None = None  # ``last_change`` when the owner was last looked up
    next_check: float = 0.0
    seen_generation: int = 0
    peak_files: int = 0  # most files seen at once (sidecar: 2 once the data file was there)
    proof_at: float | None = None  # when to try proving completeness before the quiet period ends
    proof_after: float = 0.0  # no proof attempt before (backoff after failed ones)
    proof_backoff: float = 0.0
    ctime_ns: int = 0  # the newest ctime at the last look (Snapshot.max_ctime_ns)
    # Found at start with a receipt or error report beside it, or exactly as a finished job
    # recorded it, and not pending before: handled by an earlier run. Not listed as pending
    # until its first look says otherwise.
    handled_before: bool = False

    @property
    def pending(self) -> bool:
        return self.done_digest is None or self.digest != self.done_digest

    def written_since(self, snap: Snapshot) -> bool:
        """Written to since the last look although names, sizes and mtimes are the same: a newer
        ctime (a file filled in place at its final size, its mtime set back after each write)."""
        return bool(self.ctime_ns) and snap.max_ctime_ns > self.ctime_ns and snap.digest == self.digest


# ---------------------------------------------------------------------------
# Rules: how paths map to acquisitions, and what makes one complete


class Rule:
    """One detection mode. Paths are relative to the watch root, ``/``-separated."""

    unit = "folder"
    #: Can a descriptor prove completeness (sizes and checksums)? Layout rules have none.
    can_prove = True

    def __init__(self, watch: WatchConfig, patterns: Patterns):
        self.watch = watch
        self.patterns = patterns

    def folder_is_candidate(self, rel_dir: str, names: set[str]) -> bool:
        """Is this folder (listed with ``names``) an acquisition?"""
        return False

    def file_candidates(self, rel_dir: str, names: set[str]) -> list[str]:
        """Acquisitions that are files in this folder (sidecar mode)."""
        return []

    def stray_sidecars(self, root: str, rel_dir: str, names: set[str]) -> list[tuple[str, str]]:
        """Pairs in this folder that look like acquisitions this rule does not take, with why."""
        return []

    def descend(self, rel_dir: str) -> bool:
        """Can acquisitions be found below this folder?"""
        return True

    def strays(self, root: str, rel_dir: str, entries: list[os.DirEntry]) -> list[tuple[str, str, str]]:
        """Data in a listed folder that sits where this rule expects an acquisition (or inside its
        structure) and that it will not import: ``(rel, pending kind, reason with the fix)``, each
        listed as pending once when seen (see :meth:`misplaced`)."""
        return []

    def misplaced(self, root: str, rel: str, is_dir: bool) -> tuple[str, str, str] | None:
        """The note :meth:`strays` makes for ``rel`` (``rel`` itself or the folder it is part of),
        looked up on the disk for one path (``explain``, an event); None when there is none."""
        return None

    @property
    def reads_descriptors(self) -> bool:
        """Does this watch folder read manifests or sidecars (not a layout rule)?"""
        return self.watch.detection in ("manifest", "sidecar")

    def near_misses(self, rel_dir: str, names: Collection[str]) -> list[tuple[str, str, str]]:
        """Descriptors a letter case or suffix away from the names this watch folder reads
        (``WATCHFOLDER.JSON``, ``cells.czi.JSON``), which would be ignored without a word:
        ``(rel, "not_acquisition", reason with the fix)``. Windows shares and instruments do
        not care about case; this server does."""
        if not self.reads_descriptors:
            return []
        watch = self.watch
        manifests = watch.detection == "manifest"
        sidecars = watch.detection == "sidecar" or (manifests and watch.sidecars)
        out = []
        lower = {n.lower(): n for n in names}
        for name in names:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            low = name.lower()
            if low == watch.manifest_name.lower():
                if manifests and name != watch.manifest_name and watch.manifest_name not in names:
                    out.append((rel, "not_acquisition", (
                        f"not read as a manifest: a manifest must be named exactly {watch.manifest_name} "
                        f"(letter case counts here); rename {printable(name)} to {watch.manifest_name}")))
                continue
            suffix = watch.sidecar_suffix
            if sidecars and low.endswith(suffix.lower()) and not name.endswith(suffix) and len(name) > len(suffix):
                data = name[: -len(suffix)]
                if data.lower() in lower:
                    out.append((rel, "not_acquisition", (
                        f"not read as a sidecar: a sidecar is named exactly after its data file plus {suffix} "
                        f"(letter case counts here); rename it {printable(lower[data.lower()])}{suffix}")))
        return out

    def candidate_for(self, rel_path: str, known: dict[str, Candidate], is_dir: bool) -> str | None:
        """The acquisition a changed path belongs to (known or about to be), or None."""
        raise NotImplementedError

    def snapshot(self, root: str, rel: str, entries: list[os.DirEntry] | None = None) -> Snapshot | None:
        return snapshot_folder(os.path.join(root, rel), self.patterns, rel, entries=entries)

    def acquisition_of(self, root: str, rel: str, is_dir: bool) -> str | None:
        """The acquisition any path ``rel`` belongs to under this rule, looking at the disk (explain)."""
        return self.candidate_for(rel, {}, True) if rel else None

    def present(self, root: str, rel: str) -> int | None:
        """How many of a one-file acquisition's files (data file, sidecar) are there now, by two
        ``lstat`` calls; None for folder acquisitions (too costly to count on every event)."""
        return None

    def build(self, root: str, rel: str, now: float) -> Outcome:
        raise NotImplementedError

    def descriptor_path(self, root: str, rel: str) -> str | None:
        """The manifest or sidecar that would describe ``rel`` (an acquisition or a skipped path),
        whether or not it exists yet; None when the owner comes from elsewhere (the layout)."""
        full = os.path.join(root, rel)
        if os.path.isdir(full):
            return os.path.join(full, self.watch.manifest_name)
        return full + self.watch.sidecar_suffix

    def path_owner(self, rel: str) -> str | None:
        """The owner the path itself names (layout mode), else None."""
        return None


def stray_sidecar_reason(watch: WatchConfig, data: str) -> str:
    """Why a sidecar pair in a manifests-only watch folder is not imported, and the fix."""
    return (f"not an acquisition here: {data} + {data}{watch.sidecar_suffix} is a sidecar pair, but watch folder "
            f"{watch.name!r} takes {watch.manifest_name} manifests only (sidecars: false); set sidecars: true "
            f"on the watch folder, or put the data in a folder with a {watch.manifest_name} manifest")


def _ancestor_candidate(rel_path: str, known: dict[str, Candidate]) -> str | None:
    path = rel_path
    while path:
        if path in known:
            return path
        path = path.rpartition("/")[0]
    return None


class ManifestRule(Rule):
    """A folder holding the manifest (``watchfolder.json``) below the watch root."""

    def folder_is_candidate(self, rel_dir: str, names: set[str]) -> bool:
        return bool(rel_dir) and self.watch.manifest_name in names

    def candidate_for(self, rel_path: str, known: dict[str, Candidate], is_dir: bool) -> str | None:
        found = _ancestor_candidate(rel_path, known)
        if found is not None:
            return found
        head, _, name = rel_path.rpartition("/")
        if name == self.watch.manifest_name and head and not is_dir:
            return head
        return None

    def stray_sidecars(self, root: str, rel_dir: str, names: set[str]) -> list[tuple[str, str]]:
        """Sidecar pairs in a manifests-only folder (``sidecars: false``): ``(data rel, reason)``.

        Not imported, but never ignored without a trace: listed as pending with the fix.
        A JSON file with none of the contract's keys is the instrument's data, not a sidecar.
        """
        if self.watch.sidecars:
            return []
        suffix = self.watch.sidecar_suffix
        out = []
        for name in names:
            if not name.endswith(suffix) or len(name) <= len(suffix) or is_own_file(name):
                continue
            data = name[: -len(suffix)]
            if data not in names or self.patterns.name_excluded(data):
                continue
            try:
                acq.read_descriptor(Path(root, rel_dir, name))
            except acq.NotADescriptor:
                continue
            except (AcquisitionError, OSError):
                pass  # invalid, yet meant as a sidecar
            out.append((f"{rel_dir}/{data}" if rel_dir else data, stray_sidecar_reason(self.watch, data)))
        return out

    def acquisition_of(self, root: str, rel: str, is_dir: bool) -> str | None:
        head = rel if is_dir else rel.rpartition("/")[0]
        while head:
            if os.path.isfile(os.path.join(root, head, self.watch.manifest_name)):
                return head
            head = head.rpartition("/")[0]
        return None

    def build(self, root: str, rel: str, now: float) -> Outcome:
        left_out: list[str] = []
        folder = Path(root, rel)
        manifest = folder / self.watch.manifest_name
        if not folder.is_dir():
            return Outcome("gone", rel)
        if not os.path.lexists(manifest):  # a symlink is rejected below with its reason, never read
            return Outcome("gone", rel, reason=f"{self.watch.manifest_name} was removed")
        base = _base_spec(self.watch, folder, rel)
        try:
            descriptor = acq.read_descriptor(manifest, what="manifest", within=root,
                                             allow_hard_links=self.watch.allow_hard_links)
        except acq.NotADescriptor as exc:
            return Outcome("reject", rel, spec=base, reason=f"{exc}; a manifest must name at least the owner")
        except AcquisitionError as exc:
            return Outcome("reject", rel, spec=_salvaged(base, manifest), reason=str(exc))
        base = _apply_descriptor(base, descriptor)
        try:
            if descriptor.files is not None:
                check = acq.check_listed(folder, descriptor.files)
                seen = _as_seen(base, descriptor.files, check)
                if check.special:
                    return Outcome("reject", rel, spec=seen, reason=acq.special_reason(check.special, "manifest"))
                if check.folders:
                    return Outcome("reject", rel, spec=seen, reason=acq.folders_reason(check.folders, "manifest"))
                too_big = oversize_reason(check.sizes, "manifest")
                if too_big:
                    return Outcome("reject", rel, spec=seen, reason=too_big)
                sized = {e.path for e in descriptor.files if e.size is not None}
                if check.missing:
                    # A file already complete (its listed size) whose checksum differs will not
                    # change by waiting for the others: refused now (hashes are cached per file state).
                    bad = _checksums(folder, [e for e, _ in check.present if e.path in sized])
                    if bad:
                        return Outcome("reject", rel, spec=seen, reason=checksum_reason(bad, "manifest"))
                    why, reason = listed_reason(check, len(descriptor.files), "manifest")
                    return Outcome("wait", rel, spec=base, reason=reason, why=why, seen=seen)
                found = check.present
                bad = _checksums(folder, [e for e, _ in found])
                if any(p in sized for p in bad):
                    # Complete (every listed size matches) yet different: waiting cannot fix it.
                    return Outcome("reject", rel, spec=seen, reason=checksum_reason(bad, "manifest"))
                if bad:  # no size listed: the file may still be growing
                    return Outcome("wait", rel, spec=base, why="checksum",
                                   reason=checksum_reason(bad, "manifest").split(":")[0] + " yet")
                proven = bool(found) and all(e.size is not None and e.sha256 for e in descriptor.files)
                # What the list leaves out is not imported: said in the job log and the owner's mail.
                left_out = acq.unlisted_files(folder, descriptor.files, skip={self.watch.manifest_name})
            else:
                found = [
                    (FileEntry(r, st.st_size), st)
                    for r, st in acq.walk_files(
                        folder, exclude=self.patterns.exclude, include=self.patterns.include,
                        skip={self.watch.manifest_name}, left_out=left_out,
                    )
                    if not is_own_file(r.rsplit("/", 1)[-1])
                ]
                copying = copies_in_progress(left_out)
                if copying:
                    return Outcome("wait", rel, spec=base, why="copying", reason=copying_reason(copying))
                if not found:
                    held = (f" (it holds only what is never imported: "
                            f"{acq.listed_names([printable(x) for x in left_out], 5)})") if left_out else ""
                    return Outcome(
                        "reject", rel, spec=base,
                        reason=f"{folder}: the manifest lists no files and the folder holds none to import{held}",
                    )
                proven = False
        except AcquisitionError as exc:
            return Outcome("reject", rel, spec=base, reason=str(exc))
        except OSError as exc:  # a listed file unreadable: the owner still hears about it
            raise _with_known(exc, dataclasses.replace(base, files=tuple(descriptor.files or ()))) from None
        return _finish(self.watch, base, descriptor, found, rel, "folder", warnings=list(descriptor.warnings),
                       proven=proven, left_out=left_out)


class SidecarRule(Rule):
    """A data file with ``<data file><suffix>`` beside it."""

    unit = "file"

    def _manifest_here(self, name: str) -> bool:
        # A manifest in a sidecar-only watch folder is a manifest, never the sidecar of a file "watchfolder".
        return self.watch.detection == "sidecar" and name == self.watch.manifest_name

    def _manifest_folder_reason(self, rel_dir: str) -> str:
        where = rel_dir + "/" if rel_dir else "the watch folder itself"
        return (f"not an acquisition here: {where} holds a {self.watch.manifest_name} manifest, but watch folder "
                f"{self.watch.name!r} takes sidecar pairs only (detection: sidecar), so the manifest is not read; "
                f"drop the folder into a manifest watch folder, or give each data file a "
                f"<file>{self.watch.sidecar_suffix} sidecar")

    def strays(self, root: str, rel_dir: str, entries: list[os.DirEntry]) -> list[tuple[str, str, str]]:
        if not any(self._manifest_here(e.name) for e in entries):
            return []
        rel = rel_dir or self.watch.manifest_name
        return [(rel, "not_acquisition", self._manifest_folder_reason(rel_dir))]

    def misplaced(self, root: str, rel: str, is_dir: bool) -> tuple[str, str, str] | None:
        folder = rel if is_dir else rel.rpartition("/")[0]
        if self.watch.detection != "sidecar" or not os.path.isfile(
                os.path.join(root, folder, self.watch.manifest_name)):
            return None
        return (folder or self.watch.manifest_name, "not_acquisition", self._manifest_folder_reason(folder))

    def file_candidates(self, rel_dir: str, names: set[str]) -> list[str]:
        suffix = self.watch.sidecar_suffix
        out = []
        for name in names:
            if self._manifest_here(name):
                continue
            if name.endswith(suffix) and len(name) > len(suffix) and not is_own_file(name):
                data = name[: -len(suffix)]
                if self.patterns.name_excluded(data):
                    continue
                out.append(f"{rel_dir}/{data}" if rel_dir else data)
        return out

    def candidate_for(self, rel_path: str, known: dict[str, Candidate], is_dir: bool) -> str | None:
        if rel_path in known and not is_dir:
            return rel_path
        main = self._main_of(rel_path, is_dir, lambda m: m in known)
        if main is not None or is_dir:
            return main
        suffix = self.watch.sidecar_suffix
        name = rel_path.rpartition("/")[2]
        if name.endswith(suffix) and len(name) > len(suffix) and not is_own_file(name) \
                and not self._manifest_here(name):
            data = rel_path[: -len(suffix)]
            if not self.patterns.name_excluded(data.rpartition("/")[2]):
                return data
        return None

    def _main_of(self, rel: str, is_dir: bool, exists: Callable[[str], bool]) -> str | None:
        """The multi-file main file ``rel`` is a companion of (``img.ids`` -> ``img.ics``), by
        :mod:`watchfolder.multifile`'s rules, when ``exists`` says that main file is a pair."""
        probe = rel + "/" if is_dir else rel
        for main in multifile.mains_of(rel + "/-" if is_dir else rel):
            if multifile.is_companion(main, probe) and exists(main):
                return main
        return None

    def companions(self, root: str, rel: str) -> tuple[list[tuple[FileEntry, os.stat_result]], list[str], list[str]]:
        """The files a multi-file format's main file ``rel`` needs beside it (``scan.vsi``: every file
        under ``_scan_/``; ``x.ics``: ``x.ids``), by :mod:`watchfolder.multifile`'s rules, with paths
        relative to the data file's folder; ``(found, folders, left_out)``. Patterns do not apply
        inside a format's own companion folder (as inside a container). Raises ``AcquisitionError``
        (a link out of the folder) and ``OSError`` (the folder cannot be listed).
        """
        head, _, name = rel.rpartition("/")
        if multifile.rule_of(name) is None:
            return [], [], []
        folder = os.path.join(root, head) if head else root
        found: list[tuple[FileEntry, os.stat_result]] = []
        folders: list[str] = []
        left_out: list[str] = []
        suffix = self.watch.sidecar_suffix
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            if entry.name in (name, name + suffix) or is_own_file(entry.name):
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir and multifile.is_companion(name, entry.name + "/"):
                folders.append(entry.name)
                inside: list[str] = []
                for sub, st in acq.walk_files(Path(entry.path), exclude=(), left_out=inside):
                    found.append((FileEntry(f"{entry.name}/{sub}", st.st_size), st))
                left_out += [f"{entry.name}/{x}" for x in inside]
            elif not is_dir and multifile.is_companion(name, entry.name):
                if self.patterns.name_excluded(entry.name) or entry.is_symlink():
                    left_out.append(f"{entry.name} (" + ("a symbolic link, not followed)" if entry.is_symlink()
                                                         else "excluded)"))
                    continue
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode):
                    found.append((FileEntry(entry.name, st.st_size), st))
        return found, folders, left_out

    def snapshot(self, root: str, rel: str, entries: list[os.DirEntry] | None = None) -> Snapshot | None:
        data = os.path.join(root, rel)
        snap = snapshot_files((data, data + self.watch.sidecar_suffix))
        if snap is None or multifile.rule_of(rel.rpartition("/")[2]) is None:
            return snap
        # A multi-file format: its companions' changes are the pair's changes (quiet period included).
        try:
            found, folders, _ = self.companions(root, rel)
        except (OSError, AcquisitionError):
            return snap
        digest = hashlib.blake2b(snap.digest, digest_size=16)
        max_mtime, dirs, max_ctime = snap.max_mtime, [], snap.max_ctime_ns
        head = rel.rpartition("/")[0]
        for sub in folders:
            part = snapshot_folder(os.path.join(root, head, sub), Patterns((), ()), f"{head}/{sub}" if head else sub)
            if part is not None:
                digest.update(part.digest)
                max_mtime, dirs = max(max_mtime, part.max_mtime), dirs + list(part.dirs)
                max_ctime = max(max_ctime, part.max_ctime_ns)
        for entry, st in found:
            if "/" not in entry.path:
                digest.update(b"F%s\0%d\0%d\n" % (_enc(entry.path), st.st_size, st.st_mtime_ns))
                max_mtime = max(max_mtime, st.st_mtime_ns / 1e9)
                max_ctime = max(max_ctime, st.st_ctime_ns)
        return Snapshot(digest.digest(), max_mtime, tuple(dirs), snap.files + len(found), max_ctime_ns=max_ctime)

    def present(self, root: str, rel: str) -> int | None:
        data = os.path.join(root, rel)
        return os.path.lexists(data) + os.path.lexists(data + self.watch.sidecar_suffix)

    def acquisition_of(self, root: str, rel: str, is_dir: bool) -> str | None:
        suffix = self.watch.sidecar_suffix
        if not rel or self._manifest_here(rel.rpartition("/")[2]):
            return None
        if is_dir:
            return self._main_of(rel, is_dir, lambda m: os.path.lexists(os.path.join(root, m + suffix)))
        if rel.endswith(suffix) and len(rel.rpartition("/")[2]) > len(suffix):
            return rel[: -len(suffix)]
        if os.path.lexists(os.path.join(root, rel + suffix)):
            return rel
        # A multi-file format's companion (img.ids, _slide_/stack1/f.ets): part of its main file's pair.
        return self._main_of(rel, is_dir, lambda m: os.path.lexists(os.path.join(root, m + suffix)))

    def build(self, root: str, rel: str, now: float) -> Outcome:
        data = Path(root, rel)
        sidecar = Path(str(data) + self.watch.sidecar_suffix)
        if not os.path.lexists(sidecar):  # a symlink is rejected below with its reason, never read
            return Outcome("gone", rel)
        base = _base_spec(self.watch, data.parent, rel, files=(FileEntry(data.name),))
        try:
            descriptor = acq.read_descriptor(sidecar, what="sidecar", within=root,
                                             allow_hard_links=self.watch.allow_hard_links)
        except acq.NotADescriptor:
            return Outcome("ignore", rel, reason=(
                f"not an acquisition: {sidecar.name} beside {data.name} has none of the keys "
                f"{', '.join(acq.CONTRACT_KEYS)}, so it is the instrument's data, not a sidecar, and "
                f"{data.name} is not imported; to import the pair, write at least \"owner\" and \"target\" "
                f"into {sidecar.name}"))
        except AcquisitionError as exc:
            return Outcome("reject", rel, spec=_salvaged(base, sidecar), reason=str(exc))
        base = _apply_descriptor(base, descriptor)
        try:
            return self._build_data(root, rel, data, base, descriptor)
        except OSError as exc:  # the data file unreadable: the owner the sidecar names still hears about it
            raise _with_known(exc, base) from None

    def _build_data(self, root: str, rel: str, data: Path, base: JobSpec, descriptor: acq.Descriptor) -> Outcome:
        if not os.path.lexists(data):
            reason = f"sidecar names data file {data.name}, which is missing"
            try:
                other = next((n for n in os.listdir(data.parent) if n != data.name and n.lower() == data.name.lower()),
                             None)
            except OSError:
                other = None
            if other is not None:  # IMG2.CZI beside img2.czi.json: one rename away
                reason += (f" ({printable(other)} is there: names must match exactly, letter case included; rename "
                           f"one of the two)")
            return Outcome("wait", rel, spec=base, why="sidecar", reason=reason)
        real_root = os.path.realpath(data.parent)
        real = os.path.realpath(data)
        if not real.startswith(real_root.rstrip("/") + "/"):
            return Outcome("reject", rel, spec=base, reason=f"{data}: symlink points outside the folder (to {real})")
        try:
            st = os.stat(data)
        except FileNotFoundError:
            return Outcome("wait", rel, spec=base, reason=f"{data.name} is a dangling symlink")
        if not stat.S_ISREG(st.st_mode):
            return Outcome("reject", rel, spec=base, reason=f"{data}: not a regular file; a sidecar describes one data file")
        entry = FileEntry(data.name, st.st_size)
        proven = False
        for listed in descriptor.files or ():
            if unicodedata.normalize("NFC", listed.path) == unicodedata.normalize("NFC", data.name):
                if listed.size is not None and listed.size < st.st_size:
                    return Outcome("reject", rel, spec=dataclasses.replace(base, files=(entry,)),
                                   reason=oversize_reason([(data.name, st.st_size, listed.size)], "sidecar"))
                if listed.size is not None and listed.size != st.st_size:
                    return Outcome("wait", rel, spec=base, why="size",
                                   reason=size_reason(data.name, st.st_size, listed.size, "sidecar"))
                entry = FileEntry(data.name, st.st_size, listed.sha256)
                proven = listed.size is not None and bool(listed.sha256)
        bad = _checksums(data.parent, [entry])
        if bad and any(f.size is not None for f in descriptor.files or () if f.path == data.name):
            return Outcome("reject", rel, spec=dataclasses.replace(base, files=(entry,)),
                           reason=checksum_reason(bad, "sidecar"))
        if bad:
            return Outcome("wait", rel, spec=base, why="checksum",
                           reason=checksum_reason(bad, "sidecar").split(":")[0] + " yet")
        try:
            companions, folders, left_out = self.companions(root, rel)
        except AcquisitionError as exc:
            return Outcome("reject", rel, spec=base, reason=str(exc))
        needed = multifile.needs(str(data.parent), data.name)
        if needed and not companions:
            return Outcome("wait", rel, spec=base, why="waiting",
                           reason=f"waiting for the companion files of {data.name}: it cannot be read without "
                                  f"{needed}; copy them beside it (the acquisition is imported with them)")
        descriptor = dataclasses.replace(descriptor, filesets=())
        return _finish(self.watch, base, descriptor, [(entry, st), *companions], rel, "file",
                       warnings=list(descriptor.warnings), proven=proven and not companions, left_out=left_out)


class LayoutRule(Rule):
    """Folders at a fixed depth whose path names the owner and dataset (``{owner}/{dataset}/``)."""

    can_prove = False

    def __init__(self, watch: WatchConfig, patterns: Patterns):
        super().__init__(watch, patterns)
        parts = [p for p in (watch.layout or "").strip("/").split("/") if p]
        self.depth = len(parts)
        self.regexes = [self._regex(p) for p in parts]

    @staticmethod
    def _regex(part: str) -> re.Pattern:
        out, pos = [], 0
        for m in re.finditer(r"{(\w+)}", part):
            out.append(re.escape(part[pos:m.start()]))
            out.append(f"(?P<{m.group(1)}>.+?)")
            pos = m.end()
        out.append(re.escape(part[pos:]))
        return re.compile("".join(out), re.DOTALL)

    def values(self, rel: str) -> dict[str, str] | None:
        parts = rel.split("/")
        if len(parts) != self.depth:
            return None
        values: dict[str, str] = {}
        for part, regex in zip(parts, self.regexes, strict=True):
            m = regex.fullmatch(part)
            if not m:
                return None
            values.update({k: unicodedata.normalize("NFC", v) for k, v in m.groupdict().items()})
        return values

    def folder_is_candidate(self, rel_dir: str, names: set[str]) -> bool:
        # What values() decides, without building the values (asked of every folder of a scan).
        if not rel_dir:
            return False
        parts = rel_dir.split("/")
        return len(parts) == self.depth and all(
            regex.fullmatch(part) is not None for part, regex in zip(parts, self.regexes, strict=True))

    def descriptor_path(self, root: str, rel: str) -> str | None:
        return None

    def path_owner(self, rel: str) -> str | None:
        """The owner named by the leading components of ``rel`` that match the layout (a path
        at, below or above an acquisition's depth: ``alice/tmpdir.tmp`` names alice)."""
        values: dict[str, str] = {}
        for part, regex in zip(rel.split("/"), self.regexes, strict=False):
            m = regex.fullmatch(part)
            if not m:
                break
            values.update(m.groupdict())
        owner = values.get("owner")
        return unicodedata.normalize("NFC", owner) if owner else None

    def descend(self, rel_dir: str) -> bool:
        return (rel_dir.count("/") + 1 if rel_dir else 0) < self.depth

    def _where(self, rel_dir: str, name: str = "") -> str:
        """``rel_dir`` completed to an acquisition folder with the layout's placeholders, plus ``name``."""
        have = rel_dir.split("/") if rel_dir else []
        parts = [p for p in (self.watch.layout or "").strip("/").split("/") if p]
        return "/".join([*have, *parts[len(have):], *([name] if name else [])])

    def _manifest_reason(self, rel_dir: str) -> str:
        up = rel_dir.rpartition("/")[0]
        return (f"misplaced: {rel_dir}/ holds a {self.watch.manifest_name} manifest, but watch folder "
                f"{self.watch.name!r} takes folders by their place in the layout {self.watch.layout} (no manifest "
                f"is read) and {rel_dir}/ is not that deep; move it to {self._where(up, '')}/ "
                f"(owner and dataset from the path), or drop it into a manifest watch folder")

    def _file_reason(self, rel: str) -> str:
        head, _, name = rel.rpartition("/")
        return (f"misplaced: {rel} is a file where the layout {self.watch.layout} of watch folder "
                f"{self.watch.name!r} expects folders (an acquisition is a folder {self.depth} level(s) deep); "
                f"move it into one, e.g. {self._where(head, name)}")

    def strays(self, root: str, rel_dir: str, entries: list[os.DirEntry]) -> list[tuple[str, str, str]]:
        if not self.descend(rel_dir):
            return []
        if rel_dir and any(e.name == self.watch.manifest_name for e in entries):
            return [(rel_dir, "misplaced", self._manifest_reason(rel_dir))]
        out = []
        for entry in entries:
            if is_own_file(entry.name) or self.patterns.name_excluded(entry.name):
                continue
            try:
                if not entry.is_file(follow_symlinks=False):
                    continue
            except OSError:
                continue
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            out.append((rel, "misplaced", self._file_reason(rel)))
        return out

    def misplaced(self, root: str, rel: str, is_dir: bool) -> tuple[str, str, str] | None:
        head = rel if is_dir else rel.rpartition("/")[0]
        if not self.descend(head) or is_own_file(rel.rpartition("/")[2]):
            return None
        if head and os.path.isfile(os.path.join(root, head, self.watch.manifest_name)):
            return head, "misplaced", self._manifest_reason(head)
        if is_dir or self.patterns.name_excluded(rel.rpartition("/")[2]):
            return None
        return rel, "misplaced", self._file_reason(rel)

    def acquisition_of(self, root: str, rel: str, is_dir: bool) -> str | None:
        return self.candidate_for(rel, {}, is_dir) if rel else None

    def candidate_for(self, rel_path: str, known: dict[str, Candidate], is_dir: bool) -> str | None:
        parts = rel_path.split("/")
        if len(parts) < self.depth or (len(parts) == self.depth and not is_dir and rel_path not in known):
            return None
        head = "/".join(parts[: self.depth])
        return head if head in known or self.values(head) is not None else None

    def build(self, root: str, rel: str, now: float) -> Outcome:
        left_out: list[str] = []
        folder = Path(root, rel)
        if not folder.is_dir():
            return Outcome("gone", rel)
        values = self.values(rel) or {}
        base = _base_spec(self.watch, folder, rel)
        owner = values.get("owner") or self.watch.owner or ""
        base = dataclasses.replace(base, owner=owner, group=values.get("group") or self.watch.group)
        try:
            target = _layout_target(self.watch.target, values)
            if target is not None:
                base = dataclasses.replace(base, target=target)
            found = [
                (FileEntry(r, st.st_size), st)
                for r, st in acq.walk_files(folder, exclude=self.patterns.exclude, include=self.patterns.include,
                                            left_out=left_out)
                if not is_own_file(r.rsplit("/", 1)[-1])
            ]
        except AcquisitionError as exc:
            return Outcome("reject", rel, spec=base, reason=str(exc))
        except OSError as exc:  # a subfolder unreadable: the owner from the path still hears about it
            raise _with_known(exc, base) from None
        copying = copies_in_progress(left_out)
        if copying:
            return Outcome("wait", rel, spec=base, why="copying", reason=copying_reason(copying))
        if not found:
            # An empty folder (or one holding only temp files) is not an acquisition yet.
            reason = "waiting for files: the folder holds none yet"
            if left_out:
                reason = (f"waiting for files: the folder holds only what is never imported "
                          f"({acq.listed_names([printable(x) for x in left_out], 5)})")
            return Outcome("wait", rel, spec=base, why="empty", reason=reason)
        if owner and ("/" in owner or any(c.isspace() for c in owner)):
            return Outcome("reject", rel, spec=base, reason=f"owner {owner!r} from the path is not a valid user name")
        return _finish(self.watch, base, acq.Descriptor(), found, rel, "folder", warnings=[], left_out=left_out)


def _layout_target(default: Target | None, values: dict[str, str]) -> Target | None:
    keys = {k: v for k, v in values.items() if k in ("project", "dataset", "screen")}
    if not keys:
        return default
    data = default.to_dict() if default else {}
    if "screen" in keys:
        data = {"screen": keys["screen"]}
    else:
        for k in ("dataset_id", "screen", "screen_id"):
            data.pop(k, None)
        data.update(keys)
    return Target.from_dict(data, where="target from the folder layout")


class DescriptorRule(ManifestRule):
    """Both descriptor kinds in one watch folder: folders with a manifest, and sidecar pairs elsewhere.

    The default of a ``manifest`` watch folder (``sidecars: true``): an instrument
    that writes ``cells_01.czi`` + ``cells_01.czi.json`` into the manifest drop
    folder is imported, not silently ignored. A sidecar-looking pair inside a
    folder that has (or gets) a manifest belongs to that manifest's acquisition.
    """

    def __init__(self, watch: WatchConfig, patterns: Patterns):
        super().__init__(watch, patterns)
        self.sidecar = SidecarRule(watch, patterns)

    def _in_manifest_folder(self, root: str, rel: str) -> bool:
        head = rel.rpartition("/")[0]
        while head:
            if os.path.isfile(os.path.join(root, head, self.watch.manifest_name)):
                return True
            head = head.rpartition("/")[0]
        return False

    def file_candidates(self, rel_dir: str, names: set[str]) -> list[str]:
        return self.sidecar.file_candidates(rel_dir, names)

    def candidate_for(self, rel_path: str, known: dict[str, Candidate], is_dir: bool) -> str | None:
        found = super().candidate_for(rel_path, known, is_dir)
        if found is not None:
            return found
        return self.sidecar.candidate_for(rel_path, known, is_dir)

    def _is_file_candidate(self, root: str, rel: str) -> bool:
        full = os.path.join(root, rel)
        return not os.path.isdir(full) and (
            os.path.lexists(full) or os.path.lexists(full + self.watch.sidecar_suffix)
        )

    def snapshot(self, root: str, rel: str, entries: list[os.DirEntry] | None = None) -> Snapshot | None:
        if self._is_file_candidate(root, rel):
            return self.sidecar.snapshot(root, rel)
        return super().snapshot(root, rel, entries)

    def present(self, root: str, rel: str) -> int | None:
        return self.sidecar.present(root, rel) if self._is_file_candidate(root, rel) else None

    def acquisition_of(self, root: str, rel: str, is_dir: bool) -> str | None:
        # As the watcher: a pair inside a manifest folder is part of it; elsewhere a sidecar pair.
        return super().acquisition_of(root, rel, is_dir) or self.sidecar.acquisition_of(root, rel, is_dir)

    def build(self, root: str, rel: str, now: float) -> Outcome:
        if not self._is_file_candidate(root, rel):
            return super().build(root, rel, now)
        if self._in_manifest_folder(root, rel):
            return Outcome("gone", rel, reason="part of a manifest folder's acquisition")
        return self.sidecar.build(root, rel, now)


def make_rule(watch: WatchConfig, patterns: Patterns) -> Rule:
    """The rule for ``watch.detection`` (``manifest`` with ``sidecars: true``: both descriptor kinds)."""
    if watch.detection == "manifest" and watch.sidecars:
        return DescriptorRule(watch, patterns)
    return {"manifest": ManifestRule, "sidecar": SidecarRule, "layout": LayoutRule}[watch.detection](watch, patterns)


# ---------------------------------------------------------------------------
# Building specs


def _as_seen(base: JobSpec, listed: Iterable[FileEntry], check: Any) -> JobSpec:
    """``base`` with the files detection saw, for a job rejected after its files were looked at
    (a size or checksum that cannot come right, a FIFO listed): the listed files in their
    order, with the size found on disk where the file is there, so the job page, ``jobs show``
    and the mail say what was dropped (a rejected job showed "0 file(s), 0 B")."""
    found = {unicodedata.normalize("NFC", e.path): e for e, _st in check.present}
    wrong = {unicodedata.normalize("NFC", path): size for path, size, _listed in check.sizes}
    files = []
    for entry in listed:
        key = unicodedata.normalize("NFC", entry.path)
        if key in found:
            files.append(found[key])
        elif key in wrong:
            files.append(FileEntry(entry.path, wrong[key], entry.sha256))
        else:
            files.append(entry)
    return dataclasses.replace(base, files=tuple(files))


def _base_spec(watch: WatchConfig, root: Path, rel: str, files: tuple[FileEntry, ...] = ()) -> JobSpec:
    """A spec with the watch folder's defaults; rejects use it when nothing better is known."""
    return JobSpec(
        owner=watch.owner or "",
        root=str(root),
        files=files,
        target=watch.target or Target(),
        source=f"watch:{watch.name}",
        group=watch.group,
        email=watch.email,
        extra={"watch": watch.name, "acquisition": rel, "detection": watch.detection},
    )


def unreadable_folder(path: str) -> str | None:
    """Why the folder ``path`` cannot be looked into (listed, and its entries examined), or None.

    None too when it is gone or not a folder: its own look says so.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return _os_reason(exc, path)
    try:
        with os.scandir(fd) as it:
            for entry in it:
                # Relative to the folder: a folder readable but not searchable (mode r--) fails
                # here, an entry whose full path is past PATH_MAX does not (that is its own note).
                os.stat(entry.name, dir_fd=fd, follow_symlinks=False)
                break
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        return _os_reason(exc, path)
    finally:
        os.close(fd)
    return None


def _with_known(exc: OSError, spec: JobSpec) -> OSError:
    """``exc`` carrying what was known when it happened (owner, target, listed files).

    A descriptor was read, then a data file could not be: the rejection keeps the
    descriptor's owner, e-mail, target and files, so the job shows them and the owner
    is mailed (outside report b12 item 5), not the admin alone.
    """
    exc.watchfolder_spec = spec  # type: ignore[attr-defined]
    return exc


def _salvaged(spec: JobSpec, path: Path) -> JobSpec:
    """A rejected descriptor's owner, email and target, where they are valid on their own.

    An invalid field elsewhere (``"files": []``) must not make the rejection mail
    read "(unknown owner)": the owner named in the file still hears about it.
    """
    try:
        value, _raw, _warnings = acq.load_json(path, within=spec.root)
    except AcquisitionError:
        return spec
    if not isinstance(value, dict):
        return spec
    changes: dict[str, Any] = {}
    for key in ("owner", "group"):
        try:
            found = acq._name_field(value, key)
        except AcquisitionError:
            found = None
        if found:
            changes[key] = found
    try:
        email = acq._email(value.get("email"))
        if email:
            changes["email"] = email
    except AcquisitionError:
        pass
    try:
        if value.get("target") is not None:
            changes["target"] = Target.from_dict(value["target"])
    except AcquisitionError:
        pass
    return dataclasses.replace(spec, **changes) if changes else spec


def _apply_descriptor(spec: JobSpec, d: acq.Descriptor) -> JobSpec:
    extra = dict(spec.extra)
    if d.path is not None:
        extra["descriptor"] = os.path.relpath(d.path, spec.root)
        extra["descriptor_sha256"] = d.raw_bytes_sha256
    return dataclasses.replace(
        spec,
        owner=d.owner or spec.owner,
        group=d.group or spec.group,
        email=d.email or spec.email,
        target=d.target or spec.target,
        name=d.name,
        description=d.description,
        annotations=dict(d.annotations),
        extra=extra,
    )


_hash_cache: dict[tuple[str, int, int], str] = {}


def _checksums(root: Path, entries: list[FileEntry]) -> list[str]:
    """Files whose content does not match the listed sha256 (cached per path, size and mtime)."""
    bad = []
    for entry in entries:
        if not entry.sha256:
            continue
        path = os.path.join(root, entry.path)
        st = os.stat(path)
        key = (path, st.st_size, st.st_mtime_ns)
        digest = _hash_cache.get(key)
        if digest is None:
            h = hashlib.sha256()
            with open(path, "rb") as fh:
                while chunk := fh.read(1024 * 1024):
                    h.update(chunk)
            digest = h.hexdigest()
            if len(_hash_cache) > 10_000:
                _hash_cache.clear()
            _hash_cache[key] = digest
        if digest != entry.sha256:
            bad.append(entry.path)
    return bad


# ---------------------------------------------------------------------------
# Pending reasons, in the words of the scientist who dropped the data


def size_reason(path: str, found: int, listed: int, where: str) -> str:
    """``size of x.tif is 1,000 bytes, manifest says 4,096``."""
    return f"size of {path} is {found:,} bytes, {where} says {listed:,}"


def oversize_reason(sizes: list[tuple[str, int, int]], where: str) -> str | None:
    """Why listed files larger than the descriptor says fail at once (a file does not shrink
    by waiting), or None when none is larger."""
    over = [(p, found, listed) for p, found, listed in sizes if found > listed]
    if not over:
        return None
    shown = "; ".join(f"{printable(p)} is {found:,} bytes, the {where} says {listed:,}" for p, found, listed in over[:5])
    more = f" (and {len(over) - 5} more)" if len(over) > 5 else ""
    return (f"{shown}{more}: larger than listed, so waiting will not help; copy the file(s) again from the "
            f"instrument, or fix the size in the {where}")


def listed_reason(check: acq.ListedCheck, total: int, where: str) -> tuple[str, str]:
    """(pending kind, reason) for listed files not all there with their sizes."""
    parts = []
    if check.absent:
        parts.append(f"waiting for {len(check.absent)} of {total} {'file' if total == 1 else 'files'} "
                     f"(missing: {acq.listed_names(check.absent)})")
    parts += [size_reason(p, found, listed, where) for p, found, listed in check.sizes[:5]]
    if len(check.sizes) > 5:
        parts.append(f"{len(check.sizes) - 5} more files of the wrong size")
    explained = len(check.absent) + len(check.sizes)
    if explained < len(check.missing):  # dangling symlinks, folders where files are listed
        parts.append("; ".join(m for m in check.missing if not m.endswith(" (missing)") and " (size " not in m))
    return ("waiting" if check.absent else "size"), "; ".join(parts)


def checksum_reason(paths: list[str], where: str) -> str:
    """Why a complete acquisition whose content differs from its descriptor fails at once."""
    noun = "checksum" if len(paths) == 1 else "checksums"
    verb = "does" if len(paths) == 1 else "do"
    return (
        f"{noun} of {acq.listed_names(paths)} {verb} not match the {where}: the size is right but the content differs, "
        f"so waiting will not help; copy the file(s) again from the instrument (or fix the {where}'s sha256)"
    )


def copies_in_progress(left_out: list[str]) -> list[str]:
    """The entries of ``left_out`` (``"b.tif.part (excluded)"``) named like a copy in progress
    (``defaults.IN_PROGRESS_PATTERNS``: ``b.tif.part``, ``x.tmp``, ``~$notes.docx``), as paths."""
    match = acq.matcher(D.IN_PROGRESS_PATTERNS)
    out = []
    for item in left_out:
        path, sep, why = item.rpartition(" (")
        if sep and why.startswith("excluded") and match is not None and match(path.rpartition("/")[2]):
            out.append(path)
    return out


def copying_reason(paths: list[str]) -> str:
    """Why an acquisition holding ``paths`` (copies in progress) is not queued yet."""
    return (f"still being copied: {acq.listed_names([printable(p) for p in paths])} "
            f"{'is a temporary file' if len(paths) == 1 else 'are temporary files'} of a copy in progress; "
            "imported once the copy has renamed or removed "
            f"{'it' if len(paths) == 1 else 'them'} (an abandoned copy: remove "
            f"{'it' if len(paths) == 1 else 'them'})")


def pending_reason(kind: str, reason: str, last_change: float, quiet_until: float | None, now: float) -> str:
    """The reason to show ``now``: a candidate still in its quiet period is described from its times."""
    if kind != "writing":
        return reason
    ago = max(0.0, now - last_change)
    shown = f"{ago:.0f} s" if ago < 120 else f"{ago / 60:.0f} min"
    until = time.strftime("%H:%M:%S", time.localtime(quiet_until)) if quiet_until else "?"
    return f"still being written: last change {shown} ago, quiet until {until}"


def acquisition_key(watch_name: str, rel: str, descriptor_sha256: str, files: list[tuple[FileEntry, Any]]) -> str:
    """Idempotency key of a watched acquisition: folder, path and content.

    Content is the descriptor's bytes and each file's size and mtime, so rescans
    and restarts find the same key, and a changed re-drop gets a new one.
    """
    content = [
        "watch/1",
        watch_name,
        unicodedata.normalize("NFC", rel),
        descriptor_sha256,
        sorted((unicodedata.normalize("NFC", e.path), st.st_size, st.st_mtime_ns) for e, st in files),
    ]
    raw = json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("utf-8", "surrogateescape")
    return "watch:" + hashlib.sha256(raw).hexdigest()


def _finish(
    watch: WatchConfig,
    base: JobSpec,
    descriptor: acq.Descriptor,
    found: list[tuple[FileEntry, os.stat_result]],
    rel: str,
    unit: str,
    *,
    warnings: list[str],
    proven: bool = False,
    left_out: list[str] | None = None,
) -> Outcome:
    key = acquisition_key(watch.name, rel, descriptor.raw_bytes_sha256, found)
    files = tuple(e for e, _ in found)
    extra = dict(base.extra, unit=unit)
    try:
        # Which folder this is (a sidecar pair: the folder holding it -- its data file may be
        # replaced by an atomic save), and which files (inode and mtime of a few): so the watcher
        # can tell an acquisition changed in place after its import from one removed and dropped anew.
        st = os.stat(base.root)
        extra["identity"] = {
            "dir": [st.st_dev, st.st_ino],
            "files": [[e.path, f.st_ino, f.st_mtime_ns] for e, f in sorted(found, key=lambda x: x[0].path)[:16]],
        }
        if descriptor.path is not None:
            # The manifest or sidecar itself: when every imported file was rewritten, the very
            # descriptor that was imported still says this is the same acquisition, changed.
            ds = os.stat(descriptor.path)
            extra["identity"]["descriptor"] = [os.path.relpath(descriptor.path, base.root), ds.st_ino,
                                               ds.st_mtime_ns]
    except OSError:
        pass
    if left_out:
        # Said in the job log (with the warnings) and in the owner's mail.
        extra["left_out"] = left_out[:MAX_LEFT_OUT]
        shown = ", ".join(printable(x) for x in left_out[:20]) + (" …" if len(left_out) > 20 else "")
        warnings = [*warnings, f"left out of the acquisition ({len(left_out)}): {shown}"]
    if warnings:
        extra["warnings"] = warnings
    spec = dataclasses.replace(base, files=files, idempotency_key=key, extra=extra)
    try:
        spec = dataclasses.replace(spec, filesets=acq._filesets_on_disk(descriptor.filesets, files))
    except AcquisitionError as exc:
        return Outcome("reject", rel, spec=spec, reason=str(exc))
    where = "the manifest" if watch.detection == "manifest" else (
        "the sidecar" if watch.detection == "sidecar" else "the folder layout"
    )
    if not spec.owner:
        return Outcome(
            "reject", rel, spec=spec,
            reason=f'no owner: set "owner" in {where}, or set owner on watch folder {watch.name!r}',
        )
    if not spec.target.to_dict():
        return Outcome(
            "reject", rel, spec=spec,
            reason=f'no target: set "target" in {where} (e.g. {{"project": "P", "dataset": "D"}}), '
            f"or set target on watch folder {watch.name!r}",
        )
    if watch.allowed_owners and spec.owner not in watch.allowed_owners:
        return Outcome(
            "reject", rel, spec=spec,
            reason=f"owner {spec.owner!r} is not allowed in watch folder {watch.name!r} "
            f"(allowed: {', '.join(watch.allowed_owners)}); fix the owner in {where}, "
            "or ask the admin to add it to allowed_owners",
        )
    if watch.check_os_owner:
        problem = _os_owner_problem(spec.owner, found)
        if problem:
            return Outcome("reject", rel, spec=spec, reason=problem)
    try:
        spec = dataclasses.replace(spec, extra=acq.record_identity(
            spec.extra, found, allow_hard_links=watch.allow_hard_links,
            switch=f"allow_hard_links on watch folder {watch.name!r}"))
    except AcquisitionError as exc:
        return Outcome("reject", rel, spec=spec, reason=str(exc))
    return Outcome("enqueue", rel, spec=spec, warnings=warnings, proven=proven)


def _os_owner_problem(owner: str, found: list[tuple[FileEntry, os.stat_result]]) -> str:
    names: dict[int, str] = {}
    for entry, st in found:
        if st.st_uid not in names:
            try:
                names[st.st_uid] = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                names[st.st_uid] = f"uid {st.st_uid}"
        if names[st.st_uid] != owner:
            return (
                f"{entry.path} belongs to system user {names[st.st_uid]!r}, but the acquisition claims owner "
                f"{owner!r}; the owner check (check_os_owner) needs the files written by that user"
            )
    return ""


# ---------------------------------------------------------------------------
# The detector


def estimate_change(max_mtime: float, since: float | None, now: float) -> float:
    """When a change seen at ``now`` (and not at ``since``) happened.

    The newest mtime says it exactly when it falls between the two looks; otherwise
    (clock skew, copied mtimes) the safe answer is ``now``.
    """
    if since is not None and since < max_mtime <= now:
        return max_mtime
    return now


class Detector:
    """Candidates of one watch folder and their quiet periods.

    ``root`` is the resolved watch folder. ``trust_events``: changes are reported
    by events (``touch``), so a quiet candidate is complete without a second look;
    otherwise (polling) a candidate is complete when two looks a quiet period
    apart agree.
    """

    def __init__(
        self, watch: WatchConfig, root: str, *, trust_events: bool = False,
        remembered: dict[str, PendingEntry] | None = None,
        finished: Callable[[JobSpec], Any] | None = None,
        finished_snapshots: dict[str, set[str]] | None = None,
    ):
        self.watch = watch
        # The finished job recorded for an acquisition as it is now (its spec's key), or None:
        # an incomplete acquisition that already failed (missing_timeout) is not pending again.
        self.finished = finished
        # Acquisition -> snapshots (hex) its finished jobs recorded, from the store at start: a
        # candidate found at start exactly as a job left it was handled by an earlier run even
        # when no receipt or error report is beside it (a sidecar whose data file is gone).
        self.finished_snapshots: dict[str, set[str]] = dict(finished_snapshots or {})
        # What the store remembers of pending candidates from before a restart.
        self.remembered: dict[str, PendingEntry] = dict(remembered or {})
        self.root = root
        self.patterns = Patterns(watch.include, watch.exclude)
        self.rule = make_rule(watch, self.patterns)
        self.trust_events = trust_events
        self.known: dict[str, Candidate] = {}
        self.pending: set[str] = set()
        self.generation = 0
        # Paths seen and deliberately not watched as acquisitions (excluded names,
        # symbolic links, paths the service cannot read): rel -> (first seen, kind, reason).
        self.skipped: dict[str, tuple[float, str, str]] = {}
        # The owner each candidate's or skipped path's descriptor names: rel -> (descriptor
        # identity, owner), so a descriptor is read again only when it changed.
        self._owners: dict[str, tuple[tuple[int, ...] | None, str | None]] = {}
        self._skipped_owner: dict[str, tuple[float, str | None]] = {}  # rel -> (looked up at, owner)
        # Set by the watcher: the job that already imported this acquisition (changed in place
        # since), or None. An incomplete-looking acquisition that was imported is not waited for.
        self.imported_as: Callable[[Outcome], Any] | None = None
        self._settled_cursor = ""  # polling: the settled candidate looked at last (see recheck_settled)

    # -- what is never an acquisition ---------------------------------------

    def refusal(self, rel: str, *, walked: bool = False) -> tuple[str, str] | None:
        """``(kind, reason)`` when ``rel`` may not be (or lead to) an acquisition, else None.

        One rule for events, polling and scans: no component of the path may be an
        excluded name, and none may be a symbolic link (a link is never followed into
        an acquisition: ``latest -> plate``, ``reference -> /elsewhere``, ``loop -> .``).
        ``walked``: a scan reached the folder ``rel`` from the root entry by entry, each
        seen not to be a link (its ``DirEntry``), so the components are not looked at again.
        """
        try:
            rel.encode("utf-8")
        except UnicodeEncodeError:
            return "unreadable", (
                f"the name {printable(rel)} is not valid UTF-8 (written by a system using another character set); "
                "rename it (the job store, mails and OMERO need UTF-8 names)"
            )
        pattern = self.patterns.path_excluded(rel)
        if pattern is not None:
            return "excluded", (
                f"ignored: matches exclude pattern {pattern} of watch folder {self.watch.name!r}; "
                f"{self.rename_hint(rel)[0]}"
            )
        if walked:
            return None
        current = self.root
        for part in rel.split("/"):
            current = os.path.join(current, part)
            try:
                st = os.lstat(current)
            except FileNotFoundError:
                return None  # gone: the candidate's own look says so
            except OSError as exc:
                return "unreadable", _os_reason(exc, current)
            if stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(current)
                except OSError:
                    target = "?"
                return "symlink", (
                    f"a symbolic link (to {printable(target)}): links are never followed into an acquisition, "
                    "so the same data is not imported twice and no other folder's data is imported here; "
                    "copy or move the data itself into the drop folder"
                )
        return None

    def rename_hint(self, rel: str) -> tuple[str, str | None]:
        """What renaming the excluded name in ``rel`` would do: ``(advice, acquisition)``.

        Renaming is suggested only where it would make the path imported: a folder that can
        be (or hold) an acquisition, a file with its sidecar partner beside it, or a part of
        an acquisition (``acquisition`` names it: one already imported is not imported again,
        which only the job store knows; :func:`~watchfolder.watch.explain.explain` says so).
        A file where files are never acquisitions (a layout folder's upper levels, a manifest
        watch folder outside any manifest folder) is told why instead.
        """
        parts = rel.split("/")
        depth = acq.container_depth(parts)
        index = next((i for i, part in enumerate(parts if depth is None else parts[:depth])
                      if part and self.patterns.name_excluded(part)), len(parts) - 1)
        prefix, name = "/".join(parts[:index]), parts[index]
        named = f"{prefix}/{name}" if prefix else name
        rename = "rename it (e.g. when the copy is finished) to have it imported"
        part_of = self.rule.acquisition_of(self.root, prefix, True) if prefix else None
        if part_of is not None:
            return (f"it is part of acquisition {part_of}: rename it before that is queued to have it imported "
                    "with it"), part_of
        try:
            is_dir = stat.S_ISDIR(os.lstat(os.path.join(self.root, named)).st_mode)
        except OSError:
            is_dir = rel != named  # a folder above the path
        if is_dir:
            return rename, None
        suffix = self.watch.sidecar_suffix
        if self.watch.detection == "layout":
            levels = len([p for p in (self.watch.layout or "").strip("/").split("/") if p])
            return (f"renaming it would not import it: acquisitions here are folders {levels} level(s) deep "
                    f"({self.watch.layout}), and a file outside them is never imported"), None
        if self.watch.detection == "sidecar" or self.watch.sidecars:
            full = os.path.join(self.root, named)
            partner = full[: -len(suffix)] if name.endswith(suffix) and len(name) > len(suffix) else full + suffix
            if os.path.lexists(partner):
                return f"rename it and {os.path.basename(partner)} alike to have them imported", None
            return (f"renaming it would not import it: a single file is imported only with a sidecar "
                    f"({name}{suffix}) beside it, or inside a folder with a {self.watch.manifest_name} manifest"), None
        return (f"renaming it would not import it: a file is imported only inside a folder with a "
                f"{self.watch.manifest_name} manifest"), None

    def skip(self, rel: str, kind: str, reason: str, now: float) -> None:
        """Note a path that is not watched as an acquisition, with why (listed as pending).

        A name the service writes itself (a receipt, an error report) is never noted, whatever it
        is (a planted symlink of that name included): the follow-up replaces such a name with its
        own file, and pending is for what a person can act on. A real folder of such a name
        is the exception: it may hold data, which is never imported, so it is noted with why."""
        name = rel.rpartition("/")[2]
        if kind == "excluded" and name in D.SYSTEM_NAMES and ("/" not in rel or name in D.SYSTEM_FILE_NAMES):
            # Made by the OS itself: nothing for a person to do. A folder such as lost+found below the
            # top of the share is a person's (a dataset named so): noted, with why.
            return
        if is_own_file(name):
            try:
                is_dir = stat.S_ISDIR(os.lstat(os.path.join(self.root, rel)).st_mode)
            except OSError:
                is_dir = False
            if not is_dir:
                return
            kind, reason = "excluded", own_name_folder_reason(name)
        if rel in self.skipped:
            self._skipped_owner.pop(rel, None)  # seen again (an event): its owner is looked up again
            return
        if len(self.skipped) >= MAX_SKIPPED:
            return
        old = self.remembered.pop(storable(rel), None)  # seen before a restart: first sighting kept
        cand = self.known.get(rel)  # looked at as a candidate first (its look took the remembered entry)
        first = min(now, old.first_seen) if old is not None else min(now, cand.first_seen) if cand is not None else now
        self.skipped[rel] = (first, kind, reason)
        log.info("watch folder %s: %s not watched: %s", self.watch.name, printable(rel), reason)

    def owner_of(self, rel: str) -> str | None:
        """The owner named so far for the acquisition (or skipped path) ``rel``, or None.

        From the path in layout mode; otherwise from its manifest or sidecar, read by the
        descriptors' own rule (:func:`acquisition.read_descriptor`: no symlink, size cap) and
        only when it changed since the last read (device, inode, size and mtime_ns, by one
        ``lstat``); the watch folder's ``owner`` when the descriptor names none. A descriptor
        not there yet or not readable (half written) gives None until it changes.
        """
        named = self.rule.path_owner(rel)
        if named:
            return named
        path = self.rule.descriptor_path(self.root, rel)
        if path is None:
            return self.watch.owner or None
        try:
            st = os.lstat(path)
        except OSError:
            self._owners.pop(rel, None)
            return None
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        cached = self._owners.get(rel)
        if cached is not None and cached[0] == ident:
            return cached[1]
        owner = self._read_owner(path)
        self._owners[rel] = (ident, owner)
        return owner

    def _read_owner(self, path: str) -> str | None:
        """The owner a descriptor names (else the watch folder's), None when it cannot be read."""
        try:
            descriptor = acq.read_descriptor(Path(path), within=self.root, allow_hard_links=self.watch.allow_hard_links)
        except (AcquisitionError, OSError):
            return None
        return descriptor.owner or self.watch.owner or None

    def admit(self, rel: str, now: float, *, walked: bool = False) -> bool:
        """True when ``rel`` may become a candidate; otherwise note why and return False."""
        refused = self.refusal(rel, walked=walked)
        if refused is None:
            return True
        self.skip(rel, *refused, now)
        return False

    # -- reports from observers -------------------------------------------

    def observe(self, rel: str, now: float, *, since: float | None = None, snap: Snapshot | None = None,
                walked: bool = False, siblings: Collection[str] | None = None) -> Snapshot | None:
        """Look at a candidate now (snapshot it) and restart its quiet period if it changed.

        ``since``: when the observer last looked without seeing this candidate (a
        poll tick), so an mtime in between can date the change; None at startup.
        ``walked``: see :meth:`refusal`. ``siblings``: the names in the candidate's
        folder as the caller just listed them (a scan), to find its receipt without
        an ``lstat``.
        """
        cand = self.known.get(rel)
        if cand is None and not self.admit(rel, now, walked=walked):
            return None
        if snap is None:
            snap = self.rule.snapshot(self.root, rel)
        if snap is None:
            if cand is not None:
                self.forget(rel)
            return None
        if cand is None:
            last = estimate_change(snap.max_mtime, since, now)
            cand = Candidate(rel, first_seen=now, last_change=last, digest=snap.digest, observed_at=now,
                             ctime_ns=snap.max_ctime_ns)
            old = self.remembered.pop(rel, None)
            if old is not None:
                # Seen before a restart: its clock goes on from then, not from now.
                cand.first_seen = min(now, old.first_seen)
                if old.digest == snap.digest.hex():
                    cand.last_change = min(last, old.last_change)
            else:
                cand.handled_before = (snap.digest.hex() in self.finished_snapshots.get(rel, ())
                                       or self._has_marker(rel, siblings))
            cand.next_check = cand.last_change + self.watch.quiet_period
            cand.seen_generation = self.generation
            cand.peak_files = snap.files
            self.known[rel] = cand
            self.pending.add(rel)
            self._schedule_proof(cand, now)
            return snap
        cand.seen_generation = self.generation
        cand.peak_files = max(cand.peak_files, snap.files)
        if cand.pending and cand.written_since(snap):
            # Filled in place (size and mtime kept): still being written, its quiet period restarts.
            cand.last_change = max(cand.last_change, now)
            cand.next_check = cand.last_change + self.watch.quiet_period
            cand.waiting = cand.waiting_kind = ""
            self.pending.add(rel)
        cand.ctime_ns = snap.max_ctime_ns
        if cand.digest != snap.digest:
            if cand.digest is not None:
                # A change seen by looking; an event (digest None) has dated it already.
                cand.last_change = max(cand.last_change, estimate_change(snap.max_mtime, cand.observed_at, now))
                cand.next_check = cand.last_change + self.watch.quiet_period
            cand.digest = snap.digest
            cand.waiting = cand.waiting_kind = ""  # looked at again once quiet
            if snap.digest == cand.done_digest:
                self.pending.discard(rel)  # back to what was already handled
            else:
                self.pending.add(rel)
                self._schedule_proof(cand, now)
        cand.observed_at = now
        return snap

    def _has_marker(self, rel: str, siblings: Collection[str] | None = None) -> bool:
        """A receipt or an error report beside the acquisition: an earlier run finished a job for it.

        ``siblings``: the listing of the acquisition's folder, looked up instead of the disk."""
        if siblings is not None:
            name = rel.rpartition("/")[2]
            return fit_name(name, RECEIPT_SUFFIX) in siblings or fit_name(name, ERROR_SUFFIX) in siblings
        full = os.path.join(self.root, rel)
        return os.path.lexists(beside_str(full, RECEIPT_SUFFIX)) or os.path.lexists(beside_str(full, ERROR_SUFFIX))

    def touch(self, rel: str, now: float) -> None:
        """An event says the candidate changed: restart its quiet period (looked at when quiet)."""
        cand = self.known.get(rel)
        if cand is None:
            if not self.admit(rel, now):
                return
            old = self.remembered.pop(rel, None)
            first = min(now, old.first_seen) if old is not None else now
            cand = Candidate(rel, first_seen=first, last_change=now, seen_generation=self.generation)
            self.known[rel] = cand
        if cand.peak_files < 2:
            # A sidecar's data file that comes and goes within the quiet period was there: waiting
            # will not bring it back (the look at the end of the quiet period sees only the sidecar).
            present = self.rule.present(self.root, rel)
            if present is not None:
                cand.peak_files = max(cand.peak_files, present)
        self._changed(cand, None, now)

    def _changed(self, cand: Candidate, digest: bytes | None, now: float) -> None:
        cand.handled_before = False
        cand.waiting = cand.waiting_kind = ""  # looked at again once quiet
        cand.last_change = now
        cand.digest = digest
        cand.next_check = now + self.watch.quiet_period
        self.pending.add(cand.rel)
        self._schedule_proof(cand, now + PROOF_DELAY)

    def _schedule_proof(self, cand: Candidate, at: float) -> None:
        if self.rule.can_prove:
            cand.proof_at = max(at, cand.proof_after)

    def _try_proof(self, cand: Candidate, now: float) -> Outcome | None:
        """Before the quiet period ends: the enqueue outcome if the descriptor proves completeness, else None."""
        cand.proof_at = None
        snap = self.rule.snapshot(self.root, cand.rel)
        if snap is None or snap.digest == cand.done_digest:
            return None  # gone, or back to what was handled: the quiet-period look decides
        try:
            outcome = self.rule.build(self.root, cand.rel, now)
        except OSError:
            return None  # the look at the end of the quiet period reports it
        if outcome.kind == "enqueue" and outcome.proven:
            cand.digest, cand.observed_at = snap.digest, now
            cand.waiting = ""
            cand.proof_backoff = 0.0
            return outcome
        # Not proven (yet): the next change may complete it; do not look again too soon.
        cand.proof_backoff = min(max(PROOF_RETRY, 2 * cand.proof_backoff), self.watch.quiet_period)
        cand.proof_after = now + cand.proof_backoff
        return None

    def forget(self, rel: str) -> None:
        self.known.pop(rel, None)
        self.pending.discard(rel)
        self.skipped.pop(rel, None)
        self._owners.pop(rel, None)

    def prune_notes(self, rel_dir: str, names: set[str]) -> None:
        """A folder was listed (a poll): drop the notes of skipped paths in it whose entry is gone.

        ``names``: the folder's entries now. An excluded ``a2.tmp/`` renamed to ``a2`` is no
        longer listed as pending, as the rename's event drops it in events mode; a note below
        an entry that is gone goes with it.
        """
        prefix = rel_dir + "/" if rel_dir else ""
        for rel in [r for r in self.skipped
                    if r.startswith(prefix) and r[len(prefix):].partition("/")[0] not in names]:
            del self.skipped[rel]
            self._skipped_owner.pop(rel, None)

    def forget_below(self, rel_dir: str) -> None:
        """A folder went away: drop every candidate in it (and every note of a skipped path)."""
        prefix = rel_dir + "/"
        for rel in [r for r in self.known if r == rel_dir or r.startswith(prefix)]:
            self.forget(rel)
        for rel in [r for r in self.skipped if r == rel_dir or r.startswith(prefix)]:
            del self.skipped[rel]
            self._skipped_owner.pop(rel, None)
            self._owners.pop(rel, None)

    def begin_scan(self) -> None:
        self.generation += 1
        # The scan notes again what is still there; a candidate's own note (a JSON that is data, not a
        # sidecar) stays: it is not looked at again until it changes, and goes when it is forgotten.
        self.skipped = {r: v for r, v in self.skipped.items() if r in self.known}
        self._skipped_owner = {r: v for r, v in self._skipped_owner.items() if r in self.skipped}
        self._owners = {r: v for r, v in self._owners.items() if r in self.known}

    def end_scan(self) -> None:
        """After a full rescan: forget candidates that were not seen (gone)."""
        for rel in [r for r, c in self.known.items() if c.seen_generation != self.generation]:
            self.forget(rel)

    # -- the single step --------------------------------------------------

    def next_due(self) -> float | None:
        """The earliest time a pending candidate must be looked at."""
        if not self.pending:
            return None
        known = self.known
        return min(
            c.next_check if c.proof_at is None or c.proof_at > c.next_check else c.proof_at
            for c in (known[r] for r in self.pending)
        )

    def loop(
        self, now: float, *, recheck_pending: bool = False, since: float | None = None, limit: int = OUTCOME_BATCH
    ) -> list[Outcome]:
        """Look at due candidates; return the outcomes of those that are complete or bad.

        ``recheck_pending`` (polling): snapshot pending candidates first (at most
        :data:`RECHECK_PER_TICK`, the longest unobserved first), so in-place
        appends restart quiet periods. Candidates with an ``enqueue`` or
        ``reject`` outcome count as done once :meth:`settle` is called. At most
        ``limit`` outcomes per step: the rest stay due for the next one.
        """
        out: list[Outcome] = []
        if recheck_pending:
            self._recheck(now, since)
            self.recheck_settled(now, since)
        for rel in sorted(self.pending):
            if len(out) >= limit:
                break
            cand = self.known.get(rel)
            if cand is None:
                self.pending.discard(rel)
                continue
            if now < cand.next_check:
                if cand.proof_at is not None and now >= cand.proof_at:
                    proven = self._try_proof(cand, now)
                    if proven is not None:
                        out.append(proven)
                continue
            cand.proof_at = None
            try:
                snap = self.rule.snapshot(self.root, rel)
            except OSError as exc:
                self._unreadable(cand, exc, now)
                continue
            if snap is None:
                out.append(Outcome("gone", rel))
                self.forget(rel)
                continue
            denied = snap.denied  # the folder's own listing refused: no second look needed
            if denied is not None:
                # Made unreadable in place (chmod 000 after it was seen): the snapshot digests what it
                # cannot list and the rule would find no descriptor ("gone", forgotten silently).
                # Listed as unreadable instead, and looked at again until it can be read.
                self._unreadable(cand, None, now, reason=denied)
                continue
            # (Not for what was handled as it is: a chmod of a kept file is no change of its data.)
            written = cand.pending and cand.written_since(snap)
            cand.ctime_ns = snap.max_ctime_ns
            if cand.digest is not None and (snap.digest != cand.digest or written):
                # Changed since the last look without an event telling us (or between ticks), or
                # written in place keeping names, sizes and mtimes (a newer ctime: robocopy /Z).
                cand.last_change = now if written else estimate_change(snap.max_mtime, cand.observed_at, now)
                cand.digest = snap.digest
                cand.observed_at = now
                cand.next_check = cand.last_change + self.watch.quiet_period
                if now < cand.next_check:
                    continue
            if cand.digest is None and not self.trust_events:
                # No baseline yet (polling): take one and wait a quiet period.
                cand.digest, cand.observed_at = snap.digest, now
                cand.next_check = now + self.watch.quiet_period
                continue
            cand.digest, cand.observed_at = snap.digest, now
            cand.peak_files = max(cand.peak_files, snap.files)
            if snap.digest == cand.done_digest:
                self.pending.discard(rel)
                continue
            cand.handled_before = False  # looked at: listed from now on if it stays pending
            self.skipped.pop(rel, None)  # a note made at an earlier look ("ignore") is looked at anew
            try:
                outcome = self.rule.build(self.root, rel, now)
            except OSError as exc:
                outcome = self._os_outcome(cand, exc, now)
                if outcome is None:
                    continue
            if outcome.kind == "wait" and outcome.why == "sidecar" and cand.peak_files > 1:
                # The data file was there and is gone after the quiet period: waiting will not bring it back.
                outcome.kind = "reject"
                outcome.reason += " (it was there before and has been removed or renamed); " \
                    "put the data file back beside its sidecar, or remove the sidecar"
            if outcome.kind == "gone":
                self.forget(rel)
                out.append(outcome)
            elif outcome.kind == "ignore":
                cand.done_digest = snap.digest
                self.pending.discard(rel)
                # Not imported, never silently: listed once (not looked at again until it changes).
                self.skip(rel, "not_acquisition", outcome.reason, now)
                out.append(outcome)
            elif outcome.kind == "wait" and self.imported_as is not None and self.imported_as(outcome) is not None:
                # Imported before and changed in place since (a file rewritten to another size):
                # not waited for, not failed after missing_timeout; the watcher notes the change.
                outcome.kind = "changed"
                cand.waiting = ""
                out.append(outcome)
            elif outcome.kind == "wait":
                if outcome.spec is not None:
                    cand.owner = outcome.spec.owner or None
                job = self.finished(outcome.spec) if self.finished and outcome.spec is not None else None
                if job is not None:
                    # Already failed as it is (e.g. on missing_timeout before a restart): accounted for.
                    cand.done_digest, cand.job_id, cand.handled_before = snap.digest, job.id, False
                    self.pending.discard(rel)
                    continue
                if now - cand.last_change >= self.watch.missing_timeout:
                    outcome.kind = "reject"
                    if outcome.seen is not None and outcome.spec is not None:
                        # The files it saw, under the wait's own key (a restart finds this failure).
                        outcome.spec = dataclasses.replace(outcome.seen, idempotency_key=outcome.spec.key())
                    fix = ("copy the files again from the instrument (their sizes differ from the descriptor's), "
                           "or fix the sizes in the descriptor") if outcome.why == "size" else (
                        "finish the copy, or remove the temporary files of the abandoned one; then retry "
                        "the job") if outcome.why == "copying" else (
                        "copy the missing files and drop the acquisition again, or fix the descriptor")
                    outcome.reason = (
                        f"incomplete after {self.watch.missing_timeout:g} s without change: {outcome.reason}; {fix}"
                    )
                    out.append(outcome)
                else:
                    cand.waiting = outcome.reason
                    cand.waiting_kind = outcome.why or "waiting"
                    cand.next_check = min(cand.last_change + self.watch.missing_timeout, now + WAIT_RECHECK_SECONDS)
            else:
                cand.waiting = ""
                out.append(outcome)
        return out

    def _unreadable(self, cand: Candidate, exc: OSError | None, now: float, *, reason: str = "") -> None:
        """A candidate the service cannot look at now (``exc``, or ``reason`` already worded): say
        why, look again later; others carry on."""
        cand.waiting = reason or _os_reason(exc, getattr(exc, "filename", None) or os.path.join(self.root, cand.rel))
        cand.waiting_kind = "unreadable"
        cand.next_check = now + min(WAIT_RECHECK_SECONDS, max(self.watch.quiet_period, 1.0))

    def _os_outcome(self, cand: Candidate, exc: OSError, now: float) -> Outcome | None:
        """An OS error while reading a candidate: permanent ones (permission, a name too long)
        reject it at once with the fix; transient ones (I/O, a share that dropped) wait."""
        failure = classify_os_error(exc, getattr(exc, "filename", None) or os.path.join(self.root, cand.rel), "read")
        if failure.transient:
            self._unreadable(cand, exc, now)
            return None
        spec = getattr(exc, "watchfolder_spec", None) or _base_spec(self.watch, Path(self.root, cand.rel), cand.rel)
        return Outcome("reject", cand.rel, spec=spec, reason=failure.message)

    def _recheck(self, now: float, since: float | None) -> None:
        known = self.known
        waiting = [c for c in (known.get(r) for r in self.pending) if c is not None and now < c.next_check]
        if len(waiting) > RECHECK_PER_TICK:
            waiting = heapq.nsmallest(RECHECK_PER_TICK, waiting, key=lambda c: c.observed_at)
        for cand in waiting:
            self.observe(cand.rel, now, since=since)

    def recheck_settled(self, now: float, since: float | None, *, budget: int = SETTLED_FILES_PER_TICK) -> int:
        """Polling: look again at settled candidates in turn, about ``budget`` files per call.

        A file rewritten in place (same inode), a manifest or sidecar rewritten, changes no
        folder's mtime: inotify reports them, polling finds them here, so both modes reach
        the same outcome (README, Imported once). A change makes the candidate pending again
        (:meth:`observe`); what it then is (the same acquisition changed, or a new one) is
        decided as for an event. Returns the number of files counted against ``budget``.
        """
        settled = sorted(r for r in self.known if r not in self.pending)
        if not settled:
            return 0
        start = bisect.bisect_right(settled, self._settled_cursor)
        used = 0
        for rel in settled[start:] + settled[:start]:
            if used >= budget:
                break
            cand = self.known.get(rel)
            if cand is None or rel in self.pending:
                continue
            used += max(1, cand.peak_files)
            self._settled_cursor = rel
            try:
                self.observe(rel, now, since=since)
            except OSError:
                continue  # unreadable now: the next full rescan reports it
        return used

    def settle(self, outcome: Outcome, ok: bool, now: float, *, retry_after: float = 5.0) -> None:
        """Record that an outcome was applied (``ok``) or must be tried again later."""
        cand = self.known.get(outcome.rel)
        if cand is None:
            return
        if ok:
            cand.done_digest = cand.digest
            self.pending.discard(outcome.rel)
        else:
            cand.next_check = now + retry_after

    # -- status -----------------------------------------------------------

    def pending_entries(self, now: float) -> list[PendingEntry]:
        """Every pending candidate with why it is not queued yet, for the store."""
        return self.entries_of(self.pending_rows(now), now)

    def pending_rows(self, now: float) -> list[tuple]:
        """What :meth:`pending_entries` says, as plain rows ``(path, kind, reason, first_seen,
        last_change, quiet_until, owner, digest)`` where ``reason`` is None for a candidate in its
        quiet period (its wording changes with ``now``): a caller compares them with the last
        ones before it builds the entries (a scan of 10,000 new folders made them twice)."""
        out = []
        quiet = self.watch.quiet_period
        for rel in sorted(self.pending):
            c = self.known.get(rel)
            if c is None or c.handled_before:
                continue
            if c.waiting and now >= c.last_change + quiet:
                kind, reason, until = c.waiting_kind or "waiting", c.waiting, None
            else:
                kind, reason, until = "writing", None, c.last_change + quiet
            if c.owner_at != c.last_change:
                # Looked up once per change of the acquisition (the descriptor is read again only
                # when it changed itself): a file still being written costs one lstat per change.
                c.owner, c.owner_at = self.owner_of(rel) or c.owner, c.last_change
            out.append((rel, kind, reason, c.first_seen, c.last_change, until, c.owner, c.digest))
        for rel, (seen, kind, reason) in sorted(self.skipped.items()):
            out.append((rel, kind, reason, seen, seen, None, self._owner_of_skipped(rel, kind, now), None))
        return out

    def entries_of(self, rows: list[tuple], now: float) -> list[PendingEntry]:
        """The store's entries for rows from :meth:`pending_rows`."""
        name = self.watch.name
        return [
            PendingEntry(
                watch=name, path=rel, kind=kind,
                reason=reason if reason is not None else pending_reason(kind, "", last_change, until, now),
                first_seen=first_seen, last_change=last_change, quiet_until=until, owner=owner,
                digest=digest.hex() if digest else None,
            )
            for rel, kind, reason, first_seen, last_change, until, owner, digest in rows
        ]

    def _owner_of_skipped(self, rel: str, kind: str, now: float) -> str | None:
        """The owner of a path not watched as an acquisition (an excluded ``acq1.tmp`` whose
        manifest names one, a pair in a manifests-only folder), looked up at most once per
        quiet period (nothing tells the detector when a skipped folder's descriptor changes).
        A symbolic link or an unreadable path is never looked into."""
        if kind not in ("excluded", "not_acquisition"):
            # Never looked into (a link, an unreadable or misplaced path): the owner its path names
            # in layout mode, whatever its kind (jdoe/loose.tif is jdoe's to move).
            named = self.rule.path_owner(rel)
            return storable(named) if named else None
        cached = self._skipped_owner.get(rel)
        if cached is not None and now - cached[0] < max(self.watch.quiet_period, 1.0):
            return cached[1]
        owner = self.owner_of(rel)
        self._skipped_owner[rel] = (now, owner)
        return owner

    def pending_count(self) -> int:
        """Pending candidates as listed (those handled before a restart not counted until looked at)."""
        return sum(1 for r in self.pending if not self.known[r].handled_before)

    def pending_list(self, limit: int = 20) -> list[dict[str, Any]]:
        out = []
        for rel in sorted(r for r in self.pending if not self.known[r].handled_before)[:limit]:
            c = self.known[rel]
            out.append({"path": storable(rel), "since": c.first_seen, "last_change": c.last_change,
                        "waiting": c.waiting, "owner": c.owner})
        for rel, (seen, kind, reason) in sorted(self.skipped.items())[: max(0, limit - len(out))]:
            cached = self._skipped_owner.get(rel)
            owner = cached[1] if cached is not None else (
                None if kind in ("excluded", "not_acquisition") else self.rule.path_owner(rel))
            out.append({"path": storable(rel), "since": seen, "last_change": seen, "waiting": reason, "kind": kind,
                        "owner": storable(owner) if owner else None})
        return out


# -- what became of an acquisition that changed after its import ------------------------


def read_receipt(root: str, rel: str) -> tuple[int | None, Any]:
    """The job id in the receipt beside acquisition ``rel`` (as the follow-up wrote it), and the
    receipt itself; ``(None, None)`` when there is none or it cannot be read as one."""
    path = beside(os.path.join(root, rel), RECEIPT_SUFFIX)
    try:
        receipt = json.loads(safefs.read_file(path, RECEIPT_MAX_BYTES, within=root, what="receipt"))
        job_id = receipt.get("job_id")
    except (OSError, ValueError, AttributeError, safefs.UnsafePath):
        return None, None
    return (job_id if isinstance(job_id, int) else None), receipt


def imported_jobs(store: Any, watch: str) -> dict[str, Any]:
    """Acquisition (relative path) -> its newest succeeded job, among the newest
    :data:`FINISHED_AT_START` successes of watch folder ``watch``: how a kept acquisition whose
    receipt was deleted is recognised (the watcher at start, ``explain``). The jobs come without
    their file lists (``spec.files`` empty; the identity in ``spec.extra`` is what is compared).
    Raises what the store raises."""
    jobs, _ = store.list_jobs(states=[JobState.SUCCEEDED.value], source=f"watch:{watch}", limit=FINISHED_AT_START,
                              files=False)
    out: dict[str, Any] = {}
    for job in jobs:
        rel = job.spec.extra.get("acquisition")
        if isinstance(rel, str) and job.spec.extra.get("watch") == watch:
            out.setdefault(rel, job)
    return out


def imported_this(job: Any, watch: str, root: str, rel: str, *, untouched_since: float | None = None) -> bool:
    """Whether succeeded ``job`` imported this very acquisition ``rel`` of watch folder ``watch``
    (at ``root``) before it changed in place: the same folder (device and inode) still holding the
    manifest or sidecar that job imported, or at least one of the files it imported, unchanged
    (inode and mtime). A folder removed and dropped again holds a new descriptor and new files.
    ``untouched_since`` (epoch seconds): that file's ctime must not be later either (a file made
    again by ``cp -p`` can get a freed inode back, with its old mtime; its ctime is new)."""
    identity = job.spec.extra.get("identity") or {}
    if (job.state.value != "succeeded" or job.spec.extra.get("watch") != watch
            or job.spec.extra.get("acquisition") != rel or not identity.get("files")):
        return False
    where = os.path.join(root, rel)
    # A sidecar pair's place is the folder holding it (its data file may have been replaced by an
    # atomic save); jobs recorded before this rule hold the data file's own identity.
    places = [os.path.dirname(where), where] if job.spec.extra.get("unit") == "file" else [where]
    for place in places:
        try:
            st = os.stat(place)
        except OSError:
            continue
        if [st.st_dev, st.st_ino] == identity.get("dir"):
            break
    else:
        return False
    base = job.spec.root
    kept = [identity["descriptor"]] if identity.get("descriptor") else []
    for path, ino, mtime_ns in [*kept, *identity["files"]]:
        try:
            fst = os.stat(os.path.join(base, path))
        except OSError:
            continue
        if fst.st_ino == ino and fst.st_mtime_ns == mtime_ns and (
                untouched_since is None or fst.st_ctime <= untouched_since + 1):
            return True
    return False
