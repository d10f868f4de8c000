"""Fine-tuning settings: one pydantic model per concern, hooked into ``Settings.finetune``.

This module imports pydantic only: :mod:`ragops.config` imports it to build ``Settings``, and
the CLI builds its ``--help`` without paying for torch, transformers or Ray.

Every key can be set like any other setting: ``--set finetune.sft.learning_rate=1e-4``,
``RAGOPS_FINETUNE__WORKERS=2`` or a YAML file::

    finetune:
      base_model: smollm2-135m-instruct
      workers: 2
      lora: {r: 16, alpha: 32}
      sft: {max_steps: 200, batch_size: 4, max_length: 1024}
      ppo: {max_steps: 100, batch_size: 8, kl: {mode: adaptive, target: 6}, reward: {name: rag}}
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # Same contract as ragops.config.StrictModel (not imported: ragops.config imports us).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraSettings(_Strict):
    """The LoRA adapter trained on top of the frozen base model."""

    r: int = Field(16, ge=1, le=1024, description="Rank of the low-rank update.")
    alpha: int = Field(32, ge=1, description="Scaling numerator: the update is scaled by alpha / r.")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
        description="Module names that get an adapter (Llama-style attention projections by default), or 'all-linear'.",
    )
    quantization: Literal["none", "4bit", "8bit"] = Field(
        "none",
        description="QLoRA: load the frozen base in 4 or 8 bits (needs bitsandbytes and a CUDA GPU; refused otherwise).",
    )


class TrainerSettings(_Strict):
    """Optimisation settings shared by the SFT and reward trainers."""

    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate (AdamW).")
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field("cosine", description="Learning-rate schedule after warm-up.")
    warmup: float = Field(0.05, ge=0, description="Warm-up: a fraction of the steps when < 1, else a step count.")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training split (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides epochs.")
    batch_size: int = Field(4, ge=1, description="Examples per worker per forward pass.")
    grad_accum: int = Field(1, ge=1, description="Forward passes per optimizer step (gradient accumulation).")
    max_length: int = Field(1024, ge=16, description="Tokens per example; longer ones are truncated.")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of examples held out for evaluation.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N optimizer steps (None: only at the end of training)."
    )
    logging_steps: int = Field(1, ge=1, description="Record loss, learning rate and tokens/s every N steps.")
    save_steps: int = Field(50, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~25% slower."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="'auto': bf16 on GPUs that support it, fp32 otherwise (CPU)."
    )
    seed: int = Field(0, description="Seed for adapter init, data order and the eval split.")


class SFTSettings(TrainerSettings):
    """Supervised fine-tuning (RAG-grounded answers)."""

    loss_on: Literal["completion", "all"] = Field(
        "completion",
        description="'completion': loss on the assistant's reply only (the prompt and passages are masked); 'all': every token.",
    )
    packing: bool = Field(False, description="Pack several short examples into one max_length sequence.")


class RewardSettings(TrainerSettings):
    """Reward model on preference pairs (Bradley-Terry loss)."""

    learning_rate: float = Field(1e-4, gt=0, description="Peak learning rate (AdamW).")
    max_length: int = Field(1024, ge=16, description="Tokens per prompt+answer; longer pairs are dropped.")
    center_rewards: float | None = Field(
        None, ge=0, description="Coefficient pulling rewards towards 0 (keeps scores comparable across runs)."
    )


class PairSettings(_Strict):
    """Where (query, passage) training pairs for the retriever's models come from, and their negatives."""

    hard_negatives: int = Field(
        3, ge=0, le=32, description="Hard negatives mined per query from the current index (chunks of other documents)."
    )
    mine_mode: Literal["dense", "sparse", "hybrid"] = Field(
        "hybrid", description="Search used to mine hard negatives (what the retriever ranks high but is wrong)."
    )
    mine_skip: int = Field(
        2, ge=0, description="Top-ranked foreign chunks skipped before taking negatives (they are often unlabeled positives)."
    )
    mine_depth: int = Field(30, ge=1, le=200, description="Hits searched per query when mining negatives.")
    synthesize_filter_k: int = Field(
        20, ge=1, description="A synthetic query is kept only if BM25 ranks its own chunk within this many hits."
    )
    synthesize_generated: float = Field(
        0.5, ge=0, le=1,
        description="Share of --synthesize queries written by the generator; the rest are structural (headings, first sentences).",
    )  # fmt: skip
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of documents whose pairs are held out for evaluation.")
    eval_distractors: int = Field(
        1000, ge=0, description="Chunks of other documents sampled into the held-out evaluation's corpus (embedder)."
    )
    seed: int = Field(0, description="Seed for sampling chunks, negatives and the held-out documents.")


class _RetrieverTrainSettings(TrainerSettings):
    """What the embedder and reranker trainers share: full fine-tuning of a small encoder."""

    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "inverse_sqrt"
    ] = Field("linear", description="Learning-rate schedule after warm-up.")
    warmup: float = Field(0.1, ge=0, description="Warm-up: a fraction of the steps when < 1, else a step count.")
    save_steps: int = Field(100, ge=1, description="Checkpoint every N optimizer steps (and at the end).")
    logging_steps: int = Field(5, ge=1, description="Record loss and examples/s every N steps.")
    eval_k: int = Field(10, ge=1, le=100, description="Cut-off of the held-out nDCG/recall/MRR reported before and after.")
    pairs: PairSettings = Field(default_factory=PairSettings)


class EmbedderTrainSettings(_RetrieverTrainSettings):
    """Bi-encoder fine-tuning (``ragops train embedder``): in-batch plus mined hard negatives."""

    base_model: str | None = Field(None, description="Embedder to start from (registry name, artifact or path); None: embedder.model.")
    learning_rate: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW); full fine-tuning, no LoRA.")
    batch_size: int = Field(32, ge=2, description="Queries per batch: each one's positives are the others' in-batch negatives.")
    max_length: int = Field(256, ge=16, description="Tokens per passage or query; longer ones are truncated.")
    scale: float = Field(20.0, gt=0, description="Similarity scale of MultipleNegativesRankingLoss (1 / temperature).")


class RerankerTrainSettings(_RetrieverTrainSettings):
    """Cross-encoder fine-tuning (``ragops train reranker``): binary relevance on positives and mined negatives."""

    base_model: str | None = Field(
        None,
        description="Model to start from: a cross-encoder (retrieval.rerank.model) or a plain encoder, which gets a new "
        "score head; None: retrieval.rerank.model, else embedder.model.",
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW); full fine-tuning, no LoRA.")
    batch_size: int = Field(16, ge=1, description="(query, passage) pairs per batch.")
    max_length: int = Field(320, ge=16, description="Tokens per query+passage pair.")


class KLSettings(_Strict):
    """The KL penalty that holds the policy near the reference (the base without the adapter)."""

    mode: Literal["fixed", "adaptive"] = Field(
        "adaptive", description="'adaptive': Ziegler et al. 2019 proportional controller; 'fixed': constant coefficient."
    )
    init_coef: float = Field(0.05, ge=0, description="Starting KL coefficient β.")
    target: float = Field(6.0, gt=0, description="Adaptive: target KL per answer (nats, summed over its tokens).")
    horizon: int = Field(10000, ge=1, description="Adaptive: answers over which the KL error is corrected.")
    estimator: Literal["k1", "k3"] = Field(
        "k1", description="Per-token KL estimate in the reward: 'k1' = logπ - logπ_ref; 'k3' = (ρ-1) - log ρ."
    )


class RagRewardSettings(_Strict):
    """The ``rag`` reward: answers supported by, and citing, the passages the prompt was built with."""

    min_support: float = Field(
        0.5, ge=0, le=1, description="Share of a sentence's content words a passage must contain to support it."
    )
    min_claim_words: int = Field(2, ge=1, description="Sentences with fewer content words are not judged as claims.")
    support_weight: float = Field(1.0, ge=0, description="Weight of the mean support of the answer's claims.")
    citation_bonus: float = Field(0.5, ge=0, description="Per claim citing a passage that supports it.")
    uncited_penalty: float = Field(0.5, ge=0, description="Per claim without any [n] citation.")
    wrong_citation_penalty: float = Field(0.5, ge=0, description="Per claim whose citations point at no supporting passage.")
    empty_penalty: float = Field(1.0, ge=0, description="Reward of an empty answer is minus this.")
    runaway_penalty: float = Field(0.5, ge=0, description="Subtracted when the answer hit max_new_tokens without ending.")


class PPORewardSettings(_Strict):
    """Which reward scores the rollouts (``--reward`` overrides ``name``)."""

    name: str = Field(
        "rag",
        description="'rag', 'mix', a reward-model artifact or alias in the registry (e.g. rm-latest), or "
        "'package.module:Class' (a plain class with score(samples) -> list[float]).",
    )
    mix: dict[str, float] = Field(
        default_factory=lambda: {"rag": 1.0, "rm-latest": 1.0},
        description="'mix': weight per component reward (any name 'name' accepts except 'mix').",
    )
    clip: float | None = Field(10.0, gt=0, description="Scores are clipped to ±clip (None: no clip).")
    rag: RagRewardSettings = Field(default_factory=RagRewardSettings)

    @model_validator(mode="after")
    def _mix_is_flat(self) -> PPORewardSettings:
        if "mix" in self.mix:
            raise ValueError("finetune.ppo.reward.mix cannot contain 'mix'")
        if not self.mix:
            raise ValueError("finetune.ppo.reward.mix needs at least one component")
        return self


class RolloutSettings(_Strict):
    """Where rollouts are sampled."""

    where: Literal["workers", "actors"] = Field(
        "workers",
        description="'workers': each training worker samples its own rollouts; 'actors': a separate Ray actor pool "
        "samples them with the current adapter (e.g. GPU actors for generation, CPU workers for updates).",
    )
    actors: int = Field(1, ge=1, description="'actors': pool size (shared by all training workers).")
    cpus_per_actor: float = Field(1.0, gt=0, description="'actors': CPUs reserved per actor (also its torch threads).")
    gpus_per_actor: float = Field(0.0, ge=0, description="'actors': GPUs per actor.")


class PPOSettings(_Strict):
    """RLHF-style PPO: LoRA policy, reference = adapter disabled, value head, KL-penalised reward."""

    max_steps: int = Field(100, ge=1, description="PPO steps (one rollout batch and its updates each).")
    batch_size: int = Field(8, ge=1, description="Prompts per worker per step (the rollout batch).")
    minibatch_size: int = Field(4, ge=1, description="Rollouts per gradient step within a PPO epoch.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout batch.")
    learning_rate: float = Field(5e-5, gt=0, description="AdamW learning rate (constant).")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm (adapter + value head).")
    max_prompt_tokens: int = Field(1024, ge=8, description="Longer prompts keep their last tokens (the question).")
    max_new_tokens: int = Field(64, ge=1, description="Answer length cap; an answer that hits it is 'runaway'.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off; PPO's ratios assume the full distribution).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount in GAE.")
    lam: float = Field(0.95, ge=0, le=1, description="λ in GAE.")
    clip_range: float = Field(0.2, gt=0, description="ε of the clipped surrogate.")
    value_clip: float | None = Field(0.2, gt=0, description="ε of the clipped value loss (None: unclipped).")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss (the value head shares the policy's trunk).")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight (entropy is always logged).")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the whole rollout batch (all workers).")
    target_approx_kl: float | None = Field(
        0.1, gt=0, description="Stop the step's remaining updates when an update's approximate KL exceeds this."
    )
    kl: KLSettings = Field(default_factory=KLSettings)
    reward: PPORewardSettings = Field(default_factory=PPORewardSettings)
    rollout: RolloutSettings = Field(default_factory=RolloutSettings)
    save_steps: int = Field(10, ge=1, description="Checkpoint every N steps (and at the end).")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="'auto': bf16 on capable GPUs, fp32 on CPU.")
    seed: int = Field(0, description="Seeds the adapter, the value head, prompt order and sampling (per step).")

    @model_validator(mode="after")
    def _minibatch_fits(self) -> PPOSettings:
        if self.minibatch_size > self.batch_size:
            raise ValueError("finetune.ppo.minibatch_size must not exceed finetune.ppo.batch_size")
        return self


class DataSettings(_Strict):
    """How training files become examples."""

    runner: Literal["ray", "local"] = Field(
        "ray", description="'ray' builds datasets with Ray Data; 'local' runs the same stages in-process."
    )
    retrieve_k: int = Field(3, ge=1, le=50, description="Passages retrieved for records with \"retrieve\": true.")
    cite: bool = Field(
        True, description="Append [n] citations to target answers for the passages that contain the answer."
    )
    max_examples: int | None = Field(None, ge=1, description="Use only the first N records (quick experiments).")


class FinetuneConfig(_Strict):
    """Fine-tuning on Ray Train: SFT with LoRA, reward models, PPO, checkpoints and the artifact registry."""

    base_model: str | None = Field(
        None, description="Model to fine-tune (registry name or path); None uses generator.model."
    )
    lora: LoraSettings = Field(default_factory=LoraSettings)
    sft: SFTSettings = Field(default_factory=SFTSettings)
    reward: RewardSettings = Field(default_factory=RewardSettings)
    ppo: PPOSettings = Field(default_factory=PPOSettings)
    embedder: EmbedderTrainSettings = Field(default_factory=EmbedderTrainSettings)
    reranker: RerankerTrainSettings = Field(default_factory=RerankerTrainSettings)
    data: DataSettings = Field(default_factory=DataSettings)
    runner: Literal["ray", "local"] = Field(
        "ray", description="'ray' runs Ray Train workers; 'local' trains in this process (one worker, no Ray)."
    )
    workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel DDP: gloo on CPU, NCCL on GPU).")
    use_gpu: bool = Field(False, description="One GPU per worker (ScalingConfig(use_gpu=True)).")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs reserved per worker (also its torch threads).")
    num_to_keep: int = Field(2, ge=1, description="Checkpoints kept per run (older ones are deleted).")
    max_failures: int = Field(
        1, ge=-1, description="Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited)."
    )
    storage_path: str | None = Field(
        None, description="Where runs and checkpoints live: a path or URI (s3://, gs://); None: <data_dir>/runs."
    )
    registry_path: str | None = Field(
        None, description="Where published artifacts live: a path or URI; None: <data_dir>/registry."
    )
    cache_base_model: bool = Field(
        True,
        description="Convert a GGUF base model once to safetensors under <data_dir>/cache so workers load it in seconds.",
    )

    @model_validator(mode="after")
    def _local_is_one_worker(self) -> FinetuneConfig:
        if self.runner == "local" and self.workers > 1:
            raise ValueError("finetune.runner 'local' trains in one process: set finetune.workers=1 or runner=ray")
        return self
