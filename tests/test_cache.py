"""The sharded, memory-mapped caches (mmdit/shards.py, mmdit/latents.py): built by several processes or one alike,
resumed after a kill, damaged shards reported and rebuilt, another producer's cache refused, rows read through the
maps into the same DiT batches as from memory. The caption cache's own tests are in test_text_encoder.py."""
import io
import json
import random
import shutil

import datasets
import pytest
import torch
from PIL import Image

from mmdit import latents
from mmdit.config import DiTTrainConfig
from mmdit.data import DataConfig
from mmdit.data.loader import ImageCaptions, pick_caption
from mmdit.data.stream import fill_stream
from mmdit.shards import CacheError, ShardStore
from mmdit.stages.dit import DiTBatches
from mmdit.vqvae import VQVAE, VQVAEConfig

WORDS = ["red", "blue", "green", "circle", "square"]


class FakeCaptionCache:
    """What the latent cache reads of a CaptionCache: its key and the row of each caption."""
    meta = {"encoder": "fake", "max_length": 3, "dim": 6}
    store = type("Store", (), {"instance": lambda self: "cache-1"})()

    def __init__(self):
        self.captions = [""] + [f"{a} {b}" for a in WORDS for b in WORDS]
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(len(self.captions), 3, 6, generator=g).bfloat16()
        self.pooled = torch.randn(len(self.captions), 6, generator=g)

    def rows(self, captions):
        return torch.tensor([self.captions.index(c) for c in captions], dtype=torch.long)

    lookup = rows

    def text(self, rows):
        return {"hidden": self.hidden[rows].float(), "mask": torch.ones(len(rows), 3, dtype=torch.bool),
                "pooled": self.pooled[rows]}


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    vqvae = VQVAE(VQVAEConfig(channels=8, channel_mult=[1, 2], codebook_size=16, code_dim=4)).eval()
    rng = random.Random(0)
    n = 50
    captions = [[f"{rng.choice(WORDS)} {rng.choice(WORDS)}" for _ in range(1 + i % 3)] for i in range(n)]
    data = ImageCaptions(torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8), captions, {"i": list(range(n))})
    return vqvae, data, FakeCaptionCache()


def build(root, setup, ranks=(0,), world=1, vqvae_id="v1"):
    """The latent cache of `setup`'s split in root/train, the shards of `ranks` of `world` processes."""
    vqvae, data, cache = setup
    key = latents.split_key(vqvae_id, cache, "train", len(data), 3)
    store = ShardStore(root / "train", key, latents.split_columns(4, 3), reset=True)
    encoded = sum(latents.fill_split(vqvae, data, store, cache, rank, world, shard_rows=8) for rank in ranks)
    store.set_meta(rows=len(data))
    return encoded


def files(root):
    return {p.name: p.read_bytes() for p in sorted((root / "train").iterdir())}


def test_a_cache_built_by_two_processes_equals_one_built_by_one(setup, tmp_path):
    assert build(tmp_path / "one", setup) == 7  # 50 rows in shards of 8
    build(tmp_path / "two", setup, ranks=[1], world=2)  # each process alone: rank 1 first, then rank 0
    build(tmp_path / "two", setup, ranks=[0], world=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    cached = latents.LatentSplit(tmp_path / "one", "train")
    vqvae, data, cache = setup
    assert torch.equal(cached.indices[:], latents.encode_images(vqvae, data.images))
    assert cached.captions[torch.tensor([0, 1, 2])].tolist() == [
        [*cache.rows(data.captions[i]).tolist(), *[-1] * (2 - i)] for i in range(3)]
    assert cached.text() == (data.captions, data.columns)


def test_a_killed_build_resumes_encoding_only_the_missing_shards(setup, tmp_path, monkeypatch):
    build(tmp_path / "whole", setup)
    real, calls = latents.encode_images, []

    def killed(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # killed while encoding the 4th shard
        return real(*args, **kwargs)

    monkeypatch.setattr(latents, "encode_images", killed)
    with pytest.raises(KeyboardInterrupt):
        build(tmp_path / "resumed", setup)
    with pytest.raises(CacheError, match="its build did not finish"):
        latents.LatentSplit(tmp_path / "resumed", "train")
    monkeypatch.setattr(latents, "encode_images", real)
    assert build(tmp_path / "resumed", setup) == 4  # shards 4 to 7 of 7
    assert files(tmp_path / "whole") == files(tmp_path / "resumed")
    assert build(tmp_path / "resumed", setup) == 0


def test_a_damaged_shard_is_reported_with_its_path_and_rebuilt(setup, tmp_path):
    build(tmp_path, setup)
    expected = files(tmp_path)
    shard = tmp_path / "train" / "rows-000000000016-000000000024.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the data: only the checksum sees it
    shard.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=f"cache shard {shard} is damaged .*checksum"):
        assert build(tmp_path, setup) == 1
    assert files(tmp_path) == expected
    shard.write_bytes(expected[shard.name][:50])  # truncated: readers refuse it in one line, naming it
    with pytest.raises(CacheError, match=f"cache shard {shard} is damaged") as e:
        latents.LatentSplit(tmp_path, "train")
    assert "\n" not in str(e.value)


def test_a_cache_of_another_vqvae_or_text_encoder_is_refused_in_one_line(setup, tmp_path):
    build(tmp_path, setup)
    cache = setup[2]
    assert len(latents.LatentSplit(tmp_path, "train", latents.split_key("v1", cache, "train", None, 0))) == 50
    with pytest.raises(CacheError, match="was built for {'vqvae': 'v1'}, not for") as e:
        latents.LatentSplit(tmp_path, "train", latents.split_key("v2", cache, "train", None, 0))
    assert "\n" not in str(e.value)
    other = type("Other", (), {"meta": {**cache.meta, "encoder": "t5"}, "store": cache.store})()
    with pytest.raises(CacheError, match="'text_encoder': 'fake'"):
        latents.LatentSplit(tmp_path, "train", latents.split_key("v1", other, "train", None, 0))
    rebuilt = type("Rebuilt", (), {"meta": cache.meta, "store": type("S", (), {"instance": lambda self: "cache-2"})()})()
    with pytest.raises(CacheError, match="'caption_cache': 'cache-1'"):  # a caption cache deleted and built again
        latents.LatentSplit(tmp_path, "train", latents.split_key("v1", rebuilt, "train", None, 0))


@pytest.mark.parametrize("objective", ["flow", "masked"])
def test_batches_through_the_maps_equal_batches_from_memory(setup, tmp_path, objective):
    vqvae, data, cache = setup
    build(tmp_path, setup)
    cached = latents.LatentSplit(tmp_path, "train")
    indices = latents.encode_images(vqvae, data.images)
    norm = latents.LatentNorm.measure(vqvae, cached.indices)
    if objective == "flow":
        memory = latents.diffusion_latents(vqvae, indices, norm)
        mapped = cached.indices.map(lambda idx: latents.diffusion_latents(vqvae, idx, norm), memory.shape[1:])
    else:
        memory, mapped = indices.long(), cached.indices.map(lambda idx: idx.long())
    cfg, cpu = DiTTrainConfig(batch_size=8, cfg_dropout=0.2), torch.device("cpu")
    a = DiTBatches(mapped, cached.captions, cache, cfg, 3, cpu, objective, 16)
    b = DiTBatches(memory, latents.candidate_rows(data.captions, cache, 3), cache, cfg, 3, cpu, objective, 16)
    for step in (0, 7, 13):
        x, y = a(step, 1, 2), b(step, 1, 2)
        assert all(torch.equal(x[k], y[k]) for k in x)
    # The caption each row gets is the one pick_caption draws from its captions' text, as before the maps.
    rows = torch.arange(50)
    assert a.pick(rows, 5).tolist() == cache.rows([pick_caption(data.captions[i], 3, 5, i) for i in range(50)]).tolist()


def test_latent_norm_from_code_counts_matches_the_latents(setup):
    vqvae, data, _ = setup
    indices = latents.encode_images(vqvae, data.images)
    norm = latents.LatentNorm.measure(vqvae, indices)
    z = vqvae.quantizer.embed(indices.long()).double()
    torch.testing.assert_close(torch.tensor(norm.mean), z.mean(dim=(0, 2, 3)).float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(norm.std), z.std(dim=(0, 2, 3)).float(), rtol=1e-5, atol=1e-6)


def test_flow_latents_by_table_lookup_equal_the_normalised_embedded_codes(setup):
    vqvae, data, _ = setup
    indices = latents.encode_images(vqvae, data.images)
    norm = latents.LatentNorm.measure(vqvae, indices)
    with torch.no_grad():
        assert torch.equal(latents.FlowLatents(vqvae, norm)(indices), norm.normalise(vqvae.quantizer.embed(indices.long())))


def test_a_streamed_split_is_built_by_each_process_from_its_part_and_read_without_the_gaps(setup, tmp_path):
    vqvae, _, cache = setup

    def png(i):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    n, words = 21, [f"{a} {b}" for a in WORDS for b in WORDS]
    ds = datasets.Dataset.from_dict({"img": [png(i) for i in range(n)], "text": [words[i] for i in range(n)]})
    ds.cast_column("img", datasets.Image()).save_to_disk(str(tmp_path / "data"))
    cfg = DataConfig(name=str(tmp_path / "data"), image_column="img", caption_column="text", resolution=8,
                     streaming=True)
    store = ShardStore(tmp_path / "train", latents.split_key("v1", cache, "train", None, 1), latents.split_columns(4, 1))
    assert [fill_stream(vqvae, cfg, "train", store, cache, rank, 2, shard_rows=4) for rank in (1, 0)] == [3, 3]
    assert store.shards() == [(0, 4), (4, 8), (8, 12), (12, 16), (16, 19), (20, 22)]  # 11 + 10 rows, a gap
    store.set_meta(rows=len(store.reader()))
    cached = latents.LatentSplit(tmp_path, "train")
    captions, _ = cached.text()
    assert len(cached) == n and sorted(captions) == sorted([words[i]] for i in range(n))
    assert cached.captions[torch.arange(n)][:, 0].tolist() == [int(cache.rows(c)[0]) for c in captions]
    images = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    images[:, 0] = 10 * torch.arange(n, dtype=torch.uint8)[:, None, None]  # what png(i) holds
    by_caption = dict(zip(words, latents.encode_images(vqvae, images)))
    assert all(torch.equal(cached.indices[torch.tensor([j])][0], by_caption[c[0]]) for j, c in enumerate(captions))
    assert fill_stream(vqvae, cfg, "train", store, cache, 0, 2, shard_rows=4) == 0  # resumed: nothing to encode



def test_the_dit_stage_refuses_a_latent_cache_of_another_vqvae_in_one_line(tiny_run, tmp_path, capsys):
    from train.train import cli

    from conftest import tiny_args

    root = tmp_path / "copy"  # the tiny run's data, caption cache, VQ-VAE and latent cache
    shutil.copytree(tiny_run.parent, root, ignore=shutil.ignore_patterns("dit", "tensorboard", "*.png"))
    index = root / "run" / "latents" / "train" / "index.json"
    found = json.loads(index.read_text())
    index.write_text(json.dumps({**found, "key": {**found["key"], "vqvae": "0123456789abcdef"}}))
    assert cli(tiny_args(root, "train.stage=dit")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "was built for {'vqvae': '0123456789abcdef'}" in err
