"""Settings: one pydantic model per stage, loaded from layered sources.

Precedence, lowest to highest::

    built-in defaults < --config FILE < env RAGOPS_* < --set dotted.key=value

Environment variables map to dotted keys by upper-casing and replacing ``.`` with ``__``:
``RAGOPS_EMBEDDER__BATCH_SIZE=32`` sets ``embedder.batch_size``. ``RAGOPS_HOME`` sets
``data_dir``. Only variables whose first segment names a settings section are read, so
unrelated ``RAGOPS_*`` variables (API keys, for instance) never collide with config.

Every model forbids unknown keys: a typo is one error naming the key and the allowed keys.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from ragops.errors import ConfigError
from ragops.serve.config import ServeConfig
from ragops.finetune.config import FinetuneConfig
from ragops.llmops.config import LoopConfig

ENV_PREFIX = "RAGOPS_"
HOME_ENV = "RAGOPS_HOME"
PRESETS_DIR = Path(__file__).resolve().parent / "configs"


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class EmbedderConfig(StrictModel):
    """The dense passage/query embedder (DPR-style bi-encoder)."""

    model: str = Field("minilm-l6", description="Registry name, local path, or hub id of the passage encoder.")
    query_model: str | None = Field(
        None, description="Separate query encoder (two-tower DPR); None uses `model` for both sides."
    )
    query_instruction: str | None = Field(
        None,
        description="Prefix added to queries only (BGE). None takes the registry's value for the model; '' disables it.",
    )
    batch_size: int = Field(64, ge=1, description="Texts per forward pass.")
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    normalize: bool = Field(True, description="L2-normalize vectors (cosine similarity via dot product).")
    max_seq_length: int | None = Field(None, ge=8, description="Override the model's token limit.")
    backend: Literal["torch", "onnx"] = Field(
        "torch",
        description=(
            "'torch' runs the sentence-transformers model in float32; 'onnx' runs it with ONNX Runtime, "
            "int8 dynamically quantized (CPU only; exported once and cached, see ragops.onnx_embedder). "
            "Same vector space: a collection needs no re-embedding to switch."
        ),
    )
    onnx_cache_dir: str | None = Field(
        None,
        description="Where backend 'onnx' caches exported models; None: $RAGOPS_ONNX_CACHE, else $XDG_CACHE_HOME/ragops/onnx (~/.cache/ragops/onnx).",
    )

    @model_validator(mode="after")
    def _onnx_runs_on_cpu(self) -> "EmbedderConfig":
        # int8 dynamic quantization (MatMulInteger/DynamicQuantizeLinear) is a CPU kernel set;
        # on a GPU the float32 torch model is the faster and exact choice, so refuse rather
        # than silently run int8 ops on the CPU while the user thinks a GPU is embedding.
        if self.backend == "onnx" and self.device.startswith("cuda"):
            raise ValueError(
                f"embedder.backend 'onnx' (int8) runs on the CPU only; got embedder.device '{self.device}'. "
                "Use embedder.backend=torch on a GPU, or embedder.device=cpu"
            )
        return self

    #: ``(root, cache_dir)`` of the artifact registry, set by :class:`Settings`, so ``model`` may
    #: name a published embedder (``embedder-latest``). Not a setting: it follows ``data_dir``.
    _registry: tuple[str, str] | None = PrivateAttr(default=None)


class LoaderConfig(StrictModel):
    """Which files are read and how."""

    include: list[str] = Field(
        default_factory=lambda: ["**/*.md", "**/*.markdown", "**/*.txt", "**/*.html", "**/*.htm", "**/*.pdf", "**/*.jsonl"],
        description="Glob patterns (relative to the ingest root) of files to read.",
    )
    exclude: list[str] = Field(default_factory=lambda: ["**/.*", "**/.*/**"], description="Glob patterns to skip.")
    max_file_mb: float = Field(50.0, gt=0, description="Files larger than this are reported and skipped.")


class ChunkerConfig(StrictModel):
    """Token-aware, structure-aware chunking with the embedder's tokenizer."""

    chunk_tokens: int = Field(200, ge=16, description="Target chunk size in embedder tokens.")
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by consecutive chunks of one section.")
    respect_sections: bool = Field(True, description="Never let a chunk straddle two Markdown/HTML sections.")
    include_heading: bool = Field(
        True, description="Prefix the embedded text with the chunk's title and heading path (the stored chunk text stays the plain source text)."
    )

    @model_validator(mode="after")
    def _overlap_below_size(self) -> "ChunkerConfig":
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError("overlap_tokens must be smaller than chunk_tokens")
        return self


class SparseConfig(StrictModel):
    """BM25 sparse vectors written beside the dense ones (IDF applied by Qdrant)."""

    enabled: bool = Field(True, description="Write a BM25 sparse vector per chunk.")
    k1: float = Field(1.2, gt=0, description="BM25 term-frequency saturation.")
    b: float = Field(0.75, ge=0, le=1, description="BM25 length normalisation.")
    avg_doc_tokens: float = Field(120.0, gt=0, description="Assumed average chunk length in words.")
    language: str = Field("english", description="Stemmer / stop-word language.")


class IngestConfig(StrictModel):
    """The ingest pipeline and how Ray runs it."""

    sources: list[str] = Field(
        default_factory=list,
        description="Paths or URIs `ragops ingest` reads when the command names none (cluster presets "
        "point this at the team's documents, so a job needs no arguments).",
    )
    loader: LoaderConfig = Field(default_factory=LoaderConfig)
    chunker: ChunkerConfig = Field(default_factory=ChunkerConfig)
    sparse: SparseConfig = Field(default_factory=SparseConfig)
    runner: Literal["ray", "local"] = Field("ray", description="'ray' runs Ray Data; 'local' runs the same stages in-process.")
    docs_per_task: int = Field(64, ge=1, description="Documents read and chunked per Ray Data batch.")
    embed_actors: int = Field(1, ge=1, description="Size of the embedding actor pool.")
    embed_batch_size: int = Field(256, ge=1, description="Chunks per embedding batch (Ray Data map_batches).")
    cpus_per_actor: float = Field(2.0, gt=0, description="CPUs reserved per embedding actor (also its torch threads).")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per embedding actor; fractions share one GPU.")
    write_batch_size: int = Field(512, ge=1, description="Points per upsert call.")
    test_hold_file: Path | None = Field(
        None, description="TEST HOOK: while this file exists, the embedding stage waits (tests of the stall watchdog)."
    )


class VectorStoreConfig(StrictModel):
    """Where vectors live: the embedded Qdrant Edge shard or a Qdrant server."""

    backend: Literal["edge", "qdrant"] = Field("edge", description="'edge' (embedded, single writer) or 'qdrant' (server).")
    collection: str = Field("ragops", pattern=r"^[A-Za-z0-9_.-]{1,128}$", description="Collection name.")
    url: str | None = Field(None, description="Qdrant server URL (backend 'qdrant'); ':memory:' for the in-process local mode.")
    api_key_env: str = Field("QDRANT_API_KEY", description="Environment variable holding the server's API key.")
    timeout_s: float = Field(30.0, gt=0, description="Server request timeout.")

    @model_validator(mode="after")
    def _server_needs_url(self) -> "VectorStoreConfig":
        if self.backend == "qdrant" and not self.url:
            raise ValueError("vectorstore.url is required when vectorstore.backend is 'qdrant'")
        return self


class RerankConfig(StrictModel):
    """Optional cross-encoder reranking."""

    model: str | None = Field(None, description="CrossEncoder path or registry name; None disables reranking.")
    candidates: int = Field(30, ge=1, description="Hits fetched before reranking.")
    batch_size: int = Field(32, ge=1)

    #: The artifact registry (see :class:`EmbedderConfig`), so ``model`` may name a published reranker.
    _registry: tuple[str, str] | None = PrivateAttr(default=None)


class RetrievalConfig(StrictModel):
    """Search defaults."""

    k: int = Field(10, ge=1, le=1000, description="Hits returned.")
    mode: Literal["dense", "sparse", "hybrid"] = Field("hybrid", description="Search mode.")
    fusion: Literal["rrf", "dbsf"] = Field("rrf", description="Hybrid fusion method (runs inside Qdrant).")
    prefetch: int = Field(50, ge=1, description="Candidates per branch before fusion.")
    score_threshold: float | None = Field(None, description="Drop hits scoring below this (dense/sparse modes).")
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    expand_neighbors: int = Field(0, ge=0, le=5, description="Neighbouring chunks added around each hit in contexts.")


class ExtractiveConfig(StrictModel):
    """The extractive reader: which sentences of the passages make the answer."""

    max_sentences: int = Field(2, ge=1, le=10, description="Most sentences in an extractive answer.")
    keep_ratio: float = Field(
        0.9, gt=0, le=1, description="A further sentence is kept when it scores at least this share of the best one."
    )
    dense_weight: float = Field(
        0.5, ge=0, le=1, description="Weight of embedder (or cross-encoder) similarity against BM25 coverage."
    )
    min_words: int = Field(3, ge=1, le=20, description="Fewest content words of a candidate sentence.")


class LlamaCppConfig(StrictModel):
    """The llama.cpp engine (``generator.engine: llamacpp``): threads, context, batching."""

    n_threads: int | None = Field(
        None, ge=1, description="Threads per decode step (None: the CPUs Ray gives the replica, else all cores)."
    )
    n_threads_batch: int | None = Field(None, ge=1, description="Threads for prompt prefill (None: as n_threads).")
    n_ctx: int = Field(
        8192, ge=256, le=262144,
        description="KV cache cells shared by all sequences of a replica (one sequence may use at most the "
        "model's trained context).",
    )
    n_batch: int = Field(512, ge=16, le=8192, description="Most tokens (prompt chunks plus decode steps) per llama.cpp batch.")
    n_parallel: int = Field(8, ge=1, le=64, description="Most sequences decoded together in one batch.")
    n_gpu_layers: int = Field(0, ge=-1, description="Layers offloaded to a GPU (-1: all; needs a CUDA/Metal build).")
    prefix_cache: bool = Field(True, description="Compute the system prompt's KV state once per replica and share it.")
    flash_attn: bool = Field(False, description="llama.cpp's flash attention kernels.")


class VllmConfig(StrictModel):
    """The vLLM engine (``generator.engine: vllm``, GPU nodes)."""

    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one replica shards the model over.")
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1, description="Share of each GPU's memory vLLM may take.")
    max_model_len: int | None = Field(None, ge=64, description="Context window (None: the model's).")
    max_loras: int = Field(4, ge=1, le=64, description="LoRA adapters resident on the GPU at once.")
    max_lora_rank: int = Field(64, ge=1, le=512, description="Largest LoRA rank served.")
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field("auto")
    enforce_eager: bool = Field(False, description="Skip CUDA graphs (faster start, slower decode).")


class GeneratorConfig(StrictModel):
    """The causal LM that writes answers, and the checks around its answers."""

    model: str = Field("smollm2-135m-instruct", description="Registry name or local path of the generator.")
    adapter: str | None = Field(None, description="LoRA adapter: registry name/alias or path.")
    engine: Literal["auto", "transformers", "llamacpp", "vllm"] = Field(
        "auto",
        description="What decodes answers: 'auto' picks vllm on a CUDA node with vLLM installed, llamacpp for a "
        "GGUF model (or one packaged with `ragops models package`), else transformers.",
    )
    llamacpp: LlamaCppConfig = Field(default_factory=LlamaCppConfig)
    vllm: VllmConfig = Field(default_factory=VllmConfig)
    device: str = Field("cpu", description="'cpu', 'cuda', 'cuda:N' or 'auto'.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32")
    max_new_tokens: int = Field(
        160, ge=1, le=8192, description="Most tokens of an answer (a few cited sentences; raise it for long-form answers)."
    )
    temperature: float = Field(0.0, ge=0, le=5, description="0 is greedy and deterministic.")
    top_p: float = Field(1.0, gt=0, le=1)
    stop: list[str] = Field(default_factory=list, description="Stop sequences.")
    context_tokens: int = Field(1536, ge=64, description="Token budget for retrieved passages in the prompt.")
    reader: Literal["stuff", "fid", "extractive"] = Field(
        "extractive",
        description="'extractive' (the passages' best sentences, no generation), 'stuff' (numbered passages) "
        "or 'fid' (fusion in decoding).",
    )
    seed: int = Field(0)
    repetition_penalty: float = Field(
        1.1, ge=1.0, le=2.0, description="Penalty on tokens the answer already holds (1 = off; the prompt never counts)."
    )
    no_repeat_ngram_size: int = Field(6, ge=0, le=64, description="Never repeat an n-gram of the answer (0 = off).")
    stop_on_repeat: bool = Field(True, description="End an answer when a line or sentence repeats an earlier one.")
    grounding: Literal["off", "flag", "fallback"] = Field(
        "fallback",
        description="Check generated answers against their passages: 'flag' marks unsupported answers "
        "(grounded: false), 'fallback' replaces them with the extractive answer.",
    )
    min_support: float = Field(
        0.6, gt=0, le=1, description="Share of a sentence's content words a passage must hold to support it."
    )
    abstain_below: float = Field(
        0.45,
        ge=0,
        le=1,
        description="Say the documents do not cover the question when the best passage sentence scores below "
        "this (0 = never; calibrated on benchmarks/answer_quality.py).",
    )
    extractive: ExtractiveConfig = Field(default_factory=ExtractiveConfig)

    @field_validator("grounding", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare `off` as false: `grounding: off` and `--set generator.grounding=off` mean "off".
        return "off" if value is False else value


class RayConfig(StrictModel):
    """How to reach Ray."""

    address: str | None = Field(None, description="Cluster address; None starts or joins a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (None: all).")
    nodes: int = Field(1, ge=1, description="Nodes the job expects (a multi-node cluster needs a Qdrant server).")


class TrackingConfig(StrictModel):
    """Experiment tracking in MLflow (off unless ``mlflow_uri`` is set); ragops' own run records are always written."""

    mlflow_uri: str | None = Field(
        None,
        description="MLflow tracking URI: sqlite:///path.db, http(s)://server, databricks, file:./mlruns, or a folder.",
    )
    experiment: str = Field("ragops", min_length=1, description="MLflow experiment the runs go to.")
    register_models: bool = Field(True, description="Register each published artifact as a model version and mirror aliases.")
    timeout_s: float = Field(10.0, gt=0, description="HTTP timeout per MLflow request (a slow server never stalls training).")

    @field_validator("mlflow_uri")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from ragops.tracking.uri import check_tracking_uri

        return check_tracking_uri(value)


class TelemetryConfig(StrictModel):
    """OpenTelemetry traces (off unless ``otlp_endpoint`` is set or ``console`` is on).

    Every CLI command and Serve replica that traces exports its own spans; a served request is
    one trace across the deployments (the context travels with each handle call).
    """

    otlp_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP (protobuf) collector, e.g. http://otel-collector:4318 (/v1/traces is added when "
        "the URL has no path). The OpenTelemetry Collector's OTLP receiver serves HTTP on 4318 (4317 is gRPC, not used).",
    )
    console: bool = Field(False, description="Also print finished spans as JSON on stdout (for debugging).")
    service_name: str = Field("ragops", min_length=1, description="service.name of the spans; each replica adds its deployment.")
    sample_ratio: float = Field(
        1.0, ge=0, le=1, description="Share of new traces recorded; a caller's sampled traceparent is always followed."
    )
    export_delay_s: float = Field(2.0, gt=0, description="Seconds spans wait in the batch before export.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra HTTP headers for the collector (e.g. auth).")

    @field_validator("otlp_endpoint")
    @classmethod
    def _is_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from ragops.tracking.telemetry import check_otlp_endpoint

        return check_otlp_endpoint(value)

    @property
    def enabled(self) -> bool:
        """Whether any span is exported."""
        return bool(self.otlp_endpoint) or self.console


class RuntimeConfig(StrictModel):
    """How long-running commands behave: admission, stall detection, progress output."""

    autoscaling: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Whether the cluster adds nodes on demand. 'on': a request that does not fit waits for the "
        "autoscaler (up to schedule_timeout_s); 'off': it fails at once, or is fitted when the sizes are defaults. "
        "'auto' is 'off' (the manifests `ragops kuberay render` writes set it 'on').",
    )
    schedule_timeout_s: float = Field(
        600.0, gt=0, description="With an autoscaler: seconds to wait for the nodes a command needs before failing."
    )
    stall_timeout_s: float = Field(
        300.0,
        ge=0,
        description="A Ray pipeline or training that makes no progress (no batch, no step) for this long prints what "
        "is pending and exits non-zero; a re-run resumes. 0 disables the watchdog.",
    )
    progress: Literal["auto", "bar", "lines"] = Field(
        "auto", description="Progress display: 'bar' (rich), 'lines' (plain periodic lines, for logs), 'auto': bar on a terminal."
    )
    progress_interval_s: float = Field(10.0, gt=0, description="Seconds between plain progress lines.")

    @field_validator("autoscaling", mode="before")
    @classmethod
    def _yaml_on_off(cls, value: Any) -> Any:
        # YAML 1.1 reads bare on/off as booleans: `autoscaling: on` means "on".
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class Settings(StrictModel):
    """All settings of one ragops invocation.

    :meth:`is_explicit` tells a value the user chose (file, environment, ``--set``) from a
    built-in default: a default may be fitted to a small machine, a chosen value never is.
    """

    data_dir: Path = Field(Path(".ragops"), description="Where collections, manifests, runs and artifacts live.")
    embedder: EmbedderConfig = Field(default_factory=EmbedderConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    vectorstore: VectorStoreConfig = Field(default_factory=VectorStoreConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    generator: GeneratorConfig = Field(default_factory=GeneratorConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    loop: LoopConfig = Field(default_factory=LoopConfig)

    _explicit: frozenset[str] = PrivateAttr(default_factory=frozenset)

    def is_explicit(self, key: str) -> bool:
        """Whether ``key`` (dotted) or a section above it was set by a config file, env or ``--set``."""
        parts = key.split(".")
        return any(".".join(parts[: i + 1]) in self._explicit for i in range(len(parts)))

    def __eq__(self, other: object) -> bool:
        # The same settings are equal however they were given (the explicit keys are provenance).
        if not isinstance(other, Settings):
            return NotImplemented
        return self.__dict__ == other.__dict__

    __hash__ = None  # type: ignore[assignment]  # mutable, like any non-frozen model

    @property
    def explicit_keys(self) -> frozenset[str]:
        """The dotted keys a config file, the environment or ``--set`` gave."""
        return self._explicit

    def with_explicit(self, keys: Sequence[str]) -> "Settings":
        """Record ``keys`` as user-chosen (what :func:`load_settings` does for its sources)."""
        self._explicit = frozenset(self._explicit | set(keys))
        return self

    @field_validator("data_dir", mode="before")
    @classmethod
    def _expand(cls, v: Any) -> Any:
        return Path(os.path.expanduser(str(v))) if v is not None else v

    @model_validator(mode="after")
    def _models_resolve_artifacts(self) -> "Settings":
        # Published embedders/rerankers are looked up in this settings' registry; the configs
        # carry its location privately so every stage (and Ray actor) resolves them alike.
        root = self.finetune.registry_path or str(Path(self.data_dir) / "registry")
        where = (root, str(Path(self.data_dir) / "cache" / "registry"))
        self.embedder._registry = where
        self.retrieval.rerank._registry = where
        return self

    @model_validator(mode="after")
    def _embedded_store_is_single_node(self) -> "Settings":
        # An Edge shard is a directory opened by one process: it cannot be shared by nodes.
        if self.ray.nodes > 1 and self.vectorstore.backend == "edge":
            raise ValueError(
                "ray.nodes > 1 with vectorstore.backend 'edge': the embedded Qdrant Edge shard lives on one "
                "node's disk and only one process may open it. Use a Qdrant server "
                "(--set vectorstore.backend=qdrant --set vectorstore.url=http://qdrant:6333)."
            )
        return self

    @model_validator(mode="after")
    def _vllm_replicas_hold_their_gpus(self) -> "Settings":
        # A vLLM replica runs its tensor-parallel shards in its own processes: it must reserve
        # (and a KubeRay cluster must provide) that many GPUs. Unset, the GPUs follow the engine.
        tp = self.generator.vllm.tensor_parallel_size
        gen = self.serve.generator
        if self.generator.engine == "vllm":
            if gen.num_gpus == 0:
                gen.num_gpus = float(tp)
            elif gen.num_gpus < tp:
                raise ValueError(
                    f"serve.generator.num_gpus is {gen.num_gpus:g} but generator.vllm.tensor_parallel_size is {tp}: "
                    "a vLLM replica needs one GPU per tensor-parallel shard"
                )
        return self

    def fingerprint(self, *sections: str) -> str:
        """Short stable hash of the given sections (all when none), for manifests and caches."""
        data = self.model_dump(mode="json")
        if sections:
            data = {s: data[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------


def _parse_scalar(raw: str) -> Any:
    """Parse a CLI/env value the way YAML would (numbers, booleans, lists, null)."""
    try:
        return yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        return raw


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{origin}: '{dotted}' is not a valid dotted key (e.g. embedder.batch_size)")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _deep_merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_preset(path_or_name: str | Path) -> Path:
    """Return the YAML file for a path, or for the name of a shipped preset (``bge``)."""
    p = Path(path_or_name)
    if p.is_file():
        return p
    candidate = PRESETS_DIR / f"{path_or_name}.yaml"
    if not p.suffix and candidate.is_file():
        return candidate
    presets = sorted(f.stem for f in PRESETS_DIR.glob("*.yaml"))
    raise ConfigError(f"config file '{path_or_name}' not found (shipped presets: {', '.join(presets)})")


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML config file into a dict, with a clear error for bad YAML."""
    file = resolve_preset(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{file}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{file}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data


def env_overrides(environ: Mapping[str, str]) -> list[tuple[str, Any, str]]:
    """Dotted-key overrides found in the environment, as (key, value, origin)."""
    sections = set(Settings.model_fields)
    out: list[tuple[str, Any, str]] = []
    if environ.get(HOME_ENV):
        out.append(("data_dir", environ[HOME_ENV], HOME_ENV))
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or name == HOME_ENV:
            continue
        dotted = name[len(ENV_PREFIX):].lower().replace("__", ".")
        if dotted.split(".")[0] in sections:
            out.append((dotted, _parse_scalar(raw), f"env {name}"))
    return out


def parse_set_option(item: str) -> tuple[str, Any]:
    """Split one ``--set dotted.key=value`` into key and parsed value."""
    if "=" not in item:
        raise ConfigError(f"--set '{item}': expected dotted.key=value, e.g. --set embedder.batch_size=32")
    key, raw = item.split("=", 1)
    return key.strip(), _parse_scalar(raw.strip())


def _format_validation_error(exc: ValidationError, origins: Mapping[str, str]) -> str:
    lines = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"] if not isinstance(p, int)]
        key = ".".join(loc) or "(root)"
        origin = origins.get(key)
        where = f" (from {origin})" if origin else ""
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            lines.append(f"unknown config key '{key}'{where}; allowed here: {', '.join(allowed)}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"config key '{key}'{where}: {msg} (got {err.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def _allowed_keys(path: Sequence[str]) -> list[str]:
    model: type[BaseModel] = Settings
    for part in path:
        field = model.model_fields.get(part)
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return sorted(model.model_fields)


def load_settings(
    config_files: Sequence[str | Path] = (),
    overrides: Sequence[str] = (),
    *,
    data_dir: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Build :class:`Settings` from defaults, YAML files, environment and ``--set`` overrides.

    Args:
        config_files: YAML files (or shipped preset names), applied in order.
        overrides: ``dotted.key=value`` strings, applied last.
        data_dir: ``--data-dir``; wins over ``RAGOPS_HOME`` and config files.
        environ: Environment to read (defaults to ``os.environ``).

    Raises:
        ConfigError: unknown key, bad value or unreadable file; the message names the key.
    """
    environ = os.environ if environ is None else environ
    # Start from the defaults as data: a partial override of a nested section then keeps the
    # section's own defaults (a field's default_factory may differ from its class defaults).
    tree: dict[str, Any] = Settings().model_dump(mode="json")
    origins: dict[str, str] = {}
    explicit: set[str] = set()
    for f in config_files:
        data = read_yaml(f)
        tree = _deep_merge(tree, data)
        explicit |= set(_leaf_keys(data))
    for key, value, origin in env_overrides(environ):
        _set_dotted(tree, key, value, origin)
        origins[key] = origin
    for item in overrides:
        key, value = parse_set_option(item)
        _set_dotted(tree, key, value, f"--set {item}")
        origins[key] = f"--set {item}"
    if data_dir is not None:
        tree["data_dir"] = str(data_dir)
        origins["data_dir"] = "--data-dir"
    try:
        settings = Settings.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, origins)) from None
    return settings.with_explicit([*explicit, *origins])


def _leaf_keys(data: Any, prefix: str = "") -> list[str]:
    """Dotted keys of a nested mapping's leaves (a YAML file's settings)."""
    if not isinstance(data, Mapping) or not data:
        return [prefix] if prefix else []
    return [k for key, v in data.items() for k in _leaf_keys(v, f"{prefix}.{key}" if prefix else str(key))]


def dump_yaml(settings: Settings) -> str:
    """Render settings as YAML (what `ragops config show` prints)."""
    return yaml.safe_dump(settings.model_dump(mode="json"), sort_keys=False)
