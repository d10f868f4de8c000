"""``ragops models``: built-in models and the registry of trained artifacts.

Registered by the CLI as ``app.add_typer(models_app, name="models")``:

* ``list`` — packaged / hub models (and whether they load here) and published artifacts with
  their aliases;
* ``show NAME`` — one artifact (by name or alias) or built-in model;
* ``promote NAME --alias ALIAS [--require-metric M] [--baseline REF]`` — point an alias at an
  artifact, refusing when the recorded metric is worse than the baseline's;
* ``rollback ALIAS`` — move an alias back to its previous target.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Optional

import typer
from rich.table import Column, Table

from ragops.commands.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    SetOpt,
    emit_json,
    handle_errors,
    out,
    settings_from,
)

models_app = typer.Typer(help="Built-in models and trained artifacts (versioned adapters, aliases).", no_args_is_help=True)

#: Metrics shown in the artifact table when present.
_HEADLINE = ("eval_loss", "eval_pairwise_accuracy", "answer_f1")


def _headline(metrics: dict[str, Any]) -> str:
    parts = [f"{k}={metrics[k]:.4g}" for k in _HEADLINE if isinstance(metrics.get(k), (int, float))]
    return ", ".join(parts) or "-"


@models_app.command("list")
@handle_errors
def models_list(
    config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List built-in models (source, availability) and trained artifacts with their aliases."""
    from ragops.artifacts import Registry
    from ragops.model_registry import list_models

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    models = list_models()
    aliases = registry.aliases()
    artifacts = []
    for art in registry.list():
        artifacts.append(
            {
                "name": art.name, "kind": art.kind, "task": art.task, "base_model": art.base_model,
                "created_at": art.created_at, "aliases": registry.aliases_of(art.name), "metrics": art.metrics,
                "run_id": art.run_id, "parent": art.parent,
            }
        )  # fmt: skip
    if as_json:
        emit_json({"models": models, "artifacts": artifacts, "aliases": {k: v.get("target") for k, v in aliases.items()}})
        return
    table = Table("name", "kind", "source", "available", "description", title="built-in models", title_justify="left")
    for r in models:
        table.add_row(r["name"], r["kind"], r["source"], "yes" if r["available"] else "no", r["description"])
    out.print(table)
    if not artifacts:
        out.print(f"no trained artifacts in {registry.storage.uri()} (train one with `ragops train sft --data FILE`)")
        return
    arts = Table(Column("name", no_wrap=True), "kind", "base model", "created", "aliases", "metrics", title="trained artifacts", title_justify="left")
    for a in artifacts:
        arts.add_row(a["name"], a["kind"], a["base_model"], a["created_at"], ", ".join(a["aliases"]) or "-", _headline(a["metrics"]))
    out.print(arts)


@models_app.command("show")
@handle_errors
def models_show(
    name: Annotated[str, typer.Argument(help="Artifact name or alias, or a built-in model name.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show an artifact (manifest, aliases, alias history, files) or a built-in model."""
    from ragops.artifacts import Registry
    from ragops.errors import ModelNotFoundError
    from ragops.model_registry import list_models

    registry = Registry.from_settings(settings_from(config, set_, data_dir))
    if not registry.has(name):
        builtin = next((m for m in list_models() if m["name"] == name), None)
        if builtin is None:
            registry.resolve(name)  # raises with the registry's message
            raise ModelNotFoundError(name)
        if as_json:
            emit_json({"model": builtin})
        else:
            out.print(_kv_table(builtin, f"model {name}"))
        return
    art = registry.get(name)
    data = {
        **art.to_dict(),
        "aliases": registry.aliases_of(art.name),
        "location": registry.storage.uri("artifacts", art.name),
        "resolved_from": name if name != art.name else None,
    }
    if as_json:
        emit_json(data)
        return
    summary = {k: data[k] for k in ("name", "kind", "task", "base_model", "created_at", "parent", "run_id", "data_hash", "location")}
    summary["aliases"] = ", ".join(data["aliases"]) or "-"
    summary["code_version"] = " ".join(f"{k}={v}" for k, v in art.code_version.items())
    summary["files"] = ", ".join(art.files)
    out.print(_kv_table(summary, f"artifact {art.name}"))
    if art.metrics:
        out.print(_kv_table(art.metrics, "metrics"))
    if art.evals:
        evals = Table("at", "source", "metrics", title="evaluations", title_justify="left")
        for e in art.evals:
            evals.add_row(e["at"], e.get("source", ""), json.dumps(e["metrics"]))
        out.print(evals)


def _kv_table(data: dict[str, Any], title: str) -> Table:
    table = Table(show_header=False, title=title, title_justify="left")
    for k, v in data.items():
        if isinstance(v, float):
            v = f"{v:.6g}"
        table.add_row(str(k), json.dumps(v) if isinstance(v, (dict, list)) else str(v))
    return table


def _mirror_alias(settings: Any, registry: Any, alias: str) -> None:
    """Move the alias in MLflow's model registry too, when ``tracking.mlflow_uri`` is set (warns, never fails)."""
    from ragops.tracking.mlflow_tracker import MlflowTracker

    tracker = MlflowTracker.from_settings(settings)
    if tracker is not None:
        tracker.mirror_alias(registry, alias)
        tracker.close()


@models_app.command("promote")
@handle_errors
def models_promote(
    name: Annotated[str, typer.Argument(help="Artifact name (or an alias to copy from).")],
    alias: Annotated[str, typer.Option("--alias", help="Alias to point at it (e.g. prod, staging).")],
    require_metric: Annotated[
        Optional[str],
        typer.Option("--require-metric", help="Refuse if this recorded metric is worse than the baseline's (e.g. answer_f1, eval_loss)."),
    ] = None,
    baseline: Annotated[
        Optional[str], typer.Option("--baseline", help="Alias or name to compare with (default: the alias's current target).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point ALIAS at NAME (the move is logged; `rollback` undoes it).

    With --require-metric, the direction comes from the metric's name: losses, errors and
    latencies (eval_loss, latency_ms, total_s) must not rise, everything else must not fall.
    """
    from ragops.artifacts import Registry

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    result = registry.promote(name, alias, require_metric=require_metric, baseline=baseline)
    _mirror_alias(settings, registry, alias)
    data = {"alias": result.alias, "target": result.name, "previous": result.previous, "gate": result.gate}
    if as_json:
        emit_json(data)
        return
    moved = f"{result.previous} → {result.name}" if result.previous else result.name
    out.print(f"{alias}: {moved}")
    if result.gate:
        out.print(f"gate: {result.gate['reason']}")


@models_app.command("rollback")
@handle_errors
def models_rollback(
    alias: Annotated[str, typer.Argument(help="Alias to move back to its previous target.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move ALIAS back to the artifact it pointed at before its last promotion or publish."""
    from ragops.artifacts import Registry

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    result = registry.rollback(alias)
    _mirror_alias(settings, registry, alias)
    if as_json:
        emit_json({"alias": result.alias, "target": result.name, "previous": result.previous})
        return
    out.print(f"{alias}: {result.previous} → {result.name} (rolled back)")
