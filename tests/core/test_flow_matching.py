import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from vlv.diffusion import GeneratorDraws, flow_matching_density, flow_matching_loss

N, SHIFT = 1000, 3.0


def _denoise(noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A stand-in model whose output depends on both inputs, so a wrong sigma or timestep shows."""
    return 0.5 * noisy + (t / N).view(-1, 1, 1, 1)


def _reference(latents, seed, scheme, logit_mean=0.0, logit_std=1.0, mode_scale=1.29):
    """The loss written out by hand from the SD3 paper and diffusers' dreambooth SD3 script."""
    g = torch.Generator().manual_seed(seed)
    b = latents.shape[0]
    if scheme == "logit_normal":
        u = 1 / (1 + torch.exp(-(logit_mean + logit_std * torch.randn(b, generator=g))))
    else:
        u = torch.rand(b, generator=g)
        if scheme == "mode":
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    idx = (u * N).long()
    t_plain = torch.arange(N, 0, -1, dtype=torch.float32)  # N .. 1, the training schedule before the shift
    s_plain = t_plain / N
    sigma_all = SHIFT * s_plain / (1 + (SHIFT - 1) * s_plain)
    sigma, t = sigma_all[idx].view(b, 1, 1, 1), sigma_all[idx] * N
    noise = torch.randn(latents.shape, generator=g)
    noisy = (1 - sigma) * latents + sigma * noise
    w = {"sigma_sqrt": sigma ** -2.0, "cosmap": 2 / (math.pi * (1 - 2 * sigma + 2 * sigma ** 2))}.get(
        scheme, torch.ones_like(sigma))
    per_sample = (w * (_denoise(noisy, t) - (noise - latents)) ** 2).reshape(b, -1).mean(1)
    return per_sample.mean()


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform", "sigma_sqrt", "cosmap"])
def test_loss_matches_hand_written_reference(scheme):
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=N, shift=SHIFT)
    latents = torch.randn(5, 4, 6, 6, generator=torch.Generator().manual_seed(1))
    got = flow_matching_loss(_denoise, sched, latents, torch.Generator().manual_seed(7), weighting_scheme=scheme)
    torch.testing.assert_close(got, _reference(latents, 7, scheme), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "uniform"])
def test_density_is_diffusers_density_on_the_same_generator(scheme):
    """Our restatement (needed for vlv's draws) draws what diffusers' own function draws."""
    ours = flow_matching_density(64, torch.Generator().manual_seed(3), scheme, 0.3, 1.2, 1.29)
    theirs = compute_density_for_timestep_sampling(scheme, 64, 0.3, 1.2, 1.29,
                                                   generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours, theirs)


def test_loss_takes_vlv_draws_and_is_deterministic():
    """Any RandomDraws works (training passes per-sample draws), and the same draws give the same loss."""
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    latents = torch.randn(3, 4, 4, 4)
    a = flow_matching_loss(_denoise, sched, latents, GeneratorDraws(torch.Generator().manual_seed(0)))
    b = flow_matching_loss(_denoise, sched, latents, torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_u_of_one_stays_in_the_schedule():
    """'mode' maps u = 0 to 1.0; that index is clamped to the last training step instead of overflowing."""

    class Zeros(GeneratorDraws):
        def rand(self, b, device):
            return torch.zeros(b, device=device)

    seen = []
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    flow_matching_loss(lambda x, t: seen.append(t) or x, sched, torch.randn(2, 4, 4, 4), Zeros(),
                       weighting_scheme="mode")
    assert torch.equal(seen[0], sched.timesteps[[N - 1, N - 1]])


def test_refuses_a_sampling_schedule():
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="training schedule"):
        flow_matching_loss(_denoise, sched, torch.randn(2, 4, 4, 4))


def test_high_noise_fraction_draws_the_noisier_half():
    """A share of 1 puts every index in the schedule's first (noisier) half; 0 leaves diffusers' draws."""
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    seen = []
    flow_matching_loss(lambda x, t: seen.append(t) or x, sched, torch.randn(256, 1, 1, 1),
                       torch.Generator().manual_seed(0), high_noise_fraction=1.0)
    midpoint = sched.timesteps[N // 2]
    assert (seen[0] > midpoint).all() and seen[0].min() < sched.timesteps[N // 2 - 50]  # the whole half, not a point
    latents = torch.randn(3, 4, 4, 4)
    plain = flow_matching_loss(_denoise, sched, latents, torch.Generator().manual_seed(1))
    zero = flow_matching_loss(_denoise, sched, latents, torch.Generator().manual_seed(1), high_noise_fraction=0.0)
    assert torch.equal(plain, zero)
