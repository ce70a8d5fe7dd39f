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


def test_standard_normal_kl_is_the_prior_term_of_both_time_axes_and_keeps_its_small_constant():
    """One formula for KL(N(a x0, (1 - a^2) I) || N(0, I)): it equals the generic Gaussian KL summed over dims (in
    float64), the discrete chain's prior at T and the continuous bound's at gamma_1 agree where alpha_bar_T =
    sigmoid(-gamma_1), the x0-free part a^4 / 2 + ... survives float32 data (the generic KL in float32 loses it), and
    a learned endpoint gets its gradient."""
    import torch.nn.functional as F

    from diffusion_elbo.core import make_schedule
    from diffusion_elbo.core.distributions import normal_kl, standard_normal_kl_nats
    from diffusion_elbo.core.elbo import prior_kl_nats

    x0 = torch.rand(5, 3, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1
    a2 = torch.tensor(0.3, dtype=torch.float64)
    generic = normal_kl(a2.sqrt() * x0, torch.log1p(-a2).expand_as(x0), torch.zeros_like(x0), torch.zeros_like(x0))
    torch.testing.assert_close(standard_normal_kl_nats(x0, a2, torch.log1p(-a2)), generic.flatten(1).sum(1))

    schedule = make_schedule("linear", 1000)  # alpha_bar_T = 4e-5: the constant is ~8e-10 nats per dim
    ab = schedule.alpha_bar[-1]
    exact = 0.5 * (ab * x0**2 - ab - torch.log1p(-ab)).flatten(1).sum(1)  # float64 throughout
    got = prior_kl_nats(schedule, x0.float())
    torch.testing.assert_close(got.double(), exact, rtol=1e-6, atol=0)
    x32 = x0.float()
    lossy = normal_kl(ab.float().sqrt() * x32, torch.log1p(-ab).float().expand_as(x32), torch.zeros_like(x32),
                      torch.zeros_like(x32)).flatten(1).sum(1)  # fmt: skip
    assert (lossy.double() - exact).abs().max() > 10 * (got.double() - exact).abs().max()

    gamma_1 = torch.log1p(-ab) - torch.log(ab)  # the continuous schedule that ends where the chain does
    torch.testing.assert_close(
        standard_normal_kl_nats(x0, torch.sigmoid(-gamma_1), F.logsigmoid(gamma_1)), prior_kl_nats(schedule, x0)
    )
    gamma_max = torch.tensor(float(gamma_1), requires_grad=True)
    a2_learned = torch.sigmoid(-gamma_max.double())
    standard_normal_kl_nats(x0, a2_learned, F.logsigmoid(gamma_max.double())).sum().backward()
    assert gamma_max.grad is not None and gamma_max.grad < 0  # more noise at the end: a smaller prior term
