"""``ragops train sft|reward|ppo``: fine-tune on Ray Train and publish the result to the registry.

Registered by the CLI as ``app.add_typer(train_app, name="train")``. Progress is drawn on
stderr (SFT / reward: step, loss, eval loss, tokens/s; PPO: step, mean reward, KL, KL
coefficient, entropy, tokens/s); the summary names the published artifact and its aliases
(``--json`` prints it as JSON on stdout). The three commands share :func:`_run_training`.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.config import Settings

from ragops.commands.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    ScheduleTimeoutOpt,
    SetOpt,
    emit_json,
    err,
    handle_errors,
    out,
    parse_tags,
    with_schedule_timeout,
    settings_from,
)

train_app = typer.Typer(
    help="Fine-tune on Ray Train: SFT with LoRA on RAG-grounded answers, a reward model on preferences, or PPO.",
    no_args_is_help=True,
)

DataOpt = Annotated[
    list[str], typer.Option("--data", help="Training data: a .jsonl file, a folder of them, or a glob; paths or URIs (s3://...) (repeatable).")
]
BaseOpt = Annotated[
    str | None, typer.Option("--base", help="Base model: registry name or path (default: finetune.base_model, else generator.model).")
]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", min=1, help="Ray Train workers (data-parallel; DDP over gloo on CPU).")
]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="One GPU per worker (NCCL); QLoRA needs it.")]
MaxStepsOpt = Annotated[int | None, typer.Option("--max-steps", min=1, help="Optimizer steps (overrides epochs).")]
ResumeOpt = Annotated[
    str | None,
    typer.Option(
        "--resume",
        help="'auto': continue the latest interrupted run of this kind on the same data; or a run folder / run id, "
        "or a checkpoint folder to start from.",
    ),
]
TagOpt = Annotated[list[str] | None, typer.Option("--tag", help="key=value tag stored with the run (repeatable).")]


#: Held-out ranking metrics of the embedder / reranker runs (before and after training).
_RANKING_METRIC = re.compile(r"^(initial_)?eval_(ndcg|recall|mrr|map)_at_\d+$")


def _fmt(value: Any, spec: str = ".4g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


#: Per-kind progress: (header template, {field: (row key, format)}).
_PROGRESS: dict[str, tuple[str, dict[str, tuple[str, str]]]] = {
    "sft": (
        "steps · loss {task.fields[loss]} · eval {task.fields[eval]} · {task.fields[tps]} tok/s · {task.fields[note]}",
        {"loss": ("loss", ".4g"), "eval": ("eval_loss", ".4g"), "tps": ("tokens_per_s", ".0f")},
    ),
    "ppo": (
        (
            "steps · reward {task.fields[reward]} · KL {task.fields[kl]} (β {task.fields[beta]}) · entropy {task.fields[ent]}"
            " · {task.fields[tps]} tok/s · {task.fields[note]}"
        ),
        {"reward": ("reward", ".3f"), "kl": ("kl", ".3g"), "beta": ("kl_coef", ".3g"), "ent": ("entropy", ".3g"),
         "tps": ("tokens_per_s", ".0f")},
    ),
}  # fmt: skip
_PROGRESS["reward"] = _PROGRESS["sft"]
_PROGRESS["embedder"] = (
    "steps · loss {task.fields[loss]} · {task.fields[eps]} examples/s · {task.fields[note]}",
    {"loss": ("loss", ".4g"), "eps": ("examples_per_s", ".1f")},
)
_PROGRESS["reranker"] = _PROGRESS["embedder"]


def _run_training(
    kind: str,
    settings: Settings,
    call: Callable[[Callable[[dict[str, Any]], None], Callable[[str, dict[str, Any]], None]], Any],
    as_json: bool,
) -> None:
    """Shared body of ``train sft|reward|ppo``: progress on stderr, then the summary (or JSON).

    Args:
        kind: ``sft``, ``reward`` or ``ppo`` (picks the progress fields).
        call: Runs the training with ``(progress, on_event)`` callbacks; returns a ``TrainResult``.
        as_json: Print the summary as JSON on stdout.
    """
    from ragops.commands.progress import progress_display

    header, fields_of = _PROGRESS[kind]
    progress = progress_display(settings, kind, header, err)
    state: dict[str, Any] = {name: "-" for name in fields_of}
    state["note"] = "preparing data"

    with progress:
        task = progress.add_task(kind, total=None, **state)

        def on_event(stage: str, info: dict[str, Any]) -> None:
            if stage == "data":
                if kind == "ppo":
                    note = f"{info['train_examples']} prompts ({info.get('with_passages', 0)} with passages)"
                elif kind in ("embedder", "reranker"):
                    neg = info.get("negatives", {})
                    note = (f"{info['train_examples']} train / {info['eval_examples']} held-out pairs, "
                            f"{neg.get('mined', 0)} mined + {neg.get('random', 0)} random negatives")  # fmt: skip
                else:
                    note = f"{info['train_examples']} train / {info['eval_examples']} eval examples"
                err.print(f"data: {info['records']} records → {note}" + (f", {info['retrieved']} retrieved" if info.get("retrieved") else ""))
                progress.update(task, note="starting workers")
            elif stage == "run":
                verb = "resuming" if info["resumed"] else "run"
                err.print(f"{verb} {info['run_id']} → {info['run_dir']}")
            elif stage == "synthesize":
                done = f" ({info['generated']} questions generated so far)" if "generated" in info else ""
                progress.update(task, note=f"writing synthetic queries for {info['chunks']} chunks{done}")
            elif stage == "mine":
                progress.update(task, note=f"mining {info['negatives']} hard negatives for {info['pairs']} pairs")
            elif stage == "publish":
                progress.update(task, note="published")

        def on_step(row: dict[str, Any]) -> None:
            fields: dict[str, Any] = {"note": "training"}
            for name, (key, spec) in fields_of.items():
                if key in row:
                    fields[name] = _fmt(row[key], spec)
            progress.update(task, completed=row.get("step", 0), total=row.get("max_steps") or None, **fields)

        # Ray prints worker-death notices (and libraries their chatter) on stdout: keep stdout
        # for the summary / --json alone.
        with contextlib.redirect_stdout(sys.stderr):
            result = call(on_step, on_event)
    summary = result.to_dict()
    if as_json:
        emit_json(summary)
        return
    _print_summary(summary)


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
    from ragops.finetune.train import train

    settings = settings_from(config, set_, data_dir)
    tags = parse_tags(tag)
    _run_training(
        kind,
        settings,
        lambda on_step, on_event: train(
            settings, kind, data, base_model=base, workers=workers, use_gpu=True if gpu else None,  # type: ignore[arg-type]
            max_steps=max_steps, resume=resume, tags=tags, progress=on_step, on_event=on_event,
        ),
        as_json,
    )  # fmt: skip


def _print_summary(d: dict[str, Any]) -> None:
    table = Table(title=f"{d['kind']} run {d['run_id']}", show_header=False, title_justify="left")
    table.add_row("artifact", f"[bold]{d['artifact']}[/] ({', '.join(d['aliases']) or 'no aliases'})")
    table.add_row("base model", str(d["base_model"]))
    table.add_row("steps", f"{d['steps']} / {d['planned_steps']}" + (f" ({d['restarts']} worker restart(s))" if d["restarts"] else ""))
    if d["resumed"]:
        table.add_row("resumed", "yes")
    m = d["metrics"]
    keys = (
        "train_loss", "final_loss", "eval_loss", "eval_perplexity", "initial_eval_pairwise_accuracy", "eval_pairwise_accuracy",
        "initial_reward", "final_reward", "final_kl", "kl_coef", "final_entropy", "train_time_s", "peak_rss_mb",
    )  # fmt: skip
    keys += tuple(sorted(k for k in m if _RANKING_METRIC.match(k)))
    for key in keys:
        if key in m:
            table.add_row(key, _fmt(m[key]))
    if d["kind"] == "ppo":
        table.add_row("prompts", f"{d['data']['train_examples']} (hash {d['data']['hash'][:12]})")
    else:
        table.add_row("data", f"{d['data']['train_examples']} train / {d['data']['eval_examples']} eval examples (hash {d['data']['hash'][:12]})")
    if d["tags"]:
        table.add_row("tags", ", ".join(f"{k}={v}" for k, v in d["tags"].items()))
    out.print(table)
    if d["kind"] == "reward":
        out.print(f"reward model: {d['artifact']} (use it: ragops train ppo --reward {d['artifact']} ...)")
    elif d["kind"] == "embedder":
        out.print(f"embedder: {d['artifact']} (re-embed the index with it: ragops index reembed --embedder {d['artifact']})")
    elif d["kind"] == "reranker":
        out.print(f"reranker: {d['artifact']} (use it: --set retrieval.rerank.model={d['artifact']})")
    else:
        out.print(f"use it: ragops ask --model {d['artifact']} \"...\"")


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
    schedule_timeout: ScheduleTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Supervised fine-tuning with LoRA on chat or RAG records (question, answer, contexts | retrieve).

    RAG records are formatted exactly like the stuff reader's prompt (numbered passages, then the
    question) and the target answer cites the passage(s) that contain it. The loss covers the
    answer only. The adapter is published as sft-YYYYMMDD-HHMM-xxxx and sft-latest moves to it.
    """
    overrides = with_schedule_timeout(set_, schedule_timeout)
    _run("sft", data, base, workers, gpu, max_steps, resume, tag, config, overrides, data_dir, as_json)


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
    schedule_timeout: ScheduleTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a reward model on preference pairs ({prompt, chosen, rejected}) or chat feedback records.

    Reports pairwise accuracy on a held-out split before and after training. The model is
    published as reward-YYYYMMDD-HHMM-xxxx; reward-latest and rm-latest move to it.
    """
    overrides = with_schedule_timeout(set_, schedule_timeout)
    _run("reward", data, base, workers, gpu, max_steps, resume, tag, config, overrides, data_dir, as_json)


@train_app.command("ppo")
@handle_errors
def train_ppo(
    prompts: Annotated[
        str,
        typer.Option(
            "--prompts",
            help="Prompts: a .jsonl file/folder/glob of {\"prompt\"} or {\"question\", \"contexts\" | \"retrieve\": true} "
            "records, or 'feedback' (the questions of the chat endpoint's feedback records).",
        ),
    ],
    base: BaseOpt = None,
    init: Annotated[
        str | None, typer.Option("--init", help="Start from this adapter: an SFT artifact, alias (sft-latest) or folder.")
    ] = None,
    reward: Annotated[
        str | None,
        typer.Option(
            "--reward",
            help="'rag' (grounded, cited answers), 'mix' (weights in finetune.ppo.reward.mix), a reward model "
            "in the registry (e.g. rm-latest) or package.module:Class (default: finetune.ppo.reward.name).",
        ),
    ] = None,
    workers: WorkersOpt = None,
    gpu: GpuOpt = False,
    max_steps: Annotated[int | None, typer.Option("--max-steps", min=1, help="PPO steps (rollout batch + updates).")] = None,
    resume: ResumeOpt = None,
    tag: TagOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    schedule_timeout: ScheduleTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """RLHF-style PPO: a LoRA policy sampled on prompts, rewarded, held near the base by a KL penalty.

    Each step samples answers on every worker, scores them (reward model, the RAG-grounded
    reward or a mix), computes the KL to the base model (the same weights with the adapter
    switched off), GAE advantages and several epochs of clipped PPO updates (DDP across
    workers). Progress shows the mean reward, KL, KL coefficient, entropy and tokens/s. The
    adapter (with its value head) is published as ppo-YYYYMMDD-HHMM-xxxx; ppo-latest moves to it.
    """
    from ragops.finetune.ppo_train import train_ppo as run_ppo

    settings = settings_from(config, with_schedule_timeout(set_, schedule_timeout), data_dir)
    tags = parse_tags(tag)
    _run_training(
        "ppo",
        settings,
        lambda on_step, on_event: run_ppo(
            settings, prompts, base_model=base, init=init, reward=reward, workers=workers,
            use_gpu=True if gpu else None, max_steps=max_steps, resume=resume, tags=tags, progress=on_step,
            on_event=on_event,
        ),
        as_json,
    )  # fmt: skip


# -- retrieval models ------------------------------------------------------------------------
PairDataOpt = Annotated[
    list[str] | None,
    typer.Option("--data", help='Pair files: JSONL of {"query", "positive"} (optional "doc_id", "negatives"); a file, folder or glob (repeatable).'),
]
FeedbackOpt = Annotated[
    bool, typer.Option("--feedback", help="Add the chat endpoint's up-rated answers: the question with the passages the answer cited.")
]
SynthesizeOpt = Annotated[
    int,
    typer.Option(
        "--synthesize", min=0,
        help="Write synthetic queries for N sampled chunks (generator-written questions plus heading / first-sentence "
        "queries); kept only if BM25 finds their chunk in its top 20.",
    ),
]  # fmt: skip
EvalDataOpt = Annotated[
    list[str] | None,
    typer.Option("--eval-data", help="Pair files to evaluate on instead of a held-out share of the documents; may share no document with training."),
]
ExcludeOpt = Annotated[
    str | None,
    typer.Option("--exclude-docs", help='Document ids never trained on, e.g. a benchmark\'s test qrels (JSONL with "doc_id", or one id per line).'),
]
CollectionTrainOpt = Annotated[str | None, typer.Option("--collection", help="Collection to mine and synthesize from (default: vectorstore.collection).")]


def _retriever_command(kind: str, base_help: str, doc: str) -> Callable[..., None]:
    """``train embedder`` / ``train reranker``: the same options and flow, their own help."""

    def command(
        data: PairDataOpt = None,
        feedback: FeedbackOpt = False,
        synthesize: SynthesizeOpt = 0,
        eval_data: EvalDataOpt = None,
        exclude_docs: ExcludeOpt = None,
        collection: CollectionTrainOpt = None,
        base: str | None = None,  # its option (and help) is set below
        workers: WorkersOpt = None,
        gpu: GpuOpt = False,
        max_steps: MaxStepsOpt = None,
        resume: ResumeOpt = None,
        tag: TagOpt = None,
        config: ConfigOpt = None,
        set_: SetOpt = None,
        data_dir: DataDirOpt = None,
        schedule_timeout: ScheduleTimeoutOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        from ragops.finetune.retriever_train import PairSources, train_retriever

        settings = settings_from(config, with_schedule_timeout(set_, schedule_timeout), data_dir)
        sources = PairSources(data=data or [], feedback=feedback, synthesize=synthesize, eval_data=eval_data or [],
                              exclude_docs=exclude_docs, collection=collection)  # fmt: skip
        tags = parse_tags(tag)
        _run_training(
            kind,
            settings,
            lambda on_step, on_event: train_retriever(
                settings, kind, sources, base_model=base, workers=workers,  # type: ignore[arg-type]
                use_gpu=True if gpu else None, max_steps=max_steps, resume=resume, tags=tags, progress=on_step,
                on_event=on_event,
            ),
            as_json,
        )  # fmt: skip

    # Annotations are strings evaluated in this module's globals (PEP 563); this one carries
    # the kind's own help, so it is set as an object.
    command.__annotations__["base"] = Annotated[Optional[str], typer.Option("--base", help=base_help)]
    command.__name__ = f"train_{kind}"
    command.__doc__ = doc
    return command


train_embedder = train_app.command("embedder")(handle_errors(_retriever_command(
    "embedder",
    "Embedder to start from (default: finetune.embedder.base_model, else embedder.model).",
    """Fine-tune the dense embedder on (query, passage) pairs with in-batch and mined hard negatives.

    Pairs come from --data files, --feedback and/or --synthesize N; hard negatives are the chunks
    of other documents the current index ranks high. Whole documents are held out, and nDCG /
    recall / MRR@10 on them are measured before and after training. The model is published as
    embedder-YYYYMMDD-HHMM-xxxx (embedder-latest moves to it), with the held-out split beside it
    (heldout_queries.jsonl / heldout_qrels.jsonl for `ragops eval retrieval`).
    """,
)))  # fmt: skip

train_reranker = train_app.command("reranker")(handle_errors(_retriever_command(
    "reranker",
    "Cross-encoder or plain encoder to start from (default: retrieval.rerank.model, else embedder.model).",
    """Fine-tune a cross-encoder reranker on the same pairs: positives 1, mined hard negatives 0.

    A plain encoder (the packaged MiniLM) gets a new score head. nDCG@10 of re-ranking each
    held-out query's positive among ten hard negatives is measured before and after. Published as
    reranker-YYYYMMDD-HHMM-xxxx (reranker-latest moves to it); use it with
    --set retrieval.rerank.model=reranker-latest.
    """,
)))  # fmt: skip
