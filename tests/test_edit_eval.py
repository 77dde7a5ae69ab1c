"""`eval/eval.py --metrics edit` (mmdit/edit_eval.py): the tasks' prompts, masks and paste rule on rendered shapes,
the scores on images whose verdicts are known, sharding, the refusals, and the whole eval on both tiny runs."""
import json
import math
import shutil

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from mmdit.data.shapes import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES, caption_for, judge, sample_examples
from mmdit.edit_eval import (GRID_ROWS, LAYOUT, RECOLOUR_STRENGTH, colourless_caption, generations, margin_px,
                             pasted, psnr_outside, score)
from mmdit.evaluate import cli, generate, main as eval_main, merge
from mmdit.pipeline import TextToImagePipeline
from mmdit.pixels import from_pil, to_float
from mmdit.vqvae import psnr

R = 32
MARGIN = margin_px(R)


@pytest.fixture(scope="module")
def shapes_rows():
    """8 rendered shapes images as the eval's caption set holds them: truth dicts and uint8 (8, 3, R, R)."""
    rows = sample_examples(8, size=R, seed=5)
    truth = [{k: r[k] for k in ("shape", "color", "position", "size", "holdout")} for r in rows]
    return truth, torch.stack([from_pil(r["image"]) for r in rows])


def perfect(images: torch.Tensor) -> float:
    """PSNR's finite cap: the score of identical images."""
    return psnr(to_float(images[:1]), to_float(images[:1])).item()


def by_name(gens):
    return {g.name: g for g in gens}


def colour_words(caption: str) -> list[str]:
    return [w.strip(",") for w in caption.split() if w.strip(",") in COLORS]


def test_recolour_names_another_colour_and_keeps_shape_size_position(shapes_rows):
    truth, real = shapes_rows
    gen = by_name(generations(truth, real, seed=0))["recolour"]
    assert gen.edit.strength == RECOLOUR_STRENGTH and gen.edit.repaint is None and torch.equal(gen.edit.images, real)
    for old, new, prompt in zip(truth, gen.truth, gen.prompts, strict=True):
        assert new["color"] != old["color"] and all(new[a] == old[a] for a in LAYOUT)
        assert colour_words(prompt) == [new["color"]] and prompt == caption_for(new)
    # Each row's choice depends on (seed, row) alone: not on N; another seed chooses otherwise somewhere.
    first = by_name(generations(truth[:3], real[:3], seed=0))["recolour"]
    assert first.prompts == gen.prompts[:3]
    assert by_name(generations(truth, real, seed=1))["recolour"].prompts != gen.prompts


def test_reshape_mask_is_the_objects_box_widened_and_the_prompt_changes_shape_and_colour(shapes_rows):
    truth, real = shapes_rows
    gen = by_name(generations(truth, real, seed=0))["reshape"]
    assert gen.edit.strength == 1.0 and not gen.edit.paste  # sampled raw, pasted when scored
    assert 1 <= MARGIN <= 4  # a few pixels at 32 px
    for old, new, prompt in zip(truth, gen.truth, gen.prompts, strict=True):
        assert new["shape"] != old["shape"] and new["color"] != old["color"]
        assert (new["position"], new["size"]) == (old["position"], old["size"])
        assert colour_words(prompt) == [new["color"]] and new["shape"] in prompt and old["shape"] not in prompt
    for image, mask in zip(real, gen.edit.repaint):
        obj = (image.permute(1, 2, 0).numpy() != BACKGROUND).any(-1)  # (R, R): the object, edge pixels included
        ys, xs = np.nonzero(obj)
        box = np.zeros((R, R), bool)
        box[max(ys.min() - MARGIN, 0):ys.max() + MARGIN + 1, max(xs.min() - MARGIN, 0):xs.max() + MARGIN + 1] = True
        assert np.array_equal(mask.numpy(), box) and mask.numpy()[obj].all()


def test_paste_keeps_every_input_pixel_outside_the_mask_and_psnr_reads_only_those(shapes_rows):
    truth, real = shapes_rows
    gen = by_name(generations(truth, real, seed=0))["reshape"]
    raw = torch.randint(0, 256, real.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    out, inside = pasted(gen, raw), gen.edit.repaint[:, None].expand_as(real)
    assert torch.equal(out[~inside], real[~inside]) and torch.equal(out[inside], raw[inside])
    # Only the pixels outside the mask count: garbage inside it leaves a perfect score (psnr's cap, identical images).
    assert psnr_outside(out, real, gen.edit.repaint) == pytest.approx(perfect(real))
    assert psnr_outside(raw, real, gen.edit.repaint) < 20
    nothing = torch.zeros(len(real), R, R, dtype=torch.bool)  # no mask: the whole images' PSNR
    assert psnr_outside(raw, real, nothing) == pytest.approx(psnr(to_float(real), to_float(raw)).mean().item())


def test_a_colourless_caption_names_shape_size_and_position_and_no_colour(shapes_rows):
    for shape in SHAPES:
        for position in POSITIONS:
            for size in SIZES:
                caption = colourless_caption({"shape": shape, "color": "red", "position": position, "size": size})
                assert colour_words(caption) == [] and "  " not in caption
                assert shape in caption and size in caption.split() and position.split()[-1] in caption
    truth, real = shapes_rows
    gens = by_name(generations(truth, real, seed=0))
    plain, negative = gens["colourless"], gens["negative"]
    assert plain.prompts == negative.prompts == [colourless_caption(t) for t in truth]
    assert plain.negatives is None and plain.edit is None and negative.edit is None
    assert len(negative.negatives) == len(truth) and set(negative.negatives) <= set(COLORS)
    assert len(set(negative.negatives)) > 1  # chosen per prompt


def test_scores_of_images_whose_verdicts_are_known(tiny_run, shapes_rows):
    """The real images themselves as every output: the judge reads them right, so each number is known."""
    truth, real = shapes_rows
    assert all({a: judge(im)[a] for a in LAYOUT + ("color",)} == {a: t[a] for a in LAYOUT + ("color",)}
               for im, t in zip(real.permute(0, 2, 3, 1).numpy(), truth))
    gens = generations(truth, real, seed=0)
    vqvae = TextToImagePipeline.from_pretrained(tiny_run).vqvae
    report = score(gens, {g.name: real for g in gens}, vqvae, "flow", 1.0)
    recolour, reshape, negative = report["recolour"], report["reshape"], report["negative_prompt"]
    assert (recolour["color"], recolour["shape"], recolour["position"], recolour["size"]) == (0.0, 1.0, 1.0, 1.0)
    assert (reshape["shape"], reshape["color"], reshape["all"]) == (0.0, 0.0, 0.0) and reshape["size"] == 1.0
    assert reshape["psnr_outside_mask_db"] == pytest.approx(perfect(real))
    assert 0 < reshape["reconstruction_psnr_outside_mask_db"] < perfect(real) and 0 < reshape["mask_share"] < 1
    not_negative = sum(t["color"] != c for t, c in zip(truth, by_name(gens)["negative"].negatives)) / len(truth)
    for row in negative.values():
        assert row["not_negative_color"] == pytest.approx(not_negative) and row["shape_size_position"] == 1.0


def test_edits_and_negative_prompts_sample_as_the_pipeline_does_on_any_number_of_processes(tiny_run, shapes_rows,
                                                                                          single_thread):
    truth, real = shapes_rows
    truth, real = truth[:5], real[:5]
    pipe = TextToImagePipeline.from_pretrained(tiny_run)
    options = pipe.options(num_steps=2, guidance_scale=4.0, seed=3)
    gens = by_name(generations(truth, real, seed=3))
    for gen in (gens["reshape"], gens["negative"]):
        kwargs = dict(edit=gen.edit, negatives=gen.negatives)
        whole = merge(generate(pipe, gen.prompts, options, 2, **kwargs))
        parts = [p for rank in range(2) for p in generate(pipe, gen.prompts, options, 2, rank, 2, **kwargs)]
        assert torch.equal(merge(parts), whole)
        pil = [Image.fromarray(a) for a in real.permute(0, 2, 3, 1).numpy()]
        masks = None if gen.edit is None else [Image.fromarray(m.numpy().astype(np.uint8) * 255)
                                               for m in gen.edit.repaint]
        expected = pipe(gen.prompts, negative_prompt=gen.negatives, image=pil if gen.edit else None,
                        mask_image=masks, num_steps=2, guidance_scale=4.0, seed=3, paste_unmasked=False)
        assert torch.equal(whole, torch.stack([from_pil(im) for im in expected]))


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_eval_edit_end_to_end(objective, tiny_run, tiny_masked_run, tmp_path, single_thread):
    run = tiny_run if objective == "flow" else tiny_masked_run
    report = eval_main(["--model", str(run), "--metrics", "edit", "--num-samples", "4", "--batch-size", "3",
                        "--out", str(tmp_path)])
    edit = report["edit"]
    assert edit["objective"] == report["protocol"]["objective"] == objective and edit["n"] == 4
    assert edit["protocol"]["reshape_mask"] and edit["sampling_seconds"] >= 0
    for task in ("recolour", "reshape"):
        assert set(edit[task]) >= {"shape", "color", "position", "size", "all", "strength"}
        assert all(0 <= edit[task][k] <= 1 for k in ("shape", "color", "position", "size", "all"))
    assert edit["recolour"]["strength"] == RECOLOUR_STRENGTH and edit["reshape"]["mask_margin_px"] == MARGIN
    for key in ("psnr_outside_mask_db", "reconstruction_psnr_outside_mask_db"):
        assert math.isfinite(edit["reshape"][key]) and edit["reshape"][key] > 0
    assert set(edit["negative_prompt"]) == {"without", "with"}
    for row in edit["negative_prompt"].values():
        assert set(row) == {"not_negative_color", *LAYOUT, "shape_size_position"}
        assert all(0 <= v <= 1 for v in row.values())
    assert json.loads((tmp_path / "report.json").read_text())["edit"] == json.loads(json.dumps(edit))
    text = (tmp_path / "report.md").read_text()
    assert f"## Editing ({objective} objective" in text and "not that colour" in text
    grid = Image.open(tmp_path / "edit.png")
    assert grid.height == 3 * min(GRID_ROWS, 4) * (2 * R + 2) + 2  # three tasks, 4 rows each (save_grid's layout)


def test_edit_needs_a_shapes_run_and_the_splits_images(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["name"] = "someone/photos"
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli(["--model", str(run), "--metrics", "composition,edit", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: --metrics edit needs a shapes run (its judge reads the edits); this run's data is "
                   "'someone/photos'")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n")
    assert cli(["--model", str(tiny_run), "--metrics", "edit", "--prompts", str(prompts),
                "--out", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err.strip()
    assert "--metrics edit edits the real images of --split" in err and "\n" not in err
