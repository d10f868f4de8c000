"""Settings as ``RAGOPS_*`` environment variables: how a manifest carries its configuration.

The settings loader already reads ``RAGOPS_<SECTION>__<KEY>`` (and ``RAGOPS_HOME`` for
``data_dir``) with precedence *files < env < --set*. Rendering only the values that differ
from the defaults as pod environment variables keeps each manifest self-contained (no
ConfigMap to create, update or garbage-collect after ``ttlSecondsAfterFinished``), applies to
every pod of the cluster (drivers, Ray Data tasks, Serve replicas) and shows every setting in
the manifest itself.

Values are written so that the loader's YAML parsing gives back exactly the same value: plain
text when it round-trips, JSON otherwise (``"on"`` stays a string, lists stay lists). Free-form
mappings are written whole as JSON, because environment names lose the keys' case.
"""

from __future__ import annotations

import json
import re
from typing import Any

from pydantic import BaseModel, SecretStr

from ragops.config import ENV_PREFIX, HOME_ENV, Settings, _parse_scalar
from ragops.errors import ConfigError

_FIELD_KEY = re.compile(r"^[a-z][a-z0-9_]*$")


def env_value(value: Any) -> str:
    """The environment-variable text that the settings loader parses back into ``value``."""
    if isinstance(value, str) and _parse_scalar(value) == value and value == value.strip():
        return value
    if isinstance(value, (bool, int, float)) and not isinstance(value, str):
        text = json.dumps(value)
        if _parse_scalar(text) == value:
            return text
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def settings_overrides(settings: Settings) -> list[tuple[str, str]]:
    """``(dotted.key, value text)`` that rebuild ``settings`` from the built-in defaults.

    Starts from the values that differ from the defaults, then adds any value the loader would
    still get wrong: a partial override of a nested model rebuilds it from its *class*
    defaults, not from its field's default (``serve.ingress.autoscaling`` defaults to
    ``target_ongoing_requests=32``, but overriding only ``max_replicas`` yields 2.0), so
    those siblings must be spelled out too. Checked by loading the result.

    Raises:
        ConfigError: a secret (``SecretStr``) is set in the configuration: secrets go into the
            cluster's environment by reference, never into a manifest.
    """
    from ragops.config import load_settings

    _refuse_secrets(settings, "")
    target = settings.model_dump(mode="json")
    found: dict[str, str] = {}
    baseline = Settings.model_validate({}).model_dump(mode="json")
    for _ in range(8):
        diff: list[tuple[str, str]] = []
        for key in target:
            _walk([key], target[key], baseline.get(key), diff)
        if not diff:
            order = {k: i for i, k in enumerate(_leaf_keys(target))}
            return sorted(found.items(), key=lambda kv: order.get(kv[0], len(order)))
        found.update(diff)
        baseline = load_settings([], [f"{k}={v}" for k, v in found.items()], environ={}).model_dump(mode="json")
    raise ConfigError("these settings cannot be written as overrides (they do not load back the same)")


def _leaf_keys(tree: Any, path: tuple[str, ...] = ()) -> list[str]:
    if isinstance(tree, dict) and tree:
        keys = [".".join((*path, k)) for k in tree] if path else []
        for k, v in tree.items():
            keys += _leaf_keys(v, (*path, k))
        return keys
    return [".".join(path)]


def settings_env(settings: Settings) -> list[tuple[str, str]]:
    """``(NAME, value)`` environment variables that reproduce ``settings`` in a pod.

    ``data_dir`` becomes ``RAGOPS_HOME``; ``a.b.c`` becomes ``RAGOPS_A__B__C``.
    """
    return [
        (HOME_ENV if key == "data_dir" else ENV_PREFIX + key.replace(".", "__").upper(), value)
        for key, value in settings_overrides(settings)
    ]


def _walk(path: list[str], cur: Any, dflt: Any, out: list[tuple[str, str]]) -> None:
    if cur == dflt:
        return
    nested = (
        isinstance(cur, dict)
        and isinstance(dflt, dict)
        and all(_FIELD_KEY.match(k) and "__" not in k and k in dflt for k in cur)
    )
    if nested:
        for k, v in cur.items():
            _walk([*path, k], v, dflt.get(k), out)
        return
    out.append((".".join(path), env_value(cur)))


def _refuse_secrets(model: BaseModel, where: str) -> None:
    for name in type(model).model_fields:
        value = getattr(model, name)
        key = f"{where}.{name}" if where else name
        if isinstance(value, SecretStr):
            if value.get_secret_value():
                raise ConfigError(
                    f"config key '{key}' holds a secret: it cannot go into a manifest. Leave it unset and give the "
                    "pods the environment variable it is read from (a Kubernetes Secret, see docs/cluster.md)"
                )
        elif isinstance(value, BaseModel):
            _refuse_secrets(value, key)


def settings_from_env(pairs: list[tuple[str, str]]) -> Settings:
    """Load settings from rendered pairs alone (what a pod sees); used to check round trips."""
    from ragops.config import load_settings

    return load_settings(environ=dict(pairs))
