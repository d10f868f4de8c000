"""Base models for training: resolve, cache, load (causal LM or reward head), LoRA, precision.

The packaged generator is a GGUF file that transformers dequantizes on every load (~30 s and a
peak of several hundred MB per process). :func:`materialize_base` converts it once, on the
driver, to a plain safetensors folder under ``<data_dir>/cache/base-models``; every worker then
loads that in about a second. The artifact still records the configured base name, which the
generator loads (from the GGUF) to apply the adapter: the weights are the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragops.errors import ConfigError, ModelNotFoundError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BaseModelSource:
    """Where a worker loads the base model from.

    Attributes:
        name: The base model as configured (what artifacts record).
        path: Folder holding the weights (a Hugging Face folder, or the GGUF's folder).
        gguf_file: GGUF file name inside ``path`` (None for a safetensors folder).
        fallback_path, fallback_gguf: The original location, used by a worker that cannot see
            ``path`` (a cache on another node's disk).
    """

    name: str
    path: str
    gguf_file: str | None = None
    fallback_path: str | None = None
    fallback_gguf: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BaseModelSource:
        return cls(**data)

    def usable(self) -> tuple[str, str | None]:
        """``(path, gguf_file)`` that exists on this node."""
        p = Path(self.path)
        if p.is_dir() and ((p / "config.json").is_file() or (self.gguf_file and (p / self.gguf_file).is_file())):
            return self.path, self.gguf_file
        if self.fallback_path:
            return self.fallback_path, self.fallback_gguf
        raise ModelNotFoundError(f"base model '{self.name}' not found at {self.path} on this node")


def resolve_base(name: str) -> BaseModelSource:
    """Resolve a base model name (registry name or path) to its local weights.

    Raises:
        ModelNotFoundError: unknown model, package missing, or a hub id not in the cache.
    """
    from ragops.model_registry import resolve_model

    spec = resolve_model(name, kind="generator")
    try:
        path = spec.locate()
    except ModelNotFoundError as exc:
        raise ModelNotFoundError(str(exc).replace("embedder.model", "finetune.base_model")) from None
    if spec.gguf_file is None and not (path / "config.json").is_file():
        raise ModelNotFoundError(f"base model '{name}': {path} holds neither config.json nor a .gguf file")
    return BaseModelSource(name=name, path=str(path), gguf_file=spec.gguf_file)


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def materialize_base(source: BaseModelSource, cache_root: Path) -> BaseModelSource:
    """Convert a GGUF base once to a safetensors folder in ``cache_root``; others pass through.

    The cache key includes the GGUF file's size and mtime, so a new package version re-converts.
    Concurrent callers wait on a file lock instead of converting twice.
    """
    if not source.gguf_file:
        return source
    gguf = Path(source.path) / source.gguf_file
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_root / f"{Path(source.gguf_file).stem}-{key}"
    done = target / ".complete"
    with _file_lock(cache_root / f".{target.name}.lock"):
        if not done.is_file():
            from transformers import AutoModelForCausalLM, AutoTokenizer

            log.info("converting %s to safetensors under %s (once)", gguf, target)
            tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=f".{target.name}."))
            try:
                tok = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
                model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file)
                # The weights are already dequantized float tensors; transformers still flags the
                # model as GGUF-quantized and refuses to save it. Drop the flag, save plain weights.
                model.hf_quantizer = None
                if hasattr(model.config, "quantization_config"):
                    del model.config.quantization_config
                model.save_pretrained(tmp, safe_serialization=True)
                tok.save_pretrained(tmp)
                (tmp / ".complete").write_text("ok\n")
                if target.exists():
                    shutil.rmtree(target)
                os.replace(tmp, target)
            finally:
                if tmp.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
    return BaseModelSource(
        name=source.name, path=str(target), gguf_file=None, fallback_path=source.path, fallback_gguf=source.gguf_file
    )


# ---------------------------------------------------------------------------------------
# Quantization (QLoRA) and precision
# ---------------------------------------------------------------------------------------


def base_source(name: str, settings: Any) -> BaseModelSource:
    """The base model ``name`` as training loads it: resolved, and (with
    ``finetune.cache_base_model``) a GGUF converted once under ``<data_dir>/cache/base-models``."""
    source = resolve_base(name)
    if settings.finetune.cache_base_model:
        source = materialize_base(source, Path(settings.data_dir) / "cache" / "base-models")
    return source


def check_quantization(quantization: str, use_gpu: bool) -> None:
    """Refuse QLoRA where it cannot run (driver-side, before any worker starts).

    Raises:
        ConfigError: quantization asked for without ``finetune.use_gpu`` or without bitsandbytes.
    """
    if quantization == "none":
        return
    if not use_gpu:
        raise ConfigError(
            f"finetune.lora.quantization={quantization} (QLoRA) needs CUDA GPUs: run with --gpu on a GPU machine, "
            "or set finetune.lora.quantization=none for plain LoRA"
        )
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(
            f"finetune.lora.quantization={quantization} (QLoRA) needs the bitsandbytes package: "
            "pip install bitsandbytes, or set finetune.lora.quantization=none"
        )


def quantization_config(quantization: str) -> Any:
    """The ``BitsAndBytesConfig`` for QLoRA on a worker (None for plain LoRA).

    Raises:
        ConfigError: no CUDA device on this worker.
    """
    if quantization == "none":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    if not torch.cuda.is_available():
        raise ConfigError(f"finetune.lora.quantization={quantization}: no CUDA device on this worker")
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    return BitsAndBytesConfig(load_in_8bit=True)


def precision_flags(precision: str) -> dict[str, bool]:
    """``{"bf16", "fp16"}`` for TrainingArguments; 'auto' is bf16 on capable GPUs, else fp32.

    TRL defaults bf16 to True; on CPUs without bf16 units that is slower and changes the
    numbers, so 'auto' keeps fp32 there.
    """
    import torch

    if precision == "auto":
        bf16 = bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
        return {"bf16": bf16, "fp16": False}
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def load_tokenizer(source: BaseModelSource) -> Any:
    """The base model's tokenizer, with a pad token (the EOS token when it has none)."""
    from transformers import AutoTokenizer

    path, gguf = source.usable()
    extra = {"gguf_file": gguf} if gguf else {}
    tok = AutoTokenizer.from_pretrained(path, **extra)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(source: BaseModelSource, *, task: str, quantization: str = "none", dtype: str | None = None) -> Any:
    """Load the base as a causal LM (``task='causal-lm'``) or a 1-label reward model (``'seq-cls'``).

    Raises:
        ModelNotFoundError: the weights do not load.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, gguf = source.usable()
    kwargs: dict[str, Any] = {"gguf_file": gguf} if gguf else {}
    qcfg = quantization_config(quantization)
    if qcfg is not None:
        kwargs["quantization_config"] = qcfg
    if dtype:
        kwargs["dtype"] = getattr(torch, dtype)
    cls = AutoModelForCausalLM if task == "causal-lm" else AutoModelForSequenceClassification
    if task == "seq-cls":
        kwargs["num_labels"] = 1
    try:
        model = cls.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"could not load base model '{source.name}' from {path}: {exc}") from exc
    if qcfg is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def lora_config(settings: Any, task: str) -> Any:
    """A peft ``LoraConfig`` from :class:`~ragops.finetune.config.LoraSettings`.

    For a reward model the task is sequence classification, so peft also trains and saves the
    new score head (``modules_to_save``) with the adapter.
    """
    from peft import LoraConfig, TaskType

    return LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=settings.target_modules,
        task_type=TaskType.CAUSAL_LM if task == "causal-lm" else TaskType.SEQ_CLS,
        bias="none",
    )
