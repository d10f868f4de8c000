"""Shared body of the transformers-based loops (SFT, reward): resume, train, evaluate, finish.

The SFT and reward loops build their TRL trainer and hand it to :func:`train_and_finish`; it
resumes from the session's checkpoint (model, optimizer, scheduler, RNG and step — the whole
transformers checkpoint), trains to the planned number of optimizer steps, evaluates on the
held-out split and reports the adapter as the run's final checkpoint.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragops.finetune.callbacks import keep_metric
from ragops.finetune.session import (
    ARTIFACT_DIR,
    FINAL_MARKER,
    TrainSession,
    peak_rss_mb,
    unwrap_hf_checkpoint,
)


@dataclass(frozen=True)
class LoopOptions:
    """Trainer settings common to the loops (from :class:`~ragops.finetune.config.TrainerSettings`)."""

    learning_rate: float
    lr_scheduler: str
    warmup: float
    weight_decay: float
    max_grad_norm: float
    epochs: float
    max_steps: int | None
    batch_size: int
    grad_accum: int
    max_length: int
    eval_steps: int | None
    logging_steps: int
    save_steps: int
    gradient_checkpointing: bool
    precision: str
    seed: int

    @classmethod
    def from_settings(cls, data: Mapping[str, Any]) -> LoopOptions:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def training_arguments(
    opts: LoopOptions, *, output_dir: str, use_gpu: bool, has_eval: bool, num_to_keep: int, world_size: int
) -> dict[str, Any]:
    """Keyword arguments shared by SFTConfig and RewardConfig."""
    from ragops.finetune.models import precision_flags

    eval_strategy = "steps" if (has_eval and opts.eval_steps) else "no"
    return {
        "output_dir": output_dir,
        "max_steps": opts.max_steps or -1,
        "num_train_epochs": opts.epochs,
        "per_device_train_batch_size": opts.batch_size,
        "per_device_eval_batch_size": opts.batch_size,
        "gradient_accumulation_steps": opts.grad_accum,
        "learning_rate": opts.learning_rate,
        "lr_scheduler_type": opts.lr_scheduler,
        "warmup_steps": opts.warmup,
        "weight_decay": opts.weight_decay,
        "max_grad_norm": opts.max_grad_norm,
        "max_length": opts.max_length,
        "logging_steps": opts.logging_steps,
        "save_strategy": "steps",
        "save_steps": opts.save_steps,
        # Scratch copies only: the runner keeps its own num_to_keep copies.
        "save_total_limit": num_to_keep,
        "eval_strategy": eval_strategy,
        "eval_steps": opts.eval_steps if eval_strategy == "steps" else None,
        "report_to": [],
        "disable_tqdm": True,
        "seed": opts.seed,
        "data_seed": opts.seed,
        "gradient_checkpointing": opts.gradient_checkpointing,
        "use_cpu": not use_gpu,
        # DDP over gloo between CPU workers; a single process must not ask for a backend
        # (accelerate would then expect an initialised process group).
        "ddp_backend": ("nccl" if use_gpu else "gloo") if world_size > 1 else None,
        "ddp_find_unused_parameters": False,
        "dataloader_pin_memory": use_gpu,
        "dataloader_num_workers": 0,
        **precision_flags(opts.precision),
    }


def train_and_finish(
    trainer: Any,
    session: TrainSession,
    *,
    has_eval: bool,
    extra_metrics: Callable[[Any], dict[str, Any]] | None = None,
    before_train: Callable[[Any], dict[str, Any]] | None = None,
    extra_files: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Resume, train, evaluate, and report the final adapter; return the final metrics.

    Args:
        trainer: A prepared TRL trainer (PEFT model).
        session: The run's session.
        has_eval: Whether the trainer has a held-out split.
        extra_metrics: Computes more final metrics from the trainer (all ranks call it).
        before_train: Metrics measured before the first step of a fresh run (all ranks).
        extra_files: ``{relative path: text}`` written into the artifact folder (e.g. the
            held-out split, so the artifact can be evaluated again later).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    # They print every log dict to stdout; ragops records and displays metrics itself.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    metrics: dict[str, Any] = {}
    with session.checkpoint() as ckpt:
        if ckpt is not None and (ckpt / FINAL_MARKER).is_file():
            # A restart after the final report: the work is done, report it again.
            final = json.loads((ckpt / FINAL_MARKER).read_text())
            session.report_final(final, ckpt / ARTIFACT_DIR)
            return final
        resume_from = str(unwrap_hf_checkpoint(ckpt)) if ckpt is not None else None
        if resume_from is None and before_train is not None:
            metrics.update(before_train(trainer))
        output = trainer.train(resume_from_checkpoint=resume_from)
    state = trainer.state
    metrics.update(
        {
            "global_step": int(state.global_step),
            "planned_steps": int(state.max_steps),
            "train_loss": float(output.training_loss),
            "resumed_from_step": _step_of(resume_from),
        }
    )
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    if losses:
        metrics["final_loss"] = float(losses[-1])
    step_metrics = next((cb for cb in trainer.callback_handler.callbacks if hasattr(cb, "train_time_s")), None)
    if step_metrics is not None:
        metrics["train_time_s"] = round(step_metrics.train_time_s, 3)
    if has_eval:
        ev = trainer.evaluate()
        metrics.update({k: float(v) for k, v in ev.items() if isinstance(v, (int, float)) and k.startswith("eval_") and keep_metric(k)})
        if "eval_loss" in metrics and metrics["eval_loss"] < 50:
            metrics["eval_perplexity"] = math.exp(metrics["eval_loss"])
    if extra_metrics is not None:
        metrics.update(extra_metrics(trainer))
    metrics["peak_rss_mb"] = peak_rss_mb()
    metrics["world_size"] = session.world_size
    artifact = None
    if session.is_main:
        artifact = session.scratch / "adapter-out"
        trainer.model.save_pretrained(str(artifact), safe_serialization=True)
        for rel, text in (extra_files or {}).items():
            (artifact / rel).write_text(text, encoding="utf-8")
    session.report_final(metrics, artifact)
    return metrics


def _step_of(path: str | None) -> int:
    """The optimizer step of a transformers checkpoint folder (0 for a fresh start)."""
    if not path:
        return 0
    try:
        state = json.loads((Path(path) / "trainer_state.json").read_text())
        return int(state.get("global_step", 0))
    except (OSError, ValueError):
        return 0
