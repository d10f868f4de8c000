"""Curves of training runs' per-step metrics as one PNG (``ragops runs compare --plot``).

People read a curve faster than a column of numbers: one panel per metric, one line per
run, steps on the x axis. matplotlib with the Agg backend (no display needed, so it works
on a headless node and in a job).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ragops.errors import InputError


def plot_curves(curves: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], out: Path, *, title: str = "") -> Path:
    """Write ``{metric: {run: [(step, value)]}}`` as a PNG grid to ``out``; returns ``out``.

    Raises:
        InputError: no metric has any point (nothing to draw: the message lists the metrics).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    drawn = {m: runs for m, runs in curves.items() if any(runs.values())}
    if not drawn:
        raise InputError(f"none of the runs has per-step values for {', '.join(curves) or 'the chosen metrics'}")
    cols = min(2, len(drawn))
    rows = (len(drawn) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.6 * rows), squeeze=False)
    try:
        for ax, (metric, runs) in zip(axes.flat, drawn.items(), strict=False):
            for run_id, points in runs.items():
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, marker="." if len(points) < 30 else None, label=run_id)
            ax.set_title(metric)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        for ax in list(axes.flat)[len(drawn):]:
            ax.set_visible(False)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    finally:
        plt.close(fig)
    return out
