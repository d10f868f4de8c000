"""Prometheus metrics of the ingress replica (``GET /metrics``).

Ray Serve replicas are separate processes, so a process-global registry would only see its
own process. The design: each ingress replica keeps its own :class:`CollectorRegistry` and
feeds it with what downstream calls return (token counts, retrieval, rerank and generation
timings come back in every answer), plus what it sees itself (status, latency, in-flight calls
per downstream deployment, rejections, and the queue depth).

Queue depth (``ragops_queue_depth{deployment}``): calls this ingress replica made to a
deployment that Ray Serve's handle still holds because every replica of that deployment is at
its ``max_ongoing_requests``; a call leaves the count when a replica accepts it. This is the
queue ``max_queued_requests`` bounds (past it, 503). ``ragops_downstream_inflight_calls``
counts the same calls from sending to answer, so inflight minus queue depth is what the
replicas hold; a generator replica may hold up to ``max_ongoing_requests`` of them while it
decodes ``max_batch_size`` at a time (its scheduler merges the rest into the next batch). With one ingress replica (the laptop default) ``/metrics``
is the whole picture; with several, each scrape through the proxy reaches one replica, so on a
cluster scrape Ray's own metrics endpoint on every node instead (Ray Serve's built-in
``ray_serve_*`` series: requests, latency, queue lengths, replicas per deployment).

A/B splits: chat requests, their latency, tokens, generation timings and feedback carry a
``variant`` label (the split's pick, or what answered; ``""`` on other endpoints), so a
dashboard compares variants with ``sum by (variant)``.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
_FAST_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


class ServeMetrics:
    """The metrics of one ingress replica, in a private registry."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        disable_created_metrics()  # the *_created series only add noise to every scrape
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "ragops_http_requests", "HTTP requests by endpoint, method, status and variant (chat: the split's pick).",
            ["endpoint", "method", "status", "variant"], registry=r
        )
        self.latency = Histogram(
            "ragops_http_request_duration_seconds", "Time from request to the last byte of the response.",
            ["endpoint", "variant"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inflight = Gauge("ragops_http_inflight_requests", "Requests being answered, per endpoint.", ["endpoint"], registry=r)
        self.downstream_inflight = Gauge(
            "ragops_downstream_inflight_calls",
            "Calls to a deployment awaiting an answer (queued at the handle or running on a replica).",
            ["deployment"], registry=r,
        )  # fmt: skip
        self.queue_depth = Gauge(
            "ragops_queue_depth",
            "Calls from this ingress replica waiting in a deployment handle's queue for a replica (every "
            "replica at max_ongoing_requests), not yet handed to one; max_queued_requests bounds it (503 beyond).",
            ["deployment"], registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            "ragops_rejections", "Requests refused: auth, invalid, too_large, not_found, overloaded, timeout.", ["reason"], registry=r
        )
        self.completion_tokens = Counter("ragops_completion_tokens", "Tokens generated.", ["model", "variant"], registry=r)
        self.prompt_tokens = Counter(
            "ragops_prompt_tokens", "Prompt tokens read by the generator.", ["model", "variant"], registry=r
        )
        self.retrieval_seconds = Histogram(
            "ragops_retrieval_duration_seconds", "Search time in the retriever (encode excluded).",
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.rerank_seconds = Histogram(
            "ragops_rerank_duration_seconds", "Cross-encoder time per reranked query (its batch's).",
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.embed_seconds = Histogram(
            "ragops_query_embedding_duration_seconds", "Query embedding round trip seen by the ingress.",
            buckets=_FAST_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttft_seconds = Histogram(
            "ragops_time_to_first_token_seconds", "Generator time to first token (prefill included).",
            ["variant"], buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.generation_seconds = Histogram(
            "ragops_generation_duration_seconds", "Generator time per answer.", ["variant"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.feedback = Counter("ragops_feedback", "Feedback received by rating and the variant rated.", ["rating", "variant"], registry=r)
        self.batch_size = Histogram(
            "ragops_generator_batch_size", "Answers decoded together in one generator batch (whole answers).",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r,
        )  # fmt: skip

    def render(self) -> bytes:
        """The Prometheus text exposition."""
        return generate_latest(self.registry)

    def observe_search(self, timings: dict) -> None:
        """Record a search result's stage timings (search; rerank when reranked)."""
        self.retrieval_seconds.observe(float(timings.get("search_s", 0.0)))
        if "rerank_s" in timings:
            self.rerank_seconds.observe(float(timings["rerank_s"]))

    def observe_answer(self, model: str, answer: dict, *, variant: str = "") -> None:
        """Record what a generator answer reports (tokens, timings), labelled with its variant."""
        u = answer.get("usage") or {}
        self.completion_tokens.labels(model, variant).inc(int(u.get("completion_tokens", 0)))
        self.prompt_tokens.labels(model, variant).inc(int(u.get("prompt_tokens", 0)))
        t = answer.get("timings") or {}
        if "time_to_first_token_s" in t:
            self.ttft_seconds.labels(variant).observe(float(t["time_to_first_token_s"]))
        if "generate_s" in t:
            self.generation_seconds.labels(variant).observe(float(t["generate_s"]))
        if "batch_size" in answer:
            self.batch_size.observe(int(answer["batch_size"]))
