"""API keys with two roles, and the rule for binding a public address.

Keys come from the environment only, comma-separated:

* ``RAGOPS_API_KEYS_CHAT``: chat-level keys (chat, search, embeddings, models, feedback);
* ``RAGOPS_API_KEYS_ADMIN``: admin keys, which can do everything, including what changes
  data or models (``/v1/admin/*``).

Keys never leave the process that read them: the app is built with their SHA-256 digests
(:class:`ApiKeys`), a presented key is hashed and compared with :func:`hmac.compare_digest`,
and neither keys nor digests are logged or returned. With no key configured the API is open,
which is only allowed on a loopback address unless the operator says ``--insecure``
(:func:`check_bind`).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum

from ragops.errors import ConfigError
from ragops.serve.errors import APIError

CHAT_KEYS_ENV = "RAGOPS_API_KEYS_CHAT"
ADMIN_KEYS_ENV = "RAGOPS_API_KEYS_ADMIN"


class Role(str, Enum):
    """What a key may do; ``admin`` includes ``chat``."""

    CHAT = "chat"
    ADMIN = "admin"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def _split(raw: str | None) -> list[str]:
    return [k.strip() for k in (raw or "").split(",") if k.strip()]


@dataclass(frozen=True)
class ApiKeys:
    """Digests of the configured keys per role (empty: the API is open).

    Attributes:
        chat: SHA-256 hex digests of chat keys.
        admin: SHA-256 hex digests of admin keys.
    """

    chat: tuple[str, ...] = field(default=(), repr=False)
    admin: tuple[str, ...] = field(default=(), repr=False)

    @classmethod
    def from_keys(cls, chat: Iterable[str] = (), admin: Iterable[str] = ()) -> ApiKeys:
        """Build from plain keys (hashed here; the plain keys are not kept)."""
        return cls(chat=tuple(_digest(k) for k in chat if k), admin=tuple(_digest(k) for k in admin if k))

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ApiKeys:
        """Read ``RAGOPS_API_KEYS_CHAT`` and ``RAGOPS_API_KEYS_ADMIN``."""
        return cls.from_keys(_split(environ.get(CHAT_KEYS_ENV)), _split(environ.get(ADMIN_KEYS_ENV)))

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (then every /v1 call needs one)."""
        return bool(self.chat or self.admin)

    def role_of(self, key: str) -> Role | None:
        """The role of a presented key, or None when it matches no configured key."""
        presented = _digest(key)
        # Compare against every digest (no early exit) so timing does not reveal which matched.
        is_admin = False
        for d in self.admin:
            is_admin |= hmac.compare_digest(presented, d)
        is_chat = False
        for d in self.chat:
            is_chat |= hmac.compare_digest(presented, d)
        if is_admin:
            return Role.ADMIN
        return Role.CHAT if is_chat else None

    def __repr__(self) -> str:  # never print digests either
        return f"ApiKeys(chat={len(self.chat)} keys, admin={len(self.admin)} keys)"


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authorize(keys: ApiKeys, authorization: str | None, needed: Role) -> Role | None:
    """Check a request's key for a role.

    Returns:
        The key's role, or None when no keys are configured (open API).

    Raises:
        APIError: 401 without a valid key, 403 when a chat key calls an admin endpoint.
    """
    if not keys.enabled:
        return None
    token = bearer_token(authorization)
    if token is None:
        raise APIError(
            401,
            "missing API key: send 'Authorization: Bearer <key>'",
            type="authentication_error",
            code="missing_api_key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    role = keys.role_of(token)
    if role is None:
        raise APIError(
            401, "invalid API key", type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )
    if needed is Role.ADMIN and role is not Role.ADMIN:
        raise APIError(403, "this endpoint needs an admin API key", type="permission_error", code="insufficient_permissions")
    return role


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_bind(host: str, keys: ApiKeys, insecure: bool) -> None:
    """Refuse to expose an open API.

    Raises:
        ConfigError: ``host`` is not loopback, no API key is configured and ``insecure`` is
            False.
    """
    if is_loopback(host) or keys.enabled or insecure:
        return
    raise ConfigError(
        f"refusing to bind {host} without API keys: anyone who can reach it could use and change the service. "
        f"Set {CHAT_KEYS_ENV} and/or {ADMIN_KEYS_ENV} (comma-separated keys), bind 127.0.0.1, or pass --insecure "
        "to serve an open API on purpose."
    )
