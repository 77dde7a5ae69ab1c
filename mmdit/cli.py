"""Command-line helpers every script shares: a user mistake is one line on stderr, never a traceback.

    parser = ArgumentParser(description=__doc__)   # a bad argument: one `error: ...` line, exit code 2
    check_writable(args.out, "--out")              # ConfigError unless the path can be written
    sys.exit(run_cli(main, argv, user_errors=(ConfigError, ...)))

`add_sampling_args` / `check_sampling_args`: the sampling flags of the sample and eval CLIs, and `multi_cpu()`: the `cpu=` a launched script gives accelerate (True under `accelerate launch --multi_gpu` on a
machine without accelerators).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

import torch

from mmdit.checks import MAX_STEPS, check_guidance, check_seed, check_steps
from mmdit.config import ConfigError
from mmdit.sampling import ALL_SAMPLERS, check_randomness, check_temperature
from mmdit.weights import try_write


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as a single `error: ...` line (exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see --help)\n")


def check_writable(path: str | Path, what: str, is_file: bool = False) -> None:
    """ConfigError unless `path`, a directory (or with `is_file` a file) to be written, maybe not there yet, can
    be: its nearest existing directory must take a new file. Tried for real: os.access says yes to root
    everywhere, /proc and read-only mounts included."""
    path = Path(path)
    if path.exists() and path.is_dir() == is_file:
        kind, accepted = ("a directory", "a file path") if is_file else ("a file", "a directory path")
        raise ConfigError(f"{what}={path} is {kind}; accepted: {accepted}")
    start = path.parent if is_file else path
    existing = next((p for p in (start, *start.parents) if p.exists()), Path("."))
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "not a directory")
        try_write(existing)
    except OSError as e:
        raise ConfigError(f"{what}={path} cannot be written: {existing} is not a writable directory "
                          f"({e.strerror or e}); accepted: a path in a writable directory") from None


def run_cli(main: Callable[[list[str] | None], object], argv: list[str] | None = None,
            user_errors: tuple[type[BaseException], ...] = (ConfigError,),
            failures: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command-line `main(argv)` and return its exit code: 0, 2 for one of `user_errors` (a mistake
    in the input, shown as one `error: ...` line) or a bad argument, 1 for one of `failures` (shown the same
    way), 130 for a Ctrl-C, or the code `main` exits with. Anything else is a bug and keeps its traceback."""
    try:
        main(argv)
        return 0
    except user_errors + failures as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2 if isinstance(e, user_errors) else 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # argparse's errors and --help, a clean stop on SIGTERM
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
        return e.code if isinstance(e.code, int) else int(e.code is not None)


def multi_cpu() -> bool:
    """True under `accelerate launch --multi_gpu` on a machine without accelerators: the processes must then be
    told `cpu=True` to form one data-parallel group over gloo, instead of running as independent copies."""
    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not has_accelerator


def add_sampling_args(parser: argparse.ArgumentParser, guidance_list: bool = False) -> None:
    """--steps, --guidance, --sampler, --seed, --temperature, --randomness, --negative-guidance: each defaults to the run's saved sampling options (mmdit/sampling.py).
    `guidance_list`: --guidance stays a string, one scale or a comma-separated list (the eval's sweep,
    mmdit/sweep.py parses it)."""
    parser.add_argument("--steps", type=int, help=f"sampler steps (1 to {MAX_STEPS}; default: the run's)")
    parser.add_argument("--guidance", type=str if guidance_list else float,
                        help="classifier-free guidance scale; 1 = none (default: the run's)"
                        + ("; a comma-separated list (e.g. 1,2,4,7) sweeps it" if guidance_list else ""))
    parser.add_argument("--sampler", choices=ALL_SAMPLERS,
                        help="flow: euler, heun; masked: maskgit (default: the run's)")
    parser.add_argument("--seed", type=int, help="image i's noise comes from (seed, i) (default: the run's)")
    parser.add_argument("--temperature", type=float, help="masked: softmax temperature of the drawn tokens "
                        "(default: the run's)")
    parser.add_argument("--randomness", type=float, help="masked: Gumbel noise on the confidences (default: the run's)")
    parser.add_argument("--negative-guidance", type=float, help="how far guidance steps away from the negative "
                        "prompt (default: the run's, 1; guidance - 1 = the negative in the empty prompt's place)")


def check_sampling_args(args: argparse.Namespace) -> None:
    """ValueError, naming the flag, for a sampling flag that is given and out of range."""
    for flag, value, check in (("--steps", args.steps, check_steps), ("--guidance", args.guidance, check_guidance),
                               ("--seed", args.seed, check_seed), ("--temperature", args.temperature,
                               check_temperature), ("--randomness", args.randomness, check_randomness),
                               ("--negative-guidance", args.negative_guidance, check_guidance)):
        if value is not None:
            check(flag, value)
