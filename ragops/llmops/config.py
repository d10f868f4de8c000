"""The ``loop:`` settings: the A/B plan and the steps of ``ragops loop`` (pure pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # Same contract as ragops.config.StrictModel (not imported: ragops.config imports us).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ABSettings(_Strict):
    """How an A/B report decides (see :mod:`ragops.llmops.abtest`)."""

    min_effect: float = Field(
        0.1, gt=0, lt=1, description="Smallest up-rate difference worth detecting (absolute); sets the ratings needed."
    )
    alpha: float = Field(0.05, gt=0, lt=1, description="Two-sided significance level of the test.")
    power: float = Field(0.95, gt=0, lt=1, description="Chance of detecting a difference of min_effect.")
    confidence: float = Field(0.95, gt=0, lt=1, description="Level of the Wilson interval shown per variant.")


class LoopConfig(_Strict):
    """``ragops loop``: feedback → reward model → PPO → eval → gate → canary → decide."""

    canary: float = Field(0.1, gt=0, lt=1, description="Share of the alias' traffic the candidate gets in the A/B split.")
    min_feedback: int = Field(1, ge=1, description="Feedback records since the last loop needed to start one.")
    min_pairs: int = Field(
        4, ge=1, description="Preference pairs needed to train a new reward model; fewer: PPO uses `reward_fallback`."
    )
    reward_fallback: str = Field(
        "rag", min_length=1, description="PPO's reward when no reward model is trained this loop ('rag', 'mix' or an artifact)."
    )
    ppo_max_steps: int | None = Field(None, ge=1, description="PPO steps per loop (None: finetune.ppo.max_steps).")
    reward_max_steps: int | None = Field(None, ge=1, description="Reward-model steps per loop (None: finetune.reward.max_steps).")
    eval_data: str | None = Field(
        None, description="Questions with answers for the gate (`ragops eval answers --data`); required by `ragops loop`."
    )
    eval_k: int = Field(5, ge=1, le=100, description="Passages retrieved per eval question.")
    gate_metric: str = Field("answer_f1", min_length=1, description="Metric the candidate must not be worse on.")
    gate_tolerance: float = Field(0.0, ge=0, description="Regression of gate_metric still accepted (absolute).")
    server_url: str | None = Field(
        None, description="Evaluate through this running server (needed while `ragops serve` holds the embedded index)."
    )
    ab: ABSettings = Field(default_factory=ABSettings)

    @model_validator(mode="after")
    def _fallback_not_blank(self) -> LoopConfig:
        if not self.reward_fallback.strip():
            raise ValueError("reward_fallback must not be blank")
        return self
