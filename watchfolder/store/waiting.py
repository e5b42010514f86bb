"""A stand-in for a store that cannot be reached yet, so a web server can listen before its database answers.

``serve`` (and ``run`` with the web server) listen at once; until the store
opens, every store call of the API raises
:class:`~watchfolder.errors.StoreUnavailable`, which the API answers with 503
and ``Retry-After`` (``web/http.py``), and ``/health`` says why. Once the
service has opened the store it calls :meth:`WaitingStore.attach`, and the
stand-in hands every call to it.
"""

from __future__ import annotations

import threading
from typing import Any

from ..errors import StoreError, StoreUnavailable
from .base import JobStore


class WaitingStore:
    """Stands for the store of ``config`` until :meth:`attach`; ``reason``: why it cannot be opened now."""

    def __init__(self, backend: str, location: str, reason: StoreError):
        self.backend = backend
        self.location = location
        self._reason = reason
        self._store: JobStore | None = None
        self._attached = threading.Event()

    def set_reason(self, reason: StoreError) -> None:
        """Why the store cannot be opened now (the latest attempt's error)."""
        self._reason = reason

    def attach(self, store: JobStore) -> None:
        """From now on every call goes to ``store``."""
        self._store = store
        self._attached.set()

    @property
    def attached(self) -> bool:
        return self._attached.is_set()

    # What status and /health ask before the store is there.

    def describe(self) -> dict[str, Any]:
        if self._store is not None:
            return self._store.describe()
        return {"backend": self.backend, "location": self.location, "error": f"not opened yet: {self._reason}"}

    def ping(self) -> bool:
        return self._store.ping() if self._store is not None else False

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def __getattr__(self, name: str) -> Any:
        store = self.__dict__.get("_store")
        if store is not None:
            return getattr(store, name)
        if callable(getattr(JobStore, name, None)):
            return self._unavailable
        raise AttributeError(name)

    def _unavailable(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailable(f"the job store is not reachable yet: {self._reason}")
