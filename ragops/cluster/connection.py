"""Which Ray dashboard to talk to, and the token to send it.

The address of the Jobs API is a dashboard URL (``http://127.0.0.1:8265``). It comes from,
first to last: ``--address``; ``RAY_ADDRESS``; ``ray.address`` in the job's configuration
when it is an ``http(s)://`` URL; the local head started by ``ragops cluster up`` when there
is exactly one.

Ray 2.60 token authentication (``RAY_AUTH_MODE=token``): the dashboard wants
``Authorization: Bearer <token>``. Ray's own client sends it only when ``RAY_AUTH_MODE=token``
is set in the client's environment, reading ``RAY_AUTH_TOKEN``, then ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token``. We resolve the token ourselves (same sources, plus the token file
of a head started by ``ragops cluster up`` for that very address) and pass the header
explicitly, so a missing or wrong token becomes one clear error instead of Ray's traceback.
The token is never logged or printed; only where it came from is.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ragops.cluster.errors import AuthError, ClusterError

#: Default port of the Ray dashboard (and so of the Jobs API).
DEFAULT_DASHBOARD_PORT = 8265

_LOOPBACK_NAMES = {"localhost", "ip6-localhost"}


@dataclass(frozen=True)
class Connection:
    """A resolved Jobs API endpoint.

    Attributes:
        address: Dashboard URL without a trailing slash (or a non-HTTP address Ray resolves).
        source: Where the address came from, for messages (``--address``, ``RAY_ADDRESS``...).
        token: Bearer token to send, or None (never shown in repr or messages).
        token_source: Where the token came from, for messages; None without a token.
    """

    address: str
    source: str
    token: str | None = field(default=None, repr=False)
    token_source: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers for every request (the bearer token when there is one)."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    @property
    def is_http(self) -> bool:
        """Whether the address is a dashboard URL (as opposed to a GCS address)."""
        return self.address.startswith(("http://", "https://"))

    @property
    def is_local(self) -> bool:
        """Whether the dashboard is on this machine (loopback address)."""
        return is_loopback(self.address)


def normalize_address(address: str) -> str:
    """Strip whitespace and trailing slashes; refuse Ray Client (``ray://``) addresses."""
    address = address.strip().rstrip("/")
    if address.startswith("ray://"):
        raise ClusterError(
            f"'{address}' is a Ray Client address; job submission talks to the dashboard: "
            f"use http://HOST:{DEFAULT_DASHBOARD_PORT}"
        )
    return address


def is_loopback(address: str) -> bool:
    """Whether an address (URL or host:port) points at this machine's loopback interface."""
    host = urlparse(address if "://" in address else f"//{address}").hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:  # a hostname: loopback only if it resolves to loopback (e.g. an /etc/hosts alias)
        return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
    except (OSError, ValueError):
        return False


def resolve_address(
    address: str | None, config_address: str | None = None, environ: Mapping[str, str] | None = None
) -> tuple[str, str]:
    """Pick the Jobs API address and say where it came from.

    Args:
        address: ``--address``.
        config_address: ``ray.address`` from the job's settings; used only when it is an
            ``http(s)://`` URL (a GCS address there is meant for ``ray.init``).
        environ: Environment (defaults to ``os.environ``).

    Raises:
        ClusterError: no address anywhere and no (or several) local heads.
    """
    environ = os.environ if environ is None else environ
    if address:
        return normalize_address(address), "--address"
    if environ.get("RAY_ADDRESS"):
        return normalize_address(environ["RAY_ADDRESS"]), "RAY_ADDRESS"
    if config_address and config_address.startswith(("http://", "https://")):
        return normalize_address(config_address), "ray.address in the configuration"
    from ragops.cluster.localhead import running_heads

    heads = running_heads(environ)
    if len(heads) == 1:
        return heads[0].dashboard_url, "the local head (ragops cluster up)"
    if len(heads) > 1:
        urls = ", ".join(h.dashboard_url for h in heads)
        raise ClusterError(f"several local Ray heads are running ({urls}): pick one with --address")
    raise ClusterError(
        "no Ray cluster address: pass --address http://HOST:8265, set RAY_ADDRESS, or set ray.address "
        "in the configuration; `ragops cluster up` starts a local head"
    )


def resolve_token(address: str, environ: Mapping[str, str] | None = None) -> tuple[str | None, str | None]:
    """The token to send to ``address`` and where it came from (never the token in messages).

    Order: the token file of a local head started for exactly this address; ``RAY_AUTH_TOKEN``;
    the file named by ``RAY_AUTH_TOKEN_PATH``; ``~/.ray/auth_token`` when
    ``RAY_AUTH_MODE=token``. ``RAY_AUTH_MODE=disabled`` keeps only the first.

    Raises:
        AuthError: ``RAY_AUTH_TOKEN_PATH`` names a file that cannot be read or is empty.
    """
    environ = os.environ if environ is None else environ
    from ragops.cluster.localhead import head_for_address

    head = head_for_address(address, environ)
    if head is not None and head.token_file.is_file():
        return _read_token(head.token_file, "the local head's token file"), f"local head token file {head.token_file}"
    mode = (environ.get("RAY_AUTH_MODE") or "").lower()
    if mode == "disabled":
        return None, None
    if environ.get("RAY_AUTH_TOKEN", "").strip():
        return environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    if environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        return _read_token(path, "RAY_AUTH_TOKEN_PATH"), f"RAY_AUTH_TOKEN_PATH ({path})"
    default = Path(environ.get("HOME", str(Path.home()))) / ".ray" / "auth_token"
    if mode == "token" and default.is_file():
        return _read_token(default, "the default token file"), f"{default}"
    return None, None


def _read_token(path: Path, what: str) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise AuthError(f"cannot read {what} {path}: {exc.strerror}") from None
    if not token:
        raise AuthError(f"{what} {path} is empty")
    return token


def connect(
    address: str | None = None, config_address: str | None = None, environ: Mapping[str, str] | None = None
) -> Connection:
    """Resolve the address and the token in one go (no network access)."""
    addr, source = resolve_address(address, config_address, environ)
    token, token_source = resolve_token(addr, environ)
    return Connection(addr, source, token, token_source)


def auth_error(conn: Connection, status: int | None = None) -> AuthError:
    """The message for a refused request: which token is missing or wrong, and how to fix it."""
    if conn.token is None or status == 401:
        return AuthError(
            f"the Ray dashboard at {conn.address} requires a token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
            "(or RAY_AUTH_TOKEN_PATH, or the file ~/.ray/auth_token) to the cluster's token. On KubeRay it is "
            "the `auth_token` key of the cluster's auth Secret; for `ragops cluster up` it is found automatically"
        )
    return AuthError(
        f"the Ray dashboard at {conn.address} rejected the token from {conn.token_source}: it is not this "
        "cluster's token. Set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the right one"
    )


def unreachable(conn: Connection, detail: str = "") -> ClusterError:
    """The message for a dashboard that does not answer."""
    hint = " (is it up? `ragops cluster up` starts a local head)" if conn.is_local else ""
    extra = f": {detail}" if detail else ""
    return ClusterError(f"cannot reach the Ray dashboard at {conn.address} (from {conn.source}){hint}{extra}")


def http_json(conn: Connection, path: str, params: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> Any:
    """GET a dashboard endpoint and decode its JSON, with clear auth and connection errors.

    Used for the State API (``/api/v0/nodes``), which the Job SDK does not cover.
    """
    import requests

    if not conn.is_http:
        raise ClusterError(f"'{conn.address}' is not a dashboard URL (http://HOST:{DEFAULT_DASHBOARD_PORT})")
    try:
        r = requests.get(conn.address + path, params=dict(params or {}), headers=conn.headers, timeout=timeout_s)
    except requests.RequestException as exc:
        raise unreachable(conn, type(exc).__name__) from None
    if r.status_code in (401, 403):
        raise auth_error(conn, r.status_code)
    if r.status_code != 200:
        raise ClusterError(f"the Ray dashboard at {conn.address} answered {path} with HTTP {r.status_code}")
    try:
        return r.json()
    except ValueError:
        raise ClusterError(f"the Ray dashboard at {conn.address} answered {path} with something other than JSON") from None


def alive_nodes(conn: Connection) -> list[dict[str, Any]]:
    """The cluster's alive nodes from the State API (``GET /api/v0/nodes``), through the dashboard.

    ``ray.nodes()`` needs a driver connected to the cluster; the State API answers remotely over
    the same HTTP endpoint and token as the Jobs API.
    """
    params = {
        "limit": 10000,
        "detail": "false",
        "filter_keys": "state",
        "filter_predicates": "=",
        "filter_values": "ALIVE",
    }
    body = http_json(conn, "/api/v0/nodes", params)
    try:
        if body.get("result") is False:
            raise ClusterError(f"the Ray State API at {conn.address} failed: {body.get('msg')}")
        return list(body["data"]["result"]["result"])
    except (KeyError, TypeError, AttributeError):
        raise ClusterError(f"unexpected answer from the Ray State API at {conn.address}") from None
