"""Reading what a request says, totally: every bad value becomes a 4xx with the API's error shape.

One place for what used to be parsed ad hoc per route, and gave 500s on values
no one expected: ids past SQLite's 64-bit integers, a cursor of 20 digits,
Unicode digits (``'²'.isdigit()`` is true, ``int('²')`` fails), query strings
decoded as Latin-1 (PEP 3333's WSGI strings) instead of UTF-8 (RFC 3986 and
the WHATWG URL standard percent-encode UTF-8), any ``Content-Type``.
"""

from __future__ import annotations

import os
import urllib.parse

import bottle

from ..units import INT64_MAX
from ..units import whole_number as _whole
from .http import ApiError, invalid, problem

# Linux's limits (limits.h): a whole path, and one name in it, in bytes.
PATH_MAX = 4096
NAME_MAX = 255
JSON_TYPES = ("application/json",)


def query(environ: dict) -> bottle.MultiDict:
    """The query string as UTF-8 text (blank values kept); raises ApiError 400 when it is not UTF-8."""
    # WSGI hands the bytes over as Latin-1 text: take them back as bytes, then decode as UTF-8.
    raw = environ.get("QUERY_STRING", "")
    try:
        pairs = [(k.encode("latin-1").decode("utf-8"), v.encode("latin-1").decode("utf-8"))
                 for k, v in urllib.parse.parse_qsl(raw, keep_blank_values=True, encoding="latin-1")]
    except (UnicodeEncodeError, UnicodeDecodeError):
        raise ApiError(400, "the query string is not UTF-8 once percent-decoded; encode values as UTF-8 "
                            "(e.g. owner=jos%C3%A9)") from None
    out = bottle.MultiDict()
    for key, value in pairs:
        out.append(key, value)
    return out


def positive_id(text: str) -> int | None:
    """A positive 64-bit id from a path segment, or None when it cannot name anything."""
    if text != text.strip():
        return None
    return _whole(text, 1, INT64_MAX)


def job_id(text: str) -> int:
    """The job id of a ``/jobs/{id}`` route; ApiError 404 when it cannot be one."""
    value = positive_id(text)
    if value is None:
        if text.isascii() and text.isdigit() and int(text) > INT64_MAX:
            raise ApiError(404, f"no job {text!r}: the id is too large (job ids go up to {INT64_MAX})")
        raise ApiError(404, f"no job {text!r}: job ids are whole numbers from 1 to {INT64_MAX}")
    return value


def cursor(value: str | None, field: str = "cursor") -> str | None:
    """A page cursor (the ``next_cursor`` of an earlier page) or None; a problem dict is raised as 422."""
    if value is None:
        return None
    if value == "":  # as every other filter: leave it out to start at the first page
        raise invalid([problem(field, "must not be empty; leave the parameter out for the first page")])
    if positive_id(value) is None and value != "0":
        raise invalid([problem(field, f"must be the next_cursor of a previous page, got {value!r}")])
    return value


def whole_number(value: str, field: str, low: int, high: int) -> int:
    """An ASCII whole number in ``[low, high]``; 422 naming ``field`` otherwise."""
    number = _whole(value, low, high)
    if number is not None:
        return number
    raise invalid([problem(field, f"must be a whole number from {low} to {high}, got {value!r}")])


def path_problem(path: str) -> str | None:
    """What makes ``path`` unusable as a file name here, or None; checked before any filesystem call.

    A path must be UTF-8 text (JSON can carry lone surrogates such as ``\\ud800``,
    which no file name holds), without NUL, shorter than ``PATH_MAX`` bytes, and no
    name in it longer than ``NAME_MAX`` bytes (Linux's limits; the kernel answers
    ENAMETOOLONG past them).
    """
    if "\x00" in path:
        return "contains a NUL character, which no file name holds"
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"is not valid Unicode text (a lone surrogate {path[exc.start]!r} at character {exc.start}); "
                "send the path as UTF-8")
    if len(encoded) >= PATH_MAX:
        return f"is {len(encoded)} bytes long; paths are at most {PATH_MAX - 1} bytes (PATH_MAX is {PATH_MAX})"
    for name in encoded.split(b"/"):
        if len(name) > NAME_MAX:
            shown = os.fsdecode(name[:40]) + "…"
            return f"has a name of {len(name)} bytes ({shown!r}); names are at most {NAME_MAX} bytes (NAME_MAX)"
    return None


def filter_problems(query: bottle.MultiDict, keys: tuple[str, ...]) -> list[dict[str, str]]:
    """Problems for filters given empty (``?owner=``): leaving a filter out is how not to filter."""
    return [problem(key, "must not be empty; leave the parameter out to not filter")
            for key in keys if any(not v for v in query.getall(key))]


def one_of(value: str | None, field: str, known: list[str], what: str) -> list[dict[str, str]]:
    """A problem when ``value`` is given and is none of ``known`` (e.g. an unknown watch folder)."""
    if value is None or value == "" or value in known:
        return []
    return [problem(field, f"unknown {what} {value!r}; known: {', '.join(known) or 'none configured'}")]


def media_type(environ: dict) -> str:
    """The request's media type, lower case, without parameters ('' when none)."""
    return (environ.get("CONTENT_TYPE") or "").split(";", 1)[0].strip().lower()


def require_json(environ: dict) -> None:
    """Refuse any body that is not declared ``application/json`` (415).

    Browsers send ``text/plain`` and form bodies across origins without asking
    (no CORS preflight), so checking the type is what stops a web page a user
    visits from posting here in their name.
    """
    kind = media_type(environ)
    if kind not in JSON_TYPES:
        shown = environ.get("CONTENT_TYPE") or "none"
        raise ApiError(415, f"the body must be sent as Content-Type: application/json, got {shown}")


__all__ = ["INT64_MAX", "PATH_MAX", "NAME_MAX", "path_problem", "query", "positive_id", "job_id", "cursor",
           "whole_number", "filter_problems", "one_of", "media_type", "require_json"]
