"""The job model: what one acquisition to import is, and the states it goes through."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .errors import AcquisitionError

_CONTROL = {c: f"\\x{c:02x}" for c in [*range(0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROL.update({0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"})
_CONTROL.update({0x2028: "\\u2028", 0x2029: "\\u2029"})


def printable(text: str) -> str:
    """``text`` with control characters escaped (``\\n``, ``\\x1b``…).

    File names may hold any byte but ``/`` and NUL; written raw into a line-based
    log or a mail they forge lines. Every place that writes a name into a log line,
    a mail or a report passes it through here. Names that are not valid UTF-8
    (surrogate escapes) show as ``\\udcff``-style escapes too.
    """
    if text.isprintable():
        return text
    return storable(text.translate(_CONTROL))


def storable(text: str) -> str:
    """``text`` made representable in UTF-8: surrogate escapes become ``\\udcff``-style text.

    ``os.fsdecode`` turns a name that is not valid UTF-8 (written by a system using
    another character set) into a ``str`` holding lone surrogates, which no database,
    JSON document or mail can carry: SQLite refuses the whole statement. Every name
    that crosses into the store, the API or a mail passes through here (or through
    :func:`printable`, which also escapes control characters). Valid text is
    returned unchanged.
    """
    if text.isascii():  # the common case, without an encoded copy
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return "".join(f"\\u{ord(c):04x}" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)
    return text


class JobState(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRY_WAIT = "retry_wait"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES

    def __str__(self) -> str:
        return self.value


FINISHED_STATES = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class ErrorKind(str, Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"

    def __str__(self) -> str:
        return self.value


TARGET_FORMS = (
    ("dataset",),
    ("project", "dataset"),
    ("dataset_id",),
    ("screen",),
    ("screen_id",),
)


@dataclass(frozen=True)
class Target:
    """Where the images go: one of the forms in ``TARGET_FORMS``."""

    project: str | None = None
    dataset: str | None = None
    dataset_id: int | None = None
    screen: str | None = None
    screen_id: int | None = None

    @classmethod
    def from_dict(cls, data: Any, where: str = "target") -> Target:
        if not isinstance(data, dict):
            raise AcquisitionError(
                f"{where}: must be an object such as "
                f'{{"project": "P", "dataset": "D"}}, got {data!r}'
            )
        keys = tuple(sorted(k for k, v in data.items() if v not in (None, "")))
        forms = {tuple(sorted(f)): f for f in TARGET_FORMS}
        if keys not in forms:
            allowed = ", ".join("{" + ", ".join(f) + "}" for f in TARGET_FORMS)
            raise AcquisitionError(
                f"{where}: keys {list(keys) or 'none'} do not form a target; use one of {allowed}"
            )
        values: dict[str, Any] = {}
        for key in keys:
            value = data[key]
            if key.endswith("_id"):
                # OMERO ids are Java longs (and SQLite integers 64-bit): a larger one names nothing.
                if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**63:
                    raise AcquisitionError(f"{where}.{key}: must be a positive integer below 2**63, got {value!r}")
            elif not isinstance(value, str) or not value.strip():
                raise AcquisitionError(f"{where}.{key}: must be a non-empty string, got {value!r}")
            elif "/" in value or "\x00" in value:
                raise AcquisitionError(f"{where}.{key}: must not contain '/', got {value!r}")
            values[key] = value.strip() if isinstance(value, str) else value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies and was the slowest part of an API submit.
        values = (
            ("project", self.project),
            ("dataset", self.dataset),
            ("dataset_id", self.dataset_id),
            ("screen", self.screen),
            ("screen_id", self.screen_id),
        )
        return {k: v for k, v in values if v is not None}

    @property
    def label(self) -> str:
        """Human-readable form for mails and logs, e.g. ``project "P" / dataset "D"``."""
        parts = []
        for key, value in self.to_dict().items():
            name = key.replace("_id", "")
            parts.append(f"{name} {value}" if key.endswith("_id") else f'{name} "{value}"')
        return " / ".join(parts)


@dataclass(frozen=True, slots=True)  # slots: a plate holds 100,000 of them
class FileEntry:
    """One file of an acquisition, relative to the acquisition's root."""

    path: str
    size: int | None = None
    sha256: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"path": self.path}
        if self.size is not None:
            data["size"] = self.size
        if self.sha256 is not None:
            data["sha256"] = self.sha256
        return data

    @classmethod
    def from_dict(cls, data: Any) -> FileEntry:
        if isinstance(data, str):
            return cls(path=data)
        return cls(path=data["path"], size=data.get("size"), sha256=data.get("sha256"))


#: A job's ``source`` from the seed-compatible route (``POST /ome/import``): ``seed:<user>``.
SEED_SOURCE_PREFIX = "seed:"

#: Where a job spec's ``extra`` keeps each file's identity when queued, in ``files`` order.
IDENTITY_KEY = "file_identity"


@dataclass(frozen=True)
class JobSpec:
    """Everything needed to queue one acquisition; the input of ``JobStore.enqueue``.

    ``root`` is the acquisition's absolute folder; ``files`` are relative to it.
    ``source`` says where it came from: ``watch:<name>``, ``api:<client>``, ``cli:<user>``.
    ``session_key`` is a secret (an OMERO session the client lent us): stored only
    until the job ends, never returned or logged.
    """

    owner: str
    root: str
    files: tuple[FileEntry, ...]
    target: Target
    source: str
    group: str | None = None
    email: str | None = None
    name: str | None = None
    description: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    filesets: tuple[tuple[str, ...], ...] = ()
    importer: str | None = None
    idempotency_key: str | None = None
    session_key: str | None = None
    omero_host: str | None = None
    omero_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def key(self) -> str:
        """The idempotency key: given, or derived from the source, root and listed files."""
        if self.idempotency_key:
            return self.idempotency_key
        digest = hashlib.sha256()
        content = {
            "source": self.source,
            "root": self.root,
            "files": [f.to_dict() for f in self.files],
            "target": self.target.to_dict(),
            "owner": self.owner,
        }
        digest.update(json.dumps(content, sort_keys=True).encode())
        return "sha256:" + digest.hexdigest()

    def file_identities(self) -> dict[str, tuple[int, ...]]:
        """Each file's identity when queued (``safefs.identity``: device, inode, size, mtime), by path.

        Empty for jobs queued before identities were recorded.
        """
        ids = self.extra.get(IDENTITY_KEY)
        if not isinstance(ids, list) or len(ids) != len(self.files):
            return {}
        return {entry.path: tuple(ident) for entry, ident in zip(self.files, ids, strict=True)}

    def total_bytes(self) -> int:
        return sum(f.size or 0 for f in self.files)

    @property
    def acquisition_name(self) -> str:
        """The acquisition's own name, for archive folders and mails.

        A folder acquisition is named after its folder (``…/plate 7`` → ``plate 7``),
        even when it holds one file; a one-file acquisition (a sidecar pair, or a
        file submitted alone: ``extra["unit"] == "file"``) after its data file
        without the extension (``cells_01.czi`` → ``cells_01``, ``a.ome.tiff`` → ``a``).
        """
        if self.extra.get("unit") == "file" and self.files:
            name = self.files[0].path.replace("\\", "/").rsplit("/", 1)[-1]
            stem = name.rsplit(".", 1)[0] if "." in name.lstrip(".") else name
            if stem.lower().endswith(".ome"):
                stem = stem[:-4]
            return stem or name
        rel = str(self.extra.get("acquisition") or "").rstrip("/")
        return rel.rsplit("/", 1)[-1] if rel else (self.root.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1])

    def to_dict(self, *, secrets: bool = False, files: bool = True) -> dict[str, Any]:
        """Plain data for storage; the session key only when ``secrets`` is true, the files unless ``files`` is false."""
        data = {
            "owner": self.owner,
            "root": self.root,
            "target": self.target.to_dict(),
            "source": self.source,
            "group": self.group,
            "email": self.email,
            "name": self.name,
            "description": self.description,
            "annotations": dict(self.annotations),
            "filesets": [list(fs) for fs in self.filesets],
            "importer": self.importer,
            "idempotency_key": self.idempotency_key,
            "omero_host": self.omero_host,
            "omero_port": self.omero_port,
            "extra": dict(self.extra),
        }
        if files:
            data["files"] = [f.to_dict() for f in self.files]
        if secrets:
            data["session_key"] = self.session_key
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(
            owner=data["owner"],
            root=data["root"],
            files=tuple(FileEntry.from_dict(f) for f in data.get("files", ())),
            target=Target(**data.get("target", {})),
            source=data["source"],
            group=data.get("group"),
            email=data.get("email"),
            name=data.get("name"),
            description=data.get("description"),
            annotations=dict(data.get("annotations") or {}),
            filesets=tuple(tuple(fs) for fs in data.get("filesets") or ()),
            importer=data.get("importer"),
            idempotency_key=data.get("idempotency_key"),
            session_key=data.get("session_key"),
            omero_host=data.get("omero_host"),
            omero_port=data.get("omero_port"),
            extra=dict(data.get("extra") or {}),
        )


@dataclass
class Progress:
    phase: str = ""
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "phase": self.phase,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "files_done": self.files_done,
            "files_total": self.files_total,
        }

    @property
    def fraction(self) -> float:
        if self.bytes_total:
            return min(1.0, self.bytes_done / self.bytes_total)
        if self.files_total:
            return min(1.0, self.files_done / self.files_total)
        return 0.0


@dataclass
class JobError:
    kind: ErrorKind
    message: str
    config_error: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"kind": str(self.kind), "message": self.message, "config_error": self.config_error,
                "group": reason_group(self.message)}


_NAMED = re.compile(r"\S*[/\\]\S*|\S+\.[A-Za-z0-9]{2,5}\b")

# The places in the reasons watchfolder writes that hold a file name or a list of names
# (watchfolder.watch.detector, watchfolder.importers.archive). Each is replaced as one unit,
# so a name with spaces, dashes, digits, brackets or markup groups like any other name. The
# name runs up to the words that follow it in the template, not up to the first space.
_NAME_SLOTS = (
    # "waiting for 2 of 5 files (missing: a.tif, Image 001.tif and 3 more)"
    (re.compile(r"\(missing: .*?\)(?=;|:|,| and |$)"), "(missing: …)"),
    # "checksum(s) of a.tif, b c.tif does/do not match the manifest"
    (re.compile(r"\bchecksums? of .*? (does|do) not match\b"), "checksum of … does not match"),
    # "size of Slide 3.czi is 1,000 bytes, manifest says 4,096"
    (re.compile(r"\bsize of .*? is [0-9,]+ bytes\b"), "size of … is N bytes"),
    # "Slide 3.czi is 5,000 bytes, the manifest says 4,096; b.tif is …" (one or several)
    (re.compile(r"(^|: |; )[^;:]*? is [0-9,]+ bytes, the (\w+) says [0-9,]+"
                r"(?:; [^;:]*? is [0-9,]+ bytes, the \w+ says [0-9,]+)*(?: \(and [0-9]+ more\))?"),
     r"\1… is N bytes, the \2 says N"),
    # "sidecar names data file Image 1.czi, which is missing"
    (re.compile(r"\bdata file .*?, which is\b"), "data file …, which is"),
    # "3 listed file(s) missing from /x y: a b.tif, c.tif …" (the list runs to the end)
    (re.compile(r"\bmissing from .*$"), "missing from …"),
    # "left out of the acquisition (2): a b.tif, ~$lock.tif"
    (re.compile(r"\b(left out of the acquisition) \([0-9]+\): .*$"), r"\1: …"),
    # "the name … is not valid UTF-8", "a symbolic link (to …)"
    (re.compile(r"\bthe name .*? is not valid\b"), "the name … is not valid"),
    (re.compile(r"\(to .*?\)(?=:|,|;|$)"), "(to …)"),
    # quoted names anywhere: 'a b.tif', "a b.tif", `a b.tif`
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`"), "…"),
)


def reason_group(message: str | None) -> str:
    """What alike failures share: the reason's words, with paths, file names and numbers
    replaced (``checksum of … does not match the manifest``). The dashboard's "failures by
    reason" and the admin digest group on it.

    Names are replaced as whole units where the reason's template says where a name or a list
    of names stands (``(missing: …)``, ``size of … is N bytes``, ``data file …, which is``,
    quoted names), so names with spaces, dashes, digits or markup (``Slide 3 - Region 1.czi``,
    ``<b>x</b>.tif``) and lists of several names give the same group as one plain name. Any
    other path or ``name.ext`` is replaced word by word, then digits become ``N``. The result
    is at most 90 characters."""
    text = message or "(no reason)"
    for pattern, unit in _NAME_SLOTS:
        text = pattern.sub(unit, text)
    text = _NAMED.sub("…", text)
    return re.sub(r"[0-9]+", "N", text)[:90]


@dataclass
class HistoryEntry:
    at: float
    state: JobState
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"at": self.at, "state": str(self.state), "message": self.message}


@dataclass
class Job:
    """A job as stored: its spec plus its life so far. Times are Unix seconds."""

    id: int
    spec: JobSpec
    idempotency_key: str
    state: JobState
    attempts: int
    max_attempts: int
    created_at: float
    updated_at: float
    next_attempt_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    lease_expires_at: float | None = None
    cancel_requested: bool = False
    progress: Progress = field(default_factory=Progress)
    result: dict[str, Any] | None = None
    error: JobError | None = None
    history: list[HistoryEntry] = field(default_factory=list)
    log_path: str | None = None
    dismissed_at: float | None = None

    # Convenience accessors used by notifiers and views.
    @property
    def owner(self) -> str:
        return self.spec.owner

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def cause_in_files(self) -> bool:
        """Failed because of its files or their descriptor (rejected at detection, and failed again
        when a retry read them from disk): retrying the same files fails the same way. Changed
        files make a new job. The mark is the spec's ``extra["rejected"]``, which only a retry
        that finds the acquisition importable clears (:func:`watchfolder.watch.redetect.redetect`)."""
        return self.state == JobState.FAILED and bool(self.spec.extra.get("rejected"))

    def to_dict(self, *, history: bool = True) -> dict[str, Any]:
        """Public representation (API, CLI). Never contains the session key."""
        spec = self.spec
        data: dict[str, Any] = {
            "id": self.id,
            "state": str(self.state),
            "owner": spec.owner,
            "group": spec.group,
            "email": spec.email,
            "target": spec.target.to_dict(),
            "source": spec.source,
            "root": spec.root,
            "files": [f.to_dict() for f in spec.files],
            "filesets": [list(fs) for fs in spec.filesets],
            "name": spec.name,
            "description": spec.description,
            "annotations": dict(spec.annotations),
            "importer": spec.importer,
            "idempotency_key": self.idempotency_key,
            "uses_session_key": bool(spec.session_key),
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "next_attempt_at": self.next_attempt_at,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "worker": self.worker,
            "cancel_requested": self.cancel_requested,
            "progress": self.progress.to_dict(),
            "result": self.result,
            "error": self.error.to_dict() if self.error else None,
            "dismissed_at": self.dismissed_at,
            "cause_in_files": self.cause_in_files,
        }
        if history:
            data["history"] = [h.to_dict() for h in self.history]
        return data


@dataclass(frozen=True)
class RetryPolicy:
    """How often and when a transiently failed job is tried again.

    ``backoff`` lists the waits in seconds after the 1st, 2nd, … failed attempt;
    the last value repeats. ``max_attempts`` counts every attempt, the first included.
    """

    max_attempts: int = 5
    backoff: tuple[float, ...] = (30.0, 120.0, 600.0, 1800.0)

    def delay(self, attempts_made: int) -> float:
        if not self.backoff:
            return 0.0
        index = min(max(attempts_made, 1), len(self.backoff)) - 1
        return float(self.backoff[index])


# -- content de-duplication keys (watchfolder.watch.dedup) ----------------------


def _scope(spec: JobSpec) -> dict[str, Any]:
    """What de-duplication compares within: the owner, the target and the group."""
    return {"owner": spec.owner, "target": spec.target.to_dict(), "group": spec.group or None}


def _key_paths(spec: JobSpec) -> list[str]:
    """Each listed path (NFC) as the de-duplication keys see it: for a one-file acquisition
    (a sidecar pair: ``extra["unit"] == "file"``) without the data file's own name, which is
    the acquisition's name (``cells.czi`` renamed ``cells_renamed.czi`` is the same data, as a
    folder renamed is): the name becomes ``*`` + its extension, and a companion folder named
    after it (``_cells_/`` of ``cells.vsi``) ``_*_``."""
    paths = [unicodedata.normalize("NFC", f.path) for f in spec.files]
    if spec.extra.get("unit") != "file" or not paths:
        return paths
    data = paths[0].rsplit("/", 1)[-1]
    stem = unicodedata.normalize("NFC", spec.acquisition_name)
    if not stem or not data.startswith(stem):
        return paths
    names = {data: "*" + data[len(stem):], f"_{stem}_": "_*_"}
    return ["/".join(names.get(part, part) for part in path.split("/")) for path in paths]


def shape_key(spec: JobSpec) -> str | None:
    """The job's names and sizes within its owner, target and group, as one digest (hex), or None
    without files.

    Two jobs with equal shape keys list the same relative paths (Unicode NFC; a one-file
    acquisition's own name left out: :func:`_key_paths`) with the same sizes for the same
    owner, target and group: candidates for being the same data.
    The stores index it, so every earlier job of a shape is found however old it is.
    """
    if not spec.files:
        return None
    files = sorted(zip(_key_paths(spec), (f.size for f in spec.files), strict=True))
    text = json.dumps({**_scope(spec), "files": files}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def known_digests(spec: JobSpec, result: dict[str, Any] | None = None) -> dict[str, str]:
    """Path (NFC) -> SHA-256 of the job's files that are known: from the spec (the manifest's
    checksums), else from ``result["files"]`` (the archive importer records each file's)."""
    digests = {unicodedata.normalize("NFC", f.path): f.sha256 for f in spec.files if f.sha256}
    for entry in (result or {}).get("files") or []:
        if isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("path"), str):
            digests.setdefault(unicodedata.normalize("NFC", entry["path"]), entry["sha256"])
    return digests


def content_key(spec: JobSpec, digests: dict[str, str]) -> str | None:
    """The job's content within its owner, target and group: paths (NFC), sizes and SHA-256
    (``digests``: NFC path -> sha256), as one digest (hex); None when a file's checksum is
    not in ``digests`` or the job has no files.

    Equal content keys: the same data for the same owner, target and group (the README's
    "same data under another name"). Recorded for a job that imported its files
    (:meth:`~watchfolder.store.base.JobStore.succeed`), looked up by later ones.
    """
    if not spec.files:
        return None
    files = []
    for f, key_path in zip(spec.files, _key_paths(spec), strict=True):
        digest = digests.get(unicodedata.normalize("NFC", f.path))
        if not digest:
            return None
        files.append((key_path, f.size, digest.lower()))
    text = json.dumps({**_scope(spec), "files": sorted(files)}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def imported_content_key(spec: JobSpec, result: dict[str, Any] | None) -> str | None:
    """The content key a job that succeeded with ``result`` records: None when it imported
    nothing itself (a duplicate of an earlier job) or a file's checksum is unknown."""
    if (result or {}).get("duplicate_of"):
        return None
    return content_key(spec, known_digests(spec, result))
