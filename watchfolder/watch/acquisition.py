"""The acquisition contract: manifests, sidecars, and turning a local path into a job spec.

An acquisition is described by a JSON *descriptor*: a manifest (``watchfolder.json``
at the root of a folder, listing its files) or a sidecar (``<datafile>.json`` beside
one data file). Both carry the same keys (see ``CONTRACT_KEYS``). A JSON file that
carries none of them is instrument metadata, i.e. data, not a descriptor.

Everything here is pure file reading: no store, no watching. The watcher, the CLI
``submit`` and the REST API all build their :class:`~watchfolder.job.JobSpec` here.
"""

from __future__ import annotations

import difflib
import errno
import fnmatch
import functools
import hashlib
import json
import os
import re
import stat
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import defaults as D
from .. import safefs
from ..errors import AcquisitionError
from ..job import IDENTITY_KEY, FileEntry, JobSpec, Target, printable
from ..safefs import file_kind

CONTRACT_KEYS = (
    "owner", "group", "email", "target", "name", "description", "annotations", "files", "filesets",
)
FILE_ENTRY_KEYS = ("path", "size", "sha256")

# A descriptor is a few KB; anything this big is not one and must not be read into memory.
MAX_DESCRIPTOR_BYTES = 16 * 1024 * 1024

_BOM = b"\xef\xbb\xbf"
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_EMAIL = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+|[^@\s]+@[^@\s]+")
_WINDOWS_DRIVE = re.compile(r"^[A-Za-z]:")


class NotADescriptor(AcquisitionError):
    """Valid JSON that carries none of the contract's keys: instrument data, not a sidecar."""


@dataclass(frozen=True)
class Descriptor:
    """A parsed, validated manifest or sidecar.

    ``files`` is ``None`` when the descriptor does not list files (a manifest then
    covers every file under its folder). ``warnings`` are for the job log (unknown
    fields, duplicate keys). ``raw_bytes_sha256`` identifies the exact bytes read,
    so a changed re-drop is recognisably a new acquisition.
    """

    owner: str | None = None
    group: str | None = None
    email: str | None = None
    target: Target | None = None
    name: str | None = None
    description: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    files: tuple[FileEntry, ...] | None = None
    filesets: tuple[tuple[str, ...], ...] = ()
    warnings: tuple[str, ...] = ()
    raw_bytes_sha256: str = ""
    path: Path | None = None


def is_descriptor(obj: Any) -> bool:
    """True when ``obj`` (parsed JSON) is a descriptor: an object with at least one contract key."""
    return isinstance(obj, dict) and any(key in obj for key in CONTRACT_KEYS)


# ---------------------------------------------------------------------------
# Reading and validating descriptors


def line_column(data: bytes, offset: int) -> tuple[int, int]:
    """1-based line and column of a byte offset, for messages about bad input."""
    line = data.count(b"\n", 0, offset) + 1
    return line, offset - (data.rfind(b"\n", 0, offset) + 1) + 1


def load_json(path: Path, *, what: str = "manifest or sidecar", within: str | None = None,
              allow_hard_links: bool = False) -> tuple[Any, bytes, list[str]]:
    """Read a JSON file (UTF-8, BOM tolerated): ``(value, raw bytes, warnings)``.

    Opened by :func:`watchfolder.safefs.read_file`'s rule: a symlink (``what`` names
    the file in the reason: "manifest is a symbolic link; …"), a FIFO or a folder is
    refused unread; with ``within``, a symlinked folder below it too. Raises
    :class:`AcquisitionError` for that, and naming the line and column of a syntax error.
    """
    path = path if isinstance(path, Path) else Path(path)
    try:
        raw = safefs.read_file(path, MAX_DESCRIPTOR_BYTES, within=within, what=what,
                               allow_hard_links=allow_hard_links)
    except safefs.UnsafePath as exc:
        raise AcquisitionError(str(exc)) from None
    except FileNotFoundError:
        raise AcquisitionError(f"{path}: does not exist") from None
    except OSError as exc:
        raise AcquisitionError(f"{path}: cannot read it ({exc.strerror}); check its permissions") from None
    if len(raw) > MAX_DESCRIPTOR_BYTES:
        raise AcquisitionError(
            f"{path}: larger than {MAX_DESCRIPTOR_BYTES // (1024 * 1024)} MB, too big for a manifest or sidecar"
        )
    body = raw[len(_BOM):] if raw.startswith(_BOM) else raw
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        line, column = line_column(body, exc.start)
        raise AcquisitionError(
            f"{path}: not UTF-8 text (bad byte 0x{body[exc.start]:02x} at line {line}, column {column}); "
            "save the file as UTF-8"
        ) from None
    warnings: list[str] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                warnings.append(f"duplicate key {key!r}: the last value is used")
            out[key] = value
        return out

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        raise AcquisitionError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}; "
            "fix the file (a JSON validator shows the spot) and save it again"
        ) from None
    return value, raw, warnings


def read_descriptor(path: Path, *, what: str = "manifest or sidecar", within: str | None = None,
                    allow_hard_links: bool = False) -> Descriptor:
    """Read and validate a manifest or sidecar (``what``), opened as :func:`load_json` does.

    Raises :class:`NotADescriptor` for JSON without any contract key, and
    :class:`AcquisitionError` for anything unreadable or invalid.
    """
    path = path if isinstance(path, Path) else Path(path)
    value, raw, warnings = load_json(path, what=what, within=within, allow_hard_links=allow_hard_links)
    if not is_descriptor(value):
        what = "a JSON object" if isinstance(value, dict) else f"JSON {type(value).__name__}"
        raise NotADescriptor(
            f"{path}: {what} without any of the keys {', '.join(CONTRACT_KEYS)}; "
            "treated as data, not as a manifest or sidecar"
        )
    try:
        return parse_descriptor(value, warnings=warnings, raw=raw, path=path)
    except AcquisitionError as exc:
        raise AcquisitionError(f"{path}: {exc}") from None


def parse_descriptor(
    data: dict[str, Any], *, warnings: Iterable[str] = (), raw: bytes = b"", path: Path | None = None
) -> Descriptor:
    """Validate a descriptor given as parsed JSON (also used for API request bodies)."""
    if not isinstance(data, dict):
        raise AcquisitionError(f"must be a JSON object, got {type(data).__name__}")
    notes = list(warnings)
    for key in data:
        if key not in CONTRACT_KEYS:
            hint = difflib.get_close_matches(str(key), CONTRACT_KEYS, n=1, cutoff=0.6)
            fix = f"did you mean {hint[0]!r}?" if hint else f"known fields: {', '.join(CONTRACT_KEYS)}"
            notes.append(f"unknown field {key!r} ignored; {fix}")
    files = _files(data["files"], notes) if data.get("files") is not None else None
    filesets = _filesets(data.get("filesets"), files)
    target = Target.from_dict(data["target"], where="target") if data.get("target") is not None else None
    return Descriptor(
        owner=_name_field(data, "owner"),
        group=_name_field(data, "group"),
        email=_email(data.get("email")),
        target=target,
        name=_text(data, "name"),
        description=_text(data, "description", allow_newlines=True),
        annotations=_annotations(data.get("annotations")),
        files=files,
        filesets=filesets,
        warnings=tuple(notes),
        raw_bytes_sha256=hashlib.sha256(raw).hexdigest() if raw else "",
        path=path,
    )


def _text(data: dict, key: str, *, allow_newlines: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise AcquisitionError(f"{key}: must be a string, got {value!r}")
    bad = "\x00" if allow_newlines else "\x00\n\r"
    if any(c in value for c in bad):
        raise AcquisitionError(f"{key}: must be one line of text without control characters, got {value!r}")
    return value.strip() or None


def _name_field(data: dict, key: str) -> str | None:
    value = _text(data, key)
    if value is not None and ("/" in value or any(c.isspace() for c in value)):
        raise AcquisitionError(f"{key}: must be a user or group name without spaces or '/', got {value!r}")
    return value


def _email(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _EMAIL.fullmatch(value.strip()):
        raise AcquisitionError(f"email: must be an address such as jdoe@example.org, got {value!r}")
    return value.strip()


#: The longest annotation key and value (characters): they go into every mail to the owner,
#: the job row and OMERO's map annotation, so a runaway one (900,000 characters) is refused.
MAX_ANNOTATION_KEY = 255
MAX_ANNOTATION_VALUE = 4096


def annotation_field(key: str) -> str:
    """``annotations.KEY`` for an error message, a long key shortened (the message must stay short)."""
    return f"annotations.{key if len(key) <= 40 else key[:40] + '…'}"


def annotation_problem(key: Any, value: Any) -> str | None:
    """What is wrong with one annotation pair (key and text value), or None.

    Keys are non-empty, at most :data:`MAX_ANNOTATION_KEY` characters; values are
    strings of at most :data:`MAX_ANNOTATION_VALUE` characters.
    """
    if not isinstance(key, str) or not key.strip():
        return "keys must be non-empty"
    if len(key) > MAX_ANNOTATION_KEY:
        return f"the key must be at most {MAX_ANNOTATION_KEY} characters, got {len(key)}"
    if not isinstance(value, str):
        return f"must be a string, got {value!r}"
    if len(value) > MAX_ANNOTATION_VALUE:
        return f"the value must be at most {MAX_ANNOTATION_VALUE} characters, got {len(value)}"
    return None


def _annotations(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise AcquisitionError(f'annotations: must be an object of text values such as {{"objective": "63x"}}, got {value!r}')
    out: dict[str, str] = {}
    for key, item in value.items():
        # Numbers are unambiguous as text; instruments write them unquoted.
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            item = str(item)
        bad = annotation_problem(key, item)
        if bad is not None:
            raise AcquisitionError(f"{annotation_field(key) if key.strip() else 'annotations'}: {bad}")
        out[key] = item
    return out


def normalize_relpath(value: Any, where: str) -> str:
    """Validate a relative path from a descriptor and return it in ``a/b/c`` form.

    Backslashes count as separators (Windows acquisition software writes them);
    absolute paths and ``..`` are refused so a descriptor can never reach outside
    its acquisition.
    """
    if not isinstance(value, str) or not value.strip():
        raise AcquisitionError(f"{where}: must be a relative path, got {value!r}")
    if "\x00" in value:
        raise AcquisitionError(f"{where}: contains a NUL character: {value!r}")
    text = value.replace("\\", "/")
    if text.startswith("/") or _WINDOWS_DRIVE.match(text):
        raise AcquisitionError(f"{where}: {value!r} is absolute; give it relative to the acquisition folder")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AcquisitionError(f"{where}: {value!r} contains '..'; paths must stay inside the acquisition folder")
    if not parts:
        raise AcquisitionError(f"{where}: {value!r} names no file")
    return "/".join(parts)


def _files(value: Any, notes: list[str]) -> tuple[FileEntry, ...]:
    if not isinstance(value, list):
        raise AcquisitionError(
            f'files: must be a list such as [{{"path": "a.tif", "size": 1024}}], got {type(value).__name__}'
        )
    out: list[FileEntry] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value):
        where = f"files[{i}]"
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, dict):
            raise AcquisitionError(f'{where}: must be a path or an object {{"path": ..., "size": ...}}, got {item!r}')
        for key in item:
            if key not in FILE_ENTRY_KEYS:
                notes.append(f"{where}: unknown field {key!r} ignored; known fields: {', '.join(FILE_ENTRY_KEYS)}")
        path = normalize_relpath(item.get("path"), where + ".path")
        key = unicodedata.normalize("NFC", path)
        if key in seen:
            raise AcquisitionError(f"{where}.path: {path!r} is listed twice (also files[{seen[key]}])")
        seen[key] = i
        size = item.get("size")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise AcquisitionError(f"{where}.size: must be a whole number of bytes (0 or more), got {size!r}")
        digest = item.get("sha256")
        if digest is not None:
            if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
                raise AcquisitionError(f"{where}.sha256: must be 64 hexadecimal digits, got {digest!r}")
            digest = digest.lower()
        out.append(FileEntry(path=path, size=size, sha256=digest))
    if not out:
        raise AcquisitionError(
            "files: the list is empty; list the acquisition's files, or remove the key to take "
            "every file under the folder"
        )
    return tuple(out)


def _filesets(value: Any, files: tuple[FileEntry, ...] | None) -> tuple[tuple[str, ...], ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(fs, list) for fs in value):
        raise AcquisitionError('filesets: must be a list of lists of paths, e.g. [["scan.vsi", "_scan_/f.ets"]]')
    listed = {unicodedata.normalize("NFC", f.path): f.path for f in files} if files is not None else None
    owner_of: dict[str, int] = {}
    out = []
    for i, fs in enumerate(value):
        if not fs:
            raise AcquisitionError(f"filesets[{i}]: is empty; remove it or list its files")
        paths = []
        for j, item in enumerate(fs):
            path = normalize_relpath(item, f"filesets[{i}][{j}]")
            key = unicodedata.normalize("NFC", path)
            if listed is not None:
                if key not in listed:
                    raise AcquisitionError(f"filesets[{i}][{j}]: {path!r} is not in files; add it to files")
                path = listed[key]
            if key in owner_of:
                raise AcquisitionError(f"filesets[{i}][{j}]: {path!r} is already in filesets[{owner_of[key]}]")
            owner_of[key] = i
            paths.append(path)
        out.append(tuple(paths))
    return tuple(out)


# ---------------------------------------------------------------------------
# The filesystem side: finding files, matching patterns, refusing escapes


def container_depth(parts: list[str]) -> int | None:
    """How many leading components reach the first known container format (``x.ome.zarr``), or None.

    A container (``defaults.CONTAINER_SUFFIXES``: OME-Zarr, Zarr, N5) is one
    dataset stored as a folder; its inside (``.zgroup``, ``.zattrs``, ``.zarray``,
    chunks) belongs to the format, so patterns never filter it.
    """
    for i, part in enumerate(parts[:-1]):
        if is_container(part):
            return i + 1
    return None


def is_container(name: str) -> bool:
    """True for a folder name of a known container format (``defaults.CONTAINER_SUFFIXES``)."""
    return name.lower().endswith(D.CONTAINER_SUFFIXES)


def is_excluded(relpath: str, exclude: Iterable[str] = D.EXCLUDE_PATTERNS, include: Iterable[str] = (), *,
                in_container: bool = False) -> bool:
    """True when a file (relative ``a/b/c`` path) is ignored by the patterns.

    An exclude pattern matches any component (so ``.*`` hides dot-folders too) or
    the whole path; when include patterns are given, the file's name or path must
    match one of them. Inside a known container format (:func:`container_depth`)
    only the components up to the container count: nothing inside is filtered.
    ``in_container``: the path is relative to a container (an acquisition folder
    named ``plate.ome.zarr``), so nothing in it is filtered.
    """
    if in_container:
        return False
    parts = relpath.split("/")
    depth = container_depth(parts)
    excluded = matcher(exclude)
    if depth is not None:
        return excluded is not None and any(excluded(p) for p in parts[:depth])
    if excluded is not None and (excluded(relpath) or any(excluded(p) for p in parts)):
        return True
    included = matcher(include)
    if included is not None:
        return not (included(parts[-1]) or included(relpath))
    return False


def matcher(patterns: Iterable[str]) -> Callable[[str], Any] | None:
    """One compiled test for "matches any of these shell patterns" (``fnmatchcase`` semantics), or None.

    Compiled once per pattern list: a tree of 100,000 files was matched pattern by
    pattern, name by name, through ``fnmatch``.
    """
    patterns = tuple(patterns)
    return _compiled(patterns) if patterns else None


@functools.lru_cache(maxsize=64)
def _compiled(patterns: tuple[str, ...]) -> Callable[[str], Any]:
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


def is_within(path: str, root: str) -> bool:
    """True when ``path`` is ``root`` or below it (both already resolved)."""
    root = root.rstrip(os.sep) or os.sep
    return path == root or path.startswith(root if root.endswith(os.sep) else root + os.sep)


def _check_name(rel: str, root: Path) -> None:
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        # Escaped as everywhere else (\udce9 is the byte 0xE9), not replaced by "?" marks: the
        # owner must see which bytes to fix.
        raise AcquisitionError(
            f"{printable(str(root))}: file name '{printable(rel)}' is not valid UTF-8 (each byte that is not "
            "UTF-8 shown as \\udcXX: \\udce9 is 0xE9; written by a system using another character set); rename it "
            "(the job store and OMERO need UTF-8 names)"
        ) from None


def walk_files(
    root: Path,
    *,
    exclude: Iterable[str] = D.EXCLUDE_PATTERNS,
    include: Iterable[str] = (),
    skip: Iterable[str] = (),
    left_out: list[str] | None = None,
) -> Iterator[tuple[str, os.stat_result]]:
    """Yield ``(relative path, stat)`` for every regular file under ``root``, sorted.

    Symbolic links are never followed: a link to a folder is not descended into
    (which also rules out loops), a link to a file of the acquisition is left out
    (its target is found by its own name; following both imported the same data
    twice), and a file link pointing outside raises :class:`AcquisitionError`
    (the file was meant to be imported: copy it in). A manifest may still name a
    link inside the acquisition explicitly (:func:`check_listed`). ``skip`` names relative paths to
    leave out (descriptor files). Nothing inside a known container format
    (``x.ome.zarr/``) is filtered by the patterns. ``left_out``, when given,
    collects what was left out and why (``".DS_Store (excluded)"``; a FIFO, socket or
    device: ``"x (a named pipe (FIFO), not a regular file: not imported)"``), for the
    job log and the owner's mail.
    """
    root = Path(root)
    real_root = os.path.realpath(root)
    exclude = tuple(exclude)
    include = tuple(include)
    excluded = matcher(exclude)
    skip_set = {unicodedata.normalize("NFC", s) for s in skip}
    # An acquisition that is itself a container (jdoe/plate.ome.zarr/): its .zgroup, .zattrs
    # and .zarray files are the format's, never filtered (without them it is not a Zarr).
    root_container = is_container(root.name)
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        folder = os.path.join(root, rel_dir) if rel_dir else str(root)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise AcquisitionError(f"{folder}: cannot list it ({exc.strerror}); check its permissions") from None
        subdirs = []
        inside_container = root_container or (bool(rel_dir) and container_depth(rel_dir.split("/") + [""]) is not None)
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            if not inside_container and excluded is not None and excluded(entry.name):
                if left_out is not None and not _own_marker(entry.name):
                    left_out.append(f"{rel} (excluded)")
                continue
            # A plain file's filters, decided once: with nothing to report, one they leave out
            # is skipped before its lstat (the sidecar walk of a plate would stat every file).
            passed = False
            if left_out is None and entry.is_file(follow_symlinks=False):
                if unicodedata.normalize("NFC", rel) in skip_set or is_excluded(
                        rel, exclude, include, in_container=root_container):
                    continue
                passed = True
            try:
                if entry.is_symlink():
                    # A link to a folder, wherever it points, is left out (never followed); a link
                    # to a file outside the acquisition fails it (the file was meant to be imported).
                    target = os.path.realpath(entry.path)
                    st = os.stat(entry.path)
                    if stat.S_ISDIR(st.st_mode):
                        if left_out is not None:
                            left_out.append(f"{rel} (a symbolic link to a folder, not followed)")
                        continue
                    if not is_within(target, real_root):
                        raise AcquisitionError(
                            f"{entry.path}: symlink points outside the acquisition folder (to {target}); "
                            "copy the file into the folder instead"
                        )
                    # A link to a file of the acquisition: that file is imported by its own name;
                    # following the link too would import the same data twice.
                    if left_out is not None:
                        inside = os.path.relpath(target, real_root)
                        left_out.append(f"{rel} (a symbolic link to {inside}, not followed: "
                                        "that file is imported by its own name)")
                    continue
                else:
                    st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # vanished or a dangling link: nothing to import
            if stat.S_ISDIR(st.st_mode):
                subdirs.append(rel)
            elif not stat.S_ISREG(st.st_mode):
                # A FIFO, socket or device: never opened (a FIFO blocks its reader, a device
                # acts when opened), never imported; the owner is told why it is missing.
                if left_out is not None:
                    left_out.append(f"{rel} ({file_kind(st.st_mode)}, not a regular file: not imported)")
            else:
                if not passed:
                    if unicodedata.normalize("NFC", rel) in skip_set:
                        continue
                    if is_excluded(rel, exclude, include, in_container=root_container):
                        if left_out is not None and not _own_marker(entry.name):
                            left_out.append(f"{rel} (not matched by include)" if include else f"{rel} (excluded)")
                        continue
                _check_name(rel, root)
                yield rel, st
        stack.extend(reversed(subdirs))


def special_reason(special: list[str], where: str) -> str:
    """Why listed files that are a FIFO, socket or device refuse the acquisition at once (never opened)."""
    return (
        f"the {where} lists {listed_names(special)}, which {'is' if len(special) == 1 else 'are'} not a regular file: "
        f"only regular files are imported, and waiting will not change that (nothing was opened). Remove "
        f"{'it' if len(special) == 1 else 'them'} from the {where}'s files, or put the data file there"
    )


def folders_reason(paths: list[str], where: str) -> str:
    """Why listed paths that are folders refuse the acquisition at once (waiting cannot help)."""
    one = len(paths) == 1
    return (f"the {where} lists {listed_names(paths)}, which {'is a folder' if one else 'are folders'}: a {where} "
            f"lists files. List the files inside {'it' if one else 'them'} (sub/a.tif), or leave \"files\" out to "
            "import everything in the acquisition's folder")


def listed_names(paths: list[str], limit: int = 10) -> str:
    """``a.tif, b.tif and 3 more``: at most ``limit`` paths named."""
    shown = ", ".join(paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def unlisted_files(root: Path, listed: Iterable[FileEntry], *, skip: Iterable[str] = (),
                   limit: int = 10_000) -> list[str]:
    """Files under ``root`` that a manifest's file list does not name: ``"x.dat (not listed in
    the manifest)"``, sorted, for the job log and the owner's mail (they are not imported).

    Names only (``scandir`` without a ``stat`` per file): a 100,000-file plate costs one
    listing per folder. Symlinked folders are not entered; ``skip`` names relative paths that
    are not news (the manifest itself); watchfolder's receipts and error reports are never
    listed. Names are compared in NFC, as listed paths are matched. At most ``limit`` are
    returned, then one ``"… and more"`` line.
    """
    wanted = {unicodedata.normalize("NFC", e.path) for e in listed}
    wanted.update(unicodedata.normalize("NFC", s) for s in skip)
    out: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        try:
            with os.scandir(os.path.join(root, rel_dir) if rel_dir else root) as it:
                entries = sorted(it, key=lambda e: e.name)
        except PermissionError:
            # Listed files below it: check_listed and the import say so. Otherwise nothing would.
            if rel_dir and not any(path.startswith(rel_dir + "/") for path in wanted):
                out.append(f"{rel_dir}/ (a folder the service cannot read: permission denied; "
                           "whatever it holds is not imported)")
            continue
        except OSError:
            continue  # gone: check_listed and the import say so for listed files
        subdirs = []
        for entry in entries:
            rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                continue
            if is_dir:
                subdirs.append(rel)
            elif unicodedata.normalize("NFC", rel) not in wanted and not _own_marker(entry.name):
                if len(out) >= limit:
                    return [*out, "… and more"]
                out.append(f"{rel} (not listed in the manifest)")
        stack.extend(reversed(subdirs))
    return out


def _own_marker(name: str) -> bool:
    """Receipts and error reports watchfolder writes beside acquisitions: never "left out" news."""
    return ".watchfolder-receipt.json" in name or ".watchfolder-error.txt" in name


def locate(root: Path, relpath: str) -> str | None:
    """Find a listed relative path on disk, tolerating NFC/NFD differences.

    Returns the path as spelled on disk, or ``None`` when it does not exist. A
    manifest written on one system often names a file in the other Unicode form
    than the filesystem stores (macOS writes NFD).
    """
    if os.path.lexists(os.path.join(root, relpath)):
        return relpath
    current = str(root)
    found = []
    for part in relpath.split("/"):
        candidate = os.path.join(current, part)
        if not os.path.lexists(candidate):
            wanted = unicodedata.normalize("NFC", part)
            try:
                names = os.listdir(current)
            except OSError:
                return None
            match = [n for n in names if unicodedata.normalize("NFC", n) == wanted]
            if not match:
                return None
            part = match[0]
            candidate = os.path.join(current, part)
        found.append(part)
        current = candidate
    return "/".join(found)


@dataclass
class ListedCheck:
    """Result of comparing listed files with the disk."""

    present: list[tuple[FileEntry, os.stat_result]]
    missing: list[str]  # readable reasons, one per file
    absent: list[str] = field(default_factory=list)  # listed paths not there at all
    sizes: list[tuple[str, int, int]] = field(default_factory=list)  # (path, bytes found, listed)
    # Listed paths that are a FIFO, socket or device ("x (a socket)"): never a data file, waiting cannot help.
    special: list[str] = field(default_factory=list)
    # Listed paths that are folders: a manifest lists files; waiting cannot help either.
    folders: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing


# A folder holding at least this many listed files is listed once (scandir) instead of
# looked up name by name: a plate's 100,000 files in one Images/ folder.
LIST_FOLDER_FROM = 16


def check_listed(root: Path, files: Iterable[FileEntry]) -> ListedCheck:
    """Check that each listed file exists under ``root`` as a regular file with its listed size.

    Present entries come back with their on-disk spelling and actual size, in the
    listed order. Symlinks pointing outside ``root`` raise :class:`AcquisitionError`.

    One pass: a folder holding many listed files is listed once with ``scandir``
    and each file stat'ed from its entry (one system call per file, whatever the
    depth; no symlink check per path component per file). Anything unusual — a
    symlink, a name in the other Unicode form, a missing file — takes the
    file-by-file path, which says why.
    """
    files = list(files)
    root_text = os.fspath(root)
    per_folder: dict[str, int] = {}
    for entry in files:
        folder = entry.path.rpartition("/")[0]
        per_folder[folder] = per_folder.get(folder, 0) + 1
    listings: dict[str, dict[str, os.DirEntry] | None] = {}
    plain_dirs: dict[str, bool] = {"": True}
    state = _RealRoot(root)
    present: list[tuple[FileEntry, os.stat_result]] = []
    missing: list[str] = []
    absent: list[str] = []
    sizes: list[tuple[str, int, int]] = []
    special: list[str] = []
    folders: list[str] = []
    for entry in files:
        folder, _, name = entry.path.rpartition("/")
        st = None
        if per_folder[folder] >= LIST_FOLDER_FROM and not entry.path.startswith("/"):
            if folder not in listings:
                listings[folder] = _list_plain_folder(root_text, folder, plain_dirs)
            listing = listings[folder]
            found = listing.get(name) if listing is not None else None
            if found is not None:
                try:
                    lst = found.stat(follow_symlinks=False)
                except OSError:
                    lst = None
                if lst is not None and not stat.S_ISLNK(lst.st_mode):
                    st = lst  # a plain folder chain and not a symlink: lstat is what stat would say
        if st is not None:
            checked = (entry.path, st)
        else:
            checked = _check_one(root, root_text, entry, state, missing, absent)
            if checked is None:
                continue
        rel, st = checked
        if not stat.S_ISREG(st.st_mode):
            missing.append(f"{entry.path} (not a regular file)")
            if stat.S_ISDIR(st.st_mode):
                folders.append(entry.path)
            else:
                special.append(f"{entry.path} ({file_kind(st.st_mode)})")
            continue
        if entry.size is not None and st.st_size != entry.size:
            missing.append(f"{entry.path} (size {st.st_size} bytes, listed {entry.size})")
            sizes.append((entry.path, st.st_size, entry.size))
            continue
        present.append((FileEntry(path=rel, size=st.st_size, sha256=entry.sha256), st))
    return ListedCheck(present, missing, absent, sizes, special, folders)


class _RealRoot:
    """``realpath(root)``, computed only when a symlink needs it."""

    def __init__(self, root: Path):
        self.root = root
        self._real: str | None = None

    @property
    def real(self) -> str:
        if self._real is None:
            self._real = os.path.realpath(self.root)
        return self._real


def _list_plain_folder(root: str, folder: str, plain_dirs: dict[str, bool]) -> dict[str, os.DirEntry] | None:
    """The entries of ``root/folder`` by name, when no symlink, ``.`` or ``..`` lies between; else None."""
    parts = folder.split("/") if folder else []
    current = ""
    for part in parts:
        parent, current = current, f"{current}/{part}" if current else part
        known = plain_dirs.get(current)
        if known is None:
            try:
                known = part not in ("", ".", "..") and plain_dirs[parent] and stat.S_ISDIR(
                    os.lstat(os.path.join(root, current)).st_mode
                )
            except OSError:
                known = False
            plain_dirs[current] = known
        if not known:
            return None
    try:
        with os.scandir(os.path.join(root, folder) if folder else root) as it:
            return {e.name: e for e in it}
    except OSError:
        return None


def _check_one(root: Path, root_text: str, entry: FileEntry, real_root: _RealRoot,
               missing: list[str], absent: list[str]) -> tuple[str, os.stat_result] | None:
    """Find and stat one listed file (its on-disk spelling and stat), or note why not and return None."""
    rel = entry.path
    full = os.path.join(root_text, rel)
    try:
        lst = os.lstat(full)
    except OSError:
        found = locate(root, entry.path)
        if found is None:
            missing.append(f"{entry.path} (missing)")
            absent.append(entry.path)
            return None
        rel = found
        full = os.path.join(root_text, rel)
        try:
            lst = os.lstat(full)
        except OSError:
            missing.append(f"{entry.path} (missing)")
            absent.append(entry.path)
            return None
    if _plain_below(root_text, rel, lst):
        # No symlink between root and the file: it resolves to realpath(root)/rel,
        # inside the folder, and lstat is what stat would say.
        return rel, lst
    real = os.path.realpath(full)
    if not is_within(real, real_root.real):
        raise AcquisitionError(
            f"{full}: symlink points outside the acquisition folder (to {real}); copy the file in instead"
        )
    try:
        return rel, os.stat(full)
    except FileNotFoundError:
        missing.append(f"{entry.path} (dangling symlink)")
        return None


def _plain_below(root: str, rel: str, lst: os.stat_result) -> bool:
    """True when ``root/rel`` has no symlink, ``.`` or ``..`` after ``root`` (``lst``: lstat of it).

    Such a path cannot leave the folder, so the full ``realpath`` (one lstat per
    component of the whole path, root included) is needed only otherwise.
    """
    if stat.S_ISLNK(lst.st_mode):
        return False
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return False
    current = root
    for part in parts[:-1]:
        current = os.path.join(current, part)
        try:
            if stat.S_ISLNK(os.lstat(current).st_mode):
                return False
        except OSError:
            return False
    return True


def record_identity(extra: dict[str, Any], found: Iterable[tuple[FileEntry, os.stat_result]], *,
                    allow_hard_links: bool, switch: str) -> dict[str, Any]:
    """``extra`` plus each file's :func:`watchfolder.safefs.identity`, which the worker's opener checks.

    ``found``: the files in the job's order with the ``stat`` taken when they were
    checked. A file with more than one hard link is the same file under another
    name, perhaps outside the drop folder (``ln /etc/shadow shadow``): refused with
    :class:`AcquisitionError` unless ``allow_hard_links`` (the config switch ``switch``).
    """
    ids = []
    for entry, st in found:
        if st.st_nlink > 1 and not allow_hard_links:
            raise AcquisitionError(
                f"{entry.path}: has {st.st_nlink} hard links (the same file under another name, perhaps outside "
                f"the drop folder); copy the file into the acquisition instead of linking it, or ask the admin "
                f"to set {switch}: true"
            )
        ids.append(list(safefs.identity(st)))
    return {**extra, IDENTITY_KEY: ids}


def sidecar_data_path(sidecar: Path, suffix: str = D.SIDECAR_SUFFIX) -> Path | None:
    """The data file a sidecar describes (``a.czi.json`` → ``a.czi``), or None if the name does not fit."""
    name = sidecar.name
    if not name.endswith(suffix) or len(name) <= len(suffix):
        return None
    return sidecar.with_name(name[: -len(suffix)])


# ---------------------------------------------------------------------------
# Building a job spec from a local path


def from_path(
    path: Path,
    *,
    source: str,
    owner: str | None = None,
    group: str | None = None,
    email: str | None = None,
    target: Target | None = None,
    name: str | None = None,
    description: str | None = None,
    annotations: dict[str, str] | None = None,
    manifest_name: str = D.MANIFEST_NAME,
    sidecar_suffix: str = D.SIDECAR_SUFFIX,
    idempotency_key: str | None = None,
    exclude: Iterable[str] = D.EXCLUDE_PATTERNS,
    include: Iterable[str] = (),
    resolved: bool = False,
    allow_hard_links: bool = True,
    hard_links_switch: str = "server.allow_hard_links",
    owner_may_override: bool = True,
) -> JobSpec:
    """Build a :class:`JobSpec` for a local acquisition named on the command line or by the API.

    ``path`` is a folder with a manifest, a data file with a sidecar (or the sidecar
    itself), a plain file, or a plain folder (every regular file under it except
    descriptors and excluded names). Explicit arguments override the descriptor;
    ``owner`` and ``target`` must be known in the end. Descriptor warnings are
    returned in ``spec.extra["warnings"]`` for the job log, and what a plain folder holds but
    is not imported (excluded names, FIFOs, links to folders) in ``spec.extra["left_out"]``. ``resolved=True`` says
    ``path`` is already ``os.path.realpath``'s answer (the API resolved it to check
    its roots), so it is not resolved again. Each file's identity is recorded
    (:func:`record_identity`); a file with several hard links is refused unless
    ``allow_hard_links`` (config switch ``hard_links_switch``, named in the reason).
    ``owner_may_override=False`` (HTTP clients): an ``owner`` other than the
    descriptor's is refused (:class:`AcquisitionError` naming both), so a client
    cannot import someone's described data as another owner's; the command line,
    run by an admin, may reassign it.
    """
    left_out: list[str] = []  # a plain folder's files not imported, and why (spec.extra["left_out"])
    if resolved:
        real = os.fspath(path)
        given = real  # for messages: already in Path's normal form
    else:
        given = Path(path)
        if not os.path.lexists(given):
            raise AcquisitionError(f"{given}: does not exist; check the path")
        real = os.path.realpath(given)
    st = _stat(real)
    if st is None:
        if not os.path.lexists(given):
            raise AcquisitionError(f"{given}: does not exist; check the path")
        raise AcquisitionError(f"{given}: is a dangling symlink")
    exclude = tuple(exclude)
    descriptor: Descriptor | None = None
    descriptor_file: Path | None = None
    descriptor_rel = ""  # descriptor_file relative to root

    if stat.S_ISREG(st.st_mode) and os.path.basename(real) == manifest_name:
        real = os.path.dirname(real)
        st = _stat(real)
    if st is not None and stat.S_ISDIR(st.st_mode):
        root: Path | str = real
        unit = "folder"
        manifest = os.path.join(real, manifest_name)
        if os.path.lexists(manifest):  # a symlink too: refused with its reason, never read nor ignored
            descriptor_file = Path(manifest)
            descriptor_rel = manifest_name
            descriptor = read_descriptor(descriptor_file, what="manifest", allow_hard_links=allow_hard_links)
        if descriptor is not None and descriptor.files is not None:
            check = check_listed(real, descriptor.files)
            if check.special:
                raise AcquisitionError(f"{manifest}: {special_reason(check.special, 'manifest')}")
            if check.folders:
                raise AcquisitionError(f"{manifest}: {folders_reason(check.folders, 'manifest')}")
            if check.missing:
                raise AcquisitionError(
                    f"{manifest}: {len(check.missing)} listed file(s) missing or incomplete: "
                    + "; ".join(check.missing[:20])
                    + (" …" if len(check.missing) > 20 else "")
                    + ". Wait until the copy finishes, or fix the manifest"
                )
            found = list(check.present)
            files = tuple(entry for entry, _ in found)
        else:
            root = Path(real)
            sidecars = _sidecars_under(root, sidecar_suffix, exclude, allow_hard_links)
            if descriptor is None and len(sidecars) == 1:
                # A folder holding one described data file: its sidecar speaks for the folder.
                descriptor_rel = next(iter(sidecars))
                descriptor_file = root / descriptor_rel
                descriptor = read_descriptor(descriptor_file, what="sidecar", allow_hard_links=allow_hard_links)
            skip = {manifest_name} | sidecars
            found = [
                (FileEntry(rel, st.st_size), st)
                for rel, st in walk_files(root, exclude=exclude, include=include, skip=skip, left_out=left_out)
            ]
            files = tuple(entry for entry, _ in found)
            if not files:
                raise AcquisitionError(f"{root}: no files to import (empty folder, or every file is excluded)")
    elif st is not None and stat.S_ISREG(st.st_mode):
        resolved_file = Path(real)
        data = resolved_file
        data_from_sidecar = sidecar_data_path(resolved_file, sidecar_suffix)
        if data_from_sidecar is not None and data_from_sidecar.is_file():
            # The sidecar itself was named; it describes its data file.
            try:
                descriptor = read_descriptor(resolved_file, what="sidecar", allow_hard_links=allow_hard_links)
                descriptor_file, data = resolved_file, data_from_sidecar
            except NotADescriptor:
                pass
        if descriptor is None:
            candidate = resolved_file.with_name(resolved_file.name + sidecar_suffix)
            if os.path.lexists(candidate):
                try:
                    descriptor = read_descriptor(candidate, what="sidecar", allow_hard_links=allow_hard_links)
                    descriptor_file = candidate
                except NotADescriptor:
                    pass
        root = data.parent
        unit = "file"
        st = os.stat(data)
        if descriptor_file is not None:
            descriptor_rel = descriptor_file.name  # beside the data file
        _check_name(data.name, root)
        sha = None
        if descriptor is not None and descriptor.files is not None:
            sha = _sidecar_checksum(descriptor, data.name, st.st_size)
        files = (FileEntry(data.name, st.st_size, sha),)
        found = [(files[0], st)]
    else:
        raise AcquisitionError(f"{given}: is neither a regular file nor a folder")

    d = descriptor or Descriptor()
    where = f"in {descriptor_file.name}" if descriptor_file else "in a manifest or sidecar"
    if owner and d.owner and owner != d.owner and not owner_may_override:
        raise AcquisitionError(
            f"{given}: owner {owner!r} contradicts the owner {d.owner!r} named {where}; leave \"owner\" out "
            f"(the data is {d.owner!r}'s), or have {d.owner!r} fix the {descriptor_file.name if descriptor_file else 'descriptor'}"
        )
    final_owner = owner or d.owner
    final_target = target or d.target
    if not final_owner:
        raise AcquisitionError(f'{given}: no owner; set "owner" {where}, or pass the owner (--owner)')
    if final_target is None:
        raise AcquisitionError(
            f'{given}: no target; set "target" {where} (e.g. {{"project": "P", "dataset": "D"}}), '
            "or pass the target (--project/--dataset)"
        )
    merged_annotations = dict(d.annotations)
    merged_annotations.update(annotations or {})
    filesets = d.filesets
    if filesets and descriptor_file is not None and descriptor_file.name != manifest_name:
        filesets = ()  # a sidecar describes one file; filesets there make no sense
    try:
        extra: dict[str, Any] = record_identity({"unit": unit}, found, allow_hard_links=allow_hard_links,
                                                switch=hard_links_switch)
    except AcquisitionError as exc:
        raise AcquisitionError(f"{root}/{exc}") from None
    if d.warnings:
        extra["warnings"] = list(d.warnings)
    if d.owner:
        extra["descriptor_owner"] = d.owner
    if descriptor_file is not None:
        extra["descriptor"] = descriptor_rel
        extra["descriptor_sha256"] = d.raw_bytes_sha256
    if left_out:  # what the folder holds and is not imported, said in the job's log and mail
        extra["left_out"] = left_out
    return JobSpec(
        owner=final_owner,
        root=str(root),
        files=files,
        target=final_target,
        source=source,
        group=group or d.group,
        # The descriptor's email belongs to the descriptor's owner: another owner given
        # here (submit --owner) gets their own (the job's email, else OMERO's, else the default).
        email=email or (d.email if final_owner == d.owner else None),
        name=name or d.name,
        description=description or d.description,
        annotations=merged_annotations,
        filesets=_filesets_on_disk(filesets, files),
        idempotency_key=idempotency_key,
        extra=extra,
    )


def _stat(path: str) -> os.stat_result | None:
    """``os.stat``, or None where ``Path.exists()`` would say False (missing, dangling, loop)."""
    try:
        return os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.EBADF):
            return None
        raise


def _sidecar_checksum(descriptor: Descriptor, data_name: str, size: int) -> str | None:
    """A sidecar may give the data file's size/checksum in ``files``; check the size now."""
    for entry in descriptor.files or ():
        if unicodedata.normalize("NFC", entry.path) == unicodedata.normalize("NFC", data_name):
            if entry.size is not None and entry.size != size:
                raise AcquisitionError(
                    f"{descriptor.path}: {data_name} has {size} bytes, the sidecar lists {entry.size}; "
                    "wait until the copy finishes, or fix the sidecar"
                )
            return entry.sha256
    return None


def _filesets_on_disk(
    filesets: tuple[tuple[str, ...], ...], files: tuple[FileEntry, ...]
) -> tuple[tuple[str, ...], ...]:
    """Re-spell fileset paths as found on disk, and refuse ones naming files not in the job."""
    on_disk = {unicodedata.normalize("NFC", f.path): f.path for f in files}
    out = []
    for i, fs in enumerate(filesets):
        paths = []
        for p in fs:
            key = unicodedata.normalize("NFC", p)
            if key not in on_disk:
                raise AcquisitionError(f"filesets[{i}]: {p!r} is not one of the acquisition's files")
            paths.append(on_disk[key])
        out.append(tuple(paths))
    return tuple(out)


def _sidecars_under(root: Path, suffix: str, exclude: tuple[str, ...], allow_hard_links: bool = False) -> set[str]:
    """Relative paths of sidecar descriptors in a plain folder (data files keep their JSON if not descriptors)."""
    found = set()
    for rel, _st in walk_files(root, exclude=exclude, include=("*" + suffix,)):
        full = root / rel
        data = sidecar_data_path(full, suffix)
        if data is None or not data.exists():
            continue
        try:
            value, _raw, _w = load_json(full, allow_hard_links=allow_hard_links)
        except AcquisitionError:
            continue
        if is_descriptor(value):
            found.add(rel)
    return found
