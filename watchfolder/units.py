"""One unit system for sizes (and durations) everywhere (CLI, mails, dashboard, logs): IEC binary prefixes.

IEC 80000-13: 1 KiB = 1024 bytes, 1 MiB = 1024 KiB, … The dashboard's
``bytes()`` in ``web/static/dashboard.js`` follows the same rule.
"""

from __future__ import annotations

import re

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def format_size(size: int | float | None) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 GiB``; ``size unknown`` for None."""
    if size is None:
        return "size unknown"
    value = float(size)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{int(size)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """A duration for people: ``42 s``, ``7 min``, ``3.5 h``, ``2.0 d`` (``seconds`` in seconds)."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


# SQLite integers, PostgreSQL bigint and OMERO ids (Java long) are signed 64-bit.
INT64_MAX = 2**63 - 1
_DIGITS = re.compile(r"[0-9]{1,19}")


def whole_number(text: str, low: int = 0, high: int = INT64_MAX) -> int | None:
    """An ASCII whole number in ``[low, high]`` read from ``text``, or None when it is not one.

    Only ASCII digits count (``'²'.isdigit()`` is true, ``int('²')`` fails); at most
    19 of them, so nothing past a signed 64-bit integer reaches a store.
    """
    text = text.strip()
    if not _DIGITS.fullmatch(text):
        return None
    number = int(text)
    return number if low <= number <= high else None
