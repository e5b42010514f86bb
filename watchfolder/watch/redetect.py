"""Reading an acquisition again from disk when its job is retried.

A job rejected at detection (invalid manifest, a symbolic link, files missing)
holds what was known then, often no files at all. Retrying it must not import
that stale picture: the acquisition is detected again, by the same rule as the
watcher (or, for a job submitted by path, as ``submit`` reads it), and the job
goes on with what is on disk now, or fails again with today's reason.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from ..config import Config
from ..errors import AcquisitionError, classify_os_error
from ..job import Job, JobSpec
from . import acquisition as acq
from .detector import Detector


def redetect(job: Job, config: Config, *, now: float | None = None) -> JobSpec:
    """The job's acquisition as it is on disk now; raises :class:`AcquisitionError` saying why it cannot be imported."""
    now = time.time() if now is None else now
    spec = job.spec
    watch_name, rel = spec.extra.get("watch"), spec.extra.get("acquisition")
    if watch_name and rel:
        watch = next((w for w in config.watch if w.name == watch_name), None)
        if watch is None:
            raise AcquisitionError(
                f"watch folder {watch_name!r} is no longer configured, so {spec.root} cannot be read again; "
                "drop the acquisition into a configured watch folder"
            )
        root = os.path.realpath(watch.path)
        detector = Detector(watch, root)
        refused = detector.refusal(rel)
        if refused is not None:
            raise AcquisitionError(f"{os.path.join(root, rel)}: {refused[1]}")
        try:
            outcome = detector.rule.build(root, rel, now)
        except OSError as exc:
            raise AcquisitionError(
                classify_os_error(exc, exc.filename or os.path.join(root, rel), "read").message
            ) from None
        if outcome.kind == "enqueue" and outcome.spec is not None:
            extra = {k: v for k, v in outcome.spec.extra.items() if k != "rejected"}
            return dataclasses.replace(outcome.spec, idempotency_key=spec.idempotency_key, extra=extra)
        where = os.path.join(root, rel)
        if outcome.kind == "gone":
            raise AcquisitionError(f"{where} is no longer there; drop the acquisition again")
        if outcome.kind == "wait":
            raise AcquisitionError(f"{where} is still incomplete: {outcome.reason}; retry once it is complete")
        raise AcquisitionError(outcome.reason or f"{where} is not an acquisition")
    # Submitted by path (API, command line): read it as submit does, keeping what the client said.
    root = Path(spec.root)
    path = root / spec.files[0].path if spec.extra.get("unit") == "file" and spec.files else root
    fresh = acq.from_path(
        path, source=spec.source, owner=spec.owner or None, group=spec.group, email=spec.email,
        target=spec.target if spec.target.to_dict() else None, name=spec.name, description=spec.description,
        annotations=dict(spec.annotations), idempotency_key=spec.idempotency_key,
    )
    return dataclasses.replace(fresh, extra={**spec.extra, **fresh.extra, "rejected": False},
                               session_key=spec.session_key, importer=spec.importer,
                               omero_host=spec.omero_host, omero_port=spec.omero_port)
