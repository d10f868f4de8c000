"""``ragops job``, ``ragops cluster`` and ``ragops kuberay``: from laptop to cluster.

Registered by the CLI as::

    app.add_typer(job_app, name="job")
    app.add_typer(cluster_app, name="cluster")
    app.add_typer(kuberay_app, name="kuberay")

Thin layer: parse, call :mod:`ragops.cluster`, render. Progress and warnings go to stderr,
results to stdout (``--json`` keeps stdout parseable).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from ragops.commands.common import ConfigOpt, JsonOpt, SetOpt, emit_json, err, handle_errors, out

job_app = typer.Typer(
    help="Run any ragops command as a Ray job on a cluster (the Ray Job SDK), and follow it.", no_args_is_help=True
)
cluster_app = typer.Typer(
    help="A local Ray head with the Jobs API and token auth, for trying job submission without a cluster.",
    no_args_is_help=True,
)
kuberay_app = typer.Typer(help="Render KubeRay RayJob / RayService / RayCluster manifests from settings.", no_args_is_help=True)

AddressOpt = Annotated[
    Optional[str],
    typer.Option(
        "--address",
        help="Ray dashboard URL, e.g. http://127.0.0.1:8265 (default: $RAY_ADDRESS, then ray.address, then the local head).",
    ),
]
PortOpt = Annotated[int, typer.Option("--port", min=1024, max=65535, help="Dashboard / Jobs API port on 127.0.0.1.")]


def _warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}", highlight=False)


def _connect(address: str | None, config: list[str] | None = None, set_: list[str] | None = None) -> Any:
    from ragops.cluster.connection import connect
    from ragops.config import load_settings

    config_address = None
    if config or set_:
        config_address = load_settings(config or [], set_ or []).ray.address
    return connect(address, config_address)


def _when(ts: int | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts / 1000, tz=timezone.utc).astimezone().strftime("%Y-%m-%d %H:%M:%S")


# -- job ---------------------------------------------------------------------------------
@job_app.command("submit", context_settings={"allow_interspersed_args": False})
@handle_errors
def job_submit(
    command: Annotated[list[str], typer.Argument(help="The command to run, after --, e.g. -- ragops ingest docs.")],
    address: AddressOpt = None,
    working_dir: Annotated[
        Path, typer.Option("--working-dir", help="Folder shipped to the cluster; the job runs inside it.")
    ] = Path("."),
    no_working_dir: Annotated[
        bool, typer.Option("--no-working-dir", help="Ship nothing (inputs are URIs or already on the cluster).")
    ] = False,
    pip: Annotated[
        Optional[list[str]],
        typer.Option("--pip", help="Extra pip requirement installed for this job (repeatable; opt-in, downloads)."),
    ] = None,
    pip_project: Annotated[
        bool, typer.Option("--pip-project", help="Install the working dir's pyproject dependencies (opt-in, downloads).")
    ] = False,
    env: Annotated[
        Optional[list[str]],
        typer.Option("--env", help="NAME of a variable the job needs from the cluster's environment (repeatable; never a value)."),
    ] = None,
    submission_id: Annotated[Optional[str], typer.Option("--submission-id", help="Job id (default ragops-<cmd>-<hex>).")] = None,
    num_cpus: Annotated[Optional[float], typer.Option("--num-cpus", min=0, help="CPUs reserved for the driver.")] = None,
    num_gpus: Annotated[Optional[float], typer.Option("--num-gpus", min=0, help="GPUs reserved for the driver.")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="Print the job id and return at once.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Submit COMMAND as a Ray job, stream its logs and exit with its status.

    While it waits, the job's state changes (PENDING → RUNNING → ...) and, when its logs are
    quiet, the elapsed time are printed on stderr.

    Exit status: 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED (the failure
    message and the last log lines go to stderr), 2 when it was refused before submission.
    Ctrl-C detaches: the job keeps running (`ragops job stop ID` stops it).

    Only the working dir travels (the cluster image has ragops); --pip/--pip-project add
    packages. Secrets never travel: --env NAME lists what the job needs and the cluster
    provides the value (KubeRay: a Secret in the pod spec; `ragops cluster up`: its own
    environment). A ragops job using the embedded Qdrant Edge store is refused on a cluster
    with several nodes.
    """
    from ragops.cluster.connection import alive_nodes, connect
    from ragops.cluster.entrypoint import build_job, check_store_placement, project_requirements
    from ragops.cluster.errors import AuthError, ClusterError
    from ragops.cluster.jobs import JobClient, StateWatcher, exit_code_for, last_lines, short_message
    from ragops.errors import RagopsError

    wd: Path | None = None if no_working_dir else working_dir.resolve()
    if wd is not None and not wd.is_dir():
        raise RagopsError(f"--working-dir {working_dir} is not a folder")
    reqs = list(pip or [])
    if pip_project:
        reqs += project_requirements(wd or Path.cwd())
    spec = build_job(command, working_dir=wd, pip=reqs, env_names=env or [], submission_id=submission_id)
    conn = connect(address, spec.settings.ray.address if spec.settings else None)
    if spec.settings is not None and spec.settings.vectorstore.backend == "edge":
        try:
            nodes: int | None = len(alive_nodes(conn))
        except AuthError:
            raise
        except ClusterError:
            nodes = None  # an old dashboard without the State API: warn below instead
        spec.warnings += check_store_placement(spec, conn.address, conn.is_local, nodes)
    for w in spec.warnings:
        _warn(w)
    client = JobClient(conn)
    job_id = client.submit(spec, entrypoint_num_cpus=num_cpus, entrypoint_num_gpus=num_gpus)
    err.print(f"submitted [bold]{job_id}[/] to {conn.address} ({conn.source})", highlight=False)
    if no_wait:
        if as_json:
            emit_json({"submission_id": job_id, "address": conn.address, "status": "PENDING"})
        else:
            out.print(job_id, highlight=False)
        return
    log_stream = sys.stderr if as_json else sys.stdout

    watcher = StateWatcher(JobClient(conn), job_id, lambda line: err.print(line, highlight=False, markup=False))

    def write(chunk: str) -> None:
        watcher.saw_output()
        log_stream.write(chunk)
        log_stream.flush()

    started = time.monotonic()
    watcher.start()
    try:
        try:
            client.follow(job_id, write)
        except ClusterError as exc:  # the stream broke: fall back to polling
            _warn(f"log stream interrupted ({exc}); waiting for the job")
        info = client.wait(job_id, timeout_s=None)
    except KeyboardInterrupt:
        err.print(f"[yellow]detached[/]: {job_id} keeps running; `ragops job logs {job_id} --follow` or `ragops job stop {job_id}`")
        raise typer.Exit(130) from None
    finally:
        watcher.stop()
        watcher.join(timeout=3)
    status = info["status"]
    code = exit_code_for(status)
    elapsed = time.monotonic() - started
    if code == 0:
        err.print(f"job {job_id} [green]{status}[/] in {elapsed:.1f}s", highlight=False)
    else:
        exit_note = f" (driver exit code {info['driver_exit_code']})" if info.get("driver_exit_code") is not None else ""
        err.print(f"[bold red]job {job_id} {status}[/]{exit_note}: {short_message(info['message'])}", highlight=False)
        tail = last_lines(client.logs(job_id))
        if tail:
            err.print("[dim]last log lines:[/]", highlight=False)
            err.print(tail, highlight=False, markup=False)
    if as_json:
        emit_json({**info, "address": conn.address})
    raise typer.Exit(code)


@job_app.command("status")
@handle_errors
def job_status(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Status, message, times and entrypoint of one job."""
    from ragops.cluster.jobs import JobClient

    info = JobClient(_connect(address, config, set_)).info(job_id)
    if as_json:
        emit_json(info)
        return
    table = Table(show_header=False)
    for k in ("submission_id", "status", "message", "driver_exit_code", "entrypoint"):
        table.add_row(k, str(info.get(k) if info.get(k) is not None else "-"))
    table.add_row("started", _when(info["start_time"]))
    table.add_row("ended", _when(info["end_time"]))
    out.print(table)


@job_app.command("logs")
@handle_errors
def job_logs(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep streaming until the job ends.")] = False,
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print a job's logs (--follow streams them until the job ends)."""
    from ragops.cluster.jobs import JobClient

    client = JobClient(_connect(address, config, set_))
    if not follow:
        sys.stdout.write(client.logs(job_id))
        sys.stdout.flush()
        return

    def write(chunk: str) -> None:
        sys.stdout.write(chunk)
        sys.stdout.flush()

    client.follow(job_id, write)


@job_app.command("stop")
@handle_errors
def job_stop(
    job_id: Annotated[str, typer.Argument(help="Submission id.")],
    address: AddressOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Stop a running job (its status becomes STOPPED)."""
    from ragops.cluster.jobs import JobClient

    stopped = JobClient(_connect(address, config, set_)).stop(job_id)
    if as_json:
        emit_json({"submission_id": job_id, "stopped": stopped})
    else:
        out.print(f"stopping {job_id}" if stopped else f"{job_id} had already finished", highlight=False)


@job_app.command("list")
@handle_errors
def job_list(address: AddressOpt = None, config: ConfigOpt = None, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Jobs the cluster knows, newest first."""
    from ragops.cluster.jobs import JobClient

    jobs = JobClient(_connect(address, config, set_)).list()
    if as_json:
        emit_json({"jobs": jobs})
        return
    table = Table("submission id", "status", "started", "entrypoint", title=f"{len(jobs)} jobs")
    for j in jobs:
        ep = j["entrypoint"] or ""
        table.add_row(j["submission_id"] or "-", j["status"], _when(j["start_time"]), ep[:80] + ("…" if len(ep) > 80 else ""))
    out.print(table)


# -- cluster -----------------------------------------------------------------------------
@cluster_app.command("up")
@handle_errors
def cluster_up(
    port: PortOpt = 8265,
    num_cpus: Annotated[Optional[int], typer.Option("--num-cpus", min=1, help="CPUs the head offers (default: all).")] = None,
    num_gpus: Annotated[Optional[int], typer.Option("--num-gpus", min=0, help="GPUs the head offers (default: detected).")] = None,
    temp_dir: Annotated[
        Optional[Path], typer.Option("--temp-dir", help="Ray's temp dir for this head (short path; default under /tmp).")
    ] = None,
    timeout: Annotated[float, typer.Option("--timeout", min=5, help="Seconds to wait for the Jobs API.")] = 120.0,
    as_json: JsonOpt = False,
) -> None:
    """Start a local Ray head (token auth, dashboard on 127.0.0.1:PORT) and wait for its Jobs API.

    Prints the CPUs and GPUs the head registered, and warns when they are fewer than the
    default settings of `ragops ingest` or `ragops train` need.

    Jobs submitted to it inherit this command's environment: export the secrets they need
    (QDRANT_API_KEY, ...) before running it. Stop it with `ragops cluster down`.
    """
    from ragops.cluster.localhead import start_head

    with err.status("starting a local Ray head…", spinner="dots") if not as_json else _Null():
        head, started = start_head(port, num_cpus=num_cpus, num_gpus=num_gpus, temp_dir=temp_dir, timeout_s=timeout)
    data = {**head.to_dict(), "started": started}
    summary, notes = _capacity_notes(head.dashboard_url)
    data.update({"CPU": summary.get("CPU"), "GPU": summary.get("GPU"), "warnings": notes})
    if as_json:
        emit_json(data)
        return
    verb = "started" if started else "already running"
    out.print(f"local Ray head {verb}: {head.dashboard_url}", highlight=False)
    if summary:
        out.print(f"  registered {_count(summary['CPU'], 'CPU')}, {_count(summary['GPU'], 'GPU')}", highlight=False)
    for note in notes:
        _warn(note)
    out.print(f"  ragops job submit --address {head.dashboard_url} -- ragops ingest ./docs", highlight=False)
    out.print(
        f"  plain Ray CLI: RAY_ADDRESS={head.dashboard_url} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={head.token_path} "
        "ray job list",
        highlight=False,
    )
    out.print(f"  stop it: ragops cluster down --port {head.dashboard_port}", highlight=False)


def _count(n: float, unit: str) -> str:
    return f"{n:g} {unit}" + ("" if n == 1 else "s")


def _capacity_notes(address: str) -> tuple[dict[str, Any], list[str]]:
    """The head's registered resources, and a warning per command whose defaults need more."""
    from ragops.cluster.admission import NodeRoom, place
    from ragops.cluster.connection import connect
    from ragops.cluster.errors import ClusterError
    from ragops.cluster.localhead import cluster_summary
    from ragops.cluster.resources import job_demands, training_demands
    from ragops.config import Settings

    try:
        summary = cluster_summary(connect(address))
    except ClusterError:
        return {}, []
    node = NodeRoom("head", summary["CPU"], summary["GPU"], summary["CPU"], summary["GPU"])
    defaults = Settings()
    load, actors = job_demands(defaults, "ingest")
    notes = []
    for command, demands in (("ingest", [actors, load]), ("train", training_demands(defaults, "sft"))):
        if place(demands, [node]) is not None:
            need = sum(d.cpus * d.count for d in demands)
            parts = " + ".join(d.label or d.what for d in demands)
            notes.append(
                f"{_count(summary['CPU'], 'CPU')} {'is' if summary['CPU'] == 1 else 'are'} fewer than the default "
                f"`ragops {command}` asks for ({need:g} CPUs: {parts}). "
                "Jobs fit built-in defaults to this head; values you set yourself must fit (or restart it with a "
                "larger --num-cpus)"
            )
    return summary, notes


@cluster_app.command("down")
@handle_errors
def cluster_down(
    port: PortOpt = 8265,
    keep_logs: Annotated[bool, typer.Option("--keep-logs", help="Keep Ray's temp dir (logs) of the head.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Stop the local head on PORT (only its own processes; other Ray instances are untouched)."""
    from ragops.cluster.localhead import stop_head

    pids = stop_head(port, keep_logs=keep_logs)
    if as_json:
        emit_json({"port": port, "stopped": bool(pids), "pids": pids})
    else:
        out.print(f"stopped the local head on port {port} ({len(pids)} processes)" if pids else f"no local head on port {port}")


@cluster_app.command("status")
@handle_errors
def cluster_status(
    port: Annotated[Optional[int], typer.Option("--port", help="Local head port (default: --address or 8265).")] = None,
    address: AddressOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Nodes, CPUs and GPUs of the local head on PORT, or of any cluster with --address."""
    from ragops.cluster.connection import connect
    from ragops.cluster.errors import ClusterError
    from ragops.cluster.localhead import cluster_summary, head_processes, load_head

    data: dict[str, Any] = {}
    if address:
        conn = connect(address)
    else:
        head = load_head(port or 8265)
        if head is None or not head_processes(head):
            if as_json:
                emit_json({"running": False, "port": port or 8265})
            else:
                out.print(f"no local head on port {port or 8265} (start one with `ragops cluster up`)")
            raise typer.Exit(1)
        data.update(head.to_dict())
        conn = head.connection()
    try:
        data.update(cluster_summary(conn), running=True)
    except ClusterError as exc:
        data.update(running=False, error=str(exc))
    if as_json:
        emit_json(data)
    else:
        table = Table(show_header=False)
        for k in ("address", "running", "nodes", "CPU", "GPU", "memory_gb", "temp_dir", "error"):
            if k in data:
                table.add_row(k, str(data[k]))
        out.print(table)
    if not data.get("running"):
        raise typer.Exit(1)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


# -- kuberay -----------------------------------------------------------------------------
@kuberay_app.command("render", context_settings={"allow_interspersed_args": False})
@handle_errors
def kuberay_render(
    args: Annotated[
        Optional[list[str]], typer.Argument(help="Arguments of the job's command, after -- (e.g. -- s3://bucket/docs).")
    ] = None,
    job: Annotated[
        Optional[str], typer.Option("--job", help="RayJob for: ingest | train-sft | train-reward | eval.")
    ] = None,
    service: Annotated[bool, typer.Option("--service", help="RayService for the chat endpoint.")] = False,
    cluster: Annotated[bool, typer.Option("--cluster", help="RayCluster for interactive use (job submit).")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    image: Annotated[Optional[str], typer.Option("--image", help="Image with ragops installed (default ragops:VERSION).")] = None,
    namespace: Annotated[Optional[str], typer.Option("--namespace", "-n", help="metadata.namespace.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="metadata.name (default ragops-<job>, ragops-serve, ragops).")] = None,
    data_pvc: Annotated[
        Optional[str], typer.Option("--data-pvc", help="ReadWriteMany PVC mounted at data_dir on every pod (shared storage).")
    ] = None,
    secret: Annotated[
        str, typer.Option("--secret", help="Secret with qdrant-api-key, api-keys-chat, api-keys-admin.")
    ] = "ragops-secrets",
    ray_auth_secret: Annotated[
        str, typer.Option("--ray-auth-secret", help="Secret with the Ray token (key auth_token).")
    ] = "ragops-ray-auth",
    no_auth: Annotated[bool, typer.Option("--no-auth", help="No Ray token authentication (not recommended).")] = False,
    secret_env: Annotated[
        Optional[list[str]],
        typer.Option("--secret-env", help="NAME or NAME=SECRET:KEY: one more variable from a Secret (repeatable)."),
    ] = None,
    head_cpus: Annotated[int, typer.Option("--head-cpus", min=1)] = 2,
    head_memory: Annotated[str, typer.Option("--head-memory")] = "8Gi",
    worker_cpus: Annotated[int, typer.Option("--worker-cpus", min=1, help="CPUs per CPU worker pod.")] = 4,
    worker_memory: Annotated[str, typer.Option("--worker-memory", help="Memory per CPU worker pod.")] = "16Gi",
    gpu_worker_cpus: Annotated[int, typer.Option("--gpu-worker-cpus", min=1, help="CPUs per GPU worker pod.")] = 8,
    gpu_worker_memory: Annotated[str, typer.Option("--gpu-worker-memory", help="Memory per GPU worker pod.")] = "32Gi",
    gpus_per_pod: Annotated[int, typer.Option("--gpus-per-pod", min=1, help="nvidia.com/gpu per GPU worker pod.")] = 1,
    ttl: Annotated[int, typer.Option("--ttl", min=0, help="RayJob ttlSecondsAfterFinished.")] = 600,
    deadline: Annotated[Optional[int], typer.Option("--deadline", min=1, help="RayJob activeDeadlineSeconds.")] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="RayService: start without API keys (an open API).")
    ] = False,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Write here instead of stdout.")] = None,
) -> None:
    """Print a KubeRay manifest (YAML) built from the settings (--config/--set only).

    The settings that differ from the defaults travel as RAGOPS_* pod environment
    (RayJob, RayCluster) or as build_app arguments in serveConfigV2 (RayService); secrets
    as Secret references; worker groups follow the stages' CPU/GPU settings.
    """
    from ragops.cluster.kuberay import (
        RenderOptions,
        parse_secret_env,
        render_cluster,
        render_job,
        render_service,
        to_yaml,
    )
    from ragops.cluster.resources import JOB_KINDS, PodShape, Shapes
    from ragops.config import load_settings
    from ragops.errors import InputError

    picked = [bool(job), service, cluster]
    if sum(picked) != 1:
        raise InputError("pick exactly one of --job KIND, --service, --cluster")
    if job and job not in JOB_KINDS:
        raise InputError(f"--job '{job}': allowed: {', '.join(JOB_KINDS)}")
    if args and not job:
        raise InputError("arguments after -- are for --job (the command's arguments)")
    # Only files and --set: the submitter's own RAGOPS_* environment must not leak into a manifest.
    settings = load_settings(config or [], set_ or [], environ={})
    opts = RenderOptions(
        namespace=namespace,
        name=name,
        shapes=Shapes(
            head=PodShape(head_cpus, head_memory),
            cpu_worker=PodShape(worker_cpus, worker_memory),
            gpu_worker=PodShape(gpu_worker_cpus, gpu_worker_memory, gpus_per_pod),
        ),
        app_secret=secret,
        ray_auth_secret=None if no_auth else ray_auth_secret,
        secret_env=parse_secret_env(secret_env or [], secret),
        data_pvc=data_pvc,
        ttl_s=ttl,
        deadline_s=deadline,
        insecure=insecure,
        sources=[*(config or []), *(f"--set {s}" for s in (set_ or []))],
    )
    if image:
        opts.image = image
    if job:
        manifest = render_job(settings, job, args or [], opts)
    elif service:
        manifest = render_service(settings, opts)
    else:
        manifest = render_cluster(settings, opts)
    if not data_pvc:
        _warn(
            f"no --data-pvc: data_dir ({settings.data_dir}) is each pod's own disk, so manifests, training runs "
            "and artifacts are lost with the pods; mount shared storage with --data-pvc CLAIM"
        )
    text = to_yaml(manifest, opts)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        err.print(f"wrote {manifest['kind']} {manifest['metadata']['name']} to {output}", highlight=False)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
