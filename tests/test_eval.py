import json

import pytest

from eval.eval import main as eval_main


def test_eval_composition_report(tiny_run, tmp_path):
    report = eval_main(["--model", str(tiny_run), "--num-samples", "6", "--steps", "2", "--out", str(tmp_path)])
    comp = report["composition"]
    assert comp["n"] == 6
    assert set(comp["all_captions"]) == {"shape", "color", "position", "size", "all"}
    assert all(0.0 <= v <= 1.0 for v in comp["all_captions"].values())
    assert sum(comp[k]["n"] for k in ("seen", "held_out") if k in comp) == 6
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["protocol"]["num_samples"] == 6 and saved["protocol"]["steps"] == 2
    assert "Compositional accuracy" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "samples.png").is_file()


def test_eval_rejects_unknown_metric(tiny_run, tmp_path):
    with pytest.raises(SystemExit):
        eval_main(["--model", str(tiny_run), "--metrics", "fid,bogus", "--out", str(tmp_path)])
