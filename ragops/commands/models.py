"""``ragops models``: built-in models and the registry of trained artifacts.

Registered by the CLI as ``app.add_typer(models_app, name="models")``:

* ``list`` — packaged / hub models (and whether they load here) and published artifacts with
  their aliases;
* ``show NAME`` — one artifact (by name or alias) or built-in model;
* ``promote NAME --alias ALIAS [--require-metric M] [--baseline REF]`` — point an alias at an
  artifact, refusing when the recorded metric is worse than the baseline's;
* ``rollback ALIAS`` — move an alias back to its previous target;
* ``package NAME [--quant q8_0] [--as NEW]`` — write a base model, or an adapter merged into its
  base, as a GGUF artifact (llama.cpp and transformers load it); ``promote --package QUANT``
  packages an adapter and promotes the package in one step.
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
    err,
    handle_errors,
    out,
    settings_from,
)

models_app = typer.Typer(help="Built-in models and trained artifacts (versioned adapters, aliases).", no_args_is_help=True)

#: Metrics shown in the artifact table when present.
_HEADLINE = ("eval_loss", "eval_pairwise_accuracy", "answer_f1")


def _headline(metrics: dict[str, Any], lineage: dict[str, Any] | None = None) -> str:
    parts = [f"{k}={metrics[k]:.4g}" for k in _HEADLINE if isinstance(metrics.get(k), (int, float))]
    if lineage:  # a packaged GGUF: its quantization and size say most about it
        parts.insert(0, f"{lineage.get('quant')} {_mib(lineage.get('size_bytes'))}")
    return ", ".join(parts) or "-"


def _mib(size: Any) -> str:
    return f"{size / 2**20:.1f} MiB" if isinstance(size, (int, float)) else "? MiB"


#: Progress-line text of each packaging stage.
_PACKAGE_STAGES = {
    "load": "loading the model (float32)", "merge": "merging the LoRA adapter", "tensors": "writing tensors",
    "quantize": "quantizing with llama.cpp", "commit": "hashing and committing",
}  # fmt: skip


@models_app.command("list")
@handle_errors
def models_list(
    config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """List built-in models (source, availability) and trained artifacts with their aliases.

    Also says which engine would decode the configured generator (``generator.engine``, the
    ``auto`` pick and why), as ``/healthz`` does for a running server.
    """
    from ragops.artifacts import Registry
    from ragops.errors import ConfigError
    from ragops.model_registry import list_models
    from ragops.retrieval.engines import choose_engine

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    models = list_models()
    g = settings.generator
    try:
        choice = choose_engine(g, need_fused=g.reader == "fid", registry=registry)
        engine, reason, gguf = choice.engine, choice.reason, str(choice.gguf_path) if choice.gguf_path else None
    except ConfigError as exc:  # an explicit engine that cannot run here: listed, not fatal
        engine, reason, gguf = None, str(exc), None
    generator = {"model": g.model, "adapter": g.adapter, "engine": engine, "reason": reason, "gguf": gguf}
    aliases = registry.aliases()
    artifacts = []
    for art in registry.list():
        artifacts.append(
            {
                "name": art.name, "kind": art.kind, "task": art.task, "base_model": art.base_model,
                "created_at": art.created_at, "aliases": registry.aliases_of(art.name), "metrics": art.metrics,
                "run_id": art.run_id, "parent": art.parent, "format": art.format, "lineage": art.lineage,
            }
        )  # fmt: skip
    if as_json:
        emit_json({"models": models, "artifacts": artifacts, "aliases": {k: v.get("target") for k, v in aliases.items()},
                   "generator": generator})  # fmt: skip
        return
    table = Table("name", "kind", "source", "available", "description", title="built-in models", title_justify="left")
    for r in models:
        table.add_row(r["name"], r["kind"], r["source"], "yes" if r["available"] else "no", r["description"])
    out.print(table)
    what = g.model + (f" + {g.adapter}" if g.adapter else "")
    out.print(f"generator: {what} runs on [bold]{engine}[/] ({reason})" if engine else f"generator: {what} cannot run here: {reason}",
              markup=engine is not None)  # fmt: skip
    if not artifacts:
        out.print(f"no trained artifacts in {registry.storage.uri()} (train one with `ragops train sft --data FILE`)")
        return
    arts = Table(Column("name", no_wrap=True), "kind", "base model", "created", "aliases", "metrics", title="trained artifacts", title_justify="left")
    for a in artifacts:
        arts.add_row(a["name"], a["kind"], a["base_model"], a["created_at"], ", ".join(a["aliases"]) or "-", _headline(a["metrics"], a["lineage"]))
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
    if art.is_gguf:
        summary["format"] = art.format
    out.print(_kv_table(summary, f"artifact {art.name}"))
    if art.lineage:
        lineage = {**art.lineage, "size": _mib(art.lineage.get("size_bytes"))}
        lineage["tools"] = " ".join(f"{k}={v}" for k, v in (art.lineage.get("tools") or {}).items())
        out.print(_kv_table(lineage, "lineage"))
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
    package: Annotated[
        Optional[str],
        typer.Option("--package", help="Package NAME as a GGUF of this quantization (f16, q8_0, q4_k_m) and promote the package."),
    ] = None,
    as_name: Annotated[Optional[str], typer.Option("--as", help="With --package: the package's name.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point ALIAS at NAME (the move is logged; `rollback` undoes it).

    With --require-metric, the direction comes from the metric's name: losses, errors and
    latencies (eval_loss, latency_ms, total_s) must not rise, everything else must not fall.
    With --package, NAME is packaged first (as `models package` does) and the GGUF artifact is
    promoted; it carries NAME's metrics, so the gate judges the model it was built from (and is
    checked before packaging).
    """
    from ragops.artifacts import Registry
    from ragops.errors import InputError

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    packaged = None
    if as_name and not package:
        raise InputError("--as names a package: use it with --package QUANT")
    if package:
        registry.check_gate(name, alias, require_metric=require_metric, baseline=baseline)
        packaged = _package(settings, registry, name, package, as_name)
        name = packaged.name
    result = registry.promote(name, alias, require_metric=require_metric, baseline=baseline)
    _mirror_alias(settings, registry, alias)
    data = {"alias": result.alias, "target": result.name, "previous": result.previous, "gate": result.gate}
    if packaged is not None:
        data["package"] = _package_summary(registry, packaged)
    if as_json:
        emit_json(data)
        return
    if packaged is not None:
        _print_package(packaged)
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


def _package(settings: Any, registry: Any, name: str, quant: str, as_name: str | None) -> Any:
    """Run :func:`ragops.packaging.package_model` under a progress display (bar or lines)."""
    from ragops.commands.progress import progress_display
    from ragops.packaging import package_model

    progress = progress_display(settings, "package", "{task.fields[stage]}", err)
    with progress:
        task = progress.add_task("package", total=None, stage="resolving")

        def on_progress(stage: str, done: int, total: int) -> None:
            # Counts go into the text, not the bar's total: loading the float32 weights takes
            # most of the time, so an ETA from tensor counts would be wrong by far.
            text = _PACKAGE_STAGES.get(stage, stage)
            progress.update(task, stage=f"{text} ({done}/{total})" if total else text)

        return package_model(name, registry=registry, quant=quant, name=as_name, progress=on_progress)


def _package_summary(registry: Any, art: Any) -> dict[str, Any]:
    return {
        "name": art.name, "kind": art.kind, "format": art.format, "base_model": art.base_model, "parent": art.parent,
        "aliases": registry.aliases_of(art.name), "location": registry.storage.uri("artifacts", art.name, "model", "model.gguf"),
        "lineage": art.lineage, "metrics": art.metrics,
    }  # fmt: skip


def _print_package(art: Any) -> None:
    lin = art.lineage
    source = f"{lin['base_model']} + {lin['adapter']}" if lin.get("adapter") else lin["base_model"]
    out.print(f"packaged {art.name}: {source} → {lin['quant']} GGUF, {_mib(lin['size_bytes'])}, sha256 {lin['sha256'][:12]}")


@models_app.command("package")
@handle_errors
def models_package(
    name: Annotated[
        str, typer.Argument(help="A built-in generator (smollm2-135m-instruct), a local HF model folder, or an sft/ppo artifact or alias.")
    ],
    quant: Annotated[str, typer.Option("--quant", help="Quantization: f16, q8_0 (default) or q4_k_m (needs llama-cpp-python).")] = "q8_0",
    as_name: Annotated[
        Optional[str], typer.Option("--as", help="Name of the new artifact (default gguf-YYYYMMDD-HHMM-xxxx).")
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Package NAME as a GGUF model artifact (an adapter is merged into its base), with lineage.

    The artifact (artifacts/<name>/model/model.gguf) moves the gguf-latest alias; serve or ask
    with it through --model NAME (or generator.model). Nothing is left behind on failure.
    """
    from ragops.artifacts import Registry

    settings = settings_from(config, set_, data_dir)
    registry = Registry.from_settings(settings)
    art = _package(settings, registry, name, quant, as_name)
    if as_json:
        emit_json(_package_summary(registry, art))
        return
    _print_package(art)
