"""Real peers for the events tests: a webhook receiver that verifies Standard Webhooks signatures,
and a Mosquitto broker on an ephemeral port."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from standardwebhooks import Webhook, WebhookVerificationError

SECRET = "whsec_" + base64.b64encode(b"watchfolder-test-webhook-secret!").decode()


class Receiver:
    """An HTTP endpoint on 127.0.0.1 that verifies each POST's signature and records the CloudEvent.

    ``fail_with`` makes it answer that status instead (and record nothing);
    ``redirect_to`` answers 302 to that URL; ``hold`` (an Event) keeps each request waiting
    until it is set; ``stop()`` / ``start()`` take it off the network and back on the same port.
    """

    def __init__(self, secret: str = SECRET):
        self.verifier = Webhook(secret)
        self.received: list[dict[str, Any]] = []
        self.bodies: dict[str, bytes] = {}
        self.rejected: list[str] = []
        self.fail_with: int | None = None
        self.redirect_to: str | None = None
        self.hold: threading.Event | None = None
        self.lock = threading.Lock()
        self.port = 0
        self.server: ThreadingHTTPServer | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/watchfolder"

    def start(self) -> None:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if receiver.hold is not None:
                    receiver.hold.wait(30)  # a hanging endpoint
                if receiver.redirect_to:
                    self.send_response(302)
                    self.send_header("Location", receiver.redirect_to)
                    self.end_headers()
                    return
                if receiver.fail_with:
                    self.send_response(receiver.fail_with)
                    self.end_headers()
                    return
                try:
                    event = receiver.verifier.verify(body, dict(self.headers.items()))
                except WebhookVerificationError as exc:
                    with receiver.lock:
                        receiver.rejected.append(str(exc))
                    self.send_response(401)
                    self.end_headers()
                    return
                with receiver.lock:
                    previous = receiver.bodies.get(event["id"])
                    # A redelivery carries the same id and the same event.
                    assert previous is None or json.loads(previous) == event
                    receiver.bodies[event["id"]] = body
                    receiver.received.append({**event, "_headers": {k.lower(): v for k, v in self.headers.items()}})
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server(("127.0.0.1", self.port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def events(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)

    def by_job(self) -> dict[int, list[str]]:
        """Each job's event types in arrival order, duplicates dropped (by event id)."""
        seen: set[str] = set()
        out: dict[int, list[str]] = {}
        for e in self.events():
            if e["id"] in seen or not e["subject"].startswith("job/"):
                continue
            seen.add(e["id"])
            out.setdefault(int(e["subject"][4:]), []).append(e["type"].rsplit(".", 1)[1])
        return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_binary() -> str | None:
    for candidate in (shutil.which("mosquitto"), "/usr/sbin/mosquitto"):
        if candidate and os.path.exists(candidate):
            return candidate
    return None


class Broker:
    """Debian's Mosquitto on 127.0.0.1 and an ephemeral port, with no persistence."""

    def __init__(self, workdir: Path, port: int | None = None):
        binary = mosquitto_binary()
        assert binary, "mosquitto is not installed"
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.log = workdir / "mosquitto.log"
        self.proc = subprocess.Popen([binary, "-c", str(conf)], stdout=open(self.log, "ab"),
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not start; see {self.log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
