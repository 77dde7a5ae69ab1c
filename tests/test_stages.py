"""The stages' pieces, alone: batches, losses, validation, the loop's periodic decisions."""
import math

import pytest
import torch
import torch.nn.functional as F

from mmdit.config import DiTTrainConfig, StageConfig
from mmdit.dit import DiT, DiTModelConfig
from mmdit.stages.dit import DiTBatches, Validation, loss_by_t
from mmdit.stages.vqvae import ImageBatches, ReconLoss
from mmdit.data.order import batch_indices
from mmdit.trainer import due
from mmdit.vqvae import VQVAE, VQVAEConfig

CAPTIONS = ["", "a red circle", "a blue square", "a green triangle"]


class FakeCaptionCache:
    """What the DiT stage reads of a CaptionCache: rows of caption embeddings and their indices."""

    def __init__(self, length: int = 3, dim: int = 6):
        g = torch.Generator().manual_seed(0)
        self.hidden = torch.randn(len(CAPTIONS), length, dim, generator=g).bfloat16()
        self.mask = torch.ones(len(CAPTIONS), length, dtype=torch.bool)
        self.pooled = torch.randn(len(CAPTIONS), dim, generator=g)

    def rows(self, captions):
        return torch.tensor([CAPTIONS.index(c) for c in captions])

    lookup = rows

    def text(self, rows):
        return {"hidden": self.hidden[rows].float(), "mask": self.mask[rows], "pooled": self.pooled[rows].float()}


K = 10  # the masked tests' codebook size
OBJECTIVES = ["flow", "masked"]


def dit_batches(n: int = 40, batch_size: int = 4, cfg_dropout: float = 0.1, objective: str = "flow") -> DiTBatches:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, 4, 4, generator=g) if objective == "flow" else torch.randint(0, K, (n, 4, 4), generator=g)
    captions = torch.tensor([[1 + i % 3, 1 + (i + 1) % 3] for i in range(n)])  # caption-cache rows of two candidates
    return DiTBatches(x, captions, FakeCaptionCache(), DiTTrainConfig(batch_size=batch_size, cfg_dropout=cfg_dropout),
                      seed=3, device=torch.device("cpu"), objective=objective, codebook_size=K)


def tiny_dit(objective: str = "flow") -> DiT:
    torch.manual_seed(0)
    model = DiT(DiTModelConfig(in_channels=4, input_size=4, width=16, depth=1, heads=2, text_dim=6, codebook_size=K,
                               objective=objective))
    for p in model.parameters():  # a trained-looking model: a new one outputs exactly 0
        p.data.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_dit_batches_are_a_pure_function_of_the_step_and_split_into_slots_exactly(objective):
    batches = dit_batches(objective=objective)
    a, b = batches(5, 0, 1), dit_batches(objective=objective)(5, 0, 1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    draw = "noise" if objective == "flow" else "scores"
    assert set(a) == {"x0", "t", draw, "hidden", "mask", "pooled"}
    assert not torch.equal(batches(6, 0, 1)[draw], a[draw])
    half = dit_batches(batch_size=2, objective=objective)  # two micro-batch slots of 2 == one batch of 4
    parts = [half(5, slot, 2) for slot in range(2)]
    whole = dit_batches(batch_size=4, objective=objective)(5, 0, 1)
    for k in whole:
        assert torch.equal(torch.cat([p[k] for p in parts]), whole[k]), k
    rows = batch_indices(5, 40, 4, 3)
    assert torch.equal(whole["x0"], batches.x[rows])


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_caption_dropout_uses_the_empty_caption_at_the_configured_rate(objective):
    batches = dit_batches(n=400, batch_size=100, cfg_dropout=0.3, objective=objective)
    null = batches.text(torch.tensor([0]))["pooled"]
    # 2000 draws: the binomial standard deviation of the measured rate is 0.010
    dropped = [(batches(step, 0, 1)["pooled"] == null).all(dim=1).float().mean().item() for step in range(20)]
    assert abs(sum(dropped) / len(dropped) - 0.3) < 0.03
    never = dit_batches(n=400, batch_size=100, cfg_dropout=0.0, objective=objective)
    assert (never(0, 0, 1)["pooled"] == null).all(dim=1).sum() == 0


def test_loss_by_t_means_each_quarter():
    t = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.99, 1.0])
    per_sample = torch.tensor([1.0, 3.0, 5.0, 7.0, 9.0, 11.0])
    bins = loss_by_t(per_sample, t)
    assert [bins[f"loss_t{i}"].item() for i in range(4)] == [2.0, 5.0, 7.0, 10.0]


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_validation_is_fixed_fills_every_bin_and_leaves_the_rng_alone(objective):
    batches = dit_batches(objective=objective)
    x_val = batches.x[:12].clone()
    validation = Validation(x_val, torch.tensor([[1], [2], [3]] * 4), batches, size=8)
    t = torch.cat([c["t"] for c in validation.chunks])
    assert len(t) == 8 and len(validation.chunks) == 2 and (torch.histc(t, bins=4, min=0, max=1) == 2).all()
    model = tiny_dit(objective).eval()
    state = torch.random.get_rng_state()
    with torch.no_grad():
        first, again = validation(model), validation(model)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(first[k], again[k]) for k in first) and set(first) == {"loss", *(f"loss_t{i}" for i in range(4))}
    # The same as the training loss on one batch holding the same samples.
    chunk = {k: torch.cat([c[k] for c in validation.chunks]) for k in validation.chunks[0]}
    with torch.no_grad():
        loss, _ = batches.train_loss(model, chunk)
    assert first["loss"].item() == pytest.approx(loss.item(), rel=1e-5)


def test_image_batches_scale_to_the_vqvae_range_and_follow_batch_indices():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8)
    batch = ImageBatches(images, 4, seed=1, device=torch.device("cpu"))(3, 1, 2)
    assert torch.equal(batch, images[batch_indices(3, 20, 4, 1, 1, 2)].float() / 127.5 - 1)
    assert batch.min() >= -1 and batch.max() <= 1


def test_recon_loss_weights_its_terms():
    torch.manual_seed(0)
    model = VQVAE(VQVAEConfig(channels=8, channel_mult=[1, 2], codebook_size=16, code_dim=4))
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    torch.manual_seed(0)
    loss, logs = ReconLoss(1.0, 0.0)(model, x)
    assert loss.item() == pytest.approx((logs["l1"] + logs["commit"]).item(), rel=1e-6)
    torch.manual_seed(0)
    loss, logs = ReconLoss(0.0, 2.0)(model, x)
    assert loss.item() == pytest.approx((2 * logs["mse"] + logs["commit"]).item(), rel=1e-6)


@pytest.mark.parametrize("done,stop,expected", [
    (3, None, (False, False, False)),
    (5, None, (True, False, False)),  # log_every
    (10, None, (True, True, True)),  # all three periods
    (12, None, (True, True, True)),  # the last step does everything
    (7, "SIGTERM", (False, False, True)),  # a stop checkpoints at once
])
def test_the_loop_decides_periodic_work_in_one_place(done, stop, expected):
    cfg = StageConfig(steps=12, log_every=5, image_every=10, checkpoint_every=10)
    now = due(done, cfg, stop, has_images=True)
    assert (now.log, now.image, now.checkpoint) == expected and now.stop == stop
    assert not due(10, cfg, None, has_images=False).image


def test_masked_loss_is_the_cross_entropy_of_the_lowest_scored_codes_given_the_rest():
    batches, model = dit_batches(objective="masked"), tiny_dit("masked")
    batch = batches(2, 0, 1)
    with torch.no_grad():
        per_sample, ratio = batches.losses(model, batch)
    count = (16 * torch.cos(math.pi / 2 * batch["t"])).floor().clamp(min=1).long()
    assert torch.equal(ratio, count / 16)
    codes = batch["x0"].flatten(1)
    for b in range(4):  # by hand, one image at a time
        hidden = batch["scores"][b].argsort()[:count[b]]
        inputs = codes[b].clone()
        inputs[hidden] = K
        with torch.no_grad():
            logits = model(inputs.view(1, 4, 4), ratio[b:b + 1], batch["hidden"][b:b + 1], batch["mask"][b:b + 1],
                           batch["pooled"][b:b + 1]).view(16, K)
        expected = F.cross_entropy(logits[hidden], codes[b, hidden], label_smoothing=0.1)
        assert per_sample[b].item() == pytest.approx(expected.item(), rel=1e-5)
