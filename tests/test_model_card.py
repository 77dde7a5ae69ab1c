import json
import shutil

import yaml

from mmdit.evaluate import main as eval_main
from mmdit.model_card import data_license, refresh_model_card, training_summary, write_model_card


def front_matter(path):
    text = path.read_text()
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---", 2)[1]), text


def card_copy(run, dest):
    """The files a card reads, without the weights' checkpoints: cheap to copy, free to change."""
    for name in ("config.yaml", "pipeline.json", "samples.png", "training.json", "dit/model/config.json",
                 "vqvae/model/config.json", "dit/precision.json"):
        if (run / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(run / name, dest / name)
    return dest


def test_export_writes_a_hub_model_card_and_the_training_record(tiny_run):
    front, text = front_matter(tiny_run / "README.md")
    assert front["library_name"] == "mmdit" and front["pipeline_tag"] == "text-to-image"
    assert front["license"] == "apache-2.0"  # shapes: drawn by mmdit, no third-party licence
    assert {"text-to-image", "rectified-flow", "cross-attention"} <= set(front["tags"])
    training = json.loads((tiny_run / "training.json").read_text())
    assert training["seconds"] > 0 and ("CPU" in training["hardware"] or "x" in training["hardware"])
    for says in ("`flow`: rectified flow", "width 32, depth 2", "32x32", "VQ-VAE, 32 codes of dimension 4",
                 "shapes (synthetic)", "10 DiT steps", "![samples](samples.png)", "from_pretrained(",
                 training["hardware"]):
        assert says in text, says


def test_masked_run_card_names_its_objective(tiny_masked_run):
    front, text = front_matter(tiny_masked_run / "README.md")
    assert "maskgit" in front["tags"] and "`masked`: masked-token generation" in text
    assert training_summary(tiny_masked_run).startswith("masked objective, cross DiT (width 32, depth 2), 32x32 px")


def test_eval_report_refreshes_the_card(tiny_run, tmp_path, single_thread):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    write_model_card(run)
    assert "Not evaluated yet" in (run / "README.md").read_text()
    eval_main(["--model", str(run), "--metrics", "composition", "--num-samples", "4", "--steps", "1",
               "--out", str(run / "eval")])
    _, text = front_matter(run / "README.md")
    report = json.loads((run / "eval" / "report.json").read_text())
    shown = f"{100 * report['composition']['all_captions']['all']:.1f}%"
    assert "**eval/report.md**: 4 samples, 1 euler steps" in text
    assert f"| composition, all four attributes right (all_captions) | {shown} |" in text
    write_model_card(run)  # regenerated whole: the report in RUN/eval/ is found again
    assert (run / "README.md").read_text() == text


def test_reports_of_other_runs_and_non_runs_are_left_out(tiny_run, tmp_path):
    run = card_copy(tiny_run, tmp_path / "run")
    (run / "eval").mkdir()
    other = {"protocol": {"model": str(tmp_path / "elsewhere"), "num_samples": 9}, "composition": {}}
    (run / "eval" / "report.json").write_text(json.dumps(other))
    write_model_card(run)
    assert "Not evaluated yet" in (run / "README.md").read_text()
    assert refresh_model_card(tmp_path, run / "eval" / "report.json") is None  # not an exported run: no card
    assert not (tmp_path / "README.md").exists()


def test_data_licence_comes_from_a_local_dataset_card(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: cc-by-sa-4.0\n---\n# emoji\n")
    licence, says = data_license({"data": {"name": str(tmp_path)}})
    assert licence == "cc-by-sa-4.0" and "cc-by-sa-4.0" in says
    assert data_license({"data": {"name": "user/some-hub-dataset"}})[0] is None
