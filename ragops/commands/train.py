"""``ragops train sft|reward``: fine-tune on Ray Train and publish the result to the registry.

Registered by the CLI as ``app.add_typer(train_app, name="train")``. Progress (step, loss,
eval loss, tokens/s) is drawn on stderr; the summary names the published artifact and its
aliases (``--json`` prints it as JSON on stdout).
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.commands.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    SetOpt,
    emit_json,
    err,
    handle_errors,
    out,
    parse_tags,
    settings_from,
)

train_app = typer.Typer(
    help="Fine-tune on Ray Train: SFT with LoRA on RAG-grounded answers, or a reward model on preferences.",
    no_args_is_help=True,
)

DataOpt = Annotated[
    list[str], typer.Option("--data", help="Training data: a .jsonl file, a folder of them, or a glob (repeatable).")
]
BaseOpt = Annotated[
    Optional[str], typer.Option("--base", help="Base model: registry name or path (default: finetune.base_model, else generator.model).")
]
WorkersOpt = Annotated[
    Optional[int], typer.Option("--workers", min=1, help="Ray Train workers (data-parallel; DDP over gloo on CPU).")
]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="One GPU per worker (NCCL); QLoRA needs it.")]
MaxStepsOpt = Annotated[Optional[int], typer.Option("--max-steps", min=1, help="Optimizer steps (overrides epochs).")]
ResumeOpt = Annotated[
    Optional[str],
    typer.Option(
        "--resume",
        help="'auto': continue the latest interrupted run of this kind on the same data; or a run folder / run id, "
        "or a checkpoint folder to start from.",
    ),
]
TagOpt = Annotated[Optional[list[str]], typer.Option("--tag", help="key=value tag stored with the run (repeatable).")]


def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def _run(
    kind: str,
    data: list[str],
    base: str | None,
    workers: int | None,
    gpu: bool,
    max_steps: int | None,
    resume: str | None,
    tag: list[str] | None,
    config: list[str] | None,
    set_: list[str] | None,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from ragops.finetune.train import train

    settings = settings_from(config, set_, data_dir)
    tags = parse_tags(tag)
    progress = Progress(
        TextColumn(f"[bold]{kind}[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("steps · loss {task.fields[loss]} · eval {task.fields[eval]} · {task.fields[tps]} tok/s · {task.fields[note]}"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    )
    state: dict[str, Any] = {"loss": "-", "eval": "-", "tps": "-", "note": "preparing data"}

    with progress:
        task = progress.add_task(kind, total=None, **state)

        def on_event(stage: str, info: dict[str, Any]) -> None:
            if stage == "data":
                note = f"{info['train_examples']} train / {info['eval_examples']} eval examples"
                err.print(f"data: {info['records']} records → {note}" + (f", {info['retrieved']} retrieved" if info.get("retrieved") else ""))
                progress.update(task, note="starting workers")
            elif stage == "run":
                verb = "resuming" if info["resumed"] else "run"
                err.print(f"{verb} {info['run_id']} → {info['run_dir']}")
            elif stage == "publish":
                progress.update(task, note="published")

        def on_step(row: dict[str, Any]) -> None:
            fields: dict[str, Any] = {"note": "training"}
            if "loss" in row:
                fields["loss"] = _fmt(row["loss"])
            if "eval_loss" in row:
                fields["eval"] = _fmt(row["eval_loss"])
            if "tokens_per_s" in row:
                fields["tps"] = _fmt(row["tokens_per_s"], ".0f")
            progress.update(task, completed=row.get("step", 0), total=row.get("max_steps") or None, **fields)

        # Ray prints worker-death notices (and libraries their chatter) on stdout: keep stdout
        # for the summary / --json alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = train(
                settings, kind, data, base_model=base, workers=workers, use_gpu=True if gpu else None,  # type: ignore[arg-type]
                max_steps=max_steps, resume=resume, tags=tags, progress=on_step, on_event=on_event,
            )  # fmt: skip
    summary = result.to_dict()
    if as_json:
        emit_json(summary)
        return
    _print_summary(summary)


def _print_summary(d: dict[str, Any]) -> None:
    table = Table(title=f"{d['kind']} run {d['run_id']}", show_header=False, title_justify="left")
    table.add_row("artifact", f"[bold]{d['artifact']}[/] ({', '.join(d['aliases']) or 'no aliases'})")
    table.add_row("base model", str(d["base_model"]))
    table.add_row("steps", f"{d['steps']} / {d['planned_steps']}" + (f" ({d['restarts']} worker restart(s))" if d["restarts"] else ""))
    if d["resumed"]:
        table.add_row("resumed", "yes")
    m = d["metrics"]
    for key in ("train_loss", "final_loss", "eval_loss", "eval_perplexity", "initial_eval_pairwise_accuracy", "eval_pairwise_accuracy", "train_time_s", "peak_rss_mb"):
        if key in m:
            table.add_row(key, _fmt(m[key]))
    table.add_row("data", f"{d['data']['train_examples']} train / {d['data']['eval_examples']} eval examples (hash {d['data']['hash'][:12]})")
    if d["tags"]:
        table.add_row("tags", ", ".join(f"{k}={v}" for k, v in d["tags"].items()))
    out.print(table)
    out.print(f"use it: ragops ask --model {d['artifact']} \"...\"" if d["kind"] == "sft" else f"reward model: {d['artifact']}")


@train_app.command("sft")
@handle_errors
def train_sft(
    data: DataOpt,
    base: BaseOpt = None,
    workers: WorkersOpt = None,
    gpu: GpuOpt = False,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = None,
    tag: TagOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Supervised fine-tuning with LoRA on chat or RAG records (question, answer, contexts | retrieve).

    RAG records are formatted exactly like the stuff reader's prompt (numbered passages, then the
    question) and the target answer cites the passage(s) that contain it. The loss covers the
    answer only. The adapter is published as sft-YYYYMMDD-HHMM-xxxx and sft-latest moves to it.
    """
    _run("sft", data, base, workers, gpu, max_steps, resume, tag, config, set_, data_dir, as_json)


@train_app.command("reward")
@handle_errors
def train_reward(
    data: DataOpt,
    base: BaseOpt = None,
    workers: WorkersOpt = None,
    gpu: GpuOpt = False,
    max_steps: MaxStepsOpt = None,
    resume: ResumeOpt = None,
    tag: TagOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a reward model on preference pairs ({prompt, chosen, rejected}) or chat feedback records.

    Reports pairwise accuracy on a held-out split before and after training. The model is
    published as reward-YYYYMMDD-HHMM-xxxx; reward-latest and rm-latest move to it.
    """
    _run("reward", data, base, workers, gpu, max_steps, resume, tag, config, set_, data_dir, as_json)
