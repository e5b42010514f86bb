"""The ``field`` fixture: one real service on a drop folder (see drops.py)."""

from __future__ import annotations

import threading

import pytest
from drops import Field

from watchfolder.importers import archive


@pytest.fixture
def field(tmp_path, make_config):
    f = Field(tmp_path, make_config)
    yield f
    f.stop()


@pytest.fixture
def paused_copy(monkeypatch):
    """The first copied file of the run holds its job until ``go`` is set (a slow copy, made certain)."""
    held, go = threading.Event(), threading.Event()
    real = archive.ArchiveImporter._copy_one

    def copy_one(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if not go.is_set():
            held.set()
            go.wait(20)
        return out

    monkeypatch.setattr(archive.ArchiveImporter, "_copy_one", copy_one)
    yield held, go
    go.set()
