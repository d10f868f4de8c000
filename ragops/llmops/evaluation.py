"""Answer evaluation of one registry model, recorded on its artifact (``eval answers`` and the loop)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ragops.config import Settings
from ragops.errors import InputError

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


@dataclass
class ServedAnswer:
    """What :func:`ragops.retrieval.evaluate.evaluate_answers` reads of an answer."""

    answer: str
    citations: list[dict[str, Any]]
    timings: dict[str, Any] = field(default_factory=dict)


class ServedPipeline:
    """``ask`` through a running server's chat API, for evaluating while it holds the index.

    The embedded Qdrant Edge store opens in one process only; while ``ragops serve`` runs,
    the loop evaluates through the server, so the answers are the ones users would get.

    Args:
        url: The server (``http://127.0.0.1:8000``).
        model: The served name to ask (an artifact name, so the evaluation is not part of a split).
        api_key: A chat key (None: an open API).
    """

    def __init__(self, url: str, model: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        import httpx

        headers = {"x-ragops-user": "ragops-loop-eval", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
        self.model = model
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> ServedPipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.close()

    def ask(self, question: str, *, k: int | None = None, mode: str | None = None, reader: str | None = None,
            max_new_tokens: int | None = None) -> ServedAnswer:  # fmt: skip
        import httpx

        rag = {key: v for key, v in (("k", k), ("mode", mode), ("reader", reader)) if v is not None}
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": question}], "rag": rag}
        if max_new_tokens is not None:
            body["max_tokens"] = max_new_tokens
        try:
            resp = self.client.post("/v1/chat/completions", json=body)
        except httpx.HTTPError as exc:
            raise InputError(f"evaluating through {self.client.base_url}: {type(exc).__name__}: {exc}") from None
        if resp.status_code != 200:
            try:
                message = resp.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = resp.text[:200]
            raise InputError(f"evaluating {self.model} through {self.client.base_url}: {resp.status_code} {message}")
        data = resp.json()
        return ServedAnswer(data["choices"][0]["message"]["content"] or "", data.get("citations") or [],
                            (data.get("ragops") or {}).get("timings") or {})  # fmt: skip


def evaluate_and_record(
    settings: Settings,
    ref: str,
    data: str,
    *,
    k: int = 5,
    reader: str = "stuff",
    server_url: str | None = None,
    api_key: str | None = None,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> dict[str, Any]:
    """Answer ``data``'s questions with model ``ref`` (the model writes: stuff reader) and record the scores.

    With ``server_url`` the answers come from that running server (see :class:`ServedPipeline`);
    else from an in-process pipeline, which needs the index to itself.

    Returns:
        ``{metric: value}`` under the recorded names (``answer_f1``, ...), plus ``questions``.

    Raises:
        InputError: the index is held by a running server and no ``server_url`` was given.
    """
    from ragops.artifacts import apply_model
    from ragops.errors import StoreLockedError
    from ragops.retrieval.evaluate import evaluate_answers
    from ragops.retrieval.rag import RAGPipeline

    target = apply_model(settings, ref)
    if server_url:
        with ServedPipeline(server_url, ref, api_key) as served:
            report = evaluate_answers(served, data, k=k, reader=reader, progress=on_progress)
    else:
        try:
            with RAGPipeline(target) as rag:
                report = evaluate_answers(rag, data, k=k, reader=reader, progress=on_progress)
        except StoreLockedError as exc:
            raise InputError(f"{exc}. While `ragops serve` holds the index, evaluate through it: "
                             "--server http://HOST:PORT (or loop.server_url)") from None  # fmt: skip
    record_answer_metrics(target, ref, report)
    out = {RECORDED_AS.get(m, m): report[m] for m in ANSWER_METRICS if report.get(m) is not None}
    return {**out, "questions": report.get("questions")}
