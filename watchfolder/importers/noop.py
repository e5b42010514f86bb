"""The ``noop`` importer: imports nothing and succeeds. For benchmarks and dry runs."""

from __future__ import annotations

from typing import Any

from ..job import Job
from . import register
from .base import ImportContext, Importer


@register("noop")
class NoopImporter(Importer):
    def __init__(self, config=None):
        pass

    def run(self, job: Job, ctx: ImportContext) -> dict[str, Any]:
        return {"imported": 0}
