"""The arithmetic of PPO for language models, as pure torch functions (no model, no state).

Every tensor here is ``[batch, T]`` over the *response* tokens of a rollout batch, with a
``mask`` that is 1 for real response tokens (up to and including the end-of-sequence token)
and 0 for the padding after it. Padding is only ever trailing, which the GAE recursion relies on.

Notation (per sequence, token t of the response):

* ``logp_t`` — log π(a_t | s_t) of the sampled token under the policy that sampled it;
* ``ref_logp_t`` — the same under the frozen reference (the base model without the adapter);
* ``V_t`` — the value head's estimate of the return from state s_t;
* ``r_t`` — the per-token reward: a KL penalty on every token plus the score on the last one.

The functions are tested against hand-computed values in ``tests/finetune/test_ppo_math.py``.
"""

from __future__ import annotations

from typing import Literal

import torch

KLEstimator = Literal["k1", "k3"]


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask (over ``dim``, or everything)."""
    return (x * mask).sum() if dim is None else (x * mask).sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Σ x·mask / Σ mask (0 where the mask is empty)."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries: Σ (x - μ)²·mask / (n - 1) (Bessel-corrected when ``unbiased``)."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_sum((x - mean) ** 2, mask) / n.clamp(min=1)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    stats: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Whitening over the masked entries: (x - μ) / sqrt(σ² + ε), zero on padding.

    Args:
        x, mask: Values and their mask.
        shift_mean: Subtract the mean (False keeps it: (x - μ)/σ + μ, as in some PPO code for rewards).
        eps: Numerical floor under the variance.
        stats: ``(mean, var)`` computed elsewhere — e.g. across all DDP workers, so every worker
            whitens its advantages with the global statistics of the rollout batch.
    """
    mean, var = stats if stats is not None else (masked_mean(x, mask), masked_var(x, mask))
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token] for each position: ``[B, T, V]``, ``[B, T]`` → ``[B, T]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of each position's token distribution: H = logsumexp(l) - Σ softmax(l)·l."""
    logits = logits.float()
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(dim=-1)


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: KLEstimator = "k1") -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from tokens sampled from π.

    * ``k1`` = logp - ref_logp: unbiased, can be negative per token; what Ziegler et al. (2019)
      and InstructGPT put in the reward, and the default here;
    * ``k3`` = (ρ - 1) - log ρ with ρ = π_ref/π = exp(ref_logp - logp): unbiased and never
      negative, lower variance (Schulman, "Approximating KL divergence", 2020).
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k3":
        log_ratio = ref_logp - logp
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator '{estimator}'; allowed: k1, k3")


def approx_kl(new_logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """How far an update moved the policy: mean k3 estimate of KL(π_old ‖ π_new) on the rollout tokens.

    With ρ = π_new/π_old = exp(new_logp - old_logp): mean over tokens of (ρ - 1) - log ρ. It is
    ≥ 0, and it is the quantity the early stop compares with ``target_approx_kl``.
    """
    log_ratio = new_logp - old_logp
    return masked_mean(torch.expm1(log_ratio) - log_ratio, mask)


def token_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, kl_coef: float,
    estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards r_t = -β·KL_t, plus the sequence's score on its last real token.

    Args:
        scores: ``[B]`` reward-function scores.
        logp, ref_logp, mask: ``[B, T]``.
        kl_coef: β (from the KL controller).
        estimator: See :func:`kl_penalty`.

    Returns:
        ``(rewards, kl)``, both ``[B, T]`` and zero on padding.
    """
    kl = kl_penalty(logp, ref_logp, estimator) * mask
    rewards = -kl_coef * kl
    # The index of the last real token: mask is 1…1 0…0, so its sum minus one.
    last = (mask.sum(dim=1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over trailing-padded sequences.

    δ_t = r_t + γ·V_{t+1} - V_t  and  A_t = δ_t + γλ·A_{t+1},  with V and A zero past the last
    real token (the episode ends at end-of-sequence). Returns R_t = A_t + V_t are the value
    head's regression targets.

    Returns:
        ``(advantages, returns)``, ``[B, T]``, zero on padding.
    """
    values = values * mask
    rewards = rewards * mask
    T = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        # On padding δ is 0 and the running advantage must not leak back; zero it there.
        last = last * mask[:, t]
        advantages[:, t] = last
    returns = advantages + values
    return advantages * mask, returns * mask


def policy_loss(
    new_logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, clip_range: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate (Schulman et al. 2017), as a loss to minimise.

    ρ_t = exp(new_logp - old_logp);  L = mean_t max(-A_t·ρ_t, -A_t·clip(ρ_t, 1-ε, 1+ε)).

    Returns:
        ``(loss, clipfrac)``: the loss and the share of tokens where the clipped term won.
    """
    ratio = torch.exp(new_logp - old_logp)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).float(), mask)
    return loss, clipfrac


def value_loss(
    new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, clip_range: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: ½·mean_t max((V_t - R_t)², (V_old,t + clip(V_t - V_old,t, ±ε) - R_t)²).

    The clip keeps one update from moving a value estimate more than ε from the one the
    advantages were computed with; ``clip_range=None`` gives the plain ½·(V - R)².

    Returns:
        ``(loss, clipfrac)``.
    """
    plain = (new_values - returns) ** 2
    if clip_range is None:
        return 0.5 * masked_mean(plain, mask), torch.zeros((), dtype=plain.dtype)
    clipped_v = old_values + torch.clamp(new_values - old_values, -clip_range, clip_range)
    clipped = (clipped_v - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    clipfrac = masked_mean((clipped > plain).float(), mask)
    return loss, clipfrac
