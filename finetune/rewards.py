"""Reward functions for PPO: a plain class with one method, ``score(samples) -> list[float]``.

A :class:`Sample` is one rollout: the prompt messages it was sampled from, the question and the
numbered passages the prompt was built with (empty for plain prompts), the decoded answer and
whether generation ended on its own (``finished``) or hit ``max_new_tokens``.

Shipped rewards:

* :class:`RewardModelReward` — a reward model trained by ``ragops train reward`` (from the
  registry), through :class:`~ragops.finetune.reward.RewardScorer`;
* :class:`RagReward` (``rag``) — grounding in the prompt's passages, computed from text: each
  claim (sentence) of the answer is supported when a passage contains enough of its content
  words, citations ``[n]`` must point at a passage that supports the claim, uncited claims,
  empty and runaway answers are penalised;
* :class:`MixReward` (``mix``) — a weighted sum of other rewards.

Bring your own: any importable class with a ``score(self, samples)`` method, named as
``package.module:Class`` in ``--reward`` (it is constructed without arguments on each worker).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ragops.finetune.config import RagRewardSettings
# Support scoring is shared with serving's grounding check and the answer-quality benchmark.
from ragops.retrieval.prompts import CITATION
from ragops.retrieval.support import MAX_CITATION, cited_numbers, content_words, split_claims, support

__all__ = ["MAX_CITATION", "cited_numbers", "content_words", "split_claims", "support"]


@dataclass(frozen=True)
class Sample:
    """One rollout to score.

    Attributes:
        prompt: The chat messages the answer was sampled from.
        answer: The decoded answer (special tokens removed).
        question: The user's question (the last user turn for plain prompts).
        passages: The prompt's numbered passages (``{"n", "text", ...}``), in order.
        finished: False when generation stopped at ``max_new_tokens`` (a runaway answer).
    """

    prompt: list[dict[str, str]]
    answer: str
    question: str = ""
    passages: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = True


@runtime_checkable
class RewardFunction(Protocol):
    """Scores rollouts; higher is better. Must return one float per sample, in order."""

    def score(self, samples: Sequence[Sample]) -> list[float]: ...


# ---------------------------------------------------------------------------------------
# RAG-grounded reward
# ---------------------------------------------------------------------------------------

_CITE = CITATION  # the reader's citation syntax, so both agree on what a citation is


class RagReward:
    """How well an answer is grounded in — and cites — the passages of its prompt.

    For an answer with claims c_1..c_m (sentences with at least ``min_claim_words`` content
    words; shorter ones such as "Yes." are not judged):

        support(c)  = max over passages p of |words(c) ∩ words(p)| / |words(c)|
        cite(c)     = +citation_bonus          if c cites a passage with support ≥ min_support,
                      -wrong_citation_penalty  if it cites only passages below min_support
                                               (or numbers that are not passages),
                      -uncited_penalty         if it cites nothing
        reward      = mean_c [support_weight · support(c) + cite(c)]  -  runaway_penalty·[not finished]

    An empty answer scores ``-empty_penalty``; an answer without any claim (all sentences too
    short) scores 0 minus the runaway penalty. Token overlap is crude but cheap, needs no model,
    and is exactly what the citation-appending of SFT data uses
    (:func:`~ragops.finetune.datasets.supporting_passages`), so SFT and PPO agree on "supported".

    Args:
        settings: Weights and thresholds (``finetune.ppo.reward.rag``).
    """

    def __init__(self, settings: RagRewardSettings | Mapping[str, Any] | None = None) -> None:
        self.settings = RagRewardSettings.model_validate(settings or {})

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [self.score_one(s) for s in samples]

    def score_one(self, sample: Sample) -> float:
        """The reward of one sample (see the class docstring)."""
        cfg = self.settings
        answer = sample.answer.strip()
        if not answer:
            return -cfg.empty_penalty
        runaway = 0.0 if sample.finished else cfg.runaway_penalty
        texts = {int(p.get("n", i)): str(p.get("text", "")) for i, p in enumerate(sample.passages, start=1)}
        claims = [c for c in split_claims(answer) if len(content_words(_CITE.sub(" ", c))) >= cfg.min_claim_words]
        if not claims:
            return -runaway
        total = 0.0
        for claim in claims:
            per_passage = {n: support(claim, t) for n, t in texts.items()}
            total += cfg.support_weight * max(per_passage.values(), default=0.0)
            cited = cited_numbers(claim)
            if not cited:
                total -= cfg.uncited_penalty
            elif any(per_passage.get(n, 0.0) >= cfg.min_support for n in cited):
                total += cfg.citation_bonus
            else:
                total -= cfg.wrong_citation_penalty
        return total / len(claims) - runaway


# ---------------------------------------------------------------------------------------
# Reward model from the registry
# ---------------------------------------------------------------------------------------


class RewardModelReward:
    """Scores with a reward model published by ``ragops train reward``.

    Args:
        adapter_dir: The artifact's adapter folder (``Registry.local_dir``).
        base_model: Its base model (a registry name or a local folder).
        device: torch device for the reward model.
    """

    def __init__(self, adapter_dir: str, base_model: str, device: str = "cpu") -> None:
        from ragops.finetune.reward import RewardScorer

        self.scorer = RewardScorer(adapter_dir, base_model, device=device)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return self.scorer.score([s.prompt for s in samples], [s.answer for s in samples])


# ---------------------------------------------------------------------------------------
# Mix and construction from a spec
# ---------------------------------------------------------------------------------------


class MixReward:
    """Σ_i w_i · reward_i(sample).

    Args:
        parts: ``(weight, reward function)`` pairs.
    """

    def __init__(self, parts: Sequence[tuple[float, RewardFunction]]) -> None:
        if not parts:
            raise ValueError("a mix reward needs at least one component")
        self.parts = list(parts)

    def score(self, samples: Sequence[Sample]) -> list[float]:
        total = [0.0] * len(samples)
        for weight, fn in self.parts:
            for i, v in enumerate(fn.score(samples)):
                total[i] += weight * float(v)
        return total


def load_plugin(path: str) -> RewardFunction:
    """Instantiate ``package.module:Class`` (no arguments) and check it has ``score``.

    Raises:
        ValueError: a malformed path or a missing module/class.
        TypeError: the object has no ``score`` method.
    """
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"reward '{path}': expected 'package.module:Class'")
    try:
        obj = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"reward '{path}': cannot import it ({exc})") from None
    fn = obj() if isinstance(obj, type) else obj
    if not callable(getattr(fn, "score", None)):
        raise TypeError(f"reward '{path}': {attr} has no score(samples) method")
    return fn


def build_reward(spec: Mapping[str, Any], device: str = "cpu") -> RewardFunction:
    """A reward function from the plain spec the driver resolved (see ``ppo_train.resolve_reward``).

    Spec forms: ``{"type": "rag", "settings": {...}}``, ``{"type": "model", "adapter_dir",
    "base_model"}``, ``{"type": "plugin", "path"}``, ``{"type": "mix", "parts": [[weight, spec], ...]}``.
    """
    kind = spec["type"]
    if kind == "rag":
        return RagReward(spec.get("settings"))
    if kind == "model":
        return RewardModelReward(spec["adapter_dir"], spec["base_model"], device=device)
    if kind == "plugin":
        return load_plugin(spec["path"])
    if kind == "mix":
        return MixReward([(float(w), build_reward(s, device)) for w, s in spec["parts"]])
    raise ValueError(f"unknown reward spec type '{kind}'")
