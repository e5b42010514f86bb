"""Importers: the backends that take a job's files somewhere (an archive, OMERO).

An importer is built once from the config and then called by workers, one job
at a time per worker, from several threads at once (one per worker).
"""

from __future__ import annotations

from .base import ImportContext, Importer, create_importer, register

__all__ = ["ImportContext", "Importer", "create_importer", "register"]
