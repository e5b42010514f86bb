"""The CloudEvents 1.0 JSON envelope of a stored event (https://github.com/cloudevents/spec, JSON format)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

SPECVERSION = "1.0"
#: Types of job events: ``org.watchfolder.job.`` + the state the job entered, and the milestones.
JOB_STATES = ("queued", "running", "succeeded", "retry_wait", "failed", "cancelled")
JOB_PROGRESS = "org.watchfolder.job.progress"
WATCHER_HEALTH = "org.watchfolder.watcher.health"
TYPES = tuple(f"org.watchfolder.job.{s}" for s in JOB_STATES) + (JOB_PROGRESS, WATCHER_HEALTH)


def envelope(event: dict[str, Any], source: str) -> dict[str, Any]:
    """The CloudEvent of a stored event (``{"id", "at", "type", "subject", "data", ...}``).

    ``id`` is the store's event id as a string: unique within ``source`` and
    stable across redeliveries, so a receiver de-duplicates on it.
    """
    return {
        "specversion": SPECVERSION,
        "id": str(event["id"]),
        "source": source,
        "type": event["type"],
        "subject": event["subject"],
        "time": datetime.fromtimestamp(event["at"], UTC).isoformat().replace("+00:00", "Z"),
        "datacontenttype": "application/json",
        "data": event["data"],
    }


def encode(event: dict[str, Any], source: str) -> bytes:
    """The CloudEvent as compact UTF-8 JSON (the exact bytes that are signed and sent)."""
    return json.dumps(envelope(event, source), separators=(",", ":"), ensure_ascii=False).encode()


def state_of(event: dict[str, Any]) -> str:
    """The last part of the type: a job's state, ``progress``, or ``health``."""
    return event["type"].rsplit(".", 1)[-1]
