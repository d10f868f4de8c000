"""RLHF-style PPO as a train loop: LoRA policy, reference without a second copy, value head.

TRL 1.x no longer ships a PPO trainer (only SFT, reward and GRPO trainers remain), so the loop
is ours; it is deliberately small and every piece of arithmetic lives in
:mod:`ragops.finetune.ppo_math` (tested against hand-computed values). transformers samples and
computes logits, peft holds the adapter, Ray Train runs the workers (:func:`ppo_train_loop` is
an ordinary ``loop(config, session)`` for :func:`~ragops.finetune.runner.run_on_ray`).

One PPO step, on every worker (Ziegler et al. 2019; Ouyang et al. 2022; the "N implementation
details of RLHF with PPO" write-up for the details):

1. **Rollout** — take this worker's ``batch_size`` prompts of the step (a seeded permutation of
   the prompt list, so step s always sees the same prompts: resume needs no data-loader state)
   and sample answers from the policy (temperature, optional top-k). The sampling RNG is seeded
   from (seed, step, rank), so a resumed run samples exactly what an uninterrupted one would.
   An answer ends at its first end-of-sequence token, which is part of the action sequence; an
   answer that hits ``max_new_tokens`` is "runaway" (rewards may penalise it).
2. **Score** — the reward function (:mod:`ragops.finetune.rewards`) gives one scalar per answer,
   clipped to ±``reward.clip``.
3. **Reference and value forward** — log-probs of the sampled tokens under the policy (the
   "old" policy of this step) and the values, in one forward pass; log-probs under the
   reference = the *same* model inside ``with model.disable_adapter():`` (the base weights
   without the LoRA update: no second copy of the weights in memory).
4. **Advantages** — per-token reward r_t = -β·KL_t plus the score on the last token; GAE(γ, λ);
   advantages whitened over the whole rollout batch (mean and variance all-reduced across
   workers, so every worker uses the same statistics).
5. **Update** — ``ppo_epochs`` passes over the batch in shuffled minibatches: clipped surrogate
   + ``vf_coef`` × clipped value loss (- ``entropy_coef`` × entropy), gradients all-reduced by
   DDP, clipped to ``max_grad_norm``, AdamW. When an update's approximate KL (averaged across
   workers, so all stop together) exceeds ``target_approx_kl`` the step's remaining updates
   are skipped.
6. **KL controller** — β is updated from the batch's mean KL per answer
   (:mod:`ragops.finetune.kl`).

Choices worth knowing:

* The value head is one ``nn.Linear(hidden, 1)`` on the policy's last hidden states (a shared
  trunk, like TRL's old ``AutoModelForCausalLMWithValueHead``): one forward gives log-probs
  and values, and the value loss also shapes the adapter (hence the small ``vf_coef``). It is
  zero-initialised (values start at 0) and saved next to the adapter as ``value_head.safetensors``.
* Dropout is off during PPO (the model stays in eval mode, LoRA dropout is 0): the ratio
  π_new/π_old must be exactly 1 before the first update, and sampling and scoring must see the
  same network.
* Log-probs use ``logits / temperature`` — the distribution the tokens were sampled from.
* Checkpoints hold the adapter, the value head, AdamW's state (safetensors + JSON, no pickle),
  the KL controller's state, the step and the per-step history. The RNG needs no saving: it is
  reseeded from (seed, step, rank) at every step.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragops.finetune.session import (
    ARTIFACT_DIR,
    FINAL_MARKER,
    TrainSession,
    peak_rss_mb,
)

log = logging.getLogger(__name__)

#: Files of a PPO checkpoint folder.
ADAPTER_DIR = "adapter"
VALUE_HEAD_FILE = "value_head.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
OPTIMIZER_META = "optimizer.json"
STATE_FILE = "ppo_state.json"


# ---------------------------------------------------------------------------------------
# Model: policy (base + LoRA) and value head in one module
# ---------------------------------------------------------------------------------------


def build_policy_value(base: Any, lora: Any, init_adapter: str | None, seed: int) -> Any:
    """The base model with a trainable LoRA adapter (new, or an SFT adapter) and a value head.

    Args:
        base: A loaded ``AutoModelForCausalLM``.
        lora: :class:`~ragops.finetune.config.LoraSettings` (ignored with ``init_adapter``: the
            adapter keeps the rank and targets it was trained with).
        init_adapter: Folder of an adapter to start from (``--init``), or None.
        seed: Seeds the new adapter's initialisation.
    """
    import torch
    from peft import PeftModel, get_peft_model
    from ragops.finetune.models import lora_config

    torch.manual_seed(seed)
    if init_adapter:
        policy = PeftModel.from_pretrained(base, init_adapter, is_trainable=True)
        # Dropout off (see the module docstring); eval() below disables it too.
        for module in policy.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    else:
        cfg = lora_config(lora, "causal-lm")
        cfg.lora_dropout = 0.0
        policy = get_peft_model(base, cfg)
    return PolicyValue(policy)


@functools.cache
def _policy_value_class() -> type:
    import torch

    class _PolicyValue(torch.nn.Module):
        """``forward`` → (logits, values) of the last ``n`` response positions.

        Args:
            policy: A peft ``PeftModelForCausalLM``.
        """

        def __init__(self, policy: Any) -> None:
            super().__init__()
            self.policy = policy
            hidden = int(policy.get_base_model().config.hidden_size)
            self.value_head = torch.nn.Linear(hidden, 1)
            torch.nn.init.zeros_(self.value_head.weight)
            torch.nn.init.zeros_(self.value_head.bias)

        def forward(
            self, input_ids: Any, attention_mask: Any, position_ids: Any, n_response: int
        ) -> tuple[Any, Any]:
            out = self.policy(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                output_hidden_states=True, use_cache=False, logits_to_keep=n_response + 1,
            )  # fmt: skip
            # Position i predicts token i+1: the last n+1 positions' first n predict the response.
            logits = out.logits[:, -(n_response + 1) : -1]
            hidden = out.hidden_states[-1][:, -(n_response + 1) : -1]
            values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
            return logits, values

    return _PolicyValue


def PolicyValue(policy: Any) -> Any:
    """Wrap a peft policy with a zero-initialised value head (an ``nn.Module``)."""
    return _policy_value_class()(policy)


def response_logits(policy: Any, batch: Rollout, n: int) -> Any:
    """Logits of the response positions under ``policy`` (no value head: the reference pass)."""
    out = policy(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
        use_cache=False, logits_to_keep=n + 1,
    )  # fmt: skip
    return out.logits[:, -(n + 1) : -1]


# ---------------------------------------------------------------------------------------
# Rollouts
# ---------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A batch of prompts with sampled answers, left-padded prompts then right-padded answers.

    Attributes:
        input_ids, attention_mask, position_ids: ``[B, P + T]``.
        response: ``[B, T]`` sampled tokens (padding after the end-of-sequence token).
        mask: ``[B, T]``: 1 up to and including the first end-of-sequence token.
        finished: Whether each answer ended by itself (False: hit ``max_new_tokens``).
    """

    input_ids: Any
    attention_mask: Any
    position_ids: Any
    response: Any
    mask: Any
    finished: list[bool]

    def select(self, idx: Any) -> Rollout:
        return Rollout(
            self.input_ids[idx], self.attention_mask[idx], self.position_ids[idx], self.response[idx], self.mask[idx],
            [self.finished[i] for i in idx.tolist()],
        )  # fmt: skip

    @property
    def n(self) -> int:
        return int(self.response.shape[1])


def eos_ids(tokenizer: Any, model: Any) -> set[int]:
    """Every token id that ends an answer (the tokenizer's EOS and the generation config's)."""
    ids: set[int] = set()
    for value in (tokenizer.eos_token_id, getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def encode_prompts(tokenizer: Any, prompts: Sequence[Sequence[Mapping[str, str]]], max_tokens: int) -> list[list[int]]:
    """Chat-template token ids with the generation prompt; over-long prompts keep their last tokens."""
    out = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, Mapping):  # some tokenizers return a BatchEncoding regardless
            ids = ids["input_ids"]
        ids = list(ids)
        out.append(ids[-max_tokens:])
    return out


def sample_rollout(
    model: Any, prompt_ids: Sequence[Sequence[int]], *, pad_id: int, eos: set[int], max_new_tokens: int,
    temperature: float, top_k: int, seed: int, device: Any = "cpu",
) -> Rollout:
    """Sample one answer per prompt from ``model`` (a peft policy) and build the :class:`Rollout`.

    The same function runs on a training worker and in a rollout actor: with the same weights
    and seed both sample the same tokens.
    """
    import torch
    from transformers import GenerationConfig

    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    # Every knob that reshapes the sampling distribution is set explicitly: transformers fills
    # unset ones from the model's generation_config.json and then its global defaults (top_k=50!),
    # and PPO's log-probs must describe the distribution the tokens were really drawn from.
    gen = GenerationConfig(
        do_sample=True, temperature=temperature, top_k=top_k, top_p=1.0, min_p=0.0, typical_p=1.0,
        epsilon_cutoff=0.0, eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
        max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=sorted(eos) or None,
    )  # fmt: skip
    torch.manual_seed(seed)
    with torch.no_grad():
        seq = model.generate(input_ids=ids, attention_mask=attn, generation_config=gen)
    response = seq[:, width:]
    T = response.shape[1]
    is_eos = torch.zeros_like(response, dtype=torch.bool)
    for e in eos:
        is_eos |= response == e
    finished = is_eos.any(dim=1)
    # Length = first EOS index + 1 (the EOS is an action too), or T for a runaway answer.
    first = torch.where(finished, is_eos.float().argmax(dim=1), torch.full_like(finished, T - 1, dtype=torch.long))
    lengths = first + 1
    mask = (torch.arange(T, device=response.device)[None, :] < lengths[:, None]).long()
    response = torch.where(mask.bool(), response, torch.full_like(response, pad_id))
    full_attn = torch.cat([attn, mask], dim=1)
    position_ids = (full_attn.cumsum(dim=1) - 1).clamp(min=0)
    return Rollout(
        input_ids=torch.cat([ids, response], dim=1), attention_mask=full_attn, position_ids=position_ids,
        response=response, mask=mask.float(), finished=[bool(f) for f in finished.tolist()],
    )  # fmt: skip


def step_prompts(n_prompts: int, step: int, rank: int, per_worker: int, world: int, seed: int) -> list[int]:
    """Indices of the prompts worker ``rank`` uses at ``step`` (1-based).

    The prompt list is walked in seeded random permutations, one per pass; step s uses global
    positions ``(s-1)·G .. s·G-1`` (G = per_worker·world) and worker r its slice of them.
    Pure in (step, rank): a resumed run sees the same prompts.
    """
    out = []
    global_batch = per_worker * world
    for j in range(rank * per_worker, (rank + 1) * per_worker):
        pos = (step - 1) * global_batch + j
        epoch, offset = divmod(pos, n_prompts)
        out.append(_permutation(n_prompts, seed, epoch)[offset])
    return out


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(seed * 7919 + epoch).shuffle(order)
    return tuple(order)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The sampling seed of (step, rank)."""
    return (seed * 1_000_003 + step * 1009 + rank) % (2**31 - 1)


# ---------------------------------------------------------------------------------------
# Checkpoints (no pickle: safetensors and JSON)
# ---------------------------------------------------------------------------------------


def optimizer_to_files(state: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer ``state_dict`` → (tensors for safetensors, JSON-able rest)."""
    import torch

    tensors: dict[str, Any] = {}
    scalars: dict[str, Any] = {}
    for idx, per_param in state["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().clone()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_files(tensors: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_to_files`."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in [*tensors.items(), *meta["scalars"].items()]:
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(folder: Path, module: Any, optimizer: Any, state: Mapping[str, Any]) -> Path:
    """Write a resumable PPO checkpoint into ``folder``."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    module.policy.save_pretrained(str(folder / ADAPTER_DIR), safe_serialization=True)
    save_file({k: v.detach().contiguous() for k, v in module.value_head.state_dict().items()}, str(folder / VALUE_HEAD_FILE))
    tensors, meta = optimizer_to_files(optimizer.state_dict())
    save_file(tensors, str(folder / OPTIMIZER_FILE))
    (folder / OPTIMIZER_META).write_text(json.dumps(meta))
    (folder / STATE_FILE).write_text(json.dumps(dict(state), indent=1))
    return folder


def load_checkpoint(folder: Path, module: Any, optimizer: Any) -> dict[str, Any]:
    """Restore the adapter, value head and optimizer from ``folder``; return its JSON state."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter = folder / ADAPTER_DIR / "adapter_model.safetensors"
    result = set_peft_model_state_dict(module.policy, load_file(str(adapter)))
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint {folder}: adapter keys do not match the model ({unexpected[:3]} ...)")
    module.value_head.load_state_dict(load_file(str(folder / VALUE_HEAD_FILE)))
    meta = json.loads((folder / OPTIMIZER_META).read_text())
    optimizer.load_state_dict(optimizer_from_files(load_file(str(folder / OPTIMIZER_FILE)), meta))
    return json.loads((folder / STATE_FILE).read_text())


# ---------------------------------------------------------------------------------------
# Across workers
# ---------------------------------------------------------------------------------------


class Collective:
    """Sums and means across DDP workers (identity in a single process)."""

    def __init__(self, world_size: int) -> None:
        import torch.distributed as dist

        self.active = world_size > 1 and dist.is_available() and dist.is_initialized()
        self.world_size = world_size if self.active else 1

    def sum(self, values: Sequence[float]) -> list[float]:
        import torch

        t = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if self.active:
            import torch.distributed as dist

            # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
            if dist.get_backend() == "nccl":
                t = t.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu().tolist()

    def mean(self, values: Mapping[str, float]) -> dict[str, float]:
        keys = list(values)
        sums = self.sum([values[k] for k in keys])
        return {k: s / self.world_size for k, s in zip(keys, sums)}


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _device(use_gpu: bool, local_rank: int) -> Any:
    import torch

    return torch.device(f"cuda:{local_rank}") if use_gpu and torch.cuda.is_available() else torch.device("cpu")


def ppo_train_loop(config: dict[str, Any], session: TrainSession) -> None:
    """Train a LoRA policy with PPO and report it (with its value head) as the final checkpoint.

    Args:
        config: ``{"base": BaseModelSource dict, "prompts": [{"prompt", "question", "passages"}],
            "ppo": PPOSettings dict, "lora": LoraSettings dict, "reward": reward spec (see
            :func:`~ragops.finetune.rewards.build_reward`), "init_adapter": folder | None,
            "use_gpu", "fault"?, "run_id"?}``.
        session: Where metrics and checkpoints go.
    """
    import torch
    from ragops.finetune.callbacks import FaultInjection
    from ragops.finetune.config import LoraSettings, PPOSettings
    from ragops.finetune.kl import make_controller
    from ragops.finetune.models import BaseModelSource, load_model, load_tokenizer
    from ragops.finetune.ppo_math import masked_mean
    from ragops.finetune.rewards import build_reward

    cfg = PPOSettings.model_validate(config["ppo"])
    lora = LoraSettings.model_validate(config["lora"])
    base = BaseModelSource.from_dict(config["base"])
    device = _device(bool(config.get("use_gpu")), session.local_rank)
    dtype = "bfloat16" if cfg.precision == "bf16" or (
        cfg.precision == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported()
    ) else None  # fmt: skip

    tokenizer = load_tokenizer(base)
    model = load_model(base, task="causal-lm", quantization=lora.quantization, dtype=dtype)
    module = build_policy_value(model, lora, config.get("init_adapter"), cfg.seed).to(device)
    module.eval()  # no dropout anywhere (see the module docstring); gradients still flow
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    controller = make_controller(cfg.kl.mode, cfg.kl.init_coef, cfg.kl.target, cfg.kl.horizon)
    history: list[dict[str, float]] = []
    start_step = 0
    train_time = 0.0

    with session.checkpoint() as ckpt:
        if ckpt is not None and (ckpt / FINAL_MARKER).is_file():
            # A restart after the final report: the work is done, report it again.
            final = json.loads((ckpt / FINAL_MARKER).read_text())
            session.report_final(final, ckpt / ARTIFACT_DIR)
            return
        if ckpt is not None:
            state = load_checkpoint(ckpt, module, optimizer)
            controller.load_state_dict(state["kl"])
            history = list(state.get("history", []))
            start_step = int(state["step"])
            train_time = float(state.get("train_time_s", 0.0))
    resumed_from = start_step

    coll = Collective(session.world_size)
    if coll.active:
        from torch.nn.parallel import DistributedDataParallel

        ddp: Any = DistributedDataParallel(
            module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False
        )
    else:
        ddp = module
    policy = module.policy

    reward_fn = build_reward(config["reward"], device="cpu" if device.type == "cpu" else str(device))
    prompts = config["prompts"]
    prompt_ids = encode_prompts(tokenizer, [p["prompt"] for p in prompts], cfg.max_prompt_tokens)
    eos = eos_ids(tokenizer, policy)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else next(iter(eos))
    fault = config.get("fault")
    injector = FaultInjection(session.world_rank, **fault) if fault else None
    sampler = _make_sampler(config, cfg, session, pad_id, eos)

    for step in range(start_step + 1, cfg.max_steps + 1):
        t_step = time.perf_counter()
        idx = step_prompts(len(prompts), step, session.world_rank, cfg.batch_size, coll.world_size, cfg.seed)
        seed = step_seed(cfg.seed, step, session.world_rank)

        # 1. Rollout.
        t0 = time.perf_counter()
        if sampler is not None:
            batch = sampler.sample(policy, [prompt_ids[i] for i in idx], seed, device, coll)
        else:
            batch = sample_rollout(
                policy, [prompt_ids[i] for i in idx], pad_id=pad_id, eos=eos, max_new_tokens=cfg.max_new_tokens,
                temperature=cfg.temperature, top_k=cfg.top_k, seed=seed, device=device,
            )  # fmt: skip
        t_rollout = time.perf_counter() - t0

        # 2. Score.
        t0 = time.perf_counter()
        samples = _samples(tokenizer, batch, [prompts[i] for i in idx], eos)
        raw_scores = [float(s) for s in reward_fn.score(samples)]
        if len(raw_scores) != len(samples) or not all(math.isfinite(s) for s in raw_scores):
            raise ValueError(f"the reward function returned {len(raw_scores)} scores for {len(samples)} answers, or non-finite ones")
        scores = torch.tensor(raw_scores, dtype=torch.float32, device=device)
        if cfg.reward.clip is not None:
            scores = scores.clamp(-cfg.reward.clip, cfg.reward.clip)
        t_score = time.perf_counter() - t0

        # 3. Old log-probs, values, reference log-probs, entropy (no gradients).
        t0 = time.perf_counter()
        with torch.no_grad():
            old_logp, old_values, ref_logp, entropy = _forward_no_grad(module, policy, batch, cfg)
        t_forward = time.perf_counter() - t0

        # 4. Rewards and advantages.
        t0 = time.perf_counter()
        stats = _update(ddp, optimizer, params, batch, scores, old_logp, old_values, ref_logp, controller.value, cfg, coll, seed)
        t_update = time.perf_counter() - t0

        mask = batch.mask
        n_tokens = float(mask.sum())
        local = {
            "reward": float(scores.mean()),
            "reward_sq": float((scores**2).mean()),
            "kl": float((stats.pop("kl_per_token") * mask).sum(dim=1).mean()),
            "entropy": float(masked_mean(entropy, mask)),
            "response_len": float(mask.sum(dim=1).mean()),
            "runaway": float(sum(not f for f in batch.finished) / len(batch.finished)),
            **stats,
        }
        g = coll.mean(local)
        total_tokens, rollout_time = coll.sum([n_tokens, t_rollout])
        kl_coef = controller.value
        controller.update(g["kl"], n_steps=cfg.batch_size * coll.world_size)
        step_time = time.perf_counter() - t_step
        train_time += step_time
        row = {
            "step": step, "max_steps": cfg.max_steps,
            "reward": g["reward"], "reward_std": math.sqrt(max(0.0, g["reward_sq"] - g["reward"] ** 2)),
            "kl": g["kl"], "kl_coef": kl_coef, "entropy": g["entropy"],
            "approx_kl": g["approx_kl"], "clipfrac": g["clipfrac"], "value_clipfrac": g["value_clipfrac"],
            "policy_loss": g["policy_loss"], "value_loss": g["value_loss"], "loss": g["loss"],
            "grad_norm": g["grad_norm"], "updates": g["updates"], "early_stopped": g["early_stopped"],
            "response_len": g["response_len"], "runaway": g["runaway"],
            "tokens_per_s": total_tokens / step_time,
            # Workers sample in parallel: all their tokens over the mean rollout time.
            "rollout_tokens_per_s": total_tokens / max(rollout_time / coll.world_size, 1e-9),
            "time_rollout_s": t_rollout, "time_score_s": t_score, "time_forward_s": t_forward,
            "time_update_s": t_update, "step_time_s": step_time, "learning_rate": cfg.learning_rate,
            "peak_rss_mb": peak_rss_mb(),
        }  # fmt: skip
        session.log_metrics(row)
        history.append({"step": step, "reward": row["reward"], "kl": row["kl"], "kl_coef": kl_coef, "entropy": row["entropy"]})

        if step % cfg.save_steps == 0 and step < cfg.max_steps:
            state = {"step": step, "kl": controller.state_dict(), "history": history, "train_time_s": train_time,
                     "world_size": coll.world_size}  # fmt: skip
            folder = save_checkpoint(session.scratch / f"ckpt-{step:06d}", module, optimizer, state) if session.is_main else None
            session.report({"_type": "checkpoint", "step": step, "reward": row["reward"]}, checkpoint_dir=folder)
            if folder is not None:
                # The runner has its own copy now (Ray persisted it; the local runner copied it).
                shutil.rmtree(folder, ignore_errors=True)
        if injector is not None:
            injector.maybe_fire(step)

    if sampler is not None:
        sampler.close()
    final = _final_metrics(history, resumed_from, cfg.max_steps, train_time, controller.value, coll.world_size)
    artifact = None
    if session.is_main:
        artifact = session.scratch / "adapter-out"
        policy.save_pretrained(str(artifact), safe_serialization=True)
        from safetensors.torch import save_file

        save_file({k: v.detach().contiguous() for k, v in module.value_head.state_dict().items()}, str(artifact / VALUE_HEAD_FILE))
    session.report_final(final, artifact)


def _samples(tokenizer: Any, batch: Rollout, prompts: Sequence[Mapping[str, Any]], eos: set[int]) -> list[Any]:
    from ragops.finetune.rewards import Sample

    out = []
    for i, p in enumerate(prompts):
        n = int(batch.mask[i].sum())
        tokens = [t for t in batch.response[i, :n].tolist() if t not in eos]
        out.append(
            Sample(
                prompt=list(p["prompt"]), answer=tokenizer.decode(tokens, skip_special_tokens=True).strip(),
                question=p.get("question", ""), passages=list(p.get("passages") or []), finished=batch.finished[i],
            )
        )
    return out


def _forward_no_grad(module: Any, policy: Any, batch: Rollout, cfg: Any) -> tuple[Any, Any, Any, Any]:
    """(old log-probs, old values, reference log-probs, entropy), computed minibatch by minibatch."""
    import torch
    from ragops.finetune.ppo_math import entropy_from_logits, logprobs_from_logits

    outs: list[tuple[Any, Any, Any, Any]] = []
    n = batch.n
    for start in range(0, batch.response.shape[0], cfg.minibatch_size):
        mb = batch.select(torch.arange(start, min(start + cfg.minibatch_size, batch.response.shape[0])))
        logits, values = module(mb.input_ids, mb.attention_mask, mb.position_ids, n)
        logits = logits.float() / cfg.temperature
        logp = logprobs_from_logits(logits, mb.response)
        ent = entropy_from_logits(logits)
        # The reference: the same weights with the adapter switched off.
        with policy.disable_adapter():
            ref_logits = response_logits(policy, mb, n).float() / cfg.temperature
        ref = logprobs_from_logits(ref_logits, mb.response)
        outs.append((logp, values.float(), ref, ent))
    return tuple(torch.cat([o[k] for o in outs]) for k in range(4))  # type: ignore[return-value]


def _update(
    ddp: Any, optimizer: Any, params: list[Any], batch: Rollout, scores: Any, old_logp: Any, old_values: Any,
    ref_logp: Any, kl_coef: float, cfg: Any, coll: Collective, seed: int,
) -> dict[str, Any]:
    """Rewards → GAE → whitening → PPO epochs. Returns per-step statistics (this worker's)."""
    import torch
    from ragops.finetune.ppo_math import (
        approx_kl,
        entropy_from_logits,
        gae,
        logprobs_from_logits,
        masked_whiten,
        policy_loss,
        token_rewards,
        value_loss,
    )

    mask = batch.mask
    rewards, kl = token_rewards(scores, old_logp, ref_logp, mask, kl_coef, cfg.kl.estimator)
    advantages, returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        # Global statistics over every worker's tokens: Σx, Σx², n.
        s, s2, cnt = coll.sum([float((advantages * mask).sum()), float((advantages**2 * mask).sum()), float(mask.sum())])
        mean = s / max(cnt, 1.0)
        var = max(s2 / max(cnt, 1.0) - mean**2, 0.0) * (cnt / (cnt - 1) if cnt > 1 else 1.0)
        advantages = masked_whiten(advantages, mask, stats=(torch.tensor(mean), torch.tensor(var)))

    B = batch.response.shape[0]
    gen = torch.Generator().manual_seed(seed)
    totals = {"policy_loss": 0.0, "value_loss": 0.0, "loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "value_clipfrac": 0.0, "grad_norm": 0.0}
    updates = 0
    early = 0.0
    for _epoch in range(cfg.ppo_epochs):
        order = torch.randperm(B, generator=gen)
        for start in range(0, B, cfg.minibatch_size):
            idx = order[start : start + cfg.minibatch_size]
            mb = batch.select(idx)
            m = mask[idx]
            logits, vpred = ddp(mb.input_ids, mb.attention_mask, mb.position_ids, batch.n)
            logits = logits.float() / cfg.temperature
            new_logp = logprobs_from_logits(logits, mb.response)
            pl, pcf = policy_loss(new_logp, old_logp[idx], advantages[idx], m, cfg.clip_range)
            vl, vcf = value_loss(vpred.float(), old_values[idx], returns[idx], m, cfg.value_clip)
            loss = pl + cfg.vf_coef * vl
            if cfg.entropy_coef > 0:
                from ragops.finetune.ppo_math import masked_mean

                loss = loss - cfg.entropy_coef * masked_mean(entropy_from_logits(logits), m)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            updates += 1
            with torch.no_grad():
                akl = float(approx_kl(new_logp, old_logp[idx], m))
            for key, value in (("policy_loss", pl), ("value_loss", vl), ("loss", loss), ("clipfrac", pcf),
                               ("value_clipfrac", vcf), ("grad_norm", grad_norm)):  # fmt: skip
                totals[key] += float(value.detach()) if hasattr(value, "detach") else float(value)
            totals["approx_kl"] += akl
            if cfg.target_approx_kl is not None:
                # Every worker must take the same decision, or DDP's next all-reduce would hang.
                (mean_akl,) = coll.sum([akl])
                if mean_akl / coll.world_size > cfg.target_approx_kl:
                    early = 1.0
                    break
        if early:
            break
    out: dict[str, Any] = {k: v / max(updates, 1) for k, v in totals.items()}
    out.update({"updates": float(updates), "early_stopped": early, "kl_per_token": kl})
    return out


def _final_metrics(
    history: Sequence[Mapping[str, float]], resumed_from: int, max_steps: int, train_time: float, kl_coef: float, world: int
) -> dict[str, Any]:
    rewards = [h["reward"] for h in history]
    k = max(1, min(5, len(rewards) // 2 or 1))
    out: dict[str, Any] = {
        "global_step": int(history[-1]["step"]) if history else resumed_from,
        "planned_steps": max_steps,
        "resumed_from_step": resumed_from,
        "kl_coef": kl_coef,
        "train_time_s": round(train_time, 3),
        "world_size": world,
        "peak_rss_mb": peak_rss_mb(),
    }
    if rewards:
        out.update({
            "initial_reward": sum(rewards[:k]) / k,  # mean of the first k steps
            "final_reward": sum(rewards[-k:]) / k,  # mean of the last k steps
            "final_kl": float(history[-1]["kl"]),
            "final_entropy": float(history[-1]["entropy"]),
        })  # fmt: skip
    return out


def _make_sampler(config: Mapping[str, Any], cfg: Any, session: TrainSession, pad_id: int, eos: set[int]) -> Any:
    """The rollout actor pool client (``rollout.where: actors``), or None (sample on the workers)."""
    if cfg.rollout.where != "actors":
        return None
    from ragops.finetune.rollout import ActorSampler

    return ActorSampler(config, cfg, session, pad_id=pad_id, eos=eos)
