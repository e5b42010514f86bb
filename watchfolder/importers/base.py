"""The importer interface shared by every backend."""

from __future__ import annotations

import abc
import errno
from collections.abc import Sequence
from typing import Any

from ..job import Job

#: errnos that say a path cannot exist (missing, a name too long to create, a file where a
#: folder would be): a cleanup that meets one has nothing to remove there and is done.
NOTHING_THERE = frozenset({errno.ENOENT, errno.ENAMETOOLONG, errno.ENOTDIR})


class ImportContext(abc.ABC):
    """What a running job offers its importer.

    ``progress`` records how far the import is and doubles as a checkpoint: it
    raises :class:`~watchfolder.errors.JobCancelled`, ``LeaseLost`` or
    ``ShuttingDown`` when the importer must stop. Importers call it often (at
    least every few seconds while working); it is cheap and throttles itself.
    """

    job: Job

    @abc.abstractmethod
    def progress(
        self,
        phase: str,
        bytes_done: int = 0,
        bytes_total: int = 0,
        files_done: int = 0,
        files_total: int = 0,
    ) -> None: ...

    @abc.abstractmethod
    def log(self, message: str | Sequence[str]) -> None:
        """Append a line to the job's log, or one line per item of a sequence (never put secrets here).

        Control characters in names are escaped by the log itself (a newline shows as ``\\n``).
        """

    @property
    @abc.abstractmethod
    def log_path(self) -> str:
        """Path of the job's log file, for importers that redirect a child's stderr there."""

    def checkpoint(self) -> None:
        """Raise if the importer must stop; same as ``progress`` without new figures."""

    def remember(self, **facts: Any) -> None:
        """Keep ``facts`` (JSON values) in the job's ``spec.extra`` whatever its outcome, e.g.
        ``owner_email`` (the owner's address as OMERO has it) for the failure mail. Best effort:
        a store that refuses the write loses them (the job goes on)."""


class Importer(abc.ABC):
    """A backend. ``run`` returns the job result (a JSON-able dict) or raises
    :class:`~watchfolder.errors.TransientImportError` /
    :class:`~watchfolder.errors.PermanentImportError`."""

    name: str = ""

    @abc.abstractmethod
    def run(self, job: Job, ctx: ImportContext) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]:
        """Importer health for the status view: at least ``{"ok": bool}``."""
        return {"ok": True}

    # -- back-pressure (see watchfolder.backpressure) ---------------------------

    def target(self) -> str:
        """The name of what this importer writes to, e.g. ``omero:host:4064`` or ``archive:/data``."""
        return self.name

    def max_concurrent(self) -> int | None:
        """Imports at once against the target from this process (None: as many as workers)."""
        return None

    def pause_reason(self) -> str | None:
        """A reason to hold the target's jobs before trying any (archive volume nearly full), or None.

        Called before claiming, at most every few seconds; must be cheap.
        """
        return None

    def space_reason(self, need_bytes: int) -> str | None:
        """Why ``need_bytes`` more cannot be written to the target now (too little free space),
        or None. Importers that do not write to a volume of their own keep this default."""
        return None

    def probe(self) -> str | None:
        """Is the target back? None when it is, else why not. Called while paused, every
        ``importer.pause.probe_interval`` seconds; may take a few seconds."""
        return self.pause_reason()

    def cleanup(self, job: Job) -> list[str]:
        """Remove what ``job`` wrote to the target when it ended without success (cancelled,
        failed for good); returns the paths removed. Idempotent: called again, it finds
        nothing. A path that cannot exist (an ``OSError`` with an errno in
        :data:`NOTHING_THERE`) is nothing to remove, not a failure. Importers that write
        nothing of their own keep this default."""
        return []

    def close(self) -> None:
        """Release resources at shutdown."""
