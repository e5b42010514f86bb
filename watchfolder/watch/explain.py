"""Why is my data not in yet: what the service thinks of any path under a watch folder.

:func:`explain` answers for one path (``watchfolder explain PATH``) by looking
at the disk the way the watcher does — the same exclude patterns, the same
detection rule, the same completeness check — and at the job store: the job
the acquisition became, or the pending entry a watcher recorded with its
reason. :func:`pending_view` turns the store's pending entries into what the
CLI, the API and the dashboard show (a "still being written" reason is
described from its times at the moment it is shown).

Nothing here changes anything: no job is queued, no file is touched.
"""

from __future__ import annotations

import fnmatch
import os
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config, WatchConfig
from ..errors import AcquisitionError
from ..job import JobState
from ..store.base import JobStore, PendingEntry
from . import acquisition as acq
from .detector import (
    Detector,
    Patterns,
    _os_reason,
    imported_jobs,
    imported_this,
    is_own_file,
    make_rule,
    own_name_folder_reason,
    pending_reason,
    read_receipt,
    unreadable_folder,
)


@dataclass
class Explanation:
    """The answer for one path. ``verdict`` is one word a script can test:

    ``outside`` (under no watch folder), ``not_found`` (no such path), ``watch_folder`` (the folder itself),
    ``ignored`` (excluded, a symlink, the service's own file), ``unreadable``, ``not_acquisition``,
    ``pending`` (not complete yet, or still being written), ``ready`` (complete,
    queued once quiet), ``rejected`` (will fail or has failed at detection),
    ``left_out`` (a file in a manifest acquisition's folder that its file list does not
    name: not imported, with the job the acquisition became if any), or
    ``job`` (it became job ``job_id``, in ``job_state``).
    """

    path: str
    verdict: str
    reason: str
    watch: str | None = None
    acquisition: str | None = None  # relative to the watch folder
    job_id: int | None = None
    job_state: str | None = None
    pending: dict[str, Any] | None = None
    details: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path, "verdict": self.verdict, "reason": self.reason, "watch": self.watch,
            "acquisition": self.acquisition, "job_id": self.job_id, "job_state": self.job_state,
            "pending": self.pending, "details": list(self.details),
        }


def pending_view(entries: list[PendingEntry], now: float | None = None) -> list[dict[str, Any]]:
    """The store's pending entries as shown to people: reasons described as of ``now``."""
    now = time.time() if now is None else now
    out = []
    for e in entries:
        item = e.to_dict()
        item["reason"] = pending_reason(e.kind, e.reason, e.last_change, e.quiet_until, now)
        item["waiting_for"] = max(0.0, now - e.first_seen)
        out.append(item)
    return out


def _watch_for(config: Config, path: str) -> tuple[WatchConfig, str, str] | None:
    """The watch folder holding ``path``: (watch, its resolved root, path relative to it)."""
    # The path's folder is resolved (a share may be reached through a link), its last
    # component is not: a symlink must be seen as one.
    head, tail = os.path.split(os.path.abspath(path))
    real = os.path.join(os.path.realpath(head), tail) if tail else os.path.realpath(head)
    best = None
    for watch in config.watch:
        root = os.path.realpath(watch.path)
        if real == root or real.startswith(root.rstrip("/") + "/"):
            if best is None or len(root) > len(best[1]):
                best = (watch, root, os.path.relpath(real, root).replace(os.sep, "/") if real != root else "")
    return best


def _looks_for(watch: WatchConfig) -> str:
    if watch.detection == "manifest" and watch.sidecars:
        return (f"this folder watches for {watch.manifest_name} manifests (a folder with {watch.manifest_name} in "
                f"it) and sidecar pairs (cells_01.czi with cells_01.czi{watch.sidecar_suffix})")
    if watch.detection == "manifest":
        return f"this folder watches for {watch.manifest_name} manifests (a folder with {watch.manifest_name} in it)"
    if watch.detection == "sidecar":
        return (f"this folder watches for data files with a sidecar beside them "
                f"(cells_01.czi with cells_01.czi{watch.sidecar_suffix})")
    return f"this folder takes folders laid out as {watch.layout} (owner and dataset from the path)"


def _acquisition_of(watch: WatchConfig, root: str, rel: str, is_dir: bool) -> str | None:
    """The acquisition (relative path) ``rel`` belongs to, by the watcher's own rule."""
    return make_rule(watch, Patterns(watch.include, watch.exclude)).acquisition_of(root, rel, is_dir)


def _pair_data(watch: WatchConfig, root: str, rel: str) -> str | None:
    """The data file of the sidecar pair whose descriptor is ``rel`` (``cells.czi`` for
    ``cells.czi.json`` with ``cells.czi`` beside it), or None. Not inside a folder acquisition
    (a manifest folder's or a layout folder's): there the descriptor is a file of its own."""
    suffix = watch.sidecar_suffix
    name = rel.rpartition("/")[2]
    if not name.endswith(suffix) or len(name) <= len(suffix) or is_own_file(name):
        return None
    data = rel[: -len(suffix)]
    full = os.path.join(root, data)
    if not os.path.lexists(full) or os.path.isdir(full) or os.path.isdir(os.path.join(root, rel)):
        return None
    return data if _acquisition_of(watch, root, data, False) in (None, data) else None


def _not_acquisition(watch: WatchConfig, root: str, rel: str, is_dir: bool) -> Explanation:
    reason = f"not an acquisition here: {_looks_for(watch)}"
    details = []
    full = os.path.join(root, rel)
    found = make_rule(watch, Patterns(watch.include, watch.exclude)).misplaced(root, rel, is_dir)
    if found is not None:
        # The watcher's words: it lists the same note as pending (kind misplaced or not_acquisition).
        noted, kind, why = found
        part = "" if noted == rel else f"part of {noted}: "
        return Explanation(full, "not_acquisition", part + why, watch.name, None,
                           details=[f"listed as pending ({kind})"])
    suffix = watch.sidecar_suffix
    head, _, data = rel.rpartition("/")
    stray = make_rule(watch, Patterns(watch.include, watch.exclude)).stray_sidecars(root, head, {data, data + suffix})
    if not is_dir and stray:
        # The watcher's rule and words (it lists the pair as pending with them).
        reason = stray[0][1]
    elif watch.detection != "sidecar" and not is_dir and os.path.isfile(full + watch.sidecar_suffix):
        details.append(f"{os.path.basename(full)}{watch.sidecar_suffix} beside it looks like a sidecar, but "
                       f"watch folder {watch.name!r} detects {watch.detection}s; use a sidecar watch folder, "
                       f"or put the data in a folder with a {watch.manifest_name} manifest")
    if watch.detection == "layout" and rel:
        depth = len([p for p in (watch.layout or "").strip("/").split("/") if p])
        have = rel.count("/") + 1
        if have < depth:
            details.append(f"this path is {have} level(s) deep; acquisitions are {depth} levels deep ({watch.layout})")
    return Explanation(full, "not_acquisition", reason, watch.name, None, details=details)


def explain(config: Config, store: JobStore | None, path: str, *, now: float | None = None) -> Explanation:
    """What the service thinks of ``path`` and why (see :class:`Explanation`). Never raises for a bad path."""
    now = time.time() if now is None else now
    found = _watch_for(config, path)
    if found is None:
        folders = ", ".join(f"{w.name} ({w.path})" for w in config.watch) or "none configured"
        return Explanation(os.path.abspath(path), "outside",
                           f"not under any watch folder; watch folders: {folders}")
    watch, root, rel = found
    full = os.path.join(root, rel) if rel else root
    if not rel:
        return Explanation(full, "watch_folder",
                           f"the watch folder {watch.name!r} itself ({watch.detection} detection); {_looks_for(watch)}",
                           watch.name)
    if not os.path.lexists(full):
        if os.path.lexists(full + watch.sidecar_suffix) and watch.detection != "layout":
            # A data file a sidecar names, not there yet: what the pair waits for.
            return Explanation(full, "not_found", f"{full} does not exist, but its sidecar "
                               f"{os.path.basename(full)}{watch.sidecar_suffix} is there and waits for it: copy "
                               "the data file there under that name (letter case included), or fix the "
                               "sidecar's name", watch.name)
        return Explanation(full, "not_found", f"{full} does not exist (check the spelling, or it was moved "
                           "away or imported and deleted)", watch.name)
    data_rel = _pair_data(watch, root, rel)
    if data_rel is not None:
        # The descriptor of a sidecar pair: the same answer as for its data file.
        out = explain(config, store, os.path.join(root, data_rel), now=now)
        out.path = full
        return out
    if is_own_file(rel.rpartition("/")[2]):
        if os.path.isdir(full) and not os.path.islink(full):
            return Explanation(full, "ignored", own_name_folder_reason(rel.rpartition("/")[2]), watch.name)
        return Explanation(full, "ignored", "written by watchfolder itself (a receipt or an error report)",
                           watch.name)
    # The watcher's own rule for excluded names, symbolic links and unreadable paths.
    detector = Detector(watch, root)
    refused = detector.refusal(rel)
    if refused is not None:
        kind, reason = refused
        if kind == "symlink" and os.path.islink(full) and not os.path.isdir(full):
            # A link to a file inside an acquisition: what that acquisition's look says of it (left
            # out, with why), as the job log and the mail do.
            acq_rel = _acquisition_of(watch, root, rel, False)
            if acq_rel is not None and acq_rel != rel:
                inside = _explain_acquisition(watch, root, acq_rel, full, store, now)
                if inside.verdict == "left_out":
                    return inside
        if kind == "excluded" and store is not None:
            reason = _after_import(watch, root, detector, rel, reason, store, now)
        return Explanation(full, "unreadable" if kind == "unreadable" else "ignored", reason, watch.name)
    is_dir = os.path.isdir(full)
    # A folder the service cannot look into: what the watcher lists as pending (kind unreadable).
    unreadable = unreadable_folder(full) if is_dir else None
    if unreadable is not None:
        return Explanation(full, "unreadable", unreadable, watch.name)
    if watch.include and not is_dir and not any(
        fnmatch.fnmatchcase(rel.rpartition("/")[2], p) or fnmatch.fnmatchcase(rel, p) for p in watch.include
    ):
        return Explanation(full, "ignored", f"ignored: matches none of the include patterns "
                           f"{', '.join(watch.include)}", watch.name)
    acq_rel = _acquisition_of(watch, root, rel, is_dir)
    if acq_rel is None:
        return _not_acquisition(watch, root, rel, is_dir)
    return _explain_acquisition(watch, root, acq_rel, full, store, now)


def _after_import(watch: WatchConfig, root: str, detector: Detector, rel: str, reason: str, store: JobStore,
                  now: float) -> str:
    """An excluded name inside an acquisition already imported: renaming it would not import it
    (a change after an import is not imported again), so that is said instead of "rename it"."""
    hint, acq_rel = detector.rename_hint(rel)
    if acq_rel is None:
        return reason
    try:
        outcome = detector.rule.build(root, acq_rel, now)
    except OSError:
        return reason
    job = store.find(outcome.spec.key()) if outcome.spec is not None else None
    if job is None or job.state != JobState.SUCCEEDED:
        # Changed since (a temporary file in it now makes it look like a copy in progress):
        # the watcher's rule for a change after an import (receipt, same folder and files).
        job = _changed_after_import(watch, root, acq_rel, store)
    if job is None:
        return reason
    return reason.replace(hint, f"renaming it would not import it: it is part of acquisition {acq_rel}, imported "
                                f"as job {job.id}, and a change after an import is not imported again (drop it "
                                "as a new acquisition to import it)")


def _unlisted(watch: WatchConfig, root: str, acq_rel: str, full: str) -> str | None:
    """Why the file ``full`` inside manifest acquisition ``acq_rel`` is not imported (its manifest
    lists files, and not this one), or None: the watcher's rule (:func:`acquisition.unlisted_files`)."""
    folder = os.path.join(root, acq_rel)
    manifest = os.path.join(folder, watch.manifest_name)
    if watch.detection != "manifest" or full == manifest or not os.path.isdir(folder) or os.path.isdir(full):
        return None
    try:
        descriptor = acq.read_descriptor(Path(manifest), what="manifest", within=root,
                                         allow_hard_links=watch.allow_hard_links)
    except (AcquisitionError, OSError):
        return None  # the acquisition's own explanation says what is wrong with the manifest
    if descriptor.files is None:
        return None
    inner = os.path.relpath(full, folder).replace(os.sep, "/")
    if unicodedata.normalize("NFC", inner) in {unicodedata.normalize("NFC", e.path) for e in descriptor.files}:
        return None
    return (f"{inner} is not listed in the manifest ({watch.manifest_name} lists {len(descriptor.files)} "
            f"file(s))")


def _left_out(outcome: Any, root: str, acq_rel: str, full: str) -> str | None:
    """What the acquisition's own look left out about ``full`` (a named pipe, an excluded name, a
    link, an unreadable folder: its ``left_out`` notes, as the job log and mail give them), or None."""
    folder = os.path.join(root, acq_rel)
    if outcome.spec is None or full == folder or not full.startswith(folder + os.sep):
        return None
    inner = os.path.relpath(full, folder).replace(os.sep, "/")
    for note in outcome.spec.extra.get("left_out") or ():
        if isinstance(note, str) and (note.startswith(inner + " (") or note.startswith(inner + "/ (")):
            return note
    return None


def _changed_after_import(watch: WatchConfig, root: str, acq_rel: str, store: JobStore | None) -> Any:
    """The succeeded job that imported ``acq_rel`` before it changed in place (its receipt names
    it, or the store's newest success for it, and the watcher's identity rule holds), or None."""
    if store is None:
        return None
    job_id, _receipt = read_receipt(root, acq_rel)
    if job_id is None:
        # No receipt (not written yet, or deleted): the store's newest success for it, as a
        # restarted watcher looks it up (the watch folder's newest 1,000).
        try:
            job = imported_jobs(store, watch.name).get(acq_rel)
        except Exception:  # the store busy
            return None
        if job is None or not imported_this(job, watch.name, root, acq_rel):
            return None
        try:
            return store.get(job.id)  # with its files and history (the list leaves them out)
        except Exception:  # the store busy
            return None
    try:
        job = store.get(job_id)
    except Exception:  # not in this database (restored from a backup), or the store busy
        return None
    return job if imported_this(job, watch.name, root, acq_rel) else None


def _explain_acquisition(
    watch: WatchConfig, root: str, acq_rel: str, full: str, store: JobStore | None, now: float
) -> Explanation:
    part = "" if os.path.join(root, acq_rel) == full else f"part of acquisition {acq_rel}: "
    pending = None
    if store is not None:
        for entry in store.pending_list(watch=watch.name, limit=1_000_000):
            if entry.path == acq_rel:
                pending = pending_view([entry], now)[0]
    rule = make_rule(watch, Patterns(watch.include, watch.exclude))
    try:
        outcome = rule.build(root, acq_rel, now)
    except OSError as exc:  # a file or folder in it cannot be read: the watcher's words for it
        where = getattr(exc, "filename", None) or os.path.join(root, acq_rel)
        return Explanation(full, "unreadable", part + _os_reason(exc, where), watch.name, acq_rel, pending=pending)
    out = Explanation(full, "pending", "", watch.name, acq_rel, pending=pending)
    unlisted = _unlisted(watch, root, acq_rel, full)
    advice = "to import it too, add it to the manifest's \"files\" before the acquisition is queued"
    if unlisted is None:
        unlisted = _left_out(outcome, root, acq_rel, full)
        advice = "the job log and the owner's mail name it too"
    # The watcher's rule: a job recorded for the acquisition as it is now (a "wait" one that
    # failed on missing_timeout included) is what became of it.
    if outcome.spec is not None and outcome.kind in ("enqueue", "reject", "wait") and store is not None:
        job = store.find(outcome.spec.key())
        if job is not None:
            out.verdict, out.job_id, out.job_state = "job", job.id, str(job.state)
            why = f": {job.error.message}" if job.error else ""
            out.reason = f"{part}became job {job.id}, {job.state}{why}"
            if unlisted is not None:
                out.verdict = "left_out"
                out.reason = (f"not part of the import: {unlisted}; acquisition {acq_rel} became job {job.id}, "
                              f"{job.state}, without it (to import it, drop it as a new acquisition)")
            return out
    earlier = _changed_after_import(watch, root, acq_rel, store) if outcome.kind in ("enqueue", "reject",
                                                                                    "changed") else None
    if earlier is not None:
        # The watcher's rule: changed in place after its import, never imported again.
        out.verdict, out.job_id, out.job_state = "job", earlier.id, str(earlier.state)
        out.reason = (f"{part}became job {earlier.id}, {earlier.state}; changed after that import, so not "
                      "imported again (to import new data, drop it as a new acquisition)")
        return out
    if unlisted is not None:
        out.verdict = "left_out"
        out.reason = f"not part of the import: {unlisted}; acquisition {acq_rel} is imported without it ({advice})"
        return out
    if outcome.kind == "gone":
        out.verdict, out.reason = "not_acquisition", f"{part}{outcome.reason or 'no longer an acquisition'}"
    elif outcome.kind == "ignore":
        out.verdict, out.reason = "ignored", f"{part}ignored: {outcome.reason}"
    elif outcome.kind == "reject":
        out.verdict, out.reason = "rejected", f"{part}will fail once quiet: {outcome.reason}"
    elif pending is not None and pending["kind"] == "writing":
        out.reason = part + pending["reason"]
    elif outcome.kind == "wait":
        out.reason = part + outcome.reason
    elif pending is not None and pending.get("reason"):
        # Complete on disk, yet the watcher holds it (changed while its job runs): its words, as
        # pending shows them, not "queued once quiet" (an outside try found the two contradicting).
        out.reason = part + pending["reason"]
    else:
        out.verdict = "ready"
        out.reason = (f"{part}complete: queued once nothing has changed for {watch.quiet_period:g} s "
                      "(a watcher must be running: watchfolder run or watchfolder watch)")
    if pending is not None:
        out.details.append(f"first seen {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(pending['first_seen']))}")
    return out
