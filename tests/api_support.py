"""Shared by the API tests: a real server on an ephemeral port, tokens, an HTTP client that
checks every response it receives against api/openapi.yaml."""

from __future__ import annotations

import http.client
import json
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from watchfolder import config as wconfig
from watchfolder.errors import PermanentImportError
from watchfolder.store import SQLiteStore
from watchfolder.web.app import create_app
from watchfolder.web.auth import new_token
from watchfolder.web.server import Server

REPO = Path(__file__).resolve().parent.parent
OPENAPI = REPO / "api" / "openapi.yaml"
DOC_URI = "urn:watchfolder:openapi"


def _pointer(*parts: str) -> str:
    return "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


class Contract:
    """Checks responses against the OpenAPI document: path, method, status, media type, body schema."""

    def __init__(self, path: Path = OPENAPI):
        self.doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        resource = Resource.from_contents(self.doc, default_specification=DRAFT202012)
        self.registry = Registry().with_resource(DOC_URI, resource)
        self.templates = []
        for template in self.doc["paths"]:
            regex = "^" + re.sub(r"\\{[^}]+\\}", "[^/]+", re.escape(template)) + "$"
            literal = len(re.sub(r"\{[^}]+\}", "", template))
            self.templates.append((literal, template, re.compile(regex)))
        # Literal paths win over templated ones (/ome/failed/import vs /ome/import/{id}).
        self.templates.sort(key=lambda t: -t[0])

    def _deref(self, node: dict) -> tuple[dict, list[str]]:
        """Follow a local $ref; returns the node and its JSON pointer parts."""
        ref = node["$ref"]
        assert ref.startswith("#/"), ref
        parts = ref[2:].split("/")
        target: Any = self.doc
        for p in parts:
            target = target[p.replace("~1", "/").replace("~0", "~")]
        return target, parts

    def check(self, method: str, url_path: str, status: int, content_type: str | None, body: bytes) -> None:
        path = urllib.parse.urlsplit(url_path).path
        template = next((t for _, t, rx in self.templates if rx.match(path)), None)
        assert template is not None, f"{path} is not in api/openapi.yaml"
        operation = self.doc["paths"][template].get(method.lower())
        assert operation is not None, f"{method} {template} is not in api/openapi.yaml"
        responses = operation["responses"]
        assert str(status) in responses, (
            f"{method} {path} answered {status}, which api/openapi.yaml does not list "
            f"({', '.join(responses)}); body: {body[:300]!r}"
        )
        response = responses[str(status)]
        pointer = ["paths", template, method.lower(), "responses", str(status)]
        if "$ref" in response:
            response, pointer = self._deref(response)
        content = response.get("content")
        if not content:
            assert not body, f"{method} {path} {status}: documented without a body, got {body[:200]!r}"
            return
        media = (content_type or "").split(";")[0].strip()
        assert media in content, f"{method} {path} {status}: media type {media!r} not among {list(content)}"
        if media != "application/json":
            return
        data = json.loads(body)
        schema = {"$ref": f"{DOC_URI}#/{_pointer(*pointer, 'content', media, 'schema')}"}
        validator = Draft202012Validator(schema, registry=self.registry)
        errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
        assert not errors, f"{method} {path} {status}: body does not match the contract: " + "; ".join(
            f"{list(e.absolute_path)}: {e.message[:300]}" for e in errors[:5]
        )

    def check_request(self, method: str, template: str, body: Any) -> list[str]:
        """Validation errors of a request body against the contract (for documentation tests)."""
        pointer = ["paths", template, method.lower(), "requestBody", "content", "application/json", "schema"]
        schema = {"$ref": f"{DOC_URI}#/{_pointer(*pointer)}"}
        validator = Draft202012Validator(schema, registry=self.registry)
        return [e.message for e in validator.iter_errors(body)]


CONTRACT = Contract()


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")


@dataclass
class Client:
    """A tiny HTTP client; every response is checked against the contract."""

    base: str
    token: str | None = None
    checked: list[tuple[str, str, int]] = field(default_factory=list)

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        token: str | None = "default",
        headers: dict[str, str] | None = None,
        check: bool = True,
    ) -> Response:
        parts = urllib.parse.urlsplit(self.base)
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
        send = dict(headers or {})
        token = self.token if token == "default" else token
        if token:
            send["Authorization"] = f"Bearer {token}"
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            send.setdefault("Content-Type", "application/json")
        try:
            conn.request(method, path, body=data, headers=send)
            r = conn.getresponse()
            response = Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()
        if check:
            CONTRACT.check(method, path, response.status, response.headers.get("content-type"), response.body)
            self.checked.append((method, path, response.status))
        return response

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def delete(self, path: str, **kw: Any) -> Response:
        return self.request("DELETE", path, **kw)


class KnownSessions:
    """A faithful fake of ``OmeroImporter.session_info`` for tests without OMERO.

    Known keys answer their user, as OMERO's event context would; any other key is
    rejected the way the child reports OMERO's refusal (PermanentImportError). The
    real check runs against the OMERO double in tests/omero/test_omero_session_check.py.
    """

    def __init__(self, sessions: dict[str, dict[str, Any]] | None = None):
        self.sessions = dict(sessions or {})
        self.asked: list[str] = []

    def __call__(self, key: str) -> dict[str, Any]:
        self.asked.append(key)
        if key in self.sessions:
            return dict(self.sessions[key])
        raise PermanentImportError("OMERO at omero.example.org:4064 rejected the session key: session not found")


@dataclass
class Service:
    """A running API: config, store, server and a token per name."""

    config: Any
    store: SQLiteStore
    server: Server
    tokens: dict[str, str]
    roots: dict[str, Path]
    app: Any = None

    def client(self, token_name: str | None = None) -> Client:
        return Client(self.server.url, self.tokens[token_name] if token_name else None)


TOKEN_SPECS = {
    # name: (role, owners, roots)
    "admin": ("admin", (), ()),
    "reader": ("read", (), ()),
    "portal": ("submit", (), ()),
    "other-portal": ("submit", (), ()),
    "jdoe-only": ("submit", ("jdoe",), ()),
    "lab-reader": ("read", ("jdoe", "asmith"), ()),
    "drop-only": ("submit", (), ("{drop}/jdoe",)),
}


def make_config(tmp_path: Path, *, importer: str = "archive", extra_server: dict | None = None,
                token_specs: dict = TOKEN_SPECS) -> tuple[Any, dict[str, str], dict[str, Path]]:
    roots = {"drop": tmp_path / "drop", "elsewhere": tmp_path / "elsewhere"}
    for p in roots.values():
        p.mkdir(parents=True, exist_ok=True)
    tokens: dict[str, str] = {}
    entries = []
    for name, (role, owners, token_roots) in token_specs.items():
        resolved_roots = [r.format(drop=roots["drop"]) for r in token_roots]
        token, snippet = new_token(name, role, owners, resolved_roots)
        tokens[name] = token
        entries.extend(yaml.safe_load(snippet))
    raw: dict[str, Any] = {
        "data_dir": str(tmp_path / "data"),
        "importer": {"kind": importer},
        "server": {
            "listen": "127.0.0.1:0",
            "allowed_roots": [str(roots["drop"])],
            "tokens": entries,
            **(extra_server or {}),
        },
    }
    if importer == "omero":
        raw["importer"]["omero"] = {"host": "omero.example.org", "port": 4064, "admin_password": "unused-here"}
    return wconfig.parse(raw, path=tmp_path / "watchfolder.yaml", environ={}), tokens, roots


def start_service(tmp_path: Path, *, session_checker: Any = None, **kw: Any) -> Service:
    config, tokens, roots = make_config(tmp_path, **kw)
    store = SQLiteStore.from_config(config)
    app = create_app(config, store, session_checker=session_checker)
    server = Server(config, app)
    server.start()
    return Service(config, store, server, tokens, roots, app)


def stop_service(service: Service) -> None:
    service.server.stop()
    service.store.close()


def acquisition(root: Path, name: str, *, owner: str | None = "jdoe", files: dict[str, bytes] | None = None,
                target: dict | None = None, manifest: bool = True) -> Path:
    """Write an acquisition folder with a manifest (or without, when ``manifest`` is false)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    files = files or {"tile_001.ome.tiff": b"pixels" * 100}
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    if manifest:
        descriptor: dict[str, Any] = {
            "files": [{"path": rel, "size": len(data)} for rel, data in files.items()],
            "target": target or {"project": "Brain atlas", "dataset": "slide 3"},
        }
        if owner:
            descriptor["owner"] = owner
        (folder / "watchfolder.json").write_text(json.dumps(descriptor), encoding="utf-8")
    return folder
