"""OMERO importer benchmark: upload throughput through the child vs a plain omero-py loop.

    .venv/bin/python bench/bench_omero.py [--mb 200] [--rounds 11] [--warmup 1]

Starts the server double (tests/omero/double/server.py) on 127.0.0.1 with the
omero-py interpreter (.venv-omero/bin/python or $WATCHFOLDER_OMERO_PYTHON) and
measures, in the same run, on the same (sparse) file:

- plain: bench/omero_plain_upload.py, the plainest omero-py upload loop
  (1 MiB synchronous writes, SHA-1 while writing); its upload phase;
- child: a job through OmeroImporter (child process, sudo, target, upload,
  import, annotation); its upload phase as the parent sees it, from the first
  "uploading" event to the "importing" one (so it includes verifyUpload).

Rounds interleave the two sides, alternating which goes first, so that load
from elsewhere on the machine falls on both alike; the first ``--warmup``
rounds are discarded. The double, the plain loop and the child each run in a
session of their own (the importer starts its child so; see below). Prints the medians of both throughputs, the median of the
per-round ratios child/plain (each pair measured back to back; target >= 0.9)
with its range, and the per-job overhead: the wall time of a one-byte job
through the child and of starting the child's interpreter with omero-py
(``child.py --probe``). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
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
from watchfolder.store import SQLiteStore  # noqa: E402

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


def spread(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=200, help="file size in MiB (default 200)")
    parser.add_argument("--rounds", type=int, default=11, help="measured rounds (default 11)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and discarded (default 1)")
    args = parser.parse_args()
    if args.rounds < 1 or args.warmup < 0:
        parser.error(f"--rounds {args.rounds} --warmup {args.warmup}: need rounds >= 1 and warmup >= 0")
    python = omero_python()
    if python is None:
        print("bench_omero: skipped: no Python with omero-py (run scripts/omero-env)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-omero-", dir=os.environ.get("WATCHFOLDER_BENCH_DIR")))
    # Every party in a session of its own, as the importer starts its child: with
    # the kernel's autogroup scheduling a session is a scheduling group, and a
    # client sharing the bench's group with the server would be favoured over one
    # that does not whenever something else loads the machine.
    double = subprocess.Popen([python, str(DOUBLE), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(work / "double.log", "wb"), text=True, start_new_session=True)
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
        store = SQLiteStore(work / "jobs.db", logs_dir=work / "logs")

        def job_for(name, n):
            spec = JobSpec(owner="jdoe", group="lab", root=str(acq), files=(FileEntry(name),),
                           target=Target(dataset="bench"), source="cli:bench", idempotency_key=f"{name}-{n}")
            return store.enqueue(spec)[0]

        def plain_upload(n):
            out = subprocess.run([python, str(PLAIN), "127.0.0.1", str(ports["port"]), "jdoe", "jdoe-pw",
                                  str(acq / "big.tif"), str(BLOCK)], capture_output=True, text=True, check=True,
                                 start_new_session=True)
            return size / json.loads(out.stdout.strip().splitlines()[-1])["upload_seconds"]

        def child_upload(n):
            job = job_for("big.tif", n)
            ctx = Timing(job, work / f"job{n}.log")
            importer.run(job, ctx)
            return size / (ctx.upload_end - ctx.upload_start)

        plain, child, tiny = [], [], []
        for n in range(args.warmup + args.rounds):
            # Alternate who goes first: neither side always runs right after the other's cleanup.
            if n % 2:
                c = child_upload(n)
                p = plain_upload(n)
            else:
                p = plain_upload(n)
                c = child_upload(n)
            job = job_for("tiny.tif", n)
            start = time.monotonic()
            importer.run(job, Timing(job, work / f"tiny{n}.log"))
            elapsed = time.monotonic() - start
            if n >= args.warmup:
                plain.append(p)
                child.append(c)
                tiny.append(elapsed)
        probes = []
        for _ in range(args.rounds):
            start = time.monotonic()
            subprocess.run([python, str(CHILD), "--probe"], capture_output=True, check=True)
            probes.append(time.monotonic() - start)
        mb = 1024 * 1024
        ratios = [c / p for c, p in zip(child, plain, strict=True)]
        print(f"file: {args.mb} MiB (sparse), {args.rounds} rounds after {args.warmup} warm-up, interleaved, "
              "medians; server double over loopback SSL")
        print(f"plain omero-py upload loop : {statistics.median(plain) / mb:8.1f} MiB/s"
              f"   (rounds {spread([v / mb for v in plain])})")
        print(f"through the child          : {statistics.median(child) / mb:8.1f} MiB/s"
              f"   (rounds {spread([v / mb for v in child])})")
        print(f"ratio child / plain        : {statistics.median(ratios):8.2f}   (target >= 0.9; "
              f"per-round {spread(ratios)}, {sum(r >= 0.9 for r in ratios)}/{len(ratios)} rounds >= 0.9)")
        print(f"one-byte job through child : {statistics.median(tiny):8.2f} s  (start, login, sudo, target, "
              "import, annotation)")
        print(f"child interpreter start    : {statistics.median(probes):8.2f} s  (python + import omero)")
        store.close()
        return 0
    finally:
        double.stdin.close()
        double.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
