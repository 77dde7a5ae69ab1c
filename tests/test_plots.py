"""The figures: the DiT's loss by noise level (mmdit/loss_bins.py, written by the tiny run's DiT stage) and the
guidance sweep of eval/eval.py (mmdit/sweep.py), with and without matplotlib."""
import json
import sys

import pytest
import torch

from mmdit.evaluate import cli, main as eval_main
from mmdit.loss_bins import LossByT, bin_sums
from mmdit.plots import Panel, save_panels
from mmdit.sweep import parse_guidance
from test_clip import make_tiny_open_clip  # tests/ is on sys.path (rootdir conftest)

LOSS = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
T = torch.tensor([0.0, 0.05, 0.15, 0.5, 0.99, 1.0])  # bins 0, 0, 1, 5, 9, 9 of 10 (t = 1 in the last)


def test_bin_sums_put_each_loss_in_its_tenth_of_t():
    sums, counts = bin_sums(LOSS, T)
    assert counts.tolist() == [2, 1, 0, 0, 0, 1, 0, 0, 0, 2]
    assert sums.tolist() == [4.0, 5.0, 0, 0, 0, 7.0, 0, 0, 0, 20.0]


def test_loss_by_t_means_since_the_last_read_and_leaves_out_empty_bins():
    by_t = LossByT(torch.device("cpu"))
    by_t.add(LOSS[:3], T[:3])
    by_t.add(LOSS[3:], T[3:])
    assert by_t.read(5) == {"loss_by_t/bin_00": 2.0, "loss_by_t/bin_01": 5.0, "loss_by_t/bin_05": 7.0,
                            "loss_by_t/bin_09": 10.0}
    by_t.add(torch.tensor([4.0]), torch.tensor([0.31]))
    assert by_t.read(10) == {"loss_by_t/bin_03": 4.0}  # a new window: the first one's samples are gone
    assert [h["step"] for h in by_t.history] == [5, 10] and by_t.history[1]["count"][3] == 1
    assert by_t.history[1]["mean"][0] is None


def test_loss_by_t_sums_over_processes_before_dividing():
    """Two processes' trackers, their sums added as accelerator.reduce(x, "sum") would: the means of all samples,
    not the mean of the two processes' means."""
    ranks = [LossByT(torch.device("cpu")) for _ in range(2)]
    ranks[0].add(LOSS[:2], T[:2])  # bin 0: 1, 3
    ranks[1].add(torch.tensor([8.0]), torch.tensor([0.02]))  # bin 0: 8
    other = {id(ranks[0].sums): ranks[1].sums, id(ranks[0].counts): ranks[1].counts}
    assert ranks[0].read(1, reduce=lambda x: x + other[id(x)]) == {"loss_by_t/bin_00": 4.0}
    assert ranks[0].history[0]["count"][0] == 3


def test_loss_by_t_writes_json_and_png_and_only_json_without_matplotlib(tmp_path, monkeypatch, caplog):
    by_t = LossByT(torch.device("cpu"), axis="mask ratio")
    for step in (1, 2, 3):
        by_t.add(LOSS / step, T)
        by_t.read(step)
    path, png = by_t.save(tmp_path / "a", "masked")
    record = json.loads(path.read_text())
    assert record["axis"] == "mask ratio" and record["bins"] == 10 and len(record["edges"]) == 11
    assert [h["step"] for h in record["history"]] == [1, 2, 3] and png.stat().st_size > 1000

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed: import raises ImportError
    path, png = by_t.save(tmp_path / "b", "masked")
    assert path.is_file() and png is None and not (tmp_path / "b" / "loss_by_t.png").exists()
    assert "matplotlib is not installed" in caplog.text
    assert save_panels([Panel("p", "x", "y", [1, 2], {"a": [1, None]})], tmp_path / "c.png") is None


@pytest.mark.parametrize("fixture, objective, axis", [("tiny_run", "flow", "t"),
                                                     ("tiny_masked_run", "masked", "mask ratio")])
def test_the_dit_stage_writes_its_loss_by_t(request, fixture, objective, axis):
    tiny_run = request.getfixturevalue(fixture)
    record = json.loads((tiny_run / "dit" / "loss_by_t.json").read_text())
    assert record["objective"] == objective and record["axis"] == axis
    # tiny_args: 10 steps of 8, logged every 5: two windows of 40 samples each.
    assert [h["step"] for h in record["history"]] == [5, 10]
    assert all(sum(h["count"]) == 40 for h in record["history"])
    assert all((m is None) == (c == 0) for h in record["history"] for m, c in zip(h["mean"], h["count"]))
    assert all(m > 0 for h in record["history"] for m in h["mean"] if m is not None)
    assert (tiny_run / "dit" / "loss_by_t.png").stat().st_size > 1000


@pytest.mark.parametrize("text, expected", [("4", (4.0, None)), (" 1, 2.5 ", (None, [1.0, 2.5])), (None, (None, None))])
def test_guidance_is_one_scale_or_a_list(text, expected):
    assert parse_guidance(text) == expected


@pytest.mark.parametrize("text, problem", [("1,,x", "an empty item"), ("1,x", "'x' is not a number"),
                                           ("1,-2", "'-2' is not a number"), ("1,nan", "'nan' is not a number"),
                                           ("2,2", "repeated"), ("x", "'x' is not a number")])
def test_a_bad_guidance_list_is_one_line_naming_what_is_accepted(tiny_run, tmp_path, capsys, text, problem):
    code = cli(["--model", str(tiny_run), "--out", str(tmp_path), "--guidance", text])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and problem in err
    assert "accepted: a finite number >= 0" in err and "comma-separated list" in err


def test_a_guidance_sweep_reports_each_scale_as_its_own_eval_would(tiny_run, tmp_path_factory, tmp_path,
                                                                   single_thread):
    clip_dir = tmp_path_factory.mktemp("clip-sweep")
    make_tiny_open_clip(clip_dir)
    argv = ["--model", str(tiny_run), "--metrics", "composition,clip,fid", "--num-samples", "6",
            "--batch-size", "4", "--clip-model", str(clip_dir), "--fid-features", "clip",
            "--cache-dir", str(tmp_path / "cache")]
    report = eval_main([*argv, "--out", str(tmp_path / "sweep"), "--guidance", "1,4"])
    assert report["protocol"]["guidance"] == [1.0, 4.0] and set(report["sweep"]) == {"1", "4"}
    for g in ("1", "4"):
        alone = eval_main([*argv, "--out", str(tmp_path / f"alone-{g}"), "--guidance", g])
        assert alone["protocol"]["guidance"] == float(g)
        for section in ("composition", "clip"):
            assert report["sweep"][g][section] == alone[section], (g, section)
        # FID: the reference statistics computed once, then read from the cache (the sweep's scales, `alone`)
        fid = report["sweep"][g]["fid"]["samples_vs_reference"]
        assert fid == pytest.approx(alone["fid"]["samples_vs_reference"], rel=1e-9)
        saved = json.loads((tmp_path / "sweep" / f"guidance-{g}" / "report.json").read_text())
        assert saved["composition"] == alone["composition"] and saved["protocol"]["guidance"] == float(g)
    headline = report["headline"]["4"]
    assert set(headline) == {"composition all-four", "CLIP score / ceiling", "FID"}
    assert headline["FID"]["samples vs reference"] == report["sweep"]["4"]["fid"]["samples_vs_reference"]
    assert json.loads((tmp_path / "sweep" / "report.json").read_text()) == json.loads(json.dumps(report))
    table = (tmp_path / "sweep" / "report.md").read_text()
    # A column per headline number; composition split in seen / held out when the caption set has both.
    assert "| guidance | composition all-four" in table and "| CLIP score / ceiling | FID |\n|---|" in table
    assert "\n| 1 | " in table and "\n| 4 | " in table and "guidance.png" in table
    assert (tmp_path / "sweep" / "guidance.png").stat().st_size > 1000
    assert (tmp_path / "sweep" / "guidance-1" / "samples.png").is_file()
