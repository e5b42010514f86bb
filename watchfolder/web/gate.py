"""Bounds on the seed route's OMERO session checks: a few at once, and a breaker when OMERO fails.

``POST /ome/import`` takes no bearer token; each request may ask OMERO whose its
session key is, and that check holds one of waitress's ``server.threads``
threads until OMERO answers or ``server.seed_session_timeout`` passes. Without
a bound, a few requests for a slow or unreachable OMERO held every thread and
``/health`` waited with them (issue 10, D). :class:`CheckGate` is that bound:

- **At most ``limit`` checks at once** (``server.seed_session_checks``, by
  default half the threads, always fewer than the threads): a request beyond
  it is refused at once (503, ``Retry-After: 1``), so the other threads keep
  serving ``/health`` and the authenticated API whatever OMERO does.
- **A breaker**: after ``failures`` checks in a row that OMERO did not answer
  (unreachable, timed out, the checker died), every check is refused at once
  for ``pause`` seconds (``server.seed_session_pause``; 503 with the seconds
  left as ``Retry-After``); then one check is let through as a probe (the
  others still refused): its answer closes the breaker, its failure opens it
  for another ``pause``. An answer from OMERO, a rejected key included, counts
  as OMERO working and resets the count.

Thread-safe; the state lives in this process (each ``serve`` has its own).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ..errors import ImportFailure

log = logging.getLogger(__name__)

T = TypeVar("T")


class GateClosed(Exception):
    """A check refused without asking OMERO; ``retry_after`` (whole seconds, >= 1) goes to the client."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = max(1, math.ceil(retry_after))


class CheckGate:
    """Runs session checks with at most ``limit`` at once, behind a breaker.

    ``limit`` >= 1 checks in flight; ``failures`` >= 1 failed checks in a row
    open the breaker for ``pause`` seconds (> 0). ``clock`` returns seconds
    (monotonic). :meth:`run` raises :class:`GateClosed` when it refuses.
    """

    def __init__(self, limit: int, *, failures: int, pause: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or failures < 1 or pause <= 0:
            raise ValueError(f"CheckGate needs limit >= 1, failures >= 1 and pause > 0, got {limit}, {failures}, "
                             f"{pause}")
        self.limit = limit
        self.failures = failures
        self.pause = float(pause)
        self._clock = clock
        self._lock = threading.Lock()
        self._in_flight = 0
        self._failed = 0  # failed checks in a row
        self._open_until: float | None = None  # the breaker is open (or half-open once past it)
        self._probing = False
        #: Counters for tests and the bench: checks run, refused as busy, refused by the open breaker,
        #: and the most that ran at once.
        self.stats = {"run": 0, "busy": 0, "open": 0, "peak": 0}

    @property
    def in_flight(self) -> int:
        """Checks running now."""
        with self._lock:
            return self._in_flight

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open`` (a probe may go, or is under way)."""
        with self._lock:
            if self._open_until is None:
                return "closed"
            return "open" if self._clock() < self._open_until else "half-open"

    def retry_after(self) -> int:
        """Whole seconds (>= 1) a client should wait before its next check: the breaker's time left, or 1."""
        with self._lock:
            left = 0.0 if self._open_until is None else self._open_until - self._clock()
        return max(1, math.ceil(left))

    def run(self, check: Callable[..., T], *args: Any) -> T:
        """``check(*args)``, unless too many run already or the breaker is open (GateClosed).

        An ImportFailure that is transient or a configuration error counts as a
        failure of OMERO, as does any other exception; the exception is re-raised.
        """
        with self._lock:
            now = self._clock()
            probe = False
            if self._open_until is not None:
                if now < self._open_until:
                    self.stats["open"] += 1
                    raise GateClosed(
                        f"OMERO did not answer {self._failed} session checks in a row; checks are paused for "
                        f"{self.pause:g} s (server.seed_session_pause)", self._open_until - now)
                if self._probing:
                    self.stats["open"] += 1
                    raise GateClosed("one session check is probing whether OMERO answers again", 1)
                probe = True
            if self._in_flight >= self.limit:
                self.stats["busy"] += 1
                raise GateClosed(f"{self._in_flight} session checks are waiting for OMERO already (at most "
                                 f"{self.limit}: server.seed_session_checks)", 1)
            self._in_flight += 1
            self.stats["peak"] = max(self.stats["peak"], self._in_flight)
            self._probing = self._probing or probe
            self.stats["run"] += 1
        answered = False
        try:
            result = check(*args)
            answered = True
            return result
        except ImportFailure as exc:
            answered = not (exc.transient or exc.config_error)  # OMERO answered: it refused the key
            raise
        finally:
            self._done(answered, probe)

    def _done(self, answered: bool, probe: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            if probe:
                self._probing = False
            if answered:
                if self._open_until is not None:
                    log.info("OMERO answers session checks again: the seed route's checks resume")
                self._failed = 0
                self._open_until = None
                return
            self._failed += 1
            if probe or (self._open_until is None and self._failed >= self.failures):
                self._open_until = self._clock() + self.pause
                log.warning("OMERO did not answer %d session checks in a row: POST /ome/import answers 503 for "
                            "%g s (server.seed_session_pause), then one check probes", self._failed, self.pause)


__all__ = ["CheckGate", "GateClosed"]
