"""A browser demo of an exported run (Gradio): text-to-image, image-to-image and inpainting, for either objective.

    python -m mmdit.demo --model runs/shapes [--host 127.0.0.1] [--port 7860]
    mmdit-demo --model runs/shapes                     # the same; needs `pip install "mmdit[demo]"`

One prompt per line, `--num images` each, in a gallery; the time taken and the seed used below it. The sampling
options start at the run's (pipeline.json) and show only the objective's own (flow: sampler, snap to codes;
masked: temperature, randomness). Image-to-image takes an upload and a strength; inpainting an upload brushed
in the image editor (the brushed pixels are repainted, white in the mask the pipeline gets: mmdit/editing.py).

Bad input is a message in the page (gr.Error), one line naming the value and what is accepted, as the CLIs
say it. Requests queue and run one at a time (the model is shared), so several browsers do not compete for it.
It listens on 127.0.0.1 unless --host says otherwise; it never makes a share link, and Gradio's analytics are off.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mmdit.checks import MAX_STEPS, check_int, check_seed, check_steps
from mmdit.cli import ArgumentParser, run_cli
from mmdit.editing import check_strength
from mmdit.model_card import training_summary
from mmdit.pipeline import TextToImagePipeline
from mmdit.sampling import SAMPLERS
from mmdit.text_encoder import TextEncoderLoadError
from mmdit.weights import ExportError

MAX_IMAGES = 16  # per prompt and request: a request holds the queue for everyone else
MAX_PROMPTS = 8
CANVAS_SIZE = (800, 800)  # the image editor's empty canvas, Gradio's default
QUEUE_SIZE = 32  # requests waiting beyond this are refused with a message rather than piling up
OBJECTIVE_NAMES = {"flow": "rectified flow", "masked": "masked-token generation (MaskGIT)"}


@dataclass
class Settings:
    """The form's values, as the page sends them (numbers may arrive as floats, text may be empty)."""
    prompts: str
    negative_prompt: str = ""
    steps: float | None = None
    guidance: float | None = None
    seed: float | None = 0
    random_seed: bool = False
    num_images: float = 1
    sampler: str | None = None
    snap_to_codes: bool = True
    temperature: float | None = None
    randomness: float | None = None


def given(name: str, value):
    """A number box's value, refused when the box was left empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{name} is empty; accepted: a number")
    return value


def whole(name: str, value):
    """A number box's value as an int where it is a whole number (1.0 -> 1), else as given, for the checks."""
    value = given(name, value)
    return int(value) if isinstance(value, float) and value.is_integer() else value


def parse_prompts(text: str) -> list[str]:
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise ValueError("the prompt is empty; accepted: one prompt per line, at least one")
    if len(prompts) > MAX_PROMPTS:
        raise ValueError(f"{len(prompts)} prompts; accepted: 1 to {MAX_PROMPTS} lines")
    return prompts


def call_arguments(pipe: TextToImagePipeline, s: Settings) -> tuple[list[str], dict]:
    """(the prompts, each repeated num_images times; the pipeline's keyword arguments), every value checked
    with its name in the page."""
    prompts = parse_prompts(s.prompts)
    n = check_int("number of images", whole("number of images", s.num_images), 1, MAX_IMAGES)
    seed = random.randrange(2 ** 32) if s.random_seed else check_seed("seed", whole("seed", s.seed))
    steps = check_steps("steps", whole("steps", s.steps))
    flow = pipe.dit.cfg.objective == "flow"
    kwargs = dict(negative_prompt=s.negative_prompt or None, num_steps=steps, seed=seed,
                  guidance_scale=given("guidance", s.guidance), sampler=s.sampler or None,
                  snap_to_codes=bool(s.snap_to_codes) if flow else None,
                  temperature=None if flow else given("temperature", s.temperature),
                  randomness=None if flow else given("randomness", s.randomness))
    pipe.options(**{k: v for k, v in kwargs.items() if k != "negative_prompt"})  # checks them all, by name
    return [p for p in prompts for _ in range(n)], kwargs


def blank_canvas(image: Image.Image) -> bool:
    """The editor's own empty canvas (brushed on without an upload): all transparent, or all white at the
    canvas' size. A uniform picture uploaded at another size is still an image to inpaint."""
    if image.mode in ("RGBA", "LA") and not image.getchannel("A").getbbox():
        return True
    return image.size == CANVAS_SIZE and all(lo == hi == 255 for lo, hi in image.convert("RGB").getextrema())


def editor_inputs(value) -> tuple[Image.Image | None, Image.Image | None]:
    """The image editor's value -> (the uploaded image, its mask: white where any layer was brushed)."""
    if not value:
        return None, None
    background, layers = value.get("background"), [x for x in value.get("layers") or [] if x is not None]
    if background is not None and blank_canvas(background):
        background = None
    size = background.size if background is not None else (layers[0].size if layers else None)
    if size is None:
        return None, None
    painted = np.zeros(size[::-1], dtype=bool)
    for layer in layers:
        alpha = np.array(layer.convert("RGBA").resize(size, Image.Resampling.NEAREST))[..., 3]
        painted |= alpha > 0
    mask = Image.fromarray(painted.astype(np.uint8) * 255, "L") if painted.any() else None
    return (background.convert("RGB") if background is not None else None), mask


def generate(pipe: TextToImagePipeline, s: Settings, image: Image.Image | None = None,
             mask: Image.Image | None = None, strength: float | None = None,
             paste_unmasked: bool = True) -> tuple[list[Image.Image], str]:
    """(the images, a line on what was made and how long it took). ValueError / TypeError for bad input."""
    prompts, kwargs = call_arguments(pipe, s)
    if mask is not None and image is None:
        raise ValueError("a mask was given without an image; accepted: upload the image, then brush the mask on it")
    if image is not None:
        strength = check_strength(given("strength", strength))
    start = time.perf_counter()
    images = pipe(prompts, image=image, mask_image=mask, strength=strength if image is not None else None,
                  paste_unmasked=bool(paste_unmasked), **kwargs)
    seconds = time.perf_counter() - start
    options = pipe.options(**{k: v for k, v in kwargs.items() if k != "negative_prompt"})
    what = "inpainted" if mask is not None else "image-to-image" if image is not None else "text-to-image"
    return images, (f"{len(images)} {what} image(s) of {images[0].size[0]}x{images[0].size[1]} in {seconds:.2f} s; "
                    f"seed {options.seed}, {options.steps} {options.sampler} steps, guidance {options.guidance:g}")


def run_header(pipe: TextToImagePipeline, run_dir: Path) -> str:
    objective = pipe.dit.cfg.objective
    return (f"## mmdit: `{run_dir}`\n\n**{objective}** objective ({OBJECTIVE_NAMES.get(objective, objective)}), "
            f"{pipe.resolution}x{pipe.resolution} images.\n\n{training_summary(run_dir)}")


class DemoError(RuntimeError):
    """What stops the demo from starting: Gradio missing, the port taken."""


def one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def handlers(pipe: TextToImagePipeline):
    """The three endpoints (text_to_image, image_to_image, inpaint): form values -> (gallery, info line); bad
    input raises gr.Error, which the page shows as a message."""
    import gradio as gr

    def guarded(s: Settings, **edit):
        try:
            return generate(pipe, s, **edit)
        except (ValueError, TypeError) as e:
            raise gr.Error(one_line(e), print_exception=False) from None

    def text_to_image(*values):
        return guarded(Settings(*values))

    def image_to_image(*values):
        *settings, image, strength = values
        if image is None:
            raise gr.Error("no image; accepted: upload an image to edit", print_exception=False)
        return guarded(Settings(*settings), image=image, strength=strength)

    def inpaint(*values):
        *settings, editor, strength, paste = values
        image, mask = editor_inputs(editor)
        if image is not None and mask is None:
            raise gr.Error("the mask is empty; accepted: brush the region to repaint on the image",
                           print_exception=False)
        if image is None and mask is None:
            raise gr.Error("no image; accepted: upload an image, then brush the region to repaint",
                           print_exception=False)
        return guarded(Settings(*settings), image=image, mask=mask, strength=strength, paste_unmasked=paste)

    return text_to_image, image_to_image, inpaint


def settings_inputs(gr, pipe: TextToImagePipeline) -> list:
    """The inputs of Settings, in its field order, laid out; each objective shows only its own sampler options."""
    objective, defaults = pipe.dit.cfg.objective, pipe.options()
    masked = objective == "masked"
    prompt = gr.Textbox(label="Prompt (one per line)", lines=2, elem_id="prompt",
                        placeholder="a large red circle in the top left")
    negative = gr.Textbox(label="Negative prompt (optional)", elem_id="negative")
    with gr.Row():
        steps = gr.Number(defaults.steps, label=f"Steps (1 to {MAX_STEPS})", precision=0, elem_id="steps")
        guidance = gr.Number(defaults.guidance, label="Guidance (1 = none)", elem_id="guidance")
        num = gr.Number(1, label=f"Images per prompt (1 to {MAX_IMAGES})", precision=0, elem_id="num-images")
    with gr.Row():
        seed = gr.Number(defaults.seed, label="Seed", precision=0, elem_id="seed")
        random_seed = gr.Checkbox(False, label="Random seed", elem_id="random-seed")
    with gr.Accordion(f"{objective} sampler options", open=False):
        sampler = gr.Dropdown(list(SAMPLERS[objective]), value=defaults.sampler, label="Sampler")
        snap = gr.Checkbox(defaults.snap_to_codes, label="Snap sampled latents to the nearest code", visible=not masked)
        temperature = gr.Number(defaults.temperature, label="Temperature (> 0)", visible=masked)
        randomness = gr.Number(defaults.randomness, label="Randomness (>= 0)", visible=masked)
    return [prompt, negative, steps, guidance, seed, random_seed, num, sampler, snap, temperature, randomness]


def build_demo(pipe: TextToImagePipeline, run_dir: Path):
    """The page: the run's header, the settings, a tab per task with its button, the gallery and an info line."""
    import gradio as gr

    text_to_image, image_to_image, inpaint = handlers(pipe)
    # In the upload's pixels; Gradio's "auto" is ~25, most of a 32-pixel image (Brush Size in the toolbar changes it).
    brush = gr.Brush(default_size=max(2, pipe.resolution // 8), colors=[("#ff0000", 0.6)], color_mode="fixed")
    with gr.Blocks(title=f"mmdit: {Path(run_dir).name}", analytics_enabled=False) as demo:
        gr.Markdown(run_header(pipe, Path(run_dir)), elem_id="header")
        with gr.Row():
            with gr.Column():
                settings = settings_inputs(gr, pipe)
                with gr.Tabs():
                    with gr.Tab("Text to image", elem_id="tab-text"):
                        t2i = gr.Button("Generate", variant="primary", elem_id="generate")
                    with gr.Tab("Image to image", elem_id="tab-image"):
                        image = gr.Image(type="pil", image_mode="RGB", label="Image to edit", elem_id="i2i-image",
                                         sources=["upload", "clipboard"])
                        i2i_strength = gr.Slider(0.05, 1, 0.6, step=0.05, label="Strength (1 = from noise)")
                        i2i = gr.Button("Generate from the image", variant="primary", elem_id="generate-i2i")
                    with gr.Tab("Inpainting", elem_id="tab-inpaint"):
                        editor = gr.ImageEditor(type="pil", label="Upload, then brush what to repaint",
                                                elem_id="editor", sources=["upload", "clipboard"], transforms=(),
                                                layers=False, brush=brush)
                        inp_strength = gr.Slider(0.05, 1, 1.0, step=0.05, label="Strength (1 = from noise)")
                        paste = gr.Checkbox(True, label="Keep the unmasked pixels exactly as given")
                        inp = gr.Button("Inpaint", variant="primary", elem_id="generate-inpaint")
            with gr.Column():
                gallery = gr.Gallery(label="Images", format="png", columns=4, object_fit="contain",
                                     elem_id="gallery", interactive=False)
                info = gr.Markdown(elem_id="info")
        outputs = [gallery, info]
        t2i.click(text_to_image, settings, outputs, api_name="text_to_image")
        i2i.click(image_to_image, settings + [image, i2i_strength], outputs, api_name="image_to_image")
        inp.click(inpaint, settings + [editor, inp_strength, paste], outputs, api_name="inpaint")
    # One request at a time: they share the model and the CPU; the rest wait in line, with their position shown.
    return demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)


def launch(run_dir: str | Path, host: str = "127.0.0.1", port: int = 7860, block: bool = True):
    """Load the run and serve its page; block=False returns the running Blocks (demo.close() stops it)."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: it reads this on import
    try:
        import gradio as gr
    except ImportError:
        raise DemoError('the demo needs Gradio: pip install "mmdit[demo]"') from None
    pipe = TextToImagePipeline.from_pretrained(run_dir)
    pipe.text_encoder  # noqa: B018 -- loaded now, not while the first visitor waits
    demo = build_demo(pipe, Path(run_dir))
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # local fonts: no font CDN
                              font_mono=["ui-monospace", "monospace"])
    print(f"mmdit demo of {run_dir} on http://{host}:{port} (Ctrl-C stops it)", flush=True)
    try:
        demo.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=not block, quiet=True,
                    show_error=False, ssr_mode=False, theme=theme, footer_links=["api"], mcp_server=False,
                    pwa=False, enable_monitoring=False)
    except OSError as e:
        raise DemoError(f"--host {host} --port {port}: cannot listen there ({one_line(e)}); accepted: a free port "
                        "on an address of this machine") from None
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run directory written by train/train.py")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only; "
                        "0.0.0.0 = every interface)")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on (1 to 65535)")
    args = parser.parse_args(argv)
    try:
        check_int("--port", args.port, 1, 65535)
    except ValueError as e:
        parser.error(str(e))
    launch(args.model, args.host, args.port, block=True)


def cli(argv: list[str] | None = None) -> int:
    """Exit code 2 and one `error: ...` line for a bad argument, a missing or damaged run, no Gradio, a taken port."""
    return run_cli(main, argv, user_errors=(FileNotFoundError, ExportError, TextEncoderLoadError, DemoError))


if __name__ == "__main__":
    sys.exit(cli())
