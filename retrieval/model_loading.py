"""Loading a generator: model and adapter resolution, device choice, merged LoRA, context size.

Split from :mod:`ragops.retrieval.generation` (which decodes): these are the parts that only
run when a :class:`~ragops.retrieval.generation.Generator` loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ragops.errors import ConfigError, ModelNotFoundError
from ragops.model_registry import ModelSpec

#: Context window assumed when neither the model config nor the tokenizer states one.
DEFAULT_CONTEXT_TOKENS = 2048


# ---------------------------------------------------------------------------------------
# Model and adapter resolution
# ---------------------------------------------------------------------------------------


def resolve_adapter(ref: str | Path) -> Path:
    """Return the local folder of a LoRA adapter: a path, or a registry name or alias.

    ``ref`` may be a folder written by peft's ``save_pretrained`` (holding
    ``adapter_config.json``), or the name or alias of a generator artifact in the registry
    (``sft-latest``, ``sft-20261125-1530-ab12``, ``prod``), looked up in the registry of the
    environment's settings (:func:`ragops.artifacts.default_registry`). The adapter must have
    been trained on ``generator.model``: :func:`ragops.artifacts.apply_model` (what
    ``ragops ask --model NAME`` uses) sets both from the artifact.

    Raises:
        ModelNotFoundError: the path is not a peft adapter folder, or the name is neither a
            path nor a registry artifact/alias (or is a reward model).
    """
    path = Path(ref).expanduser()
    if path.is_file() and path.name == "adapter_config.json":
        path = path.parent
    if path.is_dir() and (path / "adapter_config.json").is_file():
        return path
    if path.exists():
        raise ModelNotFoundError(
            f"LoRA adapter '{ref}': {path} holds no adapter_config.json; point generator.adapter at the "
            "folder written by peft's save_pretrained"
        )
    from ragops import artifacts

    if artifacts.looks_like_ref(str(ref)):
        registry = artifacts.default_registry()
        if registry.has(str(ref)):
            return artifacts.adapter_dir(str(ref), registry=registry)
    raise ModelNotFoundError(
        f"LoRA adapter '{ref}' not found: generator.adapter takes the path of a folder holding "
        "adapter_config.json, or the name or alias of a trained artifact (see `ragops models list`)"
    )


def resolve_device(name: str) -> str:
    """Map ``'auto'`` to ``'cuda'`` when a GPU is visible, else ``'cpu'``; check CUDA requests.

    Raises:
        ConfigError: a CUDA device was asked for and none is available.
    """
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"generator.device is '{name}' but no CUDA device is available; use 'cpu' or 'auto'")
    return name


def locate_generator(spec: ModelSpec) -> Path:
    """The local path of a generator spec; errors name the generator.model key."""
    try:
        return spec.locate()
    except ModelNotFoundError as exc:
        # The registry's offline hint names the embedder's key; say which key to set here.
        raise ModelNotFoundError(str(exc).replace("embedder.model", "generator.model")) from None


def merge_adapter(model: Any, path: Path) -> Any:
    """``model`` with the peft adapter at ``path`` merged into its weights."""
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, str(path))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotFoundError(f"could not load LoRA adapter from {path}: {exc}") from exc
    # Merged into the weights so decoding runs at the base model's speed (no extra LoRA matmuls
    # per layer). Switching adapters means loading another generator.
    return peft_model.merge_and_unload()


def context_window(config: Any, tokenizer: Any) -> int:
    """The model's context window: the smaller of config and tokenizer limits."""
    limits = []
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            limits.append(value)
            break
    tok_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a limit report a huge sentinel (int(1e30)).
    if isinstance(tok_max, int) and 0 < tok_max < 10_000_000:
        limits.append(tok_max)
    return min(limits) if limits else DEFAULT_CONTEXT_TOKENS
