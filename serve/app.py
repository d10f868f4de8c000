"""The Ray Serve application: four deployments (five with a reranker) composed with handles.

::

    HTTP ─▶ Ingress (FastAPI) ──▶ QueryEmbedder   query → dense + BM25 vectors   (@serve.batch)
                              ──▶ Retriever       vectors → hits (Qdrant), neighbours
                              ──▶ Reranker        hits → cross-encoder order     (@serve.batch;
                                                  only when retrieval.rerank.model is set)
                              ──▶ Generator       hits → cited answer            (@serve.batch,
                                                  streamed or whole; LoRA via @serve.multiplexed)

Three ways to run it:

* ``ragops serve`` (:mod:`ragops.commands.serve`): local Ray started on demand, blocking;
* ``serve run ragops.serve.app:build_app config=my.yaml set=serve.port=8001``;
* a KubeRay RayService ``serveConfigV2``::

      applications:
        - name: ragops
          import_path: ragops.serve.app:build_app
          route_prefix: /
          args: {config: /etc/ragops/config.yaml, set: ["vectorstore.backend=qdrant", "vectorstore.url=http://qdrant:6333"]}

API keys are read from the environment of the process that builds the app
(``RAGOPS_API_KEYS_CHAT`` / ``RAGOPS_API_KEYS_ADMIN``) and only their digests are passed on.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ray.serve import Application

from ragops.config import Settings, load_settings
from ragops.errors import ConfigError
from ragops.serve.auth import ApiKeys

APP_NAME = "ragops"


def check_topology(settings: Settings) -> None:
    """Refuse deployment settings the vector store cannot support.

    Raises:
        ConfigError: the embedded Edge store with more than one retriever replica, or a GPU
            reserved for a model configured to run on the CPU.
    """
    # The reranker's cross-encoder runs on embedder.device, as in the library's Retriever.
    sections = [("generator", "generator", settings.generator.device), ("embedder", "embedder", settings.embedder.device)]
    if settings.retrieval.rerank.model:
        sections.append(("reranker", "embedder", settings.embedder.device))
    for section, device_key, device in sections:
        gpus = getattr(settings.serve, section).num_gpus
        if gpus > 0 and device == "cpu":
            raise ConfigError(
                f"serve.{section}.num_gpus={gpus:g} reserves a GPU, but {device_key}.device is 'cpu': set "
                f"--set {device_key}.device=auto (or cuda) so the model runs on it"
            )
    auto = settings.serve.retriever.autoscaling
    if settings.vectorstore.backend == "edge" and (auto.max_replicas > 1 or auto.min_replicas > 1):
        raise ConfigError(
            f"serve.retriever.autoscaling asks for up to {auto.max_replicas} replicas, but the embedded Qdrant Edge "
            "store can be opened by one process only: keep serve.retriever.autoscaling.max_replicas=1, or use a "
            "Qdrant server (--set vectorstore.backend=qdrant --set vectorstore.url=http://HOST:6333), which scales."
        )


def build_application(settings: Settings, *, keys: ApiKeys | None = None) -> Application:
    """Bind the deployments with their options from ``settings.serve``.

    The reranker deployment exists only when ``retrieval.rerank.model`` is set.

    Args:
        settings: Full settings (the ``serve`` section sizes the deployments).
        keys: API key digests; None reads them from the environment.

    Raises:
        ConfigError: see :func:`check_topology`.
    """
    from ragops.serve.embedder import QueryEmbedder
    from ragops.serve.generator import GeneratorDeployment
    from ragops.serve.ingress import Ingress
    from ragops.serve.reranker import RerankerDeployment
    from ragops.serve.retriever import RetrieverDeployment

    check_topology(settings)
    settings = _absolute_paths(settings)
    keys = keys if keys is not None else ApiKeys.from_env(os.environ)
    sc = settings.serve
    data = settings.model_dump(mode="json")
    embedder = QueryEmbedder.options(**sc.embedder.deployment_options()).bind(data)
    retriever = RetrieverDeployment.options(**sc.retriever.deployment_options()).bind(data)
    generator = GeneratorDeployment.options(**sc.generator.deployment_options()).bind(data)
    reranker = None
    if settings.retrieval.rerank.model:
        reranker = RerankerDeployment.options(**sc.reranker.deployment_options()).bind(data)
    ingress_opts = sc.ingress.deployment_options()
    # Refusals at the proxy (the ingress queue is full) carry Retry-After too. Their body stays
    # Ray Serve's plain text, not the API's JSON error: Ray 2.60's BackpressureConfig sets only
    # the status code (503/429) and Retry-After, and the proxy writes the exception message as
    # text/plain before any deployment code runs. Only a proxy-wide middleware could rewrite it,
    # and that is installed through an environment variable read when the proxy starts
    # (RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH), which an application cannot set for a cluster.
    ingress_opts["backpressure_config"] = {"status_code": 503, "retry_after_s": sc.retry_after_s}
    return Ingress.options(**ingress_opts).bind(data, keys, embedder, retriever, generator, reranker)


def _absolute_paths(settings: Settings) -> Settings:
    """Settings with the data and feedback directories made absolute.

    Replicas are other processes whose working directory is Ray's, not the caller's: a
    relative ``.ragops`` would point somewhere else there.
    """
    serve = settings.serve
    if serve.feedback_dir is not None:
        serve = serve.model_copy(update={"feedback_dir": serve.feedback_dir.expanduser().resolve()})
    update: dict[str, Any] = {"data_dir": settings.data_dir.expanduser().resolve(), "serve": serve}
    finetune = getattr(settings, "finetune", None)
    registry = getattr(finetune, "registry_path", None)
    if isinstance(registry, str) and registry and "://" not in registry and not Path(registry).is_absolute():
        update["finetune"] = finetune.model_copy(update={"registry_path": str(Path(registry).expanduser().resolve())})
    return settings.model_copy(update=update)


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Mapping):  # {"serve.port": 8001}
        return [f"{k}={v}" for k, v in value.items()]
    if isinstance(value, Sequence):
        return [str(v) for v in value]
    raise ConfigError(f"expected a string or a list, got {type(value).__name__}")


def build_app(args: Mapping[str, Any] | None = None) -> Application:
    """Application builder for ``serve run`` and KubeRay ``serveConfigV2`` (``import_path``).

    Args:
        args: ``config``: YAML file(s) or preset name(s); ``set``: ``dotted.key=value``
            override(s) (a string, a list, or a mapping); ``data_dir``: the data directory.

    Raises:
        ConfigError: unknown argument, bad configuration.
    """
    args = dict(args or {})
    unknown = set(args) - {"config", "set", "data_dir"}
    if unknown:
        raise ConfigError(f"unknown build_app argument(s): {', '.join(sorted(unknown))}; allowed: config, set, data_dir")
    settings = load_settings(_as_list(args.get("config")), _as_list(args.get("set")), data_dir=args.get("data_dir"))
    return build_application(settings)
