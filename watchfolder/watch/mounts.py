"""Which filesystem a path lives on, and whether it delivers change events.

Network filesystems (SMB/CIFS, NFS, SSHFS, 9p, …) deliver no inotify events for
changes made by other machines, so a watch folder on one must be polled.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

MOUNTINFO = "/proc/self/mountinfo"

# Filesystems whose changes made elsewhere never reach inotify. FUSE filesystems
# in general give no guarantee, so every ``fuse.*`` type counts as network too.
NETWORK_FS = frozenset(
    {
        "cifs", "smb3", "smbfs", "nfs", "nfs4", "sshfs", "fuse.sshfs", "9p", "virtiofs", "afs",
        "ceph", "fuse.ceph", "glusterfs", "fuse.glusterfs", "lustre", "gpfs", "beegfs", "davfs",
        "fuse.davfs", "vboxsf", "vmhgfs", "fuse.vmhgfs-fuse", "ncpfs", "coda", "ocfs2", "gfs2",
        "fuse.s3fs", "fuse.rclone", "fuse.gcsfuse", "fuse.juicefs", "orangefs", "pvfs2",
    }
)


@dataclass(frozen=True)
class Mount:
    mount_point: str
    fs_type: str
    source: str

    @property
    def is_network(self) -> bool:
        return is_network_fs(self.fs_type)


def is_network_fs(fs_type: str) -> bool:
    """True when changes on ``fs_type`` may come from elsewhere without inotify events."""
    return fs_type in NETWORK_FS or fs_type.startswith("fuse.") or fs_type == "fuse"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse the text of ``/proc/self/mountinfo`` (see proc(5))."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        rest = right.split()
        if len(fields) < 5 or not rest:
            continue
        mounts.append(Mount(_unescape(fields[4]), rest[0], _unescape(rest[1]) if len(rest) > 1 else ""))
    return mounts


def mount_of(path: str | os.PathLike, mountinfo: str | None = None) -> Mount | None:
    """The mount holding ``path`` (the longest mount point above its real path), or None if unknown."""
    if mountinfo is None:
        try:
            mountinfo = Path(MOUNTINFO).read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            return None  # not Linux: the caller decides without it
    real = os.path.realpath(path)
    best: Mount | None = None
    for mount in parse_mountinfo(mountinfo):
        point = mount.mount_point
        inside = real == point or point == "/" or real.startswith(point.rstrip("/") + "/")
        # Later lines win on ties: a mount stacked over another hides it.
        if inside and (best is None or len(point) >= len(best.mount_point)):
            best = mount
    return best
