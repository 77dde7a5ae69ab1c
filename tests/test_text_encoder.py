"""Tests for mmdit.text_encoder: shipped MiniLM, tiny random CLIP/T5 encoders, caption cache."""

import json
import shutil
import threading
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config,
                          T5EncoderModel)

from mmdit.text_encoder import (DEFAULT_TEXT_ENCODER, CaptionCache, CaptionCacheError, TextEncoder,
                                TextEncoderLoadError, conditioning)

CAPTIONS = ["a red circle", "", "two blue squares on green", "héllo wörld 🎉 日本"]
LONG = "a very long caption about many red and blue shapes " * 8  # > 32 tokens


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder(None, max_length=32)


def _save_tiny_tokenizer(path, specials, template, **special_tokens):
    """A word-level tokenizer built offline; specials take the first ids, in order."""
    words = "a red green blue circle square round disk report the of on two".split()
    vocab = {t: i for i, t in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(s, vocab[s]) for s in specials if s in template])
    PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32, unk_token="<unk>",
                            pad_token="<pad>", **special_tokens).save_pretrained(path)
    return len(vocab)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-clip")
    # eos id 3, not 2: CLIP treats eos_token_id == 2 as a legacy config and pools at argmax(ids).
    vocab_size = _save_tiny_tokenizer(path, ["<pad>", "<unk>", "<bos>", "<eos>"], "<bos> $A <eos>",
                                      bos_token="<bos>", eos_token="<eos>")
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=32,
                            pad_token_id=0, bos_token_id=2, eos_token_id=3)
    CLIPTextModel(config).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_t5_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-t5")
    vocab_size = _save_tiny_tokenizer(path, ["<pad>", "</s>", "<unk>"], "$A </s>", eos_token="</s>")
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    T5EncoderModel(config).save_pretrained(path)
    return path


def _masked_mean(emb):
    m = emb.mask.unsqueeze(-1).float()
    return (emb.hidden * m).sum(1) / m.sum(1)


# ---------------------------------------------------------------- TextEncoder: MiniLM

def test_minilm_shapes_mask_and_pooling(minilm):
    emb = minilm(CAPTIONS)
    assert minilm.dim == 384 and minilm.id.startswith(DEFAULT_TEXT_ENCODER)
    assert emb.hidden.shape == (4, 32, 384) and emb.pooled.shape == (4, 384)
    assert emb.mask.dtype == torch.bool and emb.mask.shape == (4, 32)
    expected = minilm.tokenizer(CAPTIONS, padding="max_length", truncation=True, max_length=32,
                                return_tensors="pt")["attention_mask"].bool()
    assert torch.equal(emb.mask, expected)
    assert emb.mask[1].sum() == 2  # "" is [CLS] [SEP]: the unconditional caption still encodes
    torch.testing.assert_close(emb.pooled, _masked_mean(emb))
    assert torch.isfinite(emb.hidden).all()


def test_minilm_is_deterministic_and_frozen(minilm):
    a, b = minilm(CAPTIONS), minilm(list(CAPTIONS))
    assert torch.equal(a.hidden, b.hidden) and torch.equal(a.pooled, b.pooled)
    minilm.train()  # a parent module switching to training must not enable dropout
    assert not minilm.training and not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm(CAPTIONS[:1]).hidden.requires_grad
    assert torch.equal(minilm(CAPTIONS).hidden, a.hidden)


def test_minilm_is_semantically_sane(minilm):
    circle, disk, report = minilm(["a red circle", "a red round disk", "a financial report"]).pooled
    assert F.cosine_similarity(circle, disk, dim=0) > F.cosine_similarity(circle, report, dim=0)


def test_padding_does_not_change_real_tokens(minilm):
    short = TextEncoder(None, max_length=16)
    a, b = short(CAPTIONS), minilm(CAPTIONS)
    assert torch.equal(a.mask, b.mask[:, :16])
    torch.testing.assert_close(a.hidden[a.mask], b.hidden[b.mask], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(a.pooled, b.pooled, atol=1e-4, rtol=1e-4)


def test_truncation_warns_once_per_encoder():
    enc = TextEncoder(None, max_length=16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = enc([LONG, "short", LONG, LONG])
        enc([LONG, LONG])
    messages = [str(w.message) for w in caught if "truncated" in str(w.message)]
    assert len(messages) == 1 and "3 of 4" in messages[0]
    assert first.hidden.shape == (4, 16, 384) and first.mask[0].all()


def test_conditioning_is_bf16_rounded_and_what_the_cache_holds(minilm, tmp_path):
    direct = minilm(CAPTIONS)
    cond = conditioning(direct)
    assert cond.hidden.dtype == torch.float32 and not torch.equal(cond.hidden, direct.hidden)
    assert torch.equal(cond.hidden, direct.hidden.bfloat16().float()) and torch.equal(cond.pooled, direct.pooled)
    assert all(torch.equal(a, b) for a, b in zip(conditioning(cond), cond))  # idempotent: cache rows stay as they are
    assert all(torch.equal(a, b) for a, b in zip(CaptionCache(minilm, tmp_path).get(CAPTIONS), cond))


def test_resolved_id_names_the_weights_loaded(minilm, tiny_clip_dir, tmp_path, monkeypatch):
    import huggingface_hub.constants

    assert minilm.resolved_id == minilm.id and minilm.id.startswith(f"{DEFAULT_TEXT_ENCODER}==")
    assert TextEncoder(tiny_clip_dir, max_length=8).resolved_id == str(tiny_clip_dir.resolve())
    # A hub name, from a hub cache laid out as huggingface_hub writes it: refs/main -> snapshots/<commit>/.
    commit, repo = "0123456789abcdef0123456789abcdef01234567", tmp_path / "models--tiny--clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_clip_dir, repo / "snapshots" / commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    assert TextEncoder("tiny/clip", max_length=8).resolved_id == f"tiny/clip@{commit}"


def test_caption_validation(minilm):
    with pytest.raises(TypeError, match="list"):
        minilm("a red circle")
    with pytest.raises(TypeError):
        minilm(["ok", 3])
    empty = minilm([])
    assert empty.hidden.shape == (0, 32, 384) and empty.mask.shape == (0, 32)
    assert empty.pooled.shape == (0, 384)


# ---------------------------------------------------------------- TextEncoder: other families

def test_tiny_clip_pools_at_eos(tiny_clip_dir):
    enc = TextEncoder(str(tiny_clip_dir), max_length=12)
    assert isinstance(enc.model, CLIPTextModel) and enc.dim == 32
    emb = enc(["a red circle", "", "two blue squares on the disk"])
    assert emb.hidden.shape == (3, 12, 32) and emb.pooled.shape == (3, 32)
    assert emb.mask.sum(1).tolist() == [5, 2, 8]  # bos + words + eos, then padding
    eos = emb.mask.sum(1) - 1  # eos is the last real token
    torch.testing.assert_close(emb.pooled, emb.hidden[torch.arange(3), eos])


def test_tiny_t5_uses_encoder_and_masked_mean(tiny_t5_dir):
    enc = TextEncoder(tiny_t5_dir, max_length=10)
    assert isinstance(enc.model, T5EncoderModel) and enc.dim == 32
    emb = enc(["a red circle", "", "two blue squares on the disk"])
    assert emb.hidden.shape == (3, 10, 32)
    assert emb.mask.sum(1).tolist() == [4, 1, 7]  # words + </s>
    torch.testing.assert_close(emb.pooled, _masked_mean(emb))


def test_max_length_beyond_model_limit(tiny_clip_dir):
    with pytest.raises(ValueError, match=r"max_length=33.*32"):
        TextEncoder(str(tiny_clip_dir), max_length=33)


def test_unknown_name_fails_fast_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(TextEncoderLoadError, match="no-such-org/no-such-model") as info:
        TextEncoder("no-such-org/no-such-model")
    assert time.monotonic() - start < 10
    assert isinstance(info.value, ValueError) and info.value.__cause__ is not None
    assert "local directory" in str(info.value) and "None" in str(info.value)


def test_directory_without_a_model_is_a_load_error(tmp_path):
    with pytest.raises(TextEncoderLoadError, match="could not be loaded"):
        TextEncoder(tmp_path)


# ---------------------------------------------------------------- CaptionCache

@pytest.fixture
def seen(minilm, monkeypatch):
    """Every caption the encoder is asked to encode, in order."""
    seen, forward = [], minilm.forward

    def counting_forward(captions):
        seen.extend(captions)
        return forward(captions)

    monkeypatch.setattr(minilm, "forward", counting_forward)
    return seen


def test_cache_encodes_each_caption_once(minilm, seen, tmp_path):
    cache = CaptionCache(minilm, tmp_path, batch_size=2)
    first = cache.get(["a", "b", "a", "c"])
    assert seen == ["a", "b", "c"] and len(cache) == 3 and "b" in cache and "z" not in cache

    mixed = cache.get(["c", "d", "a"])  # hits and a miss: only the miss is encoded
    assert seen == ["a", "b", "c", "d"]
    torch.testing.assert_close(mixed.hidden[0], first.hidden[3])
    torch.testing.assert_close(mixed.hidden[2], first.hidden[0])

    fresh = CaptionCache(minilm, tmp_path, batch_size=2)  # a new run on the same directory
    again = fresh.get(["a", "b", "a", "c"])
    assert seen == ["a", "b", "c", "d"] and len(fresh) == 4
    for x, y in zip(again, first):
        assert torch.equal(x, y)
    meta = json.loads((cache.dir / "index.json").read_text())["key"]
    assert meta == {"encoder": minilm.id, "max_length": 32, "dim": 384}


def test_cache_matches_encoder_output(minilm, tmp_path):
    cache = CaptionCache(minilm, tmp_path)
    cached, direct = cache.get(CAPTIONS), minilm(CAPTIONS)
    assert cached.hidden.dtype == torch.float32 and torch.equal(cached.mask, direct.mask)
    torch.testing.assert_close(cached.hidden, direct.hidden, atol=2e-2, rtol=1e-2)  # stored bf16
    torch.testing.assert_close(cached.pooled, direct.pooled, atol=1e-4, rtol=1e-4)


def test_cache_rows_index_the_full_tensors(minilm, seen, tmp_path):
    cache = CaptionCache(minilm, tmp_path)
    rows = cache.encode_all(["x", "y", "x"])
    assert rows.dtype == torch.long and rows.tolist() == [0, 1, 0]
    assert torch.equal(cache.rows(["y", "x"]), torch.tensor([1, 0]))
    text = cache.text(torch.tensor([1, 0]))
    assert text["hidden"].shape == (2, 32, 384) and torch.equal(text["hidden"], text["hidden"].bfloat16().float())
    assert text["mask"].shape == (2, 32) and text["pooled"].shape == (2, 384)
    with pytest.raises(KeyError, match="encode_all"):
        cache.rows(["never seen"])
    assert seen == ["x", "y"]


def test_lookup_reads_sidecars_only_until_the_captions_are_found(minilm, seen, tmp_path):
    CaptionCache(minilm, tmp_path, shard_rows=2).encode_all(["", "p", "a", "b", "c", "d"])  # 3 shards
    cache = CaptionCache(minilm, tmp_path, shard_rows=2)  # a trainer's: nothing read yet
    read, sidecar = [], cache.store.sidecar
    cache.store.sidecar = lambda start, end: read.append(start) or sidecar(start, end)
    assert cache.lookup(["p", "", "p"]).tolist() == [1, 0, 1] and read == [0]  # the first shard only
    assert cache.lookup(["b", ""]).tolist() == [3, 0] and read == [0, 0, 2]
    assert cache.lookup(["", "b"]).tolist() == [0, 3] and read == [0, 0, 2]  # remembered
    assert cache.lookup(["new", "a"]).tolist() == [6, 2] and seen[-1] == "new"  # a missing caption is encoded
    assert torch.equal(cache.get(["b"]).hidden, cache.text(torch.tensor([3]))["hidden"])


def test_cache_rebuilds_damaged_and_unfinished_shards_into_the_same_rows(minilm, seen, tmp_path):
    cache = CaptionCache(minilm, tmp_path, shard_rows=1)
    cache.encode_all(["p", "q", "r"])  # one shard per caption
    shards = sorted(cache.dir.glob("rows-*.safetensors"))
    expected = {p.name: p.read_bytes() for p in shards}
    shards[1].unlink()  # killed before its tensors were written: its sidecar keeps the plan
    shards[2].write_bytes(expected[shards[2].name][:100])  # truncated
    fresh = CaptionCache(minilm, tmp_path, shard_rows=1)
    with pytest.warns(UserWarning, match=f"cache shard {shards[2]} is damaged"):
        assert fresh.encode_all(["r", "p", "q"]).tolist() == [2, 0, 1]
    assert seen == ["p", "q", "r", "q", "r"]
    assert {p.name: p.read_bytes() for p in sorted(cache.dir.glob("rows-*.safetensors"))} == expected


def test_cache_built_by_two_processes_equals_one_built_by_one(minilm, seen, tmp_path):
    captions = [f"caption {i % 7}" for i in range(20)]
    CaptionCache(minilm, tmp_path / "one", batch_size=1, shard_rows=2).encode_all(captions)
    barrier = threading.Barrier(2)

    def build(rank):
        CaptionCache(minilm, tmp_path / "two", batch_size=1, shard_rows=2).encode_all(captions, rank, 2, barrier.wait)

    threads = [threading.Thread(target=build, args=(rank,)) for rank in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(2 * [f"caption {i}" for i in range(7)])  # each distinct caption once per build
    one, two = (sorted((tmp_path / d).glob("*/rows-*")) for d in ("one", "two"))
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 8
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(one, two))
    ids = {CaptionCache(minilm, tmp_path / "two").store.instance() for _ in range(2)}
    assert len(ids) == 1 and ids != {CaptionCache(minilm, tmp_path / "one").store.instance()}


def test_encode_at_writes_the_new_captions_at_the_rows_given_once(minilm, seen, tmp_path):
    cache = CaptionCache(minilm, tmp_path)
    cache.encode_all(["a", "b"])  # rows 0, 1
    other = CaptionCache(minilm, tmp_path)  # another process, building its own part of a stream
    other.encode_at(["c", "a", "c"], start=100)
    cache.encode_at(["d", "c"], start=200)  # "c" is new to this process's view: encoded again, harmlessly
    assert seen == ["a", "b", "c", "d", "c"]
    cache.encode_at(["d", "e"], start=200)  # the shard at 200 is complete: resumed, nothing to do
    fresh = CaptionCache(minilm, tmp_path)
    assert fresh.rows(["a", "c", "d"]).tolist() == [0, 100, 200] and "e" not in fresh
    assert torch.equal(fresh.get(["c"]).hidden, fresh.text(torch.tensor([201]))["hidden"])


def test_cache_of_another_encoder_is_refused_in_one_line(minilm, tmp_path):
    cache = CaptionCache(minilm, tmp_path)
    index = json.loads((cache.dir / "index.json").read_text())
    index["key"]["encoder"] = "someone-else"
    (cache.dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(CaptionCacheError, match="was built for {'encoder': 'someone-else'}") as e:
        CaptionCache(minilm, tmp_path)
    assert "\n" not in str(e.value)


def test_cache_dir_depends_on_encoder_and_max_length(tiny_clip_dir, tmp_path):
    a = CaptionCache(TextEncoder(tiny_clip_dir, max_length=8), tmp_path)
    b = CaptionCache(TextEncoder(tiny_clip_dir, max_length=16), tmp_path)
    assert a.dir != b.dir and a.dir.parent == b.dir.parent == tmp_path
    assert a.get(["a red circle"]).hidden.shape == (1, 8, 32)
