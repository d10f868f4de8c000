"""The evaluation gate used by `ragops models promote --require-metric`."""

from __future__ import annotations

import pytest
from ragops.finetune.gate import compare_metrics, metric_direction


@pytest.mark.parametrize(
    "metric, higher",
    [("answer_f1", True), ("eval_pairwise_accuracy", True), ("recall_at_5", True), ("tokens_per_s", True),
     ("eval_loss", False), ("perplexity", False), ("latency_ms", False), ("total_s", False), ("time_to_first_token_s", False)],
)  # fmt: skip
def test_metric_direction(metric: str, higher: bool) -> None:
    assert metric_direction(metric) is higher


def test_compare_metrics() -> None:
    up = compare_metrics({"f1": 0.4}, {"f1": 0.5}, "f1")
    assert up.passed and up.delta == pytest.approx(0.1) and "not worse" in up.reason
    assert not compare_metrics({"f1": 0.5}, {"f1": 0.4}, "f1").passed
    assert compare_metrics({"f1": 0.5}, {"f1": 0.5}, "f1").passed  # equal is not worse
    assert compare_metrics({"f1": 0.5}, {"f1": 0.49}, "f1", tolerance=0.02).passed
    assert compare_metrics({"loss": 2.0}, {"loss": 1.5}, "loss", higher_is_better=False).passed
    assert not compare_metrics({"loss": 2.0}, {"loss": 2.5}, "loss", higher_is_better=False).passed
    first = compare_metrics({}, {"f1": 0.1}, "f1")
    assert first.passed and first.before is None
    missing = compare_metrics({"f1": 0.1}, {}, "f1")
    assert not missing.passed and "no recorded value" in missing.reason
    assert not compare_metrics({}, {"f1": "n/a"}, "f1").passed
    assert compare_metrics({"f1": 0.1}, {"f1": 0.2}, "f1").to_dict()["after"] == 0.2
