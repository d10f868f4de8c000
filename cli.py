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
from contextlib import nullcontext
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.commands.common import (
    CollectionOpt,
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    ScheduleTimeoutOpt,
    SetOpt,
    emit_json,
    err,
    handle_errors,
    out,
    settings_from,
    with_schedule_timeout,
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
index_app = typer.Typer(help="Inspect, re-embed or drop a collection.", no_args_is_help=True)
config_app = typer.Typer(help="Show or validate configuration.", no_args_is_help=True)
app.add_typer(index_app, name="index")
app.add_typer(config_app, name="config")

from ragops.commands.cluster import cluster_app, job_app, kuberay_app  # noqa: E402
from ragops.commands.models import models_app  # noqa: E402
from ragops.commands.reembed import index_reembed  # noqa: E402
from ragops.commands.runs import runs_app  # noqa: E402
from ragops.commands.llmops import ab_app, loop_command, serve_split  # noqa: E402
from ragops.commands.serve import serve_command  # noqa: E402
from ragops.commands.train import train_app  # noqa: E402

# `ragops serve` runs the server; `ragops serve split` changes a running server's traffic split.
serve_app = typer.Typer()
serve_app.callback(invoke_without_command=True)(serve_command)
serve_app.command("split")(serve_split)
app.add_typer(serve_app, name="serve")
app.add_typer(ab_app, name="ab")
app.command("loop")(loop_command)
app.add_typer(train_app, name="train")
app.add_typer(models_app, name="models")
app.add_typer(runs_app, name="runs")
app.add_typer(job_app, name="job")
app.add_typer(cluster_app, name="cluster")
app.add_typer(kuberay_app, name="kuberay")


def _quiet_libraries() -> None:
    # Library chatter (HF load bars, Ray info) would drown the CLI's own output.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")  # e.g. transformers' GGUF de-quantization bar
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
    paths: Annotated[
        Optional[list[str]],
        typer.Argument(help="Files, folders or URIs (s3://...) to ingest (default: the ingest.sources setting)."),
    ] = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    prune: Annotated[bool, typer.Option("--prune", help="Delete documents that are gone from the source.")] = False,
    runner: Annotated[
        Optional[str], typer.Option("--runner", help="'ray' (Ray Data, default) or 'local' (in-process).")
    ] = None,
    schedule_timeout: ScheduleTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load, chunk, embed and write documents into Qdrant, incrementally.

    Unchanged documents are skipped before embedding; changed ones replace their old chunks;
    --prune deletes documents that disappeared. Failed files are listed and make the exit
    status non-zero, but every other document is still ingested.
    """
    from ragops.commands.progress import progress_display
    from ragops.ingest.pipeline import run_ingest

    overrides = with_schedule_timeout(set_, schedule_timeout)
    if runner:
        overrides.append(f"ingest.runner={runner}")
    settings = settings_from(config, overrides, data_dir)
    progress = progress_display(
        settings, "ingest",
        "files · {task.fields[documents]} documents · {task.fields[chunks]} chunks · {task.fields[rate]:.0f} chunks/s",
        err,
    )  # fmt: skip
    with progress:
        task = progress.add_task("ingest", total=None, documents=0, chunks=0, rate=0.0)

        def on_progress(p: dict[str, Any]) -> None:
            # Chunks, not points: points reach the store in write batches, so their count jumps.
            rate = p["chunks"] / p["elapsed"] if p["elapsed"] else 0.0
            progress.update(task, completed=p["files_done"], total=p["files"], documents=p["documents"], chunks=p["chunks"],
                            rate=rate)  # fmt: skip

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
    if d.get("timings"):
        table.add_row("by phase", ", ".join(f"{k} {v:.1f} s" for k, v in d["timings"].items()))
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


index_app.command("reembed")(index_reembed)


@index_app.command("drop")
@handle_errors
def index_drop(
    collection: Annotated[str, typer.Option("--collection", help="Collection to delete (required).")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a collection and its points (its manifest history is kept).

    The collection an alias serves (see `ragops index reembed`) cannot be dropped; the ones a
    re-embed left behind are dropped by their own names.
    """
    from ragops.index import drop_collection

    dropped = drop_collection(settings_from(config, set_, data_dir), collection)
    if as_json:
        emit_json({"collection": collection, "dropped": dropped})
    else:
        out.print(f"dropped {collection}" if dropped else f"collection {collection} did not exist")


# -- search / ask ------------------------------------------------------------------------
ModeOpt = Annotated[Optional[str], typer.Option("--mode", help="dense | sparse | hybrid (default from config: hybrid).")]
FilterOpt = Annotated[
    Optional[list[str]],
    typer.Option("--filter", "-f", help="key=value: source=GLOB, doc_id=ID, tag=TAG, metadata.FIELD=V (repeatable)."),
]

#: Exit status when the command succeeded on a truncated query (see `ragops search --help`).
EXIT_TRUNCATED = 3


def _warn_truncated(truncated: bool) -> None:
    if truncated:
        err.print(
            f"[yellow]warning:[/] the query is longer than the embedder's token limit and was truncated; "
            f"results are for its beginning (exit status {EXIT_TRUNCATED})"
        )


@app.command()
@handle_errors
def search(
    query: Annotated[str, typer.Argument(help="What to search for.")],
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="Number of hits.")] = 10,
    mode: ModeOpt = None,
    fusion: Annotated[Optional[str], typer.Option("--fusion", help="Hybrid fusion: rrf | dbsf.")] = None,
    filter_: FilterOpt = None,
    score_threshold: Annotated[Optional[float], typer.Option("--score-threshold", help="Drop weaker hits.")] = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Search the collection: dense (bi-encoder), sparse (BM25) or hybrid (fused in Qdrant).

    --json prints {"hits": [{"rank", "score", "doc_id", "chunk_id", "text", "source", "metadata"}]}.
    A query over the embedder's token limit is truncated: results are printed with a warning
    and the exit status is 3.
    """
    from ragops.retrieval.search import Retriever

    settings = settings_from(config, set_, data_dir)
    with Retriever(settings, collection=collection) as retriever:
        result = retriever.search(query, k=k, mode=mode, fusion=fusion, filters=filter_ or None,
                                  score_threshold=score_threshold)  # fmt: skip
    if as_json:
        emit_json({"hits": [h.to_dict() for h in result.hits], "mode": result.mode, "timings": result.timings})
    else:
        table = Table("#", "score", "doc_id", "text", title=f"{len(result.hits)} hits ({result.mode})")
        for h in result.hits:
            snippet = " ".join(h.text.split())
            table.add_row(str(h.rank), f"{h.score:.4f}", h.doc_id, snippet[:160] + ("…" if len(snippet) > 160 else ""))
        out.print(table)
    _warn_truncated(result.query_truncated)
    if result.query_truncated:
        raise typer.Exit(EXIT_TRUNCATED)


def _with_model(settings: Any, model: str | None) -> Any:
    """``--model``: a base generator (registry name/path) or a trained adapter (name/alias/path)."""
    if not model:
        return settings
    from ragops.artifacts import apply_model

    return apply_model(settings, model)


@app.command()
@handle_errors
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="Passages retrieved.")] = 5,
    mode: ModeOpt = None,
    reader: Annotated[
        Optional[str],
        typer.Option("--reader", help="extractive | stuff | fid (default from config: extractive, the passages' own "
                     "best sentences; stuff and fid generate, checked by generator.grounding)."),
    ] = None,
    stream: Annotated[bool, typer.Option("--stream", help="Print the answer as it is generated.")] = False,
    model: Annotated[
        Optional[str], typer.Option("--model", help="Generator: a registry model, a local path, or a trained adapter/alias.")
    ] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1, help="Most tokens to generate.")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature", min=0, help="0 = greedy, deterministic.")] = None,
    filter_: FilterOpt = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    r"""Answer a question from the collection, citing the passages used as \[n].

    Every answer is checked against its passages (generator.grounding, default fallback):
    unsupported generated answers are replaced by the extractive answer, and a question the
    documents do not cover gets that reply with the closest sources instead of a guess.

    --json prints {"answer", "citations": [{"n", "doc_id", "chunk_id", "source", "score",
    "start", "end", "quote"}], "grounded", "abstained", "grounding": {"support", "action",
    "sentences": [{"text", "support", "citations"}]}, "flagged_passages", "timings"}.
    """
    from ragops.retrieval.rag import RAGPipeline, reader_name

    settings = _with_model(settings_from(config, set_, data_dir), model)
    with RAGPipeline(settings, collection=collection) as rag:
        with err.status("loading models and retrieving…", spinner="dots") if not as_json else nullcontext():
            # A chosen --model must write the answer: with the extractive default it reads with stuff.
            chosen = reader_name(settings, reader, model_chosen=model is not None)
            answer_stream = rag.ask_stream(question, k=k, mode=mode, reader=chosen, filters=filter_ or None,
                                           max_new_tokens=max_tokens, temperature=temperature)  # fmt: skip
            first = next(answer_stream, None)
        if stream and not as_json:
            if first is not None:
                out.print(first, end="", highlight=False, markup=False)
            for delta in answer_stream:
                out.print(delta, end="", highlight=False, markup=False)
            out.print()
        else:
            for _ in answer_stream:
                pass
        answer = answer_stream.answer
    assert answer is not None
    if as_json:
        emit_json(answer.to_dict())
    else:
        if not stream:
            out.print(answer.answer, highlight=False, markup=False)
        out.print()
        for c in answer.citations:
            where = f", chars {c['start']}-{c['end']}" if "start" in c else ""
            out.print(f"[{c['n']}] {c['doc_id']}  ({c['source']}, score {c['score']:.3f}{where})", highlight=False, markup=False)
        if answer.abstained:
            closest = {p.doc_id: p.source for p in answer.passages}
            for doc_id, source in list(closest.items())[:3]:
                out.print(f"    closest: {doc_id}  ({source})", highlight=False, markup=False)
        elif not answer.citations:
            err.print("[dim]no passage cited[/]")
        g = answer.grounding
        if g is not None and not answer.abstained:
            note = {"fallback": " · generated answer was unsupported: extractive answer shown",
                    "repaired": f" · {g['citations_fixed']} citation(s) repaired",
                    "flagged": " · NOT GROUNDED in the passages"}.get(g["action"], "")  # fmt: skip
            err.print(f"[dim]support {g['support']:.2f}{note}[/]")
        for f in answer.flagged_passages:
            err.print(f"[yellow]passage [{f['n']}] {f['doc_id']} held instruction-like text ({', '.join(f['flags'])}): neutralised[/]")
        t = answer.timings
        if answer.usage.get("completion_tokens"):
            err.print(f"[dim]retrieve {t['retrieve_s']:.2f}s · first token {t['time_to_first_token_s']:.2f}s · "
                      f"{t['tokens_per_s']:.1f} tokens/s · total {t['total_s']:.2f}s[/]")  # fmt: skip
        else:  # extractive or abstained: nothing was generated
            err.print(f"[dim]retrieve {t['retrieve_s']:.2f}s · read {t['generate_s']:.2f}s · total {t['total_s']:.2f}s[/]")
    _warn_truncated(answer.query_truncated)
    if answer.query_truncated:
        raise typer.Exit(EXIT_TRUNCATED)


# -- eval --------------------------------------------------------------------------------
eval_app = typer.Typer(help="Measure retrieval and answer quality.", no_args_is_help=True)
app.add_typer(eval_app, name="eval")


@eval_app.command("retrieval")
@handle_errors
def eval_retrieval(
    queries: Annotated[str, typer.Option("--queries", help='JSONL (path or URI): {"qid", "query"} per line.')],
    qrels: Annotated[str, typer.Option("--qrels", help='JSONL (path or URI): {"qid", "doc_id"} per line.')],
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="Cut-off for the metrics' ranking.")] = 10,
    mode: Annotated[
        Optional[list[str]], typer.Option("--mode", help="dense | sparse | hybrid; repeat to compare (default: all three).")
    ] = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """recall@1/5/10, MRR@10 and nDCG@10 per search mode, at document level."""
    from ragops.retrieval.evaluate import evaluate_retrieval
    from ragops.retrieval.search import MODES, Retriever

    from ragops.errors import InputError

    modes = tuple(mode or ("dense", "sparse", "hybrid"))
    for m in modes:
        if m not in MODES:
            raise InputError(f"unknown mode '{m}'; allowed: {', '.join(MODES)}")
    settings = settings_from(config, set_, data_dir)
    with Retriever(settings, collection=collection) as retriever:
        report = evaluate_retrieval(retriever, queries, qrels, k=k, modes=modes)
    from ragops.tracking.mlflow_tracker import log_eval_run

    log_eval_run(settings, "eval-retrieval", report["modes"], params={"queries": queries, "qrels": qrels, "k": k, "modes": list(modes)})
    if as_json:
        emit_json(report)
        return
    metric_names = [m for m in next(iter(report["modes"].values())) if "@" in m]
    table = Table("mode", *metric_names, "p50 ms", title=f"{report['queries']} queries, k={k}")
    for m, row in report["modes"].items():
        table.add_row(m, *[f"{row[n]:.3f}" for n in metric_names], f"{row.get('latency_p50_ms', 0):.1f}")
    out.print(table)


@eval_app.command("answers")
@handle_errors
def eval_answers(
    data: Annotated[
        str, typer.Option("--data", help='JSONL (path or URI): {"question", "answers": [...], "gold_doc_ids": [...]}.')
    ],
    model: Annotated[Optional[str], typer.Option("--model", help="Generator or trained adapter/alias to evaluate.")] = None,
    baseline: Annotated[
        Optional[str],
        typer.Option(
            "--baseline",
            help="Also evaluate this model on the same questions and print both side by side (before/after): "
            "a generator, an adapter/alias, or 'base' for --model's base without its adapter.",
        ),
    ] = None,
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="Passages retrieved per question.")] = 5,
    mode: ModeOpt = None,
    reader: Annotated[
        Optional[str],
        typer.Option("--reader", help="extractive | stuff | fid (default: the config's; stuff when --model/--baseline "
                     "is given and the config's is extractive, so the models write the answers)."),
    ] = None,
    max_tokens: Annotated[Optional[int], typer.Option("--max-tokens", min=1)] = None,
    collection: CollectionOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Exact match, token F1, answer-contains and citation precision of generated answers.

    When --model (or --baseline) names a trained artifact, its metrics are recorded on the
    artifact (token F1 as `answer_f1`), so `ragops models promote --require-metric answer_f1`
    can gate on them. With --baseline, both models answer the same questions with the same
    retrieval and the table shows before, after and the change.
    """
    settings = settings_from(config, set_, data_dir)
    target = _with_model(settings, model)
    # (label, registry ref or None, settings); the baseline runs first.
    runs: list[tuple[str, str | None, Any]] = [(model or target.generator.model, model, target)]
    if baseline == "base":
        gen = target.generator.model_copy(update={"adapter": None})
        runs.insert(0, ("base", None, target.model_copy(update={"generator": gen})))
    elif baseline:
        runs.insert(0, (baseline, baseline, _with_model(settings, baseline)))

    from ragops.retrieval.rag import reader_name

    # Comparing models needs the models to write the answers (the extractive reader runs none).
    reader = reader_name(settings, reader, model_chosen=bool(model or baseline))
    reports: list[dict[str, Any]] = []
    for label, ref, run_settings in runs:
        report = _answer_report(run_settings, data, label=label, k=k, mode=mode, reader=reader, max_tokens=max_tokens,
                                collection=collection)  # fmt: skip
        report["model"] = label
        report["recorded_on"] = _record_eval(run_settings, ref, report)
        _track_answers(run_settings, report, data=data, k=k, reader=reader)
        reports.append(report)
    after = reports[-1]
    if as_json:
        if baseline:
            delta = {m: _delta(reports[0][m], after[m]) for m in ANSWER_METRICS}
            emit_json({**after, "baseline": reports[0], "delta": delta})
        else:
            emit_json(after)
        return
    columns = [r["model"] for r in reports] + (["change"] if baseline else [])
    table = Table("metric", *columns, title=f"{after['questions']} questions")
    for key in ANSWER_METRICS:
        cells = ["n/a" if r[key] is None else f"{r[key]:.3f}" for r in reports]
        if baseline:
            d = _delta(reports[0][key], after[key])
            cells.append("n/a" if d is None else f"{d:+.3f}")
        table.add_row(key, *cells)
    out.print(table)
    for r in reports:
        if r["recorded_on"]:
            err.print(f"recorded on artifact {r['recorded_on']}")


from ragops.llmops.evaluation import ANSWER_METRICS  # noqa: E402 - the table order `eval answers` prints


def _answer_report(settings: Any, data: str, *, label: str, collection: str | None, **ask: Any) -> dict[str, Any]:
    """Run the answers evaluation of one model (a progress bar on stderr)."""
    from ragops.retrieval.evaluate import evaluate_answers
    from ragops.retrieval.rag import RAGPipeline
    from rich.progress import Progress

    max_tokens = ask.pop("max_tokens")
    with RAGPipeline(settings, collection=collection) as rag, Progress(console=err, transient=True) as bar:
        task = bar.add_task(f"answering ({label})", total=None)
        return evaluate_answers(rag, data, max_new_tokens=max_tokens,
                                progress=lambda d, t: bar.update(task, completed=d, total=t), **ask)  # fmt: skip


def _track_answers(settings: Any, report: dict[str, Any], **params: Any) -> None:
    """One MLflow run per evaluated model, when ``tracking.mlflow_uri`` is set."""
    from ragops.tracking.mlflow_tracker import log_eval_run

    metrics = {k: report[k] for k in ANSWER_METRICS if report.get(k) is not None}
    tags = {"ragops.model": str(report["model"]), **({"ragops.artifact": report["recorded_on"]} if report.get("recorded_on") else {})}
    log_eval_run(settings, "eval-answers", metrics, params={**params, "model": report["model"]}, tags=tags)


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before


def _record_eval(settings: Any, ref: str | None, report: dict[str, Any]) -> str | None:
    """Attach answer metrics to ``ref`` when it is a registry artifact (see :mod:`ragops.llmops.evaluation`)."""
    from ragops.llmops.evaluation import record_answer_metrics

    return record_answer_metrics(settings, ref, report)


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
