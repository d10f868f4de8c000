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
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from ragops.config import GeneratorConfig, Settings
from ragops.errors import ModelNotFoundError

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
