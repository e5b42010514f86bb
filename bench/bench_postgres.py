"""PostgreSQL store: job cycles/s with 1, 2 and 4 worker processes, beside a bare
``SKIP LOCKED`` claim-and-complete loop on the same server in the same run, and
the SQLite store with the same processes for comparison.

A cycle is the real one: claim → no-op import → succeed, with its history
entries, events, job log lines and the owner's mail composed by the real
``Notifier`` (text + HTML) and written to the outbox in the finishing
transaction, from a backlog queued beforehand, by real ``Worker`` loops with the
real store, in separate processes (as on separate hosts).

The bare loop is what any SKIP LOCKED queue does at least, on the same table
with the same indexes (the store's schema, the same backlog queued by the
store), with the same commit discipline (the claim commits, then the
completion commits) and the same number of processes: ``UPDATE jobs … WHERE id
= (SELECT id … ORDER BY message_id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING
id, spec`` to claim, one ``UPDATE`` to complete, per job. Target: ratio >= 0.5.

Each figure is the median of ``--rounds`` rounds (3); in a round the bare loop,
the PostgreSQL store and the SQLite store run one after the other, each on a
fresh database, and the ratio is the median of the rounds' ratios (the machine
is shared: load moves between rounds, less within one). For information, the
PostgreSQL store with a pre-rendered mail (the store's own cycle) and the
Notifier's cost per mail are printed too.

The server is a throwaway one started from the installed binaries
(``tests/pgserver.py``), with fsync off for both the store and the baseline.
Job logs go under ``$WATCHFOLDER_BENCH_DIR`` (the temp dir by default).
Run: ``.venv/bin/python bench/bench_postgres.py [--pg-jobs N] [--rounds N]`` (or ``make bench``).
"""

from __future__ import annotations

import argparse
import os
import statistics
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
import sys
from watchfolder import config as configmod
from watchfolder.importers.noop import NoopImporter
from watchfolder.mail.notify import Notifier
from watchfolder.store.base import Mail
from watchfolder.worker import Worker

class Prerendered(Mail):
    RAW = b"From: watchfolder@localhost\\r\\nTo: jdoe@example.org\\r\\nSubject: imported\\r\\n\\r\\nimported\\r\\n"
    sender = "watchfolder@localhost"
    subject = "imported"
    def as_bytes(self): return self.RAW

def prerendered(job): return [Prerendered("job_succeeded", ("jdoe@example.org",), None)]

kind, where, data, name, mail = sys.argv[1:6]
if mail == "notifier":
    config = configmod.parse({"data_dir": data, "notify": {"admin_email": "admin@example.org"}}, environ={})
    composer = Notifier(config).compose
else:
    composer = prerendered
if kind == "postgresql":
    from watchfolder.store.postgres import PostgresStore
    store = PostgresStore(where, logs_dir=data + "/logs", composer=composer)
else:
    from watchfolder.store import SQLiteStore
    store = SQLiteStore(where, logs_dir=data + "/logs", composer=composer)
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
import sys, time
import psycopg
url, name = sys.argv[1:3]
with psycopg.connect(url, autocommit=True) as conn:
    print("ready", flush=True)
    sys.stdin.readline()
    done = 0
    while True:
        now = time.time()
        row = conn.execute(
            "UPDATE jobs SET state = 'running', worker = %s, lease_expires_at = %s, message_id = NULL"
            " WHERE id = (SELECT id FROM jobs WHERE state = 'queued' ORDER BY message_id LIMIT 1"
            " FOR UPDATE SKIP LOCKED) RETURNING id, spec", (name, now + 300)).fetchone()
        if row is None:
            break
        conn.execute("UPDATE jobs SET state = 'succeeded', finished_at = %s, lease_expires_at = NULL"
                     " WHERE id = %s", (time.time(), row[0]))
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
                    email="jdoe@example.org", source="bench", idempotency_key=f"{tag}-{i}") for i in range(n)]


def backlog(kind: str, where: str, data: Path, n: int, tag: str) -> None:
    """``n`` queued jobs, queued by the store itself (so its schema and indexes)."""
    data.mkdir(parents=True, exist_ok=True)
    if kind == "postgresql":
        from watchfolder.store.postgres import PostgresStore

        store = PostgresStore(where, logs_dir=data / "logs")
    else:
        from watchfolder.store import SQLiteStore

        store = SQLiteStore(where, logs_dir=data / "logs")
    store.enqueue_many([(s, "") for s in specs(n, tag)])
    store.close()


def store_rate(kind: str, where: str, data: Path, n: int, processes: int, mail: str = "notifier") -> float:
    backlog(kind, where, data, n, f"{kind}-{processes}")
    total, elapsed = run_processes(
        [[WORKER_CHILD, kind, where, str(data), f"bench-{i}", mail] for i in range(processes)])
    assert total == n, (total, n)
    if kind == "postgresql":
        import psycopg

        with psycopg.connect(where) as conn:  # every job succeeded, each with its one mail in the outbox
            assert conn.execute("SELECT count(*) FROM jobs WHERE state = 'succeeded'").fetchone()[0] == n
            assert conn.execute("SELECT count(*) FROM outbox").fetchone()[0] == n
    return n / elapsed


def bare_rate(url: str, data: Path, n: int, processes: int) -> float:
    backlog("postgresql", url, data, n, f"bare-{processes}")
    total, elapsed = run_processes([[BARE_CHILD, url, f"bare-{i}"] for i in range(processes)])
    assert total == n, (total, n)
    return n / elapsed


def compose_cost(data: Path, n: int = 300) -> float:
    """Microseconds the real Notifier takes to compose one success mail and render its bytes."""
    from watchfolder import config as configmod
    from watchfolder.job import Job, JobState
    from watchfolder.mail.notify import Notifier

    notifier = Notifier(configmod.parse({"data_dir": str(data), "notify": {"admin_email": "a@example.org"}},
                                        environ={}))
    now = time.time()
    job = Job(id=1, spec=specs(1, "c")[0], idempotency_key="k", state=JobState.SUCCEEDED, attempts=1,
              max_attempts=3, created_at=now, updated_at=now, started_at=now, finished_at=now,
              result={"files": [], "bytes": 0})
    start = time.perf_counter()
    for _ in range(n):
        [m.as_bytes() for m in notifier.compose(job)]
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pg-jobs", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=3)
    args, _ = parser.parse_known_args()  # make bench passes every benchmark the same arguments
    server = PgServer.find()
    if isinstance(server, str):
        print(f"skipped: {server}")
        return 0
    server.start()
    n, rounds = args.pg_jobs, max(1, args.rounds)
    base = os.environ.get("WATCHFOLDER_BENCH_DIR") or None
    try:
        with tempfile.TemporaryDirectory(prefix="wf-bench-pg-", dir=base) as tmp_name:
            tmp = Path(tmp_name)
            print(f"== PostgreSQL store (jobs: {n}, median of {rounds} rounds, PostgreSQL binaries in "
                  f"{server.bindir}, fsync off)")
            verdicts = []
            for processes in (1, 2, 4):
                figures: dict[str, list[float]] = {"bare": [], "pg": [], "ratio": [], "lite": [], "pre": []}
                for r in range(rounds):
                    run = tmp / f"p{processes}-r{r}"
                    figures["bare"].append(bare_rate(server.create_database(), run / "bare", n, processes))
                    figures["pg"].append(store_rate("postgresql", server.create_database(), run / "pg", n,
                                                    processes))
                    figures["ratio"].append(figures["pg"][-1] / figures["bare"][-1])
                    figures["lite"].append(store_rate("sqlite", str(run / "lite" / "jobs.db"), run / "lite", n,
                                                      processes))
                    figures["pre"].append(store_rate("postgresql", server.create_database(), run / "pre", n,
                                                     processes, mail="prerendered"))
                med = {key: statistics.median(values) for key, values in figures.items()}
                verdicts.append(med["ratio"] >= 0.5)
                print(f"{processes} worker process(es): PostgreSQL store {med['pg']:6.0f} cycles/s   "
                      f"bare SKIP LOCKED loop {med['bare']:6.0f}/s   ratio {med['ratio']:4.2f} "
                      f"(rounds {', '.join(f'{x:.2f}' for x in figures['ratio'])}; target >= 0.5: "
                      f"{'OK' if med['ratio'] >= 0.5 else 'MISSED'})   SQLite store {med['lite']:6.0f} cycles/s",
                      flush=True)
                print(f"    for information: PostgreSQL store with a pre-rendered mail {med['pre']:6.0f} cycles/s "
                      f"(ratio {med['pre'] / med['bare']:4.2f})", flush=True)
            print(f"for information: the real Notifier composes and renders one success mail in "
                  f"{compose_cost(tmp):.0f} us (in every cycle above but the pre-rendered ones)")
            print("verdict:", "OK" if all(verdicts) else "MISSED")
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
