"""Walking a watch folder: full rescans, scans of new folders, and cheap polling.

Polling does not re-snapshot the tree each interval. It keeps the mtime of every
folder (a folder's mtime changes when an entry is added, removed or renamed in
it) and stats only those; a changed folder is listed again, and the acquisitions
still pending are looked at directly. Changes inside files of settled
acquisitions, which no folder mtime shows (a file rewritten in place), are found
by looking at those acquisitions again in turn, a bounded number of files per
tick (:meth:`Detector.recheck_settled`), so polling reaches what events reach.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from .detector import Detector, _os_reason

# A folder is listed again on every tick until its mtime has stayed the same for
# this long by the *local* clock: on filesystems with coarse timestamps (1 s on
# some NFS/SMB servers) an entry added in the same server second leaves the mtime
# unchanged. The server's timestamps are never compared with the local clock (a
# file server's clock may lag by seconds or minutes): only with each other.
MTIME_GUARD_SECONDS = 2.0


@dataclass
class ScanStats:
    folders: int = 0
    candidates: int = 0
    seconds: float = 0.0
    errors: int = 0


class Scanner:
    """Finds candidates under ``root`` for a :class:`Detector`.

    ``index``: keep the folder mtime index used by :meth:`poll` (polling mode).
    ``skip``: absolute real paths of folders never entered (done/failed folders
    placed inside the watch folder).
    """

    def __init__(self, detector: Detector, root: str, *, index: bool, skip: tuple[str, ...] = ()):
        self.detector = detector
        self.rule = detector.rule
        self.root = root
        self.index = index
        self.skip = frozenset(skip)
        self.dirs: dict[str, int] = {}  # absolute folder path -> mtime_ns
        self.seen_at: dict[str, float] = {}  # absolute folder path -> local time its current mtime was first seen
        self.unsettled: set[str] = set()
        self.errors: list[str] = []

    def _rel(self, path: str) -> str:
        return path[len(self.root) + 1:] if path != self.root else ""

    def _abs(self, rel: str) -> str:
        return os.path.join(self.root, rel) if rel else self.root

    def full_scan(self, now: float) -> ScanStats:
        """Walk the whole tree; forget candidates that are gone; rebuild the polling index."""
        started = time.perf_counter()
        self.detector.begin_scan()
        if self.index:
            self.dirs.clear()
            self.seen_at.clear()
            self.unsettled.clear()
        stats = self.scan_subtree("", now, since=None)
        self.detector.end_scan()
        stats.seconds = time.perf_counter() - started
        return stats

    def scan_subtree(self, rel_start: str, now: float, *, since: float | None, only_new: bool = False) -> ScanStats:
        """Walk one folder and everything below it, reporting candidates to the detector.

        ``only_new``: do not enter subfolders already in the index (polling re-lists
        a changed folder; its known subfolders have their own index entries).
        """
        stats = ScanStats()
        detector = self.detector
        rule = self.rule
        patterns = detector.patterns
        known = detector.known
        if rel_start and rel_start not in known and not detector.admit(rel_start, now):
            return stats  # an excluded name or a symbolic link: noted, never entered
        stack: list[tuple[str, set[str] | None]] = [(rel_start, None)]  # (folder, its parent's names)
        while stack:
            rel, siblings = stack.pop()
            path = self._abs(rel)
            if path in self.skip:
                continue
            try:
                with os.scandir(path) as it:
                    entries = list(it)
            except (FileNotFoundError, NotADirectoryError):
                continue
            except OSError as exc:
                # Unreadable, a name too long, an I/O error: this folder is noted with why; the rest goes on.
                stats.errors += 1
                reason = _os_reason(exc, path)
                self.errors.append(reason)
                if rel:
                    detector.skip(rel, "unreadable", reason, now)
                continue
            stats.folders += 1
            names = {e.name for e in entries}
            if rel and (rel in known and rule.unit == "folder" or rule.folder_is_candidate(rel, names)):
                # Reached entry by entry from rel_start (admitted above), none of them a link.
                snap = detector.observe(rel, now, since=since, snap=rule.snapshot(self.root, rel, entries),
                                        walked=True, siblings=siblings)
                stats.candidates += 1
                if snap is not None and self.index:
                    for sub, mtime in snap.dirs:
                        self._index(self._abs(sub), mtime, now)
                continue
            if self.index:
                try:
                    self._index(path, os.stat(path).st_mtime_ns, now)
                except FileNotFoundError:
                    continue
            for data_rel in rule.file_candidates(rel, names):
                detector.observe(data_rel, now, since=since, siblings=names)
                stats.candidates += 1
            for data_rel, reason in rule.stray_sidecars(self.root, rel, names):
                detector.skip(data_rel, "not_acquisition", reason, now)
            if only_new:  # a poll re-lists a changed folder (a full scan starts with no notes)
                detector.prune_notes(rel, names)
            for stray_rel, kind, reason in (*rule.strays(self.root, rel, entries), *rule.near_misses(rel, names)):
                detector.skip(stray_rel, kind, reason, now)
            if not rule.descend(rel):
                continue
            for entry in entries:
                child = f"{rel}/{entry.name}" if rel else entry.name
                try:
                    if entry.is_symlink():
                        detector.admit(child, now)  # never followed; noted with the reason
                        continue
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError:
                    continue
                if patterns.name_excluded(entry.name):
                    detector.admit(child, now)  # noted as excluded, not entered
                    continue
                if only_new and entry.path in self.dirs:
                    continue
                stack.append((child, names))
        return stats

    def _index(self, path: str, mtime_ns: int, now: float) -> None:
        if self.dirs.get(path) != mtime_ns or path not in self.seen_at:
            self.seen_at[path] = now
        self.dirs[path] = mtime_ns
        if now - self.seen_at[path] < MTIME_GUARD_SECONDS:
            self.unsettled.add(path)
        else:
            self.unsettled.discard(path)

    def poll(self, now: float, *, since: float | None) -> int:
        """One polling tick: stat every known folder, re-list the changed ones. Returns how many changed."""
        changed: list[str] = []
        gone: list[str] = []
        stat = os.stat
        for path, old in self.dirs.items():
            try:
                mtime = stat(path).st_mtime_ns
            except (FileNotFoundError, NotADirectoryError):
                gone.append(path)
                continue
            if mtime != old or path in self.unsettled:
                changed.append(path)
        detector = self.detector
        for path in gone:
            self.dirs.pop(path, None)
            self.seen_at.pop(path, None)
            self.unsettled.discard(path)
            rel = self._rel(path)
            cand = self.rule.candidate_for(rel, detector.known, True) if rel else None
            if cand is not None and cand in detector.known:
                detector.observe(cand, now, since=since)
            elif rel:
                detector.forget_below(rel)
        for path in changed:
            if path not in self.dirs:
                continue
            rel = self._rel(path)
            cand = self.rule.candidate_for(rel, detector.known, True) if rel else None
            if cand is not None and cand in detector.known and self.rule.unit == "folder":
                snap = detector.observe(cand, now, since=since)
                if snap is not None:
                    for sub, mtime in snap.dirs:
                        self._index(self._abs(sub), mtime, now)
                continue
            if cand is not None and cand in detector.known:
                # A companion folder of a multi-file format's sidecar pair (_scan_/ of scan.vsi) changed.
                detector.observe(cand, now, since=since)
            try:
                self._index(path, stat(path).st_mtime_ns, now)
            except FileNotFoundError:
                continue
            self.scan_subtree(rel, now, since=since, only_new=True)
        return len(changed) + len(gone)
