"""One unit system for sizes everywhere (CLI, mails, dashboard): IEC binary prefixes.

IEC 80000-13: 1 KiB = 1024 bytes, 1 MiB = 1024 KiB, … The dashboard's
``bytes()`` in ``web/static/dashboard.js`` follows the same rule.
"""

from __future__ import annotations

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
