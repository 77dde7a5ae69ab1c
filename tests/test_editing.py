from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from mmdit import TextToImagePipeline, flow
from mmdit.editing import Edit, outpaint
from mmdit.pixels import from_pil, prepare, to_float, to_uint8
from mmdit.sample import main as sample_main

R = 32  # the tiny runs' resolution; their latents are 8x8 (f4)


@pytest.fixture(scope="module", params=["flow", "masked"])
def pipe(request, tiny_run, tiny_masked_run):
    return TextToImagePipeline.from_pretrained(tiny_run if request.param == "flow" else tiny_masked_run)


def picture(w: int = R, h: int = R, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def mask_of(box=None, size=(R, R)) -> Image.Image:
    """White (repaint) inside box = (left, top, right, bottom), black elsewhere; None = all black."""
    mask = Image.new("L", size, 0)
    if box is not None:
        mask.paste(255, box)
    return mask


def pixels(images) -> torch.Tensor:
    return torch.stack([from_pil(im) for im in images])


@pytest.mark.parametrize("size", [(32, 32), (50, 40), (40, 71), (17, 30)])
def test_prepare_is_torchvisions_resize_and_centre_crop(size):
    image = picture(*size)
    expected = TF.center_crop(TF.resize(image, 16, interpolation=InterpolationMode.BICUBIC, antialias=True), [16, 16])
    assert torch.equal(prepare(image, 16), from_pil(expected))
    assert prepare(image.convert("RGBA"), 16).shape == (3, 16, 16)


def test_flow_image_to_image_at_strength_1_is_text_to_image(tiny_run):
    pipe = TextToImagePipeline.from_pretrained(tiny_run)
    prompts = ["a red circle", "a small blue square in the bottom right"]
    plain = pipe(prompts, num_steps=3, seed=4)
    edited = pipe(prompts, image=picture(), strength=1.0, num_steps=3, seed=4)
    assert [im.tobytes() for im in plain] == [im.tobytes() for im in edited]


def test_an_all_black_mask_returns_the_input_with_paste_and_its_reconstruction_without(pipe):
    image, black = picture(seed=1), mask_of(None)
    out = pipe(["a red circle"], image=image, mask_image=black, num_steps=3)[0]
    assert out.tobytes() == image.tobytes()
    raw = pipe(["a red circle"], image=image, mask_image=black, num_steps=3, paste_unmasked=False)[0]
    x = to_float(from_pil(image)[None])
    reconstruction = to_uint8(pipe.vqvae.decode(pipe.vqvae.encode(x)[0]).clamp(-1, 1))
    assert (pixels([raw]).int() - reconstruction.int()).abs().max() <= 1  # the latents' normalisation round trip


def test_inpainting_repaints_the_mask_and_keeps_every_other_pixel(pipe):
    image = picture(seed=2)
    out = pipe(["a red circle"], image=image, mask_image=mask_of((8, 8, 20, 20)), num_steps=3)[0]
    a, b = pixels([out])[0], from_pil(image)
    inside = torch.zeros(R, R, dtype=torch.bool)
    inside[8:20, 8:20] = True
    assert torch.equal(a[:, ~inside], b[:, ~inside])
    assert not torch.equal(a[:, inside], b[:, inside])


def test_masked_inpainting_decodes_the_mask_and_reveals_every_other_token_as_given(tiny_masked_run, monkeypatch):
    pipe = TextToImagePipeline.from_pretrained(tiny_masked_run)
    image = picture(seed=3)
    codes = pipe.vqvae.encode(to_float(from_pil(image)[None]))[1][0]  # (8, 8)
    calls, decoded, forward, decode = [], [], pipe.dit.forward, pipe.vqvae.decode_indices
    monkeypatch.setattr(pipe.dit, "forward", lambda x, *rest: calls.append(x.clone()) or forward(x, *rest))
    monkeypatch.setattr(pipe.vqvae, "decode_indices", lambda c: decoded.append(c.clone()) or decode(c))
    pipe(["a red circle"], image=image, mask_image=mask_of((0, 0, 12, 32)), num_steps=4, guidance_scale=1.0,
         paste_unmasked=False)
    region = torch.zeros(8, 8, dtype=torch.bool)
    region[:, :3] = True  # pixels 0..11 touch latent columns 0, 1 and 2 (one code per 4x4 pixels)
    assert len(calls) == 4 and (calls[0][0] == 32).all()  # strength 1: all hidden at first, outside the mask too
    hidden_outside = []
    for x in calls:
        outside = x[0][~region]
        shown = outside != 32
        assert torch.equal(outside[shown], codes[~region][shown])  # hidden or its own code, never another
        hidden_outside.append(int((~shown).sum()))
    assert hidden_outside[0] == 40 and all(a > b for a, b in zip(hidden_outside, hidden_outside[1:]))
    assert torch.equal(decoded[0][0][~region], codes[~region])  # all revealed at the end, as given


def test_masked_image_to_image_remasks_a_strength_share_in_that_share_of_the_steps(tiny_masked_run, monkeypatch):
    pipe = TextToImagePipeline.from_pretrained(tiny_masked_run)
    calls, forward = [], pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda x, *rest: calls.append(x.clone()) or forward(x, *rest))
    pipe(["a red circle"], image=picture(), strength=0.5, num_steps=12, guidance_scale=1.0)
    # Two calls read every token's plausibility (complementary halves hidden), then 0.5 x 12 steps from
    # 0.5 x 64 tokens re-masked, and half the 32 kept hidden too, to be revealed with their own codes.
    assert len(calls) == 8 and ((calls[0] == 32) ^ (calls[1] == 32)).all()
    assert int((calls[2] == 32).sum()) == 32 + 16


def test_flow_inpainting_keeps_the_known_latents_on_their_path():
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    known = torch.rand(2, 1, 8, 8) > 0.5
    seen = []

    def velocity(x, t):
        seen.append((x.clone(), t[0].item()))
        return torch.randn_like(x)

    out = flow.sample(velocity, noise, steps=5, x0=x0, strength=0.8, known=known)
    assert len(seen) == 4  # ceil(0.8 x 5) steps, from t = 0.8
    for x, t in seen:
        path = (1 - t) * x0 + t * noise
        assert torch.allclose(x.masked_select(known), path.masked_select(known), atol=1e-6)
    assert torch.equal(out.masked_select(known), x0.masked_select(known))
    assert not torch.allclose(out.masked_select(~known), x0.masked_select(~known))


def test_an_empty_negative_prompt_is_the_default_and_a_negative_prompt_is_a_third_branch(pipe, monkeypatch):
    prompts = ["a red circle", "a small blue square in the bottom right"]
    plain = pipe(prompts, num_steps=2, seed=3)
    assert [im.tobytes() for im in pipe(prompts, negative_prompt="", num_steps=2, seed=3)] == \
        [im.tobytes() for im in plain]
    seen, forward = [], pipe.dit.forward
    monkeypatch.setattr(pipe.dit, "forward", lambda x, t, hidden, *rest: seen.append(hidden) or forward(x, t, hidden,
                                                                                                         *rest))
    negatives = ["blue", "red"]
    pipe(prompts, negative_prompt=negatives, num_steps=2, seed=3, guidance_scale=3.0)
    embedded = [pipe.text_encoder(p).hidden.to(torch.bfloat16).float() for p in (prompts, ["", ""], negatives)]
    assert torch.equal(seen[0], torch.cat(embedded))  # conditional, empty, each prompt's own negative
    seen.clear()
    pipe(prompts, negative_prompt="blue", num_steps=2, seed=3, guidance_scale=1.0)
    assert len(seen[0]) == 6  # at guidance 1 a negative prompt still acts: it is a term of its own


def test_a_negative_prompt_weighted_zero_changes_nothing(pipe, monkeypatch):
    forward = pipe.dit.forward  # the tiny model barely reads its text: make its prediction depend on it

    def reading(x, t, hidden, *rest, **kw):
        out = forward(x, t, hidden, *rest, **kw)
        ramp = torch.linspace(0, 1, out.shape[-1])  # along the last axis: masked logits move apart, not together
        return out + 30 * hidden.mean((1, 2)).view(-1, *[1] * (out.dim() - 1)) * ramp
    monkeypatch.setattr(pipe.dit, "forward", reading)
    text, null, negative = (pipe.text_encoder(p) for p in (["a red circle", "a green square"], [""], ["blue", "red"]))
    options = pipe.options(num_steps=3, seed=2, guidance_scale=3.0, negative_guidance_scale=0.0)
    plain = pipe.generate(text, null, options)  # two branches
    assert torch.allclose(pipe.generate(text, null, options, negative=negative), plain, atol=1e-4)  # three
    pushed = pipe.generate(text, null, replace(options, negative_guidance=1.0), negative=negative)
    assert not torch.allclose(pushed, plain, atol=1e-2)


def test_batching_and_sharding_do_not_change_an_edited_image(pipe):
    prompts = ["a red circle", "a small blue square in the bottom right", "a green triangle"]
    images = [picture(seed=i) for i in range(3)]
    masks = [mask_of((0, 0, 16, 16)), mask_of((16, 0, 32, 32)), mask_of((4, 4, 28, 28))]
    a = pipe(prompts, image=images, mask_image=masks, num_steps=3, seed=2)
    b = pipe(prompts, image=images, mask_image=masks, num_steps=3, seed=2, batch_size=2)
    assert [im.tobytes() for im in a] == [im.tobytes() for im in b]
    edit = Edit.prepare(1, R, images[2:], masks[2:])  # the third prompt alone, as a shard starting at index 2
    alone = pipe.generate(pipe.text_encoder(prompts[2:]), pipe.text_encoder([""]), pipe.options(num_steps=3, seed=2),
                          first_index=2, edit=edit)
    assert torch.equal(to_uint8(alone)[0], from_pil(a[2]))


def test_image_to_image_takes_any_size_and_mode(pipe):
    out = pipe(["a red circle"], image=picture(50, 40).convert("L"), strength=0.3, num_steps=4)
    assert out[0].size == (R, R)


def test_a_latent_cell_is_repainted_when_any_of_its_pixels_is_white():
    mask = mask_of((9, 13, 10, 14))  # one white pixel, in the cell (row 3, column 2) of 4x4-pixel cells
    cells = Edit.prepare(1, R, picture(), mask).cells(8)[0]
    assert cells.sum() == 1 and cells[3, 2]
    big = Edit.prepare(1, R, picture(64, 64), mask_of((18, 26, 20, 28), (64, 64))).cells(8)[0]
    assert big.sum() == 1 and big[3, 2]  # the mask is resized with the image


def test_outpainting_places_the_image_on_a_larger_canvas_and_paints_the_border(pipe):
    image = picture(16, 16, seed=5)
    canvas, mask = outpaint(image, left=8, top=8, right=8, bottom=8)
    assert canvas.size == mask.size == (32, 32)
    assert np.array(mask)[8:24, 8:24].max() == 0 and np.array(mask)[:8].min() == 255
    out = pipe(["a red circle"], image=canvas, mask_image=mask, num_steps=3)[0]
    assert np.array_equal(np.array(out)[8:24, 8:24], np.array(image))  # the original, pasted back
    with pytest.raises(ValueError, match=r"left=-1; accepted: a whole number of pixels >= 0"):
        outpaint(image, left=-1)


@pytest.mark.parametrize("kwargs,message", [
    (dict(mask_image=mask_of()), r"mask_image was given without image; accepted: mask_image with the image"),
    (dict(image=picture(), strength=0), r"strength=0; accepted: a number in \(0, 1\]"),
    (dict(image=picture(), strength=1.5), r"strength=1.5; accepted: a number in \(0, 1\]"),
    (dict(strength=0.5), r"strength was given without image"),
    (dict(image=picture(), mask_image=mask_of(size=(32, 16))), r"mask_image is 32x16 but the image is 32x32; "
                                                               r"accepted: a mask of the image's aspect ratio"),
    (dict(image=[picture()] * 3), r"image has 3 items for 2 prompts; accepted: a PIL image, or a list of one"),
    (dict(negative_prompt=["red"]), r"negative_prompt has 1 items for 2 prompts; accepted: a string, or a list"),
    (dict(negative_prompt="red", negative_guidance_scale=-1), r"negative_guidance_scale=-1; accepted: a finite "
                                                              r"number >= 0"),
    (dict(image=np.zeros((32, 32, 3))), r"image\[0\] is a ndarray; accepted: a PIL image"),
])
def test_bad_edit_arguments_get_one_clear_error(tiny_run, kwargs, message):
    pipe = TextToImagePipeline.from_pretrained(tiny_run)
    with pytest.raises((ValueError, TypeError), match=message):
        pipe(["a red circle", "a blue square"], num_steps=1, **kwargs)



@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_sample_cli_edits_and_heads_each_row_with_the_input_and_its_mask(tiny_run, tiny_masked_run, tmp_path,
                                                                          objective):
    picture(48, 48, seed=6).save(tmp_path / "in.png")
    mask_of((0, 0, 24, 48), (48, 48)).save(tmp_path / "mask.png")  # the left half: pixels 0..15 at 32x32
    out = sample_main(["--model", str(tiny_run if objective == "flow" else tiny_masked_run), "--prompt", "a red circle",
                       "--prompt", "a green square", "--num-images", "2", "--negative-prompt", "blue",
                       "--image", str(tmp_path / "in.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "2",
                       "--scale", "1", "--out", str(tmp_path / "grid.png")])
    grid, pad, cols = np.array(Image.open(out)), 2, 4  # input, mask, 2 samples
    assert grid.shape[0] == 2 * (R + pad) + pad
    left = grid.shape[1] - cols * (R + pad)  # the columns start right of the labels
    for row in range(2):
        y = pad + row * (R + pad)
        cells = [grid[y:y + R, left + j * (R + pad):left + j * (R + pad) + R] for j in range(cols)]
        given = prepare(Image.open(tmp_path / "in.png"), R).permute(1, 2, 0).numpy()
        assert np.array_equal(cells[0], given)
        assert (cells[1][:, :16] == 255).all() and (cells[1][:, 16:] == 0).all()
        for sample in cells[2:]:
            assert np.array_equal(sample[:, 16:], given[:, 16:])  # outside the mask: the input, pasted back
