"""The shipped Grafana dashboard only queries series a running server really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx

from tests.serve.conftest import chat_body

DASHBOARD = Path(__file__).resolve().parents[2] / "configs" / "grafana" / "ragops.json"
#: Series names each Prometheus metric type exposes (prometheus_client, *_created disabled).
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "summary": ("_sum", "_count", "")}


def _expressions() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in dash["panels"] for t in p["targets"]]


def test_the_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["panels"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for title, expr in _expressions():
        assert expr.count("(") == expr.count(")"), title
        assert re.findall(r"ragops_\w+", expr), f"{title}: queries no ragops series"


def test_every_expression_names_a_series_the_server_exports(api: httpx.Client) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    api.post("/v1/chat/completions", json=chat_body(max_tokens=3))  # so the answer histograms have samples
    text = api.get("/metrics").text
    exported = {
        fam.name + suffix for fam in text_string_to_metric_families(text) for suffix in SUFFIXES.get(fam.type, ("",))
    }
    for title, expr in _expressions():
        for series in re.findall(r"ragops_\w+", expr):
            assert series in exported, f"panel '{title}': {series} is not exported by /metrics"
    # The panels cover what the issue lists.
    every = " ".join(expr for _, expr in _expressions())
    for needed in ("ragops_http_requests_total", "ragops_http_request_duration_seconds_bucket",
                   "ragops_time_to_first_token_seconds_bucket", "ragops_completion_tokens_total", "ragops_queue_depth",
                   "ragops_rejections_total", "ragops_feedback_total"):  # fmt: skip
        assert needed in every, needed
