"""Which model names the API serves, and how a name maps to a generator.

* The base model answers to ``serve.model_name`` (``ragops``) and to ``generator.model``.
* LoRA adapters answer to the names in ``serve.generator.adapters`` (served name → adapter
  path or registry reference), and to the generator artifacts of the trained-adapter registry
  (:mod:`ragops.artifacts`, imported lazily so serving works without it) by name or alias.
* A request for an adapter is routed with Ray Serve model multiplexing. For a registry
  reference the multiplexed model id is the *artifact name* the reference resolves to now, so
  promoting or rolling back an alias takes effect on the next request: the new version is
  loaded on demand and the old one ages out of the replicas' LRU cache. Alias lookups are
  cached for :data:`ALIAS_TTL_S` seconds.
* The generator replica builds a :class:`~ragops.retrieval.generation.Generator` for a model
  id with :func:`ragops.artifacts.apply_model`: the artifact's adapter folder on the base model
  it was trained on (an adapter merged into another base would produce garbage).
* A name that looks like a filesystem path is never resolved from a request (a client could
  otherwise load arbitrary folders); list it under ``serve.generator.adapters`` instead.
* A name with a traffic split (``serve.routes`` or the registry's stored routes, see
  :mod:`ragops.serve.routing`) first picks its variant for the user, then resolves that
  variant as above. Stored routes are re-read every :data:`ALIAS_TTL_S` seconds.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ragops.config import GeneratorConfig, Settings
from ragops.errors import InputError, ModelNotFoundError
from ragops.serve.routing import RouteStore, assign, check_weights

log = logging.getLogger(__name__)

BASE = ""  # the multiplexed model id of the base model (no adapter)
#: Seconds a registry name/alias → artifact resolution is reused.
ALIAS_TTL_S = 5.0
_GENERATOR_TASK = "causal-lm"


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~")) or "/" in name or "\\" in name or Path(name).is_absolute()


def _artifacts() -> Any:
    try:
        from ragops import artifacts  # type: ignore[attr-defined]
    except ImportError:
        return None
    return artifacts


class ModelCatalog:
    """Served model names for one configuration.

    Args:
        settings: The app's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_names = {settings.serve.model_name, settings.generator.model}
        self.embedding_names = {settings.serve.embedding_model_name, settings.embedder.model}
        self._resolved: dict[str, tuple[float, str | None]] = {}
        self._routes: tuple[float, dict[str, dict[str, float]]] | None = None
        self._lock = threading.Lock()

    def _registry(self) -> Any:
        artifacts = _artifacts()
        return artifacts.Registry.from_settings(self.settings) if artifacts is not None else None

    def _registry_artifact(self, ref: str) -> str | None:
        """The generator artifact a registry name or alias points at now (None: not one)."""
        now = time.monotonic()
        with self._lock:
            hit = self._resolved.get(ref)
        if hit is not None and now - hit[0] < ALIAS_TTL_S:
            return hit[1]
        name: str | None = None
        registry = self._registry()
        if registry is not None:
            try:
                art = registry.get(ref)
                name = art.name if art.task == _GENERATOR_TASK else None
            except ModelNotFoundError:
                name = None
            except Exception as exc:  # noqa: BLE001 - a broken registry must not break the base model
                log.warning("registry lookup of '%s' failed: %s", ref, exc)
                name = None
        with self._lock:
            self._resolved[ref] = (now, name)
        return name

    def resolve_chat_model(self, name: str) -> str:
        """The multiplexed model id for a requested chat model (``''`` for the base model).

        Raises:
            ModelNotFoundError: the name is neither the base model nor a served adapter.
        """
        if name in self.base_names:
            return BASE
        if name in self.settings.serve.generator.adapters:
            return name
        if _looks_like_path(name):
            raise ModelNotFoundError(f"model '{name}' is not served")
        artifact = self._registry_artifact(name)
        if artifact is None:
            raise ModelNotFoundError(f"model '{name}' is not served")
        return artifact

    # -- traffic splits ----------------------------------------------------------------

    def route_store(self) -> RouteStore | None:
        """The registry's stored routes (None when the registry module is not installed)."""
        registry = self._registry()
        return RouteStore(registry.storage) if registry is not None else None

    def routes(self, *, fresh: bool = False) -> dict[str, dict[str, float]]:
        """Effective splits: ``serve.routes`` overlaid with the registry's stored routes.

        A registry that cannot be read keeps the last routes seen (the config's at first):
        a storage hiccup must not move users between variants.
        """
        now = time.monotonic()
        with self._lock:
            cached = self._routes
        if cached is not None and not fresh and now - cached[0] < ALIAS_TTL_S:
            return cached[1]
        routes = {k: dict(v) for k, v in self.settings.serve.routes.items()}
        try:
            store = self.route_store()
            if store is not None:
                routes.update(store.weights())
        except Exception as exc:  # noqa: BLE001
            log.warning("reading the stored routes failed: %s", exc)
            if cached is not None:
                routes = cached[1]
        with self._lock:
            self._routes = (now, routes)
        return routes

    def route(self, name: str, user: str | None) -> tuple[str, str]:
        """The multiplexed model id and the variant that answer ``name`` for ``user``.

        Without a split the variant is what answers: the artifact the name resolves to, a
        configured adapter's name, or the base model.

        Raises:
            ModelNotFoundError: the name (or the variant its split picked) is not served.
        """
        weights = self.routes().get(name)
        if weights:
            variant = assign(name, weights, user)
            return self.resolve_chat_model(variant), variant
        model_id = self.resolve_chat_model(name)
        return model_id, model_id or self.settings.generator.model

    def is_served(self, name: str) -> bool:
        """Whether ``name`` resolves to a chat model now (no cached answer is used)."""
        with self._lock:
            self._resolved.pop(name, None)
        try:
            self.resolve_chat_model(name)
            return True
        except ModelNotFoundError:
            return False

    def set_route(self, name: str, weights: dict[str, float] | None, *, by: str, note: str | None = None) -> dict[str, Any]:
        """Change the split of ``name`` at runtime (None clears the stored split).

        Each variant must be served and must not itself be split (a split of splits would
        make stickiness and reports meaningless).

        Raises:
            InputError: bad weights, an unknown or split variant, or no registry to store in.
        """
        store = self.route_store()
        if store is None:
            raise InputError("runtime splits are stored in the registry, which is not installed here")
        if weights is None:
            old = store.clear(name, by=by, note=note)
        else:
            clean = check_weights(weights, known=self.is_served)
            # A variant named like the route itself is its unsplit meaning (e.g. alias prod in
            # prod's own split); another split name would silently bypass that split.
            routed = [v for v in clean if v in self.routes(fresh=True) and v != name]
            if routed:
                raise InputError(f"variant(s) {', '.join(routed)} are split themselves; a variant must be one model")
            old = store.weights().get(name)
            store.set(name, clean, by=by, note=note)
        effective = self.routes(fresh=True)
        return {"name": name, "weights": effective.get(name), "previous": old,
                "source": "registry" if name in store.weights() else "config" if name in effective else None}  # fmt: skip

    def generator_config(self, model_id: str) -> GeneratorConfig:
        """The generator settings of a multiplexed model id: adapter and the base it needs."""
        ref = self.settings.serve.generator.adapters.get(model_id, model_id)
        artifacts = _artifacts()
        if artifacts is None:
            return self.settings.generator.model_copy(update={"adapter": ref})
        return artifacts.apply_model(self.settings, ref).generator

    def list_chat_models(self) -> list[dict[str, Any]]:
        """Base model and adapters as ``{id, root, parent}`` (registry adapters when available)."""
        s = self.settings
        out = [{"id": s.serve.model_name, "root": s.generator.model, "parent": None}]
        if s.generator.model != s.serve.model_name:
            out.append({"id": s.generator.model, "root": s.generator.model, "parent": None})
        for name, ref in s.serve.generator.adapters.items():
            out.append({"id": name, "root": ref, "parent": s.generator.model})
        out.extend(registry_adapters(s))
        unique: dict[str, dict[str, Any]] = {}
        for m in out:
            unique.setdefault(m["id"], m)  # the first entry of a name wins (base, then config, then registry)
        return list(unique.values())


def registry_adapters(settings: Settings) -> list[dict[str, Any]]:
    """The registry's generator artifacts and their aliases as model entries ([] without a registry).

    Any failure lists nothing: ``/v1/models`` must not fail because the registry does.
    """
    artifacts = _artifacts()
    if artifacts is None:
        return []
    try:
        registry = artifacts.Registry.from_settings(settings)
        arts = [a for a in registry.list() if a.task == _GENERATOR_TASK]
        aliases = registry.aliases()
    except Exception as exc:  # noqa: BLE001
        log.warning("listing registry adapters failed: %s", exc)
        return []
    by_name = {a.name: a for a in arts}
    out = [
        {"id": alias, "root": rec["target"], "parent": by_name[rec["target"]].base_model}
        for alias, rec in sorted(aliases.items())
        if rec.get("target") in by_name
    ]
    out += [{"id": a.name, "root": a.name, "parent": a.base_model} for a in reversed(arts)]
    return out
