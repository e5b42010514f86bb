"""REST API benchmark: POST /api/v1/jobs beside a trivial route on the same server, same run.

The server (waitress + the real app + a real SQLite store) runs in a child
process; this process drives it with 32 keep-alive connections on loopback.
Each phase is bounded by a request count and a time limit. Prints throughput,
p50/p99 latency, the ratio to the trivial route, and the targets
(>= 1000 accepted jobs/s, p99 <= 50 ms, ratio >= 0.3).

Run: ``.venv/bin/python bench/bench_api.py`` (part of ``make bench``).
Options: --requests N (per phase, default 6000), --seconds S (per phase, default 20),
--connections N (default 32), --synchronous full|normal (default: the config default, full).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRIVIAL = "/bench/trivial"


# -- the server side (child process) ------------------------------------------------


def serve(workdir: Path, synchronous: str) -> None:
    """Start the API with a trivial route added, print the port, serve until stdin closes."""
    import bottle
    import yaml

    from watchfolder import config as wconfig
    from watchfolder.api import create_app
    from watchfolder.auth import new_token
    from watchfolder.server import Server
    from watchfolder.store import JobStore

    import logging

    # waitress warns whenever more connections wait than it has threads: expected at 32 connections.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    token, snippet = new_token("bench", "submit")
    raw = {
        "data_dir": str(workdir / "data"),
        "store": {"synchronous": synchronous},
        "server": {"listen": "127.0.0.1:0", "allowed_roots": [str(workdir / "drop")],
                   "tokens": yaml.safe_load(snippet)},
    }
    config = wconfig.parse(raw, path=workdir / "watchfolder.yaml", environ={})
    store = JobStore.from_config(config)
    app = create_app(config, store)

    @app.post(TRIVIAL)
    def trivial():
        bottle.request.environ["wsgi.input"].read()
        response = bottle.HTTPResponse('{"ok":true}', status=200)
        response.content_type = "application/json"
        return response

    server = Server(config, app)
    server.start()
    print(json.dumps({"port": server.port, "token": token}), flush=True)
    sys.stdin.read()  # the parent closes stdin to stop us
    server.stop()
    print(json.dumps({"jobs": store.counts()["queued"]}), flush=True)
    store.close()


# -- the client side ----------------------------------------------------------------------


async def _connection(port, make_request, deadline, budget, latencies, statuses):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline and budget[0] > 0:
            budget[0] -= 1
            request = make_request()
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            if length:
                await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            status = int(head[9:12])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()


async def _phase(port, make_request, connections, requests, seconds):
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    budget = [requests]
    start = time.perf_counter()
    deadline = start + seconds
    await asyncio.gather(*(
        _connection(port, make_request, deadline, budget, latencies, statuses) for _ in range(connections)
    ))
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies),
        "rate": len(latencies) / elapsed,
        "p50_ms": 1000 * latencies[len(latencies) // 2],
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": statuses,
    }


def http_post(path: str, body: bytes, token: str | None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def make_acquisition(drop: Path) -> Path:
    folder = drop / "jdoe" / "slide3"
    folder.mkdir(parents=True)
    (folder / "tile_001.ome.tiff").write_bytes(b"pixels" * 1000)
    manifest = {"owner": "jdoe", "target": {"project": "Bench", "dataset": "d"},
                "files": [{"path": "tile_001.ome.tiff", "size": 6000}]}
    (folder / "watchfolder.json").write_text(json.dumps(manifest))
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6000)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--synchronous", choices=("full", "normal"), default="full")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.synchronous)
        return 0

    with tempfile.TemporaryDirectory(prefix="bench-api-") as tmp:
        workdir = Path(tmp)
        folder = make_acquisition(workdir / "drop")
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(workdir), "--synchronous", args.synchronous],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
        )
        try:
            hello = json.loads(child.stdout.readline())
            port, token = hello["port"], hello["token"]
            counter = iter(range(10**9))
            body = lambda: json.dumps({"path": str(folder), "idempotency_key": f"k{next(counter)}"}).encode()  # noqa: E731
            submit = lambda: http_post("/api/v1/jobs", body(), token)  # noqa: E731
            trivial = lambda: http_post(TRIVIAL, body(), token)  # noqa: E731

            asyncio.run(_phase(port, trivial, args.connections, 300, 10))  # warm up both paths
            asyncio.run(_phase(port, submit, args.connections, 300, 10))
            base = asyncio.run(_phase(port, trivial, args.connections, args.requests, args.seconds))
            jobs = asyncio.run(_phase(port, submit, args.connections, args.requests, args.seconds))
        finally:
            child.stdin.close()
            tail = child.stdout.read()
            child.wait(timeout=60)
        queued = json.loads(tail.strip().splitlines()[-1])["jobs"] if tail.strip() else None

    accepted = jobs["statuses"].get(202, 0)
    ratio = jobs["rate"] / base["rate"] if base["rate"] else float("nan")
    print(f"API benchmark: {args.connections} connections, loopback, SQLite synchronous={args.synchronous}")
    for name, r in (("trivial route (same server)", base), ("POST /api/v1/jobs", jobs)):
        print(f"  {name:<30} {r['rate']:8.0f} req/s  p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  "
              f"({r['requests']} requests, statuses {r['statuses']})")
    print(f"  accepted jobs/s {jobs['rate'] * accepted / max(1, jobs['requests']):.0f} (target >= 1000); "
          f"p99 {jobs['p99_ms']:.1f} ms (target <= 50); ratio to trivial {ratio:.2f} (target >= 0.3); "
          f"jobs in the store after the run: {queued}")
    ok = accepted == jobs["requests"]
    if not ok:
        print("  FAILED: some submissions were not accepted with 202")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
