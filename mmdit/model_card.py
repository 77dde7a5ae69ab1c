"""RUN/README.md: an exported run's model card, in the Hugging Face Hub's form (YAML front matter, then Markdown).

    write_model_card("runs/shapes", accelerator)  # at export (mmdit/stages/dit.py): also records the training
    write_model_card("runs/shapes")               # later (eval/eval.py after a report): the card refreshed

What it says, all read from the run directory: the model (objective, DiT mode and sizes, VQ-VAE, text encoder),
the data and its licence, the training time and hardware (RUN/training.json, written at export), the headline
numbers of every eval report found in RUN/*/report.json (and of `extra_reports`), the samples grid and how to
load it. The card is regenerated whole each time, so it never keeps numbers of a report that is gone.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import yaml

from mmdit.weights import atomic_write

TRAINING_FILE = "training.json"
CODE_LICENSE = "apache-2.0"  # pyproject.toml's: the licence of weights trained on data that declares none
OBJECTIVES = {"flow": "rectified flow on the VQ-VAE's code vectors", "masked": "masked-token generation "
              "(MaskGIT) of the VQ-VAE's code indices"}


def read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):  # missing or damaged: the card says "not recorded" rather than failing an export
        return {}
    return value if isinstance(value, dict) else {}


def read_config(run_dir: Path) -> dict:
    try:
        value = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return value if isinstance(value, dict) else {}


def hardware(accelerator) -> str:
    """What trained it, in words: the accelerator's name, or the CPU's model and cores, times the processes."""
    import torch

    n = accelerator.num_processes
    if accelerator.device.type == "cuda":
        return f"{n} x {torch.cuda.get_device_name(accelerator.device)}"
    cpu = platform.processor() or platform.machine()
    try:
        names = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU: {cpu}, {cores} cores, {n} process(es)"


def training_seconds(run_dir: Path, now: float | None = None) -> float | None:
    """Wall-clock of the run's training sessions, summed: each tensorboard event file (one per session, its
    creation time in its name) from its start to its last write. `now`: the session still running, whose
    events may not be flushed yet, ends now."""
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    total = 0.0
    for i, path in enumerate(files):
        try:
            start = float(path.name.split(".")[3])
        except (IndexError, ValueError):
            continue
        end = now if now is not None and i == len(files) - 1 else path.stat().st_mtime
        total += max(0.0, end - start)
    return total if files else None


def record_training(run_dir: Path, accelerator) -> dict:
    """RUN/training.json: the training time and hardware, measured at export, where they are still known."""
    info = {"seconds": training_seconds(run_dir, now=time.time()), "hardware": hardware(accelerator),
            "mixed_precision": read_json(run_dir / "dit" / "precision.json").get("mixed_precision"),
            "exported": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    atomic_write(run_dir / TRAINING_FILE, json.dumps(info, indent=2).encode())
    return info


def duration(seconds) -> str:
    if not isinstance(seconds, (int, float)):
        return "not recorded"
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60} h {minutes % 60} min" if minutes >= 60 else f"{minutes} min {s} s"


def training_summary(run_dir: str | Path) -> str:
    """One line: objective, mode, sizes, steps, time and hardware (also the demo's header)."""
    run_dir = Path(run_dir)
    dit, cfg = read_json(run_dir / "dit" / "model" / "config.json"), read_config(run_dir)
    train = read_json(run_dir / TRAINING_FILE)
    seconds = train.get("seconds", training_seconds(run_dir))
    steps = (cfg.get("dit_train") or {}).get("steps", "?"), (cfg.get("vqvae_train") or {}).get("steps", "?")
    return (f"{dit.get('objective', '?')} objective, {dit.get('mode', '?')} DiT (width {dit.get('width', '?')}, "
            f"depth {dit.get('depth', '?')}), {resolution(dit, run_dir)} px; data {data_name(cfg)}; "
            f"{steps[0]} DiT + {steps[1]} VQ-VAE steps in {duration(seconds)} on "
            f"{train.get('hardware', 'hardware not recorded')}")


def resolution(dit: dict, run_dir: Path) -> str:
    vq = read_json(run_dir / "vqvae" / "model" / "config.json")  # VQVAEConfig.downsample, from the saved fields
    size, patch, mult = dit.get("input_size"), vq.get("patch_size"), vq.get("channel_mult")
    if isinstance(size, int) and isinstance(patch, int) and isinstance(mult, list) and mult:
        side = size * patch * 2 ** (len(mult) - 1)
        return f"{side}x{side}"
    res = (read_config(run_dir).get("data") or {}).get("resolution", "?")
    return f"{res}x{res}"


def data_name(cfg: dict) -> str:
    data = cfg.get("data") or {}
    return "shapes (synthetic)" if data.get("name") == "shapes" else str(data.get("name", "?"))


def data_license(cfg: dict) -> tuple[str | None, str]:
    """(the data's licence id or None, a sentence on it). Shapes is drawn by this project; a local dataset
    declares its licence in its README.md front matter (as mmdit.data.openmoji writes it); a hub dataset's is on
    its Hub page."""
    data = cfg.get("data") or {}
    name = str(data.get("name", ""))
    if name == "shapes":
        return None, "synthetic shapes drawn by mmdit itself (mmdit/data/shapes.py): no third-party content."
    card = Path(name) / "README.md"
    if card.is_file():
        text = card.read_text(errors="replace")
        if text.startswith("---"):
            try:
                front = yaml.safe_load(text.split("---", 2)[1]) or {}
            except yaml.YAMLError:
                front = {}
            if isinstance(front, dict) and front.get("license"):
                return str(front["license"]), f"`{name}`, licence {front['license']} (from its README.md)."
        return None, f"`{name}`: its README.md declares no licence; check it before sharing the weights."
    return None, f"`{name}`: see the dataset's card (https://huggingface.co/datasets/{name}) for its licence."


def find_reports(run_dir: Path, extra: tuple = ()) -> list[tuple[Path, dict]]:
    """(path, report) of each eval report of this run: RUN/*/report.json and `extra` report.json paths, those whose
    protocol names this run directory (a report copied from another run is left out)."""
    paths = sorted(run_dir.glob("*/report.json")) + [Path(p) for p in extra]
    found, seen = [], set()
    for path in paths:
        report = read_json(path)
        model = (report.get("protocol") or {}).get("model")
        if not report or path.resolve() in seen or model is None or Path(model).resolve() != run_dir.resolve():
            continue
        seen.add(path.resolve())
        found.append((path, report))
    return found


def pct(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def headline(report: dict) -> list[tuple[str, str]]:
    """(metric, value) rows: the numbers a reader looks for first; the report's own report.md has the rest."""
    rows = []
    comp = report.get("composition") or {}
    for group in ("all_captions", "seen", "held_out"):
        if isinstance(comp.get(group), dict):
            rows.append((f"composition, all four attributes right ({group})", pct(comp[group].get("all"))))
    if isinstance(report.get("fid"), dict):
        value = report["fid"].get("samples_vs_reference")
        rows.append((report["fid"].get("label", "FID"), f"{value:.2f}" if isinstance(value, float) else "-"))
    clip = (report.get("clip") or {}).get("all_captions") or {}
    if clip:
        score = (clip.get("samples") or {}).get("clip_score")
        rows.append(("CLIP score of the samples" + (f" ({pct(clip['ratio_to_ceiling'])} of the real images')"
                                                   if "ratio_to_ceiling" in clip else ""),
                     f"{score:.2f}" if isinstance(score, float) else "-"))
    if isinstance((report.get("recon") or {}).get("psnr_db"), float):
        rows.append(("VQ-VAE reconstruction PSNR", f"{report['recon']['psnr_db']:.2f} dB"))
    edit = report.get("edit") or {}
    for task in ("recolour", "reshape"):
        if isinstance(edit.get(task), dict):
            rows.append((f"editing: {task}, all four attributes right", pct(edit[task].get("all"))))
    return rows


def eval_section(run_dir: Path, reports: list[tuple[Path, dict]]) -> str:
    if not reports:
        return ("Not evaluated yet: `python eval/eval.py --model RUN --metrics composition --out RUN/eval` writes a "
                "report there, and this card is refreshed with its numbers.\n")
    parts = []
    for path, report in reports:
        protocol = report.get("protocol") or {}
        shown = os.path.relpath(path.parent / "report.md", run_dir)
        parts.append(f"**{shown}**: {protocol.get('num_samples', '?')} samples, {protocol.get('steps', '?')} "
                     f"{protocol.get('sampler', '')} steps, guidance {protocol.get('guidance', '?')}, seed "
                     f"{protocol.get('seed', '?')}\n\n| metric | value |\n|---|---|\n"
                     + "".join(f"| {name} | {value} |\n" for name, value in headline(report)))
    return "\n".join(parts)


def front_matter(run_dir: Path, cfg: dict, dit: dict) -> dict:
    licence, _ = data_license(cfg)
    objective = dit.get("objective", "flow")
    tags = ["text-to-image", "mmdit", "diffusion-transformer", "vq-vae",
            "rectified-flow" if objective == "flow" else "maskgit", f"{dit.get('mode', 'cross')}-attention"]
    front = {"library_name": "mmdit", "license": licence or CODE_LICENSE, "pipeline_tag": "text-to-image",
             "tags": tags, "inference": False}  # mmdit pipelines run locally, not on the Hub's inference API
    name = str((cfg.get("data") or {}).get("name", ""))
    if name and name != "shapes" and not Path(name).exists():
        front["datasets"] = [name]  # a hub dataset id
    return front


def model_table(dit: dict, vq: dict, pipe: dict) -> str:
    objective, mode = dit.get("objective", "?"), dit.get("mode", "?")
    return f"""| | |
|---|---|
| objective | `{objective}`: {OBJECTIVES.get(objective, '?')} |
| transformer | {mode} attention (`{mode}`), width {dit.get('width', '?')}, depth {dit.get('depth', '?')}, \
{dit.get('heads', '?')} heads, patch {dit.get('patch_size', '?')}, \
{dit.get('input_size', '?')}x{dit.get('input_size', '?')} latent grid |
| tokenizer | VQ-VAE, {vq.get('codebook_size', '?')} codes of dimension {vq.get('code_dim', '?')} |
| text encoder | {pipe.get('text_encoder_id') or pipe.get('text_encoder') or 'the shipped MiniLM'} (frozen), \
{pipe.get('max_length', '?')} tokens |
"""


def render(run_dir: Path, extra_reports: tuple = ()) -> str:
    cfg, dit = read_config(run_dir), read_json(run_dir / "dit" / "model" / "config.json")
    vq, train = read_json(run_dir / "vqvae" / "model" / "config.json"), read_json(run_dir / TRAINING_FILE)
    pipe = read_json(run_dir / "pipeline.json")
    _, licence = data_license(cfg)
    seconds = train.get("seconds", training_seconds(run_dir))
    precision = read_json(run_dir / "dit" / "precision.json").get("mixed_precision")
    steps = {k: (cfg.get(k) or {}).get("steps", "?") for k in ("vqvae_train", "dit_train")}
    header = yaml.safe_dump(front_matter(run_dir, cfg, dit), sort_keys=False)
    samples = "![samples](samples.png)\n\nThe sample prompts of training, six samples each (`samples.png`).\n" \
        if (run_dir / "samples.png").is_file() else "No samples grid (`samples.png`) in this export.\n"
    return f"""---
{header}---

# {run_dir.resolve().name}: an mmdit text-to-image model

A {resolution(dit, run_dir)} text-to-image model trained with mmdit: a frozen text encoder
conditions a diffusion transformer that generates the latent tokens of a VQ-VAE, whose decoder makes the picture.

{model_table(dit, vq, pipe)}
## Data

{data_name(cfg)}: {licence}

## Training

{steps['vqvae_train']} VQ-VAE steps, then {steps['dit_train']} DiT steps (batch \
{(cfg.get('dit_train') or {}).get('batch_size', '?')}), in {duration(seconds)} of wall-clock on \
{train.get('hardware', 'hardware not recorded')} (precision: {train.get('mixed_precision') or precision or 'not recorded'}). \
The whole configuration is in `config.yaml`.

## Evaluation

{eval_section(run_dir, find_reports(run_dir, extra_reports))}
## Samples

{samples}
## How to use

```python
from mmdit import TextToImagePipeline
pipe = TextToImagePipeline.from_pretrained("path/to/this/directory")
images = pipe(["a large red circle in the top left"], seed=0)  # PIL images; the run's sampling options
```

```bash
mmdit-sample --model path/to/this/directory --prompt "a large red circle in the top left" --out grid.png
mmdit-demo --model path/to/this/directory   # a browser demo (pip install "mmdit[demo]")
```

The weights are safetensors; loading runs no code from this directory.
"""


def write_model_card(run_dir: str | Path, accelerator=None, extra_reports: tuple = ()) -> Path:
    """RUN/README.md, written whole (atomically); with `accelerator`, at export, RUN/training.json first."""
    run_dir = Path(run_dir)
    if accelerator is not None:
        record_training(run_dir, accelerator)
    path = run_dir / "README.md"
    atomic_write(path, render(run_dir, tuple(extra_reports)).encode())
    return path


def refresh_model_card(run_dir: str | Path, report: str | Path) -> Path | None:
    """After eval/eval.py wrote `report` (a report.json) for run_dir: the card again, with its numbers. Only for an
    exported run, and never failing the evaluation: a read-only run directory keeps its card."""
    run_dir = Path(run_dir)
    if not (run_dir / "pipeline.json").is_file():
        return None
    try:
        return write_model_card(run_dir, extra_reports=(Path(report),))
    except OSError as e:
        print(f"warning: {run_dir / 'README.md'} not refreshed: {e}")
        return None
