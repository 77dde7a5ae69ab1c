"""How a run samples: one validated set of options, from the `sample:` config section to every place that samples.

    options = SampleOptions(steps=50, guidance=5.0)
    options = options.override(seed=3, guidance=None)   # None = keep: how a CLI flag that was not given reads

Training writes its grids with the run's `sample:` section and saves it in the export (pipeline.json); the
pipeline, `python -m mmdit.sample` and `eval/eval.py` start from those saved options and override what the
caller gives. An objective's own options (the masked-token sampler's temperature) are further fields here, so
they travel the same way.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mmdit.checks import check_guidance, check_seed, check_steps

SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class SampleOptions:
    steps: int = 25  # sampler steps
    guidance: float = 4.0  # classifier-free guidance scale; 1 = the conditional model alone
    sampler: str = "euler"  # flow: "euler" | "heun" (two model calls a step, second order)
    seed: int = 0  # image i's noise is seeded by (seed, i) alone (mmdit.pipeline.noise_seed)
    snap_to_codes: bool = True  # flow: snap sampled latents to the nearest VQ code before decoding

    def __post_init__(self):  # names as in the config file; the CLIs and the pipeline check their own names first
        check_steps("sample.steps", self.steps)
        check_guidance("sample.guidance", self.guidance)
        check_seed("sample.seed", self.seed)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sample.sampler={self.sampler!r}; accepted: {', '.join(SAMPLERS)}")
        if not isinstance(self.snap_to_codes, bool):
            raise ValueError(f"sample.snap_to_codes={self.snap_to_codes!r}; accepted: true or false")

    def override(self, **changes) -> "SampleOptions":
        """A copy with the `changes` that are not None (a flag not given, an argument left at None)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})
