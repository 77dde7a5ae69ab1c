"""The DiT's training loss by noise level: which noise levels the model has learned, and which it has not.

Every training sample's loss is added to one of N equal bins of its noise level (flow: t in [0, 1], 0 = the
data; masked: the share of codes masked). The sums stay on the device (no host sync per step); at each log step
they are summed over the processes, turned into per-bin means of the steps since the previous log step, logged to
tensorboard (`dit/loss_by_t/bin_00` ...) and kept; at the end of the stage the kept means are written as
`RUN/dit/loss_by_t.json` and drawn as `RUN/dit/loss_by_t.png`.

The bins only read the detached loss: they draw no random number and touch no weight, so the trained weights are
the same with or without them. They are not checkpointed: a resumed run starts them afresh (its first window
holds the steps since the resume, and the JSON the log steps since then).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from mmdit.plots import Panel, save_panels

N_BINS = 10
CURVES = 5  # log steps drawn in the PNG: evenly spread over the run, the last one included


def bin_sums(per_sample: torch.Tensor, t: torch.Tensor, bins: int = N_BINS) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed loss, the number of samples) in each of `bins` equal ranges of t in [0, 1] -> (bins,) each;
    t = 1 falls in the last bin."""
    index = (t.detach() * bins).long().clamp(0, bins - 1)
    sums = torch.zeros(bins, device=index.device).index_add_(0, index, per_sample.detach().float())
    return sums, torch.bincount(index, minlength=bins).float()


class LossByT:
    """Per-bin sums since the last `read`, and the per-bin means of every read (`history`)."""

    def __init__(self, device: torch.device, bins: int = N_BINS, axis: str = "t"):
        self.bins, self.axis, self.device, self.history = bins, axis, device, []
        self._reset()

    def _reset(self) -> None:
        self.sums = torch.zeros(self.bins, device=self.device)
        self.counts = torch.zeros(self.bins, device=self.device)

    def add(self, per_sample: torch.Tensor, t: torch.Tensor) -> None:
        """A micro-batch's per-sample loss (B,) at noise levels t (B,). Under train.mixed_precision=measure the
        precision probe's passes over the first batch land here too: only the first window sees them."""
        sums, counts = bin_sums(per_sample, t, self.bins)
        self.sums += sums
        self.counts += counts

    def read(self, step: int, reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> dict[str, float]:
        """The per-bin means since the last read, as tensorboard scalars `loss_by_t/bin_XX` (empty bins left out),
        then start a new window. `reduce`: the sum over the processes (accelerator.reduce(x, "sum")), a
        collective: every process reads at the same step."""
        sums, counts = (self.sums, self.counts) if reduce is None else (reduce(self.sums), reduce(self.counts))
        means = [s / c if c else None for s, c in zip(sums.tolist(), counts.tolist())]
        self.history.append({"step": step, "mean": means, "count": [int(c) for c in counts.tolist()]})
        self._reset()
        return {f"loss_by_t/bin_{i:02d}": m for i, m in enumerate(means) if m is not None}

    def edges(self) -> list[float]:
        return [i / self.bins for i in range(self.bins + 1)]

    def save(self, directory: Path, objective: str) -> tuple[Path, Path | None]:
        """`directory`/loss_by_t.json (every read) and loss_by_t.png (a few of them) -> their paths (the PNG's None
        without matplotlib)."""
        directory.mkdir(parents=True, exist_ok=True)
        record = {"objective": objective, "axis": self.axis, "bins": self.bins, "edges": self.edges(),
                  "window": "the training steps since the previous log step, summed over all processes",
                  "history": self.history}
        path = directory / "loss_by_t.json"
        path.write_text(json.dumps(record, indent=2))
        if not self.history:  # a resumed run with nothing left to train: no curve to draw
            return path, None
        shown = sorted({round(i * (len(self.history) - 1) / max(1, CURVES - 1)) for i in range(CURVES)})
        centres = [(a + b) / 2 for a, b in zip(self.edges()[:-1], self.edges()[1:])]
        panel = Panel(f"DiT training loss by {self.axis} ({objective})", self.axis, "mean loss", centres,
                      {f"step {self.history[i]['step']}": self.history[i]["mean"] for i in shown})
        return path, save_panels([panel], directory / "loss_by_t.png")
