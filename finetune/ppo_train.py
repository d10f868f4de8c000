"""``ragops train ppo``: prompts → PPO run on Ray Train (or in-process) → ``ppo-latest``.

:func:`train_ppo` is what the CLI calls. It resolves, on the driver, everything a worker must
not have to look up: the base model (cached as safetensors once), the initial adapter
(``--init``: an SFT artifact, alias or folder), the reward (``--reward``: ``rag``, ``mix``, a
reward-model artifact or alias, or a ``package.module:Class`` plugin — turned into a plain spec
that :func:`~ragops.finetune.rewards.build_reward` rebuilds on each worker) and the prompts.
Then it runs :func:`~ragops.finetune.ppo.ppo_train_loop` through the run machinery shared with
SFT (:func:`ragops.finetune.train._execute`: run record, resume, checkpoints, publish).

The artifact's lineage (``config.lineage``): base model, initial adapter, reward (with the
reward model's artifact name), prompts source and hash; the registry adds the code version.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ragops.finetune.train import (
    Progress,
    TrainResult,
    _execute,
    _with_overrides,
    fault_from_env,
)

from ragops.artifacts import Registry
from ragops.config import Settings
from ragops.errors import ConfigError, InputError, ModelNotFoundError

#: Reward names that are not registry artifacts.
BUILTIN_REWARDS = ("rag", "mix")


def resolve_reward(name: str, settings: Settings) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--reward NAME`` → (spec for the workers, lineage record).

    Raises:
        InputError: an unknown name, a plugin that does not import, an artifact that is not a
            reward model, or a nested mix.
    """
    from ragops.finetune.models import base_source

    cfg = settings.finetune.ppo.reward
    if name == "rag":
        return {"type": "rag", "settings": cfg.rag.model_dump(mode="json")}, {"name": "rag"}
    if name == "mix":
        # The settings refuse a 'mix' inside finetune.ppo.reward.mix, so this does not recurse further.
        parts, lineage = [], []
        for part, weight in cfg.mix.items():
            spec, info = resolve_reward(part, settings)
            parts.append([float(weight), spec])
            lineage.append({**info, "weight": float(weight)})
        return {"type": "mix", "parts": parts}, {"name": "mix", "parts": lineage}
    if ":" in name and not Path(name).exists():
        from ragops.finetune.rewards import load_plugin

        try:
            load_plugin(name)  # fail here, with one message, rather than on every worker
        except (ValueError, TypeError) as exc:
            raise InputError(str(exc)) from None
        return {"type": "plugin", "path": name}, {"name": name}
    registry = Registry.from_settings(settings)
    try:
        art = registry.get(name)
    except ModelNotFoundError:
        raise InputError(
            f"unknown reward '{name}': expected 'rag', 'mix', a reward model in the registry (e.g. rm-latest; see "
            "`ragops models list`) or 'package.module:Class'"
        ) from None
    if art.kind != "reward":
        raise InputError(f"--reward {name}: artifact {art.name} is a {art.kind} model, not a reward model")
    source = base_source(art.base_model, settings)
    base = source.path if source.gguf_file is None else art.base_model
    spec = {"type": "model", "adapter_dir": str(registry.local_dir(art.name)), "base_model": base}
    return spec, {"name": name, "artifact": art.name, "base_model": art.base_model}


def resolve_init(ref: str | None, settings: Settings) -> tuple[str | None, str | None, str | None]:
    """``--init`` → (adapter folder, artifact name, its base model); a folder is used as is.

    Raises:
        InputError: not an adapter folder, or a reward model.
    """
    if not ref:
        return None, None, None
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "adapter_config.json").is_file():
            raise InputError(f"--init {ref}: not an adapter folder (no adapter_config.json)")
        return str(path.resolve()), None, None
    registry = Registry.from_settings(settings)
    try:
        art = registry.get(ref)
    except ModelNotFoundError as exc:
        raise InputError(f"--init {ref}: {exc}") from None
    if art.kind == "reward":
        raise InputError(f"--init {ref}: {art.name} is a reward model; start from an sft (or ppo) adapter")
    return str(registry.local_dir(art.name)), art.name, art.base_model


def train_ppo(
    settings: Settings,
    prompts: str | Path,
    *,
    base_model: str | None = None,
    init: str | None = None,
    reward: str | None = None,
    workers: int | None = None,
    use_gpu: bool | None = None,
    max_steps: int | None = None,
    resume: str | None = None,
    tags: Mapping[str, str] | None = None,
    progress: Progress | None = None,
    on_event: Callable[[str, dict[str, Any]], None] | None = None,
    fault: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train a LoRA policy with PPO against a reward and publish it as ``ppo-<time>`` / ``ppo-latest``.

    Args:
        settings: Full settings (``finetune`` and ``finetune.ppo``).
        prompts: A prompts file / folder / glob, or ``"feedback"`` (the chat endpoint's feedback).
        base_model: Overrides ``finetune.base_model`` (default: the ``--init`` artifact's base,
            else ``generator.model``).
        init: Adapter to start from: an artifact name, an alias (``sft-latest``) or a folder.
        reward: Overrides ``finetune.ppo.reward.name``.
        workers, use_gpu, max_steps, resume, tags, progress, on_event, fault: As for
            :func:`ragops.finetune.train.train`.

    Raises:
        InputError: bad prompts, reward, init adapter or resume target; ConfigError: bad
        settings; ModelNotFoundError: base model; TrainingFailed: the workers failed.
    """
    from ragops.finetune.models import (
        base_source,
        check_quantization,
    )
    from ragops.finetune.ppo import ppo_train_loop
    from ragops.finetune.prompts import build_ppo_prompts

    emit = on_event or (lambda _stage, _info: None)
    fault = fault if fault is not None else fault_from_env()
    settings = _with_overrides(settings, "ppo", workers, use_gpu, max_steps)
    if reward:
        ft = settings.finetune
        ppo = ft.ppo.model_copy(update={"reward": ft.ppo.reward.model_copy(update={"name": reward})})
        settings = settings.model_copy(update={"finetune": ft.model_copy(update={"ppo": ppo})})
    ft = settings.finetune
    cfg = ft.ppo
    check_quantization(ft.lora.quantization, ft.use_gpu)
    if cfg.rollout.where == "actors" and ft.runner == "local":
        raise ConfigError("finetune.ppo.rollout.where=actors needs Ray: set finetune.runner=ray")

    init_dir, init_name, init_base = resolve_init(init, settings)
    base_name = base_model or ft.base_model or init_base or settings.generator.model
    if init_base and base_name != init_base:
        raise InputError(
            f"--init {init}: the adapter was trained on '{init_base}', not '{base_name}' (drop --base to use its base)"
        )
    reward_spec, reward_info = resolve_reward(cfg.reward.name, settings)
    source = base_source(base_name, settings)

    built = build_ppo_prompts(prompts, settings, tokenizer_dir=source.path, gguf_file=source.gguf_file)
    if _uses_rag(reward_spec) and not built.extra.get("with_passages"):
        raise InputError(
            "--reward rag scores answers against the prompt's passages, but no prompt has any: give records "
            "'contexts' or \"retrieve\": true, or use --prompts feedback"
        )
    data_info = {
        "files": built.files, "hash": built.hash, "records": built.records, "train_examples": len(built.examples),
        "eval_examples": 0, "retrieved": built.retrieved, "source": str(prompts), **built.extra,
    }  # fmt: skip
    emit("data", data_info)

    lineage = {
        "base_model": base_name, "init_adapter": init_name or init_dir, "reward": reward_info,
        "prompts": str(prompts), "prompts_hash": built.hash,
    }  # fmt: skip
    loop_config: dict[str, Any] = {
        "base": source.to_dict(),
        "prompts": built.examples,
        "ppo": cfg.model_dump(mode="json"),
        "lora": ft.lora.model_dump(mode="json"),
        "reward": reward_spec,
        "init_adapter": init_dir,
        "use_gpu": ft.use_gpu,
        "num_to_keep": ft.num_to_keep,
    }
    return _execute(
        settings, "ppo", base_name=base_name, data_info=data_info, loop=ppo_train_loop, loop_config=loop_config,
        run_config={"ppo": cfg.model_dump(mode="json"), "lora": ft.lora.model_dump(mode="json"), "lineage": lineage},
        resume=resume, tags=tags, parent=init_name, progress=progress, emit=emit, fault=fault, task="causal-lm",
        resume_hint=f"ragops train ppo --prompts {prompts}",
    )  # fmt: skip


def _uses_rag(spec: Mapping[str, Any]) -> bool:
    if spec["type"] == "rag":
        return True
    return spec["type"] == "mix" and any(_uses_rag(part) for _w, part in spec["parts"])
