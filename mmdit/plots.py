"""Line plots for the figures people look at rather than read: the guidance sweep of eval/eval.py
(mmdit/sweep.py) and the DiT's loss by noise level (mmdit/loss_bins.py).

matplotlib is an optional dependency (`pip install mmdit[plots]`), imported only when a plot is drawn: without it
the PNG is skipped with a one-line warning, and the numbers it would show are still written as JSON. A training
run or an evaluation never fails for want of a figure.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("mmdit.plots")


@dataclass
class Panel:
    """One axes: a line per series over the shared x values (None: no point there, e.g. an empty bin)."""
    title: str
    xlabel: str
    ylabel: str
    x: list[float]
    series: dict[str, list[float | None]] = field(default_factory=dict)


def save_panels(panels: list[Panel], path: Path, title: str = "") -> Path | None:
    """The panels side by side in one PNG (Agg: no display needed) -> its path, or None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning(f"{path} not drawn: matplotlib is not installed (pip install 'mmdit[plots]'); "
                    "the numbers are in the JSON beside it")
        return None
    matplotlib.use("Agg")  # before pyplot is first imported: no window, works on a headless machine
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, ys in panel.series.items():
            points = [(x, y) for x, y in zip(panel.x, ys) if y is not None]
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)  # figures are kept by pyplot until closed: a long sweep or training would accumulate them
    return path
