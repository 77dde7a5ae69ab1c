"""mmdit.clip: tiny random CLIPs, built here as an open_clip model config and as a transformers CLIPConfig,
saved and loaded back through the one interface eval uses. No network."""
import json
import math

import open_clip
import pytest
import torch
import torch.nn.functional as F

from mmdit.clip import OPENAI_MEAN, OPENAI_STD, CLIPLoadError, load_clip, save_open_clip

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = ["a", "an", "small", "large", "red", "green", "blue", "circle", "square", "triangle", "in", "the", "center"]


def make_tiny_open_clip(directory, in_domain: bool = True, seed: int = 0):
    """A random open_clip CLIP in open_clip's local layout, as eval/train_clip.py writes it."""
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_OPEN_CLIP)
    save_open_clip(model, TINY_OPEN_CLIP, directory,
                   train_info={"in_domain": True, "dataset": "test", "train_pairs": 0} if in_domain else None)
    return model.eval()


def make_tiny_transformers_clip(directory):
    """A random transformers CLIPModel + a word-level tokenizer built in memory, saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A [EOS]",
                                                       special_tokens=[("[BOS]", 2), ("[EOS]", 3)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                        bos_token="[BOS]", eos_token="[EOS]")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, pad_token_id=0, bos_token_id=2,
                         eos_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    model = CLIPModel(config).eval()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model, tokenizer


def images(n=4, seed=0):
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def normalised(x):
    return (x.float() / 255 - torch.tensor(OPENAI_MEAN).view(1, 3, 1, 1)) / torch.tensor(OPENAI_STD).view(1, 3, 1, 1)


def test_open_clip_directory_round_trips(tmp_path, single_thread):
    model = make_tiny_open_clip(tmp_path)
    clip = load_clip(str(tmp_path))
    assert clip.kind == "open_clip" and clip.in_domain and clip.num_features == 16 and clip.image_size == 32
    x = images()
    with torch.no_grad():
        assert torch.allclose(clip.encode_image(x), model.encode_image(normalised(x)), atol=1e-5)
        tokens = open_clip.SimpleTokenizer(context_length=16)(["a red circle", "a blue square"])
        assert torch.allclose(clip.encode_text(["a red circle", "a blue square"]), model.encode_text(tokens), atol=1e-5)
    # The layout is open_clip's own: open_clip loads it by itself, offline.
    again, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert json.loads((tmp_path / "train_info.json").read_text())["in_domain"] is True


def test_transformers_directory_matches_clipmodel(tmp_path, single_thread):
    model, tokenizer = make_tiny_transformers_clip(tmp_path)
    clip = load_clip(str(tmp_path))
    assert clip.kind == "transformers" and not clip.in_domain and clip.num_features == 16
    x, texts = images(2), ["a small red circle", "a large blue square in the center"]
    with torch.no_grad():
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=normalised(x))
    # CLIPModel's own forward normalises the embeddings.
    assert torch.allclose(F.normalize(clip.encode_image(x), dim=-1), out.image_embeds, atol=1e-5)
    assert torch.allclose(F.normalize(clip.encode_text(texts), dim=-1), out.text_embeds, atol=1e-5)


def test_images_are_resized_to_the_model_input(tmp_path, single_thread):
    make_tiny_open_clip(tmp_path)
    clip = load_clip(str(tmp_path))
    big = F.interpolate(images(2).float(), size=(64, 64), mode="nearest").to(torch.uint8)
    assert clip.preprocess(big).shape == (2, 3, 32, 32)
    assert "bicubic" in clip.info["resize"]


@pytest.mark.parametrize("name, says", [
    ("openai/clip-vit-base-patch16", "cannot load CLIP 'openai/clip-vit-base-patch16'"),  # offline: no hub
    ("ViT-B-32", "without pretrained weights"),
    ("ViT-B-32/no-such-tag", "cannot load CLIP"),
])
def test_unloadable_names_are_one_clear_error(name, says):
    with pytest.raises(CLIPLoadError, match="accepted") as e:
        load_clip(name)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_directory_without_a_model_is_rejected(tmp_path):
    with pytest.raises(CLIPLoadError, match="neither open_clip_config.json nor config.json"):
        load_clip(str(tmp_path))


def test_train_clip_clamps_logit_scale_after_each_step(tmp_path):
    """A loss that only pushes logit_scale up, through the shared training loop mmdit.clip_train uses."""
    from accelerate import Accelerator

    from mmdit.clip_train import MAX_LOGIT_SCALE, clamp_logit_scale
    from mmdit.config import StageConfig
    from mmdit.trainer import fit

    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(4.0))  # AdamW at lr 1 moves it ~1 per step
    seen = []

    def loss_fn(model, batch):
        seen.append(model.logit_scale.item())
        return -model.logit_scale, {}

    stage = StageConfig(steps=4, batch_size=1, lr=1.0, warmup_steps=0, schedule="constant", log_every=4,
                        image_every=5, checkpoint_every=4)
    fit(Accelerator(cpu=True, mixed_precision="no"), "clip", model, stage, lambda *_: None, loss_fn, tmp_path,
        after_step=clamp_logit_scale)
    assert MAX_LOGIT_SCALE == pytest.approx(math.log(100))
    assert seen[1:] + [model.logit_scale.item()] == pytest.approx([MAX_LOGIT_SCALE] * 4)  # clamped after every step


def test_train_clip_tokenizes_to_the_longest_caption_and_cuts_keeping_the_end_token():
    from mmdit.clip_train import tokenize

    captions = ["a red circle", "a small blue square in the bottom right corner of the picture"]
    full = open_clip.SimpleTokenizer()(captions)  # (2, 77), 0 = padding, the end token the largest id
    longest = int((full != 0).sum(1).max())
    assert torch.equal(tokenize(captions, 0), full[:, :longest])  # 0 = automatic: nothing cut
    cut = tokenize(captions, 6)
    assert cut.shape == (2, 6) and torch.equal(cut[1, :5], full[1, :5])
    assert cut[1, -1] == full.max() and cut[0, -1] == 0  # the long caption keeps its end token; the short one fits


def test_train_clip_loss_logs_in_batch_top1():
    from mmdit.clip_train import clip_loss

    class Towers(torch.nn.Module):  # the features are the inputs themselves, normalised
        def forward(self, image, text):
            return torch.nn.functional.normalize(image, dim=-1), torch.nn.functional.normalize(text, dim=-1), \
                torch.tensor(10.0)

    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    matched, logs = clip_loss(open_clip.ClipLoss(), Towers(), (x, x))  # text i is image i: every pair retrieved
    assert logs["in_batch_top1"] == 1.0 and logs["logit_scale"] == 10.0
    shifted, logs = clip_loss(open_clip.ClipLoss(), Towers(), (x, x[[1, 2, 3, 0]]))  # every text another image's
    assert logs["in_batch_top1"] == 0.0 and shifted > matched
