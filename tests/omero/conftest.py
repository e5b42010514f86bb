"""Fixtures for the OMERO importer tests: the omero-py interpreter and the server double.

The double runs in the Python 3.10 environment built by ``scripts/omero-env``
(or the interpreter named by ``$WATCHFOLDER_OMERO_PYTHON``); without one, these
tests skip and say why. This folder is deliberately not a package: as one it
would be importable as ``omero`` and shadow omero-py's name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOUBLE = Path(__file__).resolve().parent / "double" / "server.py"
ADMIN_PASSWORD = "double-admin-secret"


def find_omero_python() -> tuple[str | None, str]:
    """(interpreter, reason): an interpreter that can import omero-py, or why there is none."""
    candidates = [os.environ.get("WATCHFOLDER_OMERO_PYTHON"), str(REPO / ".venv-omero" / "bin" / "python")]
    tried = []
    for python in filter(None, candidates):
        tried.append(python)
        if not os.path.exists(python):
            continue
        probe = subprocess.run([python, "-c", "import omero, Ice"], capture_output=True, text=True)
        if probe.returncode == 0:
            return python, ""
        tried[-1] += f" (cannot import omero: {probe.stderr.strip().splitlines()[-1:]})"
    return None, (
        "no Python with omero-py: run scripts/omero-env (needs a Python 3.10) or set "
        f"WATCHFOLDER_OMERO_PYTHON; tried {', '.join(tried)}"
    )


@pytest.fixture(scope="session")
def omero_python() -> str:
    python, reason = find_omero_python()
    if python is None:
        pytest.skip(reason)
    return python


class Double:
    """A running server double and its control channel."""

    def __init__(self, python: str, workdir: Path):
        self.proc = subprocess.Popen(
            [python, str(DOUBLE), str(workdir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(workdir / "double.log", "ab"), text=True,
        )
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the OMERO double did not start; see {workdir / 'double.log'}")
        ports = json.loads(line)
        self.port: int = ports["port"]
        self.control: int = ports["control"]
        self.log = workdir / "double.log"

    def _call(self, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{self.control}{path}", data=data,
                                         method="GET" if data is None else "POST")
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())

    def reset(self) -> None:
        """Back to an empty server (as freshly started); the port stays."""
        self.port = self._call("/reset", {})["port"]

    def state(self) -> dict[str, Any]:
        return self._call("/state")

    def seed(self, **body: Any) -> None:
        self._call("/seed", body)

    def faults(self, **switches: Any) -> dict[str, Any]:
        return self._call("/faults", switches)

    def session(self, user: str, group: str | None = None) -> str:
        return self._call("/session", {"user": user, "group": group})["uuid"]

    def close_session(self, uuid: str) -> None:
        self._call("/session/close", {"uuid": uuid})

    def annotation(self, owner: str, group: str, kind: str = "tag", ns: str | None = None, text: str = "") -> int:
        """Create an annotation as ``owner`` in ``group`` before any import; returns its id."""
        return self._call("/annotations", {"owner": owner, "group": group, "kind": kind, "ns": ns,
                                           "text": text})["id"]

    def live_filesets(self) -> list[dict[str, Any]]:
        return [f for f in self.state()["filesets"] if f["state"] != "deleted"]

    def stop(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="session")
def double_workdir(tmp_path_factory) -> Path:
    # Shared, so the TLS certificate is made once per test session.
    return tmp_path_factory.mktemp("omero-double")


@pytest.fixture(scope="session")
def double_process(omero_python, double_workdir):
    """One double process for the test session (its start and its JVM cost seconds);
    each test gets it reset to an empty server."""
    d = Double(omero_python, double_workdir)
    yield d
    d.stop()


@pytest.fixture
def double(double_process):
    """A fresh double with the admin, a group 'lab' and users jdoe (lab) and mary (lab, imaging)."""
    d = double_process
    d.reset()
    d.seed(
        groups=[{"name": "lab", "perms": "rwr---"}, {"name": "imaging", "perms": "rwra--"}],
        users=[
            {"name": "admin", "password": ADMIN_PASSWORD, "groups": ["system"], "admin": True},
            {"name": "jdoe", "password": "jdoe-pw", "email": "jdoe@example.org", "groups": ["lab"]},
            {"name": "mary", "password": "mary-pw", "email": "mary@example.org", "groups": ["lab", "imaging"]},
        ],
    )
    yield d


@pytest.fixture
def omero_config(make_config, omero_python, double):
    """A Config for the omero importer pointed at the double; keyword arguments override importer.omero."""

    def make(**omero: Any):
        values = {
            "host": "127.0.0.1", "port": double.port, "admin_user": "admin",
            "admin_password": ADMIN_PASSWORD, "python": omero_python, "idle_timeout": 60,
            "connect_timeout": 5,
        }
        values.update(omero)
        return make_config(importer={"kind": "omero", "omero": values})

    return make


@pytest.fixture
def child_module():
    """The child program imported by path (its pure helpers need no omero-py)."""
    import importlib.util

    path = REPO / "watchfolder" / "omero_child" / "child.py"
    spec = importlib.util.spec_from_file_location("watchfolder_omero_child", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


def bioformats_jar_of(python: str) -> Path:
    """The jar scripts/omero-env installs beside the OMERO Python (bfgroup.default_jar)."""
    prefix = subprocess.run([python, "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True)
    return Path(prefix.stdout.strip()) / "share" / "bioformats" / "bioformats_package.jar"


@pytest.fixture(scope="session")
def bioformats(omero_python) -> Path:
    """The Bio-Formats jar the child and the double use; skips without Java, JPype or the jar."""
    child_dir = REPO / "watchfolder" / "omero_child"
    probe = subprocess.run(
        [omero_python, "-c", f"import sys; sys.path.insert(0, {str(child_dir)!r}); import bfgroup; "
                             "print(bfgroup.why_unavailable() or '')"],
        capture_output=True, text=True,
    )
    reason = probe.stdout.strip()
    if probe.returncode:
        reason = (probe.stderr.strip().splitlines() or ["bfgroup does not load"])[-1]
    if reason:
        pytest.skip(f"no Bio-Formats in the OMERO environment: {reason}")
    return bioformats_jar_of(omero_python)


def image_converter(jar: Path, source: Path, pattern: str) -> list[Path]:
    """Bio-Formats' own ImageConverter: writes ``pattern`` (e.g. out_Z%z.ome.tiff) beside ``source``."""
    subprocess.run(["java", "-cp", str(jar), "loci.formats.tools.ImageConverter", "-no-upgrade", source.name,
                    pattern], cwd=source.parent, check=True, capture_output=True, timeout=300)
    return sorted(p for p in source.parent.iterdir() if p != source)


@pytest.fixture(scope="session")
def converted(bioformats, tmp_path_factory) -> dict[str, list[Path]]:
    """Test images made once per session from Bio-Formats' synthetic .fake files:
    ``multi``: a multi-file OME-TIFF (three planes, three files, one OME-XML);
    ``tile``: a single-file OME-TIFF of two 256 x 256 planes."""
    folder = tmp_path_factory.mktemp("ome-tiff")
    fake = folder / "multi&sizeZ=3&sizeX=64&sizeY=64.fake"
    fake.touch()
    tile_folder = tmp_path_factory.mktemp("tile")
    tile = tile_folder / "tile&sizeZ=2&sizeX=256&sizeY=256.fake"
    tile.touch()
    return {"multi": image_converter(bioformats, fake, "out_Z%z.ome.tiff"),
            "tile": image_converter(bioformats, tile, "tile.ome.tiff")}


def truncated_tiff(good: bytes) -> bytes:
    """What an interrupted copy leaves: a TIFF header and the start of its IFD, then junk
    (Bio-Formats' setId accepts it; reading a plane fails)."""
    return good[:300] + b"II*\x00garbage"


@pytest.fixture
def make_spec(make_spec):
    """As the suite's make_spec, with files OMERO (Bio-Formats) reads as images by default:
    Bio-Formats' synthetic ``.fake`` format takes any content."""

    def make(files=None, **fields):
        return make_spec(files or {"img_1.fake": b"pixels-1" * 100, "img_2.fake": b"pixels-2" * 50}, **fields)

    return make


@pytest.fixture
def importer(omero_config):
    """The omero importer pointed at the double."""
    from watchfolder.importers import create_importer

    imp = create_importer(omero_config())
    yield imp
    imp.close()


def run_job(store, importer, spec, *, now=None):
    """Queue ``spec`` and run it through a real worker; the job as it ended."""
    from watchfolder.worker import Worker

    job, _ = store.enqueue(spec, now=now)
    Worker(store, importer, name="w1").loop(now=now)
    return store.get(job.id)
