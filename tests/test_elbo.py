"""The ELBO machinery checked against exact numbers: Gaussian data and its Bayes-optimal denoiser."""

import itertools
import math

import pytest
import torch

from diffusion_elbo.core import (
    Parametrization,
    UniformSampler,
    consistency_mc_elbo,
    denoising_kl_nats,
    exact_elbo,
    make_schedule,
    mc_elbo,
    p_mean_variance,
    prior_kl_nats,
    q_sample,
)
from diffusion_elbo.core.elbo import term_nats
from diffusion_elbo.core.gaussian_data import gaussian_nll_nats, oracle_expected_terms
from diffusion_elbo.core.timesteps import ImportanceSampler
from diffusion_elbo.models import GaussianOracle

MEAN, STD, DIM = 0.5, 0.8, 8


def gaussian_batch(gen, n=2000, dim=DIM):
    return MEAN + STD * torch.randn(n, dim, generator=gen, dtype=torch.float64)


def se(x):
    return x.std() / math.sqrt(x.numel())


@pytest.mark.parametrize("name, T", [("linear", 50), ("linear", 200), ("cosine", 20), ("cosine", 200)])
def test_exact_evaluator_matches_closed_form_oracle_terms(gen, name, T):
    s = make_schedule(name, T)
    x0 = gaussian_batch(gen)
    r = exact_elbo(GaussianOracle(s, MEAN, STD, "eps"), s, x0, parametrization="eps", generator=gen)
    closed = oracle_expected_terms(s, MEAN, std=STD)
    for got, want in [
        (r.reconstruction / DIM, closed.reconstruction),
        (r.prior / DIM, closed.prior),
        (r.denoising / DIM, closed.denoising),
        (r.total / DIM, closed.total),
    ]:
        assert abs(got.mean().item() - want) < 4 * se(got).item() + 1e-12
    # The per-t profile, pooled over examples, follows the closed form at every t within 5 SE.
    per_t = r.per_t / DIM  # (N, T)
    z = (per_t.mean(0) - closed.per_t) / (per_t.std(0) / math.sqrt(per_t.shape[0]))
    assert z.abs().max() < 5


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_negative_elbo_bounds_true_nll_and_gap_shrinks_with_T(name):
    """The exact evaluator on the same examples and noise seed at growing T: -ELBO - NLL > 0 and shrinking, each
    resolved beyond its paired standard error (the closed form agrees, for all four T)."""
    g = torch.Generator().manual_seed(5)
    x0 = gaussian_batch(g, n=400)
    nll = gaussian_nll_nats(x0, MEAN, STD)
    gaps = []
    for T in [50, 200, 1000]:
        s = make_schedule(name, T)
        r = exact_elbo(GaussianOracle(s, MEAN, STD), s, x0, parametrization="eps", generator=g, max_batch=8192)
        gaps.append((r.total - nll) / DIM)
    assert all(gap.mean() > 5 * se(gap) for gap in gaps)
    for a, b in itertools.pairwise(gaps):
        assert (a - b).mean() > 4 * se(a - b)
    closed = [oracle_expected_terms(make_schedule(name, T), MEAN, std=STD) for T in [50, 100, 1000, 4000]]
    assert all(a.total - a.true_nll > b.total - b.true_nll > 0 for a, b in itertools.pairwise(closed))


def test_exact_evaluator_bounds_the_sampled_true_nll(gen):
    s = make_schedule("cosine", 100)
    x0 = gaussian_batch(gen, n=1000)
    r = exact_elbo(GaussianOracle(s, MEAN, STD), s, x0, parametrization="eps", generator=gen)
    gap = r.total - gaussian_nll_nats(x0, MEAN, STD)
    assert gap.mean() > 5 * se(gap)


def test_eps_x0_v_give_same_elbo(gen):
    s = make_schedule("linear", 100)
    x0 = gaussian_batch(gen, n=64)
    results = []
    # The oracle's x0_hat written as eps and v with coefficients computed here in numpy from the betas, not by the
    # package's conversions, so the evaluator's predict_x0 is checked against an independent inverse.
    import numpy as np

    ab = torch.from_numpy(np.concatenate([[1.0], np.cumprod(1.0 - s.betas[1:].numpy())]))
    oracle = GaussianOracle(s, MEAN, STD, "x0")

    def as_output(p):
        def model(x_t, t):
            a, sd = ab[t].sqrt().view(-1, 1), (1 - ab[t]).sqrt().view(-1, 1)
            x0_hat = oracle(x_t, t)
            eps_hat = (x_t - a * x0_hat) / sd
            return {"x0": x0_hat, "eps": eps_hat, "v": a * eps_hat - sd * x0_hat}[p]

        return model

    for p in Parametrization:
        g = torch.Generator().manual_seed(7)  # same x_t draws for each parametrization
        results.append(exact_elbo(as_output(p.value), s, x0, parametrization=p, generator=g))
    closed = oracle_expected_terms(s, MEAN, std=STD).total
    assert abs(results[0].total.mean() / DIM - closed) < 4 * se(results[0].total / DIM)
    for r in results[1:]:
        torch.testing.assert_close(r.total, results[0].total, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(r.per_t, results[0].per_t, rtol=1e-8, atol=1e-8)


def test_prior_term_matches_its_closed_form(gen):
    s = make_schedule("linear", 1000)
    x0 = gaussian_batch(gen, n=10)
    ab = s.alpha_bar[-1]
    closed = 0.5 * (ab * x0**2 + (1 - ab) - 1 - torch.log(1 - ab)).sum(1)
    torch.testing.assert_close(prior_kl_nats(s, x0), closed)


def test_denoising_kl_is_the_lecture_weighted_x0_error(gen):
    """KL = alpha_bar_{t-1}(1-alpha_t)^2 / (2 sigma_q^2 (1-alpha_bar_t)^2) ||x0_hat - x0||^2 = (SNR(t-1)-SNR(t))/2 ||.||^2."""
    s = make_schedule("cosine", 1000)
    b = 32
    t = torch.randint(2, 1001, (b,), generator=gen)
    x0 = torch.randn(b, 6, generator=gen, dtype=torch.float64)
    x_t = q_sample(s, x0, t=t, generator=gen)
    x0_hat = x0 + 0.3 * torch.randn(b, 6, generator=gen, dtype=torch.float64)
    step = p_mean_variance(s, x0_hat, x_t=x_t, t=t, parametrization="x0", variance="small")
    kl = denoising_kl_nats(s, x0, x_t=x_t, t=t, step=step)
    err = (x0_hat - x0).pow(2).sum(1)
    a, ab, ab_prev = s.alphas[t], s.alpha_bar[t], s.alpha_bar[t - 1]
    lecture = ab_prev * (1 - a) ** 2 / (2 * s.posterior_variance[t] * (1 - ab) ** 2) * err
    torch.testing.assert_close(kl, lecture, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(kl, 0.5 * (s.snr[t - 1] - s.snr[t]) * err, rtol=1e-8, atol=1e-10)


def test_discrete_data_gives_nonnegative_negative_elbo(gen):
    # For data on a K-level grid the decoder is a probability mass, so -ELBO >= -log P >= 0.
    s = make_schedule("linear", 100)
    x0 = torch.randint(0, 17, (50, 1, 4, 4), generator=gen).double() / 8 - 1

    def model(x_t, t):  # a crude denoiser: predicts eps = 0
        return torch.zeros_like(x_t)

    r = exact_elbo(model, s, x0, parametrization="eps", num_bins=17, generator=gen)
    assert (r.total >= 0).all() and (r.reconstruction >= 0).all()


@pytest.mark.parametrize("sampler_kind", ["uniform", "importance"])
def test_mc_estimator_mean_matches_exact_within_standard_error(gen, sampler_kind):
    s = make_schedule("cosine", 100)
    oracle = GaussianOracle(s, MEAN, STD)
    x0 = gaussian_batch(gen, n=20_000, dim=4)
    exact = exact_elbo(oracle, s, x0[:2000], parametrization="eps", generator=gen)
    sampler = UniformSampler(s.T) if sampler_kind == "uniform" else ImportanceSampler(s.T)
    if sampler_kind == "importance":
        # fill the history with observed L_t (10 per t) so p(t) is far from uniform
        sampler.update(torch.arange(1, s.T + 1).repeat(10), exact.per_t[:10].T.reshape(-1))
        assert sampler.warmed_up() and sampler.probs().max() > 5 / s.T
    est = mc_elbo(oracle, s, x0, sampler, parametrization="eps", generator=gen)
    mc_mean, mc_se = est.total.mean().item(), se(est.total).item()
    ex_mean, ex_se = exact.total.mean().item(), se(exact.total).item()
    assert abs(mc_mean - ex_mean) < 4 * math.hypot(mc_se, ex_se)
    # the split into terms is unbiased too
    assert abs(est.reconstruction.mean() - exact.reconstruction.mean()) < 4 * math.hypot(
        se(est.reconstruction), se(exact.reconstruction)
    )


def test_consistency_form_agrees_in_expectation_with_larger_variance(gen, record_property):
    s = make_schedule("cosine", 50)
    oracle = GaussianOracle(s, MEAN, STD)
    x0 = gaussian_batch(gen, n=40_000, dim=2)
    first = consistency_mc_elbo(oracle, s, x0, parametrization="eps", generator=gen)
    second = mc_elbo(oracle, s, x0, UniformSampler(s.T), parametrization="eps", generator=gen).total
    assert abs(first.mean() - second.mean()) < 4 * math.hypot(se(first), se(second))
    ratio = (first.var() / second.var()).item()
    record_property("consistency_over_denoising_variance_ratio", ratio)
    print(f"variance of the first (consistency) form / second (denoising) form: {ratio:.1f}x")
    assert ratio > 2


def test_stratified_estimator_is_unbiased_and_evaluates_small_t_exactly(gen):
    from diffusion_elbo.core.elbo import stratified_elbo, stratified_timesteps

    t, sizes = stratified_timesteps(1000, 32, gen)
    assert int(sizes.sum()) == 1000 and t[0] == 1 and (sizes[:6] == 1).all()  # t = 1..6 exactly
    s = make_schedule("linear", 1000)
    oracle = GaussianOracle(s, MEAN, STD)
    x0 = gaussian_batch(gen, n=400, dim=4)
    exact = exact_elbo(oracle, s, x0, parametrization="eps", generator=gen).total
    strat = torch.stack(
        [stratified_elbo(oracle, s, x0, parametrization="eps", strata=16, generator=gen).total for _ in range(10)]
    ).mean(0)
    assert abs(strat.mean() - exact.mean()) < 4 * math.hypot(se(strat), se(exact))


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_float32_evaluation_matches_float64_on_the_same_noise(name):
    """Every coefficient is formed in float64 and cast once: float32 and float64 evaluations of the same draws
    agree to 1e-5 bits/dim at T = 1000 (casting alpha_bar first gave +4.9e-4 at cosine, almost all of it at t = 1)."""
    T, n, dim = 1000, 32, 16
    s = make_schedule(name, T)
    g = torch.Generator().manual_seed(0)
    x0 = (MEAN + STD * torch.randn(n, dim, generator=g, dtype=torch.float64)).repeat(T, 1)  # (T * n, D), t-major
    noise = torch.randn(T * n, dim, generator=g, dtype=torch.float64)
    t = torch.arange(1, T + 1).repeat_interleave(n)
    bpd = {}
    for dtype in (torch.float32, torch.float64):
        for parametrization in ("eps", "x0", "v"):
            oracle = GaussianOracle(s, MEAN, STD, parametrization)
            term, _ = term_nats(
                oracle,
                s,
                x0.to(dtype),
                t,
                parametrization=parametrization,
                variance="small",
                num_bins=None,
                noise=noise.to(dtype),
            )
            total = term.double().sum() / n + prior_kl_nats(s, x0[:n].to(dtype)).double().mean()
            bpd[dtype, parametrization] = total.item() / dim / math.log(2)
    for parametrization in ("eps", "x0", "v"):
        assert abs(bpd[torch.float32, parametrization] - bpd[torch.float64, parametrization]) < 1e-5
    # and the three parametrizations give one bound (same draws, same oracle x0_hat)
    assert abs(bpd[torch.float64, "eps"] - bpd[torch.float64, "v"]) < 1e-9


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("decoder_variance", ["clipped", "beta"])
def test_decoder_term_on_256_level_data_matches_an_independent_computation(name, decoder_variance):
    """L_1 = -log p(x0 | x_1) for 8-bit data under each decoder convention, against scipy's normal CDF over the bins
    with sigma_1^2 computed here from the betas in numpy: sigma_q^2(2) = beta_2 (1 - alpha_bar_1) / (1 - alpha_bar_2)
    (Ho et al.'s released code) or beta_1 (the lecture)."""
    import numpy as np
    from scipy.stats import norm

    from diffusion_elbo.core import term_from_output

    T, K = 1000, 256
    s = make_schedule(name, T)
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, K, (6, 5), generator=g) * 2.0 / (K - 1) - 1.0).double()
    x0_hat = (x0 + 0.006 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(-1.2, 1.2)
    t = torch.ones(6, dtype=torch.long)
    x_t = q_sample(s, x0, t=t, generator=g)
    common = {"x_t": x_t, "t": t, "out": x0_hat, "parametrization": "x0", "num_bins": K}
    got = term_from_output(s, x0, variance="small", decoder_variance=decoder_variance, **common)

    betas = s.betas[1:].numpy()  # the schedule's betas only; every derived number is recomputed here
    alpha_bar = np.cumprod(1.0 - betas)
    var = betas[1] * (1 - alpha_bar[0]) / (1 - alpha_bar[1]) if decoder_variance == "clipped" else betas[0]
    sd, x, m = math.sqrt(var), x0.numpy(), x0_hat.numpy()
    hi = np.where(x > 1 - 1e-9, np.inf, x + 1.0 / (K - 1))
    lo = np.where(x < -1 + 1e-9, -np.inf, x - 1.0 / (K - 1))
    expected = -np.log(norm.cdf((hi - m) / sd) - norm.cdf((lo - m) / sd)).sum(axis=1)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9)
    # the large variance uses the same sigma_1^2, and the two conventions differ
    large = term_from_output(s, x0, variance="large", decoder_variance=decoder_variance, **common)
    torch.testing.assert_close(large, got)
    other = "beta" if decoder_variance == "clipped" else "clipped"
    alternative = term_from_output(
        s, x0, x_t=x_t, t=t, out=x0_hat, parametrization="x0", variance="small", decoder_variance=other, num_bins=K
    )
    assert (alternative - got).abs().mean() > 0.1


def test_single_step_chain_has_finite_terms_and_gradients():
    """T = 1: the only term is the decoder; the masked denoising KL must not turn its gradient into NaN (the
    placeholder log sigma_q^2 at t = 1 is finite)."""
    s = make_schedule("custom", betas=[0.3])
    assert torch.isfinite(s.posterior_log_variance).all()
    weight = torch.ones(3, dtype=torch.float64, requires_grad=True)
    x0 = torch.randn(5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.ones(5, dtype=torch.long)
    term, _ = term_nats(lambda x_t, t: weight * x_t, s, x0, t, parametrization="x0", variance="small", num_bins=None)
    term.sum().backward()
    assert torch.isfinite(term).all() and torch.isfinite(weight.grad).all()


def test_example_seed_lets_the_base_seed_reach_every_examples_draws():
    """torch's CPU generator keeps 32 bits of its seed, so example_seed folds (seed, index) into 32 bits: another base
    seed gives other draws, seed 0 keeps the index (the draws of every number recorded before the fold), each base
    seed is one-to-one over indices, and base seeds 0..999 start >= 1e6 apart (no shared draws on splits < 10^6)."""
    from diffusion_elbo.core.elbo import SEED_STRIDE, example_generator, example_seed, per_example_draws

    assert torch.Generator().manual_seed(5).initial_seed() == 5
    same = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(same, torch.randn(4, generator=torch.Generator().manual_seed(2**32 + 5)))  # the reason
    assert torch.equal(torch.randn(4, generator=example_generator(0, 5)), same)
    for seed in (1, 2, 12345):
        assert not torch.allclose(torch.randn(4, generator=example_generator(seed, 5)), same)
    (t0, _), n0 = per_example_draws(1000, 4, indices=torch.arange(3), seed=0, shape=(2, 2))
    (t1, _), n1 = per_example_draws(1000, 4, indices=torch.arange(3), seed=1, shape=(2, 2))
    assert not torch.equal(t0, t1) and not torch.equal(n0, n1)
    assert len({example_seed(7, i) for i in range(100_000)}) == 100_000
    starts = sorted(s * SEED_STRIDE % 2**32 for s in range(1000))
    gaps = [b - a for a, b in itertools.pairwise(starts)] + [starts[0] + 2**32 - starts[-1]]
    assert min(gaps) >= 10**6
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match="outside"):
            example_seed(0, bad)
