"""Bearer tokens and path limits for the REST API.

Tokens live in the config only as ``sha256:<hex>`` of the token; the plain token
is printed once by ``watchfolder token new`` and never stored. Verification
hashes the presented token and compares it with every configured hash in
constant time, so neither the timing nor the order of tokens tells an attacker
anything.

Roles (``ROLE_PERMISSIONS``):

- ``submit`` — submit jobs, and read the jobs it submitted (source ``api:<name>``);
- ``read``   — read every job, its log, the status view and the dashboard;
- ``admin``  — all of the above, plus retry and cancel, and the seed's
  failed-import routes.

A token may be limited to owners (it can submit for, and see, only those
owners' jobs) and to path roots (every path it names must lie under one of
them, on top of ``server.allowed_roots``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import WatchfolderError
from ..watch.acquisition import is_within

ROLES = ("submit", "read", "admin")

# What each role may do. "read_own" is reading the jobs the token itself submitted.
ROLE_PERMISSIONS: dict[str, frozenset[str]] = {
    "submit": frozenset({"submit", "read_own"}),
    "read": frozenset({"read", "read_own", "status"}),
    "admin": frozenset({"submit", "read", "read_own", "status", "manage"}),
}

TOKEN_PREFIX = "wf_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class AuthError(WatchfolderError):
    """Base of the API's access errors; ``status`` is the HTTP code to answer."""

    status = 403


class Unauthorized(AuthError):
    """No token, or a token that matches none in the config (HTTP 401)."""

    status = 401


class Forbidden(AuthError):
    """A valid token that may not do this (HTTP 403): wrong role, owner or path outside its roots."""

    status = 403


@dataclass(frozen=True)
class Principal:
    """The caller, as identified by its token."""

    name: str
    role: str
    owners: tuple[str, ...] = ()
    roots: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The job source of the jobs this token submits."""
        return f"api:{self.name}"

    def can(self, permission: str) -> bool:
        return permission in ROLE_PERMISSIONS.get(self.role, frozenset())

    def require(self, permission: str, action: str) -> None:
        """Raise :class:`Forbidden` unless the role grants ``permission``."""
        if not self.can(permission):
            needed = [r for r in ROLES if permission in ROLE_PERMISSIONS[r]]
            raise Forbidden(
                f"token {self.name!r} has role {self.role!r}, which may not {action}; "
                f"use a token with role {' or '.join(needed)}"
            )

    def may_see_owner(self, owner: str | None) -> bool:
        """True unless the token is limited to owners and ``owner`` is not one (None: no owner)."""
        return not self.owners or (owner is not None and owner in self.owners)

    def may_read(self, owner: str | None, source: str | None = None) -> bool:
        """The one read rule of every route that shows a job or what belongs to one (its log, its mails).

        ``owner``: the job's owner (None for what belongs to no job, e.g. an admin
        digest mail: only tokens limited to no owner see it). ``source``: the job's
        source; a token with ``read_own`` only (submit role) sees its own jobs.
        """
        if not self.may_see_owner(owner):
            return False
        if self.can("read"):
            return True
        return self.can("read_own") and source is not None and source == self.source

    @property
    def owner_scope(self) -> tuple[str, ...] | None:
        """The owners whose jobs this token's counts and charts cover; None: everyone's."""
        return self.owners or None

    def may_see_pending(self, owner: str | None) -> bool:
        """A pending acquisition (its owner may not be known yet): unlimited readers see all,
        others only those of their owners (never one with no owner)."""
        if self.can("read") and not self.owners:
            return True
        return owner is not None and owner in self.owners

    def check_owner(self, owner: str) -> None:
        """Raise :class:`Forbidden` when the token is limited to other owners."""
        if not self.may_see_owner(owner):
            raise Forbidden(
                f"token {self.name!r} may only act for owner(s) {', '.join(self.owners)}, not {owner!r}"
            )


def hash_token(token: str) -> str:
    """The config form of a token: ``sha256:<64 hex digits>``."""
    return "sha256:" + hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token(
    name: str, role: str, owners: Iterable[str] = (), roots: Iterable[str | os.PathLike] = ()
) -> tuple[str, str]:
    """Make a new token: ``(token, YAML snippet for server.tokens)``.

    The token is shown once; only its hash goes into the config.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise WatchfolderError(
            f"token name {name!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', e.g. 'portal'"
        )
    if role not in ROLES:
        raise WatchfolderError(f"token role {role!r} is not valid; use one of {', '.join(ROLES)}")
    owners = [str(o) for o in owners]
    roots = [str(Path(r).expanduser().absolute()) for r in roots]
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    entry: dict[str, object] = {"name": name, "role": role, "hash": hash_token(token)}
    if owners:
        entry["owners"] = owners
    if roots:
        entry["roots"] = roots
    body = yaml.safe_dump([entry], sort_keys=False, default_flow_style=False)
    snippet = (
        f"# Add under `server: tokens:` in the config; the token itself is not stored anywhere.\n{body}"
    )
    return token, snippet


class TokenVerifier:
    """Matches bearer tokens against the configured hashes in constant time."""

    def __init__(self, tokens: Sequence) -> None:
        # Each entry: (digest bytes, Principal); digests compared with hmac.compare_digest.
        self._entries: list[tuple[bytes, Principal]] = []
        for t in tokens:
            hex_digest = t.hash.split(":", 1)[1] if ":" in t.hash else ""
            try:
                digest = bytes.fromhex(hex_digest)
            except ValueError:
                continue  # config validation already refuses these; never match them
            if len(digest) != 32:
                continue
            self._entries.append(
                (digest, Principal(t.name, t.role, tuple(t.owners), tuple(str(r) for r in t.roots)))
            )

    def principals(self) -> list[Principal]:
        """The configured principals (no secrets), e.g. to prepare per-token data at start."""
        return [principal for _, principal in self._entries]

    def verify(self, authorization: str | None) -> Principal:
        """The principal for an ``Authorization`` header value; raises :class:`Unauthorized`."""
        if not authorization:
            raise Unauthorized("missing bearer token; send the header 'Authorization: Bearer <token>'")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or not token.isascii():
            raise Unauthorized("the Authorization header must be 'Bearer <token>' (tokens are ASCII)")
        presented = hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        # No early exit: every configured hash is compared, whatever matches.
        for digest, principal in self._entries:
            if hmac.compare_digest(presented, digest):
                found = principal
        if found is None:
            raise Unauthorized("unknown or revoked token; ask the admin for a token (watchfolder token new)")
        return found


def resolve_roots(roots: Iterable[str | os.PathLike]) -> tuple[str, ...]:
    """Resolve configured roots (symlinks included) once, for :func:`resolve_under_roots`."""
    return tuple(os.path.realpath(os.fspath(r)) for r in roots)


def resolve_under_roots(
    path: str | os.PathLike,
    allowed_roots: Sequence[str | os.PathLike],
    token_roots: Sequence[str | os.PathLike] = (),
    *,
    roots_resolved: bool = False,
) -> str:
    """Resolve ``path`` (symlinks included) and check it lies under an allowed root.

    Returns the resolved path; raises :class:`Forbidden` with the reason
    otherwise. Both the server's roots and, when the token has any, the token's
    roots must contain the path. Roots are resolved too, so a root that is
    itself a symlink works as expected; ``roots_resolved=True`` says the caller
    already did that with :func:`resolve_roots` (the server does it once at start,
    not on every request).
    """
    if not allowed_roots:
        raise Forbidden(
            "this server accepts no paths: server.allowed_roots is empty; "
            "the admin must list the folders clients may import from"
        )
    text = os.fspath(path)
    if "\x00" in text:
        raise Forbidden(f"path {text!r} contains a NUL character")
    if not os.path.isabs(text):
        raise Forbidden(f"path {text!r} is relative; give an absolute path under an allowed root")
    real = os.path.realpath(text)
    server_roots = [os.fspath(r) for r in allowed_roots] if roots_resolved else resolve_roots(allowed_roots)
    if not any(is_within(real, r) for r in server_roots):
        shown = f"{text!r}" + (f" (resolves to {real!r})" if real != os.path.normpath(text) else "")
        raise Forbidden(
            f"path {shown} is outside the allowed roots ({', '.join(server_roots)}); "
            "move the data under one of them or ask the admin to add a root"
        )
    if token_roots:
        limits = [os.fspath(r) for r in token_roots] if roots_resolved else resolve_roots(token_roots)
        if not any(is_within(real, r) for r in limits):
            raise Forbidden(
                f"path {text!r} (resolves to {real!r}) is outside this token's roots ({', '.join(limits)})"
            )
    return real


__all__ = [
    "ROLES",
    "ROLE_PERMISSIONS",
    "AuthError",
    "Unauthorized",
    "Forbidden",
    "Principal",
    "TokenVerifier",
    "hash_token",
    "new_token",
    "resolve_roots",
    "resolve_under_roots",
]
