"""mmdit.geneval: the prompt set, GenEval's scoring on images with known verdicts, grids, refusals, and a tiny
scenes run trained and evaluated end to end (data.name=scenes, --metrics geneval)."""
import json

import numpy as np
import pytest
import torch

from mmdit import geneval
from mmdit.evaluate import EvalError, check_run
from mmdit.data import scenes
from mmdit.data.shapes import BACKGROUND
from conftest import TINY

HOLDOUT = list(scenes.DEFAULT_HOLDOUT)


@pytest.fixture(scope="module")
def prompts():
    return geneval.prompt_set(72, 48, HOLDOUT)


def test_prompt_set_halves_seen_and_held_out_and_takes_turns(prompts):
    seen = [r for r in prompts.rows if not r["holdout"]]
    held = [r for r in prompts.rows if r["holdout"]]
    assert len(seen) == len(held) == 36 and prompts.real.shape == (72, 3, 48, 48)
    assert [r["task"] for r in seen] == scenes.TASKS * 6
    assert [r["holdout"] for r in held] == HOLDOUT * 12
    parsed = [scenes.parse_holdout(h) for h in HOLDOUT]
    assert not any(scenes.matches_holdout(r["spec"], r["objects"], parsed) for r in seen)
    for r in held:
        assert scenes.matches_holdout(r["spec"], r["objects"], [scenes.parse_holdout(r["holdout"])])
    assert {r["task"] for r in held if r["holdout"] == "three squares"} == {"counting"}
    assert {r["task"] for r in held if r["holdout"] == "circle above triangle"} == {"position"}
    assert len({r["task"] for r in held if r["holdout"] == "yellow triangle"}) == 6
    # Fixed prompts: the same set again, a smaller N a prefix of each half; nothing held out -> all seen.
    assert geneval.prompt_set(72, 48, HOLDOUT).captions == prompts.captions
    small = geneval.prompt_set(12, 48, HOLDOUT)
    assert small.captions[:6] == prompts.captions[:6] and small.captions[6:] == prompts.captions[36:42]
    assert not any(r["holdout"] for r in geneval.prompt_set(6, 48, []).rows)


def test_scores_of_images_with_known_verdicts(prompts, tmp_path):
    perfect = geneval.score(prompts, prompts.real)
    assert perfect["seen"]["overall"] == perfect["seen"]["ceiling_overall"] == 1.0
    assert perfect["held_out"]["overall"] == 1.0 and set(perfect["held_out"]["holdout"]) == set(HOLDOUT)
    # Counting prompts drawn as empty backgrounds: that task fails, the other five hold.
    images = prompts.real.clone()
    counting = [i for i, r in enumerate(prompts.rows) if r["task"] == "counting"]
    images[counting] = torch.tensor(BACKGROUND, dtype=torch.uint8)[:, None, None]
    report = geneval.score(prompts, images)
    assert report["seen"]["task"]["counting"]["accuracy"] == 0.0
    assert report["seen"]["task"]["counting"]["ceiling"] == 1.0
    assert report["seen"]["overall"] == pytest.approx(5 / 6)
    assert report["held_out"]["holdout"]["three squares"]["accuracy"] == 0.0
    # Held-out overall weighs each phrase the same: yellow triangle loses only its counting prompts.
    yt = [r for r in prompts.rows if r["holdout"] == "yellow triangle"]
    yt_ok = sum(r["task"] != "counting" for r in yt) / len(yt)
    assert report["held_out"]["overall"] == pytest.approx((yt_ok + 0 + 1) / 3)
    paths = geneval.save_grids(prompts, images, tmp_path)
    assert {p.name for p in paths} == {f"geneval-{t}.png" for t in scenes.TASKS} | {"geneval-held-out.png"}
    text = "\n".join(geneval.markdown(report))
    assert "83.3%" in text and "| counting | 6 | 0.0% | 100.0% |" in text and "geneval-held-out.png" in text


def test_binding_swapped_colours_fail_color_attr():
    rng = np.random.default_rng(0)
    row = scenes.draw_row(rng, "color_attr", 64, lambda spec, objects: True)
    a, b = row["objects"]
    swapped = [dict(a, color=b["color"]), dict(b, color=a["color"])]
    assert scenes.score(row["spec"], scenes.judge_scene(row["image"]))
    assert not scenes.score(row["spec"], scenes.judge_scene(scenes.render_scene(swapped, 64)))


def test_geneval_needs_a_scenes_run_without_prompts():
    with pytest.raises(EvalError, match=r"^--metrics geneval needs a scenes run \(.*\); this run's data is 'shapes'$"):
        check_run(["composition", "geneval"], "shapes", None)
    with pytest.raises(EvalError, match="draws its own prompts, so it takes no --prompts"):
        check_run(["geneval"], "scenes", "p.txt")
    check_run(["composition"], "shapes", None)  # nothing asked of it


def test_a_tiny_scenes_run_trains_and_is_evaluated(tmp_path, single_thread):
    from mmdit.evaluate import main as eval_main
    from train.train import main as train_main

    run = tmp_path / "run"
    train_main(["--config", "configs/scenes-64.yaml", f"data.path={tmp_path}/data", f"train.output_dir={run}",
                f"train.cache_dir={tmp_path}/cache", *TINY, "data.resolution=32", "dit.patch_size=2"])
    info = json.loads((tmp_path / "data" / "scenes.json").read_text())
    assert info["holdout"] == ["yellow triangle"] and info["size"] == 32
    judged = json.loads((run / "vqvae" / "metrics.json").read_text())["judge"]
    assert set(judged) == {"exact", "score"} and 0 <= judged["score"] <= 1
    report = eval_main(["--model", str(run), "--metrics", "geneval", "--num-samples", "12", "--batch-size", "6",
                        "--out", str(tmp_path / "eval")])
    section = report["geneval"]
    assert section["seen"]["n"] == section["held_out"]["n"] == 6
    assert section["seen"]["ceiling_overall"] == 1.0 and 0 <= section["seen"]["overall"] <= 1
    assert "composition" not in report and not (tmp_path / "eval" / "samples.png").exists()  # nothing else sampled
    assert (tmp_path / "eval" / "geneval-held-out.png").is_file()
    assert "## GenEval tasks" in (tmp_path / "eval" / "report.md").read_text()
