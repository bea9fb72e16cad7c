"""Bearer tokens with scopes, stored hashed, and the loopback rule.

A token reads ``nvit_<id>_<secret>``: the id finds its row, the secret (32 random bytes) is stored only as
its sha256 and compared in constant time. Scopes: ``read`` (list and download), ``submit`` (upload tables and
models, submit and cancel its own jobs), ``agent`` (register, lease, report on its own agents' jobs),
``admin`` (everything, anyone's). Every scope may read. Anonymous calls are accepted only while no token is
active *and* the server listens on a loopback address *and* the call arrived on one; this is decided on
every request, so revoking the last token of a server on ``0.0.0.0`` locks it, never opens it. Otherwise
every call (except ``/healthz``) needs a token.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from nvit.errors import NvitError
from nvit.service.errors import ApiError
from nvit.service.store import Store

TOKEN_PREFIX = "nvit_"
_ID_BYTES = 6
_SECRET_BYTES = 32
_COUNT_TTL_S = 1.0


class Scope(str, enum.Enum):
    READ = "read"
    SUBMIT = "submit"
    AGENT = "agent"
    ADMIN = "admin"


def parse_scopes(values: Iterable[str]) -> list[Scope]:
    out: list[Scope] = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                scope = Scope(part.strip().lower())
            except ValueError:
                raise NvitError(f"unknown scope {part!r}; scopes: {', '.join(s.value for s in Scope)}") from None
            if scope not in out:
                out.append(scope)
    if not out:
        raise NvitError("a token needs at least one scope")
    return out


def allows(scopes: Iterable[Scope], needed: Scope) -> bool:
    have = set(scopes)
    return Scope.ADMIN in have or needed in have or (needed is Scope.READ and bool(have))


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token() -> tuple[str, str, str]:
    """A fresh token: ``(id, secret, the string to hand out)``."""
    token_id = secrets.token_hex(_ID_BYTES)
    secret = secrets.token_urlsafe(_SECRET_BYTES)
    return token_id, secret, f"{TOKEN_PREFIX}{token_id}_{secret}"


def split_token(token: str) -> tuple[str, str] | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, sep, secret = token[len(TOKEN_PREFIX):].partition("_")
    return (token_id, secret) if sep and token_id and secret else None


def create_token(store: Store, name: str, scopes: Iterable[Scope], *, now: float | None = None) -> str:
    """Store a new token (hashed) and return it: the only time its secret is seen."""
    if not name.strip() or len(name) > 200 or "\x00" in name:
        raise NvitError("a token's name is 1 to 200 characters")
    token_id, secret, token = new_token()
    store.add_token(token_id, name, hash_secret(secret), [Scope(s).value for s in scopes],
                    time.time() if now is None else now)
    return token


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Principal:
    """Who made a request: a token id and name (``anonymous`` on a server without tokens). ``token_id``
    owns the jobs it submits and the agents it registers."""

    token_id: str | None
    name: str
    scopes: frozenset[Scope]

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def owns(self, owner: str | None) -> bool:
        """Whether this caller may act on something submitted or registered by ``owner`` (a token id)."""
        return self.is_admin or owner == self.token_id


ANONYMOUS = Principal(None, "anonymous", frozenset(Scope))


class Authenticator:
    """Checks ``Authorization: Bearer`` headers against the store (and tokens held only in memory, such as
    the one ``nvit serve --local-agent`` gives its agent)."""

    def __init__(self, store: Store, *, always: bool = False, listen_host: str = "127.0.0.1") -> None:
        self.store = store
        self.memory: dict[str, tuple[str, frozenset[Scope]]] = {}
        self.always = always
        self.listen_loopback = is_loopback(listen_host)
        self._count = (0.0, 0)
        self._lock = threading.Lock()

    def add_memory_token(self, token: str, name: str, scopes: Iterable[Scope]) -> None:
        """Accept ``token`` until this process ends, without storing it."""
        self.memory[hash_secret(token)] = (name, frozenset(scopes))

    def required(self, local_host: str | None = None) -> bool:
        """Whether a call that arrived on ``local_host`` (the server's own address) needs a token."""
        if self.always or self.memory or not self.listen_loopback:
            return True
        if local_host is not None and not is_loopback(local_host):
            return True
        with self._lock:
            checked, count = self._count
            if time.monotonic() - checked > _COUNT_TTL_S:
                count = self.store.active_token_count()
                self._count = (time.monotonic(), count)
        return count > 0

    def check(self, authorization: str | None, needed: Scope, *, local_host: str | None = None) -> Principal:
        if not self.required(local_host):
            return ANONYMOUS
        principal = self._principal(authorization)
        if not allows(principal.scopes, needed):
            raise ApiError(403, "forbidden", f"token {principal.name!r} lacks the {needed.value!r} scope")
        return principal

    def _principal(self, authorization: str | None) -> Principal:
        challenge = {"WWW-Authenticate": 'Bearer realm="nvit"'}
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "unauthorized", "this server needs a bearer token (Authorization: Bearer nvit_...)",
                           headers=challenge)
        token = token.strip()
        hashed = hash_secret(token)
        found = self.memory.get(hashed)
        if found is not None:
            return Principal(f"memory-{hashed[:12]}", found[0], found[1])
        parts = split_token(token)
        row = self.store.token(parts[0]) if parts else None
        if (row is None or row["revoked_at"] is not None
                or not hmac.compare_digest(row["secret_sha256"], hash_secret(parts[1]))):
            raise ApiError(401, "unauthorized", "unknown or revoked token", headers=challenge)
        return Principal(row["id"], row["name"], frozenset(Scope(s) for s in row["scopes"].split()))
