"""REST API benchmark: POST /api/v1/jobs beside GET /api/v1/health, driven by wrk, same server, same run.

The server (waitress + the real app + a real SQLite store, as configured by
default) runs in a child process; Debian's ``wrk`` (``scripts/bench-deps``
installs it) drives it with 2 threads x 32 keep-alive connections on loopback.
Routes, measured in interleaved rounds so that other load on the machine hits
them alike:

- ``POST /api/v1/jobs``: token, JSON, path checks, manifest read, durable
  enqueue; every request its own idempotency key, so each one queues a job;
- ``GET /api/v1/health``: the baseline (what a load balancer polls: the store
  answers, worker heartbeats read);
- for information: a bare Bottle route doing one SQLite insert, and a no-op
  route (the HTTP stack alone).

Prints throughput, p50/p99 latency as wrk measures them, server CPU per request,
and the targets: POST /jobs >= 0.5x health's rate with p99 <= 2x health's p99.

Run: ``.venv/bin/python bench/bench_api.py`` (part of ``make bench``).
Options: --seconds S (per route and round, default 5), --rounds N (default 3),
--connections N (default 32), --wrk-threads N (default 2), --threads N (server
threads; default: server.threads' default), --synchronous full|normal.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

HEALTH = "/api/v1/health"
NOOP = "/bench/noop"
INSERT = "/bench/insert"
JOBS = "/api/v1/jobs"


# -- the server side (child process) ------------------------------------------------


def serve(workdir: Path, synchronous: str | None, threads: int | None) -> None:
    """Start the API with the two reference routes added, print the port, serve until stdin closes."""
    import bottle
    import yaml

    from watchfolder import config as wconfig
    from watchfolder.store import SQLiteStore
    from watchfolder.web.app import create_app
    from watchfolder.web.auth import new_token
    from watchfolder.web.server import Server

    # waitress warns whenever more requests wait than it has threads: expected at 32 connections.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    token, snippet = new_token("bench", "submit")
    server_section = {"listen": "127.0.0.1:0", "allowed_roots": [str(workdir / "drop")],
                      "tokens": yaml.safe_load(snippet)}
    if threads:
        server_section["threads"] = threads
    raw = {"data_dir": str(workdir / "data"), "server": server_section}
    if synchronous:
        raw["store"] = {"synchronous": synchronous}
    config = wconfig.parse(raw, path=workdir / "watchfolder.yaml", environ={})
    synchronous = config.store.synchronous
    store = SQLiteStore.from_config(config)
    app = create_app(config, store)

    def ok() -> bottle.HTTPResponse:
        response = bottle.HTTPResponse('{"ok":true}', status=200)
        response.content_type = "application/json"
        return response

    @app.post(NOOP)
    def noop():
        bottle.request.environ["wsgi.input"].read()
        return ok()

    bare_db = workdir / "bare.db"
    with sqlite3.connect(bare_db) as setup:
        setup.execute("PRAGMA journal_mode = WAL")
        setup.execute("CREATE TABLE IF NOT EXISTS t (id INTEGER PRIMARY KEY, body BLOB)")
    local = threading.local()

    @app.post(INSERT)
    def insert():
        body = bottle.request.environ["wsgi.input"].read()
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = sqlite3.connect(bare_db, timeout=30, isolation_level=None)
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        conn.execute("INSERT INTO t (body) VALUES (?)", (body,))
        return ok()

    server = Server(config, app)
    server.start()
    print(json.dumps({"port": server.port, "token": token, "threads": config.server.threads,
                      "synchronous": synchronous}), flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    server.stop()
    print(json.dumps({"jobs": store.counts()["queued"]}), flush=True)
    store.close()


# -- the client side: wrk -----------------------------------------------------------------

# Each wrk thread numbers its requests; the run's number and the thread id make every
# idempotency key unique, so every POST queues a job (a repeat would be cheaper).
WRK_SCRIPT = r"""
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("tid", threads)
end
function init(args)
  method, path, body_path, token, run = args[1], args[2], args[3], args[4], args[5]
  prefix = string.format("%s-t%d", run, tid)
  counter = 0
  headers = {["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token}
end
function request()
  if method == "GET" then
    return wrk.format("GET", path, headers)
  end
  counter = counter + 1
  local body = string.format('{"path": "%s", "idempotency_key": "%s-%d"}', body_path, prefix, counter)
  return wrk.format("POST", path, headers, body)
end
function done(summary, latency, requests)
  io.write(string.format(
    '\nRESULT {"requests": %d, "seconds": %f, "p50_ms": %f, "p99_ms": %f, "errors": %d, "status_errors": %d}\n',
    summary.requests, summary.duration / 1e6, latency:percentile(50) / 1000, latency:percentile(99) / 1000,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status))
end
"""


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to tell CPU cost from waiting."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_acquisition(drop: Path) -> Path:
    """One small acquisition with a manifest; each request names it with its own idempotency key."""
    folder = drop / "jdoe" / "slide3"
    folder.mkdir(parents=True)
    (folder / "tile_001.ome.tiff").write_bytes(b"pixels" * 1000)
    manifest = {"owner": "jdoe", "target": {"project": "Bench", "dataset": "d"},
                "files": [{"path": "tile_001.ome.tiff", "size": 6000}]}
    (folder / "watchfolder.json").write_text(json.dumps(manifest))
    return folder


_runs = iter(range(1, 10**9))


def wrk(port: int, method: str, path: str, folder: Path, token: str, script: Path, args) -> dict:
    command = ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.seconds:g}s",
               "--timeout", "10s", "-s", str(script), f"http://127.0.0.1:{port}", "--",
               method, path, str(folder), token, f"r{next(_runs)}"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.seconds + 60)
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"wrk gave no result (exit {done.returncode}):\n{done.stdout}\n{done.stderr}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--wrk-threads", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--synchronous", choices=("full", "normal"), default=None)
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.synchronous, args.threads)
        return 0
    if shutil.which("wrk") is None:
        print("bench_api: wrk is missing; run scripts/bench-deps (Debian package wrk) — API rows not measured")
        return 1

    routes = {JOBS: ("POST", "POST /api/v1/jobs"), HEALTH: ("GET", "GET /api/v1/health (baseline)"),
              INSERT: ("POST", "bare route + 1 insert (info)"), NOOP: ("POST", "no-op route (info)")}
    warm_posts = [0]
    results = {path: {"requests": 0, "seconds": 0.0, "cpu": 0.0, "p50": [], "p99": [], "rates": [], "errors": 0}
               for path in routes}
    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        workdir = Path(tmp)
        folder = make_acquisition(workdir / "drop")
        script = workdir / "bench.lua"
        script.write_text(WRK_SCRIPT)
        command = [sys.executable, __file__, "--serve", str(workdir)]
        if args.synchronous:
            command += ["--synchronous", args.synchronous]
        if args.threads:
            command += ["--threads", str(args.threads)]
        child = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        try:
            hello = json.loads(child.stdout.readline())
            port, token = hello["port"], hello["token"]
            warm = argparse.Namespace(**{**vars(args), "seconds": 1.0})
            for path, (method, _) in routes.items():  # warm up every path
                out = wrk(port, method, path, folder, token, script, warm)
                if path == JOBS:
                    warm_posts[0] = out["requests"]
            for _ in range(args.rounds):
                for path, (method, _) in routes.items():
                    cpu = _cpu_seconds(child.pid)
                    out = wrk(port, method, path, folder, token, script, args)
                    r = results[path]
                    r["cpu"] += _cpu_seconds(child.pid) - cpu
                    r["requests"] += out["requests"]
                    r["seconds"] += out["seconds"]
                    r["rates"].append(out["requests"] / out["seconds"])
                    r["p50"].append(out["p50_ms"])
                    r["p99"].append(out["p99_ms"])
                    r["errors"] += out["errors"] + out["status_errors"]
        finally:
            child.stdin.close()
            tail = child.stdout.read()
            child.wait(timeout=60)
        stored = json.loads(tail.strip().splitlines()[-1])["jobs"] if tail.strip() else None

    print(f"API benchmark (wrk): {args.wrk_threads} threads x {args.connections} connections on loopback, "
          f"{hello['threads']} server threads, SQLite synchronous={hello['synchronous']}, "
          f"{args.rounds} interleaved rounds of {args.seconds:g} s")
    summary = {}
    for path, (_, name) in routes.items():
        r = results[path]
        n = r["requests"]
        summary[path] = {"rate": n / r["seconds"], "p50": statistics.median(r["p50"]),
                         "p99": statistics.median(r["p99"])}
        s = summary[path]
        print(f"  {name:<32} {s['rate']:7.0f} req/s  p50 {s['p50']:6.1f} ms  p99 {s['p99']:6.1f} ms (median of "
              f"rounds)  server CPU {1000 * r['cpu'] / max(1, n):.2f} ms/req  errors {r['errors']}")
    jobs, health = summary[JOBS], summary[HEALTH]
    ratio = jobs["rate"] / health["rate"]
    p99_ratio = jobs["p99"] / health["p99"]
    print(f"  POST /jobs / GET /health: rate {ratio:.2f}x (target >= 0.5: {'OK' if ratio >= 0.5 else 'MISSED'}); "
          f"p99 {p99_ratio:.2f}x (target <= 2: {'OK' if p99_ratio <= 2 else 'MISSED'}); "
          f"jobs stored {stored} of {results[JOBS]['requests'] + warm_posts[0]} POSTs (warm-up included)")
    per_round = sorted(j / h for j, h in zip(results[JOBS]["rates"], results[HEALTH]["rates"], strict=True))
    print(f"  rate ratio per round: min {per_round[0]:.2f}, median {statistics.median(per_round):.2f}, "
          f"max {per_round[-1]:.2f}")
    if results[JOBS]["errors"] or (stored is not None and stored < results[JOBS]["requests"] + warm_posts[0]):
        print("  FAILED: some submissions were not accepted")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
