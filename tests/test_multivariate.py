"""A multivariate noise schedule, one log-SNR per data dimension (issue 33; Sahoo et al. 2024, MuLAN, without its
input-conditioned part): the chain's tables per dimension agree with the scalar chain where every dimension has the
same schedule; the learned schedule's slope and tables; the continuous bound against the Gaussian closed form per
dimension; the bound is tight for the Bayes-optimal denoiser whatever the shapes, and depends on them for any other
(the reason to learn them); end to end from the command line."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.elbo import exact_elbo
from diffusion_elbo.core.forward import q_sample
from diffusion_elbo.core.logsnr import MultivariateLearnedLogSNR, alpha_sigma, float64_gamma
from diffusion_elbo.core.ode import probability_flow_drift
from diffusion_elbo.core.samplers import ancestral_sample, ddim_sample
from diffusion_elbo.core.schedules import cosine_betas
from diffusion_elbo.core.vdm import gaussian_continuous_terms, stratified_continuous_elbo

SHAPE = (1, 2, 2)


def _linear_network(seed: int):
    """A fixed network out = W x + c t that mixes the dimensions, (B, *SHAPE) -> (B, *SHAPE)."""
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)) * 0.3

    def network(x, t):
        return (x.flatten(1) @ w.T.to(x) + 0.01 * t.to(x).view(-1, 1)).view_as(x)

    return network


def test_a_multivariate_chain_whose_dimensions_agree_is_the_scalar_chain():
    """Tables (T + 1, *D) with every dimension on the same betas give the scalar chain's numbers everywhere the chain
    is read: q(x_t | x0), the exact bound (both reverse variances, discretized decoder), ancestral sampling (full and
    respaced), DDIM (eta 0 and 1, logsnr spacing), the continuous interpolation and the ODE's drift."""
    betas = cosine_betas(40)
    scalar = NoiseSchedule(betas)
    multi = NoiseSchedule(betas.view(-1, 1, 1, 1).expand(-1, *SHAPE).clone())
    assert multi.multivariate and multi.event_shape == SHAPE and not scalar.multivariate
    for name in ("alpha_bar", "posterior_variance", "posterior_mean_coef_xt", "snr", "log_alpha_bar_slope"):
        table = getattr(multi, name)
        assert table.shape == (41, *SHAPE)
        torch.testing.assert_close(table, getattr(scalar, name).view(-1, 1, 1, 1).expand_as(table))
    x0 = torch.randn(6, *SHAPE, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    t = torch.tensor([1, 5, 17, 40, 2, 33])
    torch.testing.assert_close(
        q_sample(multi, x0, t=t, generator=torch.Generator().manual_seed(1)),
        q_sample(scalar, x0, t=t, generator=torch.Generator().manual_seed(1)),
    )
    network = _linear_network(0)
    for variance, num_bins in (("small", None), ("large", 5)):
        a, b = (
            exact_elbo(network, s, x0, parametrization="eps", variance=variance, num_bins=num_bins,
                       generator=torch.Generator().manual_seed(2))
            for s in (scalar, multi)
        )  # fmt: skip
        torch.testing.assert_close(b.per_t, a.per_t)
        torch.testing.assert_close(b.prior, a.prior)
    for sample, kwargs in (
        (ancestral_sample, {}),
        (ancestral_sample, {"steps": 10}),
        (ddim_sample, {"steps": 10, "eta": 0.0}),
        (ddim_sample, {"steps": 10, "eta": 1.0, "spacing": "logsnr"}),
    ):
        a, b = (
            sample(network, s, (5, *SHAPE), parametrization="v", generator=torch.Generator().manual_seed(3), **kwargs)
            for s in (scalar, multi)
        )
        torch.testing.assert_close(b, a)
    times = torch.tensor([0.5, 3.25, 39.9])
    for got, want in zip(multi.log_alpha_bar_at(times), scalar.log_alpha_bar_at(times), strict=True):
        torch.testing.assert_close(got, want.view(-1, 1, 1, 1).expand_as(got))
    x, eps_hat = torch.randn(3, *SHAPE, dtype=torch.float64), torch.randn(3, *SHAPE, dtype=torch.float64)
    torch.testing.assert_close(
        probability_flow_drift(multi, x, times, eps_hat), probability_flow_drift(scalar, x, times, eps_hat)
    )


def _shaped(event_shape, centres, gamma_min=-10.0, gamma_max=10.0) -> MultivariateLearnedLogSNR:
    """The learned schedule with each dimension's shape a steep sigmoid step at its own centre in t (plus a small
    linear part), in float64."""
    schedule = MultivariateLearnedLogSNR(event_shape, gamma_min, gamma_max, hidden=1).double()
    with torch.no_grad():
        schedule.w1.fill_(math.log(math.expm1(0.05)))
        schedule.w2.fill_(math.log(math.expm1(8.0)))
        schedule.w3.fill_(math.log(math.expm1(1.0)))
        # sigmoid(8 (2 t - 1) + b) is 1/2 at t = c for b = 8 (1 - 2 c)
        schedule.b2.copy_((8.0 * (1 - 2 * torch.tensor(centres, dtype=torch.float64))).view(*event_shape, 1))
    return schedule


def test_the_learned_schedule_has_one_increasing_gamma_per_dimension_and_its_slope_is_the_derivative():
    schedule = _shaped(SHAPE, [[[0.2, 0.4], [0.6, 0.8]]], gamma_min=-7.0, gamma_max=6.0)
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64, requires_grad=True)
    out = schedule(t)
    assert out.gamma.shape == out.slope.shape == (201, *SHAPE) and out.shape is None  # no variance routing
    (grad,) = torch.autograd.grad(out.gamma.sum(), t)  # each t's dimensions summed: sum_i gamma_i'(t)
    torch.testing.assert_close(out.slope.flatten(1).sum(1), grad)
    assert bool((out.gamma[1:] > out.gamma[:-1]).all())
    gamma_0, gamma_1 = schedule.endpoints()
    assert gamma_0.shape == gamma_1.shape == (1, *SHAPE)
    torch.testing.assert_close(gamma_0, torch.full((1, *SHAPE), -7.0, dtype=torch.float64))
    torch.testing.assert_close(gamma_1, torch.full((1, *SHAPE), 6.0, dtype=torch.float64))
    # the dimensions differ: at t = 0.5 the first two are past their step, the last two before it
    mid = schedule(torch.tensor([0.5], dtype=torch.float64)).gamma.flatten()
    assert bool((mid[:2] > 0).all() and (mid[2:] < 0).all()), mid
    # the chain: alpha_bar of each dimension is sigmoid(-gamma_i) at the grid
    chain = schedule.discretize(50)
    assert chain.T == 51 and chain.event_shape == SHAPE
    grid = torch.arange(51, dtype=torch.float64) / 50
    torch.testing.assert_close(chain.alpha_bar[1:], torch.sigmoid(-float64_gamma(schedule, grid)))
    with pytest.raises(ValueError, match="event_shape"):
        MultivariateLearnedLogSNR([], -7.0, 6.0)


def _own(gamma):
    return gamma


def _mean_level(gamma):  # every dimension read at the mean noise level
    return gamma.mean(dim=1, keepdim=True).expand_as(gamma)


def _gain(mean, cov, gamma):
    """x0_hat = K z + c, the posterior mean of x ~ N(mean, cov) (D,), (D, D) given z = A x + S eps at the noise levels
    gamma (N, D): K = cov A (A cov A + S^2)^-1, c = mean - K A mean, A = diag(alpha), S = diag(sigma)."""
    alpha, sigma = alpha_sigma(gamma)
    a = torch.diag_embed(alpha)
    k = cov @ a @ torch.linalg.inv(a @ cov @ a + torch.diag_embed(sigma**2))  # (N, D, D)
    return k, mean - (k @ (alpha * mean)[..., None])[..., 0]


def _linear_gaussian_x0(mean, cov, view=_own):
    """The denoiser that is Bayes-optimal for x ~ N(mean, cov) at the noise levels ``view(gamma)`` (the true ones for
    :func:`_own`). Output x0."""

    def model(z, gamma):
        k, c = _gain(mean, cov, view(gamma.double()))
        return ((k @ z.double()[..., None])[..., 0] + c).to(z)

    return model


def _expected_bound(schedule, mean, data_cov, model_cov, view=_own, points: int = 20001) -> float:
    """E over x ~ N(mean, data_cov) of the continuous bound (nats) with the denoiser of :func:`_linear_gaussian_x0`, by
    quadrature in t: x0_hat - x = (K A - I)(x - mean) + (K A mean + c - mean) + K S eps, so E(x0_hat - x)_i^2 = e_i(t)
    is the diagonal of (K A - I) data_cov (K A - I)^T + K S^2 K^T plus the squared bias, and the diffusion term is
    1/2 int sum_i gamma_i'(t) SNR_i(t) e_i(t) dt. Reconstruction and prior as in gaussian_continuous_terms, per dimension."""
    with torch.no_grad():
        t = torch.linspace(0.0, 1.0, points, dtype=torch.float64)
        out = schedule(t)
        alpha, sigma = alpha_sigma(out.gamma)  # (N, D)
        k, c = _gain(mean, model_cov, view(out.gamma))
        r = k @ torch.diag_embed(alpha) - torch.eye(mean.numel(), dtype=torch.float64)
        bias = (k @ (alpha * mean)[..., None])[..., 0] + c - mean
        e = torch.diagonal(r @ data_cov @ r.mT + k @ torch.diag_embed(sigma**2) @ k.mT, dim1=-2, dim2=-1) + bias**2
        diffusion = float(torch.trapezoid(0.5 * (out.slope * torch.exp(-out.gamma) * e).sum(dim=1), t))
        gamma_0, gamma_1 = (g.flatten() for g in schedule.endpoints())
        a0_2, s0_2 = torch.sigmoid(-gamma_0), torch.sigmoid(gamma_0)
        a1_2, s1_2 = torch.sigmoid(-gamma_1), torch.sigmoid(gamma_1)
        recon = 0.5 * (torch.log(2 * math.pi * s0_2) + 1 / a0_2)
        prior = 0.5 * (a1_2 * (mean**2 + torch.diagonal(data_cov)) + s1_2 - 1 - torch.log(s1_2))
        return diffusion + float(recon.sum() + prior.sum())


def _bound(model, schedule, x, seed: int, timesteps: int | None = None):
    result = stratified_continuous_elbo(
        model, schedule, x, parametrization="x0", num_bins=None, strata=8, timesteps=timesteps,
        generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    return result.total


def test_the_bound_of_independent_gaussians_is_the_closed_form_of_each_dimension():
    """Independent dimensions with their own means, variances, endpoints and shapes: each dimension's bound under its
    Bayes-optimal denoiser depends on its own endpoints only (VDM eq. 20), so the total is the sum of the per-dimension
    closed forms (:func:`gaussian_continuous_terms`); the package's estimator agrees."""
    means, stds = torch.tensor([0.3, -0.5, 0.0, 1.0]), torch.tensor([0.5, 1.0, 0.2, 0.7])
    schedule = _shaped((4,), [0.1, 0.4, 0.6, 0.95])
    with torch.no_grad():
        schedule.gamma_min.copy_(torch.tensor([-9.0, -6.0, -8.0, -5.0]))
        schedule.gamma_max.copy_(torch.tensor([4.0, 7.0, 5.0, 3.0]))
    g = torch.Generator().manual_seed(0)
    x = means + stds * torch.randn(6000, 4, generator=g, dtype=torch.float64)
    cov = torch.diag(stds.double() ** 2)
    expected = sum(
        gaussian_continuous_terms(float(m), float(s), float(lo), float(hi))["total"]
        for m, s, lo, hi in zip(means, stds, schedule.gamma_min.detach(), schedule.gamma_max.detach(), strict=True)
    )
    assert _expected_bound(schedule, means.double(), cov, cov) == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        total = _bound(_linear_gaussian_x0(means.double(), cov), schedule, x, seed=1)
    se = float(total.std() / math.sqrt(total.numel()))
    assert abs(float(total.mean()) - expected) < 4 * se, (float(total.mean()), expected, se)
    # the 10-step bound of the same model (each dimension's own expm1(gamma_i(t) - gamma_i(s)) weights) lies above the
    # continuous one: a chain of 10 steps loses what T -> infinity recovers (VDM eq. 13 against eq. 17)
    with torch.no_grad():
        ten = _bound(_linear_gaussian_x0(means.double(), cov), schedule, x, seed=1, timesteps=10)
    assert float((ten - total).mean()) > 4 * float((ten - total).std() / math.sqrt(total.numel())), float(ten.mean())


def test_the_t_step_bound_of_the_discrete_oracle_on_a_multivariate_chain_is_above_the_true_nll():
    """The discrete oracle (issue 33's second check for every new schedule): i.i.d. 17-level data, each dimension
    noised on its own schedule (linear, cosine, and two in between, T = 100). The Bayes-optimal denoiser's exact T-step
    bound with the discretized decoder lies above the data's true NLL beyond noise, and is the sum of each dimension's
    bound on its own scalar chain, each above that dimension's NLL."""
    from diffusion_elbo.core.discrete_data import discrete_nll_nats
    from diffusion_elbo.core.schedules import linear_betas
    from diffusion_elbo.data import DiscreteToyDataModule
    from diffusion_elbo.models import DiscreteOracle

    T, dim, bins = 100, 4, 17
    lin, cos = linear_betas(T).double(), cosine_betas(T).double()
    betas = torch.stack([lin, cos, 0.5 * (lin + cos), 0.25 * lin + 0.75 * cos], dim=1)  # (T, 4)
    chain = NoiseSchedule(betas)
    assert chain.multivariate and chain.event_shape == (dim,)
    dm = DiscreteToyDataModule(num_bins=bins, dim=dim, num_train=16, num_val=1, num_test=400, seed=1)
    dm.setup()
    x0 = dm.test_set.tensors[0].double()
    per_dim = [discrete_nll_nats(x0[:, i : i + 1], dm.probs) for i in range(dim)]  # (N,) each
    result = exact_elbo(DiscreteOracle(chain, num_bins=bins), chain, x0, parametrization="eps", variance="small",
                        num_bins=bins, generator=torch.Generator().manual_seed(0), max_batch=8192)  # fmt: skip
    gap = result.total - discrete_nll_nats(x0, dm.probs)
    assert float(gap.mean()) > 5 * float(gap.std() / math.sqrt(gap.numel()))

    # the dimensions are independent and so is the oracle: the bound is the sum of each dimension's bound on its own
    # scalar chain, each above its dimension's NLL. Paired over the examples (only the noise draws differ); this
    # catches gross errors only (a noise draw moves an example's bound by nats): which dimension reads which schedule
    # is pinned by the Gaussian closed forms per dimension above
    def summed(columns_betas):
        out = torch.zeros(x0.shape[0], dtype=torch.float64)
        for i, b in enumerate(columns_betas):
            own = NoiseSchedule(b.contiguous())
            alone = exact_elbo(DiscreteOracle(own, num_bins=bins), own, x0[:, i : i + 1], parametrization="eps",
                               variance="small", num_bins=bins, generator=torch.Generator().manual_seed(3 + i),
                               max_batch=8192)  # fmt: skip
            gap_i = alone.total - per_dim[i]
            assert float(gap_i.mean()) > 3 * float(gap_i.std() / math.sqrt(gap_i.numel())), i
            out += alone.total
        return out

    def z(diff):
        return abs(float(diff.mean())) / float(diff.std() / math.sqrt(diff.numel()))

    assert z(result.total - summed(betas.unbind(1))) < 4


def test_the_bound_is_tight_for_the_optimal_denoiser_whatever_the_shapes_and_depends_on_them_otherwise():
    """Two strongly correlated dimensions, a schedule that noises both together and one that noises them at different
    times. The Bayes-optimal denoiser's bound is the entropy (the expected NLL, up to the endpoints' ~3e-5 nats) under
    both. Any denoiser that is the exact posterior mean of some diffused distribution (here: of independent dimensions)
    has a bound that does not depend on the shapes: the model's reverse process is then that distribution's, and the
    path terms cancel. A denoiser that reads the dimensions at one shared noise level, as a network conditioned on the
    mean level would before it learns the pattern, is exact for the first schedule and pays under the second: the bound
    depends on the shapes, which is what a learned multivariate schedule can use. The estimator agrees throughout."""
    mean = torch.tensor([0.2, -0.1], dtype=torch.float64)
    cov = torch.tensor([[0.25, 0.2375], [0.2375, 0.25]], dtype=torch.float64)  # correlation 0.95
    entropy = 0.5 * float(torch.logdet(2 * math.pi * math.e * cov))
    # gamma_min = -14: sigma_0^2 = 8e-7 against the smallest eigenvalue 0.0125
    schedules = {
        "together": _shaped((2,), [0.5, 0.5], gamma_min=-14.0),
        "apart": _shaped((2,), [0.2, 0.8], gamma_min=-14.0),
    }
    models = {
        "optimal": (cov, _own),
        "independent": (torch.diag(torch.diag(cov)), _own),
        "one level": (cov, _mean_level),
    }
    bound = {
        (who, name): _expected_bound(schedule, mean, cov, *models[who])
        for who in models
        for name, schedule in schedules.items()
    }
    gap = {key: value - entropy for key, value in bound.items()}
    for name in schedules:
        assert gap["optimal", name] == pytest.approx(0.0, abs=1e-4), gap
        assert gap["independent", name] > 1.0, gap  # the correlation it ignores costs nats
    assert gap["independent", "apart"] == pytest.approx(gap["independent", "together"], abs=1e-5)
    assert gap["one level", "together"] == pytest.approx(0.0, abs=1e-4)
    assert gap["one level", "apart"] > 0.2, gap
    x = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((4000,))
    shift = float(-torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x).mean()) - entropy
    for (who, name), expected in bound.items():
        with torch.no_grad():
            total = _bound(_linear_gaussian_x0(mean, *models[who]), schedules[name], x, seed=2)
        se = float(total.std() / math.sqrt(total.numel()))
        # the sample's own NLL is off the entropy by ``shift``; the bound moves with it
        assert abs(float(total.mean()) - shift - expected) < 4 * se + 0.01, (
            who,
            name,
            float(total.mean()),
            expected,
            se,
        )


def test_a_continuous_training_step_gives_the_shapes_the_bounds_gradient():
    """Every schedule parameter, the shapes included, gets the gradient of the bound (variance_gradient, for a scalar
    schedule whose bound ignores its shape, is refused), and the network sees one noise level per example (the mean
    over the dimensions)."""
    from diffusion_elbo.core.losses import ELBOLoss
    from diffusion_elbo.core.parametrization import Parametrization
    from diffusion_elbo.core.reverse import DecoderVariance, ReverseVariance
    from diffusion_elbo.core.time_axis import ContinuousTime, StepContext

    schedule = MultivariateLearnedLogSNR(SHAPE, -8.0, 8.0, hidden=4)
    common = {"objective": ELBOLoss("uniform"), "parametrization": Parametrization.V, "num_bins": 17, "num_dims": 4}
    with pytest.raises(ValueError, match="set schedule.variance_gradient=false"):
        ContinuousTime(schedule, variance_gradient=True, **common)
    with pytest.raises(ValueError, match="set schedule.event_shape"):  # a (1, 2, 2) schedule on 5-dimensional data
        ContinuousTime(schedule, variance_gradient=False, **{**common, "num_dims": 5})
    axis = ContinuousTime(schedule, variance_gradient=False, **common)
    seen = []

    def network(z, c):
        seen.append(c.shape)
        return torch.zeros_like(z) + 0.1 * z

    x0 = torch.randint(0, 17, (16, *SHAPE)).float() / 8 - 1
    ctx = StepContext(network=network, generator=torch.Generator().manual_seed(0), device=x0.device)
    loss = axis.step_loss(
        ctx, x0, variance=ReverseVariance.SMALL, decoder_variance=axis.decoder_variance(DecoderVariance.BETA)
    ).loss
    loss.backward()
    assert seen and all(s == (16,) for s in seen)
    for name, p in schedule.named_parameters():
        assert p.grad is not None and float(p.grad.abs().max()) > 0, name
    # per-dimension endpoints: each dimension's gamma_min gets its own gradient
    assert schedule.gamma_min.grad.flatten().unique().numel() > 1


def test_analytic_variance_is_refused_with_the_fix():
    from diffusion_elbo.core.analytic import analytic_variance_table

    chain = MultivariateLearnedLogSNR(SHAPE, -8.0, 8.0, hidden=2).discretize(10)
    with pytest.raises(ValueError, match="use variance=small"):
        analytic_variance_table(lambda x, t: x, chain, [torch.zeros(2, *SHAPE)], parametrization="eps")


@pytest.mark.slow
def test_schedule_learned_multivariate_trains_evaluates_and_samples(tmp_path):
    """experiment=digits_vdm schedule=learned_multivariate (tiny): the per-pixel parameters move, the schedule's CSV has
    the spread across pixels, the eval job gives the chain's exact bound within noise of the continuous one, and DDIM
    samples."""
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.core.samplers import DDIMSampler
    from diffusion_elbo.evaluation import run_eval
    from diffusion_elbo.training import train
    from tests.helpers import compose_train
    from tests.test_ode_likelihood import _compose_eval

    run_dir = tmp_path / "run"
    cfg = compose_train(
        run_dir,
        ["experiment=digits_vdm", "schedule=learned_multivariate", "schedule.gamma_min=-8", "schedule.gamma_max=8",
         "schedule.eval_timesteps=100", "schedule.lr=0.01", "trainer.max_steps=6", "model.model_channels=16"],
    )  # fmt: skip
    train(cfg, str(run_dir))
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    module = load_for_eval(ckpt).module
    assert isinstance(module.logsnr, MultivariateLearnedLogSNR) and module.schedule.event_shape == (1, 8, 8)
    assert float(module.logsnr.gamma_min.detach().std()) > 0  # the pixels' endpoints moved apart
    header = (run_dir / "schedule" / "step_0000006.csv").read_text().splitlines()[0]
    assert header == "t,gamma,gamma_slope,gamma_lowest,gamma_highest"
    m = run_eval(
        _compose_eval(tmp_path, [f"ckpt_path={ckpt}", "num_examples=8", "fid.num_samples=0", "wandb.enabled=false",
                                 "likelihood.continuous.strata=16"]),
        tmp_path / "eval",
    )  # fmt: skip
    assert m["timesteps"] == 101 and m["schedule"] == "learned_multivariate@100"
    assert m["chain_minus_continuous_bpd"] > -4 * m["chain_minus_continuous_bpd_se"]
    samples = module.sample(4, DDIMSampler(steps=10, spacing="logsnr"), generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()


def test_the_ode_likelihood_of_the_optimal_denoiser_is_the_true_nll_on_a_multivariate_chain():
    """The probability-flow ODE on a multivariate chain (each dimension its own VP SDE): with the Bayes-optimal
    denoiser of correlated Gaussian data the ODE's -log p(x) is the true NLL (change of variables z = a(t0) x with one
    a per dimension)."""
    from diffusion_elbo.core.ode import ode_nll_nats

    mean = torch.tensor([0.2, -0.1], dtype=torch.float64)
    cov = torch.tensor([[0.25, 0.125], [0.125, 0.25]], dtype=torch.float64)  # correlation 0.5
    chain = _shaped((2,), [0.2, 0.8], gamma_min=-14.0).discretize(200)
    optimal = _linear_gaussian_x0(mean, cov)

    def denoise(x_t, t):  # the chain's interface: real times t (B,)
        alpha, sigma = chain.signal_noise(t)  # (B, 2)
        return optimal(x_t, 2 * (torch.log(sigma) - torch.log(alpha)))

    x = torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).sample((64,))
    result = ode_nll_nats(denoise, chain, x, parametrization="x0", divergence="exact", t_start=0.5)
    nll = -torch.distributions.MultivariateNormal(mean, covariance_matrix=cov).log_prob(x)
    # as for the scalar chains (test_ode_likelihood): the mean within 1e-3 bits/dim, each example within 0.02 nats
    assert abs(float((result.nll - nll).mean())) / (2 * math.log(2)) < 1e-3
    torch.testing.assert_close(result.nll, nll, atol=2e-2, rtol=0)


def test_the_plots_of_a_many_dimensional_schedule_draw_its_spread_over_the_dimensions(tmp_path):
    """Up to MAX_DIMENSION_LINES dimensions, a line each; a CIFAR-shaped schedule's 3072 are drawn as the median with
    the 10-90% and min-max bands (a line each took seconds per panel and showed a solid band); both PNGs written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from diffusion_elbo.visualize import MAX_DIMENSION_LINES, plot_curves, save_logsnr_plot, save_schedule_plot

    x = np.linspace(0.0, 1.0, 11)
    rng = np.random.default_rng(0)
    few, many = rng.random((11, MAX_DIMENSION_LINES)), rng.random((11, 3072))
    _, (ax_few, ax_many, ax_one) = plt.subplots(1, 3)
    plot_curves(ax_few, x, few)
    plot_curves(ax_many, x, many, log=True)
    plot_curves(ax_one, x, many[:, 0])
    assert len(ax_few.lines) == MAX_DIMENSION_LINES and not ax_few.collections
    assert len(ax_many.lines) == 1 and len(ax_many.collections) == 2 and ax_many.get_yscale() == "log"
    np.testing.assert_allclose(ax_many.lines[0].get_ydata(), np.median(many, axis=1))
    assert len(ax_one.lines) == 1
    plt.close("all")

    schedule = MultivariateLearnedLogSNR((3, 32, 32))
    chain = schedule.discretize(100)
    assert save_schedule_plot(chain, tmp_path / "schedule.png").stat().st_size > 0
    t = torch.linspace(0.0, 1.0, 11, dtype=torch.float64)
    with torch.no_grad():
        out = schedule(t)
    gamma, slope = out.gamma.flatten(1).numpy(), out.slope.flatten(1).numpy()
    assert save_logsnr_plot(t.numpy(), gamma, slope=slope, path=tmp_path / "logsnr.png", title="t").stat().st_size > 0
