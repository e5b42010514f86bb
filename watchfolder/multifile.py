"""Multi-file image formats: which files beside a main file belong to it.

The one home of the suffix rules. The OMERO child (``omero_child/child.py``,
which loads this file by path: standard library only) groups filesets with
them when Bio-Formats is not there; the watcher makes a sidecar pair's
acquisition take the companions its format needs (``scan.vsi`` +
``scan.vsi.json`` brings ``_scan_/`` along). Paths are relative,
``/``-separated; suffixes compare case-insensitively.
"""

from __future__ import annotations

import os


def _companion_dir(name_of_dir):
    def match(main, other):
        folder = os.path.dirname(main)
        prefix = (folder + "/" if folder else "") + name_of_dir(main) + "/"
        return other.startswith(prefix)

    return match


def _same_stem(*suffixes):
    def match(main, other):
        stem = main.rsplit(".", 1)[0]
        return any(other.lower() == (stem + s).lower() for s in suffixes)

    return match


def _stem(path):
    return os.path.basename(path).rsplit(".", 1)[0]


MULTI_FILE_RULES = (
    # Olympus cellSens: scan.vsi + _scan_/stackN/*.ets
    (".vsi", _companion_dir(lambda main: "_" + _stem(main) + "_")),
    # 3DHISTECH MIRAX: slide.mrxs + slide/*.dat, Slidedat.ini
    (".mrxs", _companion_dir(_stem)),
    # Image Cytometry Standard v1: x.ics + x.ids
    (".ics", _same_stem(".ids")),
    # Analyze 7.5: x.hdr + x.img
    (".hdr", _same_stem(".img")),
    # MetaImage: x.mhd + x.raw / x.zraw
    (".mhd", _same_stem(".raw", ".zraw")),
    # DeltaVision: x.dv + x.dv.log
    (".dv", lambda main, other: other.lower() == main.lower() + ".log"),
)
MULTI_FILE_RULES_DOC = (
    "<stem>.vsi takes every file under _<stem>_/ beside it; <stem>.mrxs takes every file under "
    "<stem>/; <stem>.ics takes <stem>.ids; <stem>.hdr takes <stem>.img; <stem>.mhd takes "
    "<stem>.raw or .zraw; <name>.dv takes <name>.dv.log; any other file is a fileset of its own"
)

# What a main file cannot be read without, said to the owner when it is missing.
# (.dv keeps its pixels itself: its .log is optional.)
_NEEDED = {
    ".vsi": "the _{stem}_/ folder beside it (cellSens keeps the image's pixels there)",
    ".mrxs": "the {stem}/ folder beside it (MIRAX keeps the slide's data there)",
    ".ics": "{stem}.ids beside it (an ICS version 1 header keeps its pixels there)",
    ".hdr": "{stem}.img beside it (an Analyze header keeps its pixels there)",
    ".mhd": "{stem}.raw (or .zraw) beside it (the header's ElementDataFile)",
}


def rule_of(name: str):
    """The ``(suffix, match)`` rule whose main file ``name`` is, or None."""
    lower = name.lower()
    for suffix, match in MULTI_FILE_RULES:
        if lower.endswith(suffix):
            return suffix, match
    return None


def mains_of(rel: str) -> list[str]:
    """The main files ``rel`` could be a companion of (each to be confirmed with :func:`is_companion`).

    ``_scan_/stack1/f.ets`` -> ``scan.vsi``; ``slide/Data0.dat`` -> ``slide.mrxs``; ``x.ids`` ->
    ``x.ics``. Suffixes are tried in lower and upper case.
    """
    parts = rel.split("/")
    out = []
    for n in range(1, len(parts)):  # a folder on the way: _<stem>_/ or <stem>/
        head, folder = "/".join(parts[: n - 1]), parts[n - 1]
        prefix = head + "/" if head else ""
        if len(folder) > 2 and folder.startswith("_") and folder.endswith("_"):
            out += [prefix + folder[1:-1] + s for s in (".vsi", ".VSI")]
        out += [prefix + folder + s for s in (".mrxs", ".MRXS")]
    stem, dot, suffix = rel.rpartition(".")
    if dot:
        mains = {"ids": (".ics",), "img": (".hdr",), "raw": (".mhd",), "zraw": (".mhd",)}.get(suffix.lower(), ())
        out += [stem + s for m in mains for s in (m, m.upper())]
        if suffix.lower() == "log" and stem.lower().endswith(".dv"):
            out.append(stem)
    return out


def is_companion(main: str, other: str) -> bool:
    """Does ``other`` belong to main file ``main`` by the suffix rules? (Folders end in ``/``.)"""
    rule = rule_of(main)
    return rule is not None and other != main and rule[1](main, other)


def needs(folder: str, name: str) -> str | None:
    """What main file ``name`` in ``folder`` cannot be read without, in words; None: nothing.

    An ICS version 2 file keeps its pixels itself; a MetaImage needs only the
    ``<stem>.raw`` / ``.zraw`` its ``ElementDataFile`` names (``LOCAL``: none). Headers
    are read from their first 4 KiB.
    """
    rule = rule_of(name)
    if rule is None or rule[0] not in _NEEDED:
        return None
    if rule[0] in (".ics", ".mhd"):
        try:
            with open(os.path.join(folder, name), "rb") as fh:
                head = fh.read(4096).decode("latin-1").lower()
        except OSError:
            head = ""
        if rule[0] == ".ics" and "ics_version" in head and "2.0" in head.split("ics_version", 1)[1][:16]:
            return None
        if rule[0] == ".mhd":
            # Needed only when the header names <stem>.raw / .zraw (LOCAL: pixels inside; another
            # name: not a companion the rule can find, so nothing to wait for).
            value = head.split("elementdatafile", 1)[1].split("\n", 1)[0].strip(" =\t\r") \
                if "elementdatafile" in head else ""
            if value not in (_stem(name).lower() + ".raw", _stem(name).lower() + ".zraw"):
                return None
    return _NEEDED[rule[0]].format(stem=_stem(name))
