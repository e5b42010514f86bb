"""The ``omero`` importer: imports into OMERO through a child process.

omero-py needs zeroc-ice 3.6, which does not build on the Python this service
runs on, so the OMERO side (``watchfolder/omero_child/child.py``) runs in a
child process started with ``importer.omero.python`` (default: this service's
own interpreter when it can ``import omero``). The child gets the request as
JSON on stdin (the admin password travels only there), answers with JSON
lines on stdout and writes its diagnostics to stderr, which goes to the job's
log. A crash or a hang in Ice takes down the child, never the service.

This module must not import omero.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .. import safefs
from ..errors import JobCancelled, JobInterrupt, PermanentImportError, TransientImportError
from ..job import SEED_SOURCE_PREFIX, Job
from . import register
from .base import ImportContext, Importer
from .omero_sessions import SessionChecker

CHILD = Path(__file__).resolve().parent.parent / "omero_child" / "child.py"
PROTOCOL = 1
# How often the parent wakes up to honour cancel/lease/shutdown while the
# child is quiet; the context throttles its own store writes.
CHECK_INTERVAL = 1.0
PROBE_TTL = 60.0
# How long a cancelled job's child may take to stop the import, remove its filesets and
# close its sessions before it is killed.
STOP_GRACE = 90.0


@register("omero")
class OmeroImporter(Importer):
    """Runs each job in a fresh child process (see the module docstring)."""

    def __init__(self, config):
        self.config = config
        self.omero = config.importer.omero
        self._python: str | None = None
        self._probe: tuple[float, dict[str, Any]] | None = None
        self._lock = threading.Lock()
        self._children: dict[int, subprocess.Popen] = {}
        self._sessions: SessionChecker | None = None

    # -- interpreter ---------------------------------------------------------

    def python(self) -> str:
        """The interpreter that runs the child; raises a config error when none fits."""
        if self._python:
            return self._python
        configured = self.omero.python
        if configured:
            path = os.path.expanduser(configured)
            if not (os.path.isfile(path) and os.access(path, os.X_OK)):
                raise PermanentImportError(
                    f"importer.omero.python: {configured!r} is not an executable file; point it at "
                    "a Python that has omero-py (scripts/omero-env builds .venv-omero/bin/python)",
                    config_error=True,
                )
            self._python = path
            return path
        if _has_omero(sys.executable):
            self._python = sys.executable
            return sys.executable
        raise PermanentImportError(
            f"importer.omero.python is not set and this service's Python ({sys.executable}) "
            "cannot import omero; set importer.omero.python to an interpreter that has omero-py "
            "(scripts/omero-env builds .venv-omero/bin/python)",
            config_error=True,
        )

    def health(self) -> dict[str, Any]:
        """Whether the configured interpreter has omero-py (cached for a minute)."""
        now = time.monotonic()
        if self._probe and now - self._probe[0] < PROBE_TTL:
            return dict(self._probe[1])
        try:
            python = self.python()
        except PermanentImportError as exc:
            info: dict[str, Any] = {"ok": False, "error": exc.message}
        else:
            info = {"ok": False, "python": python}
            try:
                out = subprocess.run(
                    [python, str(CHILD), "--probe", os.path.expanduser(self.omero.bioformats_jar or "")],
                    capture_output=True, text=True, timeout=60,
                    stdin=subprocess.DEVNULL,
                )
                probed = json.loads(out.stdout.strip().splitlines()[-1])
                info.update(probed, ok=bool(probed.get("omero_py")))
                bf = dict(probed.get("bioformats") or {})
                # What jobs do, not only what is installed: the config can switch it off.
                bf["used"] = bool(self.omero.bioformats and bf.get("ok"))
                info["bioformats"] = bf
                if not self.omero.bioformats:
                    info["filesets"] = "suffix rules (importer.omero.bioformats is false)"
                elif bf.get("ok"):
                    info["filesets"] = (f"Bio-Formats {bf.get('version')} ({bf.get('jar')}; Java {bf.get('java')}, "
                                        f"JPype {bf.get('jpype')})")
                elif bf.get("state") == "broken":
                    # The child fails every job so (a configuration error), it does not fall back.
                    info["filesets"] = (f"none: {bf.get('reason')}, so every job fails; repair Java or the jar "
                                        "(scripts/omero-env), or set importer.omero.bioformats: false")
                    info.update(ok=False, error=info["filesets"])
                else:
                    info["filesets"] = f"suffix rules: Bio-Formats unavailable: {bf.get('reason')}"
            except (OSError, ValueError, IndexError, subprocess.TimeoutExpired) as exc:
                info["error"] = f"cannot run {python} {CHILD.name} --probe: {exc}"
        info.update(server=f"{self.omero.host}:{self.omero.port}")
        self._probe = (now, info)
        return dict(info)

    # -- whose session is this? ---------------------------------------------------

    def session_info(self, session_key: str) -> dict[str, Any]:
        """Join ``session_key`` on the configured server: ``{"user", "email", "group"}``.

        Asked of one long-lived child (:class:`~.omero_sessions.SessionChecker`,
        started on the first call), and remembered for ``server.seed_session_cache``
        seconds once OMERO accepted it. Raises PermanentImportError when OMERO
        rejects the key (``config_error`` when no omero-py is configured),
        TransientImportError when OMERO cannot be reached or no answer came within
        ``server.seed_session_timeout`` seconds. The key travels on the child's stdin only.
        """
        with self._lock:
            if self._sessions is None:
                server = self.config.server
                self._sessions = SessionChecker(
                    self.python, self.omero.host, self.omero.port, connect_timeout=self.omero.connect_timeout,
                    timeout=server.seed_session_timeout, cache_ttl=server.seed_session_cache,
                )
            sessions = self._sessions
        return sessions.check(session_key)

    # -- running a job -------------------------------------------------------

    def request(self, job: Job) -> dict[str, Any]:
        """The JSON the child reads on stdin. Holds secrets: never log it."""
        spec = job.spec
        o = self.omero
        return {
            "protocol": PROTOCOL,
            "job_id": job.id,
            "job_key": job.idempotency_key,
            "host": o.host,
            "port": o.port,
            "secure": o.secure,
            "admin_user": o.admin_user,
            "admin_password": o.admin_password.reveal() if o.admin_password else "",
            "connect_timeout": o.connect_timeout,
            "import_timeout": o.timeout,
            "sudo_ttl_ms": o.sudo_ttl_ms,
            "non_images": o.non_images,
            "bioformats": o.bioformats,
            "bioformats_jar": os.path.expanduser(o.bioformats_jar) if o.bioformats_jar else None,
            "block_size": o.block_size,
            "parallel_upload": o.parallel_upload,
            "namespace": o.namespace,
            "session_key": spec.session_key,
            "omero_host": spec.omero_host if spec.session_key else None,
            "omero_port": spec.omero_port if spec.session_key else None,
            "owner": spec.owner,
            "group": spec.group,
            "email": spec.email,
            "target": spec.target.to_dict(),
            "root": spec.root,
            # What the child may read under (watchfolder.safefs); a refusal fails the job.
            "allowed_root": safefs.allowed_root_for(spec.source, spec.root, self.config),
            "files": [f.path for f in spec.files],
            # Each file's identity when queued: the child opens only that very file (safefs).
            "identities": {rel: list(ident) for rel, ident in spec.file_identities().items()},
            "filesets": [list(fs) for fs in spec.filesets],
            # What detection left out and why ("x.part (excluded)"): named when a dataset needs it.
            "left_out": [str(x) for x in spec.extra.get("left_out") or ()],
            "name": spec.name,
            "description": spec.description,
            "annotations": dict(spec.annotations),
            "source": spec.source,
            # Set by the seed API (/ome/import): comment annotations to create and
            # existing annotations to link, on every imported image.
            "text_annotations": list(spec.extra.get("text_annotations") or ()),
            "annotation_ids": list(spec.extra.get("annotation_ids") or ()),
        }

    def child_pid(self, job_id: int) -> int | None:
        """Pid of the child running ``job_id`` now, if any (for the status view and tests)."""
        with self._lock:
            proc = self._children.get(job_id)
        return proc.pid if proc else None

    def run(self, job: Job, ctx: ImportContext) -> dict[str, Any]:
        python = self.python()
        if job.spec.source.startswith(SEED_SOURCE_PREFIX) and not job.spec.session_key:
            # The client's key was erased when the job ended (README "Files at rest"); a retry
            # runs as a watched folder's job does. Said, not done silently (a10 second try F7).
            ctx.log(f"the seed client's OMERO session key was erased when this job ended earlier: this attempt "
                    f"imports as {job.spec.owner} through the service's admin session (sudo), as for a "
                    "watched folder")
        try:
            payload = json.dumps(self.request(job)).encode()
        except safefs.UnsafePath as exc:
            raise PermanentImportError(str(exc)) from None
        with open(ctx.log_path, "ab") as log:
            try:
                proc = subprocess.Popen(
                    [python, "-u", str(CHILD)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    close_fds=True, start_new_session=True, cwd=str(CHILD.parent),
                )
            except OSError as exc:
                raise PermanentImportError(
                    f"cannot start the OMERO child with {python!r} ({exc.strerror}); "
                    "check importer.omero.python", config_error=True,
                ) from None
        with self._lock:
            self._children[job.id] = proc
        ctx.log(f"omero: child pid {proc.pid} started with {python}")
        try:
            return self._talk(proc, payload, ctx)
        finally:
            with self._lock:
                self._children.pop(job.id, None)
            _kill(proc)

    def _talk(self, proc: subprocess.Popen, payload: bytes, ctx: ImportContext) -> dict[str, Any]:
        lines: queue.Queue[bytes | None] = queue.Queue()
        reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
        reader.start()
        try:
            # One line; stdin stays open for a later "cancel" (see _stop).
            assert proc.stdin is not None
            proc.stdin.write(payload + b"\n")
            proc.stdin.flush()
        except OSError:
            pass  # the child died at once; its exit is reported below
        try:
            return self._follow(proc, lines, ctx)
        except JobCancelled:
            self._stop(proc, lines, ctx)
            raise

    def _stop(self, proc: subprocess.Popen, lines: queue.Queue, ctx: ImportContext) -> None:
        """A cancel: ask the child to stop (``cancel`` on its stdin) and wait for it, so that it
        closes the import handle (OMERO cancels the server-side import), removes the job's
        filesets and closes its sessions; killed when it takes longer than ``STOP_GRACE``."""
        ctx.log("omero: cancelled: asking the child to stop the import and remove what it created")
        try:
            assert proc.stdin is not None
            proc.stdin.write(b"cancel\n")
            proc.stdin.flush()
        except OSError:
            return  # the child is gone already
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=CHECK_INTERVAL)
            except queue.Empty:
                continue
            if line is None:
                proc.wait()
                ctx.log("omero: the child stopped")
                return
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "owner":
                self._owner(event, ctx)
        ctx.log(f"omero: the child did not stop within {STOP_GRACE:g} s of the cancel; killed it "
                "(the import may still finish in OMERO)")

    def _owner(self, event: dict[str, Any], ctx: ImportContext) -> None:
        """The child learnt the owner's address from OMERO: kept with the job whatever the outcome."""
        email = event.get("email")
        if email and isinstance(email, str):
            ctx.remember(owner_email=email)

    def _follow(self, proc: subprocess.Popen, lines: queue.Queue, ctx: ImportContext) -> dict[str, Any]:
        idle = self.omero.idle_timeout
        last = time.monotonic()
        result: dict[str, Any] | None = None
        error: dict[str, Any] | None = None
        while True:
            try:
                line = lines.get(timeout=CHECK_INTERVAL)
            except queue.Empty:
                line = b""
                if time.monotonic() - last > idle:
                    _kill(proc)
                    ctx.log(f"omero: child sent nothing for {idle:g} s; killed it")
                    raise TransientImportError(
                        f"the OMERO import stalled: no progress for {idle:g} s (server unresponsive?); "
                        "check the OMERO server, or raise importer.omero.idle_timeout if it is only slow"
                    ) from None
                ctx.checkpoint()
                continue
            if line is None:
                break
            last = time.monotonic()
            try:
                event = json.loads(line)
            except ValueError:
                ctx.log(f"omero: unexpected child output: {line[:200]!r}")
                continue
            kind = event.get("event")
            if kind == "progress":
                ctx.progress(
                    event.get("phase", ""), int(event.get("bytes_done", 0)), int(event.get("bytes_total", 0)),
                    int(event.get("files_done", 0)), int(event.get("files_total", 0)),
                )
            elif kind == "owner":
                self._owner(event, ctx)
            elif kind == "result":
                result = event.get("result") or {}
            elif kind == "error":
                error = event
        code = proc.wait()
        if result is not None:
            result.setdefault("importer", "omero")
            ctx.log(f"omero: imported images {result.get('image_ids')}{_where(result)}")
            if result.get("text_annotation_ids") or result.get("linked_annotation_ids"):
                ctx.log(
                    f"omero: linked to every image: text annotations {result.get('text_annotation_ids') or []}, "
                    f"existing annotations {result.get('linked_annotation_ids') or []}"
                )
            return result
        if error is not None:
            message = str(error.get("message") or "the OMERO import failed")
            # Not "permanent"/"transient" here: the worker logs what follows (a retry, a pause).
            ctx.log(f"omero: the import failed: {message}")
            if error.get("kind") == "cancelled":
                # Stopped on our request, yet no cancel is pending here (a second service?).
                ctx.checkpoint()
                raise TransientImportError("the OMERO child stopped as if cancelled; see the job log")
            if error.get("kind") == "transient":
                raise TransientImportError(message, unavailable=bool(error.get("unavailable")))
            raise PermanentImportError(message, config_error=bool(error.get("config_error")))
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        ctx.log(f"omero: child {how} without a result")
        raise TransientImportError(f"the OMERO child process {how} without a result; see the job log")

    # -- back-pressure ------------------------------------------------------------

    def target(self) -> str:
        return f"omero:{self.omero.host}:{self.omero.port}"

    def max_concurrent(self) -> int | None:
        return self.omero.max_concurrent

    def probe(self) -> str | None:
        """Run the child with ``--ping``: connect and log in as the admin, then close."""
        o = self.omero
        try:
            python = self.python()
        except PermanentImportError as exc:
            return exc.message
        request = json.dumps({
            "host": o.host, "port": o.port, "admin_user": o.admin_user,
            "admin_password": o.admin_password.reveal() if o.admin_password else "",
            "connect_timeout": o.connect_timeout,
        })
        try:
            out = subprocess.run(
                [python, str(CHILD), "--ping"], input=request, capture_output=True, text=True,
                timeout=o.connect_timeout + 30, cwd=str(CHILD.parent),
            )
            answer = json.loads(out.stdout.strip().splitlines()[-1])
        except subprocess.TimeoutExpired:
            return f"OMERO at {o.host}:{o.port} did not answer within {o.connect_timeout + 30:g} s"
        except (OSError, ValueError, IndexError) as exc:
            return f"cannot run {python} {CHILD.name} --ping: {exc}"
        return None if answer.get("ok") else str(answer.get("message") or "OMERO is not reachable")

    def close(self) -> None:
        """Kill children still running (the service is stopping; their jobs get retried)."""
        with self._lock:
            children = list(self._children.values())
            sessions, self._sessions = self._sessions, None
        if sessions is not None:
            sessions.close()
        for proc in children:
            _kill(proc)


def _where(result: dict[str, Any]) -> str:
    """' into dataset 5', or the orphaned case spelled out, for the job log."""
    if result.get("orphaned"):
        return " as orphaned images (no dataset or screen was given)"
    target = result.get("target")
    if isinstance(target, dict) and target.get("type"):
        return f" into {target['type']} {target.get('id')}"
    return ""


def _read_lines(stream, lines: queue.Queue) -> None:
    try:
        for line in stream:
            lines.put(line)
    finally:
        lines.put(None)


def _kill(proc: subprocess.Popen) -> None:
    """Kill the child and anything it started (its own process group)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not fail
        pass
    for stream in (proc.stdout, proc.stdin):
        if stream:
            try:
                stream.close()
            except OSError:
                pass


def _has_omero(python: str) -> bool:
    try:
        return subprocess.run(
            [python, "-c", "import omero, Ice"], capture_output=True, timeout=60,
            stdin=subprocess.DEVNULL,
        ).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


__all__ = ["OmeroImporter", "JobInterrupt"]
