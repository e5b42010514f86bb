"""Shared by the CLI tests that run ``python -m watchfolder`` as a subprocess: the example
acquisition, a site config's text (the ``site_cfg`` and ``site_store`` fixtures in conftest.py
write and open it), and a clean environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SLIDE3 = REPO / "examples" / "acquisitions" / "slide3"

SITE_YAML = (
    "data_dir: data\n"
    "workers: {count: 1, poll_interval: 0.1, heartbeat_seconds: 0.5}\n"
    "importer: {kind: archive}\n"
    "notify: {transport: folder, admin_email: admin@example.org}\n"
    "server: {enabled: false}\n"
)


def env() -> dict[str, str]:
    """This process's environment without WATCHFOLDER_* (no config named from outside)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("WATCHFOLDER")}
