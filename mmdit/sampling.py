"""How a run samples: one validated set of options, from the `sample:` config section to every place that samples.

    options = SampleOptions(steps=50, guidance=5.0)   # None (the default) = the objective's
    options = options.override(seed=3, guidance=None)   # None = keep: how a CLI flag that was not given reads

Training writes its grids with the run's `sample:` section and saves it in the export (pipeline.json); the
pipeline, `python -m mmdit.sample` and `eval/eval.py` start from those saved options and override what the
caller gives. An objective's own options (flow's snap_to_codes, the masked sampler's temperature and randomness) are
further fields here, so they travel the same way; steps, guidance and sampler left at None take the objective's
defaults (`for_objective`: 25 Euler steps at guidance 4 for flow, 12 MaskGIT steps at guidance 2 for masked).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mmdit.checks import check_guidance, check_number, check_seed, check_steps

SAMPLERS = {"flow": ("euler", "heun"), "masked": ("maskgit",)}  # each objective's; the first is its default
ALL_SAMPLERS = tuple(s for samplers in SAMPLERS.values() for s in samplers)
DEFAULT_STEPS = {"flow": 25, "masked": 12}
# Masked: guidance sharpens logits, and past ~2 it collapses samples (docs/models.md has the sweep).
DEFAULT_GUIDANCE = {"flow": 4.0, "masked": 2.0}


def edit_steps(steps: int, strength: float) -> int:
    """The steps an edit of `strength` takes of a `steps`-step schedule: the share strength of them, at least 1."""
    return max(1, math.ceil(steps * strength - 1e-9))  # the epsilon: 0.6 * 25 is 15.000000000000002


def check_temperature(name: str, value) -> float:
    return check_number(name, value, "a finite number > 0 (1 = the model's distribution)", lambda v: v > 0)


def check_randomness(name: str, value) -> float:
    return check_number(name, value, "a finite number >= 0 (0 = pick the most confident)", lambda v: v >= 0)


@dataclass(frozen=True)
class SampleOptions:
    steps: int | None = None  # sampler steps; None = the objective's default (DEFAULT_STEPS)
    guidance: float | None = None  # classifier-free guidance scale; 1 = the conditional model alone; None =
    # the objective's default (DEFAULT_GUIDANCE)
    sampler: str | None = None  # flow: "euler" (default) | "heun" (two model calls a step); masked: "maskgit"
    seed: int = 0  # image i's noise is seeded by (seed, i) alone (mmdit.pipeline.noise_seed)
    snap_to_codes: bool = True  # flow: snap sampled latents to the nearest VQ code before decoding
    temperature: float = 0.7  # masked: tokens are drawn from softmax(logits / temperature); below 1 trades
    # variety for cleaner shapes and fewer stray codes (docs/models.md has the sweep)
    randomness: float = 4.5  # masked: Gumbel noise on the confidences (MaskGIT's 4.5), annealed to 0
    # How far guidance steps away from a negative prompt, beside the empty prompt: guided = u + guidance (c - u)
    # - negative_guidance (n - u). guidance - 1 puts the negative in the empty prompt's place (diffusers' form);
    # at flow's guidance 4 that pushes 3x away and breaks the layout (docs/editing.md has the measurement).
    negative_guidance: float = 1.0

    def __post_init__(self):  # names as in the config file; the CLIs and the pipeline check their own names first
        if self.steps is not None:
            check_steps("sample.steps", self.steps)
        if self.guidance is not None:
            check_guidance("sample.guidance", self.guidance)
        check_seed("sample.seed", self.seed)
        if self.sampler is not None and self.sampler not in ALL_SAMPLERS:
            raise ValueError(f"sample.sampler={self.sampler!r}; accepted: {', '.join(ALL_SAMPLERS)}")
        if not isinstance(self.snap_to_codes, bool):
            raise ValueError(f"sample.snap_to_codes={self.snap_to_codes!r}; accepted: true or false")
        check_temperature("sample.temperature", self.temperature)
        check_randomness("sample.randomness", self.randomness)
        check_guidance("sample.negative_guidance", self.negative_guidance)

    def override(self, **changes) -> "SampleOptions":
        """A copy with the `changes` that are not None (a flag not given, an argument left at None)."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def for_objective(self, objective: str) -> "SampleOptions":
        """The options a run of `objective` samples with: steps, guidance and sampler filled in where None; a
        sampler of the other objective is refused."""
        if self.sampler is not None and self.sampler not in SAMPLERS[objective]:
            raise ValueError(f"sampler={self.sampler!r} does not sample a {objective} run; accepted: "
                             f"{', '.join(SAMPLERS[objective])}")
        return dataclasses.replace(self, steps=self.steps or DEFAULT_STEPS[objective],
                                   sampler=self.sampler or SAMPLERS[objective][0],
                                   guidance=DEFAULT_GUIDANCE[objective] if self.guidance is None else self.guidance)
