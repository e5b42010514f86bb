"""Helpers for tests (importable as `helpers`: pytest puts tests/ on sys.path)."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, message: str = ""):
    """Poll ``predicate`` until it returns a truthy value (returned) or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message or predicate}")
        time.sleep(interval)


TARGET = {"project": "Brain atlas", "dataset": "2026-11-28 slide 3"}


def write_manifest(folder: Path, files: dict[str, bytes], **fields: Any) -> Path:
    """Write the files, then (last, as the contract asks) a manifest listing them with sizes and checksums."""
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for rel, data in files.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        entries.append({"path": rel, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    body = {"owner": "jdoe", "target": TARGET, "files": entries, **fields}
    manifest = folder / "watchfolder.json"
    manifest.write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
    return manifest


class BlockedWriter:
    """A writer waiting on a FIFO: it stays blocked until something opens the FIFO for reading,
    so ``opened`` tells whether anything did (issue 14: a FIFO in an acquisition hung the OMERO
    child; a FIFO must never be opened). ``release()`` unblocks it at the end of a test."""

    def __init__(self, fifo: Path):
        self.fifo = fifo
        self.opened = threading.Event()
        self.thread = threading.Thread(target=self._write, daemon=True)
        self.thread.start()

    def _write(self) -> None:
        fd = os.open(self.fifo, os.O_WRONLY)  # blocks until a reader opens the FIFO
        self.opened.set()
        os.close(fd)

    def release(self) -> None:
        if not self.opened.is_set():
            os.close(os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK))  # we are the reader: it returns
        self.thread.join(timeout=10)
