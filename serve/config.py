"""Serving settings: the ``serve:`` section of :class:`ragops.config.Settings`.

One sub-model per Ray Serve deployment (ingress, query embedder, retriever, the optional
reranker, generator), each
with its autoscaling, admission limits and actor resources, plus the HTTP-level limits of the
OpenAI-compatible API. Pure pydantic: importing this module never imports Ray (the core
config imports it).

Defaults are sized for a 2-core laptop: one replica of each deployment, the generator (the
only heavy compute) reserving one CPU of Ray's accounting but running two torch threads, the
others reserving a fraction of a CPU. On a cluster raise ``max_replicas`` and the resources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    # Same contract as ragops.config.StrictModel (not imported: ragops.config imports us).
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of one deployment (replicas follow ongoing requests)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 scales to zero when idle).")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at start; None starts with min_replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(10.0, ge=0, description="Load must stay high this long before scaling up.")
    downscale_delay_s: float = Field(300.0, ge=0, description="Load must stay low this long before scaling down.")

    @model_validator(mode="after")
    def _ordered(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        return self

    def to_ray(self) -> dict[str, Any]:
        """The ``autoscaling_config`` dict Ray Serve takes."""
        cfg = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
        }
        if self.initial_replicas is not None:
            cfg["initial_replicas"] = self.initial_replicas
        return cfg


class DeploymentSettings(_Strict):
    """Admission limits and resources shared by every deployment."""

    autoscaling: AutoscalingSettings = Field(default_factory=AutoscalingSettings)
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        32, ge=-1, description="Requests each caller queues for this deployment before refusing (503); -1: no limit."
    )
    num_cpus: float = Field(0.25, ge=0, description="CPUs each replica reserves in Ray's accounting.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs each replica reserves; fractions share one GPU.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per replica; None keeps Ray's default (floor of num_cpus, at least 1)."
    )

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments for ``Deployment.options`` (resources, limits, autoscaling)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            actor["num_gpus"] = self.num_gpus
        return {
            "autoscaling_config": self.autoscaling.to_ray(),
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
            "ray_actor_options": actor,
        }


class IngressSettings(DeploymentSettings):
    """The FastAPI ingress: HTTP parsing, auth, orchestration. Async I/O only, so it admits many."""

    max_ongoing_requests: int = Field(128, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(
        256, ge=-1, description="Requests the HTTP proxy queues before refusing (plain-text 503 from Ray Serve); -1: no limit."
    )
    num_cpus: float = Field(0.1, ge=0, description="CPUs each replica reserves in Ray's accounting.")
    autoscaling: AutoscalingSettings = Field(
        default_factory=lambda: AutoscalingSettings(max_replicas=2, target_ongoing_requests=32)
    )


class _BatchedSettings(DeploymentSettings):
    """A deployment that batches with ``@serve.batch``: its batch must fit its ongoing requests.

    Subclasses declare ``max_batch_size`` and ``batch_wait_timeout_s`` with their own defaults.
    """

    @model_validator(mode="after")
    def _batch_fits(self) -> _BatchedSettings:
        size, ongoing = getattr(self, "max_batch_size"), self.max_ongoing_requests  # noqa: B009
        if size > ongoing:
            raise ValueError(
                f"max_batch_size ({size}) exceeds max_ongoing_requests ({ongoing}): "
                "a replica could never collect a full batch"
            )
        return self


class EmbedderSettings(_BatchedSettings):
    """The query embedder (dense query vector + BM25 vector; also /v1/embeddings)."""

    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests each caller queues before refusing; -1: no limit.")
    max_batch_size: int = Field(16, ge=1, description="Queries encoded in one forward pass (@serve.batch).")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")
    autoscaling: AutoscalingSettings = Field(
        default_factory=lambda: AutoscalingSettings(max_replicas=2, target_ongoing_requests=8)
    )


class RetrieverSettings(DeploymentSettings):
    """Vector search and neighbour expansion (reranking is the reranker deployment's).

    With the embedded Qdrant Edge store only one process may open the shard, so this
    deployment must keep exactly one replica (the app refuses a config asking for more).
    """

    max_ongoing_requests: int = Field(32, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests each caller queues before refusing; -1: no limit.")
    search_threads: int = Field(
        4, ge=1, description="Concurrent searches per replica against a Qdrant server (Edge: always 1)."
    )


class RerankerSettings(_BatchedSettings):
    """The cross-encoder reranker: its own deployment, created only when ``retrieval.rerank.model`` is set.

    The ingress asks the retriever for ``retrieval.rerank.candidates`` hits and this
    deployment orders them (the library's :class:`~ragops.retrieval.rerank.Reranker`, on
    ``embedder.device``), so it scales apart from the single-process Edge retriever.
    """

    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(64, ge=-1, description="Requests each caller queues before refusing; -1: no limit.")
    max_batch_size: int = Field(
        4, ge=1, description="Queries whose candidates are scored in one cross-encoder pass (@serve.batch)."
    )
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a batch waits to fill.")
    autoscaling: AutoscalingSettings = Field(
        default_factory=lambda: AutoscalingSettings(max_replicas=2, target_ongoing_requests=4)
    )


class GeneratorSettings(_BatchedSettings):
    """The generator: dynamic batching of non-streaming answers, LoRA adapters multiplexed."""

    max_ongoing_requests: int = Field(16, ge=1, description="Requests a replica works on at once (>= max_batch_size).")
    max_queued_requests: int = Field(32, ge=-1, description="Requests each caller queues before refusing; -1: no limit.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs each replica reserves in Ray's accounting.")
    torch_threads: int | None = Field(
        2, ge=1, description="torch intra-op threads per replica (decoding is the only busy work while serving)."
    )
    max_batch_size: int = Field(8, ge=1, description="Non-streaming answers decoded together (@serve.batch).")
    batch_wait_timeout_s: float = Field(
        0.1,
        ge=0,
        description="How long a batch waits to fill when the model is idle (concurrent requests reach the "
        "generator spread over their retrieval; streamed answers never wait). While a batch runs, new requests "
        "queue and join the next one without this wait.",
    )
    max_adapters_per_replica: int = Field(2, ge=1, description="LoRA adapters kept loaded per replica (LRU).")
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="Extra served model names → adapter reference (registry name/alias or path). Registry "
        "adapters are served by their own names without being listed here.",
    )
    test_hold_file: Path | None = Field(
        None,
        description="TEST HOOK, leave unset: while this file exists every generator request waits before "
        "generating, so tests can fill queues deterministically.",
    )


class ServeConfig(_Strict):
    """``ragops serve``: the OpenAI-compatible RAG endpoint on Ray Serve."""

    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0 needs API keys or --insecure).")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    model_name: str = Field("ragops", min_length=1, description="Public name of the base chat model.")
    embedding_model_name: str = Field(
        "ragops-embedding", min_length=1, description="Public name of the embedding model (/v1/embeddings)."
    )
    request_timeout_s: float = Field(
        120.0, gt=0, description="Time limit of one request; over it the answer is a 504 JSON error."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Largest accepted request body (413 above).")
    max_tokens_limit: int = Field(2048, ge=1, description="Largest max_tokens a chat request may ask for.")
    default_k: int = Field(5, ge=1, le=100, description="Passages retrieved per chat request unless rag.k says.")
    max_k: int = Field(50, ge=1, le=1000, description="Largest k a request may ask for.")
    history_turns: int = Field(
        0,
        ge=0,
        le=20,
        description="Earlier user/assistant turns shown to the reader before the question (0: single-turn; "
        "retrieval always uses the last user message only).",
    )
    max_embedding_inputs: int = Field(256, ge=1, description="Most texts per /v1/embeddings request.")
    retry_after_s: int = Field(1, ge=0, description="Retry-After header (seconds) on 503 overload answers.")
    feedback_dir: Path | None = Field(None, description="Request log and feedback; None: <data_dir>/feedback.")
    replica_niceness: int | None = Field(
        0,
        ge=-20,
        le=19,
        description="Scheduling niceness of the replica processes. Ray starts worker processes at niceness 15, "
        "below everything interactive, which starves a latency-sensitive server on a busy machine; 0 is the "
        "default priority. None keeps Ray's. Raising priority needs the privilege to (it is skipped with a "
        "warning otherwise).",
    )
    cors_origins: list[str] = Field(default_factory=list, description="Origins allowed to call the API from a browser.")
    routes: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Traffic splits: public model name → {variant: weight} (weights >= 0, summing to 1), e.g. "
        "{ragops: {sft-v3: 0.9, ppo-v1: 0.1}}. A variant is any served name (registry artifact or alias, "
        "configured adapter, base model). Sticky per user (OpenAI `user`, x-ragops-user header, API key). "
        "`ragops serve split` changes a split at runtime (stored in the registry, overriding this).",
    )
    ingress: IngressSettings = Field(default_factory=IngressSettings)
    embedder: EmbedderSettings = Field(default_factory=EmbedderSettings)
    retriever: RetrieverSettings = Field(default_factory=RetrieverSettings)
    reranker: RerankerSettings = Field(
        default_factory=RerankerSettings, description="Used only when retrieval.rerank.model is set."
    )
    generator: GeneratorSettings = Field(default_factory=GeneratorSettings)

    @model_validator(mode="after")
    def _k_range(self) -> ServeConfig:
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) exceeds max_k ({self.max_k})")
        return self

    @model_validator(mode="after")
    def _routes_valid(self) -> ServeConfig:
        from ragops.serve.routing import check_weights

        for name, weights in self.routes.items():
            try:
                check_weights(weights)
            except Exception as exc:  # noqa: BLE001 - InputError, reported as a config error
                raise ValueError(f"routes.{name}: {exc}") from None
        return self
