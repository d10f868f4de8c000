"""Which engine decodes answers: ``generator.engine`` and the ``auto`` choice.

``auto`` picks, in order:

1. **vllm** when vLLM is installed and a CUDA device is visible (GPU nodes);
2. **llamacpp** when llama-cpp-python is installed and there is a GGUF to load: the model is a
   GGUF file (the packaged SmolLM2 is one), or the registry holds a GGUF packaged from this
   model and adapter (``ragops models package``);
3. **transformers** otherwise (and always for the FiD reader, which fuses next-token
   distributions across prompts, something only our own decode loop does).

The pick and its reason are logged once per generator and shown by ``/healthz`` and
``ragops models list``. Asking for an engine explicitly never falls back: a missing install or a
model the engine cannot load is an error that says what to do.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ragops.config import GeneratorConfig, Settings
from ragops.errors import ConfigError, ModelNotFoundError
from ragops.model_registry import resolve_model
from ragops.retrieval.generator_base import EngineName, GeneratorBase

if TYPE_CHECKING:
    from ragops.artifacts import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineChoice:
    """What :func:`choose_engine` decided.

    Attributes:
        engine: The engine that will run the model.
        reason: One line: why (shown by ``/healthz`` and ``ragops models list``).
        gguf_path: The GGUF file for llamacpp.
    """

    engine: EngineName
    reason: str
    gguf_path: Path | None = None


def installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def cuda_available() -> bool:
    """Whether a CUDA device is visible (imports torch only when vLLM, which needs it, is installed)."""
    if not installed("vllm"):
        return False
    import torch

    return bool(torch.cuda.is_available())


def gguf_for(cfg: GeneratorConfig, registry: Registry | None = None) -> tuple[Path | None, str]:
    """The GGUF that runs ``cfg``'s model and adapter, and where it came from ('' if none).

    In order: a ``.gguf`` file named as the model (a packaged artifact applied by
    ``--model``) is itself; then the registry's newest package of this base (+ adapter), since
    ``ragops models package`` is how a team says which quantization it serves (the packaged
    q8_0 of SmolLM2 both prefills and decodes faster than the Q4_1 file it ships as, see
    BENCHMARKS.md); then a built-in model that ships as GGUF.

    Args:
        cfg: Generator settings.
        registry: Where packages are looked up (default: the environment's registry).
    """
    spec = None
    if not cfg.adapter:
        try:
            spec = resolve_model(cfg.model, kind="generator")
        except ModelNotFoundError:
            spec = None
        if spec is not None and spec.gguf_file and Path(cfg.model).suffix == ".gguf":
            return spec.locate() / spec.gguf_file, f"{Path(cfg.model).name} is a GGUF file"
    package = _registry_package(cfg, registry)
    if package is not None:
        return package
    if spec is not None and spec.gguf_file:
        return spec.locate() / spec.gguf_file, f"{cfg.model} ships as a GGUF model"
    return None, ""


def _registry_package(cfg: GeneratorConfig, registry: Registry | None) -> tuple[Path, str] | None:
    from ragops import artifacts

    adapter = cfg.adapter
    if adapter:
        # apply_model hands the adapter over as its registry folder (artifacts/<name>/adapter, or
        # the download cache's <name>): the package's lineage names the artifact.
        folder = Path(adapter)
        adapter = folder.parent.name if folder.name == "adapter" else folder.name
    try:
        registry = registry or artifacts.default_registry()
        art = registry.find_package(cfg.model, adapter_artifact=adapter)
        if art is None:
            return None
        return registry.gguf_path(art.name), f"packaged GGUF artifact {art.name} ({art.lineage.get('quant')})"
    except Exception as exc:  # noqa: BLE001 - a registry that cannot be read means "no package", never a failure
        log.debug("no packaged GGUF for %s: %s", cfg.model, exc)
        return None


def choose_engine(cfg: GeneratorConfig, *, need_fused: bool = False, registry: Registry | None = None) -> EngineChoice:
    """Resolve ``cfg.engine`` (``auto`` included) to the engine that will run ``cfg``.

    Args:
        cfg: Generator settings.
        need_fused: The reader needs fused decoding (FiD): ``auto`` then takes transformers.
        registry: Where packaged GGUFs are looked up (default: the environment's registry).

    Raises:
        ConfigError: an explicit engine that is not installed, or llamacpp without a GGUF.
    """
    engine = cfg.engine
    if engine == "transformers":
        return EngineChoice("transformers", "generator.engine is transformers")
    if engine == "vllm":
        from ragops.retrieval.vllm_engine import import_vllm

        import_vllm()
        return EngineChoice("vllm", "generator.engine is vllm")
    if engine == "llamacpp":
        from ragops.retrieval.llamacpp_engine import import_llama_cpp

        import_llama_cpp()
        path, why = gguf_for(cfg, registry)
        if path is None:
            what = f"{cfg.model} with adapter {cfg.adapter}" if cfg.adapter else cfg.model
            raise ConfigError(
                f"generator.engine llamacpp needs a GGUF model, and {what} is not one: package it with "
                f"`ragops models package {cfg.adapter or cfg.model} --quant q8_0` and use the package's name as the model"
            )
        return EngineChoice("llamacpp", f"generator.engine is llamacpp; {why}", path)
    # auto
    if need_fused:
        return EngineChoice("transformers", "auto: the FiD reader needs fused decoding (transformers only)")
    if cuda_available():
        return EngineChoice("vllm", "auto: vLLM is installed and a CUDA device is visible")
    path, why = gguf_for(cfg, registry)
    if path is not None:
        if installed("llama_cpp"):
            return EngineChoice("llamacpp", f"auto: {why}", path)
        return EngineChoice("transformers", f"auto: {why}, but llama-cpp-python is not installed (transformers dequantizes it)")
    return EngineChoice("transformers", "auto: no GGUF for this model (package one with `ragops models package`)")


def make_generator(cfg: GeneratorConfig, *, need_fused: bool | None = None, registry: Registry | None = None) -> GeneratorBase:
    """A generator on the engine :func:`choose_engine` picks for ``cfg`` (not loaded yet).

    Args:
        cfg: Generator settings.
        need_fused: Whether the reader needs fused decoding; None reads ``cfg.reader == 'fid'``.
        registry: Where packaged GGUFs are looked up (default: the environment's registry).
    """
    fused = cfg.reader == "fid" if need_fused is None else need_fused
    choice = choose_engine(cfg, need_fused=fused, registry=registry)
    if fused and choice.engine != "transformers":
        raise ConfigError(
            f"the FiD reader needs generator.engine: transformers (generator.engine is {cfg.engine}); "
            "use generator.reader: stuff or extractive with this engine"
        )
    gen: GeneratorBase
    if choice.engine == "llamacpp":
        from ragops.retrieval.llamacpp_engine import LlamaCppGenerator

        assert choice.gguf_path is not None
        gen = LlamaCppGenerator(cfg, gguf_path=choice.gguf_path)
    elif choice.engine == "vllm":
        from ragops.retrieval.vllm_engine import VllmGenerator

        gen = VllmGenerator(cfg)
    else:
        from ragops.retrieval.generation import Generator

        gen = Generator(cfg)
    gen.choice_reason = choice.reason
    log.info("generator %s%s runs on %s (%s)", cfg.model, f" + {cfg.adapter}" if cfg.adapter else "", choice.engine, choice.reason)
    return gen


def generator_for(settings: Settings, cfg: GeneratorConfig | None = None, *, need_fused: bool | None = None) -> GeneratorBase:
    """:func:`make_generator` with packaged GGUFs looked up in ``settings``' registry.

    Args:
        settings: Full settings (their registry: ``finetune.registry_path`` or the data dir's).
        cfg: Generator settings to run (default: ``settings.generator``), e.g. an adapter's.
        need_fused: As for :func:`make_generator`.
    """
    from ragops.artifacts import Registry

    return make_generator(cfg or settings.generator, need_fused=need_fused, registry=Registry.from_settings(settings))
