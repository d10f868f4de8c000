"""Progress without a terminal: plain periodic lines with counts, elapsed time and ETA."""

from __future__ import annotations

import io

from rich.console import Console

from ragops.commands.progress import LineProgress, progress_display
from ragops.config import load_settings

TEMPLATE = "files · {task.fields[chunks]} chunks · {task.fields[rate]:.0f} points/s"


def test_lines_carry_counts_rate_elapsed_and_eta() -> None:
    lines: list[str] = []
    with LineProgress("ingest", TEMPLATE, interval_s=3600, write=lines.append) as p:
        task = p.add_task("ingest", total=None, chunks=0, rate=0.0)
        p.update(task, completed=1, total=4, chunks=10, rate=12.4)  # the first update prints at once
        p.update(task, completed=2, total=4, chunks=20, rate=13.0)  # within the interval: quiet
        p.update(task, completed=4, total=4, chunks=40, rate=14.0)
    assert len(lines) == 2  # the first line, then the final state when the work ends
    assert lines[0].startswith("ingest: 1/4 files · 10 chunks · 12 points/s · 0:00:00 elapsed · ETA ")
    assert lines[1].startswith("ingest: 4/4 files · 40 chunks · 14 points/s · ") and "ETA" not in lines[1]


def test_a_template_field_not_known_yet_does_not_break_the_line() -> None:
    p = LineProgress("sft", "steps · loss {task.fields[loss]}", interval_s=1, write=lambda _: None)
    p.add_task("sft")
    assert p.line().startswith("sft: 0 ·")


def test_the_display_follows_the_terminal_unless_forced() -> None:
    piped = Console(file=io.StringIO(), force_terminal=False)
    tty = Console(file=io.StringIO(), force_terminal=True)
    auto = load_settings([], [], environ={})
    assert isinstance(progress_display(auto, "ingest", TEMPLATE, piped), LineProgress)
    assert not isinstance(progress_display(auto, "ingest", TEMPLATE, tty), LineProgress)
    lines = load_settings([], ["runtime.progress=lines"], environ={})
    assert isinstance(progress_display(lines, "ingest", TEMPLATE, tty), LineProgress)
