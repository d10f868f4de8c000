"""Which model names the API serves, and how a name maps to a generator.

* The base model answers to ``serve.model_name`` (``ragops``) and to ``generator.model``.
* LoRA adapters answer to the names in ``serve.generator.adapters`` (name → reference) and to
  the names/aliases of the trained-adapter registry (:mod:`ragops.artifacts`, imported lazily:
  serving works without it). A request for an adapter is routed with Ray Serve model
  multiplexing: the multiplexed model id is the served name, and the generator replica loads
  a :class:`~ragops.retrieval.generation.Generator` whose ``cfg.adapter`` is its reference
  (resolved by :func:`~ragops.retrieval.generation.resolve_adapter`).
* A name that looks like a filesystem path is never resolved from a request (it would let a
  client load arbitrary folders); list it under ``serve.generator.adapters`` instead.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ragops.config import Settings
from ragops.errors import ModelNotFoundError

log = logging.getLogger(__name__)

BASE = ""  # the multiplexed model id of the base model (no adapter)


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~")) or "/" in name or "\\" in name or Path(name).is_absolute()


class ModelCatalog:
    """Served model names for one configuration.

    Args:
        settings: The app's settings.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_names = {settings.serve.model_name, settings.generator.model}
        self.embedding_names = {settings.serve.embedding_model_name, settings.embedder.model}

    def adapter_ref(self, name: str) -> str:
        """What ``cfg.adapter`` is for a served adapter name."""
        return self.settings.serve.generator.adapters.get(name, name)

    def resolve_chat_model(self, name: str) -> str:
        """The multiplexed model id for a requested chat model (``''`` for the base model).

        Raises:
            ModelNotFoundError: the name is neither the base model nor a known adapter.
        """
        if name in self.base_names:
            return BASE
        if name in self.settings.serve.generator.adapters:
            return name
        if _looks_like_path(name):
            raise ModelNotFoundError(f"model '{name}' is not served")
        from ragops.retrieval.generation import resolve_adapter

        resolve_adapter(name)  # raises ModelNotFoundError for an unknown name
        return name

    def adapter_base(self, name: str) -> str:
        """The base model an adapter was trained on (registry), else the served base."""
        try:
            from ragops.artifacts import adapter_base  # type: ignore[import-not-found]
        except ImportError:
            return self.settings.generator.model
        try:
            base = adapter_base(self.adapter_ref(name))
        except Exception:  # noqa: BLE001 - not a registry adapter (a path, or the registry is broken)
            base = None
        return str(base) if base else self.settings.generator.model

    def list_chat_models(self) -> list[dict[str, Any]]:
        """Base model and adapters as ``{id, root, parent}`` (registry adapters when available)."""
        s = self.settings
        out = [{"id": s.serve.model_name, "root": s.generator.model, "parent": None}]
        if s.generator.model != s.serve.model_name:
            out.append({"id": s.generator.model, "root": s.generator.model, "parent": None})
        seen = {m["id"] for m in out}
        for name in list(s.serve.generator.adapters) + registry_adapters(s):
            if name not in seen:
                seen.add(name)
                out.append({"id": name, "root": self.adapter_ref(name), "parent": s.serve.model_name})
        return out


def registry_adapters(settings: Settings) -> list[str]:
    """Names and aliases of the registry's adapters; [] when there is no registry.

    Looks for ``ragops.artifacts.list_adapters`` and accepts what it returns: names, dicts
    with ``name``/``aliases``, or objects with those attributes. Any failure lists nothing
    (``/v1/models`` must not fail because the registry does).
    """
    try:
        from ragops import artifacts  # type: ignore[attr-defined]
    except ImportError:
        return []
    fn = getattr(artifacts, "list_adapters", None)
    if fn is None:
        return []
    entries: Any = None
    for call in (lambda: fn(data_dir=settings.data_dir), lambda: fn(settings), lambda: fn()):
        try:
            entries = call()
            break
        except TypeError:
            continue
        except Exception as exc:  # noqa: BLE001
            log.warning("listing registry adapters failed: %s", exc)
            return []
    names: list[str] = []
    for e in entries or []:
        if isinstance(e, str):
            names.append(e)
            continue
        get = e.get if isinstance(e, dict) else (lambda k, d=None, _e=e: getattr(_e, k, d))
        if get("name"):
            names.append(str(get("name")))
        names.extend(str(a) for a in (get("aliases") or []) if a)
    return list(dict.fromkeys(names))
