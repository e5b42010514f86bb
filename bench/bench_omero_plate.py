"""An HCS plate into OMERO (issue 13): one fileset of many small files, child vs a plain omero-py loop.

    .venv/bin/python bench/bench_omero_plate.py [--files 20000] [--file-bytes 1024] [--rounds 3]

Starts the server double (tests/omero/double/server.py) on 127.0.0.1 with the
omero-py interpreter and measures, in the same run, on the same folder (one main
file and ``--files`` - 1 files of ``--file-bytes`` bytes in ``Images/``, one fileset):

- plain: bench/omero_plain_upload.py with the folder: the plainest omero-py loop,
  one file after another (getUploader, write, close), then one verifyUpload; from
  the first getUploader to verifyUpload's answer;
- child: a job through OmeroImporter (child process, sudo, target, upload, import,
  annotation) with ``importer.omero.parallel_upload`` at its default; its upload
  phase as the parent sees it, from the first "uploading" event to the "importing"
  one (verifyUpload included); and the same with ``parallel_upload: 1``, for
  information.

A warm-up import (ten files, not measured) starts the double's JVM first. The
double is reset before every run (each starts from an empty server with the
same users); every party runs in a session of its own. Rounds interleave the sides,
rotating who goes first. Prints the median of each side, the median of the
per-round ratios child / plain as throughput (target >= 0.8), the whole child job's
time and the double's peak RSS. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import re
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
BLOCK = 1024 * 1024
MAIN = "000-plate.fake"  # sorts first: the main file Bio-Formats reads


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
        self.uploading_events = 0

    def progress(self, phase, bytes_done=0, bytes_total=0, files_done=0, files_total=0):
        now = time.monotonic()
        if phase == "uploading":
            self.uploading_events += 1
            if self.upload_start is None:
                self.upload_start = now
        if phase == "importing" and self.upload_end is None:
            self.upload_end = now

    def log(self, message):
        pass

    @property
    def log_path(self):
        return str(self._log)

    def log_path_text(self):
        return Path(self._log).read_text()


def make_plate(folder: Path, n: int, size: int) -> list[str]:
    """The main file, then n - 1 files of ``size`` bytes (distinct content); relative paths, sorted."""
    images = folder / "Images"
    images.mkdir(parents=True)
    (folder / MAIN).write_bytes(b"")
    filler = os.urandom(size)
    for i in range(n - 1):
        name = f"r{i // 2400 + 1:02d}c{(i // 100) % 24 + 1:02d}f{i % 100 + 1:02d}p01-ch1sk1fk1fl1.tiff"
        (images / name).write_bytes(i.to_bytes(8, "little") + filler[8:])
    # The plain loop takes the folder's files sorted by path; the job's fileset is the same list.
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=20000, help="files in the plate's fileset (default 20000)")
    parser.add_argument("--file-bytes", type=int, default=1024, help="size of each file (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    args = parser.parse_args()
    if args.files < 2 or args.rounds < 1:
        parser.error(f"--files {args.files} --rounds {args.rounds}: need files >= 2 and rounds >= 1")
    python = omero_python()
    if python is None:
        print("bench_omero_plate: skipped: no Python with omero-py (run scripts/omero-env)")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bench-omero-plate-", dir=os.environ.get("WATCHFOLDER_BENCH_DIR")))
    double = subprocess.Popen([python, str(DOUBLE), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(work / "double.log", "wb"), text=True, start_new_session=True)
    try:
        ports = json.loads(double.stdout.readline())

        def control(path, body):
            req = urllib.request.Request(f"http://127.0.0.1:{ports['control']}{path}", json.dumps(body).encode())
            return json.loads(urllib.request.urlopen(req, timeout=60).read())

        def fresh_server():
            control("/reset", {})
            control("/seed", {"groups": [{"name": "lab"}], "users": [
                {"name": "admin", "password": "pw", "groups": ["system"], "admin": True},
                {"name": "jdoe", "password": "jdoe-pw", "email": "jdoe@example.org", "groups": ["lab"]}]})

        plate = work / "plate"
        rels = make_plate(plate, args.files, args.file_bytes)
        spec_files = tuple(FileEntry(rel) for rel in rels)

        def importer_with(parallel):
            config = configmod.parse({
                "data_dir": str(work / "data"), "importer": {"kind": "omero", "omero": {
                    "host": "127.0.0.1", "port": ports["port"], "admin_user": "admin", "admin_password": "pw",
                    "python": python, "block_size": BLOCK, "bioformats": False, "parallel_upload": parallel,
                    "idle_timeout": 600}},
                "notify": {"transport": "none"}, "server": {"enabled": False}}, path=work / "w.yaml", environ={})
            return create_importer(config)

        store = SQLiteStore(work / "jobs.db", logs_dir=work / "logs")
        runs = {"plain": [], "child": [], "child_serial": []}
        # CPU seconds per run: the uploading process over its uploads, and the double over the whole run.
        client_cpu = {k: [] for k in runs}
        double_cpu = {k: [] for k in runs}
        job_seconds, events = [], []
        count = [0]

        def plain():
            fresh_server()
            out = subprocess.run([python, str(PLAIN), "127.0.0.1", str(ports["port"]), "jdoe", "jdoe-pw",
                                  str(plate), str(BLOCK)], capture_output=True, text=True, check=True,
                                 start_new_session=True)
            answer = json.loads(out.stdout.strip().splitlines()[-1])
            if answer["files"] != len(rels):
                raise SystemExit(f"the plain loop uploaded {answer['files']} files, expected {len(rels)}")
            client_cpu["plain"].append(answer["upload_cpu_seconds"])
            return answer["verified_seconds"]

        def child(parallel):
            fresh_server()
            count[0] += 1
            spec = JobSpec(owner="jdoe", group="lab", root=str(plate), files=spec_files, filesets=(tuple(rels),),
                           target=Target(dataset="plate"), source="cli:bench", idempotency_key=f"plate-{count[0]}")
            job = store.enqueue(spec)[0]
            ctx = Timing(job, work / f"job{count[0]}.log")
            start = time.monotonic()
            result = importer_with(parallel).run(job, ctx)
            if len(result["filesets"]) != 1 or len(result["filesets"][0]["files"]) != len(rels):
                raise SystemExit(f"the child imported {result['filesets']!r:.200}, not one fileset of {len(rels)}")
            if parallel != 1:
                job_seconds.append(time.monotonic() - start)
                events.append(ctx.uploading_events)
            # The child's own account of its uploads, in the job log.
            found = re.search(r"uploaded \d+ file\(s\).*; ([\d.]+) s CPU\)", ctx.log_path_text())
            client_cpu["child" if parallel != 1 else "child_serial"].append(float(found.group(1)))
            return ctx.upload_end - ctx.upload_start

        # Warm-up, not measured: the double's first server-side import starts its JVM (Bio-Formats).
        warm = work / "warm"
        make_plate(warm, 10, args.file_bytes)
        fresh_server()
        subprocess.run([python, str(PLAIN), "127.0.0.1", str(ports["port"]), "jdoe", "jdoe-pw", str(warm), str(BLOCK)],
                       capture_output=True, check=True, start_new_session=True)
        sides = [("plain", plain), ("child", lambda: child(None)), ("child_serial", lambda: child(1))]
        for n in range(args.rounds):
            # Rotate who goes first: none always runs right after another's clean-up.
            for name, run in sides[n % 3:] + sides[:n % 3]:
                before = cpu_seconds(double.pid)
                runs[name].append(run())
                double_cpu[name].append(cpu_seconds(double.pid) - before)
        ratios = [p / c for p, c in zip(runs["plain"], runs["child"], strict=True)]
        serial = [p / c for p, c in zip(runs["plain"], runs["child_serial"], strict=True)]
        med = {k: statistics.median(v) for k, v in runs.items()}
        print(f"plate: {args.files} files of {args.file_bytes} B in one fileset, {args.rounds} rounds interleaved, "
              "medians; server double over loopback SSL")
        print(f"plain omero-py loop (one file at a time): {med['plain']:7.2f} s  {args.files / med['plain']:7.0f} files/s"
              f"  (upload + verifyUpload)")
        print(f"through the child (parallel_upload 4)   : {med['child']:7.2f} s  {args.files / med['child']:7.0f} files/s"
              f"  (first 'uploading' to 'importing' event)")
        print(f"through the child (parallel_upload 1)   : {med['child_serial']:7.2f} s  "
              f"{args.files / med['child_serial']:7.0f} files/s  (for information)")
        print(f"ratio child / plain (throughput)        : {statistics.median(ratios):7.2f}   (target >= 0.8; per-round "
              f"{min(ratios):.2f}-{max(ratios):.2f}; with parallel_upload 1: {statistics.median(serial):.2f})")
        print("CPU per file (ms), uploading process over its uploads / the double over the whole run: "
              + ", ".join(f"{k} {1000 * statistics.median(client_cpu[k]) / args.files:.2f}"
                          f" / {1000 * statistics.median(double_cpu[k]) / args.files:.2f}" for k in runs))
        print(f"whole child job                         : {statistics.median(job_seconds):7.2f} s  (start, login, "
              f"sudo, checks, upload, import, annotation); {statistics.median(events):.0f} 'uploading' progress lines")
        print(f"double's peak RSS                       : {peak_rss_mb(double.pid):7.0f} MB")
        store.close()
        return 0
    finally:
        double.stdin.close()
        double.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
