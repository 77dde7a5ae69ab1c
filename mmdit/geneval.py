"""`eval/eval.py --metrics geneval`: GenEval's six tasks (Ghosh et al. 2023) on a scenes run, read by the exact
scenes judge (mmdit/data/scenes.py).

The prompt set is drawn from the scenes generator with a fixed seed (PROMPT_SEED), so every run and every
sampling seed is scored on the same prompts, and a smaller N takes a prefix of a larger one's:
- seen: N - N/2 prompts (all N when the run holds nothing out), the six tasks in turn, none showing a held-out
  combination;
- held out: N/2 prompts, the dataset's held-out phrases in turn (a binding from any task that can show it, a
  count from counting, a relation from position, either way round).
Each prompt comes with the real scene drawn from its spec: the judge's verdict on those is the ceiling.

Scores follow GenEval's summary: per task the share of images whose spec holds (``scenes.score``), overall the
mean of the task accuracies. Held out: per phrase, and overall the mean of the phrases' accuracies (each held-out
combination weighs the same, whatever the tasks that show it).

    ps = prompt_set(n, resolution, holdout)      # rows (caption, task, spec, holdout phrase) + real images
    images = <sample ps.captions>                # mmdit.evaluate.sample
    report = score(ps, images)
    save_grids(ps, images, out_dir)              # geneval-<task>.png, geneval-held-out.png
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mmdit.data import DataConfig
from mmdit.data import scenes
from mmdit.grid import save_grid
from mmdit.pixels import from_pil, to_float, to_pil

PROMPT_SEED = 2023
GRID_ROWS = 8  # examples per grid
PROTOCOL = {
    "prompts": f"drawn by mmdit.data.scenes with seed {PROMPT_SEED}: seen prompts the six tasks in turn, held-out "
               "prompts the held-out phrases in turn; N/2 held out when the dataset holds some out",
    "score": "GenEval's rules on the objects the scenes judge finds (mmdit.data.scenes.score)",
    "overall": "seen: the mean of the six task accuracies (GenEval's summary); held out: the mean over phrases",
    "ceiling": "the same rules on the real scene drawn from each prompt's spec",
}


def dataset_holdout(data: DataConfig) -> list[str]:
    """The phrases the dataset on disk was generated with (its scenes.json), which the config may not repeat."""
    info = Path(data.path) / "scenes.json"
    if not info.is_file():
        raise FileNotFoundError(f"--metrics geneval: {info} is missing; accepted: a scenes run whose dataset is "
                                "still at its data.path")
    return json.loads(info.read_text())["holdout"]


@dataclass
class PromptSet:
    rows: list[dict]  # caption, task, spec, objects, holdout: the held-out phrase the prompt shows, or ""
    real: torch.Tensor  # uint8 (N, 3, R, R): the scene drawn from each spec

    @property
    def captions(self) -> list[str]:
        return [r["caption"] for r in self.rows]


def _tasks_showing(kind: str) -> list[str]:
    return {"count": ["counting"], "relation": ["position"]}.get(kind, scenes.TASKS)


def prompt_set(n: int, size: int, holdout: list[str]) -> PromptSet:
    parsed = [scenes.parse_holdout(h) for h in holdout]
    n_held = n // 2 if holdout else 0
    seen_rng, held_rng = np.random.default_rng([PROMPT_SEED, 0]), np.random.default_rng([PROMPT_SEED, 1])
    rows = [dict(scenes.draw_row(seen_rng, scenes.TASKS[i % len(scenes.TASKS)], size,
                                 lambda spec, objects: not scenes.matches_holdout(spec, objects, parsed)), holdout="")
            for i in range(n - n_held)]
    for i in range(n_held):
        phrase, combo = holdout[i % len(holdout)], parsed[i % len(holdout)]
        tasks = _tasks_showing(combo["kind"])
        task = tasks[(i // len(holdout)) % len(tasks)]
        rows.append(dict(scenes.draw_row(held_rng, task, size,
                                         lambda spec, objects: scenes.matches_holdout(spec, objects, [combo])),
                         holdout=phrase))
    real = torch.stack([from_pil(r.pop("image")) for r in rows])
    return PromptSet(rows, real)


def _accuracies(verdicts: list[bool], keys: list[str]) -> dict[str, dict]:
    """Per key: n and the share of True verdicts."""
    out = {}
    for key in dict.fromkeys(keys):
        hits = [v for v, k in zip(verdicts, keys) if k == key]
        out[key] = {"n": len(hits), "accuracy": sum(hits) / len(hits)}
    return out


def _section(verdicts: list[bool], ceiling: list[bool], rows: list[dict], by: str) -> dict:
    """Accuracies of `rows` grouped by `by` ("task" or "holdout"), the real images' beside, and their mean."""
    keys = [r[by] for r in rows]
    groups, real = _accuracies(verdicts, keys), _accuracies(ceiling, keys)
    for key, row in groups.items():
        row["ceiling"] = real[key]["accuracy"]
    mean = lambda field: float(np.mean([g[field] for g in groups.values()]))  # noqa: E731
    return {"overall": mean("accuracy"), "ceiling_overall": mean("ceiling"), "n": len(rows), by: groups}


def score(ps: PromptSet, images: torch.Tensor) -> dict:
    """uint8 (N, 3, R, R) samples of `ps.captions` -> the report's geneval section."""
    def verdicts(batch: torch.Tensor) -> list[bool]:
        return [scenes.score(r["spec"], scenes.judge_scene(a)) for r, a in
                zip(ps.rows, batch.permute(0, 2, 3, 1).numpy(), strict=True)]

    found, ceiling = verdicts(images), verdicts(ps.real)
    report = {"protocol": PROTOCOL}
    for name, flag in (("seen", False), ("held_out", True)):
        keep = [i for i, r in enumerate(ps.rows) if bool(r["holdout"]) == flag]
        if keep:
            pick = lambda values: [values[i] for i in keep]  # noqa: E731
            report[name] = _section(pick(found), pick(ceiling), pick(ps.rows), "holdout" if flag else "task")
            if flag:  # which tasks the held-out prompts came from, for reading a phrase's number
                report[name]["task"] = _section(pick(found), pick(ceiling), pick(ps.rows), "task")["task"]
    return report


def save_grids(ps: PromptSet, images: torch.Tensor, out: Path) -> list[Path]:
    """A grid per task of seen prompts and one of held-out prompts: each row the sample, then the real scene."""
    named = {task: [i for i, r in enumerate(ps.rows) if r["task"] == task and not r["holdout"]] for task in scenes.TASKS}
    named["held-out"] = [i for i, r in enumerate(ps.rows) if r["holdout"]]
    paths = []
    for name, keep in named.items():
        if keep:
            shown = keep[:GRID_ROWS]
            grid = [list(pair) for pair in zip(to_pil(to_float(images[shown])), to_pil(to_float(ps.real[shown])))]
            paths.append(save_grid(grid, out / f"geneval-{name}.png", scale=2,
                                   labels=[ps.rows[i]["caption"] for i in shown]))
    return paths


def markdown(section: dict) -> list[str]:
    lines = ["## GenEval tasks (scenes judge)", "",
             "Accuracy: the share of images whose prompt's spec holds; overall: the mean over tasks (seen) or "
             "held-out phrases. Ceiling: the real scenes of the same prompts.", ""]
    for name, by in (("seen", "task"), ("held_out", "holdout")):
        if name not in section:
            continue
        s = section[name]
        lines += [f"**{name.replace('_', ' ')}: {100 * s['overall']:.1f}%** overall (ceiling "
                  f"{100 * s['ceiling_overall']:.1f}%), {s['n']} prompts", "",
                  f"| {by} | n | accuracy | ceiling |", "|---|---|---|---|"]
        lines += [f"| {key} | {g['n']} | {100 * g['accuracy']:.1f}% | {100 * g['ceiling']:.1f}% |"
                  for key, g in s[by].items()]
        lines.append("")
    grids = [t for t in scenes.TASKS if t in section.get("seen", {}).get("task", {})]
    grids += ["held-out"] if "held_out" in section else []
    lines += [f"![{g}](geneval-{g}.png)" for g in grids] + [""]
    return lines
