"""Exceptions of watchfolder.

Every error the package raises derives from :class:`WatchfolderError`.
Control-flow signals (a job was cancelled, a lease was lost) derive from
:class:`JobInterrupt` instead, so ``except WatchfolderError`` never swallows
them by accident.
"""

from __future__ import annotations


class WatchfolderError(Exception):
    """Base of every error raised by watchfolder."""


class ConfigError(WatchfolderError):
    """The configuration is invalid. ``problems`` lists one line per bad key."""

    def __init__(self, problems: list[str] | str):
        if isinstance(problems, str):
            problems = [problems]
        self.problems = list(problems)
        super().__init__("invalid configuration:\n  " + "\n  ".join(self.problems))


class StoreError(WatchfolderError):
    """The job store refused an operation."""


class JobNotFound(StoreError):
    def __init__(self, job_id: int):
        self.job_id = job_id
        super().__init__(f"no job with id {job_id}")


class InvalidTransition(StoreError):
    """The job is not in a state that allows the operation (e.g. retry a running job)."""


class AcquisitionError(WatchfolderError):
    """A sidecar, manifest or submitted job is invalid. The message says why and how to fix it."""


class ImportFailure(WatchfolderError):
    """An importer failed. Subclasses say whether trying again can help."""

    transient = False

    def __init__(self, message: str, *, config_error: bool = False):
        super().__init__(message)
        self.message = message
        # A permanent failure caused by the service's configuration (e.g. wrong
        # OMERO admin password) rather than by the acquisition: the admin must act.
        self.config_error = config_error


class TransientImportError(ImportFailure):
    """Worth retrying later: server unreachable, connection lost, timeout."""

    transient = True


class PermanentImportError(ImportFailure):
    """Retrying cannot help: unsupported file, unknown user, missing file."""


class JobInterrupt(BaseException):
    """Control flow: stop working on the current job now. Not an error."""


class JobCancelled(JobInterrupt):
    """The job was cancelled while running."""


class LeaseLost(JobInterrupt):
    """This worker no longer holds the job's lease (it expired and another may run it)."""


class ShuttingDown(JobInterrupt):
    """The worker is stopping and the grace period is over: release the job."""
