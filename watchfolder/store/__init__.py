"""The job store: durable jobs, their history, the dispatch queue and the mail outbox.

:class:`JobStore` (``base.py``) is the storage contract; :class:`SQLiteStore`
(``sqlite.py``) implements it on one SQLite file, the embedded default, and
``PostgresStore`` (``postgres.py``, imported on demand: psycopg is an optional
dependency) on PostgreSQL, for several hosts. ``open_store(config)`` builds
the store the config's ``store.url`` names.
"""

from __future__ import annotations

from .base import JobStore, Mail, MailComposer, OutboxMail, PendingEntry
from .sqlite import SQLiteStore

__all__ = ["JobStore", "Mail", "MailComposer", "OutboxMail", "PendingEntry", "SQLiteStore", "open_store"]


def open_store(config, composer: MailComposer | None = None, *, service: bool = False) -> JobStore:
    """The job store for ``config`` (a :class:`watchfolder.config.Config`).

    ``composer`` builds the mails of a job that just finished; ``service``: a
    long-running process, which logs the store's outages (``store/outage.py``)
    and a full data disk (``store/space.py``) where a short command only reports its error. Raises
    :class:`~watchfolder.errors.StoreError` when the store cannot be opened
    (:class:`~watchfolder.errors.StoreRefused`: a configuration error;
    :class:`~watchfolder.errors.StoreUnavailable`: try again later).
    """
    if config.store.backend == "postgresql":
        from .postgres import PostgresStore

        return PostgresStore.from_config(config, composer=composer, log_outages=service)
    return SQLiteStore.from_config(config, composer=composer, log_faults=service)
