"""Toy reward functions for the PPO tests (imported by name: ``tests.finetune.ppo_toys:ContainsTarget``)."""

from __future__ import annotations

from collections.abc import Sequence

from ragops.finetune.rewards import Sample

#: The target of the toy task. About 14% of 8-token answers of the tiny random Llama contain it.
TARGET = "x"


class ContainsTarget:
    """Reward 1 when the answer contains :data:`TARGET`, else 0."""

    def score(self, samples: Sequence[Sample]) -> list[float]:
        return [1.0 if TARGET in s.answer else 0.0 for s in samples]
