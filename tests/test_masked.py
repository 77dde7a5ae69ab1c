"""The masked-token objective and its MaskGIT sampler (mmdit/masked.py), on toy logits."""
import math

import pytest
import torch

from mmdit.masked import mask_ratio, mask_tokens, masked_loss, plausibility, sample, still_masked

K, N = 16, 12


def test_mask_tokens_masks_the_scheduled_share_at_least_one_and_reports_it():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, K, (6, N), generator=g)
    u = torch.tensor([0.0, 0.3, 0.5, 0.9, 0.999, 0.9999])
    inputs, masked, ratio = mask_tokens(tokens, K, u, torch.rand(6, N, generator=g))
    counts = masked.sum(1)
    expected = (mask_ratio(u) * N).floor().clamp(min=1)
    assert torch.equal(counts.float(), expected) and counts.min() >= 1 and counts[0] == N
    assert torch.equal(ratio, counts / N)
    assert (inputs[masked] == K).all() and torch.equal(inputs[~masked], tokens[~masked])


def test_mask_ratio_is_the_cosine_schedule():
    u = torch.rand(100_000, generator=torch.Generator().manual_seed(1))
    r = mask_ratio(u)
    assert r.max() <= 1 and r.min() >= 0
    assert r.mean().item() == pytest.approx(2 / math.pi, abs=0.01)  # E[cos(pi/2 u)] = 2 / pi


def test_the_loss_counts_masked_positions_only():
    g = torch.Generator().manual_seed(2)
    logits, targets = torch.randn(2, N, K, generator=g), torch.randint(0, K, (2, N), generator=g)
    masked = torch.zeros(2, N, dtype=torch.bool)
    masked[0, :3] = True
    masked[1, 5] = True
    loss = masked_loss(logits[masked], targets, masked)  # the logits of the masked positions alone
    changed = targets.clone()
    changed[~masked] = (changed[~masked] + 1) % K  # what is not masked does not count
    assert torch.equal(masked_loss(logits[masked], changed, masked), loss)
    ce = torch.nn.functional.cross_entropy(logits[0, :3], targets[0, :3])
    assert loss[0].item() == pytest.approx(ce.item(), rel=1e-6)
    assert loss[1].item() == pytest.approx(torch.nn.functional.cross_entropy(logits[1, 5], targets[1, 5]).item())
    assert masked_loss(logits[masked], targets, masked, label_smoothing=0.1)[0] != loss[0]


@pytest.mark.parametrize("steps", [1, 2, 5, 12])
def test_the_schedule_decides_something_every_step_and_everything_at_the_end(steps):
    total = torch.tensor([N, 5, 1])  # the whole image, and edits that re-mask 5 and 1 positions
    left = total.clone()
    for i in range(steps):
        keep = still_masked(i, steps, total, left)
        assert ((0 <= keep) & ((keep < left) | (left == 1) & (i < steps - 1))).all()
        left = keep
    assert left.tolist() == [0, 0, 0]
    assert still_masked(0, steps, torch.tensor([0]), torch.tensor([0])).tolist() == [0]  # nothing to decode


class Recorder:
    """Toy logits with a preference per position; records what the sampler showed it."""

    def __init__(self):
        self.calls, self.inputs = 0, []
        self.bias = torch.randn(N, K, generator=torch.Generator().manual_seed(3)) * 3

    def __call__(self, tokens, ratio):
        self.calls += 1
        self.inputs.append(tokens.clone())
        assert torch.allclose(ratio, (tokens == K).float().mean(1))
        return self.bias.expand(len(tokens), -1, -1)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def test_the_sampler_makes_t_calls_ends_unmasked_and_never_changes_a_decided_token():
    fn = Recorder()
    tokens = sample(fn, generators([0, 1, 2]), N, K, "cpu", steps=5)
    assert fn.calls == 5 and (tokens < K).all()
    history = fn.inputs + [tokens]
    for before, after in zip(history, history[1:]):
        decided = before != K
        assert torch.equal(after[decided], before[decided])
        assert ((after != K).sum(1) > decided.sum(1)).all()  # each step decides more


def test_sampling_depends_on_each_images_own_generator_only():
    together = sample(Recorder(), generators([5, 6, 7]), N, K, "cpu", steps=4)
    alone = sample(Recorder(), generators([6]), N, K, "cpu", steps=4)
    assert torch.equal(together[1:2], alone)
    assert not torch.equal(together[0], together[2])


def test_low_temperature_and_no_randomness_take_the_argmax():
    fn = Recorder()
    tokens = sample(fn, generators([0]), N, K, "cpu", steps=3, temperature=1e-4, randomness=0.0)
    assert torch.equal(tokens[0], fn.bias.argmax(-1))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_sampled_tokens_follow_the_softmax_of_logits_over_temperature(temperature):
    probs = torch.tensor([0.1, 0.0, 0.2, 0.7])  # a code of probability 0 is never drawn

    def fn(tokens, ratio):
        return probs.log().expand(*tokens.shape, -1)

    tokens = sample(fn, generators(range(40)), 100, 4, "cpu", steps=1, temperature=temperature)
    share = torch.bincount(tokens.flatten(), minlength=4) / tokens.numel()
    expected = probs ** (1 / temperature) / (probs ** (1 / temperature)).sum()
    assert share[1] == 0
    assert torch.allclose(share, expected, atol=0.03), (share, expected)


def follows_the_schedule(decoding: list[torch.Tensor], region: torch.Tensor, given: torch.Tensor, strength: float,
                         region_share: float):
    """Each group is hidden on the cosine schedule from its share at the start (the region: region_share, the rest:
    strength), and what is shown outside the region is always the given token."""
    for group, share in ((region, region_share), (~region, strength)):
        total = (share * group.sum(1)).round().long()
        left = total
        for i, x in enumerate(decoding):
            assert torch.equal(((x == K) & group).sum(1), left)
            left = still_masked(i, len(decoding), total, left)
    for x in decoding:
        shown = (x != K) & ~region
        assert torch.equal(x[shown], given[shown])


def test_image_to_image_remasks_the_least_plausible_and_reveals_the_rest_on_the_schedule():
    fn = Recorder()  # it also checks that the ratio the model is given is the share masked
    likely = fn.bias.argmax(-1)  # (N,): the prompt's favourite token at each position
    given = likely.clone()[None]
    off = torch.tensor([1, 5, 7, 10])  # positions holding a token the prompt finds unlikely
    given[0, off] = fn.bias[off].argmin(-1)
    assert torch.equal(plausibility(fn, given, K, torch.rand(1, N)).topk(4, largest=False).indices.sort().values[0],
                       off)
    fn.inputs.clear()
    strength = 4 / N
    tokens = sample(fn, generators([0]), N, K, "cpu", steps=4, tokens=given, strength=strength)
    chosen = torch.zeros(1, N, dtype=torch.bool)
    chosen[0, off] = True
    decoding = fn.inputs[2:]  # after the two plausibility calls
    assert len(decoding) == math.ceil(4 * strength) and (decoding[0][chosen] == K).all()
    follows_the_schedule(decoding, chosen, given, strength, 1.0)  # the kept tokens: as outside an inpainting mask
    assert torch.equal(tokens[~chosen], given[~chosen]) and (tokens < K).all()


@pytest.mark.parametrize("strength", [1.0, 0.5])
def test_inpainting_reveals_the_rest_on_the_schedule_and_ends_with_it_as_given(strength):
    fn = Recorder()  # it also checks that the ratio the model is given is the share masked
    given = torch.randint(0, K, (2, N), generator=torch.Generator().manual_seed(1))
    region = torch.zeros(2, N, dtype=torch.bool)
    region[0, :4], region[1, 6:] = True, True
    tokens = sample(fn, generators([0, 1]), N, K, "cpu", steps=4, tokens=given, region=region, strength=strength)
    assert torch.equal(tokens[~region], given[~region]) and (tokens < K).all()
    decoding = fn.inputs[2 if strength < 1 else 0:]  # after the plausibility calls
    assert len(decoding) == math.ceil(4 * strength)
    follows_the_schedule(decoding, region, given, strength, strength)
