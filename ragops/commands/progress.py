"""Progress displays: a rich bar on a terminal, plain periodic lines in logs.

Under ``ray job submit`` (or any redirect) stderr is a file: rich draws nothing there, and a
long ingest or training looks dead in ``ragops job logs``. :func:`progress_display` then
returns :class:`LineProgress`, which prints what the bar would show (done/total, the
command's fields, rate, elapsed, ETA) every ``runtime.progress_interval_s`` seconds and once
at the end. Both offer the part of rich's ``Progress`` API the commands use: ``with``,
``add_task`` and ``update``.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from types import SimpleNamespace, TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ragops.config import Settings


def _clock(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class LineProgress:
    """Prints ``name: done/total <fields> · elapsed · ETA`` every ``interval_s`` (and at the end).

    Args:
        name: The command (``ingest``, ``sft``), first on every line.
        template: The fields' text, in rich's column syntax (``{task.fields[chunks]} chunks``).
        interval_s: Seconds between lines.
        write: Where lines go (stderr).
    """

    def __init__(self, name: str, template: str, *, interval_s: float, write: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.template = template
        self.interval_s = interval_s
        self.write = write or _stderr
        self._fields: dict[str, Any] = {}
        self._completed: float = 0
        self._total: float | None = None
        self._started = time.monotonic()
        self._last_line = 0.0
        self._dirty = False

    def __enter__(self) -> "LineProgress":
        self._started = time.monotonic()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._dirty:
            self._emit(time.monotonic())

    def add_task(self, description: str, total: float | None = None, **fields: Any) -> int:
        """Start the (single) task; returns its id."""
        self._total = total
        self._fields.update(fields)
        return 0

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None, **fields: Any) -> None:
        """Record progress; print a line when ``interval_s`` passed since the last one."""
        if completed is not None:
            self._completed = completed
        if total is not None:
            self._total = total
        self._fields.update(fields)
        self._dirty = True
        now = time.monotonic()
        if now - self._last_line >= self.interval_s:
            self._emit(now)

    def line(self, now: float | None = None) -> str:
        """The progress line as it stands."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._started
        done = f"{self._completed:g}/{self._total:g}" if self._total else f"{self._completed:g}"
        try:
            text = self.template.format(task=SimpleNamespace(fields=self._fields))
        except (KeyError, ValueError, IndexError):  # a field not known yet
            text = ""
        parts = [f"{self.name}: {done} {text}".rstrip(), f"{_clock(elapsed)} elapsed"]
        if self._total and 0 < self._completed < self._total:
            parts.append(f"ETA {_clock(elapsed * (self._total - self._completed) / self._completed)}")
        return " · ".join(parts)

    def _emit(self, now: float) -> None:
        self.write(self.line(now))
        self._last_line = now
        self._dirty = False


def _stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def progress_display(settings: Settings, name: str, template: str, console: Console) -> Progress | LineProgress:
    """A bar on a terminal, lines otherwise (``runtime.progress`` forces either)."""
    mode = settings.runtime.progress
    if mode == "lines" or (mode == "auto" and not console.is_terminal):
        return LineProgress(name, template, interval_s=settings.runtime.progress_interval_s)
    return Progress(
        TextColumn(f"[bold]{name}[/]"), BarColumn(), MofNCompleteColumn(), TextColumn(template), TimeElapsedColumn(),
        console=console, transient=True,
    )  # fmt: skip
