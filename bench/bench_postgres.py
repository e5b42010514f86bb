"""PostgreSQL store: job cycles/s with 1, 2 and 4 worker processes, beside a bare
``SKIP LOCKED`` claim-and-complete loop on the same server in the same run, and
the SQLite store with the same processes for comparison.

A cycle is claim → no-op import → succeed (with its history, log lines and one
outbox mail), from a backlog queued beforehand, by real ``Worker`` loops in
separate processes (as on separate hosts). The bare loop is what any SKIP
LOCKED queue does at least: one ``UPDATE … WHERE id = (SELECT … FOR UPDATE SKIP
LOCKED) RETURNING`` to claim and one ``UPDATE`` to complete, per job, in the same
number of processes. Target: ratio >= 0.5.

The server is a throwaway one started from the installed binaries
(``tests/pgserver.py``), with fsync off for both the store and the baseline.
Run: ``.venv/bin/python bench/bench_postgres.py [--pg-jobs N]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from pgserver import PgServer  # noqa: E402

from watchfolder.job import FileEntry, JobSpec, Target  # noqa: E402

WORKER_CHILD = """
import sys, time
from pathlib import Path
from watchfolder.importers.noop import NoopImporter
from watchfolder.store.base import Mail
from watchfolder.worker import Worker

class Prerendered(Mail):
    RAW = b"From: watchfolder@localhost\\r\\nTo: jdoe@example.org\\r\\nSubject: imported\\r\\n\\r\\nimported\\r\\n"
    sender = "watchfolder@localhost"
    subject = "imported"
    def as_bytes(self): return self.RAW

def mails(job): return [Prerendered("job_succeeded", ("jdoe@example.org",), None)]

kind, where, logs, name = sys.argv[1:5]
if kind == "postgresql":
    from watchfolder.store.postgres import PostgresStore
    store = PostgresStore(where, logs_dir=logs, composer=mails)
else:
    from watchfolder.store import SQLiteStore
    store = SQLiteStore(where, logs_dir=logs, composer=mails)
worker = Worker(store, NoopImporter(), name=name, maintain_interval=1.0)
print("ready", flush=True)
sys.stdin.readline()
done = 0
while worker.loop() is not None:
    done += 1
print(done, flush=True)
store.close()
"""

BARE_CHILD = """
import sys
import psycopg
url = sys.argv[1]
with psycopg.connect(url, autocommit=True) as conn:
    print("ready", flush=True)
    sys.stdin.readline()
    done = 0
    while True:
        row = conn.execute(
            "UPDATE bare SET state = 'running' WHERE id = (SELECT id FROM bare WHERE state = 'queued'"
            " ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id").fetchone()
        if row is None:
            break
        conn.execute("UPDATE bare SET state = 'done' WHERE id = %s", row)
        done += 1
print(done, flush=True)
"""


def run_processes(argvs: list[list[str]]) -> tuple[int, float]:
    """Start the processes, release them together once all are ready; seconds until all are done."""
    procs = [subprocess.Popen([sys.executable, "-c", *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=REPO) for argv in argvs]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    start = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    total = sum(int(p.stdout.readline()) for p in procs)
    elapsed = time.perf_counter() - start
    for p in procs:
        p.wait(60)
    return total, elapsed


def specs(n: int, tag: str) -> list[JobSpec]:
    return [JobSpec(owner="jdoe", root="/data/acq", files=(FileEntry(f"f{i}.tif", 10),), target=Target(dataset="d"),
                    source="bench", idempotency_key=f"{tag}-{i}") for i in range(n)]


def store_rate(kind: str, where: str, tmp: Path, n: int, processes: int) -> float:
    if kind == "postgresql":
        from watchfolder.store.postgres import PostgresStore

        store = PostgresStore(where, logs_dir=tmp / "logs")
    else:
        from watchfolder.store import SQLiteStore

        store = SQLiteStore(where, logs_dir=tmp / "logs")
    store.enqueue_many([(s, "") for s in specs(n, f"{kind}-{processes}")])
    store.close()
    total, elapsed = run_processes(
        [[WORKER_CHILD, kind, where, str(tmp / "logs"), f"bench-{i}"] for i in range(processes)])
    assert total == n, (total, n)
    return n / elapsed


def bare_rate(url: str, n: int, processes: int) -> float:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bare")
        conn.execute("CREATE TABLE bare (id bigint PRIMARY KEY, state text NOT NULL)")
        conn.execute("CREATE INDEX bare_queued ON bare(id) WHERE state = 'queued'")
        conn.execute("INSERT INTO bare SELECT g, 'queued' FROM generate_series(1, %s) AS g", (n,))
    total, elapsed = run_processes([[BARE_CHILD, url] for _ in range(processes)])
    assert total == n, (total, n)
    return n / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg-jobs", type=int, default=2000)
    args, _ = parser.parse_known_args()  # make bench passes every benchmark the same arguments
    server = PgServer.find()
    if isinstance(server, str):
        print(f"skipped: {server}")
        return 0
    server.start()
    n = args.pg_jobs
    try:
        with tempfile.TemporaryDirectory(prefix="wf-bench-pg-") as tmp_name:
            tmp = Path(tmp_name)
            print(f"== PostgreSQL store (jobs: {n}, PostgreSQL binaries in {server.bindir}, fsync off)")
            verdicts = []
            for processes in (1, 2, 4):
                url = server.create_database()
                bare = bare_rate(url, n, processes)
                rate = store_rate("postgresql", url, tmp / f"pg{processes}", n, processes)
                ratio = rate / bare
                verdicts.append(ratio >= 0.5)
                lite = store_rate("sqlite", str(tmp / f"lite{processes}" / "jobs.db"), tmp / f"lite{processes}", n,
                                  processes)
                print(f"{processes} worker process(es): PostgreSQL store {rate:7.0f} cycles/s   "
                      f"bare SKIP LOCKED loop {bare:7.0f}/s   ratio {ratio:4.2f} (target >= 0.5: "
                      f"{'OK' if ratio >= 0.5 else 'MISSED'})   SQLite store {lite:7.0f} cycles/s")
            print("verdict:", "OK" if all(verdicts) else "MISSED")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
