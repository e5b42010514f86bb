"""Whose OMERO session is this key? One long-lived child answers, over a pipe.

``POST /ome/import`` (the seed API) takes an OMERO session key as its
credential and must check it with OMERO before it queues anything. Starting
the OMERO child (another Python, omero-py, Ice) per check costs 0.7 s on an
idle machine and several seconds under load; this keeps one child
(``child.py --session-server``) running instead, started on the first check,
so a check is one JSON line each way plus OMERO's own join (tens of ms).

- **Restarted when it fails**: a child that exited (killed, crashed) is replaced
  on the next check, and a check whose child died under it is sent once more to
  a fresh one; a child that does not answer within ``timeout`` seconds is
  killed and the check fails as transient (the seed answers 503), so a hung
  child never holds a request thread longer than that.
- **A short cache of positive answers**: a key OMERO accepted is not asked
  again for ``cache_ttl`` seconds (0: never cached). The cache is keyed by an
  HMAC of the key under a secret made at start, never the key; the key itself
  lives only in the request line written to the child's stdin (never argv,
  the environment or a log). A key closed in OMERO meanwhile still passes
  until its entry expires; its job then fails when it joins the session.

This module must not import omero.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import json
import logging
import re
import secrets
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PermanentImportError, TransientImportError

log = logging.getLogger(__name__)

CHILD = Path(__file__).resolve().parent.parent / "omero_child" / "child.py"
#: Checks the child runs at once (each its own OMERO client); more wait in its queue.
CHILD_WORKERS = 4
#: Extra seconds a check may take when it had to start the child (Python, omero-py and Ice load).
START_GRACE = 10.0
#: Positive answers remembered at most (least recently used go first).
CACHE_SIZE = 1024
#: OMERO's session keys are UUIDs (36 characters): anything much longer is refused without asking.
MAX_KEY_CHARS = 512
# OMERO session keys are UUIDs: whatever the child prints on stderr is logged with them masked.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class _ChildGone(Exception):
    """The child exited before it answered (the check may go to a fresh child)."""


class _Slot:
    """One check waiting for its answer line."""

    __slots__ = ("event", "answer", "gone")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.answer: dict[str, Any] | None = None
        self.gone: str | None = None


class _Child:
    """One ``--session-server`` process, with its waiting checks."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.started = time.monotonic()
        self.pending: dict[int, _Slot] = {}
        # Writes to its stdin, one line at a time; not under the checker's lock, so a child that
        # stopped reading blocks only the writers, and the deadline of a waiting check still kills it.
        self.write_lock = threading.Lock()
        self.ready = False
        self.failure: str | None = None  # the child's own refusal to start (no omero-py)


class SessionChecker:
    """Says whose an OMERO session key is (``{"user", "email", "group"}``), asking one long-lived child.

    ``python`` is called for the child's interpreter (it may raise
    PermanentImportError as a configuration error); ``host``/``port`` name the
    OMERO server; ``connect_timeout`` (seconds) bounds the child's connection to
    it; ``timeout`` (seconds) bounds each check; ``cache_ttl`` (seconds) is how
    long an accepted key is remembered. Thread-safe; :meth:`close` ends the child.
    """

    def __init__(self, python: Callable[[], str], host: str, port: int, *, connect_timeout: float = 30.0,
                 timeout: float = 10.0, cache_ttl: float = 30.0, cache_size: int = CACHE_SIZE,
                 workers: int = CHILD_WORKERS) -> None:
        self._python = python
        self.host, self.port = host, port
        self.timeout = float(timeout)
        # An unreachable server is an answer ("cannot reach"), not a hung child: due before the deadline.
        self.connect_timeout = max(0.5, min(float(connect_timeout), self.timeout / 2))
        self.cache_ttl = float(cache_ttl)
        self.cache_size = cache_size
        self.workers = workers
        self._secret = secrets.token_bytes(32)
        self._cache: collections.OrderedDict[bytes, tuple[float, dict[str, Any]]] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._child: _Child | None = None
        self._ids = 0
        self._closed = False
        #: Counters for the status view and the bench: checks answered from the cache, sent to a child,
        #: children started.
        self.stats = {"cached": 0, "asked": 0, "started": 0}

    # -- the public side -------------------------------------------------------

    def check(self, session_key: str, *, now: float | None = None) -> dict[str, Any]:
        """Whose session ``session_key`` is, as ``{"user", "email", "group"}``.

        Raises PermanentImportError when OMERO rejects the key (``config_error``
        set when no child can run: no omero-py), TransientImportError when OMERO
        cannot be reached, or no answer came within ``timeout`` seconds.
        """
        now = time.monotonic() if now is None else now
        if len(session_key) > MAX_KEY_CHARS:
            raise PermanentImportError(f"not an OMERO session key ({len(session_key)} characters; OMERO's "
                                       "are 36)")
        digest = hmac.new(self._secret, session_key.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
        with self._lock:
            hit = self._cache.get(digest)
            if hit is not None:
                if hit[0] > now:
                    self._cache.move_to_end(digest)
                    self.stats["cached"] += 1
                    return dict(hit[1])
                del self._cache[digest]
        try:
            try:
                answer = self._ask(session_key)
            except _ChildGone:
                answer = self._ask(session_key)  # once more, on a fresh child
        except _ChildGone as exc:
            log.warning("the OMERO session checker exited twice during one check (%s)", exc)
            raise TransientImportError(f"the OMERO session check failed: {exc}") from None
        if "error" in answer:
            message = str(answer["error"]).replace(session_key, "<session key>")
            if answer.get("transient"):
                raise TransientImportError(message)
            raise PermanentImportError(message, config_error=bool(answer.get("config_error")))
        info = {"user": answer["user"], "email": answer.get("email"), "group": answer.get("group")}
        if self.cache_ttl > 0:
            with self._lock:
                self._cache[digest] = (now + self.cache_ttl, info)
                self._cache.move_to_end(digest)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return dict(info)

    def forget(self) -> None:
        """Drop every cached answer (e.g. after the admin closed sessions in OMERO)."""
        with self._lock:
            self._cache.clear()

    @property
    def pid(self) -> int | None:
        """The running child's pid, or None (for the status view and tests)."""
        with self._lock:
            child = self._child
        return child.proc.pid if child is not None and child.proc.poll() is None else None

    def close(self) -> None:
        """End the child (its stdin closes: it exits at once) and refuse further checks."""
        with self._lock:
            self._closed = True
            child, self._child = self._child, None
            self._cache.clear()
        if child is not None:
            self._end(child)

    # -- the child -------------------------------------------------------------

    def _ask(self, session_key: str) -> dict[str, Any]:
        slot = _Slot()
        with self._lock:
            if self._closed:
                raise TransientImportError("the session checker is shut down (the service is stopping)")
            child = self._running_child()
            self._ids += 1
            ident = self._ids
            child.pending[ident] = slot
            self.stats["asked"] += 1
        try:
            with child.write_lock:
                child.proc.stdin.write(json.dumps({"id": ident, "session_key": session_key}) + "\n")
                child.proc.stdin.flush()
        except (OSError, ValueError):  # the child is gone (EPIPE) or its pipe closed
            with self._lock:
                child.pending.pop(ident, None)
            self._drop(child)
            raise _ChildGone() from None
        deadline = self.timeout + (0.0 if child.ready else START_GRACE)
        if not slot.event.wait(deadline):
            with self._lock:
                child.pending.pop(ident, None)
            log.warning("the OMERO session checker (pid %d) gave no answer within %.1f s: killed, "
                        "a fresh one starts with the next check", child.proc.pid, deadline)
            self._drop(child)
            self._end(child, kill=True)
            raise TransientImportError(
                f"OMERO at {self.host}:{self.port} did not answer the session check within {deadline:g} s")
        if slot.gone is not None:
            if child.failure is not None:
                raise PermanentImportError(child.failure, config_error=True)
            raise _ChildGone(slot.gone)
        assert slot.answer is not None
        return slot.answer

    def _running_child(self) -> _Child:
        """The live child, started when there is none (called with the lock held)."""
        child = self._child
        if child is not None and child.proc.poll() is None:
            return child
        if child is not None:
            self._fail_pending(child, "the session checker exited")
        python = self._python()
        try:
            proc = subprocess.Popen(
                [python, str(CHILD), "--session-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", bufsize=1,
                cwd=str(CHILD.parent), start_new_session=True,
            )
        except OSError as exc:
            raise TransientImportError(f"cannot start the OMERO session checker ({python}): {exc}") from None
        proc.stdin.write(json.dumps({"host": self.host, "port": self.port,
                                     "connect_timeout": self.connect_timeout}) + "\n")
        proc.stdin.flush()
        child = _Child(proc)
        self._child = child
        self.stats["started"] += 1
        threading.Thread(target=self._read, args=(child,), name=f"session-check-{proc.pid}", daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(child,), name=f"session-check-err-{proc.pid}",
                         daemon=True).start()
        log.info("OMERO session checker started (pid %d, %s)", proc.pid, python)
        return child

    def _read(self, child: _Child) -> None:
        """Hand each answer line to its waiting check; at the end, fail the checks still waiting."""
        try:
            for line in child.proc.stdout:
                try:
                    answer = json.loads(line)
                except ValueError:
                    continue
                if "ready" in answer:
                    child.ready = bool(answer["ready"])
                    if not child.ready:
                        child.failure = str(answer.get("error") or "the session checker did not start")
                    continue
                with self._lock:
                    slot = child.pending.pop(answer.get("id"), None)
                if slot is not None:
                    slot.answer = answer
                    slot.event.set()
        except (OSError, ValueError):
            pass
        child.proc.stdout.close()
        child.proc.wait()
        with self._lock:
            if self._child is child:
                self._child = None
            self._fail_pending(child, f"the session checker exited (status {child.proc.returncode})")

    def _read_stderr(self, child: _Child) -> None:
        try:
            for line in child.proc.stderr:
                line = line.rstrip()
                if line:
                    log.debug("session checker %d: %s", child.proc.pid, _UUID.sub("<uuid>", line))
        except (OSError, ValueError):
            pass
        child.proc.stderr.close()

    def _drop(self, child: _Child) -> None:
        with self._lock:
            if self._child is child:
                self._child = None

    @staticmethod
    def _fail_pending(child: _Child, why: str) -> None:
        for slot in child.pending.values():
            slot.gone = why
            slot.event.set()
        child.pending.clear()

    @staticmethod
    def _end(child: _Child, *, kill: bool = False) -> None:
        proc = child.proc
        if not kill:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
                return
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        try:
            proc.kill()  # SIGKILL: also ends a stopped (SIGSTOP) child
        except ProcessLookupError:
            pass
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass
        # stdout and stderr end with the process: their reader threads close them.


__all__ = ["SessionChecker"]
