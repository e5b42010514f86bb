"""What the API and the seed routes share: JSON answers, error answers, request bodies.

Errors go out as ``{"error": "...", "detail": ...}`` (``api/openapi.yaml``'s
``Error`` schema) with the status that :func:`api_errors` maps each package
exception to.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

import bottle

from ..errors import InvalidTransition, JobNotFound, StoreError, StoreUnavailable
from ..store.space import is_disk_full
from ..units import INT64_MAX
from ..watch.acquisition import line_column
from .auth import AuthError

API = "/api/v1"
JSON_TYPE = "application/json"
# Arrays and objects nested deeper than this are refused before anything walks them
# (the API's documents are 3 levels deep; Python's parser recurses and would hit its
# recursion limit around 1,000 levels).
MAX_JSON_DEPTH = 32


class ApiError(Exception):
    """An error answer: status, a human message with the fix, and structured detail."""

    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
        super().__init__(error)
        self.status = status
        self.error = error
        self.detail = detail
        self.headers = headers or {}


def invalid(problems: list[dict[str, str]]) -> ApiError:
    """422 naming every bad field."""
    fields = ", ".join(p["field"] for p in problems)
    return ApiError(422, f"invalid or unknown field(s): {fields}", problems)


def problem(field: str, message: str) -> dict[str, str]:
    return {"field": field, "message": message}


class BodyError(Exception):
    """The body is too large (413) or not JSON (400); ``detail`` holds line and column."""

    def __init__(self, status: int, message: str, detail: Any = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.detail = detail


def read_json_body(environ: dict, limit: int) -> Any:
    """Read and parse the request body, refusing more than ``limit`` bytes."""
    try:
        length = int(environ.get("CONTENT_LENGTH") or -1)
    except ValueError:
        length = -1
    if length > limit:
        raise BodyError(413, f"the body has {length} bytes; the limit is {limit} (server.max_body_bytes)")
    stream = environ["wsgi.input"]
    raw = stream.read(length) if length >= 0 else stream.read(limit + 1)
    if len(raw) > limit:
        raise BodyError(413, f"the body is larger than the limit of {limit} bytes (server.max_body_bytes)")
    if not raw.strip():
        raise BodyError(400, "the body is empty; send a JSON document", {"line": 1, "column": 1, "message": "empty"})
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = line_column(raw, exc.start)
        raise BodyError(
            400,
            f"the body is not UTF-8 (bad byte at line {line}, column {column}); send UTF-8 JSON",
            {"line": line, "column": column, "message": "not UTF-8"},
        ) from None
    too_deep = BodyError(400, f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep; send a flatter document",
                         {"line": 1, "column": 1, "message": "nested too deeply"})
    if _nesting(raw) > MAX_JSON_DEPTH:
        raise too_deep
    try:
        value = parse_json(text)
    except RecursionError:  # only if the scan above missed a level; never a 500
        raise too_deep from None
    # JSON may escape half of a UTF-16 pair (\ud800) alone: not text, and omero-py's Ice
    # crashes (SIGSEGV) marshalling such a string. Refused here, for every route.
    if _SURROGATE_ESCAPE.search(raw) and _has_lone_surrogate(value):
        line, column = line_column(raw, _SURROGATE_ESCAPE.search(raw).start())
        raise BodyError(
            400,
            f"a JSON string holds an unpaired UTF-16 surrogate escape (near line {line}, column {column}), "
            "which is not text; send valid Unicode",
            {"line": line, "column": column, "message": "unpaired surrogate"},
        )
    return value


_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _has_lone_surrogate(value: Any) -> bool:
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _OutOfRange:
    """A number no field here can hold, kept as its text until its place in the document is known."""

    __slots__ = ("text",)

    def __init__(self, text: str):
        self.text = text if len(text) <= 40 else f"{text[:20]}…({len(text)} characters)"


def _int(text: str) -> int | _OutOfRange:
    # The digit count first: int() of 100,000 digits is slow, and past 4,300 Python refuses it.
    if len(text) > 20:
        return _OutOfRange(text)
    value = int(text)
    return value if -INT64_MAX - 1 <= value <= INT64_MAX else _OutOfRange(text)


def _float(text: str) -> float | _OutOfRange:
    value = float(text)
    return value if math.isfinite(value) else _OutOfRange(text)


def parse_json(text: str) -> Any:
    """Parse a request's JSON; numbers past signed 64 bits and non-finite ones are refused.

    Raises :class:`BodyError`: 400 for a syntax error (``detail``: line, column), 422
    for out-of-range numbers, naming each one's place (``annotations.x``,
    ``target.dataset_id``, ``[0].annotationIds[2]``) in ``detail`` as problems. Every
    id and count of the API and of OMERO is a signed 64-bit integer (SQLite INTEGER,
    Java long); ``NaN``/``Infinity`` are not JSON at all (RFC 8259, section 6).
    """
    try:
        value = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_OutOfRange)
    except json.JSONDecodeError as exc:
        raise BodyError(
            400,
            f"invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}",
            {"line": exc.lineno, "column": exc.colno, "message": exc.msg},
        ) from None
    bad: list[dict[str, str]] = []
    _find_out_of_range(value, "", bad)
    if bad:
        fields = ", ".join(p["field"] for p in bad[:10])
        raise BodyError(422, f"number(s) out of range at {fields}: whole numbers must fit in 64 bits "
                             f"(at most {INT64_MAX}) and numbers must be finite", bad)
    return value


def _find_out_of_range(value: Any, where: str, bad: list[dict[str, str]]) -> None:
    if isinstance(value, _OutOfRange):
        bad.append(problem(where or "(body)", f"number {value.text} is out of range: whole numbers must be "
                                              f"from {-INT64_MAX - 1} to {INT64_MAX}, and numbers finite"))
    elif isinstance(value, dict):
        for key, item in value.items():
            _find_out_of_range(item, f"{where}.{key}" if where else str(key), bad)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _find_out_of_range(item, f"{where}[{i}]", bad)


_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def _nesting(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in ``raw`` (strings skipped), without parsing it."""
    depth = deepest = 0
    for match in _STRUCTURE.finditer(raw):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_JSON_DEPTH:
                    break
        elif token in (b"]", b"}"):
            depth -= 1
    return deepest


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    body = json.dumps(data, separators=(",", ":"))
    response = bottle.HTTPResponse(body, status=status, headers=headers)
    response.content_type = JSON_TYPE
    return response


#: What a 503 for an unreachable store says in ``Retry-After`` (seconds, RFC 9110 §10.2.3).
RETRY_AFTER_SECONDS = "5"


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None):
    return json_response({"error": error, "detail": detail}, status, headers)


def _store_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is the app's job store failing now (``JobStore.is_fault``), for the store
    the running request's app was made with."""
    api = bottle.request.app.config.get("watchfolder.api") if bottle.request.environ else None
    store = getattr(api, "store", None)
    try:
        return bool(store is not None and store.is_fault(exc))
    except Exception:  # a classifier that fails must not turn a 500 into something else
        return False


def api_errors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """Turn package exceptions into JSON errors (the mapping from errors to status codes)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except ApiError as exc:
            return error_response(exc.status, exc.error, exc.detail, exc.headers)
        except AuthError as exc:
            headers = {"WWW-Authenticate": 'Bearer realm="watchfolder"'} if exc.status == 401 else None
            return error_response(exc.status, str(exc), None, headers)
        except JobNotFound as exc:
            return error_response(404, str(exc))
        except InvalidTransition as exc:
            return error_response(409, str(exc))
        except StoreUnavailable as exc:
            return error_response(503, str(exc), None, {"Retry-After": RETRY_AFTER_SECONDS})
        except StoreError as exc:
            return error_response(422, str(exc))
        except Exception as exc:
            if is_disk_full(exc):
                # The data disk is full (said once in the log, and by status and health): not the
                # client's fault and not a server bug, so 503 rather than 500; nothing was recorded.
                return error_response(503, "the job store cannot record anything now: no space left on the disk "
                                      "holding it (the admin must free space); nothing was recorded, try again "
                                      "later", None, {"Retry-After": RETRY_AFTER_SECONDS})
            if _store_fault(exc):
                # Locked past busy_timeout by another process, the server down, an I/O error: the
                # store's state now, on every route alike (retry, cancel, dismiss as much as submit).
                return error_response(503, f"the job store cannot answer now ({type(exc).__name__}: {exc}); "
                                      "nothing was changed, try again in a few seconds", None,
                                      {"Retry-After": RETRY_AFTER_SECONDS})
            raise

    wrapper.__name__ = handler.__name__
    wrapper.__doc__ = handler.__doc__
    return wrapper
