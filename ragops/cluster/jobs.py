"""The Ray Job SDK (``ray.job_submission.JobSubmissionClient``) with ragops' error contract.

Every call maps Ray's failure modes to one-line errors: a missing or wrong dashboard token
(:class:`~ragops.cluster.errors.AuthError`), an unreachable dashboard, an unknown job id.
Ray is imported when a :class:`JobClient` is first used, never at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from ragops.cluster.connection import Connection, auth_error, unreachable
from ragops.cluster.entrypoint import JobSpec
from ragops.cluster.errors import ClusterError

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "STOPPED"})


def exit_code_for(status: str) -> int:
    """The CLI's exit status for a finished job: 0 for SUCCEEDED, 1 for FAILED or STOPPED."""
    return 0 if status == "SUCCEEDED" else 1


def short_message(message: str | None) -> str:
    """Ray's failure message without the log tail it appends (we print logs ourselves)."""
    if not message:
        return ""
    for marker in (", last available logs", "\nlast available logs"):
        if marker in message:
            message = message.split(marker, 1)[0]
    return message.strip()


def last_lines(text: str, n: int = 20) -> str:
    """The last ``n`` non-empty lines of a log."""
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return "\n".join(lines[-n:])


class JobClient:
    """Submit, follow and manage jobs on one cluster.

    Args:
        conn: The resolved dashboard address and token.
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self._client: Any = None

    @contextlib.contextmanager
    def _errors(self, job_id: str | None = None) -> Iterator[None]:
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            raise auth_error(self.conn, 403 if "Authentication failed" in str(exc.message) else 401) from None
        except (ConnectionError, requests.ConnectionError, requests.Timeout) as exc:
            raise unreachable(self.conn, type(exc).__name__) from None
        except ValueError as exc:  # e.g. a working dir over Ray's package size limit
            raise ClusterError(f"the job was not accepted: {str(exc).splitlines()[0][:300]}") from None
        except RuntimeError as exc:
            text = str(exc)
            if job_id and ("404" in text or "does not exist" in text):
                raise ClusterError(f"no job '{job_id}' on {self.conn.address}") from None
            raise ClusterError(f"the Jobs API at {self.conn.address} failed: {text.splitlines()[0][:300]}") from None
        except Exception as exc:  # aiohttp errors of the log stream, mapped by their HTTP status
            status = getattr(exc, "status", None)
            if status in (401, 403):
                raise auth_error(self.conn, status) from None
            if type(exc).__module__.startswith("aiohttp"):
                raise unreachable(self.conn, type(exc).__name__) from None
            raise

    @property
    def client(self) -> Any:
        """The underlying ``JobSubmissionClient`` (created on first use; checks the connection)."""
        if self._client is None:
            from ray.job_submission import JobSubmissionClient

            # Ray's import installs INFO-level handlers ("Uploading package...", "WebSocket
            # closed..."): our own lines say what happens, Ray's warnings still show.
            for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
                logging.getLogger(name).setLevel(logging.WARNING)

            with self._errors():
                self._client = JobSubmissionClient(self.conn.address, headers=self.conn.headers)
        return self._client

    def submit(self, spec: JobSpec, **resources: Any) -> str:
        """Submit a job; returns its submission id.

        Args:
            spec: Entrypoint, runtime_env, metadata and id.
            **resources: ``entrypoint_num_cpus`` / ``entrypoint_num_gpus`` / ``entrypoint_memory``.
        """
        with self._errors():
            return str(
                self.client.submit_job(
                    entrypoint=spec.entrypoint,
                    runtime_env=spec.runtime_env or None,
                    metadata=spec.metadata,
                    submission_id=spec.submission_id,
                    **{k: v for k, v in resources.items() if v is not None},
                )
            )

    def info(self, job_id: str) -> dict[str, Any]:
        """Status, message, times, entrypoint, metadata and driver exit code of one job."""
        with self._errors(job_id):
            details = self.client.get_job_info(job_id)
        return _details_dict(details)

    def status(self, job_id: str) -> str:
        """The job's status string (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
        with self._errors(job_id):
            return str(self.client.get_job_status(job_id).value)

    def logs(self, job_id: str) -> str:
        """The job's logs so far."""
        with self._errors(job_id):
            return str(self.client.get_job_logs(job_id))

    def follow(self, job_id: str, write: Callable[[str], None]) -> None:
        """Stream the job's logs to ``write`` until the job ends (``tail_job_logs``)."""
        self.info(job_id)  # a clear "no job" error before opening the stream

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                write(chunk)

        with self._errors(job_id):
            asyncio.run(tail())

    def wait(self, job_id: str, timeout_s: float | None = None, poll_s: float = 1.0) -> dict[str, Any]:
        """Poll until the job is in a terminal state; returns its info.

        Raises:
            ClusterError: ``timeout_s`` passed first (the job keeps running).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            info = self.info(job_id)
            if info["status"] in TERMINAL:
                return info
            if deadline is not None and time.monotonic() > deadline:
                raise ClusterError(f"job {job_id} is still {info['status']} after {timeout_s:.0f}s")
            time.sleep(poll_s)

    def stop(self, job_id: str) -> bool:
        """Ask the cluster to stop a job; False if it had already finished."""
        with self._errors(job_id):
            return bool(self.client.stop_job(job_id))

    def list(self) -> list[dict[str, Any]]:
        """All jobs the cluster knows, newest first."""
        with self._errors():
            jobs = [_details_dict(d) for d in self.client.list_jobs()]
        return sorted(jobs, key=lambda j: j.get("start_time") or 0, reverse=True)


def _details_dict(d: Any) -> dict[str, Any]:
    status = getattr(d, "status", None)
    return {
        "submission_id": getattr(d, "submission_id", None) or getattr(d, "job_id", None),
        "status": str(getattr(status, "value", status)),
        "entrypoint": getattr(d, "entrypoint", ""),
        "message": getattr(d, "message", None),
        "driver_exit_code": getattr(d, "driver_exit_code", None),
        "start_time": getattr(d, "start_time", None),
        "end_time": getattr(d, "end_time", None),
        "metadata": dict(getattr(d, "metadata", None) or {}),
    }


def elapsed_text(seconds: float) -> str:
    """``42s``, ``3m05s``, ``1h02m``."""
    s = int(max(0, seconds))
    if s < 120:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class StateWatcher(threading.Thread):
    """While ``ragops job submit`` follows a job: its state changes, and signs of life.

    A job that waits for resources or works without logging shows nothing in its log stream;
    this thread polls the job's status and prints each change with the elapsed time, and
    while the logs are quiet for ``quiet_s``, a line saying the job is still in its state.

    Args:
        client: A :class:`JobClient` of its own (the follower's is busy streaming).
        job_id: The submitted job.
        say: Where lines go (stderr).
        poll_s: Seconds between status polls.
        quiet_s: Seconds of log silence before a "still RUNNING" line (and between two).
    """

    def __init__(
        self, client: "JobClient", job_id: str, say: Callable[[str], None], *, poll_s: float = 2.0, quiet_s: float = 60.0
    ) -> None:
        super().__init__(daemon=True, name=f"job-state-{job_id}")
        self.client, self.job_id, self.say = client, job_id, say
        self.poll_s, self.quiet_s = poll_s, quiet_s
        self.started = time.monotonic()
        self._last_output = self.started
        self._halt = threading.Event()
        self.states: list[str] = []

    def saw_output(self) -> None:
        """The job wrote log output (it is alive: no heartbeat needed)."""
        self._last_output = time.monotonic()

    def stop(self) -> None:
        """Stop polling."""
        self._halt.set()

    def run(self) -> None:
        last_note = self.started
        while not self._halt.is_set():
            try:
                status = self.client.status(self.job_id)
            except ClusterError:
                status = None  # a dropped poll: the follower reports real failures
            now = time.monotonic()
            if status and (not self.states or status != self.states[-1]):
                before = f"{self.states[-1]} → " if self.states else ""
                self.states.append(status)
                self.say(f"job {self.job_id}: {before}{status} ({elapsed_text(now - self.started)})")
                last_note = now
            elif status and now - max(self._last_output, last_note) >= self.quiet_s:
                self.say(f"job {self.job_id} still {status}, {elapsed_text(now - self.started)} elapsed")
                last_note = now
            if status in TERMINAL:
                return
            self._halt.wait(self.poll_s)
