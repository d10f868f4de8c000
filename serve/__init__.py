"""Ray Serve: an OpenAI-compatible RAG chat endpoint (installed as ``ragops.serve``).

Modules:

* :mod:`~ragops.serve.config`: ``ServeConfig``, the ``serve:`` settings (pydantic only);
* :mod:`~ragops.serve.app`: the application builder (``ragops serve``, ``serve run``, KubeRay);
* :mod:`~ragops.serve.ingress`, :mod:`~ragops.serve.embedder`, :mod:`~ragops.serve.retriever`,
  :mod:`~ragops.serve.reranker` (only when ``retrieval.rerank.model`` is set),
  :mod:`~ragops.serve.generator`: the deployments;
* :mod:`~ragops.serve.http_app`: the FastAPI app (endpoints, errors, middleware; no Ray);
* :mod:`~ragops.serve.backend`: handle calls with deadlines and back-pressure;
* :mod:`~ragops.serve.answering`: context assembly, readers and dynamic batching on a replica;
* :mod:`~ragops.serve.schemas`, :mod:`~ragops.serve.openai_format`, :mod:`~ragops.serve.errors`:
  the OpenAI wire format;
* :mod:`~ragops.serve.auth`, :mod:`~ragops.serve.feedback`, :mod:`~ragops.serve.metrics`,
  :mod:`~ragops.serve.models`: API keys, the feedback log, Prometheus metrics, served models;
* ``static/index.html``: the chat page.

Importing this package imports neither Ray nor torch; the deployment modules import Ray.
"""
