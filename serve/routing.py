"""Traffic splits: one public model name answered by several variants, by weight, sticky per user.

A *route* maps a served name (``ragops``, a registry alias such as ``prod``) to weights over
*variants*: anything the API serves by name (a registry artifact or alias, a configured
adapter, the base model), e.g. ``{"sft-v3": 0.9, "ppo-v1": 0.1}``. Routes come from two places:

* ``serve.routes`` in the config: the split a server starts with;
* the registry's ``routes.json`` (:class:`RouteStore`), written by ``ragops serve split``
  (through ``POST /v1/admin/routes``) and by ``ragops loop``. A stored route overrides the
  config's route of the same name, takes effect without a restart (every ingress replica
  re-reads it within :data:`ragops.serve.models.ALIAS_TTL_S` seconds; the replica that took the
  admin call at once), and keeps a log of every change. Clearing it restores the config's.

Assignment (:func:`assign`) hashes ``name + user`` to a point in [0, 1) and walks the weights
in sorted variant order: the same user gets the same variant while the weights stand, users
spread by weight, and moving weight from A to B moves only users from A to B (a user already
on B stays). Without a user id every request draws afresh.

Pure Python (no Ray, no FastAPI): the ingress, the CLI and the loop share it.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ragops.errors import InputError

if TYPE_CHECKING:
    from ragops.storage import Storage

ROUTES_FILE = "routes.json"
#: How far weights may be from summing to 1 (text like 0.33,0.33,0.34 is fine).
SUM_TOLERANCE = 1e-6
#: Entries of a route's change log kept in routes.json.
LOG_LIMIT = 200


def parse_weights(text: str) -> dict[str, float]:
    """``"sft-v3=0.9,ppo-v1=0.1"`` → ``{"sft-v3": 0.9, "ppo-v1": 0.1}`` (validated for shape).

    Raises:
        InputError: an item without ``=``, a weight that is not a number, a variant twice.
    """
    weights: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"weights: '{item}' is not VARIANT=WEIGHT (e.g. sft-v3=0.9,ppo-v1=0.1)")
        try:
            weights_value = float(value)
        except ValueError:
            raise InputError(f"weights: '{value.strip()}' (for {name}) is not a number") from None
        if name in weights:
            raise InputError(f"weights: variant '{name}' is given twice")
        weights[name] = weights_value
    return check_weights(weights)


def check_weights(weights: Mapping[str, Any], *, known: Callable[[str], bool] | None = None) -> dict[str, float]:
    """Validate a split's weights: at least one variant, each ≥ 0 and finite, summing to 1.

    Args:
        weights: Variant → weight.
        known: Tells whether a variant is served; unknown ones are refused (None: not checked).

    Returns:
        The weights as floats, in the given order.

    Raises:
        InputError: naming the first problem.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise InputError("a split needs at least one variant with a weight (e.g. sft-v3=0.9,ppo-v1=0.1)")
    clean: dict[str, float] = {}
    for name, value in weights.items():
        if not isinstance(name, str) or not name.strip():
            raise InputError("a split's variant names must be non-empty strings")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"the weight of '{name}' must be a number, not {value!r}")
        if value < 0:
            raise InputError(f"the weight of '{name}' is negative ({value}); weights must be >= 0")
        clean[name] = float(value)
    total = sum(clean.values())
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise InputError(f"the weights sum to {total:.6g}, not 1 ({', '.join(f'{k}={v:g}' for k, v in clean.items())})")
    if known is not None:
        unknown = [n for n in clean if not known(n)]
        if unknown:
            raise InputError(f"unknown variant(s) {', '.join(repr(u) for u in unknown)}: not an artifact, alias or served model")
    return clean


def _unit(name: str, user: str) -> float:
    """A stable point in [0, 1) for (route, user): 64 bits of SHA-256."""
    digest = hashlib.sha256(f"{name}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign(name: str, weights: Mapping[str, float], user: str | None, *, rng: random.Random | None = None) -> str:
    """The variant that answers ``user`` on route ``name``.

    Variants with weight 0 are never chosen. Sorting the variants makes the choice independent
    of how the weights were written.
    """
    point = _unit(name, user) if user else (rng or random).random()
    live = [(v, w) for v, w in sorted(weights.items()) if w > 0]
    if not live:
        raise InputError(f"route '{name}' has no variant with a positive weight")
    total = sum(w for _, w in live)
    edge = 0.0
    for variant, weight in live:
        edge += weight / total
        if point < edge:
            return variant
    return live[-1][0]  # rounding: the point lies past the last edge


class RouteStore:
    """The runtime routes in the registry (``routes.json``): ``{name: {"weights", "updated_at", "log"}}``.

    Args:
        storage: The registry's storage (local folder or object store).
    """

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def all(self) -> dict[str, dict[str, Any]]:
        """Every stored route record (cleared routes are absent)."""
        data = self.storage.read_json(ROUTES_FILE) or {}
        return {k: v for k, v in data.items() if isinstance(v, dict) and v.get("weights")}

    def weights(self) -> dict[str, dict[str, float]]:
        """``{name: weights}`` of the stored routes."""
        return {k: dict(v["weights"]) for k, v in self.all().items()}

    def set(self, name: str, weights: Mapping[str, float], *, by: str = "cli", note: str | None = None) -> dict[str, Any]:
        """Store (replace) the weights of route ``name``; returns the route's record.

        The weights must have been validated (:func:`check_weights`) by the caller, who knows
        what is served.
        """
        from ragops.artifact_manifest import utc_now

        clean = check_weights(weights)
        with self.storage.lock(ROUTES_FILE):
            data = self.storage.read_json(ROUTES_FILE) or {}
            rec = data.get(name) or {"weights": None, "log": []}
            entry = {"at": utc_now(), "by": by, "from": rec.get("weights"), "to": clean, **({"note": note} if note else {})}
            rec.update(weights=clean, updated_at=entry["at"])
            rec["log"] = [*rec.get("log", []), entry][-LOG_LIMIT:]
            data[name] = rec
            self.storage.write_json(ROUTES_FILE, data)
        return rec

    def clear(self, name: str, *, by: str = "cli", note: str | None = None) -> dict[str, float] | None:
        """Remove the stored split of ``name`` (its log is kept); returns the weights it had."""
        from ragops.artifact_manifest import utc_now

        with self.storage.lock(ROUTES_FILE):
            data = self.storage.read_json(ROUTES_FILE) or {}
            rec = data.get(name)
            if not rec or not rec.get("weights"):
                return None
            old = rec["weights"]
            entry = {"at": utc_now(), "by": by, "from": old, "to": None, **({"note": note} if note else {})}
            rec.update(weights=None, updated_at=entry["at"])
            rec["log"] = [*rec.get("log", []), entry][-LOG_LIMIT:]
            self.storage.write_json(ROUTES_FILE, data)
        return dict(old)

    def history(self, name: str) -> list[dict[str, Any]]:
        """The change log of route ``name``, oldest first."""
        data = self.storage.read_json(ROUTES_FILE) or {}
        return list((data.get(name) or {}).get("log", []))
