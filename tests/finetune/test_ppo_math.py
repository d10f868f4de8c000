"""PPO arithmetic, KL controllers and the RAG reward against hand-computed values (no model)."""

from __future__ import annotations

import math

import pytest
import torch
from ragops.finetune.kl import AdaptiveKLController, FixedKLController, make_controller
from ragops.finetune.ppo_math import (
    approx_kl,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    token_rewards,
    value_loss,
)
from ragops.finetune.rewards import (
    MixReward,
    RagReward,
    Sample,
    cited_numbers,
    split_claims,
)

T = torch.tensor


def test_gae_by_hand() -> None:
    # γ = 0.9, λ = 0.8; rewards [0, 0, 1], values [0.5, 0.4, 0.3]:
    # δ2 = 1 - 0.3 = 0.7                      A2 = 0.7
    # δ1 = 0.9·0.3 - 0.4 = -0.13              A1 = -0.13 + 0.72·0.7 = 0.374
    # δ0 = 0.9·0.4 - 0.5 = -0.14              A0 = -0.14 + 0.72·0.374 = 0.12928
    adv, ret = gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.4, 0.3]]), T([[1.0, 1.0, 1.0]]), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx([0.12928, 0.374, 0.7], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.62928, 0.774, 1.0], abs=1e-6)


def test_gae_stops_at_the_end_of_each_sequence() -> None:
    # Second row ends after 2 tokens: its padding must neither contribute nor leak back.
    # Row 2, γ = λ = 1: δ1 = 2 - 0.5 = 1.5, A1 = 1.5; δ0 = 0 + 0.5 - 1 = -0.5, A0 = -0.5 + 1.5 = 1.0.
    rewards = T([[0.0, 0.0, 1.0], [0.0, 2.0, 9.0]])
    values = T([[0.0, 0.0, 0.0], [1.0, 0.5, 7.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.5, 0.0]]
    assert ret[1].tolist() == [2.0, 2.0, 0.0]


def test_token_rewards_put_the_score_on_the_last_real_token() -> None:
    logp = T([[-1.0, -2.0, -0.5], [-1.0, -1.0, -3.0]])
    ref = T([[-1.5, -1.0, -0.5], [-2.0, -1.0, -1.0]])
    mask = T([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rewards, kl = token_rewards(T([2.0, -1.0]), logp, ref, mask, kl_coef=0.1)
    # k1 = logp - ref: row 1 [0.5, -1, 0]; row 2 [1, 0, (padding)].
    assert kl.tolist() == [[0.5, -1.0, 0.0], [1.0, 0.0, 0.0]]
    assert rewards.flatten().tolist() == pytest.approx([-0.05, 0.1, 2.0, -0.1, -1.0, 0.0])


def test_kl_estimators_by_hand() -> None:
    logp, ref = T([-1.0, -2.0]), T([-2.0, -1.0])
    assert kl_penalty(logp, ref, "k1").tolist() == [1.0, -1.0]
    # k3 = (ρ - 1) - log ρ with log ρ = ref - logp = [-1, 1].
    expected = [math.exp(-1) - 1 + 1, math.exp(1) - 1 - 1]
    assert kl_penalty(logp, ref, "k3").tolist() == pytest.approx(expected)
    assert all(v >= 0 for v in kl_penalty(logp, ref, "k3").tolist())
    with pytest.raises(ValueError, match="k1, k3"):
        kl_penalty(logp, ref, "k2")  # type: ignore[arg-type]


def test_clipped_policy_loss_by_hand() -> None:
    # ε = 0.2. Token 1: ρ = e^0.5 ≈ 1.6487, A = 1 → max(-1.6487, -1.2) = -1.2 (clipped).
    # Token 2: ρ = e^-0.5 ≈ 0.6065, A = -1 → max(0.6065, 0.8) = 0.8 (clipped).
    # Token 3: ρ = 1, A = 2 → -2 (unclipped).  Mean = (-1.2 + 0.8 - 2) / 3 = -0.8.
    old = T([[0.0, 0.0, 0.0]])
    new = T([[0.5, -0.5, 0.0]])
    loss, clipfrac = policy_loss(new, old, T([[1.0, -1.0, 2.0]]), T([[1.0, 1.0, 1.0]]), clip_range=0.2)
    assert float(loss) == pytest.approx(-0.8, abs=1e-6)
    assert float(clipfrac) == pytest.approx(2 / 3)
    # Masked tokens count for nothing.
    loss, _ = policy_loss(new, old, T([[1.0, -1.0, 2.0]]), T([[0.0, 0.0, 1.0]]), clip_range=0.2)
    assert float(loss) == pytest.approx(-2.0)


def test_clipped_value_loss_by_hand() -> None:
    # ε = 0.2. Token 1: V_old 0, V 1, R 1 → plain 0; clipped V = 0.2 → (0.2 - 1)² = 0.64 → 0.64.
    # Token 2: V_old 0, V 0.1, R 1 → plain 0.81; clipped V = 0.1 → 0.81 → 0.81.
    # Loss = ½ · mean(0.64, 0.81) = 0.3625; the clipped term was larger on token 1 only.
    loss, clipfrac = value_loss(T([[1.0, 0.1]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), T([[1.0, 1.0]]), clip_range=0.2)
    assert float(loss) == pytest.approx(0.3625)
    assert float(clipfrac) == pytest.approx(0.5)
    plain, _ = value_loss(T([[1.0, 0.1]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]), T([[1.0, 1.0]]), clip_range=None)
    assert float(plain) == pytest.approx(0.5 * 0.81 / 2)


def test_whitening_and_masked_stats() -> None:
    x = T([[1.0, 2.0, 3.0, 100.0]])
    mask = T([[1.0, 1.0, 1.0, 0.0]])
    assert float(masked_mean(x, mask)) == pytest.approx(2.0)
    assert float(masked_var(x, mask)) == pytest.approx(1.0)  # Bessel: ((1)+(0)+(1)) / 2
    w = masked_whiten(x, mask)
    assert w[0].tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    # External (all-worker) statistics are used as given.
    assert masked_whiten(x, mask, stats=(T(0.0), T(4.0)))[0].tolist() == pytest.approx([0.5, 1.0, 1.5, 0.0], abs=1e-4)


def test_approx_kl_entropy_and_logprobs() -> None:
    # log ρ = [ln 2, 0] → k3 = [(2 - 1) - ln 2, 0], mean over the 2 tokens.
    v = approx_kl(T([[math.log(2), 0.0]]), T([[0.0, 0.0]]), T([[1.0, 1.0]]))
    assert float(v) == pytest.approx((1 - math.log(2)) / 2)
    uniform = torch.zeros(1, 1, 4)
    assert float(entropy_from_logits(uniform)) == pytest.approx(math.log(4))
    assert float(logprobs_from_logits(uniform, torch.tensor([[2]]))) == pytest.approx(-math.log(4))


def test_adaptive_controller_follows_the_target() -> None:
    # Ziegler et al.: e = clip(KL/target - 1, ±0.2); β ← β(1 + e·n/horizon).
    c = AdaptiveKLController(0.1, target=6.0, horizon=100)
    assert c.update(12.0, n_steps=10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error clipped to +0.2
    assert c.value > 0.1
    before = c.value
    assert c.update(5.4, n_steps=10) == pytest.approx(before * (1 - 0.1 * 0.1))  # error -0.1
    assert c.value < before
    assert c.update(6.0, n_steps=10) == pytest.approx(c.value)  # on target: unchanged
    restored = AdaptiveKLController(0.5, target=6.0, horizon=100)
    restored.load_state_dict(c.state_dict())
    assert restored.value == c.value
    fixed = make_controller("fixed", 0.3)
    assert isinstance(fixed, FixedKLController) and fixed.update(100.0, 10) == 0.3
    with pytest.raises(ValueError, match="fixed, adaptive"):
        make_controller("pid", 0.1)


PASSAGES = [
    {"n": 1, "text": "Ray Data embeds documents in parallel and writes vectors to Qdrant."},
    {"n": 2, "text": "Geography notes: the capital of France is Paris, a large city on the Seine."},
]


def rag(answer: str, finished: bool = True) -> float:
    return RagReward().score([Sample(prompt=[], answer=answer, passages=PASSAGES, finished=finished)])[0]


def test_rag_reward_prefers_faithful_cited_answers() -> None:
    faithful = rag("The capital of France is Paris [2].")
    # 1 claim, support 1.0, cited passage supports it: 1.0 + 0.5.
    assert faithful == pytest.approx(1.5)
    wrong_citation = rag("The capital of France is Paris [1].")
    uncited = rag("The capital of France is Paris.")
    unsupported = rag("Bananas grow quickly in tropical orchards [2].")
    invented_source = rag("The capital of France is Paris [7].")
    assert faithful > wrong_citation and faithful > uncited and faithful > unsupported
    assert unsupported < uncited  # no support and a wrong citation
    assert invented_source == pytest.approx(wrong_citation)  # [7] is not a passage
    assert rag("") == pytest.approx(-1.0)
    assert rag("The capital of France is Paris [2].", finished=False) == pytest.approx(1.0)  # runaway: -0.5
    # Two claims, one supported and cited, one invented and uncited: (1.5 + (0 - 0.5)) / 2.
    mixed = rag("The capital of France is Paris [2]. Its mayor rides purple elephants daily.")
    assert mixed == pytest.approx(0.5)
    assert rag("Ray Data embeds documents and writes vectors to Qdrant [1]. Paris is the capital of France [2].") > mixed


def test_claims_and_citations_parsing() -> None:
    assert split_claims("Paris is big. [2] It is old!\nYes.") == ["Paris is big. [2]", "It is old!", "Yes."]
    assert cited_numbers("see [1, 3] and [2-3][9]") == [1, 3, 2, 9]


def test_mix_reward_weights_its_parts() -> None:
    class Const:
        def __init__(self, v: float) -> None:
            self.v = v

        def score(self, samples: list[Sample]) -> list[float]:
            return [self.v] * len(samples)

    mix = MixReward([(0.5, Const(2.0)), (2.0, Const(-1.0))])
    assert mix.score([Sample(prompt=[], answer="a")] * 2) == [-1.0, -1.0]
