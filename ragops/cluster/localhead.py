"""A local Ray head with the Jobs API and token auth: ``ragops cluster up|down|status``.

For users and tests without a cluster: ``ray start --head`` with ``RAY_AUTH_MODE=token``, the
dashboard on 127.0.0.1, and its own temp dir and ports so it never collides with another Ray
on the machine (an in-process ``ray.init()`` of a test session, another user's head).

Why not ``ray stop``: it stops *every* Ray on the machine. The head is started in a new
session, so all its processes (GCS, raylet, dashboard, agents, workers) share one process
group; ``down`` signals exactly that group, plus any process that names the head's temp dir.

State lives in a small registry (``$RAGOPS_HEADS_DIR``, default ``<tmp>/ragops-heads-<uid>``):
``<port>.json`` (addresses, temp dir, process group) and ``<port>.token`` (mode 0600). The
token reaches the head through ``RAY_AUTH_TOKEN_PATH``, never on a command line or in the
environment of its processes; ``ragops job`` finds it by the dashboard URL.

Jobs submitted to this head inherit the environment of ``ragops cluster up``: that is where
their secrets (``QDRANT_API_KEY``...) come from.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ragops.cluster.connection import DEFAULT_DASHBOARD_PORT, Connection, normalize_address
from ragops.cluster.errors import ClusterError

HEADS_DIR_ENV = "RAGOPS_HEADS_DIR"
# Unix socket paths are limited to 107 bytes; Ray puts them under
# <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store (~62 bytes after <temp>).
_MAX_TEMP_DIR_LEN = 44


@dataclass
class HeadInfo:
    """What ``cluster up`` recorded about a local head."""

    dashboard_url: str
    dashboard_port: int
    gcs_address: str
    temp_dir: str
    token_path: str
    pgid: int
    started_at: float
    num_cpus: int | None = None
    num_gpus: int | None = None
    log_path: str = ""

    @property
    def token_file(self) -> Path:
        """The token file (mode 0600)."""
        return Path(self.token_path)

    def connection(self) -> Connection:
        """A :class:`Connection` to this head's Jobs API, with its token."""
        return Connection(self.dashboard_url, "the local head", self.token_file.read_text().strip(), "local head token file")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (no secret: the token stays in its file)."""
        return asdict(self)


def registry_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where local heads are recorded."""
    environ = os.environ if environ is None else environ
    if environ.get(HEADS_DIR_ENV):
        return Path(environ[HEADS_DIR_ENV])
    return Path(tempfile.gettempdir()) / f"ragops-heads-{os.getuid()}"


def _state_file(port: int, environ: Mapping[str, str] | None) -> Path:
    return registry_dir(environ) / f"{port}.json"


def load_head(port: int, environ: Mapping[str, str] | None = None) -> HeadInfo | None:
    """The recorded head on a dashboard port, alive or not; None if none was recorded."""
    f = _state_file(port, environ)
    try:
        return HeadInfo(**json.loads(f.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _recorded_heads(environ: Mapping[str, str] | None) -> list[HeadInfo]:
    d = registry_dir(environ)
    heads = []
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            heads.append(HeadInfo(**json.loads(f.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return heads


def running_heads(environ: Mapping[str, str] | None = None) -> list[HeadInfo]:
    """Recorded heads whose processes are still alive."""
    return [h for h in _recorded_heads(environ) if head_processes(h)]


def head_for_address(address: str, environ: Mapping[str, str] | None = None) -> HeadInfo | None:
    """The recorded head serving this dashboard URL, if any (alive or not)."""
    address = normalize_address(address)
    for h in _recorded_heads(environ):
        if _same_url(h.dashboard_url, address):
            return h
    return None


def _same_url(a: str, b: str) -> bool:
    from urllib.parse import urlparse

    pa, pb = urlparse(a), urlparse(b)
    loop = {"127.0.0.1", "localhost", "::1"}
    host_a = "127.0.0.1" if pa.hostname in loop else pa.hostname
    host_b = "127.0.0.1" if pb.hostname in loop else pb.hostname
    return (pa.scheme, host_a, pa.port) == (pb.scheme, host_b, pb.port)


# -- processes ---------------------------------------------------------------------------


def head_processes(head: HeadInfo) -> list[Any]:
    """Live processes of a head: its process group (started after it) and any process naming
    its temp dir, with their descendants. PID reuse is ruled out by the start time."""
    import psutil

    found: dict[int, Any] = {}
    me = os.getpid()
    protected = {me, *(p.pid for p in psutil.Process(me).parents())}
    for proc in psutil.process_iter(["pid", "cmdline", "create_time"]):
        try:
            if proc.pid in protected or proc.info["create_time"] < head.started_at - 5:
                continue
            cmdline = [arg or "" for arg in (proc.info["cmdline"] or [])]
            names_dir = any(_names_dir(arg, head.temp_dir) for arg in cmdline)
            # Group membership alone could match a stranger that reused the PID as its group
            # id; every process of a head names its temp dir or is a Ray program.
            in_group = os.getpgid(proc.pid) == head.pgid and "ray" in " ".join(cmdline).lower()
            if in_group or names_dir:
                found[proc.pid] = proc
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    for proc in list(found.values()):
        try:
            for child in proc.children(recursive=True):
                if child.pid not in protected:
                    found.setdefault(child.pid, child)
        except psutil.Error:
            continue
    alive = []
    for proc in found.values():
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except psutil.Error:
            continue
    return alive


def _names_dir(arg: str, temp_dir: str) -> bool:
    # Exact path or a path below it: "runs/x-8265" must not match "runs/x-82651".
    return arg == temp_dir or arg.endswith("=" + temp_dir) or (temp_dir + "/") in arg


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def _ray_command() -> list[str]:
    # The `ray` script of this interpreter's environment, so the head runs the same Ray (and
    # sees the same installed ragops) as the CLI, even when the venv is not activated.
    beside = Path(sys.executable).parent / "ray"
    if beside.is_file():
        return [str(beside)]
    found = shutil.which("ray")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from ray.scripts.scripts import main; sys.exit(main())"]


def _head_environment(token_file: Path, environ: Mapping[str, str]) -> dict[str, str]:
    env = dict(environ)
    # A client-side RAY_ADDRESS must not make the new head (or its jobs) join something else.
    env.pop("RAY_ADDRESS", None)
    # RAY_AUTH_TOKEN would win over the file: the head must use the token we recorded.
    env.pop("RAY_AUTH_TOKEN", None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    # Jobs run `ragops ...` through a shell: put this environment's scripts first on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def start_head(
    port: int = DEFAULT_DASHBOARD_PORT,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    temp_dir: str | Path | None = None,
    timeout_s: float = 120.0,
    environ: Mapping[str, str] | None = None,
) -> tuple[HeadInfo, bool]:
    """Start a local head (or find the one already running on ``port``).

    Args:
        port: Dashboard / Jobs API port on 127.0.0.1.
        num_cpus: CPUs the head offers (None: Ray detects).
        num_gpus: GPUs the head offers (None: Ray detects).
        temp_dir: Ray's temp dir for this head (short path; default ``<tmp>/ragops-ray-<uid>-<port>``).
        timeout_s: How long to wait for the Jobs API to answer.
        environ: Environment of the head and its jobs (default ``os.environ``).

    Returns:
        The head and whether it was started now (False: it was already running).

    Raises:
        ClusterError: the port is taken by something else, ``ray start`` failed, or the Jobs
            API did not answer in time (the half-started head is stopped).
    """
    environ = dict(os.environ if environ is None else environ)
    existing = load_head(port, environ)
    if existing is not None and head_processes(existing):
        return existing, False
    if existing is not None:
        _forget(existing, environ, keep_logs=True)
    if _port_in_use(port):
        raise ClusterError(f"port {port} on 127.0.0.1 is in use by something else: pick another with --port")
    temp = Path(temp_dir) if temp_dir else Path(tempfile.gettempdir()) / f"ragops-ray-{os.getuid()}-{port}"
    temp = temp.resolve()
    if len(str(temp)) > _MAX_TEMP_DIR_LEN:
        raise ClusterError(
            f"temp dir {temp} is too long for Ray's unix sockets (at most {_MAX_TEMP_DIR_LEN} characters): "
            "pass a shorter --temp-dir"
        )
    temp.mkdir(parents=True, exist_ok=True)
    reg = registry_dir(environ)
    reg.mkdir(parents=True, exist_ok=True)
    token_file = reg / f"{port}.token"
    token_file.unlink(missing_ok=True)
    fd = os.open(token_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    log_path = reg / f"{port}.log"
    gcs_port = _free_port()
    cmd = _ray_command() + [
        "start", "--head",
        "--temp-dir", str(temp),
        "--port", str(gcs_port),
        "--dashboard-host", "127.0.0.1",
        "--dashboard-port", str(port),
        "--include-dashboard", "true",
        # Fixed defaults (10001, 52365) would collide with another Ray on this machine.
        "--ray-client-server-port", str(_free_port()),
        "--dashboard-agent-listen-port", str(_free_port()),
        "--min-worker-port", "0", "--max-worker-port", "0",
        "--disable-usage-stats",
    ]  # fmt: skip
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    started_at = time.time()
    with open(log_path, "wb") as log:
        # A new session: every process of the head shares this process group, which is how
        # `down` stops exactly this head.
        proc = subprocess.Popen(
            cmd, env=_head_environment(token_file, environ), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            rc = None
    head = HeadInfo(
        dashboard_url=f"http://127.0.0.1:{port}",
        dashboard_port=port,
        gcs_address=_read_gcs_address(temp) or f"127.0.0.1:{gcs_port}",
        temp_dir=str(temp),
        token_path=str(token_file),
        pgid=proc.pid,
        started_at=started_at,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        log_path=str(log_path),
    )
    _state_file(port, environ).write_text(json.dumps(head.to_dict(), indent=2))
    if rc != 0:
        tail = _tail(log_path)
        stop_head(head, environ=environ, keep_logs=True)
        raise ClusterError(f"`ray start --head` failed (exit {rc}); its last output:\n{tail}")
    try:
        wait_for_jobs_api(head.connection(), timeout_s=max(5.0, timeout_s - (time.time() - started_at)))
    except ClusterError:
        stop_head(head, environ=environ, keep_logs=True)
        raise
    head.gcs_address = _read_gcs_address(temp) or head.gcs_address
    _state_file(port, environ).write_text(json.dumps(head.to_dict(), indent=2))
    return head, True


def _read_gcs_address(temp: Path) -> str | None:
    try:
        return (temp / "ray_current_cluster").read_text().strip() or None
    except OSError:
        return None


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


def wait_for_jobs_api(conn: Connection, timeout_s: float = 60.0) -> None:
    """Poll ``GET /api/jobs/`` until the Jobs API answers 200 (the dashboard's job module
    comes up a few seconds after the dashboard itself)."""
    import requests

    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            r = requests.get(conn.address + "/api/jobs/", headers=conn.headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}"
        except requests.RequestException as exc:
            last = type(exc).__name__
        time.sleep(0.5)
    raise ClusterError(f"the Jobs API at {conn.address} did not answer within {timeout_s:.0f}s ({last})")


def stop_head(
    head: HeadInfo | int = DEFAULT_DASHBOARD_PORT,
    *,
    grace_s: float = 5.0,
    keep_logs: bool = False,
    environ: Mapping[str, str] | None = None,
) -> list[int]:
    """Stop one local head: SIGTERM its processes, SIGKILL what is left after ``grace_s``.

    Args:
        head: The head, or its dashboard port.
        grace_s: Seconds between SIGTERM and SIGKILL.
        keep_logs: Keep the head's temp dir (Ray's logs) instead of deleting it.
        environ: Environment used to find the registry.

    Returns:
        PIDs signalled (empty when nothing was running).
    """
    import psutil

    if isinstance(head, int):
        found = load_head(head, environ)
        if found is None:
            return []
        head = found
    procs = head_processes(head)
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace_s)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)
    # Workers spawned while we were signalling (rare) are caught by a second pass.
    late = head_processes(head)
    for p in late:
        try:
            p.kill()
        except psutil.Error:
            pass
    _forget(head, environ, keep_logs=keep_logs)
    return sorted({p.pid for p in procs} | {p.pid for p in late})


def _forget(head: HeadInfo, environ: Mapping[str, str] | None, *, keep_logs: bool) -> None:
    _state_file(head.dashboard_port, environ).unlink(missing_ok=True)
    head.token_file.unlink(missing_ok=True)
    if not keep_logs:
        shutil.rmtree(head.temp_dir, ignore_errors=True)
        if head.log_path:
            Path(head.log_path).unlink(missing_ok=True)


def cluster_summary(conn: Connection) -> dict[str, Any]:
    """Nodes and total resources of any cluster, from its State API."""
    from ragops.cluster.connection import alive_nodes

    nodes = alive_nodes(conn)
    totals: dict[str, float] = {}
    for n in nodes:
        for k, v in (n.get("resources_total") or {}).items():
            if k in ("CPU", "GPU", "memory", "object_store_memory"):
                totals[k] = totals.get(k, 0.0) + float(v)
    return {
        "address": conn.address,
        "nodes": len(nodes),
        "CPU": totals.get("CPU", 0.0),
        "GPU": totals.get("GPU", 0.0),
        "memory_gb": round(totals.get("memory", 0.0) / 1e9, 1),
    }
