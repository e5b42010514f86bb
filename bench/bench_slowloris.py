"""Slow clients (slowloris) against the API: does /health keep answering within 1 s?

The server (waitress + the real app + a real SQLite store, default server settings:
connection_limit 1000, connections_per_client 100, header_timeout 15 s) runs in a
child process. This process opens ``--connections`` connections (default 1,100, as
the finding of issue 10) from loopback, each sending a request line and part of its
headers, then one more header line every ``--interval`` seconds (default 8: waitress's
idle timeout restarts on every byte), and meanwhile asks ``GET /api/v1/health`` on a
fresh connection every 0.5 s for ``--seconds`` (default 50).

Prints /health latency without the load (baseline, same run) and under it (p50, max,
answers slower than 1 s or missing), and how many slow connections the server still
holds at the end. Target: every /health under load answers within 1 s.

``--kind body`` sends complete headers and then one body byte per interval (outside
test a10 F1); ``--kind idle`` sends nothing. ``--addresses N`` spreads the connections
over N loopback source addresses (127.0.1.1 ...), each below
``connections_per_client`` (a10 F1: 11 addresses x 95 = 1,045); /health then comes
from 127.0.2.200.

Run: ``.venv/bin/python bench/bench_slowloris.py`` (part of ``make bench``).
"""

from __future__ import annotations

import argparse
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HEALTH = b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
FIRST = {"headers": b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n",
         "body": b"POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000000\r\n\r\n{",
         "idle": b""}
NEXT = {"headers": b"X-Slow: 1\r\n", "body": b" ", "idle": b""}

SERVE = """
import sys, time
from pathlib import Path
from watchfolder import config as wconfig
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.server import Server
work = Path(sys.argv[1])
config = wconfig.parse({"data_dir": str(work / "data"), "importer": {"kind": "noop"},
                        "server": {"listen": "127.0.0.1:0", "allowed_roots": [str(work)]}},
                       path=work / "watchfolder.yaml", environ={})
store = SQLiteStore.from_config(config)
server = Server(config, create_app(config, store))
server.start()
print(server.port, flush=True)
sys.stdin.read()
server.stop()
"""


def health(port: int, timeout: float = 5.0, source: str | None = None) -> float | None:
    """Seconds /health took, or None when it did not answer 200 within ``timeout``."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout,
                                      source_address=(source, 0) if source else None) as s:
            s.sendall(HEALTH)
            ok = s.recv(64).startswith(b"HTTP/1.1 200 ")
    except OSError:
        return None
    return time.monotonic() - started if ok else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=1100)
    parser.add_argument("--interval", type=float, default=8.0)
    parser.add_argument("--seconds", type=float, default=50.0)
    parser.add_argument("--kind", choices=["headers", "body", "idle"], default="headers")
    parser.add_argument("--addresses", type=int, default=0, help="source addresses (0: 127.0.0.1 only)")
    args, _ = parser.parse_known_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = args.connections + 256
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    with tempfile.TemporaryDirectory() as work:
        child = subprocess.Popen([sys.executable, "-c", SERVE, work], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, text=True)
        try:
            port = int(child.stdout.readline())
            baseline = [t for t in (health(port) for _ in range(20)) if t is not None]
            stop = threading.Event()
            slow: list[socket.socket] = []

            def attack() -> None:
                for i in range(args.connections):
                    source = (f"127.0.1.{i % args.addresses + 1}", 0) if args.addresses else None
                    try:
                        s = socket.create_connection(("127.0.0.1", port), timeout=2, source_address=source)
                        s.sendall(FIRST[args.kind])
                        slow.append(s)
                    except OSError:
                        pass
                while not stop.wait(args.interval):
                    for s in slow:
                        try:
                            s.sendall(NEXT[args.kind])
                        except OSError:
                            pass

            attacker = threading.Thread(target=attack, daemon=True)
            attacker.start()
            under: list[float | None] = []
            tick = threading.Event()
            end = time.monotonic() + args.seconds
            while time.monotonic() < end:
                under.append(health(port, source="127.0.2.200" if args.addresses else None))
                tick.wait(0.5)
            stop.set()
            held = 0
            for s in slow:
                try:
                    s.setblocking(False)
                    held += s.recv(1) != b""
                except BlockingIOError:
                    held += 1
                except OSError:
                    pass
                s.close()
        finally:
            child.stdin.close()
            child.wait(10)
    answered = [t for t in under if t is not None]
    late = sum(1 for t in under if t is None or t > 1.0)
    print(f"/health without load: p50 {statistics.median(baseline) * 1000:.1f} ms (n={len(baseline)})")
    what = {"headers": "a header line", "body": "a body byte", "idle": "nothing"}[args.kind]
    spread = f" from {args.addresses} addresses" if args.addresses else ""
    print(f"/health under {args.connections} slow connections{spread} ({what} every {args.interval:g} s, "
          f"{args.seconds:g} s): p50 {statistics.median(answered) * 1000 if answered else float('nan'):.1f} ms, "
          f"max {max(answered) * 1000 if answered else float('nan'):.1f} ms, "
          f"{late} of {len(under)} slower than 1 s or missing")
    print(f"slow connections the server still held at the end: {held} of {len(slow)}")
    print(f"target: every /health within 1 s -> {'met' if late == 0 else 'NOT met'}")
    return 0 if late == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
