"""The ``archive`` importer: copy an acquisition into ``<root>/<layout>/…`` with checksums.

Each file is copied to a temporary name in the destination folder while its
SHA-256 is computed, fsynced, read back and hashed again, then linked into
place (``link`` fails if the name exists, so a different existing file is
never overwritten) and the temporary name removed. A file that is already
there with the same checksum counts as copied, so an attempt interrupted by a
crash completes on the next one without duplicating anything.

Layout placeholders: ``{owner}``, ``{group}``, ``{project}``, ``{dataset}``,
``{screen}``, ``{job_id}``, ``{date}`` (YYYY-MM-DD of the job's creation, UTC).
A target without a project files under project ``_no_project``; a screen
target uses project ``_screens`` and the screen as dataset; an id target
becomes ``dataset-<id>`` / ``screen-<id>``.
"""

from __future__ import annotations

import errno
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Any

from .. import defaults as D
from ..errors import PermanentImportError, TransientImportError, classify_os_error
from ..job import Job
from . import register
from .base import ImportContext, Importer


def _component(value: str | None, fallback: str) -> str:
    """A safe single path component: no separators, no NUL, no '.'/'..'."""
    text = (value or "").strip().replace("/", "_").replace("\\", "_").replace("\x00", "_")
    if not text or set(text) == {"."}:
        return fallback
    return text


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@register("archive")
class ArchiveImporter(Importer):
    def __init__(self, config=None, *, root: Path | None = None, layout: str | None = None,
                 chunk_bytes: int = D.COPY_CHUNK_BYTES):
        archive = config.importer.archive if config is not None else None
        self.root = Path(root or archive.root)
        self.layout = layout or (archive.layout if archive else D.ARCHIVE_LAYOUT)
        self.chunk_bytes = chunk_bytes

    def health(self) -> dict[str, Any]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            ok = os.access(self.root, os.W_OK)
            return {"ok": ok, "root": str(self.root), **({} if ok else {"error": f"{self.root} is not writable"})}
        except OSError as exc:
            return {"ok": False, "root": str(self.root), "error": f"cannot create {self.root}: {exc.strerror}"}

    def destination(self, job: Job) -> Path:
        t = job.spec.target
        if t.screen or t.screen_id:
            project = "_screens"
            dataset = t.screen or f"screen-{t.screen_id}"
        else:
            project = t.project or "_no_project"
            dataset = t.dataset or f"dataset-{t.dataset_id}"
        values = {
            "owner": _component(job.spec.owner, "_unknown_owner"),
            "group": _component(job.spec.group, "_default_group"),
            "project": _component(project, "_no_project"),
            "dataset": _component(dataset, "_no_dataset"),
            "screen": _component(t.screen or (f"screen-{t.screen_id}" if t.screen_id else None), "_no_screen"),
            "job_id": str(job.id),
            "date": time.strftime("%Y-%m-%d", time.gmtime(job.created_at)),
        }
        return self.root.joinpath(*[p for p in self.layout.format(**values).split("/") if p])

    def run(self, job: Job, ctx: ImportContext) -> dict[str, Any]:
        src_root = Path(job.spec.root)
        dest_root = self.destination(job)
        sources = []
        missing = []
        for entry in job.spec.files:
            if os.path.isabs(entry.path) or ".." in Path(entry.path).parts:
                # It would be copied outside the destination folder (the acquisition parsers refuse these too).
                raise PermanentImportError(
                    f"{entry.path}: listed paths must be relative to the acquisition folder, without '..'"
                )
            src = src_root / entry.path
            try:
                real = src.resolve(strict=True)
            except (FileNotFoundError, NotADirectoryError):
                missing.append(entry.path)
                continue
            if not real.is_relative_to(src_root.resolve()):
                raise PermanentImportError(
                    f"{entry.path} resolves outside the acquisition folder ({real}); symlinks out of it are refused"
                )
            size = real.stat().st_size
            if entry.size is not None and size != entry.size:
                raise PermanentImportError(
                    f"{entry.path} is {size} bytes but was {entry.size} bytes when queued: the acquisition "
                    "changed after it was queued; submit it again once it is complete"
                )
            sources.append((entry, real, size))
        if missing:
            raise PermanentImportError(
                f"{len(missing)} listed file(s) missing from {src_root}: {', '.join(missing[:20])}"
                + (" …" if len(missing) > 20 else "")
            )
        total = sum(size for _, _, size in sources)
        try:
            dest_root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, dest_root, "create archive folder") from None
        ctx.log(f"archiving {len(sources)} file(s), {total} bytes, to {dest_root}")
        done_bytes = 0
        copied = []
        buf = bytearray(self.chunk_bytes)
        for index, (entry, src, size) in enumerate(sources):
            dest = dest_root / entry.path
            digest, reused = self._copy_one(job, ctx, src, dest, entry.sha256, buf, done_bytes, total,
                                            index, len(sources))
            done_bytes += size
            copied.append({"path": entry.path, "dest": str(dest), "size": size, "sha256": digest})
            ctx.log(f"{'already archived' if reused else 'archived'} {entry.path} sha256={digest}")
            ctx.progress("copying", done_bytes, total, index + 1, len(sources))
        _fsync_dir(dest_root)
        return {"destination": str(dest_root), "files": copied, "bytes": total}

    def _copy_one(self, job, ctx, src: Path, dest: Path, expected: str | None, buf: bytearray,
                  done_before: int, total: int, index: int, count: int) -> tuple[str, bool]:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise classify_os_error(exc, dest.parent, "create archive folder") from None
        prefix = f".{dest.name}.wf-{job.id}-"
        for stale in dest.parent.glob(prefix + "*.part"):  # left by an interrupted attempt
            stale.unlink(missing_ok=True)
        tmp = dest.parent / f"{prefix}{uuid.uuid4().hex[:8]}.part"
        before = src.stat()
        source_hash = hashlib.sha256()
        view = memoryview(buf)
        done = 0
        try:
            with open(src, "rb") as fin, open(tmp, "xb") as fout:
                while True:
                    n = fin.readinto(buf)
                    if not n:
                        break
                    chunk = view[:n]
                    source_hash.update(chunk)
                    fout.write(chunk)
                    done += n
                    ctx.progress("copying", done_before + done, total, index, count)
                fout.flush()
                os.fsync(fout.fileno())
            after = src.stat()
            if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or done != after.st_size:
                raise TransientImportError(f"{src} changed while it was being copied; will try again")
            digest = source_hash.hexdigest()
            if expected and digest != expected.lower():
                raise PermanentImportError(
                    f"{src.name}: checksum {digest} does not match the manifest's {expected}; "
                    "the file is corrupt or the manifest is wrong: export the acquisition again"
                )
            if self._hash(tmp, buf) != digest:
                raise TransientImportError(f"the copy of {src.name} does not match its source (disk error?)")
            return digest, self._place(tmp, dest, digest, buf)
        except OSError as exc:
            if exc.filename == str(src):
                raise classify_os_error(exc, src, "read") from None
            raise classify_os_error(exc, dest, "write") from None
        finally:
            tmp.unlink(missing_ok=True)

    def _place(self, tmp: Path, dest: Path, digest: str, buf: bytearray) -> bool:
        """Move the verified copy into place; True when an identical file was already there."""
        try:
            os.link(tmp, dest)
        except FileExistsError:
            return self._place_existing(dest, digest, buf)
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            # Filesystems without hard links (some network shares): check, then rename.
            if dest.exists():
                return self._place_existing(dest, digest, buf)
            os.replace(tmp, dest)
        _fsync_dir(dest.parent)
        return False

    def _place_existing(self, dest: Path, digest: str, buf: bytearray) -> bool:
        if self._hash(dest, buf) == digest:
            return True
        raise PermanentImportError(
            f"{dest} already exists with different content; the archive never overwrites: "
            "move the existing file away or change importer.archive.layout"
        )

    @staticmethod
    def _hash(path: Path, buf: bytearray) -> str:
        digest = hashlib.sha256()
        view = memoryview(buf)
        with open(path, "rb") as fh:
            while n := fh.readinto(buf):
                digest.update(view[:n])
        return digest.hexdigest()
