"""Drawing a ``--stats-json`` file: pause, dirty pages, wire bytes and ack time over time.

matplotlib is an optional extra (``pip install 'remus[plot]'``, or Debian's
``python3-matplotlib``): it is imported only when a plot is drawn, and its
absence is a ``PlotUnavailable`` that says how to install it.  The output
format follows the file name (``.png`` or ``.svg``).  Nothing here reads files
other than through ``remus.statsfile``'s records, and nothing here prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

from remus.errors import RemusError
from remus.statsfile import Checkpoint, runs_of

__all__ = ["PlotUnavailable", "FORMATS", "plot"]

#: File name endings a plot can be written as.
FORMATS = (".png", ".svg")


class PlotUnavailable(RemusError):
    """matplotlib is not installed, or the file name's format is not one it draws here."""


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: never a display
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable(
            "plotting needs matplotlib: pip install 'remus[plot]' (or apt-get install python3-matplotlib)"
        ) from None
    return plt


def plot(checkpoints: Sequence[Checkpoint], out: str, title: str = "") -> None:
    """Write four panels over time (seconds since each run's first checkpoint) to ``out``.

    Raises:
        PlotUnavailable: matplotlib is missing or ``out`` is not .png/.svg.
        OSError: ``out`` cannot be written.
    """
    suffix = Path(out).suffix.lower()
    if suffix not in FORMATS:
        raise PlotUnavailable(f"cannot plot to {out}: the file name must end in .png or .svg")
    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, sharex=True, figsize=(9, 9))
    panels: tuple[tuple[str, Callable[[Checkpoint], float]], ...] = (
        ("pause (ms)", lambda c: c.pause_ms),
        ("dirty pages", lambda c: c.dirty_pages),
        ("wire bytes", lambda c: c.wire_bytes),
        ("ack (ms)", lambda c: c.ack_ms),
    )
    for number, run in enumerate(runs_of(checkpoints), start=1):
        times = _times(run)
        for ax, (_label, value) in zip(axes, panels):
            ax.plot(times, [value(c) for c in run], linewidth=0.8, label=f"run {number}")
    for ax, (label, _value) in zip(axes, panels):
        ax.set_ylabel(label)
        ax.grid(True, linewidth=0.3)
    axes[-1].set_xlabel("seconds since the first checkpoint")
    if title:
        axes[0].set_title(title)
    fig.tight_layout()
    try:
        fig.savefig(out, format=suffix[1:])
    finally:
        plt.close(fig)


def _times(run: Sequence[Checkpoint]) -> list[float]:
    """Seconds since the run's first checkpoint: wall clock if recorded, else summed periods."""
    if run[0].suspended_unix:
        return [c.suspended_unix - run[0].suspended_unix for c in run]
    times, t = [], 0.0
    for c in run:
        t += (c.period_ms or 0.0) / 1000.0
        times.append(t)
    return times
