"""Post-actions on watched acquisitions once their job has ended.

After success: ``keep`` (and write a receipt beside the acquisition), ``move`` to
a done folder (receipt beside it there), or ``delete`` (only after a verified
success, and only the files that were imported). After failure: ``keep`` or
``move`` to a failed folder, with an error report beside the data. Source files
are never removed on failure, and a move never overwrites anything.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

from ..config import WatchAction, WatchConfig
from ..job import Job, JobState
from .detector import ERROR_SUFFIX, RECEIPT_SUFFIX, acquisition_key


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
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
        candidate = dest.with_name(f"{dest.name} ({n})")
        if not os.path.lexists(candidate):
            return candidate
        n += 1


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


def error_report(job: Job) -> str:
    spec = job.spec
    reason = job.error.message if job.error else ("cancelled" if job.state == JobState.CANCELLED else "unknown")
    lines = [
        f"Import of {spec.extra.get('acquisition') or spec.root} did not succeed (job {job.id}, {job.state}).",
        "",
        f"Reason: {reason}",
        "",
        "The files were left as they were. Fix the problem named above and drop the",
        "acquisition again (a changed acquisition is a new job), or ask the facility",
        f"admin to retry job {job.id}.",
        "",
        f"Owner: {spec.owner or '(unknown)'}",
        f"Target: {spec.target.label or '(none)'}",
        f"Files: {len(spec.files)}",
    ]
    return "\n".join(lines) + "\n"


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
        return main.with_name(main.name + suffix)

    def _move(self, paths: list[Path], rel: str, folder: Path) -> Path:
        dest_main = _unique(folder / rel if rel else folder / paths[0].name)
        dest_main.parent.mkdir(parents=True, exist_ok=True)
        # shutil.move copies across filesystems and removes the source only after
        # the copy succeeded, so a failed move never loses the original.
        shutil.move(str(paths[0]), str(dest_main))
        for extra in paths[1:]:
            if os.path.lexists(extra):
                shutil.move(str(extra), str(_unique(dest_main.with_name(dest_main.name + extra.name[len(paths[0].name):]))))
        return dest_main

    def _success(self, job: Job, main: Path, paths: list[Path], rel: str, action: WatchAction) -> str:
        text = json.dumps(receipt(job), indent=2, ensure_ascii=False) + "\n"
        if action.action == "move" and action.folder is not None:
            dest = self._move(paths, rel, action.folder)
            _write_atomic(self._beside(dest, RECEIPT_SUFFIX), text)
            return f"post-action: moved to {dest}"
        if action.action == "delete":
            problem = self._unverified(job, main)
            if problem:
                _write_atomic(self._beside(main, RECEIPT_SUFFIX), text)
                return f"post-action: kept, not deleted ({problem}); receipt written"
            removed = self._delete(job, main)
            return f"post-action: deleted {removed} file(s)"
        _write_atomic(self._beside(main, RECEIPT_SUFFIX), text)
        return f"post-action: kept; receipt {self._beside(main, RECEIPT_SUFFIX).name}"

    def _failure(self, job: Job, main: Path, paths: list[Path], rel: str, action: WatchAction) -> str:
        text = error_report(job)
        if action.action == "move" and action.folder is not None:
            dest = self._move(paths, rel, action.folder)
            _write_atomic(self._beside(dest, ERROR_SUFFIX), text)
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
                digest = hashlib.sha256(Path(spec.root, spec.extra["descriptor"]).read_bytes()).hexdigest()
            except OSError:
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
