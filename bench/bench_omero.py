"""OMERO importer benchmark: upload throughput through the child vs a plain omero-py loop.

    .venv/bin/python bench/bench_omero.py [--mb 200] [--rounds 3]

Starts the server double (tests/omero/double/server.py) on 127.0.0.1 with the
omero-py interpreter (.venv-omero/bin/python or $WATCHFOLDER_OMERO_PYTHON) and
measures, in the same run, on the same (sparse) file:

- plain: bench/omero_plain_upload.py, the plainest omero-py upload loop
  (1 MiB writes, SHA-1 while writing); its upload phase;
- child: a job through OmeroImporter (child process, sudo, target, upload,
  import, annotation); its upload phase, from the parent's progress events.

Prints both throughputs, the ratio (target >= 0.9) and the per-job overhead:
the wall time of a one-byte job through the child and of starting the child's
interpreter with omero-py (``child.py --probe``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watchfolder import config as configmod  # noqa: E402
from watchfolder.importers import create_importer  # noqa: E402
from watchfolder.importers.base import ImportContext  # noqa: E402
from watchfolder.job import FileEntry, JobSpec, Target  # noqa: E402
from watchfolder.store import JobStore  # noqa: E402

DOUBLE = REPO / "tests" / "omero" / "double" / "server.py"
PLAIN = REPO / "bench" / "omero_plain_upload.py"
CHILD = REPO / "watchfolder" / "omero_child" / "child.py"
BLOCK = 1024 * 1024


def omero_python() -> str | None:
    for python in filter(None, [os.environ.get("WATCHFOLDER_OMERO_PYTHON"), str(REPO / ".venv-omero/bin/python")]):
        if os.path.exists(python) and subprocess.run([python, "-c", "import omero"], capture_output=True).returncode == 0:
            return python
    return None


class Timing(ImportContext):
    """Records when the upload phase starts and ends, from the child's progress events."""

    def __init__(self, job, log_path):
        self.job, self._log = job, log_path
        self.upload_start = self.upload_end = None

    def progress(self, phase, bytes_done=0, bytes_total=0, files_done=0, files_total=0):
        now = time.monotonic()
        if phase == "uploading" and self.upload_start is None:
            self.upload_start = now
        if phase == "importing" and self.upload_end is None:
            self.upload_end = now

    def log(self, message):
        pass

    @property
    def log_path(self):
        return str(self._log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    python = omero_python()
    if python is None:
        print("bench_omero: skipped: no Python with omero-py (run scripts/omero-env)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-omero-", dir=os.environ.get("WATCHFOLDER_BENCH_DIR")))
    double = subprocess.Popen([python, str(DOUBLE), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(work / "double.log", "wb"), text=True)
    try:
        ports = json.loads(double.stdout.readline())

        def control(path, body):
            req = urllib.request.Request(f"http://127.0.0.1:{ports['control']}{path}", json.dumps(body).encode())
            urllib.request.urlopen(req, timeout=30).read()

        control("/seed", {"groups": [{"name": "lab"}], "users": [
            {"name": "admin", "password": "pw", "groups": ["system"], "admin": True},
            {"name": "jdoe", "password": "jdoe-pw", "email": "jdoe@example.org", "groups": ["lab"]}]})
        acq = work / "acq"
        acq.mkdir()
        size = args.mb * 1024 * 1024
        with open(acq / "big.tif", "wb") as f:
            f.truncate(size)  # sparse: the same bytes for both sides, no disk in the way
        (acq / "tiny.tif").write_bytes(b"x")
        config = configmod.parse({
            "data_dir": str(work / "data"), "importer": {"kind": "omero", "omero": {
                "host": "127.0.0.1", "port": ports["port"], "admin_user": "admin", "admin_password": "pw",
                "python": python, "block_size": BLOCK}},
            "notify": {"transport": "none"}, "server": {"enabled": False}}, path=work / "w.yaml", environ={})
        importer = create_importer(config)
        store = JobStore(work / "jobs.db", logs_dir=work / "logs")

        def job_for(name, n):
            spec = JobSpec(owner="jdoe", group="lab", root=str(acq), files=(FileEntry(name),),
                           target=Target(dataset="bench"), source="cli:bench", idempotency_key=f"{name}-{n}")
            return store.enqueue(spec)[0]

        plain, child, tiny = [], [], []
        for n in range(args.rounds):
            out = subprocess.run([python, str(PLAIN), "127.0.0.1", str(ports["port"]), "jdoe", "jdoe-pw",
                                  str(acq / "big.tif"), str(BLOCK)], capture_output=True, text=True, check=True)
            plain.append(size / json.loads(out.stdout.strip().splitlines()[-1])["upload_seconds"])
            job = job_for("big.tif", n)
            ctx = Timing(job, work / f"job{n}.log")
            importer.run(job, ctx)
            child.append(size / (ctx.upload_end - ctx.upload_start))
            job = job_for("tiny.tif", n)
            start = time.monotonic()
            importer.run(job, Timing(job, work / f"tiny{n}.log"))
            tiny.append(time.monotonic() - start)
        probes = []
        for _ in range(args.rounds):
            start = time.monotonic()
            subprocess.run([python, str(CHILD), "--probe"], capture_output=True, check=True)
            probes.append(time.monotonic() - start)
        p, c = statistics.median(plain), statistics.median(child)
        mb = 1024 * 1024
        print(f"file: {args.mb} MiB (sparse), {args.rounds} rounds, medians; server double over loopback SSL")
        print(f"plain omero-py upload loop : {p / mb:8.1f} MiB/s")
        print(f"through the child          : {c / mb:8.1f} MiB/s")
        print(f"ratio child / plain        : {c / p:8.2f}   (target >= 0.9)")
        print(f"one-byte job through child : {statistics.median(tiny):8.2f} s  (start, login, sudo, target, "
              "import, annotation)")
        print(f"child interpreter start    : {statistics.median(probes):8.2f} s  (python + import omero)")
        store.close()
        return 0
    finally:
        double.stdin.close()
        double.wait(timeout=30)


if __name__ == "__main__":
    raise SystemExit(main())
