"""Text -> image: text encoder -> transformer + its objective's sampler -> VQ-VAE decoder.

    pipe = TextToImagePipeline.from_pretrained("runs/shapes")
    images = pipe(["a small blue square in the bottom right"], num_steps=25, guidance_scale=4.0, seed=0)
    images = pipe(["a small blue square in the bottom right"])  # the options the run was trained with

Sampling options (steps, guidance, sampler, seed, snap_to_codes, temperature, randomness: mmdit/sampling.py) are
saved with the run from its `sample:` config section; an argument given to a call overrides them for that call.
`num_steps`, `guidance_scale` and `seed` mean the same for both objectives (dit.objective, in dit/model/config.json):

- masked: MaskGIT decoding of the VQ-VAE's code indices (mmdit/masked.py), then the decoder; guidance mixes
  the conditional and unconditional logits.
- flow: what is diffused: the VQ-VAE's *quantized* latents (codebook vectors, (B, d, h, w)), normalised per channel
with the train-set mean and std stored in `pipeline.json`. Continuous latents keep rectified flow simple
and the codebook's geometry gives the model a smooth target; after sampling, each latent vector is
optionally snapped to its nearest code (`snap_to_codes`, default on), which puts the decoder back on the
inputs it was trained on, then decoded.

A run directory holds `pipeline.json`, `vqvae/model/` and `dit/model/` (config.json + model.safetensors
each); the text encoder is referenced by name (None = the shipped MiniLM) and by what that name resolved to
in training (`text_encoder_id`: "name==version", name@commit or a path), so the directory loads without any
training code and warns when the installed encoder is another one.

The DiT conditions on `mmdit.text_encoder.conditioning` of the encoder's output, as in training, and image i's
noise is seeded by `noise_seed(seed, i)` alone.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from PIL import Image

from mmdit.checks import check_guidance, check_int, check_number, check_seed, check_steps
from mmdit.dit import DiT
from mmdit.editing import Edit, per_prompt
from mmdit import flow, masked
from mmdit.flow import cfg_combine
from mmdit.latents import LatentNorm
from mmdit.pixels import to_float, to_pil
from mmdit.sampling import ALL_SAMPLERS, SampleOptions, check_randomness, check_temperature
from mmdit.text_encoder import TextEmbeddings, TextEncoder, conditioning
from mmdit.vqvae import VQVAE
from mmdit.weights import ExportError, atomic_write, load_dataclass


@dataclass
class PipelineInfo:
    text_encoder: str | None
    max_length: int
    latent_mean: list[float]
    latent_std: list[float]
    text_encoder_id: str | None = None  # TextEncoder.resolved_id in training; None in older exports
    sample: SampleOptions = field(default_factory=SampleOptions)  # the run's `sample:` section: the defaults
    snap_to_codes: bool | None = None  # older exports only, now sample.snap_to_codes

    def __post_init__(self):  # what a damaged or hand-edited pipeline.json can get wrong
        for key in ("text_encoder", "text_encoder_id"):
            if not isinstance(getattr(self, key), (str, type(None))):
                raise ValueError(f"{key}={getattr(self, key)!r}; accepted: a string or null")
        check_int("max_length", self.max_length)
        if isinstance(self.sample, dict):  # as read from pipeline.json
            self.sample = SampleOptions(**self.sample)
        if not isinstance(self.sample, SampleOptions):
            raise ValueError(f"sample={self.sample!r}; accepted: the sampling options, a JSON object")
        if self.snap_to_codes is not None:
            self.sample = self.sample.override(snap_to_codes=self.snap_to_codes)
            self.snap_to_codes = None
        for key in ("latent_mean", "latent_std"):
            stats = getattr(self, key)
            if not isinstance(stats, list) or not stats:
                raise ValueError(f"{key}={stats!r}; accepted: a list of numbers, one per latent channel")
            for i, value in enumerate(stats):
                check_number(f"{key}[{i}]", value, "a finite number")
        if len(self.latent_mean) != len(self.latent_std):
            raise ValueError(f"latent_mean has {len(self.latent_mean)} values, latent_std {len(self.latent_std)}; "
                             "accepted: one of each per latent channel")


def noise_seed(seed: int, index: int) -> int:
    """The 64-bit noise seed of image `index` of a run seeded `seed`. A hash, because any linear mix such as
    seed * K + index collides ((1, 0) == (0, K)); a function of (seed, index) alone, so a picture does not
    depend on how prompts are batched or sharded."""
    # As Python ints (what the checks return): numpy's integers hash as Python's.
    key = f"{check_seed('seed', seed)},{check_int('index', index, low=0)}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


def check_prompts(prompts) -> list[str]:
    # Before any work: a generator would be consumed by the length check, a dict would iterate its keys.
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)):
        got = "a single string" if isinstance(prompts, str) else type(prompts).__name__
        raise TypeError(f"prompts must be a list of strings, e.g. [\"a red circle\"]; got {got}")
    if len(prompts) == 0:
        raise ValueError("prompts is empty; accepted: a list of one or more strings (\"\" = unconditional)")
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise TypeError(f"prompts[{bad}]={prompts[bad]!r}: not a string ({type(prompts[bad]).__name__}); accepted: "
                        "a list of strings")
    return list(prompts)


class TextToImagePipeline:
    def __init__(self, dit: DiT, vqvae: VQVAE, info: PipelineInfo, text_encoder: TextEncoder | None = None):
        self.dit = dit.eval()
        self.vqvae = vqvae.eval()
        self.info = info
        self._text_encoder = None
        if text_encoder is not None:
            self._set_text_encoder(text_encoder)
        self.norm = LatentNorm(info.latent_mean, info.latent_std)

    @property
    def resolution(self) -> int:
        """The side of the images it makes (and to which images to edit are resized)."""
        return self.dit.cfg.input_size * self.vqvae.cfg.downsample

    @property
    def text_encoder(self) -> TextEncoder:
        if self._text_encoder is None:  # loaded on first use: training samples from cached embeddings
            self._set_text_encoder(TextEncoder(self.info.text_encoder, max_length=self.info.max_length))
        return self._text_encoder

    def _set_text_encoder(self, encoder: TextEncoder) -> None:
        recorded = self.info.text_encoder_id
        if recorded is not None and recorded != encoder.resolved_id:
            warnings.warn(f"text encoder: this pipeline was trained with {recorded!r} but {encoder.resolved_id!r} "
                          "is what loaded; its conditioning may differ, so may the images (install the recorded one)")
        self._text_encoder = encoder

    @classmethod
    def from_pretrained(cls, run_dir: str | Path) -> "TextToImagePipeline":
        """Load an exported run; a missing, damaged or mismatched file is one line naming it (ExportError)."""
        run_dir = Path(run_dir)
        path = run_dir / "pipeline.json"
        if not path.is_file():
            raise FileNotFoundError(f"{run_dir} is not an exported mmdit run: no pipeline.json (an export writes "
                                    "it last; train with `accelerate launch train/train.py`, which exports the run)")
        info = load_dataclass(PipelineInfo, path)
        dit, vqvae = DiT.from_pretrained(run_dir / "dit" / "model"), VQVAE.from_pretrained(run_dir / "vqvae" / "model")
        if not len(info.latent_mean) == dit.cfg.in_channels == vqvae.cfg.code_dim:
            raise ExportError(f"{path}: {len(info.latent_mean)} latent channels, but the DiT takes "
                              f"{dit.cfg.in_channels} and the VQ-VAE makes {vqvae.cfg.code_dim}; accepted: the "
                              "files of one export (export the run again)")
        if dit.cfg.objective == "masked" and dit.cfg.codebook_size != vqvae.cfg.codebook_size:
            raise ExportError(f"{run_dir}: the DiT predicts {dit.cfg.codebook_size} codes, the VQ-VAE has "
                              f"{vqvae.cfg.codebook_size}; accepted: the files of one export (export the run again)")
        return cls(dit, vqvae, info)

    def save_pretrained(self, run_dir: str | Path) -> None:
        """pipeline.json marks a complete export: removed first, written last (every file atomically), so an
        interrupted export reads as "not an exported run", never as the models of two exports."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "pipeline.json").unlink(missing_ok=True)
        self.dit.save_pretrained(run_dir / "dit" / "model")
        self.vqvae.save_pretrained(run_dir / "vqvae" / "model")
        info = self.info
        if info.text_encoder_id is None and self._text_encoder is not None:
            info = replace(info, text_encoder_id=self._text_encoder.resolved_id)
        values = {k: v for k, v in asdict(info).items() if k != "snap_to_codes"}  # the older exports' key
        atomic_write(run_dir / "pipeline.json", json.dumps(values, indent=2).encode())

    @torch.no_grad()
    def generate(self, text: TextEmbeddings, null: TextEmbeddings, options: SampleOptions | None = None,
                 first_index: int = 0, edit: Edit | None = None, negative: TextEmbeddings | None = None
                 ) -> torch.Tensor:
        """Embedded prompts (B, L, D) + the unconditional branch of guidance, the empty prompt (1, L, D), and
        optionally negative prompts (B or 1, L, D) -> images (B, 3, H, W) in [-1, 1], sampled as `options` say
        (None = the run's), from `edit`'s images where given (mmdit/editing.py). Image i's random draws depend
        only on (options.seed, first_index + i): a prompt's picture does not depend on how the prompts are
        batched or sharded."""
        cfg = self.dit.cfg
        options = (options or self.info.sample).for_objective(cfg.objective)
        device = next(self.dit.parameters()).device
        b, h = len(text.hidden), cfg.input_size
        generators = [torch.Generator().manual_seed(noise_seed(options.seed, first_index + i)) for i in range(b)]
        # what it trained on, from the cache or the encoder; conditional, unconditional (and negative)
        # predictions in one batch of 2B (3B)
        branches = [conditioning(e) for e in (text, null, negative) if e is not None]
        branches = branches[:1] if options.guidance == 1.0 and negative is None else branches
        hidden, mask, pooled = (torch.cat([getattr(e, k).expand(b, *getattr(e, k).shape[1:]) for e in branches])
                                .to(device) for k in ("hidden", "mask", "pooled"))

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:  # the velocity or the logits, guided
            n = len(branches)
            out = self.dit(torch.cat([x] * n), torch.cat([t] * n), hidden, mask, pooled).chunk(n)
            if n == 1:
                return out[0]
            return cfg_combine(out[0], out[1], options.guidance, out[2] if n == 3 else None, options.negative_guidance)

        strength, cells, start = 1.0, None, (None, None)  # start: the input's (latents, code indices)
        if edit is not None:
            strength, cells = edit.strength, edit.cells(h)  # cells (B, h, h) bool or None
            start = self.vqvae.encode(to_float(edit.images).to(device))
        if cfg.objective == "masked":
            codes = masked.sample(lambda tokens, ratio: predict(tokens.view(-1, h, h), ratio).flatten(1, 2),
                                  generators, h * h, cfg.codebook_size, device, options.steps, options.temperature,
                                  options.randomness, tokens=None if edit is None else start[1].flatten(1),
                                  region=None if cells is None else cells.flatten(1), strength=strength)  # (B, h*h)
            images = self.vqvae.decode_indices(codes.view(b, h, h))
        else:
            noise = torch.stack([torch.randn(cfg.in_channels, h, h, generator=g) for g in generators]).to(device)
            x0 = None if edit is None else self.norm.normalise(start[0])
            x = flow.sample(predict, noise, steps=options.steps, sampler=options.sampler, x0=x0, strength=strength,
                            known=None if cells is None else ~cells[:, None].to(device))
            latents = self.norm.denormalise(x)
            if options.snap_to_codes:
                latents = self.vqvae.quantize(latents)
            images = self.vqvae.decode(latents)
        images = images.clamp(-1, 1)
        return images if edit is None else edit.paste_back(images)

    def options(self, num_steps: int | None = None, guidance_scale: float | None = None, seed: int | None = None,
                sampler: str | None = None, snap_to_codes: bool | None = None, temperature: float | None = None,
                randomness: float | None = None, negative_guidance_scale: float | None = None) -> SampleOptions:
        """The run's sampling options with the arguments that are not None instead, each checked by its name, and
        the objective's defaults where neither gives one."""
        for name, value, check in (("num_steps", num_steps, check_steps), ("seed", seed, check_seed),
                                   ("guidance_scale", guidance_scale, check_guidance),  # inf gives black images
                                   ("temperature", temperature, check_temperature),
                                   ("randomness", randomness, check_randomness),
                                   ("negative_guidance_scale", negative_guidance_scale, check_guidance)):
            if value is not None:
                check(name, value)
        if sampler is not None and sampler not in ALL_SAMPLERS:
            raise ValueError(f"sampler={sampler!r}; accepted: {', '.join(ALL_SAMPLERS)}")
        if snap_to_codes is not None and not isinstance(snap_to_codes, bool):
            raise ValueError(f"snap_to_codes={snap_to_codes!r}; accepted: True, False or None (the run's)")
        return self.info.sample.override(steps=num_steps, guidance=guidance_scale, seed=seed, sampler=sampler,
                                         snap_to_codes=snap_to_codes, temperature=temperature,
                                         randomness=randomness, negative_guidance=negative_guidance_scale
                                         ).for_objective(self.dit.cfg.objective)

    def __call__(self, prompts: list[str], negative_prompt: str | list[str] | None = None, image=None,
                 strength: float | None = None, mask_image=None, num_steps: int | None = None,
                 guidance_scale: float | None = None, seed: int | None = None, sampler: str | None = None,
                 batch_size: int = 64, snap_to_codes: bool | None = None, temperature: float | None = None,
                 randomness: float | None = None, paste_unmasked: bool = True,
                 negative_guidance_scale: float | None = None) -> list[Image.Image]:
        """Prompts -> PIL images. An argument left at None takes the run's saved sampling options
        (`pipe.info.sample`: the `sample:` section it trained with).

        negative_prompt: a string or one per prompt that guidance steps away from, negative_guidance_scale
        (default 1) times, beside the empty prompt ("" = none, as by default). image (a PIL image or one per
        prompt): image-to-image, from noise level `strength` (default 0.6); with mask_image (white = repaint):
        inpainting (strength default 1), the input's pixels pasted back outside the mask unless
        paste_unmasked=False. The rules: mmdit/editing.py."""
        prompts = check_prompts(prompts)
        check_int("batch_size", batch_size)
        options = self.options(num_steps, guidance_scale, seed, sampler, snap_to_codes, temperature,
                               randomness, negative_guidance_scale)  # before the encoder loads
        negatives = per_prompt("negative_prompt", "" if negative_prompt is None else negative_prompt, len(prompts),
                               "a string")
        bad = next((i for i, p in enumerate(negatives) if not isinstance(p, str)), None)
        if bad is not None:
            raise TypeError(f"negative_prompt[{bad}]={negatives[bad]!r}; accepted: a string or a list of strings")
        edit = Edit.prepare(len(prompts), self.resolution, image,
                            mask_image, strength, paste_unmasked)
        images = []
        for start in range(0, len(prompts), batch_size):
            images += to_pil(self.generate_rows(prompts, negatives, options, slice(start, start + batch_size), edit))
        return images

    def generate_rows(self, prompts: list[str], negatives: list[str], options: SampleOptions, rows: slice,
                      edit: Edit | None = None) -> torch.Tensor:
        """The images of prompts[rows] (B, 3, H, W) in [-1, 1], each with its negative prompt and, where given,
        edit's image: one batch of `__call__`, or of a shard in mmdit.evaluate."""
        text = self.text_encoder(list(prompts[rows]))
        negative = negatives[rows]  # all "": no negative branch; all the same: one row serves all
        negative = self.text_encoder(negative[:1] if len(set(negative)) == 1 else negative) if any(negative) else None
        return self.generate(text, self.text_encoder([""]), options, first_index=rows.start,
                             edit=None if edit is None else edit.select(rows), negative=negative)
