"""Importers: the backends that take a job's files somewhere (an archive, OMERO).

This module is the registry: ``register`` makes a backend available under an
``importer.kind`` name and ``create_importer`` builds the configured one. An
importer is built once from the config and then called by workers, one job at a
time per worker, from several threads at once (one per worker).

Backends import :mod:`.base` (the interface) and this module (to register);
this module imports a backend only inside ``create_importer``, so there is no
import circle and importing the package does not pull in every backend.
"""

from __future__ import annotations

from collections.abc import Callable

from ..errors import ConfigError
from .base import ImportContext, Importer

__all__ = ["ImportContext", "Importer", "create_importer", "register"]


def _load_backends() -> None:
    # Importing a backend module registers it.
    from . import archive, noop  # noqa: F401

    try:
        from . import omero  # noqa: F401
    except ImportError:  # pragma: no cover - the omero backend module is optional
        pass


_REGISTRY: dict[str, Callable[..., Importer]] = {}


def register(name: str):
    """Class decorator: make an importer available under ``importer.kind: name``."""

    def deco(cls):
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def create_importer(config) -> Importer:
    """Build the importer named by ``config.importer.kind``."""
    _load_backends()
    kind = config.importer.kind
    try:
        factory = _REGISTRY[kind]
    except KeyError:
        raise ConfigError(
            f"importer.kind: unknown importer {kind!r}; use one of {', '.join(sorted(_REGISTRY))}"
        ) from None
    return factory(config)
