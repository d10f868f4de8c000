"""Answer evaluation of one registry model, recorded on its artifact (``eval answers`` and the loop)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ragops.config import Settings

#: The answer metrics `eval answers` reports, in table order.
ANSWER_METRICS = ("exact_match", "token_f1", "answer_contains", "citation_precision")
#: Names the metrics are recorded under on an artifact (what promotion gates ask for).
RECORDED_AS = {"token_f1": "answer_f1"}


def record_answer_metrics(settings: Settings, ref: str | None, report: Mapping[str, Any]) -> str | None:
    """Attach answer metrics to ``ref`` when it is a registry artifact; its name, else None.

    Base models and local folders are evaluated but have nowhere to record to. Token F1 is
    recorded as ``answer_f1``, the name promotion gates use for answer quality.
    """
    from ragops.artifacts import Registry, looks_like_ref

    if not ref or not looks_like_ref(ref):  # nothing given, or a local folder
        return None
    registry = Registry.from_settings(settings)
    if not registry.has(ref):
        return None
    metrics = {RECORDED_AS.get(k, k): report[k] for k in ANSWER_METRICS if report.get(k) is not None}
    return registry.record_eval(ref, metrics).name


def evaluate_and_record(
    settings: Settings,
    ref: str,
    data: str,
    *,
    k: int = 5,
    reader: str = "stuff",
    on_progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Answer ``data``'s questions with model ``ref`` (the model writes: stuff reader) and record the scores.

    Returns:
        ``{metric: value}`` under the recorded names (``answer_f1``, ...), plus ``questions``.
    """
    from ragops.artifacts import apply_model
    from ragops.retrieval.evaluate import evaluate_answers
    from ragops.retrieval.rag import RAGPipeline

    target = apply_model(settings, ref)
    with RAGPipeline(target) as rag:
        report = evaluate_answers(rag, data, k=k, reader=reader, progress=on_progress)
    record_answer_metrics(target, ref, report)
    out = {RECORDED_AS.get(m, m): report[m] for m in ANSWER_METRICS if report.get(m) is not None}
    return {**out, "questions": report.get("questions")}
