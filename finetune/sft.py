"""Supervised fine-tuning with LoRA: TRL's ``SFTTrainer`` as a train loop.

:func:`sft_train_loop` is what every SFT worker runs (one Ray Train worker, or this process for
the local runner). Examples arrive as conversational prompt/completion pairs
(:mod:`ragops.finetune.datasets`), so TRL masks the prompt — system prompt, numbered passages
and question — and the loss covers the assistant's reply only (``loss_on: completion``); with
``loss_on: all`` they are joined into one conversation and every token counts. Packing, the LR
schedule, gradient accumulation and the held-out eval split come from
:class:`~ragops.finetune.config.SFTSettings`.
"""

from __future__ import annotations

from typing import Any

from ragops.finetune.hf import LoopOptions, train_and_finish, training_arguments
from ragops.finetune.session import TrainSession


def sft_train_loop(config: dict[str, Any], session: TrainSession) -> None:
    """Train a LoRA adapter on SFT examples and report it as the final checkpoint.

    Args:
        config: ``{"base": BaseModelSource dict, "train": [...], "eval": [...], "sft": SFTSettings
            dict, "lora": LoraSettings dict, "use_gpu", "num_to_keep", "fault"?}``.
        session: Where metrics and checkpoints go.
    """
    from datasets import Dataset
    from ragops.finetune.config import LoraSettings, SFTSettings
    from ragops.finetune.datasets import to_language_modeling
    from ragops.finetune.models import (
        BaseModelSource,
        load_model,
        load_tokenizer,
        lora_config,
    )
    from trl import SFTConfig, SFTTrainer

    sft = SFTSettings.model_validate(config["sft"])
    lora = LoraSettings.model_validate(config["lora"])
    base = BaseModelSource.from_dict(config["base"])
    opts = LoopOptions.from_settings(sft.model_dump())
    train, held = config["train"], config.get("eval") or []
    if sft.loss_on == "all":
        train, held = to_language_modeling(train), to_language_modeling(held)

    tokenizer = load_tokenizer(base)
    model = load_model(base, task="causal-lm", quantization=lora.quantization)
    # Packing without FlashAttention: 'wrapped' concatenates examples into full rows (BFD
    # packing needs padding-free attention kernels that CPUs and SDPA lack).
    packing_strategy = "bfd" if (config.get("use_gpu") and _has_flash_attention()) else "wrapped"
    args = SFTConfig(
        **training_arguments(
            opts, output_dir=str(session.scratch), use_gpu=bool(config.get("use_gpu")), has_eval=bool(held),
            num_to_keep=int(config.get("num_to_keep", 2)), world_size=session.world_size,
        ),
        packing=sft.packing,
        packing_strategy=packing_strategy,
        completion_only_loss=sft.loss_on == "completion",
        dataset_num_proc=None,
    )  # fmt: skip
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held) if held else None,
        processing_class=tokenizer,
        peft_config=lora_config(lora, "causal-lm"),
        callbacks=session.hf_callbacks(config.get("fault")),
    )
    trainer = session.prepare(trainer)
    train_and_finish(trainer, session, has_eval=bool(held))


def _has_flash_attention() -> bool:
    import importlib.util

    return importlib.util.find_spec("flash_attn") is not None
