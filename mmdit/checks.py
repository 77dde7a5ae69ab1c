"""Checks of user-given values, shared by the configs, the pipeline and the command lines, so that a value is
refused with the same one-line `ValueError` everywhere: `<name>=<value>; accepted: <what is>`.

Kept free of mmdit imports: every config dataclass (dit, vqvae, config) can use it without an import cycle.
"""
from __future__ import annotations

import math
import numbers
from typing import Callable

# Sampler steps: rectified flow needs tens; a typo such as 25000 would only sample for hours.
MAX_STEPS = 1000


def check_int(name: str, value, low: int = 1, high: int | None = None, accepted: str | None = None) -> int:
    """`value` as an int, if it is one (not a bool, a float or a str) in [low, high]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not (ok and value >= low and (high is None or value <= high)):
        accepted = accepted or (f"an integer >= {low}" if high is None else f"an integer from {low} to {high}")
        raise ValueError(f"{name}={value!r}; accepted: {accepted}")
    return int(value)


def check_number(name: str, value, accepted: str, ok: Callable[[float], bool] = lambda v: True) -> float:
    """`value` as a float, if it is a finite real number (NaN and inf pass every comparison test) and ok(value)."""
    real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if not (real and math.isfinite(value) and ok(value)):
        raise ValueError(f"{name}={value!r}; accepted: {accepted}")
    return float(value)


def check_seed(name: str, value, bits: int = 64) -> int:
    """A seed: 64 bits is torch.Generator's range (sampling noise), 32 bits numpy's (training, via set_seed)."""
    return check_int(name, value, 0, 2 ** bits - 1, f"an integer from 0 to 2**{bits} - 1")


def check_steps(name: str, value) -> int:
    return check_int(name, value, 1, MAX_STEPS)


def check_guidance(name: str, value) -> float:
    return check_number(name, value, "a finite number >= 0 (1 = no guidance)", lambda v: v >= 0)


def check_text(name: str, value: str, accepted: str) -> str:
    """A non-empty string: an empty path is the current directory, an empty name matches nothing."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name}={value!r}: empty; accepted: {accepted}")
    return value
