"""Post-actions on watched acquisitions once their job has ended.

After success: ``keep`` (and write a receipt beside the acquisition), ``move`` to
a done folder (receipt beside it there), or ``delete`` (only after a verified
success, and only the files that were imported). After failure: ``keep`` or
``move`` to a failed folder, with an error report beside the data. Source files
are never removed on failure, and a move never overwrites anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
import time
from pathlib import Path
from typing import Any

from .. import safefs
from ..config import WatchAction, WatchConfig
from ..filenames import NAME_MAX, beside, fit_name
from ..job import Job, JobState, printable
from .acquisition import MAX_DESCRIPTOR_BYTES
from .detector import ERROR_SUFFIX, RECEIPT_SUFFIX, acquisition_key


def _write_atomic(path: Path, text: str) -> None:
    # Hidden, and still holding the marker's suffix when shortened (never taken for data).
    name, marker = path.name, ""
    for own in (RECEIPT_SUFFIX, ERROR_SUFFIX):
        if name.endswith(own):
            name, marker = name[: -len(own)], own
    tmp = path.with_name("." + fit_name(name, f"{marker}.tmp-{os.getpid()}", limit=NAME_MAX - 1))
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _unique(dest: Path) -> Path:
    """``dest``, or ``dest (2)``, ``dest (3)``… whichever does not exist yet."""
    if not os.path.lexists(dest):
        return dest
    n = 2
    while True:
        candidate = dest.with_name(fit_name(dest.name, f" ({n})"))
        if not os.path.lexists(candidate):
            return candidate
        n += 1


def _move_one(src: Path, dest: Path, job_id: int) -> None:
    """Move ``src`` to ``dest`` (which this job's move owns); safe to call again after a crash."""
    if not os.path.lexists(src):
        return  # moved by an earlier attempt
    if os.path.lexists(dest):
        # The copy completed and was renamed into place; removing the source was interrupted.
        _remove(src)
        return
    try:
        os.rename(src, dest)  # same filesystem: atomic
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    staging = dest.with_name(f".{dest.name}.wf-{job_id}.moving")
    if os.path.lexists(staging):
        _remove(staging)  # a copy interrupted by a crash: start it again
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, staging, symlinks=True)
    else:
        shutil.copy2(src, staging, follow_symlinks=False)
    os.rename(staging, dest)
    _remove(src)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def receipt(job: Job) -> dict[str, Any]:
    """The receipt's content: which job, how it ended, and where the data went."""
    spec = job.spec
    return {
        "job_id": job.id,
        "state": str(job.state),
        "owner": spec.owner,
        "target": spec.target.to_dict(),
        "files": len(spec.files),
        "bytes": spec.total_bytes(),
        "result": job.result,
        "error": job.error.to_dict() if job.error else None,
        "finished_at": job.finished_at,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(job.finished_at or time.time())),
        "watch": spec.extra.get("watch"),
        "acquisition": spec.extra.get("acquisition"),
    }


def error_report(job: Job, *, moved: bool = False) -> str:
    spec = job.spec
    reason = job.error.message if job.error else ("cancelled" if job.state == JobState.CANCELLED else "unknown")
    lines = [
        f"Import of {spec.extra.get('acquisition') or spec.root} did not succeed (job {job.id}, {job.state}).",
        "",
        f"Reason: {reason}",
        "",
        ("The files were moved here, unchanged." if moved else "The files were left as they were.")
        + " Fix the problem named above and drop the",
        "acquisition again (a changed acquisition is a new job), or ask the facility",
        f"admin to retry job {job.id}.",
        "",
        f"Owner: {spec.owner or '(unknown)'}",
        f"Target: {spec.target.label or '(none)'}",
        f"Files: {len(spec.files)}",
    ]
    return "".join(printable(line) + "\n" for line in lines)  # a name cannot break a line


class PostActions:
    """Applies a watch folder's ``on_success``/``on_failure`` to finished jobs."""

    def __init__(self, watch: WatchConfig, root: str):
        self.watch = watch
        self.root = root

    def _parts(self, job: Job) -> tuple[Path, list[Path], str]:
        """(the acquisition's main path, every path to move with it, its relative path)."""
        spec = job.spec
        rel = spec.extra.get("acquisition") or ""
        main = Path(self.root, rel) if rel else Path(spec.root)
        paths = [main]
        if spec.extra.get("unit") == "file" or self.watch.detection == "sidecar":
            descriptor = spec.extra.get("descriptor")
            if descriptor:
                paths.append(Path(spec.root, descriptor))
        return main, paths, rel

    def apply(self, job: Job) -> str:
        """Do the post-action for a finished job; returns a note for the job's history."""
        main, paths, rel = self._parts(job)
        if not os.path.lexists(main):
            return f"post-action skipped: {main} is no longer there"
        if job.state == JobState.SUCCEEDED:
            return self._success(job, main, paths, rel, self.watch.on_success)
        return self._failure(job, main, paths, rel, self.watch.on_failure)

    def _beside(self, main: Path, suffix: str) -> Path:
        """``<main>.watchfolder-receipt.json`` etc., shortened when too long (:func:`filenames.beside`)."""
        return beside(main, suffix)

    def _move(self, job: Job, paths: list[Path], rel: str, folder: Path) -> Path:
        """Move the acquisition (and its descriptor) into ``folder``; idempotent and crash-safe.

        The destination is chosen once and recorded (``<folder>/.watchfolder-moves/<job>.json``)
        before anything moves, so an attempt interrupted at any point (kill -9 in the middle
        of a copy to another filesystem) resumes into the same place instead of making a
        partial duplicate ``X (2)``. Across filesystems each path is copied to a hidden
        staging name, renamed into place, and only then removed from the drop folder.
        """
        marker = folder / ".watchfolder-moves" / f"{job.id}.json"
        resumed = marker.exists()
        if resumed:
            dest_main = Path(json.loads(safefs.read_file(marker, 65536, what="move record"))["destination"])
        else:
            dest_main = _unique(folder / rel if rel else folder / paths[0].name)
            marker.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(marker, json.dumps({"job_id": job.id, "destination": str(dest_main)}))
        dest_main.parent.mkdir(parents=True, exist_ok=True)
        _move_one(paths[0], dest_main, job.id)
        for extra in paths[1:]:
            dest = dest_main.with_name(fit_name(dest_main.name, extra.name[len(paths[0].name):]))
            if os.path.lexists(extra) and os.path.lexists(dest) and not resumed:
                dest = _unique(dest)
            _move_one(extra, dest, job.id)
        marker.unlink(missing_ok=True)
        return dest_main

    def _success(self, job: Job, main: Path, paths: list[Path], rel: str, action: WatchAction) -> str:
        # An error report an earlier failed job of this acquisition left beside it is out of date
        # now: removed once the success is marked, so the receipt is the only marker.
        stale = self._stale_report(main)
        text = json.dumps(receipt(job), indent=2, ensure_ascii=False) + "\n"
        if action.action == "move" and action.folder is not None:
            dest = self._move(job, paths, rel, action.folder)
            _write_atomic(self._beside(dest, RECEIPT_SUFFIX), text)
            return f"post-action: moved to {dest}" + self._drop_stale(stale)
        if action.action == "delete":
            problem = self._unverified(job, main)
            if problem:
                _write_atomic(self._beside(main, RECEIPT_SUFFIX), text)
                return f"post-action: kept, not deleted ({problem}); receipt written" + self._drop_stale(stale)
            removed = self._delete(job, main)
            return f"post-action: deleted {removed} file(s)" + self._drop_stale(stale)
        _write_atomic(self._beside(main, RECEIPT_SUFFIX), text)
        return f"post-action: kept; receipt {self._beside(main, RECEIPT_SUFFIX).name}" + self._drop_stale(stale)

    def _stale_report(self, main: Path) -> Path | None:
        """The error report beside ``main`` (a regular file, as :meth:`_failure` writes it), or None."""
        path = self._beside(main, ERROR_SUFFIX)
        try:
            return path if stat.S_ISREG(os.lstat(path).st_mode) else None
        except OSError:
            return None

    @staticmethod
    def _drop_stale(path: Path | None) -> str:
        """Remove an out-of-date error report; the note for the job's history ('' when none)."""
        if path is None:
            return ""
        try:
            path.unlink()
        except FileNotFoundError:
            return ""
        except OSError as exc:  # the receipt is written: that stays the post-action's outcome
            return f"; could not remove the error report of an earlier attempt ({path.name}): {exc.strerror}"
        return f"; removed the error report of an earlier attempt ({path.name})"

    def _failure(self, job: Job, main: Path, paths: list[Path], rel: str, action: WatchAction) -> str:
        text = error_report(job)
        if action.action == "move" and action.folder is not None:
            dest = self._move(job, paths, rel, action.folder)
            _write_atomic(self._beside(dest, ERROR_SUFFIX), error_report(job, moved=True))
            return f"post-action: moved to {dest} with an error report"
        _write_atomic(self._beside(main, ERROR_SUFFIX), text)
        return f"post-action: kept; error report {self._beside(main, ERROR_SUFFIX).name}"

    def _unverified(self, job: Job, main: Path) -> str:
        """Why deleting would be unsafe, or '' when the files on disk are exactly those imported.

        The importer verified its copy (checksums) or the job would not have
        succeeded; what remains to check is that nothing changed on disk since
        the acquisition was detected: its idempotency key, recomputed from the
        descriptor's bytes and each file's size and mtime, must be the same.
        """
        result = job.result or {}
        if result.get("verified") is False:
            return "the importer did not verify the copy"
        if result.get("orphaned"):
            return "the images were imported but not linked to their target"
        spec = job.spec
        found = []
        for entry in spec.files:
            try:
                found.append((entry, os.stat(Path(spec.root, entry.path))))
            except OSError:
                return f"{entry.path} is gone"
        digest = ""
        if spec.extra.get("descriptor"):
            try:
                raw = safefs.read_file(Path(spec.root, spec.extra["descriptor"]), MAX_DESCRIPTOR_BYTES,
                                       within=spec.root, what="manifest",
                                       allow_hard_links=self.watch.allow_hard_links)
                digest = hashlib.sha256(raw).hexdigest()
            except (OSError, safefs.UnsafePath):
                return f"{spec.extra['descriptor']} is gone"
        key = acquisition_key(self.watch.name, spec.extra.get("acquisition") or "", digest, found)
        if key != job.idempotency_key:
            return "the files changed since they were detected"
        return ""

    def _delete(self, job: Job, main: Path) -> int:
        spec = job.spec
        targets = [Path(spec.root, f.path) for f in spec.files]
        descriptor = spec.extra.get("descriptor")
        if descriptor:
            targets.append(Path(spec.root, descriptor))
        removed = 0
        for path in targets:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if main.is_dir():
            # Remove folders left empty, deepest first; anything not imported stays.
            for folder, _dirs, _files in sorted(os.walk(main), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        return removed
