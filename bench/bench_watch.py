"""Watch folder benchmarks: detection latency, rescans of a big tree, idle polling CPU.

Run: .venv/bin/python bench/bench_watch.py [--files 100000] [--folders 10000] [--acquisitions 200]

1. Detection latency (events and polling): enqueue time − last write − quiet
   period, p50/p99 over 200 acquisitions dropped one after another.
   Targets: events p99 ≤ 0.25 s; polling p99 ≤ poll interval + 0.25 s.
2. A full rescan of 100,000 files in 10,000 folders (and the start-up scans: all
   new, and after a restart; each the median of 3), timed beside
   ``find -printf '%s %T@ %p'`` (which stats every file) on the same tree in
   the same run. Target: ≤ 2× find; peak RSS of the watching process ≤ 200 MB.
   watchdog's own DirectorySnapshot (what its PollingObserver takes every
   interval) is timed on the same tree for scale.
3. Steady-state CPU of polling mode on that tree with nothing changing, at a
   1 s poll interval. Target: ≤ 5% of one core.

The tree and the job stores live in a temp dir (``$WATCHFOLDER_BENCH_DIR`` to
choose the disk), removed at the end. Nothing is asserted; figures and ratios
are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from watchfolder import config as configmod  # noqa: E402
from watchfolder.store import SQLiteStore  # noqa: E402
from watchfolder.watch.watcher import Watcher  # noqa: E402

QUIET = 1.0
POLL = 1.0


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def watch_config(drop: Path, data: Path, **watch) -> configmod.WatchConfig:
    entry = {"name": "bench", "path": str(drop), "quiet_period": QUIET, "poll_interval": POLL,
             "rescan_interval": 3600}
    entry.update(watch)
    raw = {"data_dir": str(data), "watch": [entry]}
    return configmod.parse(raw, path=data / "bench.yaml", environ={}).watch[0]


# ---------------------------------------------------------------------------
# 1. latency


def latency(base: Path, mode: str, count: int) -> list[float]:
    drop = base / f"drop-{mode}"
    drop.mkdir()
    store = SQLiteStore(base / f"latency-{mode}.db", synchronous="normal")
    watcher = Watcher(watch_config(drop, base, mode=mode), store)
    watcher.start()
    deadline = time.monotonic() + 30
    while watcher.status().get("health") != "ok":
        if time.monotonic() > deadline:
            raise SystemExit(f"{mode} watcher did not start: {watcher.status()}")
        time.sleep(0.05)
    last_write: dict[str, float] = {}
    body = {"owner": "jdoe", "target": {"project": "Bench", "dataset": "latency"}}
    for i in range(count):
        folder = drop / f"acq-{i:04d}"
        folder.mkdir()
        for n in range(2):
            (folder / f"img_{n}.tif").write_bytes(os.urandom(4096))
        manifest = dict(body, files=[{"path": f"img_{n}.tif", "size": 4096} for n in range(2)])
        (folder / "watchfolder.json").write_text(json.dumps(manifest))
        last_write[str(folder)] = time.time()
        time.sleep(0.03)  # an instrument's pace: acquisitions arrive one after another
    deadline = time.monotonic() + 60
    while store.counts()["queued"] < count:
        if time.monotonic() > deadline:
            raise SystemExit(f"{mode}: only {store.counts()['queued']} of {count} jobs after 60 s")
        time.sleep(0.1)
    watcher.stop()
    jobs, _ = store.list_jobs(limit=count + 10)
    store.close()
    return [job.created_at - last_write[job.spec.root] - QUIET for job in jobs]


# ---------------------------------------------------------------------------
# 2./3. the big tree, measured in a child process so its peak RSS is its own


def build_tree(root: Path, files: int, folders: int) -> None:
    """``owners`` folders of ``datasets`` folders of files (100 × 100 × 10 by default)."""
    owners = max(1, int(round(folders ** 0.5)))
    while folders % owners:
        owners -= 1
    per_owner = folders // owners
    per_folder = files // folders
    payload = b"x" * 16
    for o in range(owners):
        for d in range(per_owner):
            folder = root / f"user{o:03d}" / f"dataset {d:04d}"
            folder.mkdir(parents=True)
            for f in range(per_folder):
                with open(folder / f"img_{f:02d}.tif", "wb") as fh:
                    fh.write(payload)


def child_tree(args: argparse.Namespace) -> None:
    """Watch the tree in polling mode: cold scan, enqueue, warm rescan, restart, idle CPU, RSS."""
    base = Path(args.base)
    out: dict[str, float] = {}
    cfg = watch_config(base / "tree", base, mode="polling", detection="layout", layout="{owner}/{dataset}/",
                       target={"project": "Bench"})
    samples = []
    for attempt in range(3):  # median of 3 start-ups, each on a fresh store: every acquisition new
        store = SQLiteStore(base / f"tree-{attempt}.db", synchronous="normal")
        watcher = Watcher(cfg, store)
        start = time.time()
        t = time.perf_counter()
        watcher.loop(now=start)  # startup: full scan, every acquisition new (and not quiet yet)
        samples.append(time.perf_counter() - t)
        if attempt < 2:
            store.close()
    out["cold_scan"] = statistics.median(samples)
    t = time.perf_counter()
    while watcher.detector.pending:  # all quiet: each one checked and queued, a batch per step
        watcher.loop(now=start + QUIET)
    out["enqueue_all"] = time.perf_counter() - t
    out["acquisitions"] = queued = store.counts()["queued"]
    samples = []
    for _ in range(3):
        t = time.perf_counter()
        watcher._rescan(time.time())
        samples.append(time.perf_counter() - t)
    out["warm_rescan"] = statistics.median(samples)
    # A restarted watcher: full scan, then each acquisition's key is found in the store (median of 3).
    samples = []
    for _ in range(3):
        restarted = Watcher(cfg, store)
        start = time.time()
        t = time.perf_counter()
        restarted.loop(now=start)
        samples.append(time.perf_counter() - t)
    out["restart_scan"] = statistics.median(samples)
    t = time.perf_counter()
    while restarted.detector.pending:
        restarted.loop(now=start + QUIET)
    out["restart_settle"] = time.perf_counter() - t
    out["restart_pending"] = len(restarted.detector.pending)
    out["restart_new_jobs"] = store.counts()["queued"] - queued
    # Idle polling: the runner thread, nothing changing, 1 s interval.
    restarted.start()
    time.sleep(2.0)  # let the first ticks after start pass
    cpu0, wall0 = time.process_time(), time.monotonic()
    polls0 = restarted.counters["polls"]
    time.sleep(args.idle_seconds)
    out["idle_cpu"] = (time.process_time() - cpu0) / (time.monotonic() - wall0)
    out["idle_polls"] = restarted.counters["polls"] - polls0
    restarted.stop()
    t = time.perf_counter()
    for _ in range(3):
        restarted.scanner.poll(time.time(), since=None)
    out["poll_tick"] = (time.perf_counter() - t) / 3
    out["indexed_folders"] = len(restarted.scanner.dirs)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    store.close()
    print(json.dumps(out))


def child_watchdog(args: argparse.Namespace) -> None:
    """watchdog's DirectorySnapshot of the tree (what PollingObserver does every interval)."""
    from watchdog.utils.dirsnapshot import DirectorySnapshot

    t = time.perf_counter()
    DirectorySnapshot(str(Path(args.base) / "tree"), recursive=True)
    seconds = time.perf_counter() - t
    print(json.dumps({"snapshot": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run_child(kind: str, args: argparse.Namespace, base: Path) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--base", str(base), "--folders", str(args.folders),
           "--idle-seconds", str(args.idle_seconds)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{kind} child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_find(root: Path) -> float:
    samples = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run(["find", str(root), "-printf", "%s %T@ %p\n"], stdout=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def verdict(ok: bool) -> str:
    return "meets target" if ok else "MISSES target"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--folders", type=int, default=10_000)
    parser.add_argument("--acquisitions", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=15.0)
    parser.add_argument("--child")
    parser.add_argument("--base")
    args, _unknown = parser.parse_known_args()
    if args.child == "tree":
        child_tree(args)
        return 0
    if args.child == "watchdog":
        child_watchdog(args)
        return 0

    base = Path(tempfile.mkdtemp(prefix="bench-watch-", dir=os.environ.get("WATCHFOLDER_BENCH_DIR")))
    try:
        print(f"quiet period {QUIET:g} s, poll interval {POLL:g} s, {args.acquisitions} acquisitions")
        for mode in ("events", "polling"):
            values = latency(base, mode, args.acquisitions)
            p50, p99 = percentile(values, 50), percentile(values, 99)
            target = 0.25 if mode == "events" else POLL + 0.25
            print(f"latency {mode:8s} p50 {p50 * 1000:7.1f} ms  p99 {p99 * 1000:7.1f} ms  "
                  f"max {max(values) * 1000:7.1f} ms  (target p99 <= {target * 1000:.0f} ms: {verdict(p99 <= target)})")

        t = time.perf_counter()
        build_tree(base / "tree", args.files, args.folders)
        print(f"\ntree: {args.files} files in {args.folders} folders built in {time.perf_counter() - t:.1f} s")
        subprocess.run(["find", str(base / "tree"), "-printf", "%s %T@ %p\n"], stdout=subprocess.DEVNULL, check=True)
        find_s = time_find(base / "tree")
        tree = run_child("tree", args, base)
        find_after = time_find(base / "tree")
        find_s = min(find_s, find_after)
        wd = run_child("watchdog", args, base)
        print(f"find -printf '%s %T@ %p'       {find_s:6.3f} s   (baseline, median of 3, best of before/after)")
        for key, label in (("warm_rescan", "periodic full rescan"), ("cold_scan", "startup scan (all new)"),
                           ("restart_scan", "startup scan after restart")):
            ratio = tree[key] / find_s
            print(f"{label:30s} {tree[key]:6.3f} s   {ratio:4.2f}x find  (target <= 2x: {verdict(ratio <= 2)})")
        print(f"watchdog DirectorySnapshot     {wd['snapshot']:6.3f} s   {wd['snapshot'] / find_s:4.2f}x find, "
              f"RSS {wd['peak_rss_mb']:.0f} MB (for scale)")
        print(f"first enqueue of {int(tree['acquisitions'])} jobs      {tree['enqueue_all']:6.2f} s")
        print(f"restart: settle {int(tree['acquisitions'])} known      {tree['restart_settle']:6.2f} s, "
              f"new jobs {int(tree['restart_new_jobs'])} (must be 0), still pending {int(tree['restart_pending'])}")
        print(f"polling tick ({int(tree['indexed_folders'])} folders)    {tree['poll_tick'] * 1000:6.1f} ms")
        print(f"idle polling CPU at {POLL:g} s interval: {tree['idle_cpu'] * 100:5.2f}% of one core over "
              f"{args.idle_seconds:g} s ({int(tree['idle_polls'])} ticks)  (target <= 5%: {verdict(tree['idle_cpu'] <= 0.05)})")
        print(f"peak RSS of the watching process: {tree['peak_rss_mb']:.0f} MB  "
              f"(target <= 200 MB: {verdict(tree['peak_rss_mb'] <= 200)})")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
