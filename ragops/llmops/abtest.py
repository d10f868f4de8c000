"""A/B report: how the variants of one split did, from the request log and the feedback.

The question an A/B test answers here is whether users rate the candidate's answers up more
often than the control's. The test is a *fixed-horizon* two-proportion z-test, planned before
looking: for a smallest difference worth detecting (``min_effect``, absolute up-rate), a
two-sided level ``alpha`` and a ``power``, each variant needs

    n = (z(1 - alpha/2) + z(power))² · 2 · 0.25 / min_effect²

ratings (the variance taken at its worst, p = 0.5, so the plan never depends on the data it
is about to judge). Until both variants have that many ratings the verdict is
``not enough data`` with the number still missing; from then on it is ``B better`` or
``B worse`` when the test rejects equality, else ``no clear difference`` (any true difference
is then most likely smaller than ``min_effect``). Deciding once, at the planned size, is what
keeps the error rates at ``alpha`` and ``1 - power``; peeking and stopping at the first
significant look would not (``benchmarks/ab_simulation.py`` measures how often the verdict is
right).

Each variant's up-rate is shown with its Wilson score interval (95% by default), which stays
inside [0, 1] and is honest at small counts, where the normal interval is not.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from statistics import NormalDist
from typing import Any

from ragops.errors import InputError

VERDICT_BETTER = "B better"
VERDICT_WORSE = "B worse"
VERDICT_SAME = "no clear difference"
VERDICT_WAIT = "not enough data"


def wilson_interval(up: int, n: int, confidence: float = 0.95) -> tuple[float, float] | None:
    """Wilson score interval of an up-rate (None without ratings)."""
    if n <= 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = up / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def ratings_needed(min_effect: float, *, alpha: float = 0.05, power: float = 0.95) -> int:
    """Ratings each variant needs for the planned test (worst-case variance, p = 0.5)."""
    if not 0 < min_effect < 1:
        raise InputError(f"min_effect must lie in (0, 1), not {min_effect}")
    if not 0 < alpha < 1 or not 0 < power < 1:
        raise InputError("alpha and power must lie in (0, 1)")
    nd = NormalDist()
    z = nd.inv_cdf(1 - alpha / 2) + nd.inv_cdf(power)
    return math.ceil(z * z * 0.5 / (min_effect * min_effect))


def two_proportion_z(up_a: int, n_a: int, up_b: int, n_b: int) -> float:
    """Pooled two-proportion z statistic of B minus A (0 when undefined)."""
    if n_a == 0 or n_b == 0:
        return 0.0
    pooled = (up_a + up_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    return 0.0 if se == 0 else (up_b / n_b - up_a / n_a) / se


def decide(up_a: int, n_a: int, up_b: int, n_b: int, *, min_effect: float, alpha: float = 0.05,
           power: float = 0.95) -> dict[str, Any]:  # fmt: skip
    """The verdict on B against A from rating counts (see the module docstring).

    Returns:
        ``{verdict, needed_per_variant, more_needed: {A, B}, z, p_value, difference}``.
    """
    need = ratings_needed(min_effect, alpha=alpha, power=power)
    z = two_proportion_z(up_a, n_a, up_b, n_b)
    p_value = 2 * (1 - NormalDist().cdf(abs(z)))
    diff = (up_b / n_b - up_a / n_a) if n_a and n_b else None
    more = {"A": max(0, need - n_a), "B": max(0, need - n_b)}
    if more["A"] or more["B"]:
        verdict = VERDICT_WAIT
    elif p_value < alpha:
        verdict = VERDICT_BETTER if z > 0 else VERDICT_WORSE
    else:
        verdict = VERDICT_SAME
    return {"verdict": verdict, "needed_per_variant": need, "more_needed": more, "z": z, "p_value": p_value, "difference": diff}


@dataclass
class VariantStats:
    """What one variant of a split did in the report's window."""

    variant: str
    requests: int = 0
    errors: int = 0
    ratings: int = 0
    up: int = 0
    down: int = 0
    latencies: list[float] = field(default_factory=list, repr=False)

    @property
    def up_rate(self) -> float | None:
        return self.up / self.ratings if self.ratings else None

    @property
    def error_rate(self) -> float | None:
        return self.errors / self.requests if self.requests else None

    def percentile(self, q: float) -> float | None:
        """Latency percentile (nearest rank) of the answered requests."""
        if not self.latencies:
            return None
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, max(0, math.ceil(q / 100 * len(xs)) - 1))]

    def to_dict(self, confidence: float = 0.95) -> dict[str, Any]:
        d = asdict(self)
        d.pop("latencies")
        interval = wilson_interval(self.up, self.ratings, confidence)
        d.update(up_rate=self.up_rate, up_rate_interval=list(interval) if interval else None, error_rate=self.error_rate,
                 p50_latency_s=self.percentile(50), p99_latency_s=self.percentile(99))  # fmt: skip
        return d


def parse_since(text: str | None, *, now: float | None = None) -> float | None:
    """A window start as Unix time: ``30m``/``2h``/``7d`` ago, an ISO date/time, or Unix seconds.

    Raises:
        InputError: none of those.
    """
    if text is None or not str(text).strip():
        return None
    raw = str(text).strip()
    now = time.time() if now is None else now
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", raw)
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(raw)
    except ValueError:
        pass
    try:
        dt = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(f"--since '{raw}': give a duration (30m, 2h, 7d), an ISO date/time or Unix seconds") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def iso_to_unix(text: str) -> float:
    """``2026-12-07T10:00:00Z`` (the registry's timestamps) → Unix seconds."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a torn last line after a crash
            if isinstance(rec, dict):
                yield rec


def collect(
    requests: Iterable[Mapping[str, Any]],
    feedback: Iterable[Mapping[str, Any]],
    name: str,
    *,
    since: float | None = None,
) -> dict[str, VariantStats]:
    """Per-variant counts for requests to ``name`` at or after ``since``.

    A rating counts for the variant its request was answered by; several ratings of one
    request count once (the latest wins, as for training).
    """
    stats: dict[str, VariantStats] = {}
    variant_of: dict[str, str] = {}
    for rec in requests:
        if rec.get("requested_model") != name or (since is not None and float(rec.get("created", 0)) < since):
            continue
        variant = str(rec.get("variant") or rec.get("model") or "?")
        s = stats.setdefault(variant, VariantStats(variant))
        s.requests += 1
        if rec.get("status", "ok") == "ok":
            variant_of[str(rec.get("request_id"))] = variant
            if isinstance(rec.get("latency_s"), (int, float)):
                s.latencies.append(float(rec["latency_s"]))
        else:
            s.errors += 1
    latest: dict[str, str] = {}
    for fb in feedback:
        rid = str(fb.get("request_id"))
        if rid in variant_of and fb.get("rating") in ("up", "down"):
            latest[rid] = str(fb["rating"])
    for rid, rating in latest.items():
        s = stats[variant_of[rid]]
        s.ratings += 1
        if rating == "up":
            s.up += 1
        else:
            s.down += 1
    return stats


def ab_report(
    feedback_dir: Path,
    name: str,
    *,
    since: float | None = None,
    control: str | None = None,
    weights: Mapping[str, float] | None = None,
    min_effect: float = 0.1,
    alpha: float = 0.05,
    power: float = 0.95,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """The A/B report of route ``name``.

    Args:
        feedback_dir: Where ``requests.jsonl`` and ``feedback.jsonl`` are.
        name: The public model name the split serves.
        since: Window start (Unix seconds); None: the whole log.
        control: Variant A (the one the others are compared with); default: the variant with the
            largest weight in ``weights``, else the one with the most requests.
        weights: The split's current weights (shown, and to pick the control).

    Returns:
        ``{name, since, control, variants: [...], comparisons: [{variant, verdict, ...}]}``.

    Raises:
        InputError: ``control`` names a variant that served nothing and is not in the split.
    """
    from ragops.serve.feedback import FEEDBACK_FILE, REQUESTS_FILE

    ratings_needed(min_effect, alpha=alpha, power=power)  # validates the plan's parameters
    stats = collect(_read_jsonl(feedback_dir / REQUESTS_FILE), _read_jsonl(feedback_dir / FEEDBACK_FILE), name, since=since)
    for variant in weights or {}:
        stats.setdefault(variant, VariantStats(variant))
    if control is None and stats:
        if weights:
            control = max(weights, key=lambda v: (weights[v], v))
        else:
            control = max(stats.values(), key=lambda s: (s.requests, s.variant)).variant
    if control is not None and control not in stats:
        raise InputError(f"control variant '{control}' served no request to '{name}' (variants: {', '.join(stats) or 'none'})")
    comparisons = []
    if control is not None:
        a = stats[control]
        for variant, b in sorted(stats.items()):
            if variant == control:
                continue
            verdict = decide(a.up, a.ratings, b.up, b.ratings, min_effect=min_effect, alpha=alpha, power=power)
            comparisons.append({"control": control, "variant": variant, **verdict})
    ordered = sorted(stats.values(), key=lambda s: (s.variant != control, s.variant))
    return {
        "name": name,
        "since": since,
        "control": control,
        "weights": dict(weights) if weights else None,
        "plan": {"min_effect": min_effect, "alpha": alpha, "power": power, "confidence": confidence},
        "variants": [{**s.to_dict(confidence), "weight": (weights or {}).get(s.variant)} for s in ordered],
        "comparisons": comparisons,
    }
