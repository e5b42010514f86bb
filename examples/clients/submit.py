#!/usr/bin/env python3
"""Submit an acquisition to watchfolder's REST API and wait for the outcome.

Standard library only, so it runs on any acquisition PC or portal server:

    WATCHFOLDER_URL=https://watchfolder.example.org WATCHFOLDER_TOKEN=... \\
        python3 submit.py /data/drop/jdoe/slide3 --owner jdoe --project "Brain atlas" --dataset "slide 3"

The path is as the *server* sees it (under its server.allowed_roots). Exit
status: 0 succeeded, 1 failed or cancelled, 2 usage or HTTP error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request


def call(base: str, token: str, method: str, path: str, body: dict | None = None) -> tuple[int, dict | str, dict]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base.rstrip("/") + path, data=data, method=method)
    request.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            raw = response.read().decode()
            kind = response.headers.get("Content-Type", "")
            return response.status, (json.loads(raw) if "json" in kind else raw), dict(response.headers)
    except urllib.error.HTTPError as err:
        raw = err.read().decode()
        try:
            payload = json.loads(raw)
        except ValueError:
            payload = {"error": raw}
        return err.code, payload, dict(err.headers)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="acquisition folder or file, as the server sees it")
    parser.add_argument("--owner")
    parser.add_argument("--email")
    parser.add_argument("--project")
    parser.add_argument("--dataset")
    parser.add_argument("--key", help="your own idempotency key: resubmitting with it never makes a second job")
    parser.add_argument("--url", default=os.environ.get("WATCHFOLDER_URL", "http://127.0.0.1:8470"))
    parser.add_argument("--poll", type=float, default=5.0, help="seconds between status checks")
    args = parser.parse_args(argv)
    token = os.environ.get("WATCHFOLDER_TOKEN")
    if not token:
        print("set WATCHFOLDER_TOKEN (create one with `watchfolder token new --role submit`)", file=sys.stderr)
        return 2

    body: dict = {"path": args.path}
    for field in ("owner", "email"):
        if getattr(args, field):
            body[field] = getattr(args, field)
    if args.dataset:
        body["target"] = {"dataset": args.dataset, **({"project": args.project} if args.project else {})}
    if args.key:
        body["idempotency_key"] = args.key

    status, job, headers = call(args.url, token, "POST", "/api/v1/jobs", body)
    if status not in (200, 202):
        print(f"refused ({status}): {job.get('error')}", file=sys.stderr)
        for item in job.get("detail") or []:
            print(f"  {item}", file=sys.stderr)
        return 2
    location = headers.get("Location", f"/api/v1/jobs/{job['id']}")
    print(f"job {job['id']} {'queued' if status == 202 else 'already known'}: {location}")

    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(args.poll)
        status, job, _ = call(args.url, token, "GET", f"/api/v1/jobs/{job['id']}")
        if status != 200:
            print(f"cannot read the job ({status}): {job}", file=sys.stderr)
            return 2
        progress = job.get("progress") or {}
        print(f"  {job['state']:<10} {progress.get('phase', '')} "
              f"{progress.get('bytes_done', 0)}/{progress.get('bytes_total', 0)} bytes")

    if job["state"] == "succeeded":
        print(f"succeeded: {json.dumps(job['result'])}")
        return 0
    print(f"{job['state']}: {(job.get('error') or {}).get('message', '')}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
