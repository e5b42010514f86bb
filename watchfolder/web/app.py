"""The WSGI application: the REST API, the seed-compatible routes, metrics and the dashboard.

``create_app`` builds one Bottle app and mounts :mod:`.api` (``/api/v1``) and
:mod:`.seed` (``/ome/...``) on it; both share :mod:`.http` for JSON and error
answers. The contract is ``api/openapi.yaml``, served at ``/api/v1/openapi.yaml``.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os

import bottle

from . import api as api_routes
from . import seed
from .api import Api
from .http import API, JSON_TYPE, error_response
from .metrics import exposition

log = logging.getLogger(__name__)


def _package_file(name: str) -> bytes:
    return importlib.resources.files(__package__).joinpath(name).read_bytes()


STATIC_TYPES = {".html": "text/html", ".js": "text/javascript", ".css": "text/css"}


def create_app(config, store, importer=None, session_checker=None) -> bottle.Bottle:
    """The WSGI application: REST API, metrics, dashboard and the seed-compatible routes.

    ``session_checker(key) -> {"user", "email", "group"}`` tells whose an OMERO session
    key is, for ``POST /ome/import`` (default: the omero importer's ``session_info``,
    which joins the session in a child process).
    """
    api = Api(config, store, importer)
    api.session_checker = session_checker
    app = bottle.Bottle(catchall=True)
    app.config["json.enable"] = False
    app.config["watchfolder.api"] = api
    openapi_bytes = _package_file("openapi.yaml")
    static_dir = importlib.resources.files(__package__).joinpath("static")
    static_files = {p.name: p.read_bytes() for p in static_dir.iterdir() if p.is_file()}

    def default_error(err: bottle.HTTPError) -> str:
        bottle.response.content_type = JSON_TYPE
        # The seed's routes keep the seed's error shape, {"reason": ...}, whatever went wrong.
        seed_shape = bottle.request.path.startswith(seed.SEED_PREFIX)
        if err.status_code >= 500:
            log.error("unhandled error on %s %s: %s", bottle.request.method, bottle.request.path, err.exception)
            if err.traceback:
                log.error("%s", err.traceback)
            if seed_shape:
                return json.dumps({"reason": "internal server error; see the server log"})
            return json.dumps({"error": "internal server error; see the server log", "detail": None})
        if seed_shape:
            return seed.default_error(err.status_code, bottle.request.method, bottle.request.path,
                                      err.headers.get("Allow", ""))
        if err.status_code == 404:
            message = f"no such endpoint: {bottle.request.method} {bottle.request.path}; see {API}/openapi.yaml"
        elif err.status_code == 405:
            message = f"method {bottle.request.method} not allowed on {bottle.request.path}; allowed: {err.headers.get('Allow', '')}"
        else:
            message = str(err.body)
        return json.dumps({"error": message, "detail": None})

    app.default_error_handler = default_error

    @app.get(f"{API}/openapi.yaml")
    def get_openapi():
        response = bottle.HTTPResponse(openapi_bytes)
        response.content_type = "application/yaml"
        return response

    @app.get("/metrics")
    def get_metrics():
        response = bottle.HTTPResponse(exposition(api.registry))
        response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return response

    def static(name: str) -> bottle.HTTPResponse:
        if name not in static_files:
            return error_response(404, f"no static file {name!r}")
        response = bottle.HTTPResponse(static_files[name])
        response.content_type = STATIC_TYPES.get(os.path.splitext(name)[1], "application/octet-stream")
        # The page holds no data; the API calls it makes carry the token.
        response.set_header("Cache-Control", "no-cache")
        response.set_header("X-Content-Type-Options", "nosniff")
        response.set_header("X-Frame-Options", "DENY")
        return response

    @app.get("/")
    def dashboard():
        response = static("index.html")
        response.set_header(
            "Content-Security-Policy",
            "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'",
        )
        return response

    @app.get("/static/<name>")
    def static_file(name: str):
        return static(name)

    api_routes.install(app, api)
    seed.install(app, api)
    return app
