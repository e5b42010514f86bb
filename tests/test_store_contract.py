"""Runs the storage contract (``store_contract.py``) against every store implementation."""

from __future__ import annotations

import pytest
from store_contract import *  # noqa: F403  (the contract's tests, collected here)

from watchfolder.job import RetryPolicy
from watchfolder.store import SQLiteStore
from watchfolder.store.postgres import PostgresStore

OPTIONS = {"lease_seconds": 30, "retry": RetryPolicy(3, (10.0, 60.0))}


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request, tmp_path):
    """A factory of handles on one fresh database of the backend under test; closes them all."""
    opened = []
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")

    def make():
        if request.param == "sqlite":
            s = SQLiteStore(tmp_path / "db" / "watchfolder.db", **OPTIONS)
        else:
            s = PostgresStore(url, logs_dir=tmp_path / "logs", **OPTIONS)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


@pytest.fixture
def store(make_store):
    return make_store()
