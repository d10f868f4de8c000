"""Package a model — a base, or a base plus a LoRA adapter merged in — as a GGUF artifact.

``ragops models package NAME`` calls :func:`package_model`: it resolves NAME (a built-in
generator, a local HF model folder, or an sft/ppo artifact of the registry), loads the base in
float32 with transformers, merges the adapter, writes the GGUF
(:func:`ragops.packaging.gguf_writer.write_gguf`, then llama.cpp for ``q4_k_m``) and commits
``artifacts/<name>/model/model.gguf`` with a manifest whose ``lineage`` records where it came
from. The artifact is built in a staging folder and moved in whole
(:meth:`ragops.artifacts.Registry.staging` / :meth:`~ragops.artifacts.Registry.commit_staged`):
a failure, Ctrl-C included, leaves the registry as it was.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ragops.artifacts import (
    ALIAS_RE,
    GGUF_FILE,
    LATEST_ALIASES,
    Artifact,
    Registry,
    adapter_dir,
    code_version,
    new_name,
    utc_now,
)
from ragops.errors import InputError, ModelNotFoundError
from ragops.packaging.quantize import (
    DEFAULT_QUANT,
    check_quant,
    llama_cpp_quantize,
    llama_cpp_version,
    python_quant,
    require_llama_cpp,
)

#: ``progress(stage, done, total)``: stage is ``load``, ``merge``, ``tensors``, ``quantize``
#: or ``commit``; done/total count tensors during ``tensors`` (0/0 otherwise).
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class PackageSource:
    """What a NAME given to the packager stands for.

    Attributes:
        source: NAME as given.
        base_model: The base as recorded in lineage (built-in name or path).
        base_dir: Local folder of the base weights.
        gguf_file: The GGUF file inside ``base_dir`` when the base is one (its metadata is copied).
        adapter_dir: Local folder of the LoRA adapter to merge, if any.
        artifact: The registry artifact NAME resolved to, if any.
    """

    source: str
    base_model: str
    base_dir: Path
    gguf_file: str | None = None
    adapter_dir: Path | None = None
    artifact: Artifact | None = None


def resolve_source(ref: str, registry: Registry) -> PackageSource:
    """Resolve NAME: a built-in generator, a local model folder or file, or an sft/ppo artifact.

    Raises:
        ModelNotFoundError: NAME is none of these (the message says what was looked for).
        InputError: an artifact that is not a generator adapter (a reward model, a GGUF).
    """
    from ragops.model_registry import BUILTIN_MODELS

    builtin = any(ref == m.name or ref in m.aliases for m in BUILTIN_MODELS)
    if not builtin and not Path(ref).expanduser().exists() and registry.has(ref):
        art = registry.get(ref)
        if art.is_gguf:
            raise InputError(
                f"artifact '{art.name}' is already a packaged GGUF ({art.lineage.get('quant')}); package its "
                f"source instead ({art.lineage.get('source')})"
            )
        if art.task != "causal-lm":
            raise InputError(f"artifact '{art.name}' is a {art.kind} model ({art.task}), not a generator: package an sft or ppo artifact")
        base = _base(art.base_model)
        return PackageSource(ref, art.base_model, base.base_dir, base.gguf_file, adapter_dir(art.name, registry=registry), art)
    path = Path(ref).expanduser()
    if path.is_dir() and (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise InputError(f"{ref} is a LoRA adapter folder: publish it to the registry first, or package its base model")
    try:
        return _base(ref)
    except ModelNotFoundError as exc:
        if builtin or path.exists() or "/" in ref:
            raise
        raise ModelNotFoundError(
            f"{exc}; nor an artifact or alias in the registry at {registry.storage.uri()} (see `ragops models list`)"
        ) from None


def _base(ref: str) -> PackageSource:
    from ragops.model_registry import resolve_model

    spec = resolve_model(ref, kind="generator")
    return PackageSource(ref, ref, spec.locate(), spec.gguf_file)


def check_new_name(registry: Registry, name: str | None) -> str:
    """The new artifact's name: ``name`` checked, or a fresh ``gguf-YYYYMMDD-HHMM-xxxx``.

    Raises:
        InputError: a malformed name, or one already used by an artifact or an alias.
    """
    if name is None:
        return new_name("gguf")
    if not ALIAS_RE.match(name):
        raise InputError(f"--as '{name}': use lower-case letters, digits, '.', '_' or '-' (max 64 characters)")
    reserved = {a for aliases in LATEST_ALIASES.values() for a in aliases}
    if name in reserved or registry.has(name):
        raise InputError(f"--as '{name}': an artifact or alias of that name already exists in {registry.storage.uri()}")
    return name


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def tool_versions() -> dict[str, str | None]:
    """Versions of the libraries that shaped the file (recorded in lineage)."""

    def version(dist: str) -> str | None:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {
        "gguf": version("gguf"), "llama_cpp": llama_cpp_version(), "transformers": version("transformers"),
        "torch": version("torch"), "peft": version("peft"), "ragops": code_version()["ragops"],
    }  # fmt: skip


def load_source_model(src: PackageSource, progress: ProgressFn | None = None) -> Any:
    """The source as a float32 transformers model, with its adapter merged in.

    Raises:
        InputError: the architecture is not one the GGUF writer supports (checked on the config,
            before the weights load).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ragops.packaging.gguf_writer import check_architecture
    from ragops.retrieval.model_loading import merge_adapter

    kwargs = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    check_architecture(AutoConfig.from_pretrained(str(src.base_dir), **kwargs))
    _report(progress, "load")
    model = AutoModelForCausalLM.from_pretrained(str(src.base_dir), dtype=torch.float32, **kwargs)
    if src.adapter_dir is not None:
        _report(progress, "merge")
        model = merge_adapter(model, src.adapter_dir)
    return model.eval()


def package_model(
    ref: str,
    *,
    registry: Registry,
    quant: str = DEFAULT_QUANT,
    name: str | None = None,
    progress: ProgressFn | None = None,
) -> Artifact:
    """Write ``ref`` as a GGUF artifact into ``registry`` and move ``gguf-latest`` to it.

    Args:
        ref: A built-in generator name, a local HF model folder (or GGUF file), or the name or
            alias of an sft/ppo artifact (its adapter is merged into its base).
        registry: Where the artifact goes.
        quant: ``f16``, ``q8_0`` (default) or ``q4_k_m`` (needs llama-cpp-python).
        name: The new artifact's name (default ``gguf-YYYYMMDD-HHMM-xxxx``).
        progress: Called as the stages advance (see :data:`ProgressFn`).

    Returns:
        The new artifact; its ``metrics`` are the source artifact's, so the promotion gate
        compares the model the package was built from.

    Raises:
        InputError: unsupported quant, bad or taken name, unsupported architecture or tokenizer,
            a source that is not a generator.
        ModelNotFoundError: ``ref`` is unknown.
    """
    import torch

    from ragops.packaging.gguf_writer import write_gguf

    quant = check_quant(quant)
    require_llama_cpp(quant)
    name = check_new_name(registry, name)
    src = resolve_source(ref, registry)
    model = load_source_model(src, progress)
    source_gguf = src.base_dir / src.gguf_file if src.gguf_file else None
    with registry.staging(name) as stage:
        out = stage / GGUF_FILE
        out.parent.mkdir(parents=True, exist_ok=True)
        first = stage / "f16.gguf" if quant != python_quant(quant) else out
        with torch.no_grad():
            write_gguf(
                model, first, quant=python_quant(quant), name=name, tokenizer_dir=src.base_dir, source_gguf=source_gguf,
                progress=(lambda done, total: progress("tensors", done, total)) if progress else None,
            )  # fmt: skip
        del model  # the float32 weights are not needed for hashing and llama.cpp's pass
        if first != out:
            _report(progress, "quantize")
            llama_cpp_quantize(first, out, quant)
            first.unlink()
        _report(progress, "commit")
        source_art = src.artifact
        lineage = {
            "source": ref,
            "source_artifact": source_art.name if source_art else None,
            "adapter": source_art.name if source_art else None,
            "base_model": src.base_model,
            "quant": quant,
            "sha256": sha256_file(out),
            "size_bytes": out.stat().st_size,
            "tools": tool_versions(),
            "created_at": utc_now(),
        }
        art = Artifact(
            name=name,
            kind="gguf",
            created_at=lineage["created_at"],
            base_model=src.base_model,
            task="causal-lm",
            format="gguf",
            parent=source_art.name if source_art else None,
            data_hash=source_art.data_hash if source_art else None,
            code_version=code_version(),
            config={"quant": quant, "source": ref},
            metrics=dict(source_art.metrics) if source_art else {},
            files=[Path(GGUF_FILE).name],
            lineage=lineage,
        )
        return registry.commit_staged(stage, art)


def _report(progress: ProgressFn | None, stage: str) -> None:
    if progress is not None:
        progress(stage, 0, 0)
