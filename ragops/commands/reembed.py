"""``ragops index reembed``: recompute a collection's dense vectors, switch with no downtime."""

from __future__ import annotations

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


@handle_errors
def index_reembed(
    embedder: Annotated[
        Optional[str],
        typer.Option("--embedder", help="New embedder: registry name, local sentence-transformers folder, or published "
                     "embedder artifact (what embedder.model accepts)."),
    ] = None,
    rollback: Annotated[
        bool, typer.Option("--rollback", help="Move the alias back to the collection the live one replaced.")
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Chunks read, embedded and written per step.")] = 256,
    alias: Annotated[
        Optional[str],
        typer.Option("--alias", help="Alias to create/move (default: the collection's own name). Needed once for a "
                     "plain collection on a Qdrant server, which Qdrant cannot alias over."),
    ] = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Re-embed a collection with another embedder, then switch to it in one step.

    The chunks already in the index are read (no document is re-parsed or re-chunked), their
    dense vectors are recomputed with --embedder into a new collection (<name>__<embedder>-<n>);
    chunk ids, payloads and BM25 vectors are copied unchanged. Then the collection's name
    becomes an alias of the new collection, moved atomically: `ragops search`, `ragops ingest`
    and a running `ragops serve` (within a few seconds) use the new collection and its
    embedder, with no failed request. Commands follow the alias's embedder when embedder.model
    is left at its default or names an embedder the alias served before; another explicit
    embedder is refused with a message.

    Until the switch nothing served changes: a killed run leaves the old collection live, and
    rerunning the same command resumes the build. --rollback switches back to the previous
    collection (old collections stay until `ragops index drop --collection OLD`).

    Embedded (Edge) store: while `ragops serve` holds the live shard, its chunks are read from
    a copy of the shard's files (a server only reads them); while an ingest holds it, reembed
    is refused. Chunks keep the boundaries cut for the old embedder's tokenizer: an embedder
    with a shorter input limit truncates them (re-ingest to re-chunk). On a Qdrant server
    the alias is the server's own, so every client switches.

    --json prints {"action", "collection", "source", "target", "embedder", "dim",
    "previous_embedder", "previous_dim", "points", "written", "skipped", "removed",
    "fingerprints_updated", "fingerprints_kept", "resumed", "snapshot_read", "duration_s",
    "chunks_per_s"}.
    """
    from ragops.errors import InputError
    from ragops.ingest.reembed import rollback as do_rollback

    if rollback == bool(embedder):
        raise InputError("give either --embedder NAME (re-embed) or --rollback")
    settings = settings_from(config, set_, data_dir)
    if rollback:
        report = do_rollback(settings, collection=collection)
    else:
        assert embedder is not None
        report = _reembed_with_progress(settings, embedder, collection=collection, alias=alias, batch_size=batch_size)
    data = report.to_dict()
    if as_json:
        emit_json(data)
        return
    _print_report(data)


def _reembed_with_progress(settings: Any, embedder: str, **kwargs: Any) -> Any:
    from ragops.commands.progress import progress_display
    from ragops.ingest.reembed import run_reembed

    progress = progress_display(settings, "reembed", "chunks · {task.fields[rate]:.0f} chunks/s", err)
    with progress:
        task = progress.add_task("reembed", total=None, rate=0.0)

        def on_progress(p: dict[str, Any]) -> None:
            rate = p["done"] / p["elapsed"] if p["elapsed"] else 0.0
            progress.update(task, completed=p["done"], total=p["total"], rate=rate)

        return run_reembed(settings, embedder, progress=on_progress, **kwargs)


def _print_report(d: dict[str, Any]) -> None:
    title = f"{d['action']} → {d['collection']} now serves {d['target']}"
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_row("embedder", f"{d['previous_embedder']} (dim {d['previous_dim']}) → {d['embedder']} (dim {d['dim']})")
    table.add_row("from", d["source"])
    if d["action"] == "reembed":
        for key in ("points", "written", "skipped", "removed", "fingerprints_updated", "fingerprints_kept"):
            table.add_row(key, str(d[key]))
        table.add_row("duration", f"{d['duration_s']:.1f} s ({d['chunks_per_s']:.0f} chunks/s)")
        if d["snapshot_read"]:
            table.add_row("read", "from a copy of the shard (it was open in another process)")
    out.print(table)
    if d["action"] == "reembed":
        err.print(f"[dim]roll back with `ragops index reembed --rollback --collection {d['collection']}`[/]")
