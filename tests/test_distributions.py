import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from diffusion_elbo.core import discretized_gaussian_log_likelihood, gaussian_log_prob, normal_kl, quantize


def test_normal_kl_matches_torch_distributions(gen):
    m1, m2 = (
        torch.randn(100, generator=gen, dtype=torch.float64),
        torch.randn(100, generator=gen, dtype=torch.float64),
    )
    lv1, lv2 = (
        torch.randn(100, generator=gen, dtype=torch.float64),
        torch.randn(100, generator=gen, dtype=torch.float64),
    )
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected)


def test_gaussian_log_prob_matches_torch_distributions(gen):
    x, m, lv = (torch.randn(50, generator=gen, dtype=torch.float64) for _ in range(3))
    torch.testing.assert_close(gaussian_log_prob(x, m, lv), Normal(m, (0.5 * lv).exp()).log_prob(x))


@pytest.mark.parametrize("num_bins", [2, 17, 256])
@pytest.mark.parametrize(
    "mean, log_scale",
    [
        (0.0, math.log(0.3)),
        (0.93, math.log(1e-3)),
        (-3.0, math.log(0.05)),
        (5.0, math.log(2.0)),
        (0.2, math.log(1e-6)),
    ],
)
def test_discretized_likelihood_sums_to_one_over_the_bins(num_bins, mean, log_scale):
    levels = torch.linspace(-1, 1, num_bins, dtype=torch.float64)
    m = torch.full_like(levels, mean)
    ls = torch.full_like(levels, log_scale)
    logp = discretized_gaussian_log_likelihood(levels, m, ls, num_bins)
    assert torch.isfinite(logp).all()
    assert torch.logsumexp(logp, 0).exp().item() == pytest.approx(1.0, abs=1e-9)


def test_discretized_likelihood_is_finite_far_in_the_tails():
    # The tanh CDF approximation of the DDPM code gives log(0) here; log_ndtr stays exact.
    x = torch.tensor([0.0], dtype=torch.float64)
    f64 = {"dtype": torch.float64}
    logp = discretized_gaussian_log_likelihood(
        x, torch.tensor([0.9], **f64), torch.tensor([math.log(0.01)], **f64), 256
    )
    assert torch.isfinite(logp).all() and logp.item() < -1000
    # Check against the exact value computed independently with the error function in the tail:
    upper = (0.0 - 0.9 + 1 / 255) / 0.01
    lower = (0.0 - 0.9 - 1 / 255) / 0.01
    log_u, log_l = (
        torch.special.log_ndtr(torch.tensor(upper, **f64)),
        torch.special.log_ndtr(torch.tensor(lower, **f64)),
    )
    exact = log_u + torch.log1p(-torch.exp(log_l - log_u))
    assert logp.item() == pytest.approx(exact.item(), rel=1e-9)


def test_discretized_likelihood_approaches_density_times_bin_width_for_wide_gaussians():
    num_bins = 256
    x = torch.linspace(-1, 1, num_bins, dtype=torch.float64)[10:-10]
    mean, log_scale = torch.zeros_like(x), torch.full_like(x, math.log(0.5))
    logp = discretized_gaussian_log_likelihood(x, mean, log_scale, num_bins)
    approx = gaussian_log_prob(x, mean, 2 * log_scale) + math.log(2 / (num_bins - 1))
    torch.testing.assert_close(logp, approx, rtol=0, atol=1e-4)


def test_quantize_maps_to_the_grid():
    x = torch.tensor([-1.5, -1.0, -0.01, 0.49, 1.0, 3.0])
    q = quantize(x, 5)  # grid -1, -0.5, 0, 0.5, 1
    torch.testing.assert_close(q, torch.tensor([-1.0, -1.0, 0.0, 0.5, 1.0, 1.0]))
