"""Evaluation gate: is a candidate's metric at least as good as the baseline's?

``ragops models promote NAME --alias prod --require-metric answer_f1`` refuses to move ``prod``
when the candidate's recorded ``answer_f1`` is worse than that of ``prod``'s current target.
Metrics come from the artifacts (training metrics, then ``record_eval`` results).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

#: Words of metric names where lower is better (losses, errors, latencies).
_LOWER_IS_BETTER = frozenset({"loss", "perplexity", "ppl", "error", "errors", "latency", "ms", "s", "seconds", "time", "wer", "cer"})


def metric_direction(metric: str) -> bool:
    """Guess whether higher is better from a metric's name.

    ``eval_loss``, ``latency_ms``, ``total_s`` → False; ``answer_f1``, ``pairwise_accuracy`` and
    rates such as ``tokens_per_s`` → True.
    """
    words = metric.lower().replace("-", "_").replace(".", "_").split("_")
    if "per" in words:  # a rate (tokens_per_s): more is better
        return True
    return not any(w in _LOWER_IS_BETTER for w in words)


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict.

    Attributes:
        metric: The compared metric.
        passed: Whether the candidate may be promoted.
        before: Baseline value (None when the baseline has none: the gate passes).
        after: Candidate value.
        delta: ``after - before`` when both exist.
        higher_is_better: Direction used.
        reason: One line explaining the verdict.
    """

    metric: str
    passed: bool
    before: float | None
    after: float | None
    delta: float | None
    higher_is_better: bool
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _number(metrics: Mapping[str, Any], metric: str) -> float | None:
    value = metrics.get(metric)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        return None
    return float(value)


def compare_metrics(
    before: Mapping[str, Any],
    after: Mapping[str, Any],
    metric: str,
    higher_is_better: bool = True,
    *,
    tolerance: float = 0.0,
) -> GateResult:
    """Compare one metric between a baseline (``before``) and a candidate (``after``).

    The candidate passes when it is not worse than the baseline by more than ``tolerance``
    (absolute), or when the baseline has no value for the metric (nothing to protect). A
    candidate without the metric never passes: the gate cannot vouch for it.

    Args:
        before: Baseline metrics (e.g. the alias's current target).
        after: Candidate metrics.
        metric: Metric name.
        higher_is_better: Direction of improvement.
        tolerance: Allowed regression, in the metric's units.

    Returns:
        A :class:`GateResult`.
    """
    a, b = _number(after, metric), _number(before, metric)
    if a is None:
        return GateResult(metric, False, b, None, None, higher_is_better,
                          f"the candidate has no recorded value for '{metric}' (record one with `ragops eval answers --model NAME`)")  # fmt: skip
    if b is None:
        return GateResult(metric, True, None, a, None, higher_is_better, f"no baseline value for '{metric}': {a:.4g} accepted")
    delta = a - b
    worse = -delta if higher_is_better else delta
    passed = worse <= tolerance
    arrow = "higher" if higher_is_better else "lower"
    verdict = "not worse" if passed else "worse"
    reason = f"{metric} {a:.4g} vs baseline {b:.4g} ({delta:+.4g}; {arrow} is better): {verdict}"
    return GateResult(metric, passed, b, a, delta, higher_is_better, reason)
