"""The ``field`` fixture: one real service on a drop folder (see drops.py)."""

from __future__ import annotations

import pytest
from drops import Field


@pytest.fixture
def field(tmp_path, make_config):
    f = Field(tmp_path, make_config)
    yield f
    f.stop()
