#!/usr/bin/env python3
"""A client of the previous import service's API (`POST /ome/import`), unchanged.

It shows what existing portal code sends: a JSON array of imports, each with the
owner's OMERO session key as its credential (no bearer token), and reads the
plain-text log at the returned statusUri. Standard library only:

    python3 seed_client.py http://127.0.0.1:8470 SESSION_KEY /data/drop/jdoe/slide3 --dataset-id 51
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("url")
    parser.add_argument("session_key")
    parser.add_argument("path", help="file: URI or absolute path, as the server sees it")
    parser.add_argument("--email", default="jdoe@example.org")
    parser.add_argument("--omero-host", default="localhost")
    parser.add_argument("--omero-port", type=int, default=4064)
    parser.add_argument("--dataset-id", type=int)
    args = parser.parse_args(argv)
    item = {
        "experimenterEmail": args.email,
        "targetUri": args.path,
        "omeroHost": args.omero_host,
        "omeroPort": args.omero_port,
        "sessionKey": args.session_key,
        "textAnnotations": [["example.org/portal", "submitted by seed_client.py"]],
    }
    if args.dataset_id:
        item["datasetId"] = args.dataset_id
    request = urllib.request.Request(args.url.rstrip("/") + "/ome/import", data=json.dumps([item]).encode(),
                                     method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as err:
        print(f"refused ({err.code}): {err.read().decode()}", file=sys.stderr)
        return 1
    for entry in answer:
        print(f"{entry['targetUri']} -> {entry['statusUri']}")
        with urllib.request.urlopen(args.url.rstrip("/") + entry["statusUri"], timeout=30) as response:
            print(response.read().decode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
