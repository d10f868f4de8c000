"""The stall watchdog: a Ray pipeline or training that stops moving ends, and says why.

Ray waits forever for resources that never come, and a stage that hangs (a lost node, a
deadlocked library) looks the same from the driver: nothing happens. The command beats the
watchdog on every unit of progress (an embedded batch, a training step). When no beat came
for ``runtime.stall_timeout_s``, the watchdog prints what Ray reports as pending (resource
demands that cannot be placed, actors waiting to be created), interrupts the command's main
thread, and the command exits with :class:`Stalled`'s code. Whatever was written stays: ingest
skips the documents already stored on the next run, training resumes from its checkpoint.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any

from ragops.errors import RagopsError

log = logging.getLogger(__name__)

#: Seconds the interrupted command gets to unwind before the process exits on its own.
GRACE_S = 60.0


class Stalled(RagopsError):
    """A running pipeline or training made no progress for ``runtime.stall_timeout_s``."""

    exit_code = 6


def pending_report() -> str:
    """What the connected Ray is waiting for: unplaceable demands and actors not yet created."""
    parts = []
    try:
        import ray
        from ray._private import state
        from ray._raylet import GcsClient
        from ray.autoscaler.v2.sdk import get_cluster_resource_state

        demands = []
        gcs = GcsClient(ray.get_runtime_context().gcs_address)
        for req in get_cluster_resource_state(gcs).pending_resource_requests:
            bundle = ", ".join(f"{k}: {v:g}" for k, v in sorted(req.request.resources_bundle.items()))
            demands.append(f"{req.count} × {{{bundle}}}")
        parts.append("pending resource demand: " + ("; ".join(demands) if demands else "none"))
        waiting = sorted(
            {str(a.get("ActorClassName")) for a in state.actors().values() if a.get("State") in ("PENDING_CREATION", "DEPENDENCIES_UNREADY")}
        )
        if waiting:
            parts.append("actors waiting to start: " + ", ".join(waiting))
        free = ray.available_resources()
        parts.append(f"free: {free.get('CPU', 0.0):g} CPU, {free.get('GPU', 0.0):g} GPU")
    except Exception as exc:  # noqa: BLE001 - the report is best effort; the stall is the news
        parts.append(f"(Ray's pending state is unavailable: {type(exc).__name__})")
    return "; ".join(parts)


class Watchdog:
    """Fires when :meth:`beat` was not called for ``timeout_s`` seconds.

    Use as a context manager around the work, on the main thread::

        with Watchdog(300, "ingest", status=lambda: f"{done}/{total} files") as dog:
            for batch in batches:
                dog.beat()

    Args:
        timeout_s: Seconds without progress; 0 disables the watchdog.
        what: The command, for the message (``ingest``, ``train sft``).
        status: Where the work stands (files done, last step), for the message.
        pending: What Ray waits for (:func:`pending_report`; tests pass their own).
        write: Where the message goes when the process must exit without unwinding (stderr).
        hard_exit: Exit the process if the interrupted main thread has not unwound after
            :data:`GRACE_S` (a driver stuck in a C call never sees the interrupt).
    """

    def __init__(
        self,
        timeout_s: float,
        what: str,
        *,
        status: Callable[[], str] | None = None,
        pending: Callable[[], str] = pending_report,
        write: Callable[[str], None] | None = None,
        hard_exit: bool = True,
    ) -> None:
        self.timeout_s = timeout_s
        self.what = what
        self.status = status
        self.pending = pending
        self.write = write or _stderr
        self.hard_exit = hard_exit
        self.message: str | None = None
        self._last = time.monotonic()
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._previous: Any = signal.SIG_DFL
        self._main = threading.main_thread().ident

    @property
    def fired(self) -> bool:
        """Whether the watchdog declared a stall."""
        return self.message is not None

    def beat(self) -> None:
        """Record progress."""
        self._last = time.monotonic()

    def __enter__(self) -> "Watchdog":
        if self.timeout_s > 0 and threading.current_thread() is threading.main_thread():
            self._last = time.monotonic()
            # Our own SIGINT handler while we watch: libraries install theirs and keep them
            # (Ray Train's stays after fit() returns), and ours must still interrupt the work.
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
            self._thread = threading.Thread(target=self._watch, daemon=True, name=f"watchdog-{self.what}")
            self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._halt.set()
        if self._thread is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.fired:
            # Whatever the interrupted work raised (KeyboardInterrupt, Ray Train's abort), the
            # cause is the stall.
            raise Stalled(self.message or "") from None

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if not self.fired:  # a real Ctrl-C: whatever handled it before
            if callable(previous):
                previous(signum, frame)
                return
            if previous == signal.SIG_IGN:
                return
        raise KeyboardInterrupt

    def _watch(self) -> None:
        period = max(0.2, min(5.0, self.timeout_s / 5))
        while not self._halt.wait(period):
            idle = time.monotonic() - self._last
            if idle < self.timeout_s:
                continue
            where = f" ({self.status()})" if self.status else ""
            self.message = (
                f"{self.what} made no progress for {idle:.0f}s{where}; {self.pending()}. "
                "Stopped here: run the same command again to resume, and lower the resources it asks for "
                "or add nodes if Ray has demand it cannot place (runtime.stall_timeout_s sets the limit)"
            )
            if self._main is not None:
                signal.pthread_kill(self._main, signal.SIGINT)  # the command raises Stalled and says why
            if self.hard_exit and self._halt.wait(GRACE_S) is False:
                self.write(f"error: {self.message}")
                self.write(f"{self.what} did not stop within {GRACE_S:.0f}s of the interrupt; exiting")
                os._exit(Stalled.exit_code)
            return


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


