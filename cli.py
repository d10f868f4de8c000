"""ragops command-line interface: a thin typer layer.

Each command parses its options, loads settings, calls one library function and renders the
result (a rich table for people, ``--json`` for scripts). Errors that carry a user message
(:class:`ragops.errors.RagopsError`) print as one line on stderr with a non-zero exit code;
no traceback. Progress goes to stderr so ``--json`` output on stdout stays parseable.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.commands.common import (
    CollectionOpt,
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
from ragops.config import dump_yaml

app = typer.Typer(
    name="ragops",
    help="Documents → Ray Data → Qdrant → retrieval + generation → Ray Serve. "
    "Embedded defaults: nothing to start by hand.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
index_app = typer.Typer(help="Inspect or drop a collection.", no_args_is_help=True)
models_app = typer.Typer(help="Models ragops knows and where their weights come from.", no_args_is_help=True)
config_app = typer.Typer(help="Show or validate configuration.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

def _quiet_libraries() -> None:
    # Library chatter (HF load bars, Ray info) would drown the CLI's own output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("ray", "ray.data", "ray.serve", "ray.train", "ray.tune"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001 - transformers missing is reported where it is needed
        pass


# -- ingest ------------------------------------------------------------------------------
@app.command()
@handle_errors
def ingest(
    paths: Annotated[list[str], typer.Argument(help="Files, folders or URIs (s3://...) to ingest.")],
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    prune: Annotated[bool, typer.Option("--prune", help="Delete documents that are gone from the source.")] = False,
    runner: Annotated[
        Optional[str], typer.Option("--runner", help="'ray' (Ray Data, default) or 'local' (in-process).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Load, chunk, embed and write documents into Qdrant, incrementally.

    Unchanged documents are skipped before embedding; changed ones replace their old chunks;
    --prune deletes documents that disappeared. Failed files are listed and make the exit
    status non-zero, but every other document is still ingested.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ragops.ingest.pipeline import run_ingest

    overrides = list(set_ or [])
    if runner:
        overrides.append(f"ingest.runner={runner}")
    settings = settings_from(config, overrides, data_dir)
    progress = Progress(
        TextColumn("[bold]ingest[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("files · {task.fields[chunks]} chunks · {task.fields[rate]:.0f} points/s"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    with progress:
        task = progress.add_task("ingest", total=None, chunks=0, rate=0.0)

        def on_progress(p: dict[str, Any]) -> None:
            rate = p["points"] / p["elapsed"] if p["elapsed"] else 0.0
            progress.update(task, completed=p["files_done"], total=p["files"], chunks=p["chunks"], rate=rate)

        report = run_ingest(settings, paths, collection=collection, prune=prune, progress=on_progress)
    data = report.to_dict()
    if as_json:
        emit_json(data)
    else:
        _print_ingest_summary(data)
    if not report.ok:
        raise typer.Exit(1)


def _print_ingest_summary(d: dict[str, Any]) -> None:
    table = Table(title=f"ingest → {d['collection']}", show_header=False, title_justify="left")
    for key in ("new", "updated", "unchanged", "deleted", "failed_count", "chunks", "points_written"):
        table.add_row(key.replace("_count", ""), str(d[key]))
    table.add_row("duration", f"{d['duration_s']:.1f} s ({d['points_per_s']:.0f} points/s)")
    out.print(table)
    for f in d["failed"]:
        err.print(f"[red]failed[/] {f['source']}: {f['reason']}", highlight=False)
    for doc_id in d["incomplete"]:
        err.print(f"[red]incomplete[/] {doc_id}: not all chunks were written; run ingest again", highlight=False)


# -- index -------------------------------------------------------------------------------
@index_app.command("stats")
@handle_errors
def index_stats(
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Print {collection, documents, points, dim, embedder, last_ingest}."""
    from ragops.index import collection_stats

    stats = collection_stats(settings_from(config, set_, data_dir), collection)
    if as_json:
        emit_json(stats)
        return
    table = Table(show_header=False)
    for k, v in stats.items():
        table.add_row(k, json.dumps(v, default=str) if isinstance(v, (dict, list)) else str(v))
    out.print(table)


@index_app.command("drop")
@handle_errors
def index_drop(
    collection: Annotated[str, typer.Option("--collection", help="Collection to delete (required).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a collection and its points (its manifest history is kept)."""
    from ragops.index import drop_collection

    dropped = drop_collection(settings_from(config, set_, data_dir), collection)
    if as_json:
        emit_json({"collection": collection, "dropped": dropped})
    else:
        out.print(f"dropped {collection}" if dropped else f"collection {collection} did not exist")


# -- models ------------------------------------------------------------------------------
@models_app.command("list")
@handle_errors
def models_list(as_json: JsonOpt = False) -> None:
    """List known models, their source (packaged / hub / local) and whether they load here."""
    from ragops.model_registry import list_models

    rows = list_models()
    if as_json:
        emit_json({"models": rows})
        return
    table = Table("name", "kind", "source", "available", "description")
    for r in rows:
        table.add_row(r["name"], r["kind"], r["source"], "yes" if r["available"] else "no", r["description"])
    out.print(table)


# -- config ------------------------------------------------------------------------------
@config_app.command("show")
@handle_errors
def config_show(
    config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Print the effective settings after files, environment and --set."""
    settings = settings_from(config, set_, data_dir)
    if as_json:
        emit_json(settings.model_dump(mode="json"))
    else:
        out.print(dump_yaml(settings), highlight=False)


def main() -> None:
    """Entry point of the ``ragops`` console script."""
    _quiet_libraries()
    app()


if __name__ == "__main__":
    main()
