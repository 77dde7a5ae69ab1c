import pytest
import torch

from mmdit.flow import cfg_combine, flow_loss, sample, sample_t


def test_logit_normal_timesteps():
    t = sample_t(20000, mean=0.5, std=0.8, generator=torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    logit = torch.logit(t)
    assert logit.mean() == pytest.approx(0.5, abs=0.03) and logit.std() == pytest.approx(0.8, abs=0.03)


def test_flow_loss_is_zero_for_the_true_velocity_and_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    x0, noise, t = torch.randn(5, 2, 4, 4, generator=g), torch.randn(5, 2, 4, 4, generator=g), torch.rand(5, generator=g)
    oracle = lambda x_t, t_: noise - x0  # noqa: E731  (the straight path's constant velocity)
    assert torch.allclose(flow_loss(oracle, x0, t, noise), torch.zeros(5), atol=1e-12)
    # Predicting zero costs exactly |noise - x0|^2 per sample.
    zero = flow_loss(lambda x_t, t_: torch.zeros_like(x_t), x0, t, noise)
    assert torch.allclose(zero, (noise - x0).pow(2).flatten(1).mean(1))


def test_the_model_sees_the_interpolated_point():
    x0, noise, t = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1), torch.tensor([0.25])
    seen = []
    flow_loss(lambda x_t, t_: seen.append((x_t.item(), t_.item())) or x_t, x0, t, noise)
    assert seen == [(0.25, 0.25)]


def test_cfg_combination():
    cond, uncond = torch.tensor([3.0]), torch.tensor([1.0])
    assert cfg_combine(cond, uncond, 1.0).item() == 3.0
    assert cfg_combine(cond, uncond, 0.0).item() == 1.0
    assert cfg_combine(cond, uncond, 4.0).item() == 1.0 + 4.0 * 2.0


@pytest.mark.parametrize("steps", [1, 3, 25])
def test_euler_is_exact_on_a_constant_field(steps):
    a = torch.randn(2, 3, 4, 4)
    x1 = torch.randn(2, 3, 4, 4)
    out = sample(lambda x, t: a, x1, steps=steps, sampler="euler")
    assert torch.allclose(out, x1 - a, atol=1e-5)


def test_heun_is_exact_on_a_field_linear_in_t_and_euler_is_not():
    a, x1 = torch.randn(2, 3), torch.randn(2, 3)
    field = lambda x, t: t[:, None] * a  # noqa: E731  dx/dt = t a  ->  x(0) = x(1) - a / 2
    assert torch.allclose(sample(field, x1, steps=4, sampler="heun"), x1 - a / 2, atol=1e-5)
    assert not torch.allclose(sample(field, x1, steps=4, sampler="euler"), x1 - a / 2, atol=1e-3)


def test_sampler_times_and_bad_arguments():
    times = []
    sample(lambda x, t: times.append(t[0].item()) or torch.zeros_like(x), torch.zeros(3, 1), steps=4)
    assert times == pytest.approx([1.0, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match="accepted: an integer >= 1"):
        sample(lambda x, t: x, torch.zeros(1), steps=0)
    with pytest.raises(ValueError, match="accepted: euler, heun"):
        sample(lambda x, t: x, torch.zeros(1), sampler="ddim")


def test_guidance_with_a_negative_prompt_steps_away_from_it_beside_the_empty_prompt():
    g = torch.Generator().manual_seed(0)
    cond, uncond, negative = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    assert torch.equal(cfg_combine(cond, uncond, 4.0, uncond), cfg_combine(cond, uncond, 4.0))
    one = cfg_combine(cond, uncond, 4.0, negative)  # the default: one unit away from the negative
    assert torch.allclose(one, uncond + 4 * (cond - uncond) - (negative - uncond), atol=1e-5)
    # guidance - 1 units: the negative prompt in the empty prompt's place (diffusers' form)
    assert torch.allclose(cfg_combine(cond, uncond, 4.0, negative, 3.0), negative + 4 * (cond - negative),
                          atol=1e-5)
