"""Reward model: TRL's ``RewardTrainer`` (Bradley-Terry loss on preference pairs) as a train loop.

The base model gets a one-output score head (``AutoModelForSequenceClassification``,
``num_labels=1``) and a LoRA adapter; peft trains and saves the new head with the adapter
(``modules_to_save``), so the artifact is small and loads on top of the same base.
:class:`RewardScorer` loads an artifact and scores answers — what the PPO loop will call.

Pairwise accuracy on the held-out split (share of pairs where the chosen answer scores higher)
is measured before training and after, and recorded as ``eval_pairwise_accuracy``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ragops.finetune.hf import LoopOptions, train_and_finish, training_arguments
from ragops.finetune.session import TrainSession


def reward_train_loop(config: dict[str, Any], session: TrainSession) -> None:
    """Train a reward model on preference pairs and report its adapter as the final checkpoint.

    Args:
        config: ``{"base", "train", "eval", "reward": RewardSettings dict, "lora", "use_gpu",
            "num_to_keep", "fault"?}``.
        session: Where metrics and checkpoints go.
    """
    from datasets import Dataset
    from ragops.finetune.config import LoraSettings, RewardSettings
    from ragops.finetune.models import (
        BaseModelSource,
        load_model,
        load_tokenizer,
        lora_config,
    )
    from trl import RewardConfig, RewardTrainer

    rw = RewardSettings.model_validate(config["reward"])
    lora = LoraSettings.model_validate(config["lora"])
    base = BaseModelSource.from_dict(config["base"])
    opts = LoopOptions.from_settings(rw.model_dump())
    train, held = config["train"], config.get("eval") or []

    tokenizer = load_tokenizer(base)
    model = load_model(base, task="seq-cls", quantization=lora.quantization)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(
        **training_arguments(
            opts, output_dir=str(session.scratch), use_gpu=bool(config.get("use_gpu")), has_eval=bool(held),
            num_to_keep=int(config.get("num_to_keep", 2)), world_size=session.world_size,
        ),
        center_rewards_coefficient=rw.center_rewards,
    )  # fmt: skip
    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(held) if held else None,
        processing_class=tokenizer,
        peft_config=lora_config(lora, "seq-cls"),
        callbacks=session.hf_callbacks(config.get("fault")),
    )
    trainer = session.prepare(trainer)

    def accuracy(prefix: str) -> Any:
        def measure(tr: Any) -> dict[str, Any]:
            if tr.eval_dataset is None:
                return {}
            out = tr.evaluate()
            acc = out.get("eval_accuracy")
            return {f"{prefix}pairwise_accuracy": float(acc)} if acc is not None else {}

        return measure

    train_and_finish(
        trainer, session, has_eval=bool(held), extra_metrics=accuracy("eval_"), before_train=accuracy("initial_eval_")
    )


class RewardScorer:
    """Scores (prompt, answer) pairs with a published reward model.

    Args:
        adapter_dir: The artifact's adapter folder (``Registry.local_dir``).
        base_model: The artifact's base model (registry name or path).
        device: torch device.

    Example:
        >>> scorer = RewardScorer(reg.local_dir("rm-latest"), reg.get("rm-latest").base_model)  # doctest: +SKIP
        >>> scorer.score([[{"role": "user", "content": "2+2?"}]], ["4"])  # doctest: +SKIP
    """

    def __init__(self, adapter_dir: str | Path, base_model: str, device: str = "cpu") -> None:
        self.adapter_dir = Path(adapter_dir)
        self.base_model = base_model
        self.device = device
        self._model: Any = None
        self._tok: Any = None

    def warm_up(self) -> None:
        """Load the base, the score head and the adapter."""
        if self._model is not None:
            return
        from peft import PeftModel
        from ragops.finetune.models import load_model, load_tokenizer, resolve_base

        source = resolve_base(self.base_model)
        self._tok = load_tokenizer(source)
        base = load_model(source, task="seq-cls")
        base.config.pad_token_id = self._tok.pad_token_id
        self._model = PeftModel.from_pretrained(base, str(self.adapter_dir)).to(self.device).eval()

    def score(self, prompts: Sequence[Sequence[Mapping[str, str]]], answers: Sequence[str]) -> list[float]:
        """One scalar reward per (prompt messages, answer)."""
        import torch

        self.warm_up()
        scores = []
        for prompt, answer in zip(prompts, answers):
            messages = [*prompt, {"role": "assistant", "content": answer}]
            ids = self._tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="pt")
            with torch.inference_mode():
                out = self._model(input_ids=ids["input_ids"].to(self.device), attention_mask=ids["attention_mask"].to(self.device))
            scores.append(float(out.logits[0, 0]))
        return scores

