"""``ragops serve``: run the OpenAI-compatible RAG endpoint on Ray Serve (blocking).

Registered by the CLI as the callback of the ``serve`` group (``ragops serve`` runs it;
``ragops serve split`` is :func:`ragops.commands.llmops.serve_split`). The command checks what it
can before starting anything (bind policy, deployment topology, models, the collection, the
port), starts or joins Ray, deploys :func:`ragops.serve.app.build_application`, prints the URL
and waits; Ctrl-C (or SIGTERM) shuts Serve down cleanly.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from typing import Annotated, Any, Optional

import typer

from ragops.commands.common import (
    ConfigOpt,
    DataDirOpt,
    JsonOpt,
    ScheduleTimeoutOpt,
    SetOpt,
    emit_json,
    err,
    handle_errors,
    out,
    settings_from,
    with_schedule_timeout,
)
from ragops.config import Settings
from ragops.errors import RagopsError

HostOpt = Annotated[
    Optional[str], typer.Option("--host", help="Address to bind (default 127.0.0.1; 0.0.0.0 needs API keys or --insecure).")
]
PortOpt = Annotated[Optional[int], typer.Option("--port", min=1, max=65535, help="HTTP port (default 8000).")]
InsecureOpt = Annotated[
    bool, typer.Option("--insecure", help="Allow a non-loopback address without API keys (an open API).")
]


def preflight(settings: Settings) -> None:
    """Fail fast, with the library's own messages, before Ray is started.

    Checks that the models resolve, that the collection exists, was built with the configured
    embedder and is not held by another process (Edge), and that the port is free.

    Raises:
        RagopsError: the first problem found.
    """
    from ragops.model_registry import resolve_model
    from ragops.retrieval.search import Retriever

    resolve_model(settings.embedder.model, kind="embedder")
    resolve_model(settings.generator.model, kind="generator")
    with Retriever(settings) as retriever:  # opens the store, checks the collection, releases it
        _ = retriever.spec
    host, port = settings.serve.host, settings.serve.port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise RagopsError(f"cannot bind {host}:{port} ({exc.strerror}); pick another --port") from None


def _startup_error(exc: Exception, app_name: str) -> RagopsError:
    """The user-facing line of a failed deployment.

    Ray's exception only names the failed deployments; the replica's own error (a library
    error with a complete message, or a traceback) is in the deployment status.
    """
    from ray import serve

    texts = [str(exc)]
    try:
        app = serve.status().applications.get(app_name)
        for name, dep in (app.deployments if app else {}).items():
            if dep.message:
                texts.append(f"{name}: {dep.message}")
    except Exception:  # noqa: BLE001 - best effort: the exception's text is still there
        pass
    text = "\n".join(texts)
    found = re.findall(r"ragops\.(?:errors|serve\.errors)\.\w+: (.+)", text)
    if found:
        reason = found[-1].strip()
    else:
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b", ln)]
        reason = errors[-1] if errors else (lines[-1] if lines else type(exc).__name__)
    return RagopsError(f"the serve application failed to start: {reason}")


@handle_errors
def serve_command(
    ctx: typer.Context,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    data_dir: DataDirOpt = None,
    host: HostOpt = None,
    port: PortOpt = None,
    insecure: InsecureOpt = False,
    schedule_timeout: ScheduleTimeoutOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Serve the RAG chat API (OpenAI-compatible) and a web chat page on Ray Serve.

    Endpoints: POST /v1/chat/completions (streaming with "stream": true), /v1/search,
    /v1/embeddings, /v1/feedback, GET /v1/models, /healthz, /metrics, and the chat page at /.
    API keys come from RAGOPS_API_KEYS_CHAT and RAGOPS_API_KEYS_ADMIN (comma-separated); without
    keys the server only binds a loopback address unless --insecure is given. Deployment sizes
    and limits are the serve.* settings (see `ragops config show`); each deployment's
    min_replicas must fit the cluster (checked before starting). Blocks until Ctrl-C.
    --json prints {"url", "app", "auth"} once the application is up.
    `ragops serve split NAME --weights ...` changes a running server's traffic split.
    """
    if ctx.invoked_subcommand is not None:
        return  # `ragops serve split ...`: the sub-command does the work
    from ragops.serve.app import APP_NAME, build_application, check_topology
    from ragops.serve.auth import ApiKeys, check_bind

    overrides = with_schedule_timeout(set_, schedule_timeout)
    if host is not None:
        overrides.append(f"serve.host={host}")
    if port is not None:
        overrides.append(f"serve.port={port}")
    settings = settings_from(config, overrides, data_dir)
    keys = ApiKeys.from_env(os.environ)
    check_bind(settings.serve.host, keys, insecure)
    check_topology(settings)
    preflight(settings)
    if insecure and not keys.enabled:
        err.print("[yellow]warning:[/] serving an open API (no API keys) on a public address: --insecure")

    import ray
    from ray import serve

    from ragops.raylocal import ensure_ray

    started_ray = not ray.is_initialized()
    url = _url(settings.serve.host, settings.serve.port)
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        with err.status("starting Ray Serve and loading models…", spinner="dots") if not as_json else _Null():
            ensure_ray(settings.ray)
            # ray.init installs Ray's own SIGTERM handler (it logs a stack and kills the
            # process): take SIGTERM back so that it shuts Serve down like Ctrl-C.
            signal.signal(signal.SIGTERM, _raise_interrupt)
            settings = admit_serve(settings)
            serve.start(http_options={"host": settings.serve.host, "port": settings.serve.port})
            try:
                serve.run(build_application(settings, keys=keys), name=APP_NAME, route_prefix="/")
            except RagopsError:
                raise
            except Exception as exc:  # noqa: BLE001 - a replica failed to start: one clear line
                raise _startup_error(exc, APP_NAME) from None
        info = {"url": url, "app": APP_NAME, "auth": "api-keys" if keys.enabled else "none"}
        if as_json:
            emit_json(info)
        else:
            out.print(f"ragops is serving at [bold]{url}[/]  (chat page: {url}, API: {url}v1, Ctrl-C to stop)")
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        err.print("shutting down…")
    finally:
        signal.signal(signal.SIGTERM, previous)
        _shutdown(started_ray)


def admit_serve(settings: Settings) -> Settings:
    """Admit every deployment's ``min_replicas`` (fit, wait or fail, before Serve waits forever).

    Replicas above the minimum are the autoscaler's to place; when even the largest sizes do
    not fit, a warning says the deployments will stop scaling there.
    """
    from dataclasses import replace

    from ragops.cluster.admission import admit, autoscaling, cluster_room, place
    from ragops.cluster.resources import serve_demands

    demands = serve_demands(settings)
    fitted = admit(settings, [replace(d, count=d.min_count) for d in demands])
    most = None if autoscaling(fitted) else place(serve_demands(fitted), cluster_room())
    if most is not None:
        err.print(f"[yellow]warning:[/] at their autoscaling.max_replicas the deployments will not fit: {most}", highlight=False)
    return fitted


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _shutdown(started_ray: bool) -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            if started_ray:
                ray.shutdown()


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
