"""KL coefficient controllers: how strongly the policy is held near the reference model.

The per-token reward carries -β·KL(π ‖ π_ref); β comes from a controller:

* :class:`FixedKLController` — β stays put;
* :class:`AdaptiveKLController` — Ziegler et al. 2019 ("Fine-Tuning Language Models from
  Human Preferences", §2.2): after each rollout batch with mean sequence KL ``KL_t``,

      e_t = clip(KL_t / KL_target - 1, -0.2, 0.2)
      β  ← β · (1 + K_β · e_t),  K_β = n_steps / horizon

  where ``n_steps`` is the number of sequences in the batch. β rises while the policy drifts
  further than the target and falls while it stays closer; the ±0.2 clip bounds one update.

Both expose ``state_dict()`` / ``load_state_dict()`` (plain JSON) so a checkpoint restores β
exactly.
"""

from __future__ import annotations

from typing import Any, Protocol


class KLController(Protocol):
    """What the PPO loop needs from a controller."""

    value: float

    def update(self, current_kl: float, n_steps: int) -> float:
        """Feed the last batch's mean KL; return the new coefficient."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedKLController:
    """A constant KL coefficient.

    Args:
        init_coef: β.
    """

    def __init__(self, init_coef: float) -> None:
        self.value = float(init_coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "fixed", "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Ziegler et al.'s proportional controller (see the module docstring).

    Args:
        init_coef: Starting β.
        target: Target KL per sequence (nats).
        horizon: Sequences over which the error is corrected (larger: slower adaptation).
        max_error: Clip on the proportional error (0.2 in the paper).
    """

    def __init__(self, init_coef: float, target: float, horizon: int, max_error: float = 0.2) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError("target and horizon must be positive")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)
        self.max_error = float(max_error)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -self.max_error), self.max_error)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict[str, Any]:
        return {"mode": "adaptive", "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


def make_controller(mode: str, init_coef: float, target: float | None = None, horizon: int | None = None) -> KLController:
    """A controller from settings (``finetune.ppo.kl``).

    Raises:
        ValueError: an unknown mode, or adaptive without target/horizon.
    """
    if mode == "fixed":
        return FixedKLController(init_coef)
    if mode == "adaptive":
        if target is None or horizon is None:
            raise ValueError("the adaptive KL controller needs a target and a horizon")
        return AdaptiveKLController(init_coef, target, horizon)
    raise ValueError(f"unknown KL controller '{mode}'; allowed: fixed, adaptive")
