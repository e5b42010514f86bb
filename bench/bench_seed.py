"""Seed import latency: POST /ome/import with its OMERO session check vs the same request without it.

    .venv/bin/python bench/bench_seed.py [--requests 200] [--clients 4] [--old 8]

Starts the server double (tests/omero/double/server.py) with the omero-py
interpreter (.venv-omero/bin/python or $WATCHFOLDER_OMERO_PYTHON) and two
watchfolder HTTP servers in this process, on the same store and config:

- checked: the real check, the omero importer's long-lived session child
  (watchfolder/importers/omero_sessions.py) joining each key in the double;
- unchecked (the baseline): the same route with a checker that answers at
  once, so the difference is the session check alone.

Each request queues one job for a one-file folder. Rounds interleave the
sides, one request each, so load from elsewhere falls on both alike; it
prints p50/p99 of each in milliseconds and the ratios:

- first check: the very first request, which starts the child (once per process);
- new key: every request a session key not seen before (the cache cannot help);
- same key: one key repeated (answered from the cache of accepted keys);
- new key, ``--clients`` at once: as many client threads each sending new keys;
- per-key child (the previous design, for comparison): ``child.py --session-info``
  started for each key, ``--old`` times;
- health while OMERO hangs: ``GET /api/v1/health`` on a third server whose OMERO
  is a port that accepts and never answers, idle and then while ``--flood``
  client threads post new keys to ``/ome/import`` without pause (issue 10, D:
  it took 29 s before the checks were bounded); with the counts of answers,
  checks run at once (at most ``server.seed_session_checks``) and refusals.

Target: new-key p99 well under a second (the issue: 0.7 s idle, 3-5 s under
load with a child per key). Nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from watchfolder import config as configmod  # noqa: E402
from watchfolder.importers import create_importer  # noqa: E402
from watchfolder.store import SQLiteStore  # noqa: E402
from watchfolder.web.app import create_app  # noqa: E402
from watchfolder.web.server import Server  # noqa: E402

DOUBLE = REPO / "tests" / "omero" / "double" / "server.py"
CHILD = REPO / "watchfolder" / "omero_child" / "child.py"
JDOE = {"user": "jdoe", "email": "jdoe@example.org", "group": "lab"}


def omero_python() -> str | None:
    for python in filter(None, [os.environ.get("WATCHFOLDER_OMERO_PYTHON"), str(REPO / ".venv-omero/bin/python")]):
        if os.path.exists(python) and subprocess.run([python, "-c", "import omero"], capture_output=True).returncode == 0:
            return python
    return None


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def row(label: str, values: list[float], base: list[float] | None = None) -> str:
    ms = [v * 1000 for v in values]
    text = f"{label:<34} p50 {pct(ms, 50):8.1f} ms   p99 {pct(ms, 99):8.1f} ms   (n={len(ms)})"
    if base:
        text += f"   ratio p50 {pct(values, 50) / pct(base, 50):6.1f}x, p99 {pct(values, 99) / pct(base, 99):6.1f}x"
    return text


class Poster:
    """One keep-alive connection posting seed requests."""

    def __init__(self, url: str, body: dict) -> None:
        host, port = url.split("//", 1)[1].rstrip("/").rsplit(":", 1)
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.body = body

    def post(self, key: str) -> float:
        data = json.dumps([dict(self.body, sessionKey=key)]).encode()
        start = time.perf_counter()
        self.conn.request("POST", "/ome/import", data, {"Content-Type": "application/json"})
        answer = self.conn.getresponse()
        text = answer.read()
        elapsed = time.perf_counter() - start
        if answer.status != 200:
            raise SystemExit(f"bench_seed: POST /ome/import answered {answer.status}: {text[:300]!r}")
        return elapsed


def hanging_omero(config, store, body: dict, args) -> dict:
    """GET /api/v1/health idle and while clients post to /ome/import of an OMERO that never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(512)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    port = listener.getsockname()[1]
    omero = dataclasses.replace(config.importer.omero, port=port)
    config = dataclasses.replace(config, importer=dataclasses.replace(config.importer, omero=omero))
    importer = create_importer(config)
    app = create_app(config, store, importer)
    server = Server(config, app)
    server.start()
    host, http_port = server.url.split("//", 1)[1].rsplit(":", 1)
    stop = threading.Event()
    answers: dict[int, int] = {}
    lock = threading.Lock()

    def health(n: int) -> list[float]:
        conn = http.client.HTTPConnection(host, int(http_port), timeout=120)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            conn.request("GET", "/api/v1/health")
            conn.getresponse().read()
            times.append(time.perf_counter() - start)
        conn.close()
        return times

    def flood() -> None:
        conn = http.client.HTTPConnection(host, int(http_port), timeout=120)
        item = dict(body, omeroPort=port)
        while not stop.is_set():
            data = json.dumps([dict(item, sessionKey=str(uuid.uuid4()))]).encode()
            conn.request("POST", "/ome/import", data, {"Content-Type": "application/json"})
            answer = conn.getresponse()
            answer.read()
            with lock:
                answers[answer.status] = answers.get(answer.status, 0) + 1
        conn.close()

    try:
        idle = health(args.requests)
        threads = [threading.Thread(target=flood, daemon=True) for _ in range(args.flood)]
        for t in threads:
            t.start()
        flooded = health(args.requests)
        stop.set()
        for t in threads:
            t.join(120)
        gate = dict(app.config["watchfolder.api"].session_gate.stats)
    finally:
        server.stop()
        importer.close()
        listener.close()
        for conn in held:
            conn.close()
    return {"idle": idle, "flooded": flooded, "answers": dict(sorted(answers.items())), "gate": gate}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200, help="requests per side and case (default 200)")
    parser.add_argument("--clients", type=int, default=4, help="client threads of the concurrent case (default 4)")
    parser.add_argument("--old", type=int, default=8, help="checks with a child per key (default 8)")
    parser.add_argument("--flood", type=int, default=16, help="client threads posting to a hanging OMERO (default 16)")
    args = parser.parse_args()
    python = omero_python()
    if python is None:
        print("bench_seed: skipped: no Python with omero-py (run scripts/omero-env)")
        return 0
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)  # "Task queue depth" lines under load
    work = Path(tempfile.mkdtemp(prefix="bench-seed-", dir=os.environ.get("WATCHFOLDER_BENCH_DIR")))
    double = subprocess.Popen([python, str(DOUBLE), str(work)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=open(work / "double.log", "wb"), text=True, start_new_session=True)
    servers: list[Server] = []
    importer = store = None
    try:
        ports = json.loads(double.stdout.readline())

        def control(path, body):
            req = urllib.request.Request(f"http://127.0.0.1:{ports['control']}{path}", json.dumps(body).encode())
            return json.loads(urllib.request.urlopen(req, timeout=30).read())

        control("/seed", {"groups": [{"name": "lab"}], "users": [
            {"name": "admin", "password": "pw", "groups": ["system"], "admin": True},
            {"name": "jdoe", "password": "jdoe-pw", "email": "jdoe@example.org", "groups": ["lab"]}]})

        def new_keys(n: int) -> list[str]:
            return [control("/session", {"user": "jdoe", "group": "lab"})["uuid"] for _ in range(n)]

        drop = work / "drop"
        folder = drop / "run"
        folder.mkdir(parents=True)
        (folder / "a.ome.tiff").write_bytes(b"pixels")
        config = configmod.parse({
            "data_dir": str(work / "data"),
            "importer": {"kind": "omero", "omero": {"host": "127.0.0.1", "port": ports["port"], "admin_user": "admin",
                                                    "admin_password": "pw", "python": python}},
            "notify": {"transport": "none"},
            "server": {"listen": "127.0.0.1:0", "allowed_roots": [str(drop)], "seed_rate_per_minute": 10_000_000,
                       "seed_max_items": 10},
        }, path=work / "w.yaml", environ={})
        store = SQLiteStore.from_config(config)
        importer = create_importer(config)
        for app in (create_app(config, store, importer), create_app(config, store, session_checker=lambda key: JDOE)):
            server = Server(config, app)
            server.start()
            servers.append(server)
        body = {"experimenterEmail": "x@example.org", "targetUri": folder.as_uri(), "omeroHost": "127.0.0.1",
                "omeroPort": ports["port"]}
        checked, unchecked = Poster(servers[0].url, body), Poster(servers[1].url, body)

        first = [checked.post(new_keys(1)[0])]
        unchecked.post("warm-up")
        keys = new_keys(args.requests)
        fresh, same, base = [], [], []
        repeated = keys[0]
        for n, key in enumerate(keys):
            # Alternate who goes first, so neither side always follows the other.
            pair = [lambda key=key: fresh.append(checked.post(key)), lambda: base.append(unchecked.post("any")),
                    lambda: same.append(checked.post(repeated))]
            for call in (pair if n % 2 else pair[::-1]):
                call()

        def concurrent(poster_url: str, per_client: list[list[str]]) -> list[float]:
            times: list[float] = []
            lock = threading.Lock()

            def client(keys_of_client: list[str]) -> None:
                poster = Poster(poster_url, body)
                for key in keys_of_client:
                    elapsed = poster.post(key)
                    with lock:
                        times.append(elapsed)

            threads = [threading.Thread(target=client, args=(k,)) for k in per_client]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return times

        per = max(1, args.requests // args.clients)
        loaded = concurrent(servers[0].url, [new_keys(per) for _ in range(args.clients)])
        loaded_base = concurrent(servers[1].url, [["any"] * per for _ in range(args.clients)])

        old = []
        for key in new_keys(args.old):
            request = json.dumps({"host": "127.0.0.1", "port": ports["port"], "session_key": key,
                                  "connect_timeout": 30})
            start = time.perf_counter()
            out = subprocess.run([python, str(CHILD), "--session-info"], input=request, capture_output=True,
                                 text=True, timeout=120)
            old.append(time.perf_counter() - start)
            if '"user"' not in out.stdout:
                raise SystemExit(f"bench_seed: the per-key child failed: {out.stdout[-300:]} {out.stderr[-300:]}")

        hang = hanging_omero(config, store, body, args)
        sessions = importer._sessions
        print(f"POST /ome/import, one item, keep-alive, {args.requests} interleaved rounds; server double over "
              f"loopback; children started {sessions.stats['started']}, checks asked {sessions.stats['asked']}, "
              f"answered from the cache {sessions.stats['cached']}")
        print(row("unchecked (baseline)", base))
        print(row("first check (starts the child)", first, base))
        print(row("checked, new key", fresh, base))
        print(row("checked, same key (cached)", same, base))
        print(row(f"unchecked, {args.clients} clients", loaded_base))
        print(row(f"checked, new keys, {args.clients} clients", loaded, loaded_base))
        print(row("per-key child (previous design)", old, base))
        print(f"target: checked new-key p99 well under 1000 ms; now {pct(fresh, 99) * 1000:.0f} ms "
              f"({args.clients} clients: {pct(loaded, 99) * 1000:.0f} ms)")
        print(row("health, OMERO hanging, idle", hang["idle"]))
        print(row(f"health, {args.flood} clients posting", hang["flooded"], hang["idle"]))
        print(f"  while flooded: /ome/import answers {hang['answers']}; checks run {hang['gate']['run']} "
              f"(at most {hang['gate']['peak']} at once), refused as busy {hang['gate']['busy']}, by the "
              f"breaker {hang['gate']['open']}")
        return 0
    finally:
        for server in servers:
            server.stop()
        if importer is not None:
            importer.close()
        if store is not None:
            store.close()
        double.stdin.close()
        try:
            double.wait(timeout=30)
        except subprocess.TimeoutExpired:
            double.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
