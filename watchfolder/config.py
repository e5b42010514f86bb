"""Configuration: one YAML file, validated once into frozen dataclasses.

Every problem is reported with the key's path and the fix, all at once
(``workers.count: must be a positive integer, got 'two'``). Relative paths are
relative to the config file's folder. Secrets are given as ``{env: NAME}`` or
``{file: path}`` (or inline, discouraged) and are never printed.

Any scalar key can be overridden from the environment:
``WATCHFOLDER__WORKERS__COUNT=4`` sets ``workers.count``; list items are
addressed by index (``WATCHFOLDER__WATCH__0__PATH``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from . import defaults as D
from .errors import ConfigError
from .filemodes import group_problem
from .job import RetryPolicy, Target

_MISSING = object()


class Secret:
    """A secret value; its repr and str never show it."""

    __slots__ = ("_value", "origin")

    def __init__(self, value: str, origin: str):
        self._value = value
        self.origin = origin

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.origin}>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


# ---------------------------------------------------------------------------
# Config objects


@dataclass(frozen=True)
class StoreConfig:
    path: Path
    synchronous: str = D.STORE_SYNCHRONOUS
    lease_seconds: float = D.LEASE_SECONDS
    busy_timeout: float = D.BUSY_TIMEOUT_SECONDS
    # postgresql://user@host:port/db (several hosts), or None: the SQLite file at ``path``.
    url: str | None = None
    password: Secret | None = None
    # Job logs; with several hosts, a folder shared by all at the same path.
    logs_dir: Path | None = None

    @property
    def backend(self) -> str:
        return "postgresql" if self.url else "sqlite"

    @property
    def display_url(self) -> str:
        """The store's URL without secrets."""
        return self.url if self.url else f"sqlite:///{self.path}"


@dataclass(frozen=True)
class WorkersConfig:
    count: int = D.WORKER_COUNT
    poll_interval: float = D.WORKER_POLL_SECONDS
    heartbeat_seconds: float = D.HEARTBEAT_SECONDS
    shutdown_grace: float = D.SHUTDOWN_GRACE_SECONDS


@dataclass(frozen=True)
class ArchiveConfig:
    root: Path
    layout: str = D.ARCHIVE_LAYOUT
    # Below this many free bytes on the archive volume, its jobs pause (not fail).
    min_free_bytes: int = D.ARCHIVE_MIN_FREE_BYTES
    file_mode: int | None = None  # None: each copy keeps its source's permission bits less the umask
    # Bytes per second one job reads from the drop folder (0: as fast as it can), so an
    # archive copy does not saturate an instrument's share or link while it acquires.
    max_bytes_per_second: int = 0


@dataclass(frozen=True)
class OmeroConfig:
    host: str = "localhost"
    port: int = D.OMERO_PORT
    secure: bool = True
    admin_user: str = "root"
    admin_password: Secret | None = None
    python: str | None = None
    timeout: float = D.OMERO_TIMEOUT
    connect_timeout: float = 30.0
    sudo_ttl_ms: int = D.OMERO_SUDO_TTL_MS
    web_url: str | None = None
    namespace: str = "watchfolder.openmicroscopy.org/import"
    # A child that sends nothing (no progress, no heartbeat) for this long is hung: killed, retried.
    idle_timeout: float = 300.0
    block_size: int = 1024 * 1024
    # Files of one fileset uploaded at once (OMERO's ``omero import --parallel-upload``).
    parallel_upload: int = D.OMERO_PARALLEL_UPLOAD
    # Imports running at once against this server from one service process.
    max_concurrent: int = D.OMERO_MAX_CONCURRENT
    # Files Bio-Formats reads as no image: attach (FileAnnotation on the target), ignore, fail.
    non_images: str = "attach"
    # Group files into filesets with Bio-Formats (as OMERO's importer does) when Java and the jar are there.
    bioformats: bool = True
    # The Bio-Formats jar; default: the one scripts/omero-env puts beside the child's Python.
    bioformats_jar: str | None = None


@dataclass(frozen=True)
class PauseConfig:
    """The circuit breaker in front of an importer's target (an OMERO server, the archive volume)."""

    after_failures: int = D.PAUSE_AFTER_FAILURES
    probe_interval: float = D.PAUSE_PROBE_SECONDS
    alert_after: float = D.PAUSE_ALERT_SECONDS


@dataclass(frozen=True)
class ImporterConfig:
    kind: str
    archive: ArchiveConfig
    omero: OmeroConfig
    pause: PauseConfig = field(default_factory=PauseConfig)


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "localhost"
    port: int = D.SMTP_PORT
    security: str = "none"  # none | starttls | ssl
    username: str | None = None
    password: Secret | None = None
    timeout: float = D.SMTP_TIMEOUT
    verify_tls: bool = True
    ca_file: Path | None = None


@dataclass(frozen=True)
class NotifyConfig:
    transport: str  # folder | smtp | none
    outbox_dir: Path
    sender: str = D.MAIL_FROM
    admin_email: str | None = None
    default_domain: str | None = None
    templates_dir: Path | None = None
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(D.MAIL_MAX_ATTEMPTS, D.MAIL_BACKOFF))
    claim_hold: float = D.MAIL_CLAIM_HOLD_SECONDS
    watcher_unhealthy_after: float = D.WATCHER_UNHEALTHY_MAIL_AFTER
    contact: str | None = None
    # More than admin_digest_after permanent failures within admin_digest_minutes: one digest mail.
    admin_digest_after: int = D.ADMIN_DIGEST_AFTER
    admin_digest_minutes: float = D.ADMIN_DIGEST_MINUTES


@dataclass(frozen=True)
class TokenConfig:
    name: str
    role: str  # submit | read | admin
    hash: str  # "sha256:<hex>"
    owners: tuple[str, ...] = ()
    roots: tuple[Path, ...] = ()


@dataclass(frozen=True)
class ServerConfig:
    enabled: bool = True
    listen: str = D.LISTEN
    threads: int = D.SERVER_THREADS
    max_body_bytes: int = D.MAX_BODY_BYTES
    allowed_roots: tuple[Path, ...] = ()
    tokens: tuple[TokenConfig, ...] = ()
    public_url: str | None = None
    connection_limit: int = D.SERVER_CONNECTION_LIMIT
    idle_timeout: float = D.SERVER_IDLE_TIMEOUT
    header_timeout: float = D.SERVER_HEADER_TIMEOUT
    body_timeout: float = D.SERVER_BODY_TIMEOUT
    connections_per_client: int = D.SERVER_CONNECTIONS_PER_CLIENT  # 0: no cap
    seed_max_items: int = D.SEED_MAX_ITEMS
    seed_rate_per_minute: int = D.SEED_RATE_PER_MINUTE
    seed_session_timeout: float = D.SEED_SESSION_TIMEOUT
    seed_session_cache: float = D.SEED_SESSION_CACHE_SECONDS
    # Files with several hard links in API and seed submissions (see WatchConfig.allow_hard_links).
    allow_hard_links: bool = False
    seed_session_checks: int | None = D.SEED_SESSION_CHECKS
    seed_session_pause: float = D.SEED_SESSION_PAUSE

    @property
    def session_checks(self) -> int:
        """Seed session checks let run at once: ``seed_session_checks``, by default half the threads (>= 1)."""
        return self.seed_session_checks or max(1, self.threads // 2)

    @property
    def host(self) -> str:
        return self.listen.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int:
        return int(self.listen.rsplit(":", 1)[1])


@dataclass(frozen=True)
class WebhookConfig:
    """One webhook endpoint: events POSTed as CloudEvents JSON, signed per Standard Webhooks."""

    name: str
    url: str
    secret: Secret
    types: tuple[str, ...] = ()   # fnmatch patterns on the event type; empty: every type
    owners: tuple[str, ...] = ()  # only these owners' job events (watcher events always); empty: all
    timeout: float = D.WEBHOOK_TIMEOUT
    disable_after: float = D.SINK_DISABLE_AFTER


@dataclass(frozen=True)
class MqttConfig:
    """An MQTT broker: events published at QoS 1 on ``<topic_prefix>/jobs/<owner>/<state>``."""

    host: str
    port: int = D.MQTT_PORT
    tls: bool = False
    ca_file: Path | None = None
    username: str | None = None
    password: Secret | None = None
    topic_prefix: str = D.MQTT_TOPIC_PREFIX
    client_id: str | None = None
    types: tuple[str, ...] = ()
    owners: tuple[str, ...] = ()
    timeout: float = D.WEBHOOK_TIMEOUT


@dataclass(frozen=True)
class EventsConfig:
    source: str = D.EVENTS_SOURCE
    retention: float = D.EVENTS_RETENTION_SECONDS
    progress_milestones: tuple[int, ...] = D.PROGRESS_MILESTONES
    progress_min_bytes: int = D.PROGRESS_EVENT_MIN_BYTES
    retry: RetryPolicy = field(default_factory=lambda: RetryPolicy(1_000_000, D.SINK_BACKOFF))
    webhooks: tuple[WebhookConfig, ...] = ()
    mqtt: MqttConfig | None = None


@dataclass(frozen=True)
class WatchAction:
    action: str  # keep | move | delete
    folder: Path | None = None


@dataclass(frozen=True)
class WatchConfig:
    name: str
    path: Path
    mode: str = D.WATCH_MODE  # events | polling | auto
    poll_interval: float = D.POLL_SECONDS
    rescan_interval: float = D.RESCAN_SECONDS
    detection: str = D.WATCH_DETECTION  # manifest | sidecar | layout
    # manifest detection also imports sidecar pairs outside manifest folders
    sidecars: bool = True
    # an acquisition whose content this owner already imported into this target is not imported again
    deduplicate: bool = True
    manifest_name: str = D.MANIFEST_NAME
    sidecar_suffix: str = D.SIDECAR_SUFFIX
    layout: str | None = None
    quiet_period: float = D.QUIET_SECONDS
    missing_timeout: float = D.MISSING_TIMEOUT_SECONDS
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = D.EXCLUDE_PATTERNS
    owner: str | None = None
    group: str | None = None
    email: str | None = None
    target: Target | None = None
    allowed_owners: tuple[str, ...] = ()
    check_os_owner: bool = False
    # A file with several hard links may be another name for a file outside the drop folder
    # (ln /etc/shadow acq/x): refused unless the admin allows it here.
    allow_hard_links: bool = False
    on_success: WatchAction = WatchAction("keep")
    on_failure: WatchAction = WatchAction("keep")


@dataclass(frozen=True)
class Config:
    path: Path | None
    data_dir: Path
    log_level: str
    store: StoreConfig
    workers: WorkersConfig
    retry: RetryPolicy
    importer: ImporterConfig
    notify: NotifyConfig
    server: ServerConfig
    watch: tuple[WatchConfig, ...]
    events: EventsConfig = field(default_factory=EventsConfig)
    # The database, its -wal/-shm, job logs and the mail outbox: 0600, or 0640 with this group.
    file_group: str | None = None

    @property
    def logs_dir(self) -> Path:
        return self.store.logs_dir or self.data_dir / "logs"


# ---------------------------------------------------------------------------
# Reading


class _Reader:
    """Walks the raw YAML, collecting every problem instead of stopping at the first."""

    def __init__(self, base_dir: Path, environ: dict[str, str] | None = None):
        self.base_dir = base_dir
        # Secrets {env: NAME} read the same environment as the overrides (tests inject it).
        self.environ = os.environ if environ is None else environ
        self.problems: list[str] = []

    def problem(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}")

    def section(self, raw: dict, key: str, where: str) -> dict:
        value = raw.get(key, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(_join(where, key), f"must be a mapping of keys, got {_show(value)}")
            return {}
        return value

    def unknown(self, raw: dict, allowed: set[str], where: str) -> None:
        for key in raw:
            if key not in allowed:
                hint = _closest(str(key), allowed)
                fix = f"; did you mean {hint!r}?" if hint else f"; known keys: {', '.join(sorted(allowed))}"
                self.problem(_join(where, str(key)), f"unknown key{fix}")

    def get(self, raw: dict, key: str, where: str, check: Callable[[Any], Any], default: Any) -> Any:
        if key not in raw or raw[key] is None:
            return default
        try:
            return check(raw[key])
        except _Bad as bad:
            self.problem(_join(where, key), str(bad))
            return default

    def path(self, value: Any) -> Path:
        if not isinstance(value, str) or not value.strip():
            raise _Bad(f"must be a path, got {_show(value)}")
        path = Path(os.path.expanduser(value))
        return Path(os.path.normpath(path if path.is_absolute() else (self.base_dir / path)))

    def secret(self, value: Any) -> Secret:
        if isinstance(value, str):
            return Secret(value, "inline")
        if isinstance(value, dict) and len(value) == 1:
            (kind, ref), = value.items()
            if kind == "env":
                if not isinstance(ref, str) or ref not in self.environ:
                    raise _Bad(f"environment variable {ref!r} is not set; export it or use {{file: PATH}}")
                return Secret(self.environ[ref], f"env {ref}")
            if kind == "file":
                try:
                    path = self.path(ref)
                    return Secret(path.read_text(encoding="utf-8").strip(), f"file {path}")
                except OSError as exc:
                    raise _Bad(f"cannot read secret file {ref!r}: {exc.strerror}") from None
        raise _Bad("must be {env: VARIABLE} or {file: PATH} (or an inline string, discouraged)")


class _Bad(Exception):
    pass


def _join(where: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{where}[{key}]"
    return f"{where}.{key}" if where else key


def _show(value: Any) -> str:
    return repr(value) if not isinstance(value, (dict, list)) else type(value).__name__


def _closest(word: str, choices: set[str]) -> str | None:
    import difflib

    match = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=0.6)
    return match[0] if match else None


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise _Bad(f"must be a positive integer, got {_show(value)}")
    return value


def _sudo_ttl_ms(value: Any) -> int:
    """importer.omero.sudo_ttl_ms: whole milliseconds, at least ``D.OMERO_SUDO_TTL_MIN_MS``."""
    least = D.OMERO_SUDO_TTL_MIN_MS
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise _Bad(
            f"must be a whole number of milliseconds of at least {least} (the owner's session's idle timeout: "
            f"omero-py keeps it alive every 6 s at the most often, so less would let it expire between two "
            f"keep-alives); the default is {D.OMERO_SUDO_TTL_MS}, got {_show(value)}"
        )
    return value


def non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _Bad(f"must be a whole number of 0 or more, got {_show(value)}")
    return value


def port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise _Bad(f"must be a port number between 1 and 65535, got {_show(value)}")
    return value


def seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise _Bad(f"must be a number of seconds (0 or more), got {_show(value)}")
    return float(value)


def positive_seconds(value: Any) -> float:
    if seconds(value) <= 0:
        raise _Bad(f"must be a number of seconds greater than 0, got {_show(value)}")
    return float(value)


def boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad(f"must be true or false, got {_show(value)}")
    return value


def text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad(f"must be a non-empty string, got {_show(value)}")
    return value


def one_of(*choices: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in choices:
            raise _Bad(f"must be one of {', '.join(choices)}, got {_show(value)}")
        return value

    return check


def text_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise _Bad(f"must be a list of strings, got {_show(value)}")
    return tuple(value)


def backoff_list(value: Any) -> tuple[float, ...]:
    if not isinstance(value, list) or not value:
        raise _Bad(f"must be a non-empty list of seconds such as [30, 120, 600], got {_show(value)}")
    return tuple(seconds(v) for v in value)


def email(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"[^@\s]+@[^@\s]+", value):
        raise _Bad(f"must be an email address such as admin@example.org, got {_show(value)}")
    return value


def sender_email(value: Any) -> str:
    """``notify.from``: an address in ASCII, which every mail's From header must be (RFC 5322:
    a display name may be encoded, the address itself may not, and a server without SMTPUTF8
    refuses a non-ASCII envelope sender)."""
    value = email(value)
    if not value.isascii():
        local, _, domain = value.rpartition("@")
        hint = ""
        if local.isascii():
            try:
                hint = f" such as {local}@{domain.encode('idna').decode('ascii')}"
            except UnicodeError:
                pass
        fix = (f"write the domain in its ASCII (IDNA) form{hint}" if local.isascii()
               else "use an address whose part before the @ is ASCII")
        raise _Bad(f"must be an address in ASCII (every mail is sent from it; a mail server refuses or "
                   f"mangles a non-ASCII sender), got {_show(value)}; {fix}")
    return value


def listen(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}", value):
        raise _Bad(f"must be HOST:PORT such as 127.0.0.1:8470, got {_show(value)}")
    if not 0 <= int(value.rsplit(":", 1)[1]) < 65536:
        raise _Bad(f"port must be between 0 and 65535, got {_show(value)}")
    return value


def _retry(r: _Reader, raw: dict, where: str, default: RetryPolicy) -> RetryPolicy:
    r.unknown(raw, {"max_attempts", "backoff"}, where)
    return RetryPolicy(
        max_attempts=r.get(raw, "max_attempts", where, positive_int, default.max_attempts),
        backoff=r.get(raw, "backoff", where, backoff_list, default.backoff),
    )


def _store_url(r: _Reader, raw: dict, w: str) -> tuple[str | None, Path | None]:
    """``store.url`` as (postgresql URL, None) or (None, SQLite path); (None, None) when absent or bad."""
    url = raw.get("url")
    if url is None:
        return None, None
    where = _join(w, "url")
    if not isinstance(url, str) or "://" not in url:
        r.problem(where, f"must be sqlite:///PATH or postgresql://USER@HOST[:PORT]/DATABASE, got {_show(url)}")
        return None, None
    scheme, rest = url.split("://", 1)
    if scheme == "sqlite":
        if "path" in raw:
            r.problem(where, "and store.path both name the SQLite file; keep one")
        if not rest.startswith("/") or rest == "/":
            r.problem(where, f"a SQLite URL is sqlite:///PATH (three slashes), got {url!r}")
            return None, None
        try:
            return None, r.path(rest[1:])
        except _Bad as bad:
            r.problem(where, str(bad))
            return None, None
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(url)
        if parts.password is not None or "password" in parse_qs(parts.query or ""):
            # It would be shown by check-config, status and every connection error.
            r.problem(where, "carries a password; give it as store.password: {env: VARIABLE} or {file: PATH}")
            return None, None
        if not parts.hostname and "host=" not in (parts.query or ""):
            r.problem(where, f"names no host; e.g. postgresql://watchfolder@db.example.org/watchfolder, got {url!r}")
            return None, None
        return url, None
    r.problem(where, f"unknown scheme {scheme!r}; use sqlite:///PATH or postgresql://USER@HOST/DATABASE")
    return None, None


def _store(r: _Reader, raw: dict, data_dir: Path) -> StoreConfig:
    w = "store"
    r.unknown(raw, {"url", "password", "logs_dir", "path", "synchronous", "lease_seconds", "busy_timeout"}, w)
    url, sqlite_path = _store_url(r, raw, w)
    password = r.get(raw, "password", w, r.secret, None)
    url_rejected = raw.get("url") is not None and url is None and sqlite_path is None
    if password is not None and not url and not url_rejected:  # a rejected URL is the one problem to show
        r.problem(_join(w, "password"), "is only used with store.url: postgresql://…; remove it")
    return StoreConfig(
        url=url,
        password=password,
        logs_dir=r.get(raw, "logs_dir", w, r.path, None),
        path=sqlite_path or r.get(raw, "path", w, r.path, data_dir / D.DB_NAME),
        synchronous=r.get(raw, "synchronous", w, one_of("full", "normal"), D.STORE_SYNCHRONOUS),
        lease_seconds=r.get(raw, "lease_seconds", w, positive_seconds, D.LEASE_SECONDS),
        busy_timeout=r.get(raw, "busy_timeout", w, positive_seconds, D.BUSY_TIMEOUT_SECONDS),
    )


def _workers(r: _Reader, raw: dict) -> WorkersConfig:
    w = "workers"
    r.unknown(raw, {"count", "poll_interval", "heartbeat_seconds", "shutdown_grace"}, w)
    return WorkersConfig(
        count=r.get(raw, "count", w, positive_int, D.WORKER_COUNT),
        poll_interval=r.get(raw, "poll_interval", w, positive_seconds, D.WORKER_POLL_SECONDS),
        heartbeat_seconds=r.get(raw, "heartbeat_seconds", w, positive_seconds, D.HEARTBEAT_SECONDS),
        shutdown_grace=r.get(raw, "shutdown_grace", w, seconds, D.SHUTDOWN_GRACE_SECONDS),
    )


def _layout(value: Any) -> str:
    value = text(value)
    allowed = {"owner", "group", "project", "dataset", "screen", "acquisition", "job_id", "date"}
    names = set(re.findall(r"{(\w+)}", value))
    if not names <= allowed:
        raise _Bad(
            f"unknown placeholder(s) {', '.join(sorted(names - allowed))}; "
            f"use {', '.join('{' + n + '}' for n in sorted(allowed))}"
        )
    if value.startswith("/") or ".." in value.split("/"):
        raise _Bad(f"must be a relative layout without '..', got {value!r}")
    return value


def _importer(r: _Reader, raw: dict, data_dir: Path) -> ImporterConfig:
    w = "importer"
    r.unknown(raw, {"kind", "archive", "omero", "pause"}, w)
    kind = r.get(raw, "kind", w, one_of("archive", "omero", "noop"), "archive")
    a = r.section(raw, "archive", w)
    aw = "importer.archive"
    r.unknown(a, {"root", "layout", "min_free_bytes", "file_mode", "max_bytes_per_second"}, aw)
    archive = ArchiveConfig(
        root=r.get(a, "root", aw, r.path, data_dir / "archive"),
        layout=r.get(a, "layout", aw, _layout, D.ARCHIVE_LAYOUT),
        min_free_bytes=r.get(a, "min_free_bytes", aw, non_negative_int, D.ARCHIVE_MIN_FREE_BYTES),
        file_mode=r.get(a, "file_mode", aw, _file_mode, None),
        max_bytes_per_second=r.get(a, "max_bytes_per_second", aw, non_negative_int, 0),
    )
    o = r.section(raw, "omero", w)
    ow = "importer.omero"
    r.unknown(
        o,
        {
            "host", "port", "secure", "admin_user", "admin_password", "python", "timeout",
            "connect_timeout", "sudo_ttl_ms", "web_url", "namespace", "idle_timeout", "block_size",
            "parallel_upload", "max_concurrent",
            "non_images", "bioformats", "bioformats_jar",
        },
        ow,
    )
    omero = OmeroConfig(
        host=r.get(o, "host", ow, text, "localhost"),
        port=r.get(o, "port", ow, port, D.OMERO_PORT),
        secure=r.get(o, "secure", ow, boolean, True),
        admin_user=r.get(o, "admin_user", ow, text, "root"),
        admin_password=r.get(o, "admin_password", ow, r.secret, None),
        python=r.get(o, "python", ow, text, None),
        timeout=r.get(o, "timeout", ow, positive_seconds, D.OMERO_TIMEOUT),
        connect_timeout=r.get(o, "connect_timeout", ow, positive_seconds, 30.0),
        sudo_ttl_ms=r.get(o, "sudo_ttl_ms", ow, _sudo_ttl_ms, D.OMERO_SUDO_TTL_MS),
        web_url=r.get(o, "web_url", ow, text, None),
        namespace=r.get(o, "namespace", ow, text, OmeroConfig.namespace),
        idle_timeout=r.get(o, "idle_timeout", ow, positive_seconds, OmeroConfig.idle_timeout),
        block_size=r.get(o, "block_size", ow, positive_int, OmeroConfig.block_size),
        parallel_upload=r.get(o, "parallel_upload", ow, positive_int, D.OMERO_PARALLEL_UPLOAD),
        max_concurrent=r.get(o, "max_concurrent", ow, positive_int, D.OMERO_MAX_CONCURRENT),
        non_images=r.get(o, "non_images", ow, one_of("attach", "ignore", "fail"), "attach"),
        bioformats=r.get(o, "bioformats", ow, boolean, True),
        bioformats_jar=r.get(o, "bioformats_jar", ow, text, None),
    )
    pz = r.section(raw, "pause", w)
    pw = "importer.pause"
    r.unknown(pz, {"after_failures", "probe_interval", "alert_after"}, pw)
    pause = PauseConfig(
        after_failures=r.get(pz, "after_failures", pw, positive_int, D.PAUSE_AFTER_FAILURES),
        probe_interval=r.get(pz, "probe_interval", pw, positive_seconds, D.PAUSE_PROBE_SECONDS),
        alert_after=r.get(pz, "alert_after", pw, seconds, D.PAUSE_ALERT_SECONDS),
    )
    if kind == "omero" and omero.admin_password is None and "admin_password" not in o:
        r.problem(ow + ".admin_password", "required when importer.kind is omero; set {env: OMERO_ADMIN_PASSWORD}")
    return ImporterConfig(kind=kind, archive=archive, omero=omero, pause=pause)


def _notify(r: _Reader, raw: dict, data_dir: Path) -> NotifyConfig:
    w = "notify"
    r.unknown(
        raw,
        {
            "transport", "outbox_dir", "from", "admin_email", "default_domain", "templates_dir",
            "smtp", "retry", "watcher_unhealthy_after", "contact", "admin_digest_after", "admin_digest_minutes",
            "claim_hold",
        },
        w,
    )
    s = r.section(raw, "smtp", w)
    sw = "notify.smtp"
    r.unknown(s, {"host", "port", "security", "username", "password", "timeout", "verify_tls", "ca_file"}, sw)
    security = r.get(s, "security", sw, one_of("none", "starttls", "ssl"), "none")
    smtp = SmtpConfig(
        host=r.get(s, "host", sw, text, "localhost"),
        port=r.get(s, "port", sw, port, 465 if security == "ssl" else (587 if security == "starttls" else D.SMTP_PORT)),
        security=security,
        username=r.get(s, "username", sw, text, None),
        password=r.get(s, "password", sw, r.secret, None),
        timeout=r.get(s, "timeout", sw, positive_seconds, D.SMTP_TIMEOUT),
        verify_tls=r.get(s, "verify_tls", sw, boolean, True),
        ca_file=r.get(s, "ca_file", sw, r.path, None),
    )
    if smtp.password is not None and smtp.username is None:
        r.problem(sw + ".username", "required when notify.smtp.password is set")
    templates_dir = r.get(raw, "templates_dir", w, r.path, None)
    if templates_dir is not None and not templates_dir.is_dir():
        r.problem(w + ".templates_dir", f"{templates_dir} is not a folder; create it or remove the key")
    claim_hold = r.get(raw, "claim_hold", w, positive_seconds, D.MAIL_CLAIM_HOLD_SECONDS)
    if raw.get("transport") == "smtp" and claim_hold < 2 * smtp.timeout:
        r.problem(w + ".claim_hold", f"must be at least twice notify.smtp.timeout ({smtp.timeout:g} s), "
                  f"got {claim_hold:g}: a batch of sends must end within half of it, and one SMTP "
                  "round may take the timeout")
    return NotifyConfig(
        transport=r.get(raw, "transport", w, one_of("folder", "smtp", "none"), D.NOTIFY_TRANSPORT),
        outbox_dir=r.get(raw, "outbox_dir", w, r.path, data_dir / "outbox"),
        sender=r.get(raw, "from", w, sender_email, D.MAIL_FROM),
        admin_email=r.get(raw, "admin_email", w, email, None),
        default_domain=r.get(raw, "default_domain", w, text, None),
        templates_dir=templates_dir,
        smtp=smtp,
        retry=_retry(r, r.section(raw, "retry", w), "notify.retry", RetryPolicy(D.MAIL_MAX_ATTEMPTS, D.MAIL_BACKOFF)),
        watcher_unhealthy_after=r.get(raw, "watcher_unhealthy_after", w, positive_seconds, D.WATCHER_UNHEALTHY_MAIL_AFTER),
        contact=r.get(raw, "contact", w, text, None),
        admin_digest_after=r.get(raw, "admin_digest_after", w, positive_int, D.ADMIN_DIGEST_AFTER),
        admin_digest_minutes=r.get(raw, "admin_digest_minutes", w, positive_seconds, D.ADMIN_DIGEST_MINUTES),
        claim_hold=claim_hold,
    )


def _server(r: _Reader, raw: dict) -> ServerConfig:
    w = "server"
    r.unknown(raw, {"enabled", "listen", "threads", "max_body_bytes", "allowed_roots", "tokens", "public_url",
                    "connection_limit", "idle_timeout", "seed_max_items", "seed_rate_per_minute",
                    "seed_session_timeout", "seed_session_cache", "seed_session_checks", "seed_session_pause",
                    "allow_hard_links", "header_timeout", "body_timeout",
                    "connections_per_client"}, w)
    tokens = []
    raw_tokens = raw.get("tokens") or []
    if not isinstance(raw_tokens, list):
        r.problem("server.tokens", f"must be a list of tokens, got {_show(raw_tokens)}")
        raw_tokens = []
    names: set[str] = set()
    for i, t in enumerate(raw_tokens):
        tw = f"server.tokens[{i}]"
        if not isinstance(t, dict):
            r.problem(tw, "must be a mapping with name, role and hash (see `watchfolder token new`)")
            continue
        r.unknown(t, {"name", "role", "hash", "owners", "roots"}, tw)
        name = r.get(t, "name", tw, text, f"token{i}")
        if name in names:
            r.problem(tw + ".name", f"duplicate token name {name!r}; names must be unique")
        names.add(name)
        if "hash" not in t:
            r.problem(tw + ".hash", "missing; create one with `watchfolder token new --name NAME --role ROLE`")
        tokens.append(
            TokenConfig(
                name=name,
                role=r.get(t, "role", tw, one_of("submit", "read", "admin"), "read"),
                hash=r.get(t, "hash", tw, _token_hash, ""),
                owners=r.get(t, "owners", tw, text_list, ()),
                roots=tuple(r.path(p) for p in r.get(t, "roots", tw, text_list, ())),
            )
        )
    threads = r.get(raw, "threads", w, positive_int, D.SERVER_THREADS)
    checks = r.get(raw, "seed_session_checks", w, positive_int, D.SEED_SESSION_CHECKS)
    if checks is not None and checks >= threads:
        r.problem("server.seed_session_checks",
                  f"{checks} is not below server.threads ({threads}): session checks waiting for a slow OMERO "
                  "would hold every server thread, /health included; lower it or raise server.threads")
    return ServerConfig(
        enabled=r.get(raw, "enabled", w, boolean, True),
        listen=r.get(raw, "listen", w, listen, D.LISTEN),
        threads=threads,
        max_body_bytes=r.get(raw, "max_body_bytes", w, positive_int, D.MAX_BODY_BYTES),
        allowed_roots=tuple(r.path(p) for p in r.get(raw, "allowed_roots", w, text_list, ())),
        tokens=tuple(tokens),
        public_url=r.get(raw, "public_url", w, text, None),
        connection_limit=r.get(raw, "connection_limit", w, positive_int, D.SERVER_CONNECTION_LIMIT),
        idle_timeout=r.get(raw, "idle_timeout", w, positive_seconds, D.SERVER_IDLE_TIMEOUT),
        header_timeout=r.get(raw, "header_timeout", w, positive_seconds, D.SERVER_HEADER_TIMEOUT),
        body_timeout=r.get(raw, "body_timeout", w, positive_seconds, D.SERVER_BODY_TIMEOUT),
        connections_per_client=r.get(raw, "connections_per_client", w, non_negative_int,
                                     D.SERVER_CONNECTIONS_PER_CLIENT),
        seed_max_items=r.get(raw, "seed_max_items", w, positive_int, D.SEED_MAX_ITEMS),
        seed_rate_per_minute=r.get(raw, "seed_rate_per_minute", w, positive_int, D.SEED_RATE_PER_MINUTE),
        seed_session_timeout=r.get(raw, "seed_session_timeout", w, positive_seconds, D.SEED_SESSION_TIMEOUT),
        seed_session_cache=r.get(raw, "seed_session_cache", w, seconds, D.SEED_SESSION_CACHE_SECONDS),
        allow_hard_links=r.get(raw, "allow_hard_links", w, boolean, False),
        seed_session_checks=checks,
        seed_session_pause=r.get(raw, "seed_session_pause", w, positive_seconds, D.SEED_SESSION_PAUSE),
    )


def milestones(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(v, int) and 0 < v < 100 for v in value):
        raise _Bad(f"must be a list of percentages between 1 and 99 such as [25, 50, 75], got {_show(value)}")
    return tuple(sorted(set(value)))


def event_types(value: Any) -> tuple[str, ...]:
    """fnmatch patterns that each match at least one event type (a typo would silently match none)."""
    import fnmatch

    from .events.cloudevents import TYPES

    patterns = text_list(value)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(t, pattern) for t in TYPES):
            raise _Bad(f"{pattern!r} matches no event type; use one of {', '.join(TYPES)} (or a pattern such as "
                       "'org.watchfolder.job.*')")
    return patterns


def _filters(r: _Reader, raw: dict, where: str) -> dict[str, tuple[str, ...]]:
    return {"types": r.get(raw, "types", where, event_types, ()),
            "owners": r.get(raw, "owners", where, text_list, ())}


def _events(r: _Reader, raw: dict, server: ServerConfig) -> EventsConfig:
    w = "events"
    r.unknown(raw, {"source", "retention", "progress_milestones", "progress_min_bytes", "retry", "webhooks",
                    "mqtt"}, w)
    hooks = []
    raw_hooks = raw.get("webhooks") or []
    if not isinstance(raw_hooks, list):
        r.problem("events.webhooks", f"must be a list of endpoints, got {_show(raw_hooks)}")
        raw_hooks = []
    names: set[str] = set()
    for i, h in enumerate(raw_hooks):
        hw = f"events.webhooks[{i}]"
        if not isinstance(h, dict):
            r.problem(hw, "must be a mapping with url and secret")
            continue
        r.unknown(h, {"name", "url", "secret", "types", "owners", "timeout", "disable_after"}, hw)
        name = r.get(h, "name", hw, text, f"webhook{i + 1}")
        if name in names:
            r.problem(hw + ".name", f"duplicate webhook name {name!r}; names must be unique")
        names.add(name)
        if "url" not in h:
            r.problem(hw + ".url", "missing; the endpoint's http:// or https:// URL")
        if "secret" not in h:
            r.problem(hw + ".secret", "missing; a Standard Webhooks secret (whsec_<base64>), e.g. {env: LIMS_WEBHOOK_SECRET}")
        hooks.append(WebhookConfig(
            name=name,
            url=r.get(h, "url", hw, http_url, ""),
            secret=r.get(h, "secret", hw, lambda v: webhook_secret(r.secret(v)), Secret("", "missing")),
            timeout=r.get(h, "timeout", hw, positive_seconds, D.WEBHOOK_TIMEOUT),
            disable_after=r.get(h, "disable_after", hw, positive_seconds, D.SINK_DISABLE_AFTER),
            **_filters(r, h, hw),
        ))
    mqtt = None
    if raw.get("mqtt") is not None:
        m = r.section(raw, "mqtt", w)
        mw = "events.mqtt"
        r.unknown(m, {"host", "port", "tls", "ca_file", "username", "password", "topic_prefix", "client_id",
                      "types", "owners", "timeout"}, mw)
        if "host" not in m:
            r.problem(mw + ".host", "missing; the MQTT broker's host name")
        mqtt = MqttConfig(
            host=r.get(m, "host", mw, text, "localhost"),
            port=r.get(m, "port", mw, port, D.MQTT_PORT),
            tls=r.get(m, "tls", mw, boolean, False),
            ca_file=r.get(m, "ca_file", mw, r.path, None),
            username=r.get(m, "username", mw, text, None),
            password=r.get(m, "password", mw, r.secret, None),
            topic_prefix=r.get(m, "topic_prefix", mw, topic_prefix, D.MQTT_TOPIC_PREFIX),
            client_id=r.get(m, "client_id", mw, text, None),
            timeout=r.get(m, "timeout", mw, positive_seconds, D.WEBHOOK_TIMEOUT),
            **_filters(r, m, mw),
        )
    if mqtt is not None:
        if mqtt.ca_file is not None and not mqtt.ca_file.is_file():
            r.problem("events.mqtt.ca_file", f"{mqtt.ca_file} is not a file; give the CA certificate (PEM) of the broker")
        if mqtt.password is not None and mqtt.username is None:
            r.problem("events.mqtt.username", "required when events.mqtt.password is set")
    return EventsConfig(
        source=r.get(raw, "source", w, text, server.public_url or D.EVENTS_SOURCE),
        retention=r.get(raw, "retention", w, positive_seconds, D.EVENTS_RETENTION_SECONDS),
        progress_milestones=r.get(raw, "progress_milestones", w, milestones, D.PROGRESS_MILESTONES),
        progress_min_bytes=r.get(raw, "progress_min_bytes", w, non_negative_int, D.PROGRESS_EVENT_MIN_BYTES),
        retry=_retry(r, r.section(raw, "retry", w), "events.retry", RetryPolicy(1_000_000, D.SINK_BACKOFF)),
        webhooks=tuple(hooks),
        mqtt=mqtt,
    )


def http_url(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise _Bad(f"must be an http:// or https:// URL, got {_show(value)}")
    if "@" in value.split("/", 3)[2]:
        # user:password@ would be shown by check-config, the status and the logs; the webhook
        # secret authenticates the sender instead.
        raise _Bad("must not carry a user or password (user:pw@host); receivers check the webhook signature")
    return value


def webhook_secret(secret: Secret) -> Secret:
    """A Standard Webhooks secret: ``whsec_`` and base64 of at least 24 bytes."""
    import base64
    import binascii

    raw = secret.reveal()
    try:
        key = base64.b64decode(raw.removeprefix("whsec_") + "==", validate=False)
    except (binascii.Error, ValueError):
        key = b""
    if not raw.startswith("whsec_") or len(key) < 24:
        raise _Bad("must be a Standard Webhooks secret: whsec_ and base64 of 24 or more random bytes "
                   "(make one with: python3 -c \"import base64,os;print('whsec_'+base64.b64encode(os.urandom(32)).decode())\")")
    return secret


def topic_prefix(value: Any) -> str:
    if not isinstance(value, str) or not value or any(c in value for c in "#+\0") or value.startswith("/"):
        raise _Bad(f"must be an MQTT topic without wildcards (+, #) such as facility/watchfolder, got {_show(value)}")
    return value.rstrip("/")


def _file_mode(value: Any) -> int:
    """Octal permission bits: "0640" (or YAML's unquoted 0640, read as the integer 416)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        return value
    if isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{3}", value.strip()):
        return int(value.strip()[-3:], 8)
    raise _Bad(f'must be permission bits in octal such as "0640", got {_show(value)}')


def _token_hash(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise _Bad("must be sha256:<64 hex digits>, as printed by `watchfolder token new`; never the token itself")
    return value


def _action(r: _Reader, raw: Any, where: str, allowed: tuple[str, ...]) -> WatchAction:
    if raw is None:
        return WatchAction("keep")
    if isinstance(raw, str):
        raw = {"action": raw}
    if not isinstance(raw, dict):
        r.problem(where, f"must be one of {', '.join(allowed)} or {{action: move, folder: PATH}}")
        return WatchAction("keep")
    r.unknown(raw, {"action", "folder"}, where)
    action = r.get(raw, "action", where, one_of(*allowed), "keep")
    folder = r.get(raw, "folder", where, r.path, None)
    if action == "move" and folder is None:
        r.problem(where + ".folder", "required when action is move; name the folder to move acquisitions to")
    return WatchAction(action, folder)


def _watch_target(raw: Any, layout: str | None, where: str) -> Target:
    """A watch folder's default target. With a layout, it may be partial (``{project: P}``
    with ``{owner}/{dataset}/``): the path supplies the rest, so the merged target is checked."""
    from_path = set(re.findall(r"{(\w+)}", layout or "")) & {"project", "dataset", "screen"}
    if not from_path or not isinstance(raw, dict):
        return Target.from_dict(raw, where=where)
    probe = {k: v for k, v in raw.items() if v not in (None, "")}
    if "screen" in from_path:
        probe = {"screen": "x"}
    else:
        for key in ("dataset_id", "screen", "screen_id"):
            probe.pop(key, None)
        probe.update({k: "x" for k in from_path})
    Target.from_dict(probe, where=where + " (completed by the layout)")
    for key, value in raw.items():
        if value not in (None, "") and key in ("project", "dataset", "screen"):
            Target.from_dict({"dataset": value}, where=f"{where}.{key}")  # same rules for a name
    known = {k: v for k, v in raw.items() if k in Target.__dataclass_fields__ and v not in (None, "")}
    return Target(**known)


WATCH_KEYS = {
    "name", "path", "mode", "poll_interval", "rescan_interval", "detection", "manifest_name",
    "sidecar_suffix", "layout", "quiet_period", "missing_timeout", "include", "exclude", "owner",
    "group", "email", "target", "allowed_owners", "check_os_owner", "allow_hard_links", "on_success", "on_failure",
    "sidecars", "deduplicate",
}


def _watch(r: _Reader, raw: Any, data_dir: Path) -> tuple[WatchConfig, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        r.problem("watch", f"must be a list of watch folders, got {_show(raw)}")
        return ()
    out = []
    names: set[str] = set()
    for i, item in enumerate(raw):
        w = f"watch[{i}]"
        if not isinstance(item, dict):
            r.problem(w, "must be a mapping with at least `path`")
            continue
        r.unknown(item, WATCH_KEYS, w)
        if "path" not in item:
            r.problem(w + ".path", "missing; name the drop folder to watch")
            continue
        path = r.get(item, "path", w, r.path, None)
        if path is None:
            continue
        # A missing drop folder is not a config problem: a share may be unmounted or the folder
        # moved away for a while, and the watcher waits for it to come back (the other watch
        # folders and every command go on; `check-config` warns, see missing_watch_paths).
        # Something else in its place is a mistake in the config.
        if path.exists() and not path.is_dir():
            r.problem(w + ".path", f"{path} is not a folder; fix the path")
        name = r.get(item, "name", w, text, path.name or str(path))
        if name in names:
            r.problem(w + ".name", f"duplicate watch name {name!r}; give each watch folder its own name")
        names.add(name)
        detection = r.get(item, "detection", w, one_of("manifest", "sidecar", "layout"), D.WATCH_DETECTION)
        layout = r.get(item, "layout", w, text, None)
        if detection == "layout" and not layout:
            r.problem(w + ".layout", "required when detection is layout, e.g. '{owner}/{dataset}/'")
        if layout and not set(re.findall(r"{(\w+)}", layout)) <= {"owner", "group", "project", "dataset", "screen"}:
            r.problem(w + ".layout", "placeholders must be among {owner}, {group}, {project}, {dataset}, {screen}")
        target = None
        if item.get("target") is not None:
            try:
                target = _watch_target(item["target"], layout if detection == "layout" else None, w + ".target")
            except Exception as exc:  # AcquisitionError has the path already
                r.problems.append(str(exc))
        _refuse_overlap(r, w, path, [(f"watch[{j}]", o.path) for j, o in enumerate(out)])
        out.append(
            WatchConfig(
                name=name,
                path=path,
                mode=r.get(item, "mode", w, one_of("events", "polling", "auto"), D.WATCH_MODE),
                poll_interval=r.get(item, "poll_interval", w, positive_seconds, D.POLL_SECONDS),
                rescan_interval=r.get(item, "rescan_interval", w, positive_seconds, D.RESCAN_SECONDS),
                detection=detection,
                sidecars=r.get(item, "sidecars", w, boolean, True),
                deduplicate=r.get(item, "deduplicate", w, boolean, True),
                manifest_name=r.get(item, "manifest_name", w, text, D.MANIFEST_NAME),
                sidecar_suffix=r.get(item, "sidecar_suffix", w, text, D.SIDECAR_SUFFIX),
                layout=layout,
                quiet_period=r.get(item, "quiet_period", w, seconds, D.QUIET_SECONDS),
                missing_timeout=r.get(item, "missing_timeout", w, positive_seconds, D.MISSING_TIMEOUT_SECONDS),
                include=r.get(item, "include", w, text_list, ()),
                exclude=r.get(item, "exclude", w, text_list, D.EXCLUDE_PATTERNS),
                owner=r.get(item, "owner", w, text, None),
                group=r.get(item, "group", w, text, None),
                email=r.get(item, "email", w, email, None),
                target=target,
                allowed_owners=r.get(item, "allowed_owners", w, text_list, ()),
                check_os_owner=r.get(item, "check_os_owner", w, boolean, False),
                allow_hard_links=r.get(item, "allow_hard_links", w, boolean, False),
                on_success=_action(r, item.get("on_success"), w + ".on_success", ("keep", "move", "delete")),
                on_failure=_action(r, item.get("on_failure"), w + ".on_failure", ("keep", "move")),
            )
        )
    return tuple(out)


def _real(path: Path) -> Path:
    """``path`` with its symlinks resolved as far as it exists (a missing tail stays as written)."""
    return Path(os.path.realpath(os.path.abspath(path)))


def _refuse_overlap(r: _Reader, where: str, path: Path, earlier: list[tuple[str, Path]]) -> None:
    """One watch folder inside another (or the same folder twice) is refused.

    Both watchers would see the inner folder's acquisitions: two jobs, two mails, and
    one folder's post-action (delete, move) acting on the other's data. Excluding the
    inner folder from the outer one silently would hide a config that says two things
    about the same files, so the config check names both and the fix instead
    (issue 12, outside report item 10).
    """
    mine = _real(path)
    for other_where, other in earlier:
        theirs = _real(other)
        if mine == theirs:
            r.problem(where + ".path", f"{path} is the same folder as {other_where}.path ({other}); "
                                       "watch each folder once: remove one of the two entries")
        elif mine.is_relative_to(theirs) or theirs.is_relative_to(mine):
            inner, outer = (where, other_where) if mine.is_relative_to(theirs) else (other_where, where)
            r.problem(where + ".path", f"{path} and {other_where}.path ({other}) overlap: {inner} is inside "
                                       f"{outer}, so both would import its acquisitions; give them folders "
                                       "side by side (not one inside the other), or remove one entry")


def missing_watch_paths(config: Config) -> list[str]:
    """One warning line per configured watch folder that does not exist now.

    Not a config error: the watcher waits for such a folder to come back (a share not
    mounted yet, a folder moved away), and every other watch folder and command goes on.
    """
    return [
        f"watch folder {w.name}: {w.path} does not exist now (removed, or its share is not mounted); "
        "the service waits for it to come back; create it or fix the path if it is a typo"
        for w in config.watch
        if not w.path.exists() and not w.path.is_relative_to(config.data_dir)
    ]


TOP_KEYS = {"data_dir", "file_group", "log_level", "store", "workers", "retry", "importer", "notify", "server", "watch",
            "events"}


def apply_env_overrides(raw: dict, environ: dict[str, str]) -> dict:
    """Apply ``WATCHFOLDER__A__B=value`` overrides (values parsed as YAML scalars)."""
    for name, value in sorted(environ.items()):
        if not name.startswith(D.ENV_PREFIX):
            continue
        keys = [k.lower() for k in name[len(D.ENV_PREFIX):].split("__") if k]
        if not keys:
            continue
        node: Any = raw
        for key in keys[:-1]:
            if isinstance(node, list) and key.isdigit() and int(key) < len(node):
                node = node[int(key)]
            elif isinstance(node, dict):
                node = node.setdefault(key, {})
            else:
                raise ConfigError(f"{name}: cannot override {'.'.join(keys)}; that key is not a mapping")
        try:
            parsed = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            parsed = value
        last = keys[-1]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            node[int(last)] = parsed
        elif isinstance(node, dict):
            node[last] = parsed
        else:
            raise ConfigError(f"{name}: cannot override {'.'.join(keys)}; that key is not a mapping")
    return raw


def parse(raw: Any, *, path: Path | None = None, environ: dict[str, str] | None = None) -> Config:
    """Validate a raw mapping (as loaded from YAML) into a :class:`Config`."""
    base_dir = path.parent if path else Path.cwd()
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping of keys (data_dir:, workers:, …)")
    env = dict(os.environ if environ is None else environ)
    raw = apply_env_overrides(raw, env)
    r = _Reader(base_dir.resolve(), env)
    r.unknown(raw, TOP_KEYS, "")
    data_dir = r.get(raw, "data_dir", "", r.path, r.path(D.DATA_DIR))
    file_group = r.get(raw, "file_group", "", text, None)
    if file_group and (problem := group_problem(file_group)):
        r.problem("file_group", problem)
    server = _server(r, r.section(raw, "server", ""))
    config = Config(
        path=path,
        data_dir=data_dir,
        log_level=r.get(raw, "log_level", "", one_of("debug", "info", "warning", "error"), D.LOG_LEVEL),
        store=_store(r, r.section(raw, "store", ""), data_dir),
        workers=_workers(r, r.section(raw, "workers", "")),
        retry=_retry(r, r.section(raw, "retry", ""), "retry", RetryPolicy(D.RETRY_MAX_ATTEMPTS, D.RETRY_BACKOFF)),
        importer=_importer(r, r.section(raw, "importer", ""), data_dir),
        notify=_notify(r, r.section(raw, "notify", ""), data_dir),
        server=server,
        watch=_watch(r, raw.get("watch"), data_dir),
        events=_events(r, r.section(raw, "events", ""), server),
        file_group=file_group,
    )
    if config.notify.transport == "smtp" and not config.notify.smtp.host:
        r.problem("notify.smtp.host", "required when notify.transport is smtp")
    _refuse_output_in_watch(r, config)
    if r.problems:
        raise ConfigError(r.problems)
    return config


def _refuse_output_in_watch(r: _Reader, config: Config) -> None:
    """What the service writes (the archive, the job store and its logs, the mail outbox) may not
    be inside a watch folder, nor a watch folder inside the archive: the service would import its
    own output, again and again (an archive under the drop folder became owner "archive", then
    "archive/archive"). The job store's folder (``data_dir``) may hold drop folders; not the reverse."""
    written: list[tuple[str, Path]] = []
    if config.importer.kind == "archive":
        written.append(("importer.archive.root", config.importer.archive.root))
    if config.store.url is None or config.store.url.startswith("sqlite"):
        written.append(("store.path", config.store.path))
    written.append(("store.logs_dir" if config.store.logs_dir else "data_dir (its logs/)", config.logs_dir))
    if config.notify.transport == "folder":
        written.append(("notify.outbox_dir", config.notify.outbox_dir))
    for i, w in enumerate(config.watch):
        watched = _real(w.path)
        for key, out in written:
            mine = _real(out)
            if mine == watched or mine.is_relative_to(watched):
                r.problem(f"watch[{i}].path", f"{w.path} holds {key} ({out}): the service would import what it "
                                              f"writes there as acquisitions; move {key} outside every watch folder")
            elif key == "importer.archive.root" and watched.is_relative_to(mine):
                r.problem(f"watch[{i}].path", f"{w.path} is inside {key} ({out}): archived data would be imported "
                                              "again; give the watch folder a place outside the archive")


def load(path: str | os.PathLike | None = None, *, environ: dict[str, str] | None = None) -> Config:
    """Load and validate the config file (``$WATCHFOLDER_CONFIG`` when no path is given)."""
    env = dict(os.environ if environ is None else environ)
    if path is None:
        path = env.get(D.CONFIG_ENV)
    if path is None:
        raise ConfigError(f"no config file given; pass --config PATH or set {D.CONFIG_ENV}")
    file = Path(path).expanduser()
    try:
        text_ = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist; copy config/watchfolder.example.yaml there") from None
    except OSError as exc:
        raise ConfigError(f"config file {file}: cannot read it ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text_)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{file}: invalid YAML{where}: {problem}") from None
    return parse(raw, path=file.resolve(), environ=env)


def to_dict(config: Any) -> Any:
    """The effective config as plain data, secrets redacted (for ``check-config``)."""
    if isinstance(config, Secret):
        return f"<redacted: {config.origin}>"
    if is_dataclass(config):
        return {f.name: to_dict(getattr(config, f.name)) for f in fields(config)}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, Path):
        return str(config)
    if isinstance(config, dict):
        return {k: to_dict(v) for k, v in config.items()}
    return config
