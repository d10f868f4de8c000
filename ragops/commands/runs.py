"""``ragops runs``: training runs, their tags and per-step metrics.

Registered by the CLI as ``app.add_typer(runs_app, name="runs")``:

* ``list [--tag k=v]... [--kind sft|reward]`` — runs, newest last;
* ``show RUN`` — the record and its per-step metrics (loss, learning rate, tokens/s, eval loss;
  PPO: reward, KL, KL coefficient, entropy);
* ``compare RUN RUN... [--plot loss,reward --out runs.png]`` — final metrics side by side,
  the settings that differ, and curves of per-step metrics as a PNG.

RUN may be a run id, a unique prefix of one, or the artifact name the run published.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

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
    parse_tags,
    settings_from,
)
from ragops.errors import InputError

runs_app = typer.Typer(help="Training runs: list, show per-step metrics, compare.", no_args_is_help=True)

#: Per-step columns shown by `runs show`, in order, with their short headers.
_STEP_COLUMNS = {
    "step": "step", "loss": "loss", "learning_rate": "lr", "grad_norm": "grad", "tokens_per_s": "tok/s",
    "samples_per_s": "samples/s", "step_time_s": "s/step", "eval_loss": "eval_loss", "eval_accuracy": "eval_acc",
    # PPO
    "reward": "reward", "kl": "kl", "kl_coef": "β", "entropy": "entropy", "approx_kl": "approx_kl",
}  # fmt: skip


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


@runs_app.command("list")
@handle_errors
def runs_list(
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Only runs with this key=value tag (repeatable).")] = None,
    kind: Annotated[str | None, typer.Option("--kind", help="Only runs of this kind (sft, reward, ppo).")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List training runs (oldest first) with status, steps, tags and artifact."""
    from ragops.runs import RunStore

    store = RunStore.from_settings(settings_from(config, set_, data_dir))
    runs = store.list(kind=kind, tags=parse_tags(tag))
    if as_json:
        emit_json({"runs": [r.to_dict() for r in runs]})
        return
    if not runs:
        out.print(f"no runs under {store.uri}")
        return
    table = Table("kind", "status", "steps", "eval_loss", "created", "tags", "artifact")
    table.columns.insert(0, Column("run", no_wrap=True))
    for r in runs:
        steps = f"{r.step}/{r.planned_steps}" if r.planned_steps else str(r.step)
        table.add_row(
            r.run_id, r.kind, r.status, steps, _cell(r.metrics.get("eval_loss")), r.created_at,
            ", ".join(f"{k}={v}" for k, v in r.tags.items()) or "-", r.artifact or "-",
        )  # fmt: skip
    out.print(table)


@runs_app.command("show")
@handle_errors
def runs_show(
    run: Annotated[str, typer.Argument(help="Run id (or unique prefix, or the artifact it published).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show a run: its record and its per-step metrics."""
    from ragops.runs import RunStore

    store = RunStore.from_settings(settings_from(config, set_, data_dir))
    rec = store.get(run)
    rows = store.metrics(rec.run_id)
    if as_json:
        emit_json({"run": rec.to_dict(), "metrics": rows, "location": store.run_uri(rec.run_id)})
        return
    info = Table(show_header=False, title=f"run {rec.run_id}", title_justify="left")
    for key in ("kind", "status", "base_model", "created_at", "finished_at", "artifact", "attempts", "restarts", "error"):
        info.add_row(key, _cell(getattr(rec, key)))
    info.add_row("steps", f"{rec.step} / {rec.planned_steps or '?'}")
    info.add_row("data", f"{rec.data.get('train_examples')} train / {rec.data.get('eval_examples')} eval, hash {str(rec.data.get('hash'))[:12]}")
    info.add_row("scaling", json.dumps(rec.scaling))
    info.add_row("tags", ", ".join(f"{k}={v}" for k, v in rec.tags.items()) or "-")
    info.add_row("location", store.run_uri(rec.run_id))
    out.print(info)
    if rec.metrics:
        final = Table("metric", "value", title="final metrics", title_justify="left")
        for k, v in sorted(rec.metrics.items()):
            final.add_row(k, _cell(v))
        out.print(final)
    if rows:
        cols = [c for c in _STEP_COLUMNS if any(c in r for r in rows)]
        steps = Table(*[_STEP_COLUMNS[c] for c in cols], title="per-step metrics (training time only)", title_justify="left")
        for r in rows:
            steps.add_row(*[_cell(r.get(c)) for c in cols])
        out.print(steps)


@runs_app.command("compare")
@handle_errors
def runs_compare(
    runs: Annotated[list[str], typer.Argument(help="Two or more runs (id, unique prefix, or published artifact).")],
    plot: Annotated[
        str | None, typer.Option("--plot", help="Per-step metrics to draw, comma-separated (e.g. loss,eval_loss or reward,kl).")
    ] = None,
    out_png: Annotated[Path, typer.Option("--out", help="Where --plot writes its PNG.")] = Path("runs.png"),
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare runs: final metrics side by side (with B - A for two), the settings that differ,
    and with --plot, curves of per-step metrics over steps in one PNG (one panel per metric).

    --json prints {"runs", "rows": [{"key", "values", ...}], "config_diff", "plot"}; with two runs
    each row also has "a", "b" and "delta".
    """
    from ragops.runs import RunStore

    store = RunStore.from_settings(settings_from(config, set_, data_dir))
    result = store.compare(*runs)
    if plot is not None:
        from ragops.run_plots import plot_curves

        metrics = [m.strip() for m in plot.split(",") if m.strip()]
        if not metrics:
            raise InputError("--plot: name at least one metric, e.g. --plot loss,eval_loss")
        result["plot"] = str(plot_curves(store.curves(result["runs"], metrics), out_png, title=" vs ".join(result["runs"])))
    if as_json:
        emit_json(result)
        return
    ids = result["runs"]
    two = len(ids) == 2
    table = Table("", *ids, *(["B - A"] if two else []), title="runs compared", title_justify="left")
    for row in result["rows"]:
        table.add_row(row["key"], *[_cell(v) for v in row["values"]], *([_cell(row["delta"])] if two else []))
    out.print(table)
    if result["config_diff"]:
        diff = Table("setting", *ids, title="settings that differ", title_justify="left")
        for row in result["config_diff"]:
            diff.add_row(row["key"], *[_cell(v) for v in row["values"]])
        out.print(diff)
    if result.get("plot"):
        out.print(f"plot: {result['plot']}", highlight=False)
