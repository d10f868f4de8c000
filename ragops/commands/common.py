"""Options, error handling and output helpers shared by every CLI command."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Optional, TypeVar

import typer
from rich.console import Console

from ragops.config import Settings, load_settings
from ragops.errors import RagopsError

out = Console(soft_wrap=True)
err = Console(stderr=True)

ConfigOpt = Annotated[
    Optional[list[str]],
    typer.Option("--config", "-c", help="YAML config file or shipped preset name (e.g. bge); repeatable, later wins."),
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override one setting: dotted.key=value (repeatable; wins over files and env)."),
]
DataDirOpt = Annotated[
    Optional[Path], typer.Option("--data-dir", help="Data directory (default: $RAGOPS_HOME or ./.ragops).")
]
CollectionOpt = Annotated[Optional[str], typer.Option("--collection", help="Collection name (default from config).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ScheduleTimeoutOpt = Annotated[
    Optional[float],
    typer.Option(
        "--schedule-timeout", min=1,
        help="With an autoscaling cluster: seconds to wait for the nodes this command needs (runtime.schedule_timeout_s).",
    ),
]  # fmt: skip

F = TypeVar("F", bound=Callable[..., Any])


def handle_errors(fn: F) -> F:
    """Turn user-facing errors into one stderr line and the error's exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RagopsError as exc:
            err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def settings_from(config: list[str] | None, overrides: list[str] | None, data_dir: Path | None) -> Settings:
    """Load settings with the CLI's precedence (defaults < files < env < --set < --data-dir).

    Traces of the command's phases are exported from here on when ``telemetry`` is set.
    """
    settings = load_settings(config or [], overrides or [], data_dir=data_dir)
    from ragops.tracking import telemetry

    telemetry.configure(settings.telemetry, "cli")
    return settings


def with_schedule_timeout(overrides: list[str] | None, schedule_timeout: float | None) -> list[str]:
    """``--set`` items plus ``--schedule-timeout`` as ``runtime.schedule_timeout_s``."""
    extra = [f"runtime.schedule_timeout_s={schedule_timeout}"] if schedule_timeout is not None else []
    return [*(overrides or []), *extra]


def emit_json(data: Any) -> None:
    """Write JSON to stdout (no rich markup)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


def parse_tags(items: list[str] | None) -> dict[str, str]:
    """``--tag k=v`` options into a dict, with a clear error for a malformed one."""
    from ragops.errors import InputError

    tags: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise InputError(f"--tag '{item}': expected key=value")
        k, v = item.split("=", 1)
        tags[k.strip()] = v.strip()
    return tags
