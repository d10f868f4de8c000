"""The A/B report's statistics (ragops.llmops.abtest) and the report over a real request log."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from ragops.errors import InputError
from ragops.llmops.abtest import ab_report, decide, parse_since, ratings_needed, wilson_interval


def test_wilson_interval_matches_the_textbook_value() -> None:
    lo, hi = wilson_interval(81, 263)  # Wilson (1927) / Newcombe (1998) example: 0.2553 .. 0.3662
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12) and wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(0, 0) is None


def test_ratings_needed_follows_the_plan() -> None:
    # (1.96 + 1.645)^2 * 0.5 / 0.1^2 = 649.8
    assert ratings_needed(0.1) == 650
    assert ratings_needed(0.2) < ratings_needed(0.1) < ratings_needed(0.05)
    with pytest.raises(InputError):
        ratings_needed(0.0)


def test_decide_waits_then_judges() -> None:
    need = ratings_needed(0.2)
    wait = decide(10, 20, 15, 20, min_effect=0.2)
    assert wait["verdict"] == "not enough data" and wait["more_needed"] == {"A": need - 20, "B": need - 20}
    assert decide(int(0.5 * need), need, int(0.8 * need), need, min_effect=0.2)["verdict"] == "B better"
    assert decide(int(0.8 * need), need, int(0.5 * need), need, min_effect=0.2)["verdict"] == "B worse"
    assert decide(int(0.5 * need), need, int(0.5 * need), need, min_effect=0.2)["verdict"] == "no clear difference"


@pytest.mark.parametrize(("p_a", "p_b", "right"), [(0.5, 0.7, "B better"), (0.6, 0.4, "B worse"), (0.55, 0.55, "no clear difference")])
def test_the_verdict_is_right_at_the_planned_size(p_a: float, p_b: float, right: str) -> None:
    """200 seeded A/B tests of users with known up-rates: the verdict at the planned size is right >= 95%."""
    effect = 0.2
    need = ratings_needed(effect)
    hits = 0
    for seed in range(200):
        rng = random.Random(seed)
        up_a = sum(rng.random() < p_a for _ in range(need))
        up_b = sum(rng.random() < p_b for _ in range(need))
        hits += decide(up_a, need, up_b, need, min_effect=effect)["verdict"] == right
    assert hits >= 190


def test_parse_since_reads_durations_dates_and_seconds() -> None:
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("2026-12-07T00:00:00Z") == 1796601600.0
    assert parse_since("1796601600") == 1796601600.0
    assert parse_since(None) is None
    with pytest.raises(InputError, match="duration"):
        parse_since("yesterday")


def _write(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"torn', encoding="utf-8")


def test_report_joins_requests_and_feedback_per_variant(tmp_path: Path) -> None:
    requests, feedback = [], []
    for i in range(30):
        variant = "a" if i % 3 else "b"
        ok = i != 4
        requests.append({"request_id": f"r{i}", "requested_model": "prod", "variant": variant, "created": 100 + i,
                         "status": "ok" if ok else "error", "latency_s": 0.1 * (i + 1)})  # fmt: skip
        if ok and i % 2 == 0:
            feedback.append({"request_id": f"r{i}", "rating": "down", "created": 200})
            feedback.append({"request_id": f"r{i}", "rating": "up" if variant == "b" else "down", "created": 201})
    requests.append({"request_id": "other", "requested_model": "ragops", "variant": "base", "created": 150})
    _write(tmp_path / "requests.jsonl", requests)
    _write(tmp_path / "feedback.jsonl", feedback)
    report = ab_report(tmp_path, "prod", weights={"a": 0.7, "b": 0.3}, min_effect=0.5)
    by = {v["variant"]: v for v in report["variants"]}
    assert report["control"] == "a" and set(by) == {"a", "b"}
    assert by["a"]["requests"] == 20 and by["a"]["errors"] == 1 and by["b"]["requests"] == 10
    # The latest rating of a request counts, once.
    assert by["b"]["ratings"] == by["b"]["up"] == 5 and by["a"]["up"] == 0 and by["a"]["ratings"] == 9
    assert by["a"]["up_rate_interval"][0] == pytest.approx(0.0, abs=1e-12) and by["b"]["p50_latency_s"] is not None
    comparison = report["comparisons"][0]
    assert comparison["variant"] == "b" and comparison["verdict"] == "not enough data"
    assert comparison["more_needed"]["B"] == ratings_needed(0.5) - 5
    windowed = ab_report(tmp_path, "prod", since=115, weights={"a": 0.7, "b": 0.3}, min_effect=0.5)
    assert sum(v["requests"] for v in windowed["variants"]) == 15


def test_report_refuses_an_unknown_control(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="control variant 'zzz'"):
        ab_report(tmp_path, "prod", control="zzz", weights={"a": 1.0})
