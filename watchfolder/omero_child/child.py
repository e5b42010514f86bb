"""Import one acquisition into OMERO: the child process of the ``omero`` importer.

Run by file path with an interpreter that has omero-py (Python 3.10 works)::

    python child.py            # reads one request (JSON) on stdin
    python child.py --probe    # prints {"omero_py": version, ...} and exits
    python child.py --session-server   # answers session checks, one JSON line each way

It imports only the standard library at module level and omero-py inside
functions, never the watchfolder package, so it runs in an environment that
has omero-py and nothing else (and its pure helpers can be tested anywhere).

Protocol: the request is one JSON object on the first line of stdin (it
carries the admin password, which is why it never travels in argv or the
environment); the service keeps stdin open and writes a line ``cancel`` to
stop the job (:func:`watch_for_cancel`): the import handle is closed (OMERO
cancels the server-side import), the job's filesets are deleted, the sessions
closed, and the error event has kind ``cancelled``. Events go to stdout as JSON
lines (``owner`` as soon as the session is open: the owner's OMERO user and
address, which the service keeps whatever the outcome)::

    {"event": "progress", "phase": "uploading", "bytes_done": 1, "bytes_total": 2,
     "files_done": 0, "files_total": 1}
    {"event": "result", "result": {...}}
    {"event": "owner", "user": "jdoe", "email": "jdoe@example.org"}
    {"event": "error", "kind": "transient"|"permanent"|"cancelled", "config_error": false,
     "message": "..."}

Everything else (logging, Ice warnings, stray prints) goes to stderr, which
the service appends to the job's log. Exit status: 0 result sent, 1 error sent.

Filesets: the request's ``filesets`` (lists of relative paths) come first.
With Bio-Formats (Java, ``jpype1`` and its jar, see ``bfgroup.py``) every
other file is grouped as OMERO's own importer groups it (each unclaimed file
opened with ``ImageReader``, its used files form a fileset), before anything
is uploaded: a file no reader accepts is not an image and is attached to the
target, ignored, or fails the job (``non_images``); a file a reader claims but
cannot read fails the job, naming Bio-Formats' reason; a Screen target takes
only plates. Without Bio-Formats, :func:`group_filesets`' suffix rules apply.

Sessions: the owner's session (sudo) lives at least as long as the job can
(:func:`session_lifetime_ms`), idles out after ``sudo_ttl_ms`` without a
keep-alive, and is closed when the job ends.

Target: an empty ``target`` imports the images orphaned (no dataset or
screen); the result then says ``"target": null, "orphaned": true``.
Annotations on every image, besides our map annotation: ``text_annotations``
([[namespace, text], ...]) become comment annotations, and ``annotation_ids``
name existing annotations to link (checked before any upload; a missing,
foreign-group or unlinkable one fails the job permanently).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import platform
import sys
import threading
import time
import traceback

PROTOCOL = 1
JOB_MARKER = "watchfolder.job"
# Upload writes outstanding at once: two already keep both ends busy over
# loopback; more only add memory (one block each) and server threads.
WRITES_IN_FLIGHT = 2
# Files of one fileset uploaded at once, each through its own uploader (OMERO's own
# importer: ``omero import --parallel-upload N``). An HCS plate is one fileset of up to
# 100,000 small files: one at a time, each file's round trips (getUploader, write,
# close) leave both ends idle most of the time.
PARALLEL_UPLOAD = 4

log = logging.getLogger("omero-child")

# The only HQL this program sends. Kept few and simple: every one of them must
# also be answered by the test double (tests/omero/double), which matches them
# verbatim.
Q_PROJECT = (
    "select p from Project p where p.name = :name"
    " and p.details.owner.id = :uid and p.details.group.id = :gid order by p.id"
)
Q_DATASET_IN_PROJECT = (
    "select l.child from ProjectDatasetLink l"
    " where l.parent.id = :pid and l.child.name = :name order by l.child.id"
)
Q_DATASET = (
    "select d from Dataset d where d.name = :name"
    " and d.details.owner.id = :uid and d.details.group.id = :gid order by d.id"
)
Q_SCREEN = (
    "select s from Screen s where s.name = :name"
    " and s.details.owner.id = :uid and s.details.group.id = :gid order by s.id"
)
# A fileset's job link points at the abstract Job; versionInfo belongs to its
# subclasses (UploadJob, MetadataImportJob), so the marker is looked up on
# UploadJob by id (OMERO's model: Fileset.jobLinks -> FilesetJobLink.child: Job).
Q_JOB_FILESETS = (
    "select distinct fs from Fileset fs left outer join fetch fs.usedFiles"
    " join fs.jobLinks l where fs.details.owner.id = :uid and l.child.id in"
    " (select j.id from UploadJob j join j.versionInfo v where v.name = :marker and v.value = :key)"
)
Q_FILESET_IMAGES = "select i.id, i.fileset.id from Image i where i.fileset.id in (:ids) order by i.id"
Q_ANNOTATED_IMAGES = (
    "select l.parent.id from ImageAnnotationLink l where l.child.ns = :ns and l.parent.id in (:ids)"
)
# A job's attachments, found by their stable key (attachment_key) so a retry
# reuses them instead of attaching every file again; and the links they have.
Q_JOB_ATTACHMENTS = (
    "select a from FileAnnotation a join fetch a.file where a.ns = :ns"
    " and a.description in (:keys) and a.details.owner.id = :uid order by a.id"
)
Q_ANNOTATION_LINKS = {
    kind: f"select l.parent.id, l.child.id from {kind}AnnotationLink l where l.child.id in (:ids)"
    for kind in ("Dataset", "Screen", "Image")
}
QUERIES = (
    Q_PROJECT, Q_DATASET_IN_PROJECT, Q_DATASET, Q_SCREEN, Q_JOB_FILESETS, Q_FILESET_IMAGES,
    Q_ANNOTATED_IMAGES, Q_JOB_ATTACHMENTS, *Q_ANNOTATION_LINKS.values(),
)


# ---------------------------------------------------------------------------
# Pure helpers (no omero-py needed)


class Cancelled(BaseException):
    """The service asked this child to stop (the job was cancelled): not an error; it passes
    every ``except Exception`` so the import handle is closed (which cancels OMERO's import),
    the job's filesets are removed and the sessions closed on the way out."""


class Failure(Exception):
    """An error with its classification, sent back to the service as is."""

    def __init__(self, message, *, transient=False, config_error=False, unavailable=False):
        super().__init__(message)
        self.message = message
        self.transient = transient
        self.config_error = config_error
        # The server (not this import) is unreachable: the service pauses its jobs.
        self.unavailable = unavailable


_SAFEFS = []


def _safefs():
    """The service's ``safefs`` module, loaded by file path (standard library only)."""
    if not _SAFEFS:
        import importlib.util

        where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "safefs.py")
        spec = importlib.util.spec_from_file_location("watchfolder_safefs", where)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _SAFEFS.append(module)
    return _SAFEFS[0]


def open_source(req, rel):
    """Open ``req["root"]/rel`` for reading as the service does; return ``(binary file, size in bytes)``.

    No symlink is followed out of ``req["allowed_root"]`` (``/`` when absent) or the
    acquisition folder, whatever was swapped in since the job was queued
    (``watchfolder/safefs.py``). Raises :class:`Failure` (permanent) when the path
    is refused, ``OSError`` as ``open`` does.
    """
    safefs = _safefs()
    try:
        fd, st = safefs.open_source(req.get("allowed_root") or "/", req["root"], rel,
                                    (req.get("identities") or {}).get(rel))
    except safefs.UnsafePath as exc:
        raise Failure(str(exc)) from None
    return os.fdopen(fd, "rb"), st.st_size


# Multi-file formats: (suffix of the main file, function(stem) -> how to
# recognise its companions). Paths are relative, '/'-separated.
class CheckedFiles:
    """The job's files, each opened once through the safe opener (``watchfolder/safefs.py``:
    contained, no symlink out, regular files only) and kept open, so that Bio-Formats and
    the upload read exactly the inodes that were checked, whatever is swapped in later.

    :meth:`mirror` builds a private folder (mode 0700) whose entries, named like the
    relative paths, are symlinks to ``/proc/self/fd/N``: Bio-Formats, given only that
    folder, sees the job's files and nothing else — a companion's ``../../outside``
    or an excluded dot-file or FIFO next to the data is simply absent. The soft
    ``RLIMIT_NOFILE`` is raised to the hard one; past it (minus a margin) files are not
    kept open: they are mirrored by their real path and, when read, reopened relative to
    the acquisition folder's kept descriptor (``safefs.SourceTree``) and compared
    (device, inode, size, mtime). Raises :class:`Failure` for a missing or
    refused file.
    """

    MARGIN = 256  # descriptors left for Ice, the JVM and the rest

    def __init__(self, req, files):
        import resource

        safefs = _safefs()
        self.req = req
        self.fds, self.stats = {}, {}
        self.folder = None
        self.tree = None  # kept open for the files past the descriptor budget
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        budget = max(0, (soft if soft != resource.RLIM_INFINITY else 1 << 20) - self.MARGIN)
        try:
            tree = safefs.SourceTree(req.get("allowed_root") or "/", req["root"])
        except safefs.UnsafePath as exc:
            raise Failure(str(exc)) from None
        try:
            for rel in files:
                try:
                    fd, st = tree.open(rel)
                except safefs.UnsafePath as exc:
                    raise Failure(str(exc)) from None
                except OSError as exc:
                    raise Failure(
                        f"{rel!r} is missing from {req['root']} ({exc.strerror}); put the file back "
                        "or remove it from the acquisition's files"
                    ) from None
                self.stats[rel] = st
                if len(self.fds) < budget:
                    self.fds[rel] = fd
                else:
                    os.close(fd)
                    self.tree = tree
        except BaseException:
            self.close()
            raise
        finally:
            if self.tree is None:
                tree.close()

    def size(self, rel):
        return self.stats[rel].st_size

    def open(self, rel):
        """A binary file of its own (own offset) on the checked inode of ``rel``."""
        fd = self.fds.get(rel)
        if fd is not None:
            return open(f"/proc/self/fd/{fd}", "rb")
        # Past the budget (a plate of 100,000 files): reopened relative to the acquisition
        # folder's kept descriptor, about one openat per file, not a walk from the root.
        try:
            fd, st = self.tree.open(rel)
        except _safefs().UnsafePath as exc:
            raise Failure(str(exc)) from None
        f = os.fdopen(fd, "rb")
        if not _safefs().same_file(st, self.stats[rel]):
            f.close()
            raise Failure(f"{rel} changed after it was checked (replaced or rewritten); submit the job again "
                          "once the acquisition is complete")
        return f

    def mirror(self):
        """The private folder Bio-Formats reads (made once): see the class docstring."""
        import tempfile

        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="watchfolder-bf-")  # mode 0700
            for rel in self.stats:
                where = os.path.join(self.folder, rel)
                os.makedirs(os.path.dirname(where), mode=0o700, exist_ok=True)
                fd = self.fds.get(rel)
                os.symlink(f"/proc/self/fd/{fd}" if fd is not None else os.path.join(self.req["root"], rel), where)
        return self.folder

    def close(self):
        import shutil

        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()
        if self.tree is not None:
            self.tree.close()
            self.tree = None
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None


def _multifile():
    """The service's ``multifile`` module (the suffix rules' one home), loaded by file path."""
    import importlib.util

    where = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "multifile.py")
    spec = importlib.util.spec_from_file_location("watchfolder_multifile", where)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MULTIFILE = _multifile()
MULTI_FILE_RULES = _MULTIFILE.MULTI_FILE_RULES
MULTI_FILE_RULES_DOC = _MULTIFILE.MULTI_FILE_RULES_DOC


def group_filesets(files, filesets=()):
    """Split relative paths into filesets: given ``filesets`` first, then the
    multi-file rule (``MULTI_FILE_RULES_DOC``), then one fileset per file.

    Returns a list of lists, each with its main file first; raises ``Failure``
    when a given fileset names a file that is not in ``files``.
    """
    files = [str(f) for f in files]
    known = set(files)
    groups = []
    claimed = set()
    for n, group in enumerate(filesets or ()):
        group = [str(p) for p in group]
        unknown = [p for p in group if p not in known]
        if unknown:
            raise Failure(
                f"filesets[{n}] names {', '.join(repr(p) for p in unknown)}, which "
                "the acquisition's files do not list; add it to files or remove it from filesets"
            )
        again = [p for p in group if p in claimed]
        if again:
            raise Failure(f"filesets[{n}]: {again[0]!r} is already in an earlier fileset")
        claimed.update(group)
        groups.append(group)
    rest = sorted(p for p in files if p not in claimed)
    for suffix, companion in MULTI_FILE_RULES:
        for main in rest:
            if main in claimed or not main.lower().endswith(suffix):
                continue
            members = [main] + [
                p for p in rest if p != main and p not in claimed and companion(main, p)
            ]
            claimed.update(members)
            groups.append(members)
    for path in rest:
        if path not in claimed:
            groups.append([path])
    return groups


NON_IMAGE_POLICIES = ("attach", "ignore", "fail")
# Below this rate an upload would outlive the owner's session (see session_lifetime_ms).
SLOWEST_UPLOAD_BYTES_PER_S = 1024 * 1024


def session_lifetime_ms(import_timeout, filesets, total_bytes, idle_ms):
    """How long the owner's session may live (ms): every fileset's server-side
    import taking its whole ``import_timeout`` (s), the upload at 1 MiB/s, and an
    hour to spare; never less than the idle timeout.

    OMERO's ``ISession.createSessionWithTimeouts(principal, timeToLive,
    timeToIdle)``: ``timeToLive`` is the session's absolute lifetime (an import
    still running then dies with "exceeded timeToLive"), ``timeToIdle`` how long
    it survives without a call (the client's keep-alive pings count).
    """
    seconds = float(import_timeout) * max(1, filesets) + total_bytes / SLOWEST_UPLOAD_BYTES_PER_S + 3600
    return max(int(seconds * 1000), int(idle_ms))


# omero-py refuses a keep-alive interval of 5 s or less (omero.util.Resources).
KEEP_ALIVE_MIN_S = 6


def keep_alive_seconds(idle_ms):
    """The client's keep-alive interval (whole seconds): a third of the idle timeout, 6 to 60."""
    return max(KEEP_ALIVE_MIN_S, min(60, int(idle_ms / 1000 / 3)))


def idle_timeout_ms(sudo_ttl_ms):
    """The owner's session's idle timeout (ms): ``sudo_ttl_ms``, but at least two keep-alive
    intervals, so that the keep-alive always comes in time. The service's config refuses less
    (``importer.omero.sudo_ttl_ms``, ``watchfolder.defaults.OMERO_SUDO_TTL_MIN_MS``): the floor
    here only guards requests from elsewhere."""
    return max(int(sudo_ttl_ms or 600000), 2 * KEEP_ALIVE_MIN_S * 1000)


def client_path_key(path):
    """How a client path compares with one the server stored (it may drop the leading '/')."""
    return path.replace("\\", "/").lstrip("/")


class Emitter:
    """Writes protocol lines to the real stdout and throttles progress events."""

    def __init__(self, stream, interval=0.25, bytes_step=16 * 1024 * 1024):
        self.stream = stream
        # At most one event per interval, but at least one per bytes_step, so
        # that a fast upload still shows its way and a slow one stays chatty.
        self.interval = interval
        self.bytes_step = bytes_step
        self.last = 0.0
        self.last_bytes = 0
        self.phase = ""
        self.figures = {"bytes_done": 0, "bytes_total": 0, "files_done": 0, "files_total": 0}

    def send(self, message):
        self.stream.write(json.dumps(message) + "\n")
        self.stream.flush()

    def progress(self, phase=None, force=False, **figures):
        self.figures.update(figures)
        changed = phase is not None and phase != self.phase
        if phase is not None:
            self.phase = phase
        now = time.monotonic()
        stepped = self.figures["bytes_done"] - self.last_bytes >= self.bytes_step
        if force or changed or stepped or now - self.last >= self.interval:
            self.last, self.last_bytes = now, self.figures["bytes_done"]
            self.send(dict(event="progress", phase=self.phase, **self.figures))


class UploadTally:
    """A fileset's upload figures as its files advance.

    ``figures`` is the job's dict (``bytes_done``, ``bytes_total``, ``files_done``,
    ``files_total``), changed in place (under a lock: safe from any thread); each change is offered to the
    :class:`Emitter`, which sends at most one progress line per interval (or per
    ``bytes_step``) however many files there are.
    """

    def __init__(self, emit, figures, phase="uploading"):
        self.emit = emit
        self.figures = figures
        self.phase = phase
        self.lock = threading.Lock()

    def add(self, nbytes=0, files=0):
        with self.lock:
            self.figures["bytes_done"] += nbytes
            self.figures["files_done"] += files
            self.emit.progress(self.phase, **self.figures)


# ---------------------------------------------------------------------------
# Error classification


def classify(exc, where=""):
    """Turn any exception into a ``Failure`` (transient or permanent), in words for people."""
    if isinstance(exc, Failure):
        return exc
    try:
        import Glacier2
        import Ice
        import omero
    except ImportError:  # pragma: no cover - only without omero-py
        return Failure(f"{where}{type(exc).__name__}: {exc}")
    prefix = f"{where}: " if where else ""
    if isinstance(exc, Glacier2.PermissionDeniedException):
        return Failure(f"{prefix}OMERO refused the login ({exc.reason or 'permission denied'})")
    if isinstance(exc, Glacier2.CannotCreateSessionException):
        return Failure(f"{prefix}OMERO could not create a session ({exc.reason})", transient=True,
                       unavailable=True)
    if isinstance(exc, (Ice.ConnectionRefusedException, Ice.ConnectFailedException,
                        Ice.ConnectTimeoutException, Ice.DNSException)):
        return Failure(f"{prefix}cannot reach the OMERO server ({type(exc).__name__})", transient=True,
                       unavailable=True)
    if isinstance(exc, (Ice.ConnectionLostException, Ice.TimeoutException, Ice.SocketException,
                        Ice.CloseConnectionException, Ice.CommunicatorDestroyedException,
                        Ice.ObjectNotExistException)):
        return Failure(f"{prefix}lost the connection to OMERO ({type(exc).__name__})", transient=True,
                       unavailable=True)
    transient_server = (omero.SessionException, omero.LockTimeout, omero.TryAgain, omero.ResourceError,
                        omero.InternalException, omero.DatabaseBusyException, omero.ConcurrencyException)
    if isinstance(exc, transient_server):
        return Failure(f"{prefix}OMERO is busy or failed internally: {exc.message}", transient=True)
    if isinstance(exc, omero.ServerError):
        return Failure(f"{prefix}OMERO refused: {exc.message}")
    if isinstance(exc, Ice.LocalException):
        return Failure(f"{prefix}Ice error talking to OMERO ({type(exc).__name__})", transient=True)
    if isinstance(exc, omero.ClientError):
        return Failure(f"{prefix}OMERO client error: {exc}", transient=True)
    if isinstance(exc, OSError):
        return Failure(f"{prefix}cannot read {exc.filename or 'a file'}: {exc.strerror}")
    return Failure(f"{prefix}unexpected error in the OMERO child: {type(exc).__name__}: {exc}")


def sudo_problem(ec, user):
    """Why the account ``user`` (its event context ``ec``) may not act for other users, or None.

    OMERO's rule (``SessionBean.createSessionWithTimeouts``, ``AdminPrivilege``): an
    administrator needs the Sudo privilege (a full administrator has every privilege;
    a restricted one only those granted); anyone else may act only for members of the
    groups they own. An administrator whose event context lists no privileges at all
    is taken as a full one (servers before OMERO 5.4 list none).
    """
    privileges = set(getattr(ec, "adminPrivileges", None) or ())  # the privileges' names
    if ec.isAdmin:
        if not privileges or "Sudo" in privileges:
            return None
        return (
            f"importer.omero.admin_user {user!r} is a restricted OMERO administrator without the Sudo "
            f"privilege, so OMERO refuses to let it import for other users (every job would fail). "
            f"Grant {user!r} the Sudo privilege (OMERO.web: Admin, Users, edit {user!r}, privileges), or set "
            "importer.omero.admin_user to an administrator who has it"
        )
    if ec.leaderOfGroups:
        return None
    return (
        f"importer.omero.admin_user {user!r} is neither an OMERO administrator nor the owner of a group, "
        "so OMERO refuses to let it import for other users (every job would fail). Set "
        "importer.omero.admin_user to an administrator with the Sudo privilege, or make the account an "
        "owner of the groups whose members import"
    )


def session_key_reason(exc, key):
    """OMERO's reason for refusing a session key, without the key (a secret)."""
    reason = getattr(exc, "reason", None) or getattr(exc, "message", None) or type(exc).__name__
    return str(reason).replace(key, "<session key>") if key else str(reason)


def attachment_key(req, rel):
    """The FileAnnotation description that names one attached file of one job, the same on
    every attempt (job id, idempotency key, relative path): a retry finds its earlier
    attempt's attachments by it (Q_JOB_ATTACHMENTS) and reuses them."""
    key = req.get("job_key")
    return f"{rel}, attached by watchfolder job {req.get('job_id')}" + (f" [{key}]" if key else "")


def missing_files_message(missing, left_out=()):
    """Why the job fails when Bio-Formats needs files that are not among the job's files.

    ``missing``: {file read: "needed, needed"} (relative paths); ``left_out``: the
    detector's list of what it left out of the acquisition and why (``"x.part
    (excluded)"``). A needed file that was left out is named with the reason; a
    left-out file whose name holds the needed one (``out_Z1.ome.tiff.part``: a copy
    still in progress) is named beside it. Bio-Formats never saw any of them (it reads
    the job's files only), so no excluded file is pulled into a fileset.
    """
    needed = []
    parts = []
    for rel, needs in list(missing.items())[:5]:
        names = [n for n in needs.split(", ") if n]
        needed += names
        explained = []
        for name in names:
            exact = [e for e in left_out if e.startswith(name + " (")]
            near = [e for e in left_out if e not in exact and os.path.basename(name) in os.path.basename(e)]
            if exact:
                explained.append(f"{name}, which was left out of the job: {exact[0]}")
            elif near:
                explained.append(f"{name}, which is not there; beside it, left out of the job: {', '.join(near[:3])} "
                                 "(a copy still under a temporary name? wait until it has its final name)")
            else:
                explained.append(f"{name}, which is not among the job's files")
        parts.append(f"{rel} needs {'; and '.join(explained)}")
    return (
        "; ".join(parts) + (" ..." if len(missing) > 5 else "")
        + ". A file is not among the job's files when it is missing, excluded (a dot-file, or a name the "
        "watcher skips), not a regular file, or outside the acquisition folder; Bio-Formats reads only the "
        f"job's files. Nothing was uploaded. Put {'the file' if len(needed) == 1 else 'the files'} into the "
        "acquisition under the name the dataset expects (not an excluded one), or remove the file that needs it"
    )


def configured_jar_problem(jar):
    """Why an explicitly configured ``importer.omero.bioformats_jar`` cannot be used (not a file),
    or None (also when none is configured: the default jar may be missing, then the suffix rules apply)."""
    if not jar or os.path.isfile(jar):
        return None
    return (f"importer.omero.bioformats_jar: no file at {jar}; fix the path, or remove the setting to use the jar "
            "scripts/omero-env installs, or set importer.omero.bioformats: false to group by suffix rules")


def cleanup_words(deleted, left, why, job=""):
    """What became of a failed or cancelled job's filesets, for its message ("" when it had none)."""
    parts = []
    if deleted:
        parts.append(f"This job's fileset{'s' if len(deleted) > 1 else ''} {', '.join(map(str, deleted))} "
                     f"{'were' if len(deleted) > 1 else 'was'} removed from OMERO, so nothing of it stays half-done")
    if left:
        parts.append(f"This job's fileset{'s' if len(left) > 1 else ''} {', '.join(map(str, left))} could not be "
                     f"removed ({why}) and {'are' if len(left) > 1 else 'is'} still in OMERO: an OMERO "
                     "administrator should delete them")
    elif left is None:
        parts.append(f"Whether this job left filesets in OMERO is unknown ({why}): an OMERO administrator should "
                     f"look for the filesets of watchfolder job {job} and delete them")
    return ". ".join(parts)


def split_fileset_message(split, given):
    """Why the manifest's ``filesets`` fail the job: ``split`` is ``[(index, fileset, used files
    outside it), ...]`` (Bio-Formats' used files of each fileset's main file); ``given`` all filesets."""
    where = {rel: n for n, g in enumerate(given) for rel in g}
    parts = []
    for n, g, beyond in split[:5]:
        named = []
        for rel in beyond[:5]:
            other = where.get(rel)
            named.append(f"{rel} (in filesets[{other}])" if other is not None else f"{rel} (in no given fileset)")
        parts.append(f"filesets[{n}] {json.dumps(g)}: Bio-Formats reads {g[0]} together with "
                     f"{', '.join(named)}{' ...' if len(beyond) > 5 else ''}")
    return (
        "the manifest's filesets split one dataset over several filesets: " + "; ".join(parts)
        + (" ..." if len(split) > 5 else "")
        + ". OMERO imports a fileset only with every file its format uses, so this would fail on the server. "
        "Nothing was uploaded. Put all the files of one dataset into one fileset in the manifest's "
        "\"filesets\" (the file to read first first), or leave \"filesets\" out and let them be grouped"
    )


def plate_into_dataset_message(mains, found, done):
    """Why a plate fileset is refused for a Dataset target (``done``: what became of it), and the fix."""
    return (
        f"{', '.join(mains[:5])}{' ...' if len(mains) > 5 else ''} {'is a plate' if len(mains) == 1 else 'are plates'}"
        f" ({found}), and OMERO puts a plate into a screen, never into a dataset (it would be orphaned). "
        f"{done}. A plate goes into a screen: submit it with --screen NAME (target.screen in a sidecar or manifest)"
    )


def text_annotation_pairs(value):
    """The request's ``text_annotations`` as a list of (namespace, text); raises ``Failure`` on bad input."""
    pairs = []
    for n, pair in enumerate(value or ()):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(s, str) and s for s in pair)):
            raise Failure(f"text_annotations[{n}]: must be [namespace, text], both non-empty strings; got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return pairs


def annotation_id_list(value):
    """The request's ``annotation_ids`` as positive ints, duplicates dropped (OMERO refuses a link twice)."""
    ids = []
    for n, aid in enumerate(value or ()):
        if isinstance(aid, bool) or not isinstance(aid, int) or aid <= 0:
            raise Failure(f"annotation_ids[{n}]: must be a positive whole number, got {aid!r}")
        if aid not in ids:
            ids.append(aid)
    return ids


def describe_err(rsp, paths):
    """Words for an ``omero.cmd.ERR`` from a server-side import."""
    params = dict(rsp.parameters or {})
    detail = params.get("message") or params.get("error") or ""
    if not detail and params.get("stacktrace"):
        detail = params["stacktrace"].strip().splitlines()[0]
    what = ", ".join(os.path.basename(p) for p in paths[:3]) + (" ..." if len(paths) > 3 else "")
    why = f"{rsp.name}" + (f": {detail}" if detail else "")
    text = f"{rsp.name} {detail}".lower()
    if "session" in text:
        # The importing session ended under the import: nothing is wrong with the files.
        advice = ("The session the import ran in ended before the import finished (it expired or was "
                  "closed); the files are not at fault. A job with its own session key needs a session that "
                  "outlives the import: submit it again with a fresh, longer-lived key (or without one)")
    elif "missing file" in text or "filenotfound" in text or "associated with uuid" in text:
        advice = ("The format needs files that were not in the same fileset: put all the files of one "
                  "dataset into one fileset (the manifest's \"filesets\"), then submit again")
    else:
        advice = ("Check that the files are complete and readable (Bio-Formats' showinf); if OMERO does not "
                  "support the format, convert the files (e.g. to OME-TIFF) and submit them again")
    return f"OMERO could not import {what} ({why}). {advice}."


# ---------------------------------------------------------------------------
# OMERO side


def _new_client(req, host, port):
    import omero
    import omero.clients  # noqa: F401 - registers omero.client

    props = {
        "omero.host": host,
        "omero.port": str(port),
        "Ice.Override.ConnectTimeout": str(int(float(req.get("connect_timeout", 30)) * 1000)),
        "omero.keep_alive": str(keep_alive_seconds(idle_timeout_ms(req.get("sudo_ttl_ms")))),
    }
    return omero.client(pmap=[f"--{k}={v}" for k, v in props.items()])


def _close(client):
    if client is None:
        return
    try:
        client.closeSession()
    except Exception as exc:  # closing is best effort: the import already succeeded or failed
        log.warning("closing an OMERO session: %s", type(exc).__name__)


def session_info(req):
    """Join ``req["session_key"]`` on ``req["host"]:req["port"]`` and say whose it is.

    Returns ``{"user": omeName, "email": str or None, "group": name}`` from the
    session's event context (OMERO's ``IAdmin.getEventContext``) and the user's
    experimenter record. Raises :class:`Failure`: permanent when OMERO rejects
    the key, transient when OMERO cannot be reached. Leaves the session open
    (only this client's reference to it is released).
    """
    from omero.rtypes import unwrap

    where = f"OMERO at {req['host']}:{req['port']}"
    client = _new_client(req, req["host"], int(req["port"]))
    try:
        try:
            sf = client.joinSession(req["session_key"])
        except Exception as exc:
            failure = classify(exc, where)
            if not failure.transient:
                failure = Failure(f"{where} rejected the session key: {session_key_reason(exc, req['session_key'])}")
            raise failure from None
        # Closing this client must not close the client's session (OMERO's ServiceFactory.detachOnDestroy).
        sf.detachOnDestroy()
        admin = sf.getAdminService()
        ec = admin.getEventContext()
        email = unwrap(admin.getExperimenter(ec.userId).getEmail()) or None
        return {"user": ec.userName, "email": email, "group": ec.groupName}
    except Failure:
        raise
    except Exception as exc:
        raise classify(exc, where) from None
    finally:
        _close(client)


def session_server(stdin, out, workers=4):
    """``--session-server``: answer session checks for as long as stdin stays open.

    The first line on stdin is ``{"host", "port", "connect_timeout"}``; this
    answers ``{"ready": true}`` once omero-py is imported (or ``{"ready": false,
    "error": ...}`` and exits 1). Each further line is ``{"id": n, "session_key": k}``
    and gets one line ``{"id": n, "user", "email", "group"}`` or ``{"id": n,
    "error", "transient", "config_error"}``, in the order they finish: up to
    ``workers`` checks run at once (each its own client). End of stdin (the
    service closed the pipe or died) ends the process at once, whatever is running.
    """
    import queue
    import threading

    write_lock = threading.Lock()

    def send(answer):
        with write_lock:
            out.write(json.dumps(answer) + "\n")
            out.flush()

    try:
        config = json.loads(stdin.readline())
        import omero  # noqa: F401
        import omero.clients  # noqa: F401
    except (ValueError, ImportError) as exc:
        send({"ready": False, "error": f"{sys.executable} cannot run session checks ({type(exc).__name__}: {exc}); "
                                       "set importer.omero.python to an interpreter that has omero-py"})
        return 1
    base = {"host": config["host"], "port": int(config["port"]),
            "connect_timeout": float(config.get("connect_timeout") or 30)}
    requests = queue.Queue()

    def work():
        while True:
            req = requests.get()
            try:
                answer = session_info(dict(base, session_key=req["session_key"]))
            except BaseException as exc:  # noqa: BLE001 - every failure goes back classified
                failure = classify(exc)
                answer = {"error": failure.message, "transient": failure.transient,
                          "config_error": failure.config_error}
            answer["id"] = req["id"]
            del req
            send(answer)

    for _ in range(max(1, workers)):
        threading.Thread(target=work, name="session-check", daemon=True).start()
    send({"ready": True})
    for line in stdin:
        try:
            req = json.loads(line)
            requests.put({"id": int(req["id"]), "session_key": str(req["session_key"])})
        except (ValueError, KeyError, TypeError) as exc:
            send({"id": None, "error": f"bad request line ({type(exc).__name__})", "transient": False,
                  "config_error": True})
    # The service is gone or done: checks still running in Ice threads are abandoned.
    out.flush()
    os._exit(0)


class Importer:
    """One request: sessions, target, filesets, upload, import, annotations."""

    def __init__(self, req, emit):
        self.req = req
        self.emit = emit
        self.admin = None
        self.owner_email = None  # the owner's address as OMERO has it (set by connect)
        self.client = None
        self.host = req.get("omero_host") or req["host"]
        self.port = int(req.get("omero_port") or req["port"])
        self.root = req["root"]
        self.block = int(req.get("block_size") or 1024 * 1024)
        self.in_flight = max(1, int(req.get("writes_in_flight") or WRITES_IN_FLIGHT))
        self.parallel = max(1, int(req.get("parallel_upload") or PARALLEL_UPLOAD))
        self.text_pairs = []
        self.linked = []
        self._comments = None
        self.sudo_session = None
        self.lifetime_ms = None
        self.bf = None
        self.bf_reason = None
        self.checked = None  # CheckedFiles, from run()
        self.not_images = {}
        self.ignored = []
        self.fileset_info = None
        self.ec = None  # the import session's event context (set by connect)
        self.cleanup_sessions = []  # owner's sessions the admin created for a clean-up (closed by close)
        # Set when the service asks the child to stop (a cancel): checked between steps, and
        # the main thread is interrupted (watch_for_cancel).
        self.cancel = threading.Event()

    # -- sessions --------------------------------------------------------

    def connect(self):
        """Open the session the import runs in: sudo as the owner, or the job's own session."""
        import omero
        from omero.rtypes import unwrap

        req = self.req
        self.emit.progress("connecting", force=True)
        where = f"OMERO at {self.host}:{self.port}"
        email = req.get("email")
        if req.get("session_key"):
            self.client = _new_client(req, self.host, self.port)
            try:
                self.client.joinSession(req["session_key"])
            except Exception as exc:
                failure = classify(exc, where)
                if not failure.transient:
                    failure = Failure(
                        f"{where} rejected this job's session key: {session_key_reason(exc, req['session_key'])}. "
                        "The session has probably expired or been closed; submit the job again "
                        "with a fresh session key"
                    )
                raise failure from None
        else:
            self.admin = _new_client(req, req["host"], int(req["port"]))
            try:
                self.admin.createSession(req["admin_user"], req["admin_password"])
            except Exception as exc:
                failure = classify(exc, where)
                if not failure.transient:
                    failure = Failure(
                        f"{where} rejected the admin login of {req['admin_user']!r}: check "
                        "importer.omero.admin_user and importer.omero.admin_password",
                        config_error=True,
                    )
                raise failure from None
            sf = self.admin.getSession()
            admin_svc = sf.getAdminService()
            owner = req["owner"]
            try:
                exp = admin_svc.lookupExperimenter(owner)
            except omero.ApiUsageException:
                raise Failure(
                    f"OMERO has no user {owner!r}: check the owner's OMERO user name in the "
                    "sidecar or manifest (or ask the facility to create the account)"
                ) from None
            self.owner_email = unwrap(exp.getEmail()) or None
            email = email or self.owner_email
            member_of = set(admin_svc.getMemberOfGroupIds(exp))
            group = req.get("group")
            if group:
                try:
                    grp = admin_svc.lookupGroup(group)
                except omero.ApiUsageException:
                    raise Failure(f"OMERO has no group {group!r}: check the group name") from None
                if grp.getId().getValue() not in member_of:
                    raise Failure(
                        f"OMERO user {owner!r} is not a member of group {group!r}: add them to "
                        "the group or name one of their groups"
                    )
            else:
                group = unwrap(admin_svc.getDefaultGroup(exp.getId().getValue()).getName())
            principal = omero.sys.Principal(name=owner, group=group, eventType="User")
            idle = idle_timeout_ms(req.get("sudo_ttl_ms"))
            lifetime = self.lifetime_ms or session_lifetime_ms(
                req.get("import_timeout") or 3600, 1, 0, idle)
            try:
                session = sf.getSessionService().createSessionWithTimeouts(principal, lifetime, idle)
            except omero.SecurityViolation as exc:
                # Without the Sudo privilege every job fails so: the service pauses the target
                # (its probe, ping, finds the same problem); a group owner acting outside the
                # groups they lead fails only this job (the probe passes).
                problem = sudo_problem(admin_svc.getEventContext(), req["admin_user"])
                raise Failure(
                    problem or (
                        f"OMERO refused to let {req['admin_user']!r} act as {owner!r} in group {group!r} "
                        f"({exc.message}): importer.omero.admin_user must be a full administrator, a "
                        "restricted administrator with the Sudo privilege, or an owner of the group"),
                    config_error=True,
                ) from None
            self.sudo_session = session
            log.info("owner's session: lifetime %d ms, idle timeout %d ms", lifetime, idle)
            self.client = _new_client(req, req["host"], int(req["port"]))
            self.client.joinSession(session.getUuid().getValue())
        if not req.get("secure", True):
            # Data goes over the unencrypted router when the server offers one.
            plain = self.client.createClient(secure=False)
            _close(self.client)
            self.client = plain
        sf = self.client.getSession()
        self.ec = sf.getAdminService().getEventContext()
        if self.admin is None:
            exp = sf.getAdminService().getExperimenter(self.ec.userId)
            self.owner_email = unwrap(exp.getEmail()) or None
            email = email or self.owner_email
        self.email = email
        log.info("session for %s in group %s (sudo=%s)", self.ec.userName, self.ec.groupName,
                 self.admin is not None)
        # What the service keeps whatever the outcome (the failure mail's recipient).
        self.emit.send({"event": "owner", "user": self.ec.userName, "email": self.owner_email})
        owner = req.get("owner")
        if req.get("session_key") and owner and self.ec.userName != owner:
            # The images would belong to the session's user while the job, its listing, its
            # duplicate check and its mails say the job's owner.
            raise Failure(
                f"the job's session key belongs to OMERO user {self.ec.userName!r}, but the job's owner is "
                f"{owner!r}; nothing was uploaded. Submit the job with a session key of {owner!r}, or with "
                f"owner {self.ec.userName!r}"
            )

    def close(self):
        """End the job's sessions: the owner's (sudo) session is closed on the server, not
        left to time out (joining it took one reference, creating it another)."""
        if self.checked is not None:
            self.checked.close()
        _close(self.client)
        if self.admin is not None:
            for session in [self.sudo_session, *self.cleanup_sessions]:
                if session is None:
                    continue
                try:
                    self.admin.getSession().getSessionService().closeSession(session)
                except Exception as exc:  # best effort: it idles out after sudo_ttl_ms anyway
                    log.warning("closing the owner's session: %s", type(exc).__name__)
        _close(self.admin)

    # -- queries ---------------------------------------------------------

    def _params(self, **values):
        import omero.sys
        from omero.rtypes import rlist, rlong, rstring

        params = omero.sys.ParametersI()
        for key, value in values.items():
            if isinstance(value, (list, tuple)):
                params.add(key, rlist([rstring(v) if isinstance(v, str) else rlong(v) for v in value]))
            elif isinstance(value, int):
                params.add(key, rlong(value))
            else:
                params.add(key, rstring(value))
        return params

    def find_all(self, query, client=None, **values):
        return (client or self.client).getSession().getQueryService().findAllByQuery(query, self._params(**values))

    def projection(self, query, client=None, **values):
        from omero.rtypes import unwrap

        rows = (client or self.client).getSession().getQueryService().projection(query, self._params(**values))
        return [unwrap(row) for row in rows]

    def save(self, obj):
        return self.client.getSession().getUpdateService().saveAndReturnObject(obj)

    # -- target ----------------------------------------------------------

    def resolve_target(self):
        """Return (kind, id, name, created) for the job's target, creating it if named and new.

        An empty target (the seed API's requests without datasetId or screenId)
        gives (None, None, None, False): the images are imported orphaned, in no
        dataset or screen, as the seed system did.
        """
        import omero
        import omero.model
        from omero.rtypes import rstring, unwrap

        target = self.req.get("target") or {}
        if not target:
            log.info("no dataset or screen given: the images are imported orphaned")
            return None, None, None, False
        uid, gid = self.ec.userId, self.ec.groupId
        if "dataset_id" in target or "screen_id" in target:
            kind = "Dataset" if "dataset_id" in target else "Screen"
            oid = int(target.get("dataset_id") or target.get("screen_id"))
            label = f"{kind.lower()} {oid}"
            try:
                obj = self.client.getSession().getQueryService().find(kind, oid)
            except omero.SecurityViolation:
                # What a real server answers for a container of a group the session is not in.
                raise Failure(
                    f"{label} is in another group than the import's group {self.ec.groupName!r}, "
                    f"or {self.ec.userName!r} may not read it (OMERO: cannot read); name the "
                    f"{kind.lower()}'s group in the job, or choose a {kind.lower()} of group "
                    f"{self.ec.groupName!r}"
                ) from None
            if obj is None:
                raise Failure(f"{label} does not exist or {self.ec.userName!r} cannot see it; check the id")
            obj_gid = obj.getDetails().getGroup().getId().getValue()
            if obj_gid != gid:
                raise Failure(
                    f"{label} is in another group (id {obj_gid}) than the import's group "
                    f"{self.ec.groupName!r}; name that group in the job or choose a {kind.lower()} "
                    f"of group {self.ec.groupName!r}"
                )
            perms = obj.getDetails().getPermissions()
            if perms is not None and not perms.canLink():
                raise Failure(f"{label} is not writable by {self.ec.userName!r}; choose one they own or can write to")
            return kind, oid, unwrap(obj.getName()), False
        if "screen" in target:
            return self._named(Q_SCREEN, omero.model.ScreenI, "Screen", target["screen"], uid=uid, gid=gid)
        if "project" in target:
            pkind, pid, _, pcreated = self._named(
                Q_PROJECT, omero.model.ProjectI, "Project", target["project"], uid=uid, gid=gid
            )
            found = [] if pcreated else self.find_all(Q_DATASET_IN_PROJECT, pid=pid, name=target["dataset"])
            if found:
                return "Dataset", found[0].getId().getValue(), target["dataset"], False
            dataset = omero.model.DatasetI()
            dataset.setName(rstring(target["dataset"]))
            dataset = self.save(dataset)
            link = omero.model.ProjectDatasetLinkI()
            link.setParent(omero.model.ProjectI(pid, False))
            link.setChild(omero.model.DatasetI(dataset.getId().getValue(), False))
            self.save(link)
            log.info("created dataset %r in project %d", target["dataset"], pid)
            return "Dataset", dataset.getId().getValue(), target["dataset"], True
        return self._named(Q_DATASET, omero.model.DatasetI, "Dataset", target["dataset"], uid=uid, gid=gid)

    def _named(self, query, cls, kind, name, **ids):
        from omero.rtypes import rstring

        found = self.find_all(query, name=name, **ids)
        if found:
            return kind, found[0].getId().getValue(), name, False
        obj = cls()
        obj.setName(rstring(name))
        obj = self.save(obj)
        log.info("created %s %r (id %d)", kind.lower(), name, obj.getId().getValue())
        return kind, obj.getId().getValue(), name, True

    # -- annotations to link -----------------------------------------------

    def check_linked_annotations(self):
        """Check the request's ``annotation_ids`` before anything is uploaded.

        Each must exist, be visible to the session, be in the import's group
        (OMERO refuses links across groups) and be linkable by the user. A bad
        id fails the job permanently, naming the id, before any data moves:
        linking fewer annotations than the client asked for would lose their
        intent silently. Returns [(model class, id)] for the links.
        """
        import omero

        ids = annotation_id_list(self.req.get("annotation_ids"))
        if not ids:
            return []
        query = self.client.getSession().getQueryService()
        user, group = self.ec.userName, self.ec.groupName
        found = []
        for aid in ids:
            try:
                ann = query.find("Annotation", aid)
            except omero.SecurityViolation:
                raise Failure(
                    f"annotation {aid} (annotationIds) is in another group than the import's group "
                    f"{group!r}, or {user!r} may not read it; OMERO links only within a group: use an "
                    f"annotation of group {group!r}"
                ) from None
            if ann is None:
                raise Failure(
                    f"annotation {aid} (annotationIds) does not exist or {user!r} cannot see it in group "
                    f"{group!r}; remove it from annotationIds or give the id of an annotation of that group"
                )
            ann_gid = ann.getDetails().getGroup().getId().getValue()
            if ann_gid != self.ec.groupId:
                raise Failure(
                    f"annotation {aid} (annotationIds) is in another group (id {ann_gid}) than the import's "
                    f"group {group!r}; OMERO links only within a group: use an annotation of group {group!r}"
                )
            perms = ann.getDetails().getPermissions()
            if perms is not None and not perms.canLink():
                raise Failure(
                    f"annotation {aid} (annotationIds) cannot be linked by {user!r} in group {group!r}; "
                    "use an annotation they own, or ask its owner to link it"
                )
            found.append((type(ann), aid))
        log.info("annotations to link to every image: %s", ", ".join(str(a) for _, a in found))
        return found

    # -- earlier attempts --------------------------------------------------

    def earlier_filesets(self, client=None):
        """This job's filesets in OMERO (an earlier attempt's, or this one's when asked after a
        failure): {client path keys: (id, image ids)}; ``client``: whose session asks (the job's)."""
        key = self.req.get("job_key")
        if not key:
            return {}
        found = self.find_all(Q_JOB_FILESETS, marker=JOB_MARKER, key=key, uid=self.ec.userId, client=client)
        if not found:
            return {}
        earlier = {}
        for fs in found:
            paths = frozenset(
                client_path_key(e.getClientPath().getValue()) for e in fs.copyUsedFiles()
            )
            earlier[paths] = (fs.getId().getValue(), [])
        ids = [fid for fid, _ in earlier.values()]
        by_id = {fid: images for fid, images in earlier.values()}
        for image_id, fileset_id in self.projection(Q_FILESET_IMAGES, ids=ids, client=client):
            by_id[fileset_id].append(image_id)
        return earlier

    def delete_filesets(self, ids, why="unfinished filesets of an earlier attempt", client=None):
        """Delete filesets ``ids`` in ``client``'s session (default: the job's); ``why`` names them
        in the log. Returns whether OMERO deleted them; raises what the session raises."""
        import omero.callbacks
        import omero.cmd

        if not ids:
            return True
        client = client or self.client
        handle = client.getSession().submit(omero.cmd.Delete2(targetObjects={"Fileset": list(ids)}))
        cb = omero.callbacks.CmdCallbackI(client, handle)
        try:
            rsp = cb.loop(60, 500)
            if isinstance(rsp, omero.cmd.ERR):
                log.warning("could not delete %s %s: %s", why, ids, rsp.name)
                return False
            log.info("deleted %s: %s", why, ids)
            return True
        finally:
            cb.close(True)

    # -- import ------------------------------------------------------------

    def import_fileset(self, repo, rels, target, figures):
        """Upload one fileset, run the server-side import, return (fileset id, image ids, sha1s)."""
        import omero.callbacks
        import omero.cmd
        import omero.grid
        import omero.model
        from omero.model.enums import ChecksumAlgorithmSHA1160
        from omero.rtypes import rbool, rstring

        paths = [os.path.join(self.root, rel) for rel in rels]
        fileset = omero.model.FilesetI()
        for path in paths:
            entry = omero.model.FilesetEntryI()
            entry.setClientPath(rstring(os.path.abspath(path)))
            fileset.addFilesetEntry(entry)
        upload = omero.model.UploadJobI()
        upload.setVersionInfo([
            omero.model.NamedValue("omero.version", _omero_version()),
            omero.model.NamedValue("os.name", platform.system()),
            omero.model.NamedValue("os.version", platform.release()),
            omero.model.NamedValue("os.architecture", platform.machine()),
            omero.model.NamedValue(JOB_MARKER, self.req.get("job_key") or ""),
        ])
        fileset.linkJob(upload)
        settings = omero.grid.ImportSettings()
        settings.doThumbnails = rbool(True)
        settings.noStatsInfo = rbool(False)
        settings.checksumAlgorithm = omero.model.ChecksumAlgorithmI()
        settings.checksumAlgorithm.value = rstring(ChecksumAlgorithmSHA1160)
        kind, target_id = target
        if kind is not None:
            cls = omero.model.DatasetI if kind == "Dataset" else omero.model.ScreenI
            settings.userSpecifiedTarget = cls(target_id, False)
        # else: no userSpecifiedTarget, and OMERO leaves the images orphaned.
        if self.req.get("name") and len(self.req.get("_plan", [])) == 1:
            settings.userSpecifiedName = rstring(self.req["name"])
        if self.req.get("description"):
            settings.userSpecifiedDescription = rstring(self.req["description"])

        proc = repo.importFileset(fileset, settings)
        try:
            self.emit.progress("uploading", force=True, **figures)
            hashes = self._upload_fileset(proc, rels, figures)
            self.emit.progress("uploading", force=True, **figures)
            # One verifyUpload for the whole fileset, once every file is up (ImportProcess).
            handle = proc.verifyUpload(hashes)
            self.emit.progress("importing", force=True, **figures)
            rsp = self._await(handle, figures)
        finally:
            try:
                proc.close()
            except Exception as exc:  # the process may be gone with the connection
                log.warning("closing the import process: %s", type(exc).__name__)
        if isinstance(rsp, omero.cmd.ERR):
            raise Failure(describe_err(rsp, paths))
        image_ids = []
        fileset_id = None
        plate_ids = [obj.getId().getValue() for obj in rsp.objects or []
                     if isinstance(obj, omero.model.PlateI)]
        for pixels in rsp.pixels:
            image = pixels.getImage()
            image_ids.append(image.getId().getValue())
            fs = image.getFileset() if hasattr(image, "getFileset") else None
            if fileset_id is None and fs is not None:
                fileset_id = fs.getId().getValue()
        for obj in rsp.objects or []:
            if fileset_id is None and isinstance(obj, omero.model.FilesetI):
                fileset_id = obj.getId().getValue()
        if kind == "Screen" and not plate_ids:
            # OMERO links only plates to a screen: these images would be orphaned
            # while the job said "screen N". (With Bio-Formats this is refused
            # before any upload; this is the check without it.)
            self.delete_filesets([fileset_id] if fileset_id is not None else [], "the fileset just imported")
            raise Failure(
                f"{', '.join(rels[:3])} is not a plate (OMERO found no plate in it), and a screen "
                "takes only plates; it was removed again. Import it into a dataset instead"
            )
        if kind == "Dataset" and plate_ids:
            # The mirror (without Bio-Formats, which refuses this before upload).
            self.delete_filesets([fileset_id] if fileset_id is not None else [], "the fileset just imported")
            raise Failure(plate_into_dataset_message(rels[:1], "OMERO found a plate", "It was removed again"))
        return fileset_id, sorted(set(image_ids)), hashes

    def _upload_fileset(self, proc, rels, figures):
        """Upload a fileset's files (``rels``, relative paths) to ``proc`` (an ``ImportProcess``);
        return their SHA-1s (hex) in fileset order, for its one ``verifyUpload``.

        As OMERO's own importer does with ``--parallel-upload`` (``ImportLibrary.importImage``),
        up to ``self.parallel`` files are under way at once, each through its own uploader
        (``getUploader(i)``), each checksum kept under its file's index. They are driven from
        this one thread with Ice's asynchronous calls (:meth:`_upload_steps`), not a thread
        each: per file the same calls as a plain loop (getUploader, write, close), but the
        next files' calls go out while one waits for its answer, and no Python thread
        contends for the interpreter. The first failure stops the rest: no file is started
        after it, the files under way stop where they wait (their uploaders closed), and it
        is raised -- so a fileset is never verified unless all of its files arrived (the
        unverified fileset is deleted by this attempt's clean-up or by the next attempt).
        ``figures`` (``bytes_done``, ``files_done``) count acknowledged bytes and closed
        files; progress goes out at the emitter's bounded rate, not per file. Memory:
        ``parallel`` x ``in_flight`` blocks.
        """
        hashes = [None] * len(rels)
        tally = UploadTally(self.emit, figures)
        pending = iter(range(len(rels)))
        waiting = collections.deque()  # (index, steps, end function, async result), oldest first
        started, cpu, bytes_before = time.monotonic(), time.process_time(), figures["bytes_done"]

        def step(i, steps, resume, value):
            """Run a file's steps up to their next wait; a finished file makes room for the next."""
            try:
                end, result = resume(value)
            except StopIteration as done:
                hashes[i] = done.value
                tally.add(files=1)
                start()
            else:
                waiting.append((i, steps, end, result))

        def start():
            i = next(pending, None)
            if i is not None:
                steps = self._upload_steps(proc, i, rels[i], tally)
                step(i, steps, steps.send, None)

        workers = min(self.parallel, len(rels))
        try:
            for _ in range(workers):
                start()
            while waiting:
                i, steps, end, result = waiting.popleft()
                try:
                    value = end(result)
                except Exception as exc:  # noqa: BLE001 - into the file's steps, which close and raise it
                    step(i, steps, steps.throw, exc)
                else:
                    step(i, steps, steps.send, value)
        except BaseException:
            for _, steps, _, _ in waiting:
                steps.close()  # each ends its writes and closes its uploader
            raise
        seconds = time.monotonic() - started
        log.info("uploaded %d file(s), %d bytes, %d at a time, in %.2f s (%.0f files/s; %.2f s CPU)", len(rels),
                 figures["bytes_done"] - bytes_before, workers, seconds, len(rels) / max(seconds, 1e-9),
                 time.process_time() - cpu)
        return hashes

    def _upload_steps(self, proc, i, rel, tally):
        """One file of :meth:`_upload_fileset`, as a generator: it yields ``(end function,
        async result)`` for each call it must wait for and is sent the call's answer; it
        returns the file's SHA-1 (hex).

        getUploader, then the blocks with up to ``self.in_flight`` writes outstanding
        (positional, so their order on the server does not matter), a zero-byte write for
        an empty file (OMERO creates an uploaded file on its first write; without one
        verifyUpload fails), and close. Each block is read once and hashed from the very
        bytes that go out. Closed early (another file failed) or thrown an error, it ends
        its outstanding writes and closes its uploader before it ends.
        """
        asked = proc.begin_getUploader(i)
        try:
            rfs = yield proc.end_getUploader, asked
        except GeneratorExit:
            _quietly(lambda: proc.end_getUploader(asked).close())
            raise
        digest = hashlib.sha1()
        sent = collections.deque()  # (async result, length), oldest first
        offset = 0
        try:
            with self.checked.open(rel) as f:
                while True:
                    block = f.read(self.block)
                    if not block:
                        break
                    if len(sent) >= self.in_flight:
                        result, length = sent.popleft()
                        yield rfs.end_write, result
                        tally.add(nbytes=length)
                    sent.append((rfs.begin_write(block, offset, len(block)), len(block)))
                    digest.update(block)
                    offset += len(block)
            while sent:
                result, length = sent.popleft()
                yield rfs.end_write, result
                tally.add(nbytes=length)
            if not offset:
                yield rfs.end_write, rfs.begin_write(b"", 0, 0)
        except BaseException:
            for result, _ in sent:
                _quietly(lambda result=result: rfs.end_write(result))
            _quietly(rfs.close)
            raise
        yield rfs.end_close, rfs.begin_close()
        return digest.hexdigest()

    def _upload(self, rfs, rel, tally, close=True):
        """Send one file (``rel``, relative to the acquisition) to ``rfs``; return its SHA-1 (hex).

        Up to ``self.in_flight`` writes are outstanding (``begin_write``): while
        the server takes one block, the next is read, hashed and sent, instead
        of the two sides taking turns. Each block is read once and hashed from
        the very bytes object that goes out. Writes carry their offset, so the
        order in which the server dispatches them does not matter (OMERO writes
        positionally). ``tally`` (:class:`UploadTally`) counts the bytes the server
        acknowledged. A file of one block goes in one plain write. Memory: ``in_flight``
        + 1 blocks (one read ahead). (A fileset's files go through :meth:`_upload_steps`;
        this is for attachments.)
        """
        digest = hashlib.sha1()
        sent = collections.deque()  # (async result, length), oldest first
        offset = 0
        try:
            with self.checked.open(rel) as f:
                block = f.read(self.block)
                while block:
                    following = f.read(self.block)
                    if not following and not sent:
                        # The file's only block (most files of a plate): a plain write; the
                        # asynchronous one costs more in omero-py and has nothing to overlap.
                        rfs.write(block, offset, len(block))
                        tally.add(nbytes=len(block))
                    else:
                        if len(sent) >= self.in_flight:
                            self._acknowledged(rfs, sent.popleft(), tally)
                        sent.append((rfs.begin_write(block, offset, len(block)), len(block)))
                    digest.update(block)
                    offset += len(block)
                    block = following
            while sent:
                self._acknowledged(rfs, sent.popleft(), tally)
            if not offset:
                # OMERO creates an uploaded file on its first write (every OMERO
                # uploader writes zero bytes first); without one an empty file never
                # exists on the server and verifyUpload fails. A file with data got
                # its first write above: the extra round trip is saved per file.
                rfs.write(b"", 0, 0)
        finally:
            # After a failure, let the writes still out finish (or fail: the
            # connection may be gone) before closing, so close does not overtake them.
            for result, _ in sent:
                try:
                    rfs.end_write(result)
                except Exception:  # noqa: BLE001 - the first failure is the one that counts
                    pass
            if close:
                try:
                    rfs.close()
                except Exception as exc:
                    log.warning("closing an upload: %s", type(exc).__name__)
        return digest.hexdigest()

    def _acknowledged(self, rfs, sent, tally):
        result, length = sent
        rfs.end_write(result)  # raises what the write raised
        tally.add(nbytes=length)

    def _await(self, handle, figures):
        """Wait for the server-side import through the command callback, with a deadline."""
        import omero.callbacks

        timeout = float(self.req.get("import_timeout") or 3600)
        cb = omero.callbacks.CmdCallbackI(self.client, handle)
        try:
            deadline = time.monotonic() + timeout
            while not cb.block(1000):
                # A heartbeat: the service kills a child that stays silent too long.
                self.emit.progress("importing", force=True, **figures)
                if self.cancel.is_set():
                    raise Cancelled()
                if time.monotonic() > deadline:
                    # Closing the handle below cancels OMERO's import; the partly
                    # imported fileset is deleted by the caller (run), which says whether
                    # it was. Trying again would only time out again: this is for the
                    # admin to raise the limit.
                    raise Failure(
                        f"the server-side import did not finish within {timeout:g} s "
                        "(importer.omero.timeout), so it was cancelled. "
                        "Raise importer.omero.timeout for acquisitions this large, then retry the job",
                    )
            return cb.getResponse()
        finally:
            try:
                cb.close(True)
            except Exception as exc:
                log.warning("closing the import handle: %s", type(exc).__name__)

    def annotate(self, images, rels, hashes):
        """Annotate one fileset's images; returns the ids involved (for the result).

        Each image gets: the fileset's map annotation (the user's annotations
        plus provenance, under our namespace), the job's text annotations
        (comment annotations, see :meth:`comment_annotations`) and the existing
        annotations the job names (``annotation_ids``). All of one fileset's
        links are saved in one call, which OMERO runs as one transaction: an
        image that carries our map annotation carries the rest too, which is
        how a retry tells annotated images from bare ones.
        """
        import omero.model
        from omero.rtypes import rstring

        ids = {"annotation_id": None, "text_annotation_ids": [], "linked_annotation_ids": []}
        if not images:
            return ids
        values = [omero.model.NamedValue(str(k), str(v)) for k, v in (self.req.get("annotations") or {}).items()]
        values.append(omero.model.NamedValue("watchfolder.job_id", str(self.req.get("job_id", ""))))
        if self.req.get("source"):
            values.append(omero.model.NamedValue("watchfolder.source", str(self.req["source"])))
        for rel, sha1 in zip(rels, hashes, strict=True):
            values.append(omero.model.NamedValue("watchfolder.path", os.path.join(self.root, rel)))
            values.append(omero.model.NamedValue("watchfolder.sha1", sha1))
        ann = omero.model.MapAnnotationI()
        ann.setNs(rstring(self.req["namespace"]))
        ann.setMapValue(values)
        ann = self.save(ann)
        ids["annotation_id"] = ann_id = ann.getId().getValue()
        ids["text_annotation_ids"] = comments = self.comment_annotations()
        ids["linked_annotation_ids"] = [aid for _, aid in self.linked]
        children = [omero.model.MapAnnotationI(ann_id, False)]
        children += [omero.model.CommentAnnotationI(cid, False) for cid in comments]
        children += [cls(aid, False) for cls, aid in self.linked]
        links = []
        for image_id in images:
            for child in children:
                link = omero.model.ImageAnnotationLinkI()
                link.setParent(omero.model.ImageI(image_id, False))
                link.setChild(child)
                links.append(link)
        self.client.getSession().getUpdateService().saveAndReturnArray(links)
        return ids

    def comment_annotations(self):
        """Ids of the job's text annotations, saved on first use: one comment annotation per
        [namespace, text], shared by every image this attempt annotates.

        A retry that finds some filesets already annotated makes its own set for
        the rest (the earlier attempt's ids are not looked up).
        """
        import omero.model
        from omero.rtypes import rstring

        if self._comments is None:
            made = []
            for ns, text in self.text_pairs:
                comment = omero.model.CommentAnnotationI()
                comment.setNs(rstring(ns))
                comment.setTextValue(rstring(text))
                made.append(comment)
            saved = self.client.getSession().getUpdateService().saveAndReturnArray(made) if made else []
            self._comments = [c.getId().getValue() for c in saved]
            if made:
                log.info("text annotations saved as comment annotations %s", self._comments)
        return self._comments

    # -- planning (before anything is uploaded) ------------------------------

    def plan(self, files):
        """Decide the filesets before connecting: ``[[rel, ...], ...]``, main file first.

        Sets ``self.not_images`` ({rel: reason}, files to attach) and
        ``self.fileset_info`` (Bio-Formats' findings per fileset, or None).
        Raises ``Failure`` (permanent) for a corrupt image, a non-image with
        ``non_images: fail``, or a Screen target with a non-plate fileset.
        """
        req = self.req
        given = [[str(p) for p in g] for g in req.get("filesets") or ()]
        policy = req.get("non_images") or "attach"
        if policy not in NON_IMAGE_POLICIES:
            raise Failure(f"non_images: must be one of {', '.join(NON_IMAGE_POLICIES)}, got {policy!r}",
                          config_error=True)
        # Checks the given filesets name known files (and only once each).
        group_filesets(files, given)
        self.bf_reason = None
        if req.get("bioformats", True):
            from bfgroup import MISSING, BioFormats, why_unavailable

            problem = configured_jar_problem(req.get("bioformats_jar"))
            if problem:
                raise Failure(problem, config_error=True)
            self.bf_reason = why_unavailable(req.get("bioformats_jar"))
            if self.bf_reason is None:
                try:
                    self.bf = BioFormats(req.get("bioformats_jar"))
                    arm_interrupt()  # starting the JVM may have taken SIGINT
                except Exception as exc:  # noqa: BLE001 - a JVM that does not start, a broken jar
                    raise Failure(
                        f"Bio-Formats did not start ({type(exc).__name__}: {exc}); repair Java or the jar "
                        "(scripts/omero-env), or set importer.omero.bioformats: false to group by suffix rules",
                        config_error=True,
                    ) from None
        else:
            self.bf_reason = "Bio-Formats grouping is switched off (importer.omero.bioformats: false)"
        if self.bf is None:
            log.info("filesets by suffix rules: %s", self.bf_reason)
            self.fileset_info = None
            return group_filesets(files, given)
        claimed = {p for g in given for p in g}
        started = time.monotonic()
        # Bio-Formats reads the job's checked files only, through a private mirror.
        mirror = self.checked.mirror()
        found, refused = self.bf.group(
            mirror, [f for f in files if f not in claimed], pixels="check",
            progress=lambda n: self.emit.progress("grouping", files_done=n))
        info = []
        split = []
        for n, g in enumerate(given):
            # The manifest's grouping wins, but only where OMERO's importer could import it:
            # Bio-Formats reads each given fileset's main file with every job file visible,
            # and a fileset whose dataset uses files beyond it (one multi-file OME-TIFF split
            # over two filesets) fails the job here, before any upload, as it would fail on
            # the server after the upload of the filesets before it.
            reading = self.bf.read(os.path.join(mirror, g[0]), mirror, pixels="check")
            if reading.error and reading.missing:
                refused[g[0]] = reading.error
                continue
            if reading.error:
                refused_given = {g[0]: reading.error}
                raise Failure(self._corrupt_message(refused_given, given=True))
            used = [os.path.relpath(os.path.normpath(f), mirror) for f in reading.used_files]
            beyond = [u for u in used if u not in g]
            if beyond:
                split.append((n, g, beyond))
            info.append({"files": g, "format": reading.format, "series": reading.series,
                         "plates": reading.plates})
        if split:
            raise Failure(split_fileset_message(split, given))
        info += found
        missing = {rel: why[len(MISSING):] for rel, why in refused.items() if why.startswith(MISSING)}
        if missing:
            raise Failure(missing_files_message(missing, req.get("left_out") or ()))
        corrupt = {rel: why for rel, why in refused.items() if not why.startswith("UnknownFormatException")}
        if corrupt:
            raise Failure(self._corrupt_message(corrupt))
        unknown = {rel: why for rel, why in refused.items() if rel not in corrupt}
        if unknown and policy == "fail":
            raise Failure(
                f"{len(unknown)} file(s) are not images Bio-Formats can read: "
                + "; ".join(f"{rel} ({why})" for rel, why in list(unknown.items())[:5])
                + (" ..." if len(unknown) > 5 else "")
                + ". importer.omero.non_images is 'fail': remove them from the acquisition, or set it "
                "to 'attach' or 'ignore'"
            )
        if not info:
            raise Failure(
                f"none of the {len(files)} file(s) is an image Bio-Formats can read ("
                + "; ".join(f"{rel}: {why}" for rel, why in list(unknown.items())[:3])
                + "); nothing was uploaded. Check that the acquisition holds the image files"
            )
        target = req.get("target") or {}
        if "screen" in target or "screen_id" in target:
            not_plates = [g["files"][0] for g in info if not g["plates"]]
            if not_plates:
                raise Failure(
                    f"the target is a screen, which takes only plates, but {', '.join(not_plates[:5])}"
                    f"{' ...' if len(not_plates) > 5 else ''} {'is' if len(not_plates) == 1 else 'are'} "
                    "not a plate (Bio-Formats found no plate); import them into a dataset instead"
                )
        if "dataset" in target or "dataset_id" in target:
            plates = [g["files"][0] for g in info if g["plates"]]
            if plates:
                # The mirror of the screen rule: OMERO puts a plate's images in no dataset,
                # so the plate would be orphaned while the job said "dataset D".
                raise Failure(plate_into_dataset_message(plates, "Bio-Formats found a plate", "Nothing was uploaded"))
        if unknown:
            log.info("not images (%s): %s", policy, ", ".join(unknown))
        self.not_images = unknown if policy == "attach" else {}
        self.ignored = sorted(unknown) if policy == "ignore" else []
        self.fileset_info = info
        log.info("Bio-Formats %s grouped %d file(s) into %d fileset(s) in %.2f s", self.bf.version(),
                 len(files), len(info), time.monotonic() - started)
        return [g["files"] for g in info]

    def _corrupt_message(self, corrupt, given=False):
        what = "; ".join(f"{rel}: {why}" for rel, why in list(corrupt.items())[:5])
        more = " ..." if len(corrupt) > 5 else ""
        return (
            f"Bio-Formats cannot read {what}{more}. Nothing was uploaded. The file is damaged or "
            "incomplete, or not in the format its name says: replace it (or remove it from the "
            "acquisition) and submit again"
        )

    # -- attachments ---------------------------------------------------------

    def attach(self, kind, target_id, image_ids, figures):
        """Upload each non-image file as a FileAnnotation (OriginalFile + link) on the target
        container, or on every imported image when there is none; returns
        [{"file", "annotation_id", "original_file_id", "sha1", "reused"}].

        Retries never duplicate: each annotation carries :func:`attachment_key` as its
        description and is saved right after its OriginalFile, before the upload. A retry
        finds the earlier attempt's annotations by that key; one whose file the server
        holds with the same SHA-1 is reused as it is, one cut mid-upload is uploaded again
        into the same OriginalFile, and only the links still missing are made.
        """
        import omero.model
        from omero.rtypes import rlong, rstring

        if not self.not_images:
            return []
        sf = self.client.getSession()
        update = sf.getUpdateService()
        keys = {attachment_key(self.req, rel): rel for rel in self.not_images}
        earlier = {}
        for ann in self.find_all(Q_JOB_ATTACHMENTS, ns=self.req["namespace"], keys=list(keys),
                                 uid=self.ec.userId):
            rel = keys.get(ann.getDescription().getValue())
            if rel is not None and rel not in earlier:  # the oldest one of a key wins
                ofile = ann.getFile()
                earlier[rel] = (ann.getId().getValue(), ofile.getId().getValue(),
                                ofile.getHash().getValue() if ofile.getHash() is not None else None)
        parents = ([(kind, target_id)] if kind else [("Image", i) for i in image_ids])
        linked = set()
        if earlier:
            ids = [aid for aid, _, _ in earlier.values()]
            for pkind in {p for p, _ in parents}:
                linked |= {(pkind, pid, aid) for pid, aid in self.projection(Q_ANNOTATION_LINKS[pkind], ids=ids)}
            log.info("%d attachment(s) of an earlier attempt found; reusing them", len(earlier))
        done = []
        for rel in self.not_images:
            path = os.path.join(self.root, rel)
            reused = False
            if rel in earlier:
                aid, fid, server_sha1 = earlier[rel]
                sha1 = _sha1_of(rel, self.block, self.checked.open)
                reused = server_sha1 == sha1
            else:
                ofile = omero.model.OriginalFileI()
                ofile.setName(rstring(os.path.basename(rel)))
                ofile.setPath(rstring(os.path.dirname(os.path.abspath(path)) + "/"))
                ofile.setSize(rlong(self.checked.size(rel)))
                ofile.setMimetype(rstring("application/octet-stream"))
                fid = update.saveAndReturnObject(ofile).getId().getValue()
                ann = omero.model.FileAnnotationI()
                ann.setNs(rstring(self.req["namespace"]))
                ann.setDescription(rstring(attachment_key(self.req, rel)))
                ann.setFile(omero.model.OriginalFileI(fid, False))
                aid = update.saveAndReturnObject(ann).getId().getValue()
            if reused:
                figures["bytes_done"] += self.checked.size(rel)
            else:
                rfs = sf.createRawFileStore()
                try:
                    rfs.setFileId(fid)
                    sha1 = self._upload(rfs, rel, UploadTally(self.emit, figures), close=False)
                    rfs.save()
                finally:
                    try:
                        rfs.close()
                    except Exception as exc:  # noqa: BLE001
                        log.warning("closing an attachment upload: %s", type(exc).__name__)
            figures["files_done"] += 1
            links = []
            for pkind, pid in parents:
                if (pkind, pid, aid) in linked:
                    continue
                link = getattr(omero.model, f"{pkind}AnnotationLinkI")()
                link.setParent(getattr(omero.model, f"{pkind}I")(pid, False))
                link.setChild(omero.model.FileAnnotationI(aid, False))
                links.append(link)
            if links:
                update.saveAndReturnArray(links)
            done.append({"file": rel, "annotation_id": aid, "original_file_id": fid, "sha1": sha1,
                         "reused": reused})
            log.info("%s %s as file annotation %d", "reused" if reused else "attached", rel, aid)
        return done

    def remove_job_filesets(self):
        """After a permanent failure or a cancel: delete every fileset of this job in OMERO (this
        attempt's and earlier ones', imported or not), so a job that did not succeed leaves
        nothing half-done behind. Asked in the job's session; when that session is gone (a
        job's own session key that expired, an owner's session that idled out), in a fresh
        session of the admin's acting as the owner. Never raises.

        Returns ``(deleted ids, left ids, reason)``: ``left`` are filesets that could not be
        deleted (``reason`` says why), or ``None`` when they could not even be looked up.
        """
        try:
            return self._remove_job_filesets(self.client, "the job's session")
        except Exception as exc:  # noqa: BLE001 - the session may be gone: try the admin's
            first = type(exc).__name__
            log.info("cleanup in the job's session failed (%s); trying a session of the admin's", first)
        client = None
        try:
            client = self._owner_client_for_cleanup()
            if client is None:
                return [], None, (f"the job's session could not act ({first}) and no admin login is configured "
                                  "(importer.omero.admin_user)")
            return self._remove_job_filesets(client, "a session of the admin's acting as the owner")
        except Exception as exc:  # noqa: BLE001 - reported in the job's message
            log.warning("could not clean up this job's filesets: %s", type(exc).__name__)
            return [], None, f"the job's session could not act ({first}), nor the admin's ({type(exc).__name__})"
        finally:
            if client is not None and client is not self.client:
                _close(client)

    def _remove_job_filesets(self, client, whose):
        found = [fs_id for fs_id, _ in self.earlier_filesets(client).values()]
        if not found:
            return [], [], ""
        if self.delete_filesets(found, f"this job's filesets (in {whose})", client=client):
            return found, [], ""
        return [], found, "OMERO refused to delete them"

    def _owner_client_for_cleanup(self):
        """A client joined to a new short session of the owner's, created by the admin
        (logging in as the admin when this job had no admin session: a job's own session key);
        None when no admin login is configured. The caller closes it; the session is closed
        with the admin's (``close``)."""
        import omero

        req = self.req
        if self.ec is None or not req.get("admin_user"):
            return None
        if (self.host, self.port) != (req["host"], int(req["port"])):
            return None  # the job's session key is for another server than the admin's
        if self.admin is None:
            self.admin = _new_client(req, req["host"], int(req["port"]))
            self.admin.createSession(req["admin_user"], req["admin_password"])
        principal = omero.sys.Principal(name=self.ec.userName, group=self.ec.groupName, eventType="User")
        session = self.admin.getSession().getSessionService().createSessionWithTimeouts(principal, 600000, 60000)
        self.cleanup_sessions.append(session)
        client = _new_client(req, req["host"], int(req["port"]))
        client.joinSession(session.getUuid().getValue())
        return client

    def run(self):
        req = self.req
        files = [str(f) for f in req["files"]]
        self.text_pairs = text_annotation_pairs(req.get("text_annotations"))
        annotation_id_list(req.get("annotation_ids"))  # bad ids fail before connecting
        self.checked = CheckedFiles(req, files)
        sizes = {rel: self.checked.size(rel) for rel in files}
        self.emit.progress("grouping", force=True, bytes_done=0, bytes_total=sum(sizes.values()),
                           files_done=0, files_total=len(files))
        plan = self.plan(files)
        req["_plan"] = plan
        figures = {"bytes_done": 0, "bytes_total": sum(sizes.values()),
                   "files_done": 0, "files_total": len(files)}
        self.lifetime_ms = session_lifetime_ms(req.get("import_timeout") or 3600, len(plan),
                                               figures["bytes_total"], idle_timeout_ms(req.get("sudo_ttl_ms")))
        self.emit.progress("connecting", force=True, **figures)
        self.connect()
        try:
            return self._import(plan, sizes, figures)
        except BaseException as exc:
            cancelled = isinstance(exc, Cancelled) or (isinstance(exc, KeyboardInterrupt) and self.cancel.is_set())
            failure = None if cancelled else classify(exc)
            if failure is not None and failure.transient:
                raise  # the next attempt reuses what is done and deletes what is not
            deleted, left, why = self.remove_job_filesets()
            if cancelled:
                log.info("cancelled: %s", cleanup_words(deleted, left, why, req.get("job_id")) or "this job had no fileset in OMERO")
                raise Cancelled() from None
            if failure.message.find("unexpected error") >= 0 and not isinstance(exc, Failure):
                traceback.print_exc(file=sys.stderr)  # a bug: its traceback is for the developers
            words = cleanup_words(deleted, left, why, req.get("job_id"))
            raise Failure(f"{failure.message.rstrip('.')}. {words}" if words else failure.message,
                          config_error=failure.config_error, unavailable=failure.unavailable) from None

    def _import(self, plan, sizes, figures):
        """After connecting: target, earlier attempts, each fileset, attachments; the result."""
        req = self.req
        self.linked = self.check_linked_annotations()
        kind, target_id, target_name, created = self.resolve_target()
        earlier = self.earlier_filesets()
        done = {}
        stale = []
        for fs_paths, (fs_id, images) in earlier.items():
            if images:
                done[fs_paths] = (fs_id, images)
            else:
                stale.append(fs_id)
        self.delete_filesets(stale)
        repo = self.client.getManagedRepository()
        if repo is None:
            raise Failure("the OMERO server offers no managed repository; it cannot accept imports")
        results = []
        for rels in plan:
            keys = frozenset(client_path_key(os.path.abspath(os.path.join(self.root, r))) for r in rels)
            if keys in done:
                fs_id, images = done[keys]
                log.info("fileset %d (%s) was imported by an earlier attempt; reusing it", fs_id, rels[0])
                hashes = [_sha1_of(r, self.block, self.checked.open) for r in rels]
                figures["bytes_done"] += sum(sizes[r] for r in rels)
                figures["files_done"] += len(rels)
                annotated = {row[0] for row in self.projection(Q_ANNOTATED_IMAGES, ns=req["namespace"], ids=images)}
                missing = [i for i in images if i not in annotated]
                # Images annotated by the earlier attempt have all their links (see annotate).
                ids = self.annotate(missing, rels, hashes)
                results.append({"id": fs_id, "files": rels, "image_ids": images, "sha1": hashes,
                                **ids, "reused": True})
                continue
            if self.cancel.is_set():
                raise Cancelled()
            fs_id, images, hashes = self.import_fileset(repo, rels, (kind, target_id), figures)
            self.emit.progress("annotating", force=True, **figures)
            ids = self.annotate(images, rels, hashes)
            results.append({"id": fs_id, "files": rels, "image_ids": images, "sha1": hashes,
                            **ids, "reused": False})
        image_ids = sorted({i for r in results for i in r["image_ids"]})
        if self.not_images:
            self.emit.progress("attaching", force=True, **figures)
        attachments = self.attach(kind, target_id, image_ids, figures)
        for rel in self.ignored:
            figures["bytes_done"] += sizes[rel]
            figures["files_done"] += 1
        self.emit.progress("done", force=True, **figures)
        return {
            "image_ids": image_ids,
            "fileset_ids": [r["id"] for r in results],
            "filesets": results,
            # Files that are not images: attached to the target (non_images: attach) or left out.
            "attachments": attachments,
            "ignored": list(self.ignored),
            "grouping": "bioformats" if self.bf is not None else "suffix rules",
            # None when the images were imported orphaned (no dataset or screen given).
            "target": None if kind is None else {
                "type": kind.lower(), "id": target_id, "name": target_name, "created": created},
            "orphaned": kind is None,
            # The service's mails link to the container by these keys.
            **({f"{kind.lower()}_id": target_id} if kind else {}),
            "text_annotation_ids": sorted({a for r in results for a in r["text_annotation_ids"]}),
            "linked_annotation_ids": [aid for _, aid in self.linked],
            "owner": self.ec.userName,
            "group": self.ec.groupName,
            "email": self.email,
            # The owner's address as OMERO has it: the mails' recipient when the job
            # names none (watchfolder.mail.notify reads this key).
            "owner_email": self.owner_email,
            "sudo": self.admin is not None,
            "server": f"{self.host}:{self.port}",
            "bytes": figures["bytes_total"],
        }


def arm_interrupt():
    """Make a simulated SIGINT (``_thread.interrupt_main``) raise ``KeyboardInterrupt`` in the main
    thread, whatever a library (the JVM's JPype) set meanwhile; a no-op outside the main thread."""
    import signal

    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:
        pass


def watch_for_cancel(stream, event):
    """Read ``stream`` (the child's stdin after the request) in a daemon thread: a line
    ``cancel`` sets ``event`` and interrupts the main thread (a ``KeyboardInterrupt`` at its next
    Python instruction, while ``event`` tells it apart from a real one); the blocking waits
    check ``event`` too. End of input (a service that sent everything at once) changes nothing."""
    import _thread

    arm_interrupt()

    def watch():
        try:
            for line in stream:
                if line.strip() == "cancel":
                    event.set()
                    log.info("the service asks to stop (job cancelled)")
                    _thread.interrupt_main()
                    return
        except (OSError, ValueError):
            return

    threading.Thread(target=watch, name="cancel-watch", daemon=True).start()


def _quietly(call):
    """Call ``call()`` for its side effect during a clean-up: the failure that started the
    clean-up is the one to report, so this one is only logged."""
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        log.debug("during clean-up: %s", type(exc).__name__)


def _sha1_of(path, block, opener=lambda p: open(p, "rb")):
    digest = hashlib.sha1()
    with opener(path) as f:
        for chunk in iter(lambda: f.read(block), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _omero_version():
    try:
        from omero_version import omero_version

        return omero_version
    except ImportError:  # pragma: no cover
        return "unknown"


def probe(jar=None):
    """Report what this interpreter offers (used by the service's health check): omero-py,
    and whether Bio-Formats grouping works, found the way a job finds it: the JVM is
    started with the jar and Bio-Formats' version read (``bioformats``: {"ok", "jar",
    "version", "java", "jpype", "reason"}; ``reason`` says why not, and whether a job
    would then fall back to the suffix rules or fail). A check that the files merely
    exist said "Bio-Formats" for a jar or a Java that a job could not start."""
    info = {"python": sys.executable, "version": platform.python_version(), "protocol": PROTOCOL}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bfgroup import default_jar, why_unavailable

    # state: "ok"; "missing" (no Java, JPype or jar: jobs fall back to the suffix rules, as
    # plan() does); "broken" (there, but does not start: every job fails, as plan() does).
    bf = {"ok": False, "state": "missing", "jar": jar or default_jar(), "version": None, "java": None,
          "jpype": None, "reason": why_unavailable(jar)}
    problem = configured_jar_problem(jar)
    if problem:
        # A jar named in the config that is not there is a typo to fix, not "Bio-Formats not
        # installed": jobs fail as a configuration error (plan) rather than fall back.
        bf.update(state="broken", reason=problem)
    elif bf["reason"] is None:
        try:
            import jpype
            from bfgroup import BioFormats

            bf["jpype"] = getattr(jpype, "__version__", None)
            bf["version"] = BioFormats(jar).version()
            from java.lang import System

            bf["java"] = f"{System.getProperty('java.version')} ({jpype.getDefaultJVMPath()})"
            bf.update(ok=True, state="ok")
        except Exception as exc:  # noqa: BLE001 - what a job would meet: Failure "Bio-Formats did not start"
            bf.update(state="broken", reason=f"Bio-Formats did not start ({type(exc).__name__}: {exc})")
    info["bioformats"] = bf
    try:
        import Ice
        import omero  # noqa: F401

        info.update(omero_py=_omero_version(), ice=Ice.stringVersion())
        ok = True
    except ImportError as exc:
        info.update(omero_py=None, error=f"cannot import omero-py: {exc}")
        ok = False
    print(json.dumps(info), flush=True)
    return 0 if ok else 2


def ping(stdin, out):
    """``--ping``: can the server be reached, the admin log in and act for users (:func:`sudo_problem`)?
    For pausing and resuming.

    Reads ``{"host", "port", "admin_user", "admin_password", "connect_timeout"}`` on
    stdin and prints one line ``{"ok": true}`` or ``{"ok": false, "message": ...,
    "unavailable": bool}``; the session is closed at once.
    """
    client = req = None
    try:
        req = json.loads(stdin.read())
        client = _new_client(req, req["host"], int(req["port"]))
        client.createSession(req["admin_user"], req["admin_password"])
        problem = sudo_problem(client.getSession().getAdminService().getEventContext(), req["admin_user"])
        answer = {"ok": False, "message": problem, "unavailable": False} if problem else {"ok": True}
    except BaseException as exc:  # every failure is an answer
        failure = classify(exc, f"OMERO at {req.get('host')}:{req.get('port')}" if isinstance(req, dict) else "")
        answer = {"ok": False, "message": failure.message, "unavailable": failure.unavailable}
    finally:
        _close(client)
    out.write(json.dumps(answer) + "\n")
    out.flush()
    return 0 if answer["ok"] else 1


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--probe"]:
        return probe(argv[1] if len(argv) > 1 and argv[1] else None)
    if argv[:1] == ["--ping"]:
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        return ping(sys.stdin, sys.stdout)
    if argv[:1] == ["--session-server"]:
        # Long-lived: session checks over stdin/stdout, one JSON line each way (see session_server).
        out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        logging.basicConfig(stream=sys.stderr, level=logging.WARNING)
        return session_server(sys.stdin, out)
    if argv[:1] == ["--session-info"]:
        # One JSON request on stdin ({host, port, session_key, connect_timeout}); one JSON line out:
        # {"user", "email", "group"} or {"error", "transient"}. Exit status 0 or 1.
        out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        try:
            answer, status = session_info(json.loads(sys.stdin.read())), 0
        except BaseException as exc:  # noqa: BLE001 - every failure goes back classified
            failure = classify(exc)
            answer, status = {"error": failure.message, "transient": failure.transient}, 1
        out.write(json.dumps(answer) + "\n")
        out.flush()
        return status
    # Protocol lines get a private copy of stdout; fd 1 then points at stderr so
    # that anything printed by libraries lands in the job log, not the protocol.
    out = os.fdopen(os.dup(1), "w", buffering=1, encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s omero-child %(levelname)s %(message)s")
    emit = Emitter(out)
    try:
        # The request is the first line; the service keeps stdin open to send "cancel" later.
        first = sys.stdin.readline()
        try:
            req = json.loads(first)
        except ValueError:
            req = json.loads(first + sys.stdin.read())
    except ValueError as exc:
        emit.send({"event": "error", "kind": "permanent", "config_error": True,
                   "message": f"bad request from the service: {exc}"})
        return 1
    if req.get("protocol") != PROTOCOL:
        emit.send({"event": "error", "kind": "permanent", "config_error": True,
                   "message": f"protocol {req.get('protocol')} not understood by {__file__} "
                              f"(speaks {PROTOCOL}); the service and its child are from different versions"})
        return 1
    try:
        import omero  # noqa: F401
    except ImportError as exc:
        emit.send({"event": "error", "kind": "permanent", "config_error": True,
                   "message": f"{sys.executable} cannot import omero-py ({exc}); set importer.omero.python "
                              "to an interpreter that has omero-py (scripts/omero-env builds one)"})
        return 1
    job = Importer(req, emit)
    watch_for_cancel(sys.stdin, job.cancel)
    try:
        result = job.run()
    except BaseException as exc:  # every failure goes back classified, a bug included
        if isinstance(exc, Cancelled) or (isinstance(exc, KeyboardInterrupt) and job.cancel.is_set()):
            log.info("stopped: the job was cancelled")
            emit.send({"event": "error", "kind": "cancelled", "message": "cancelled"})
            return 1
        failure = classify(exc)
        if not isinstance(exc, Failure) and "unexpected error" in failure.message:
            traceback.print_exc(file=sys.stderr)  # a bug: its traceback is for the developers
        # No "permanent"/"transient" here: the service decides what follows (a retry, a pause).
        log.error("import failed: %s", failure.message)
        emit.send({"event": "error", "kind": "transient" if failure.transient else "permanent",
                   "config_error": failure.config_error, "unavailable": failure.unavailable,
                   "message": failure.message})
        return 1
    finally:
        job.close()
    emit.send({"event": "result", "result": result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
