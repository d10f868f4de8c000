"""Rollouts in a separate Ray actor pool (``finetune.ppo.rollout.where: actors``).

By default every training worker samples its own rollouts. With ``where: actors`` a pool of
``rollout.actors`` Ray actors — each holding the base model and a copy of the adapter, sized
with ``cpus_per_actor`` / ``gpus_per_actor`` — samples them instead: e.g. GPU actors generate
while CPU (or fewer GPU) workers run the updates, or several actors serve one worker's batch.

Protocol per step: rank 0 pushes the adapter's current weights to every actor (a LoRA adapter
is small: a few MB), all ranks meet at a barrier, then worker r asks actor ``r % actors`` for
its batch with its (step, rank) seed. Actors run the same :func:`~ragops.finetune.ppo.sample_rollout`
as the workers, so with the same weights and seed they sample the same tokens.

The actors are named after the run, created by whichever rank gets there first
(``get_if_exists``) and owned by it: when a worker group is restarted after a failure they
die with it and the restarted group creates fresh ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class Sampler:
    """Holds the policy (base + adapter) and samples rollouts; a plain class, Ray wraps it.

    Args:
        config: The PPO loop's config (``base``, ``lora``, ``init_adapter``, ``ppo``).
        threads: torch threads.
    """

    def __init__(self, config: Mapping[str, Any], threads: int = 1) -> None:
        self.config = dict(config)
        self.threads = threads
        self._policy: Any = None
        self.version = -1

    def warm_up(self) -> None:
        if self._policy is not None:
            return
        import torch
        from ragops.finetune.config import LoraSettings, PPOSettings
        from ragops.finetune.models import BaseModelSource, load_model
        from ragops.finetune.ppo import build_policy_value

        torch.set_num_threads(max(1, self.threads))
        cfg = PPOSettings.model_validate(self.config["ppo"])
        base = BaseModelSource.from_dict(self.config["base"])
        model = load_model(base, task="causal-lm")
        lora = LoraSettings.model_validate(self.config["lora"])
        self._policy = build_policy_value(model, lora, self.config.get("init_adapter"), cfg.seed).policy
        self._device = torch.device("cuda") if torch.cuda.is_available() and self.config.get("actor_gpu") else torch.device("cpu")
        self._policy.to(self._device).eval()

    def set_weights(self, version: int, weights: Mapping[str, Any]) -> int:
        """Load adapter weights (``get_peft_model_state_dict`` of the trainer's policy)."""
        from peft import set_peft_model_state_dict

        self.warm_up()
        set_peft_model_state_dict(self._policy, dict(weights))
        self.version = version
        return version

    def sample(self, prompt_ids: Sequence[Sequence[int]], seed: int, *, pad_id: int, eos: Sequence[int],
               max_new_tokens: int, temperature: float, top_k: int) -> dict[str, Any]:  # fmt: skip
        """Sample one answer per prompt; tensors come back on the CPU."""
        from ragops.finetune.ppo import sample_rollout

        self.warm_up()
        r = sample_rollout(
            self._policy, prompt_ids, pad_id=pad_id, eos=set(eos), max_new_tokens=max_new_tokens,
            temperature=temperature, top_k=top_k, seed=seed, device=self._device,
        )  # fmt: skip
        return {
            "input_ids": r.input_ids.cpu(), "attention_mask": r.attention_mask.cpu(), "position_ids": r.position_ids.cpu(),
            "response": r.response.cpu(), "mask": r.mask.cpu(), "finished": r.finished, "version": self.version,
        }  # fmt: skip


class ActorSampler:
    """A training worker's client of the rollout actor pool.

    Args:
        config: The PPO loop's config.
        cfg: :class:`~ragops.finetune.config.PPOSettings`.
        session: The worker's session (rank, run id).
        pad_id, eos: Padding and end-of-sequence token ids.
    """

    def __init__(self, config: Mapping[str, Any], cfg: Any, session: Any, *, pad_id: int, eos: set[int]) -> None:
        import ray

        self.cfg = cfg
        self.rank = session.world_rank
        self.pad_id = pad_id
        self.eos = sorted(eos)
        self.version = 0
        run = getattr(getattr(session, "recorder", None), "run_id", None) or "adhoc"
        rc = cfg.rollout
        actor_config = {k: config[k] for k in ("base", "lora", "init_adapter", "ppo") if k in config}
        actor_config["actor_gpu"] = rc.gpus_per_actor > 0
        remote = ray.remote(Sampler)
        self.actors = [
            remote.options(
                name=f"ragops-ppo-sampler-{run}-{i}", namespace="ragops", get_if_exists=True,
                num_cpus=rc.cpus_per_actor, num_gpus=rc.gpus_per_actor,
            ).remote(actor_config, max(1, int(rc.cpus_per_actor)))
            for i in range(rc.actors)
        ]

    def sample(self, policy: Any, prompt_ids: Sequence[Sequence[int]], seed: int, device: Any, coll: Any) -> Any:
        """Push the current adapter (rank 0), wait for every rank, sample this rank's batch."""
        import ray
        from peft import get_peft_model_state_dict
        from ragops.finetune.ppo import Rollout

        self.version += 1
        if self.rank == 0:
            weights = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(policy).items()}
            ref = ray.put(weights)
            ray.get([a.set_weights.remote(self.version, ref) for a in self.actors])
        coll.sum([0.0])  # a barrier: every actor has this step's weights before anyone samples
        actor = self.actors[self.rank % len(self.actors)]
        out = ray.get(
            actor.sample.remote(
                [list(p) for p in prompt_ids], seed, pad_id=self.pad_id, eos=self.eos,
                max_new_tokens=self.cfg.max_new_tokens, temperature=self.cfg.temperature, top_k=self.cfg.top_k,
            )
        )  # fmt: skip
        if out["version"] != self.version:
            raise RuntimeError(f"rollout actor has adapter version {out['version']}, expected {self.version}")
        return Rollout(
            input_ids=out["input_ids"].to(device), attention_mask=out["attention_mask"].to(device),
            position_ids=out["position_ids"].to(device), response=out["response"].to(device),
            mask=out["mask"].to(device), finished=list(out["finished"]),
        )  # fmt: skip

    def close(self) -> None:
        """Rank 0 removes the pool once every rank is done with it."""
        import ray

        if self.rank == 0:
            for a in self.actors:
                ray.kill(a)
