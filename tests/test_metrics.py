"""mmdit.metrics: FID on Inception-v3 (random weights in a local file) and CLIP features, the reference cache,
the CLIP score formula, reconstruction PSNR. Tiny, CPU, offline."""
import math
from argparse import Namespace

import pytest
import torch
from safetensors.torch import save_file

from mmdit.clip import load_clip
from mmdit.metrics import (FID, MetricError, add_noise, clip_cosines, clip_extractor, clip_score, inception_extractor,
                           retrieval_top1)
from test_clip import make_tiny_open_clip  # tests/ is on sys.path (rootdir conftest)


def structured_images(n=24, seed=0):
    """Flat backgrounds with a coloured square: a set with real structure, not uniform noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 3, 32, 32), 128, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(0, 20, (2,), generator=g).tolist()
        x[i, :, r:r + 12, c:c + 12] = torch.randint(0, 256, (3, 1, 1), generator=g, dtype=torch.uint8)
    return x


@pytest.fixture(scope="module")
def inception_file(tmp_path_factory):
    """torchmetrics' / torch-fidelity's Inception-v3 architecture with random weights, saved to a local file."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:  # build the architecture without fetching the real weights
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, state: None)
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "inception.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    directory = tmp_path_factory.mktemp("clip")
    make_tiny_open_clip(directory)
    return load_clip(str(directory))


def check_fid(extractor, info, tmp_path, n=24):
    fid = FID(extractor, info, batch_size=8)
    real = structured_images(n)
    fid.set_reference(real, {"dataset": "test"}, tmp_path)
    itself, light, heavy = fid(real), fid(add_noise(real, 16)), fid(add_noise(real, 64))
    assert abs(itself) < 1e-3 * light, (itself, light)  # the same set: ~0 (float64 round-off)
    assert light < heavy, (light, heavy)  # more noise, further from the reference


def test_inception_fid_from_a_local_weights_file(inception_file, tmp_path, single_thread):
    # 64-d features (the first block): the layer is chosen by torchmetrics; 2048-d costs seconds per eigensolve.
    extractor, info = inception_extractor(inception_file, dims=64)
    assert info["extractor"] == "inception-v3-64" and info["input_size"] == 299 and "TensorFlow" in info["resize"]
    check_fid(extractor, info, tmp_path, n=10)  # each image runs at 299x299


def test_inception_weights_as_pth_load_without_unpickling_code(inception_file, tmp_path):
    from safetensors.torch import load_file

    good = tmp_path / "inception.pth"
    torch.save(load_file(str(inception_file)), good)  # a plain state dict, as torch-fidelity ships it
    assert inception_extractor(good, dims=64)[1]["weights_id"]
    evil = tmp_path / "evil.pth"
    torch.save({"Conv2d_1a_3x3.conv.weight": torch.zeros(1), "payload": Namespace()}, evil)  # any class: code
    with pytest.raises(MetricError, match="cannot read it"):
        inception_extractor(evil, dims=64)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"w": torch.zeros(2)}, str(wrong))
    with pytest.raises(MetricError, match="not torch-fidelity's Inception-v3"):
        inception_extractor(wrong, dims=64)


def test_missing_inception_weights_offline_fail_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty hub cache; conftest sets HF_HUB_OFFLINE=1
    with pytest.raises(MetricError, match="--inception-weights FILE"):
        inception_extractor(None)
    with pytest.raises(MetricError, match="no such file"):
        inception_extractor(tmp_path / "nope.pth")


def test_clip_feature_fid_and_reference_cache(tiny_clip, tmp_path, single_thread):
    extractor, info = clip_extractor(tiny_clip)
    assert info["in_domain"] and "in-domain" in info["label"]
    check_fid(extractor, info, tmp_path)

    real, fake = structured_images(), add_noise(structured_images(), 32)
    first = FID(extractor, info)
    miss = first.set_reference(real, {"dataset": "test"}, tmp_path / "cache")
    second = FID(extractor, info)
    hit = second.set_reference(real, {"dataset": "test"}, tmp_path / "cache")
    assert not miss["from_cache"] and hit["from_cache"] and hit["cache_file"] == miss["cache_file"]
    assert math.isclose(first(fake), second(fake), rel_tol=1e-9)
    other = FID(extractor, info).set_reference(real[:20], {"dataset": "test"}, tmp_path / "cache")
    assert not other["from_cache"] and other["n"] == 20  # another N (or other images) is another entry


def test_clip_score_is_the_hand_computation(tiny_clip, single_thread):
    x, captions = structured_images(3), ["a red square", "a blue circle", "a small green triangle"]
    cos = clip_cosines(tiny_clip, x, captions, batch_size=2)
    with torch.no_grad():
        image, text = tiny_clip.encode_image(x).tolist(), tiny_clip.encode_text(captions).tolist()
    for i in range(3):
        dot = sum(a * b for a, b in zip(image[i], text[i]))
        norms = math.sqrt(sum(a * a for a in image[i])) * math.sqrt(sum(b * b for b in text[i]))
        assert math.isclose(cos[i].item(), dot / norms, abs_tol=1e-5)
    # 100 * max(cos, 0) per pair, averaged; torchmetrics' CLIPScore clamps the mean instead.
    scores = clip_score(torch.tensor([0.5, -0.2, 0.1]))
    assert math.isclose(scores["clip_score"], 100 * (0.5 + 0 + 0.1) / 3, rel_tol=1e-6)
    assert math.isclose(scores["torchmetrics_clip_score"], 100 * 0.4 / 3, rel_tol=1e-6)
    assert clip_score(torch.tensor([-0.3, -0.1]))["torchmetrics_clip_score"] == 0.0


def test_retrieval_top1_is_the_hand_computation(tiny_clip, single_thread):
    x = structured_images(5)
    captions = ["a red square", "a blue circle", "a red square", "a green triangle", "a small blue circle"]
    distinct = ["a red square", "a blue circle", "a green triangle", "a small blue circle"]
    with torch.no_grad():
        image = torch.nn.functional.normalize(tiny_clip.encode_image(x), dim=-1)
        text = torch.nn.functional.normalize(tiny_clip.encode_text(distinct), dim=-1)
    best = (image @ text.T).argmax(-1).tolist()
    expected = sum(distinct[b] == c for b, c in zip(best, captions)) / 5
    assert retrieval_top1(tiny_clip, x, captions, batch_size=2) == pytest.approx(expected)
