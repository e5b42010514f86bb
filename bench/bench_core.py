"""Core benchmarks: job-cycle rate vs raw litequeue, archive importer vs cp + sync + openssl.

Each figure is printed beside a baseline measured in the same run, with the
ratio and the target. Fair means: the litequeue baseline has the index the
store adds to the same table (without it litequeue sorts its backlog on every
pop and the ratio flatters us); the measured cycle composes its mail with the
real Notifier (text + HTML, what production does); the archive baseline hashes
with ``openssl dgst -sha256`` (as fast as Python's hashlib), not coreutils'
``sha256sum`` (5x slower here).

Run: ``.venv/bin/python bench/bench_core.py`` (or ``make bench``).
Options: --jobs N (default 3000), --archive-mb N (default 1024), --skip-archive,
--rounds N (archive rounds, median; default 3).
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
from pathlib import Path

from litequeue import LiteQueue

from watchfolder import config as configmod
from watchfolder.importers.noop import NoopImporter
from watchfolder.job import FileEntry, JobSpec, Target
from watchfolder.mail.message import Mail
from watchfolder.mail.notify import Notifier
from watchfolder.store import SQLiteStore
from watchfolder.store.sqlite import QUEUE_TABLE
from watchfolder.worker import Worker


def report(name: str, value: float, unit: str, baseline: float, base_name: str, target: str) -> None:
    ratio = value / baseline if baseline else float("nan")
    print(f"{name:<44} {value:>10.1f} {unit:<8} baseline {base_name}: {baseline:>10.1f}  ratio {ratio:5.2f}  ({target})")


def raw_litequeue_rate(tmp: Path, n: int, phased: bool) -> float:
    """put, pop and done of n messages on a file database: cycles per second.

    phased: put all, then pop all, then done all (a backlog, as when a share
    comes back with many acquisitions); else one message at a time.
    """
    q = LiteQueue(str(tmp / f"raw-{phased}.db"), queue_name=QUEUE_TABLE)
    # The index the store adds to this table (store/sqlite.py SCHEMA): same queue, same seek.
    q.conn.execute(f"CREATE INDEX IF NOT EXISTS bench_ready ON {QUEUE_TABLE}(status, message_id)")
    start = time.perf_counter()
    if phased:
        for i in range(n):
            q.put(str(i))
        popped = [q.pop() for _ in range(n)]
        for m in popped:
            q.done(m.message_id)
    else:
        for i in range(n):
            q.put(str(i))
            m = q.pop()
            q.done(m.message_id)
    elapsed = time.perf_counter() - start
    q.close()
    return n / elapsed


class PrerenderedMail(Mail):
    """A mail whose bytes are ready: the cycle measures the store, not Python's email package
    (the real Notifier's composition cost is printed on its own line)."""

    RAW = (b"From: watchfolder@localhost\r\nTo: jdoe@example.org\r\nSubject: imported\r\n\r\nimported\r\n")

    @property
    def sender(self) -> str:
        return "watchfolder@localhost"

    @property
    def subject(self) -> str:
        return "imported"

    def as_bytes(self) -> bytes:
        return self.RAW


def _mails(job) -> list[Mail]:
    return [PrerenderedMail("job_succeeded", ("jdoe@example.org",), None)]


def real_notifier(tmp: Path) -> Notifier:
    config = configmod.parse({"data_dir": str(tmp), "notify": {"admin_email": "a@example.org"}}, environ={})
    return Notifier(config)


def job_cycle_rate(tmp: Path, n: int, synchronous: str, phased: bool, composer=None, tag: str = "") -> float:
    """enqueue → claim → no-op import → succeed (with its outbox row), one worker: cycles per second."""
    # Each store in a folder of its own: a store refuses a new database beside another's logs.
    folder = tmp / f"jobs-{synchronous}-{phased}{tag}"
    folder.mkdir()
    store = SQLiteStore(folder / "jobs.db", synchronous=synchronous,
                        composer=composer or _mails)
    worker = Worker(store, NoopImporter(), name="bench", maintain_interval=1.0)
    specs = [
        JobSpec(owner="jdoe", root="/data/acq", files=(FileEntry(f"f{i}.tif", 10),), email="jdoe@example.org",
                target=Target(dataset="d"), source="bench", idempotency_key=f"k{i}")
        for i in range(n)
    ]
    start = time.perf_counter()
    if phased:
        for spec in specs:
            store.enqueue(spec)
        while worker.loop() is not None:
            pass
    else:
        for spec in specs:
            store.enqueue(spec)
            worker.loop()
    elapsed = time.perf_counter() - start
    assert store.counts()["succeeded"] == n and store.outbox_counts()["pending"] == n
    store.close()
    return n / elapsed


def notifier_compose_cost(n: int) -> float:
    """Microseconds the real Notifier takes to compose one success mail (text + HTML)."""
    from watchfolder import config as configmod
    from watchfolder.job import Job, JobState
    from watchfolder.mail.notify import Notifier

    config = configmod.parse({"data_dir": tempfile.gettempdir(), "notify": {"admin_email": "a@example.org"}},
                             environ={})
    notifier = Notifier(config)
    spec = JobSpec(owner="jdoe", root="/data/acq", files=(FileEntry("f.tif", 10),), target=Target(dataset="d"),
                   source="bench", email="jdoe@example.org")
    now = time.time()
    job = Job(id=1, spec=spec, idempotency_key="k", state=JobState.SUCCEEDED, attempts=1, max_attempts=3,
              created_at=now, updated_at=now, started_at=now, finished_at=now, result={"destination": "/a"})
    start = time.perf_counter()
    for _ in range(n):
        [m.as_bytes() for m in notifier.compose(job)]
    return (time.perf_counter() - start) / n * 1e6


ARCHIVE_CHILD = """
import json, resource, sys, time
from pathlib import Path
from watchfolder.importers.archive import ArchiveImporter
from watchfolder.importers.base import ImportContext
from watchfolder.job import FileEntry, Job, JobSpec, JobState, Target

class Ctx(ImportContext):
    def progress(self, *a, **k): pass
    def log(self, m): pass
    @property
    def log_path(self): return "/dev/null"

src, dest = Path(sys.argv[1]), Path(sys.argv[2])
spec = JobSpec(owner="jdoe", root=str(src.parent), files=(FileEntry(src.name, src.stat().st_size),),
               target=Target(dataset="bench"), source="bench")
job = Job(id=1, spec=spec, idempotency_key="k", state=JobState.RUNNING, attempts=1, max_attempts=1,
          created_at=time.time(), updated_at=time.time())
start = time.perf_counter()
ArchiveImporter(root=dest).run(job, Ctx())
print(json.dumps({"seconds": time.perf_counter() - start,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def archive_vs_cp(tmp: Path, size_mb: int, rounds: int) -> None:
    src = tmp / "src" / "big.ome.tiff"
    src.parent.mkdir()
    block = os.urandom(1024 * 1024)
    with open(src, "wb") as fh:
        for i in range(size_mb):
            fh.write(block[:-1] + bytes([i % 256]))
    # Baseline: what an admin would script, with a hash as fast as ours: cp, sync,
    # then openssl dgst -sha256 of source and copy. Interleaved rounds, medians.
    baselines, ours, rss = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run(["cp", str(src), str(tmp / "cp-copy")], check=True)
        subprocess.run(["sync", str(tmp / "cp-copy")], check=True)
        subprocess.run(["openssl", "dgst", "-sha256", str(src), str(tmp / "cp-copy")], check=True,
                       capture_output=True)
        baselines.append(time.perf_counter() - start)
        (tmp / "cp-copy").unlink()
        out = subprocess.run(
            [sys.executable, "-c", ARCHIVE_CHILD, str(src), str(tmp / "archive")],
            check=True, capture_output=True, text=True,
        )
        figures = json.loads(out.stdout)
        ours.append(figures["seconds"])
        rss.append(figures["rss_mb"])
        shutil.rmtree(tmp / "archive")
    baseline, seconds = statistics.median(baselines), statistics.median(ours)
    figures = {"seconds": seconds, "rss_mb": max(rss)}
    print(f"archive importer, {size_mb} MiB file: {seconds:.2f} s (rounds {', '.join(f'{x:.2f}' for x in ours)}),"
          f" peak RSS {figures['rss_mb']:.0f} MB")
    print(f"  baseline cp + sync + openssl dgst -sha256 (source and copy): {baseline:.2f} s"
          f" (rounds {', '.join(f'{x:.2f}' for x in baselines)})")
    ratio = figures["seconds"] / baseline
    print(f"  time ratio archive/baseline {ratio:.2f}  (target <= 1.0: {'OK' if ratio <= 1.0 else 'MISSED'}); "
          f"RSS target <= 100 MB: {'OK' if figures['rss_mb'] <= 100 else 'MISSED'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--archive-mb", type=int, default=1024)
    parser.add_argument("--skip-archive", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    base = Path(os.environ.get("WATCHFOLDER_BENCH_DIR") or tempfile.gettempdir())
    with tempfile.TemporaryDirectory(prefix="wf-bench-", dir=base) as tmp_name:
        tmp = Path(tmp_name)
        print(f"== core (jobs: {args.jobs}, Python {sys.version.split()[0]})")
        # The verdict: litequeue's put, pop and done over a backlog, with the store's
        # index and synchronous=normal as litequeue sets it, against the store's full
        # cycle with the real Notifier's mail. The other rows are for information.
        notifier = real_notifier(tmp)
        for phased in (True, False):
            how = "backlog" if phased else "one at a time"
            raw = raw_litequeue_rate(tmp, args.jobs, phased)
            print(f"-- {how}: raw litequeue (with the store's index) put+pop+done {raw:.0f} cycles/s")
            if phased:
                rate = job_cycle_rate(tmp, args.jobs, "normal", phased, composer=notifier.compose, tag="-mail")
                verdict = "OK" if rate / raw >= 0.3 else "MISSED"
                report(f"job cycles/s, {how}, real Notifier mail", rate, "/s", raw, "litequeue+index",
                       f"target ratio >= 0.3: {verdict}")
            for sync in ("normal", "full"):
                rate = job_cycle_rate(tmp, args.jobs, sync, phased)
                note = "for information, pre-rendered mail" + (" (every commit fsynced)" if sync == "full" else "")
                report(f"job cycles/s, {how}, synchronous={sync}", rate, "/s", raw, "litequeue+index", note)
        print(f"real Notifier, compose one success mail (text + HTML): {notifier_compose_cost(300):.0f} us")
        if not args.skip_archive:
            archive_vs_cp(tmp, args.archive_mb, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
