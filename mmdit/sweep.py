"""A guidance sweep of eval/eval.py: `--guidance 1,2,4,7` evaluates the run once per guidance scale (the same
captions, the same noise: only the scale differs) and sets the headline numbers side by side.

    OUT/guidance-<g>/   each scale's own evaluation: report.json, report.md, samples.png ... as a single --guidance
    OUT/report.json     {"protocol", "sweep": {"<g>": that scale's metric sections}, "headline": {"<g>": {...}}}
    OUT/report.md       a table: a row per scale, a column per headline number
    OUT/guidance.png    the headline numbers against the scale (mmdit/plots.py; skipped without matplotlib)

Headline numbers, of the metrics asked: composition all-four accuracy (seen / held-out combinations), the CLIP
score as a share of the real images' (or the raw score without a ceiling), FID, GenEval overall (seen / held out).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mmdit.checks import check_guidance
from mmdit.plots import Panel, save_panels

ACCEPTED = "a finite number >= 0 (1 = no guidance), or a comma-separated list of them to sweep, e.g. 1,2,4,7"
PERCENT = {"composition all-four", "CLIP score / ceiling", "GenEval overall"}  # fractions, shown as %
GROUPS = (("seen", "seen"), ("held_out", "held out"))


def parse_guidance(text: str | None) -> tuple[float | None, list[float] | None]:
    """--guidance as given -> (one scale, None) or (None, the scales of a sweep); (None, None) when not given."""
    if text is None:
        return None, None
    if "," not in text and _number(text) is not None:  # one number: refused as mmdit-sample's --guidance refuses it
        return check_guidance("--guidance", _number(text)), None
    values = []
    for item in text.split(","):
        try:
            values.append(check_guidance("--guidance", float(item)))
        except ValueError:
            problem = "an empty item" if not item.strip() else f"{item.strip()!r} is not a number or out of range"
            raise ValueError(f"--guidance={text!r}: {problem}; accepted: {ACCEPTED}") from None
    if len(set(values)) < len(values):
        raise ValueError(f"--guidance={text!r}: a scale is repeated; accepted: {ACCEPTED}")
    return (values[0], None) if len(values) == 1 else (None, values)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def key(guidance: float) -> str:
    return f"{guidance:g}"


def headline(report: dict) -> dict[str, dict[str, float]]:
    """An evaluation's headline numbers: {family (a plot panel): {series (a line): value}}."""
    out = {}
    comp = report.get("composition", {})
    if "all_captions" in comp:
        groups = {label: comp[name]["all"] for name, label in GROUPS if name in comp}
        out["composition all-four"] = groups or {"all captions": comp["all_captions"]["all"]}
    if "clip" in report:
        row = report["clip"]["all_captions"]
        if "ratio_to_ceiling" in row:
            out["CLIP score / ceiling"] = {"all captions": row["ratio_to_ceiling"]}
        else:  # --prompts: no real image, no ceiling
            out["CLIP score"] = {"all captions": row["samples"]["clip_score"]}
    if "fid" in report:
        out["FID"] = {"samples vs reference": report["fid"]["samples_vs_reference"]}
    if "geneval" in report:
        out["GenEval overall"] = {label: report["geneval"][name]["overall"] for name, label in GROUPS
                                  if name in report["geneval"]}
    return out


def run(scales: list[float], evaluate_at: Callable[[float, Path], dict | None], out: Path) -> dict | None:
    """`evaluate_at(scale, directory)` for each scale (on every process: sampling is sharded; it returns the report
    on the main process only), then the sweep's report, table and plot -> the sweep's report (main process)."""
    reports = {key(g): evaluate_at(g, out / f"guidance-{key(g)}") for g in scales}
    if any(r is None for r in reports.values()):
        return None
    first = next(iter(reports.values()))["protocol"]
    protocol = {**{k: v for k, v in first.items() if k != "guidance"}, "guidance": scales,
                "sampling_seconds": round(sum(r["protocol"]["sampling_seconds"] for r in reports.values()), 1),
                "per_scale": "each scale's full report: guidance-<scale>/report.json"}
    report = {"protocol": protocol, "sweep": {g: {k: v for k, v in r.items() if k != "protocol"}
                                               for g, r in reports.items()},
              "headline": {g: headline(r) for g, r in reports.items()}}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot(report, out / "guidance.png")
    print(markdown(report))
    return report


def columns(report: dict) -> list[tuple[str, str]]:
    """(family, series) of every headline number, in the order first seen."""
    return list(dict.fromkeys((f, s) for h in report["headline"].values() for f, series in h.items() for s in series))


def markdown(report: dict) -> str:
    p, cols = report["protocol"], columns(report)
    fmt = lambda f, v: "-" if v is None else f"{100 * v:.1f}%" if f in PERCENT else f"{v:.3f}"  # noqa: E731
    lines = [f"# mmdit guidance sweep: {p['model']}", "",
             (f"{p['num_samples']} samples, {p['caption_set']['source']}, {p['steps']} {p['sampler']} steps, seed "
              f"{p['seed']}, guidance {', '.join(map(key, p['guidance']))}: the same captions and noise at every "
              f"scale. Each scale's full report: guidance-<scale>/report.md."), "",
             "| guidance | " + " | ".join(f if sum(c[0] == f for c in cols) == 1 else f"{f}: {s}" for f, s in cols)
             + " |",
             "|---" * (len(cols) + 1) + "|"]
    for g, h in report["headline"].items():
        lines.append(f"| {g} | " + " | ".join(fmt(f, h.get(f, {}).get(s)) for f, s in cols) + " |")
    return "\n".join(lines + ["", "![headline numbers against guidance](guidance.png)", ""])


def plot(report: dict, path: Path) -> Path | None:
    """A panel per headline family, a line per series, against the guidance scale."""
    scales, cols = report["protocol"]["guidance"], columns(report)
    panels = []
    for family in dict.fromkeys(f for f, _ in cols):
        series = {s: [report["headline"][key(g)].get(family, {}).get(s) for g in scales] for f, s in cols
                  if f == family}
        panels.append(Panel(family, "guidance scale", family, scales, series))
    if not panels:  # only metrics without a headline number (recon, edit): nothing to draw
        return None
    return save_panels(panels, path, title=f"guidance sweep: {report['protocol']['model']}")
