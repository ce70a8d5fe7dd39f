"""Continuous-time diffusion with log-SNR schedules (VDM, Kingma et al. 2021): schedules, the bound against the Gaussian
closed form, the T-step form against the chain's exact evaluator, the variance-minimizing gradient, end to end."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
from torch import nn

from diffusion_elbo.core.chain import InvalidScheduleError
from diffusion_elbo.core.elbo import exact_elbo
from diffusion_elbo.core.logsnr import (
    CosineLogSNR,
    LearnedLogSNR,
    LinearLogSNR,
    alpha_sigma,
    float64_gamma,
)
from diffusion_elbo.core.losses import ELBOLoss, EpsMSE
from diffusion_elbo.core.samplers import AncestralSampler, DDIMSampler
from diffusion_elbo.core.schedules import BetaSchedule, CosineBetas, LinearBetas, beta_log_snr
from diffusion_elbo.core.timesteps import low_discrepancy_uniform, make_timestep_sampler
from diffusion_elbo.core.vdm import (
    chain_denoiser,
    continuous_terms,
    gaussian_continuous_terms,
    gaussian_oracle_x0,
    route_bound_gradient,
    route_variance_gradient,
    sigmoid_weighting,
    step_times,
    v_weight,
)
from diffusion_elbo.lightning.module import DiffusionModule

MEAN, STD = 0.3, 0.5


def _shaped_learned(hidden: int = 16, seed: int = 3) -> LearnedLogSNR:
    """A learned schedule pushed far from linear (same endpoints), in float64."""
    schedule = LearnedLogSNR(-13.3, 5.0, hidden=hidden, seed=seed).double()
    with torch.no_grad():
        schedule.w3.fill_(2.0)
        schedule.w2.mul_(3.0)
    return schedule


def _schedules():
    return {
        "linear": LinearLogSNR(-13.3, 5.0),
        "cosine": CosineLogSNR(-13.3, 5.0),
        "learned": _shaped_learned(),
        "discrete": CosineBetas(1000).window(),  # its latents' window [1/T, 1], as continuous time draws it
    }


def _oracle(parametrization: str):
    """The Bayes-optimal denoiser E[x | z] for x ~ N(MEAN, STD^2), as a network output at gamma."""

    def model(z, gamma):
        x0 = gaussian_oracle_x0(z, gamma, MEAN, STD)
        alpha, sigma = (v.view(-1, *([1] * (z.ndim - 1))).to(z) for v in alpha_sigma(gamma.double()))
        eps = (z - alpha * x0) / sigma
        return {"eps": eps, "x0": x0, "v": alpha * eps - sigma * x0}[parametrization]

    return model


def _gaussian_draw(n: int, d: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = MEAN + STD * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x, torch.rand(n, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", ["linear", "cosine", "learned", "discrete"])
def test_schedule_slope_is_the_derivative_of_gamma_and_gamma_increases(name):
    schedule = _schedules()[name]
    t = torch.linspace(0.0, 1.0, 201, dtype=torch.float64).requires_grad_(True)
    out = schedule(t)
    (autograd,) = torch.autograd.grad(out.gamma.sum(), t)
    torch.testing.assert_close(out.slope, autograd, rtol=1e-7, atol=1e-7)
    assert (out.slope > 0).all() and (out.gamma.diff() > 0).all()
    if name != "discrete":  # the configured endpoints
        gamma_0, gamma_1 = schedule.endpoints(like=t)
        assert float(gamma_0.detach()) == pytest.approx(-13.3, abs=1e-6)
        assert float(gamma_1.detach()) == pytest.approx(5.0, abs=1e-6)


def test_a_beta_schedule_is_a_log_snr_schedule_whose_values_at_the_grid_are_its_tables():
    """One time axis: a beta schedule of T steps has gamma(i / T) = the table's -log SNR_i, gamma(0) = -inf (t = 0 is
    the data), its T-step view is its own chain, and another T' views the same function at i / T'."""
    schedule = LinearBetas(1000)
    chain = schedule.chain
    grid = torch.arange(0, 1001, dtype=torch.float64) / 1000
    gamma = schedule(grid).gamma
    assert gamma[0] == -math.inf and schedule.t_min == 1 / 1000
    torch.testing.assert_close(gamma[1:], -chain.log_snr(), rtol=1e-10, atol=1e-10)
    assert schedule.discretize(1000) is chain  # its own tables, bit for bit
    coarse = schedule.discretize(100)  # latents at t = i / 100, i = 1..100 (t = 0 is the data)
    assert coarse.T == 100
    torch.testing.assert_close(coarse.alpha_bar[1:], chain.alpha_bar[10::10], rtol=1e-9, atol=0)
    fine = schedule.discretize(2000)  # latents at or after t_min = 1 / 1000: i = 2..2000
    assert fine.T == 1999
    torch.testing.assert_close(fine.alpha_bar[1::2], chain.alpha_bar[1:], rtol=1e-9, atol=0)
    # custom betas and the named ones are the same class of object
    same = BetaSchedule(chain.betas[1:].tolist())
    assert torch.equal(same.chain.alpha_bar, chain.alpha_bar) and same.discretize(1000) is same.chain


def test_the_continuous_window_of_a_beta_schedule_runs_from_its_first_step_to_its_last():
    """Continuous time on a beta schedule (``schedule=logsnr_discrete``) draws t on its latents [1 / T, 1], mapped onto
    u in [0, 1]: u = 0 is chain step 1 (the decoder's latent), u = 1 step T, and u = (j - 1) / (T - 1) step j, the
    mapping of the earlier DiscreteLogSNR; the slope is d gamma / du; its chain is the base's own."""
    base = beta_log_snr("linear", 1000)
    window = base.window()
    u = (torch.arange(1, 1001, dtype=torch.float64) - 1) / 999
    torch.testing.assert_close(window(u).gamma, -base.chain.log_snr(), rtol=1e-10, atol=1e-10)
    assert window.discretize(1000) is base.chain and window.reference == base.reference
    for schedule in (LinearLogSNR(-13.3, 5.0), _shaped_learned()):
        assert schedule.window() is schedule  # t_min = 0: the schedule itself
        chain = schedule.discretize(50)  # 51 steps: step j = k + 1 holds z_{k / 50}
        assert chain.T == 51
        expected = float64_gamma(schedule, torch.arange(51, dtype=torch.float64) / 50)
        torch.testing.assert_close(-chain.log_snr(), expected, rtol=1e-9, atol=1e-9)
    with pytest.raises(InvalidScheduleError, match="schedule.base='quartic' is not a beta schedule"):
        beta_log_snr("quartic")


@pytest.mark.parametrize("name", ["linear", "cosine", "learned"])
@pytest.mark.parametrize("parametrization", ["eps", "x0", "v"])
def test_continuous_bound_of_the_gaussian_oracle_depends_only_on_the_endpoints(name, parametrization):
    """VDM eq. 20: with equal gamma_min, gamma_max every shape gives the closed-form expected bound (derived in
    gaussian_continuous_terms); eps, x0 and v give the same per-example values."""
    n, d = 20000, 4
    x, u, eps = _gaussian_draw(n, d)
    expected = gaussian_continuous_terms(MEAN, STD, -13.3, 5.0)
    with torch.no_grad():
        terms = continuous_terms(
            _oracle(parametrization),
            _schedules()[name],
            x0=x,
            u=u,
            eps=eps,
            parametrization=parametrization,
            num_bins=None,
        )
    for key, values in (("diffusion", terms.diffusion), ("total", terms.total)):
        per_dim = values / d
        se = float(per_dim.std()) / math.sqrt(n)
        assert abs(float(per_dim.mean()) - expected[key]) < 4 * se, (key, float(per_dim.mean()), expected[key], se)
    # reconstruction and prior in expectation: their one-sample means sit within 4 SE as well
    for key, values in (("reconstruction", terms.reconstruction), ("prior", terms.prior)):
        per_dim = values / d
        assert abs(float(per_dim.mean()) - expected[key]) < 4 * float(per_dim.std()) / math.sqrt(n) + 1e-12
    if parametrization != "eps":
        with torch.no_grad():
            ref = continuous_terms(
                _oracle("eps"), _schedules()[name], x0=x, u=u, eps=eps, parametrization="eps", num_bins=None
            )
        torch.testing.assert_close(terms.total, ref.total, rtol=1e-9, atol=1e-9)


def test_sigmoid_weighting_is_one_plus_a_monotone_sigmoid_in_gamma():
    """w(gamma) = 1 + c sigmoid(gamma + b): 1 (the bound) at the clean end and for c = 0, 1 + c / 2 at gamma = -b,
    1 + c at the noisy end, non-decreasing in between (Kingma & Gao's condition for a likelihood objective)."""
    gamma = torch.linspace(-30.0, 30.0, 601, dtype=torch.float64)
    w = sigmoid_weighting(gamma, 50.0, 2.0)
    assert float(w[0]) == pytest.approx(1.0, abs=1e-9) and float(w[-1]) == pytest.approx(51.0, abs=1e-9)
    assert float(sigmoid_weighting(torch.tensor([-2.0]), 50.0, 2.0)) == pytest.approx(26.0)
    assert bool((w[1:] >= w[:-1]).all()) and bool((w >= 1).all())
    assert torch.equal(sigmoid_weighting(gamma, 0.0, 2.0), torch.ones_like(gamma))


def _weighted_diffusion_closed_form(weight: float, bias: float, gamma_min: float, gamma_max: float) -> float:
    """1/2 int_{gamma_min}^{gamma_max} w(gamma) mmse_eps(gamma) dgamma per dim for the Gaussian oracle, with the
    optimal eps error mmse_eps = SNR s^2 / (1 + SNR s^2) (SNR = exp(-gamma)), by the trapezoid rule on 2e5 points;
    for w = 1 it is gaussian_continuous_terms' 1/2 log((1 + SNR_0 s^2) / (1 + SNR_1 s^2))."""
    gamma = torch.linspace(gamma_min, gamma_max, 200001, dtype=torch.float64)
    snr = torch.exp(-gamma)
    integrand = 0.5 * sigmoid_weighting(gamma, weight, bias) * snr * STD**2 / (1 + snr * STD**2)
    return float(torch.trapezoid(integrand, gamma))


@pytest.mark.parametrize("name", ["linear", "cosine", "learned"])
def test_sigmoid_weighted_loss_of_the_gaussian_oracle_matches_its_integral_for_every_shape(name):
    """The weighted diffusion term, w(gamma(t)) 1/2 gamma'(t) ||eps - eps_hat||^2 at uniform t, estimates
    1/2 int w(gamma) mmse_eps(gamma) dgamma: like the bound, it depends on the schedule only through the endpoints
    (w is a function of gamma), and it lies above the bound by the lifted noisy end."""
    n, d, weight, bias = 20000, 4, 10.0, 2.0
    assert _weighted_diffusion_closed_form(0.0, 0.0, -13.3, 5.0) == pytest.approx(
        gaussian_continuous_terms(MEAN, STD, -13.3, 5.0)["diffusion"], rel=1e-8
    )
    x, u, eps = _gaussian_draw(n, d, seed=6)
    schedule = _schedules()[name]
    with torch.no_grad():
        log_snr = schedule(u)
        terms = continuous_terms(
            _oracle("v"), schedule, x0=x, u=u, eps=eps, parametrization="v", num_bins=None, log_snr=log_snr
        )
    per_dim = sigmoid_weighting(log_snr.gamma, weight, bias) * terms.diffusion / d
    se = float(per_dim.std()) / math.sqrt(n)
    expected = _weighted_diffusion_closed_form(weight, bias, -13.3, 5.0)
    assert abs(float(per_dim.mean()) - expected) < 4 * se, (float(per_dim.mean()), expected, se)
    assert expected > gaussian_continuous_terms(MEAN, STD, -13.3, 5.0)["diffusion"] + 10 * se


def test_module_trains_on_the_weighted_term_and_refuses_bad_weights():
    """A continuous-time module with sigmoid_weight: the per-example loss is reconstruction + prior + w(gamma(t)) x
    diffusion, and 0 is the bound; a negative weight, or one with loss=simple, is refused naming the fix."""

    d = 3
    x, u, eps = _gaussian_draw(64, d, seed=7)
    net = _GammaMLP(d)

    def module(**kwargs):
        return DiffusionModule(
            net=net, schedule=LinearLogSNR(-13.3, 5.0), data_shape=(d,), num_bins=None,
            objective=ELBOLoss("low_discrepancy", **kwargs),
        )  # fmt: skip

    weighted, plain = module(sigmoid_weight=10.0, sigmoid_bias=2.0), module()
    schedule = weighted.logsnr
    with torch.no_grad():
        log_snr = schedule(u)
        terms = continuous_terms(
            net, schedule, x0=x, u=u, eps=eps, parametrization="eps", num_bins=None, log_snr=log_snr
        )
    w = 1 + 10.0 * torch.sigmoid(log_snr.gamma + 2.0)
    torch.testing.assert_close(weighted.time._training_weights(log_snr), w)
    assert plain.time._training_weights(log_snr) is None
    torch.testing.assert_close(terms.weighted_total(w), terms.reconstruction + terms.prior + w * terms.diffusion)
    torch.testing.assert_close(terms.weighted_total(None), terms.total)
    with pytest.raises(ValueError, match="sigmoid_weight=-1.0 must be >= 0"):
        module(sigmoid_weight=-1.0)
    with pytest.raises(TypeError, match="sigmoid_weight"):  # only the bound has a diffusion term to weight
        EpsMSE(sigmoid_weight=1.0)


def test_v_weight_turns_the_eps_error_into_the_v_error():
    """||v - v_hat||^2 = (1 + exp(gamma)) ||eps - eps_hat||^2 for any v_hat, v = alpha eps - sigma x (Salimans & Ho)."""
    from diffusion_elbo.core.vdm import eps_from_output

    g = torch.Generator().manual_seed(4)
    gamma = torch.linspace(-10.0, 8.0, 7, dtype=torch.float64)
    x, eps, v_hat = (torch.randn(7, 5, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, sigma = (v[:, None] for v in alpha_sigma(gamma))
    z = alpha * x + sigma * eps
    eps_hat = eps_from_output("v", z, gamma, v_hat)
    v_error = ((alpha * eps - sigma * x - v_hat) ** 2).sum(1)
    torch.testing.assert_close(v_weight(gamma) * ((eps - eps_hat) ** 2).sum(1), v_error, rtol=1e-9, atol=1e-12)
    assert float(v_weight(torch.tensor(0.0))) == 2.0


class _ConditionedOracle(nn.Module):
    """The Gaussian oracle as the module's network: it reads gamma back from the conditioning c = 1000 (gamma - lo) /
    (hi - lo) of the reference range (lo, hi)."""

    def __init__(self, reference, parametrization: str) -> None:
        super().__init__()
        self.lo, self.hi = reference
        self.oracle = _oracle(parametrization)
        self.dummy = nn.Parameter(torch.zeros(()))  # the optimizer needs a parameter

    def forward(self, z, c):
        gamma = self.lo + c.double() * (self.hi - self.lo) / 1000.0
        return self.oracle(z.double(), gamma).to(z) + 0 * self.dummy


def test_auxiliary_v_mse_of_the_gaussian_oracle_matches_its_integral_and_leaves_the_schedule_alone():
    """loss.aux_weight: the auxiliary share's loss is ||v - v_hat||^2 / D at uniform t on the cosine log-SNR over the
    reference range; for the Bayes-optimal denoiser of N(MEAN, STD^2) data its expectation is the integral over t of
    (1 + e^gamma) SNR STD^2 / (1 + SNR STD^2) (the eps-space MMSE), and no gradient of it reaches the learned
    schedule (only the bound trains it)."""

    n, d = 40000, 3
    schedule = LearnedLogSNR(-8.0, 8.0, hidden=8)
    module = DiffusionModule(
        net=_ConditionedOracle(schedule.reference, "v"), schedule=schedule, data_shape=(d,), num_bins=None,
        parametrization="v", objective=ELBOLoss("low_discrepancy", aux_weight=2.0, aux_fraction=0.25),
    )  # fmt: skip
    x = MEAN + STD * torch.randn(n, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    bound_part, aux_part = module.time.split_aux(x)
    assert aux_part.shape[0] == n // 4 and torch.equal(torch.cat([bound_part, aux_part]), x)
    denoise = module.time.gamma_denoiser(module.network)
    loss = module.time._aux_loss(module.step_context(), denoise, torch.cat([aux_part] * 4))  # n examples
    t = (torch.arange(200000, dtype=torch.float64) + 0.5) / 200000
    gamma = CosineLogSNR(-8.0, 8.0)(t).gamma
    snr = torch.exp(-gamma)
    expected = float(((1 + torch.exp(gamma)) * snr * STD**2 / (1 + snr * STD**2)).mean())
    # the per-example spread, for the tolerance: one draw of the same estimator, kept per example
    with torch.no_grad():
        u = torch.rand(n, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
        g = CosineLogSNR(-8.0, 8.0)(u).gamma
        eps = torch.randn(n, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        per_example = module.time._noise_mse(denoise, x, eps, g) * v_weight(g)
    se = float(per_example.std()) / math.sqrt(n)
    assert abs(float(per_example.mean()) - expected) < 4 * se
    assert abs(float(loss) - expected) < 4 * se, (float(loss), expected, se)
    loss.backward()
    assert all(p.grad is None for p in module.logsnr.parameters())


def test_auxiliary_loss_is_off_by_default_and_bad_settings_are_refused():

    def module(**kwargs):
        return DiffusionModule(
            net=_GammaMLP(3), schedule=LinearLogSNR(-13.3, 5.0), data_shape=(3,), num_bins=None,
            objective=ELBOLoss("low_discrepancy", **kwargs),
        ).time  # fmt: skip

    x = torch.zeros(8, 3)
    plain = module()
    assert plain.aux_logsnr is None and plain.split_aux(x)[1] is None
    assert module(aux_weight=1.0, aux_fraction=0.01).split_aux(x)[1].shape[0] == 1  # at least one example
    assert module(aux_weight=1.0, aux_fraction=0.99).split_aux(x)[0].shape[0] == 1  # the bound keeps one
    with pytest.raises(ValueError, match="aux_weight=-1.0 must be >= 0"):
        module(aux_weight=-1.0)
    with pytest.raises(ValueError, match="aux_fraction"):
        module(aux_weight=1.0, aux_fraction=1.0)
    with pytest.raises(TypeError, match="aux_weight"):  # a v-MSE share beside the bound: only the bound has one
        EpsMSE(aux_weight=1.0)


def _t_step_closed_form(schedule, timesteps: int) -> float:
    """sum_i 1/2 (SNR(s_i) - SNR(t_i)) mmse(SNR(t_i)) + reconstruction + prior, per dim, for the Gaussian oracle."""
    gamma = float64_gamma(schedule, torch.arange(timesteps + 1, dtype=torch.float64) / timesteps)
    snr = torch.exp(-gamma)
    mmse = STD**2 / (1 + snr * STD**2)
    ends = gaussian_continuous_terms(MEAN, STD, float(gamma[0]), float(gamma[-1]))
    return float(0.5 * ((snr[:-1] - snr[1:]) * mmse[1:]).sum()) + ends["reconstruction"] + ends["prior"]


def test_t_step_bound_matches_its_closed_form_and_tends_to_the_continuous_one():
    schedule = LinearLogSNR(-13.3, 5.0)
    continuous = gaussian_continuous_terms(MEAN, STD, -13.3, 5.0)["total"]
    n, d = 20000, 4
    x, u, eps = _gaussian_draw(n, d, seed=2)
    for T in (10, 100):
        with torch.no_grad():
            terms = continuous_terms(
                _oracle("eps"), schedule, x0=x, u=u, eps=eps, parametrization="eps", num_bins=None, timesteps=T
            )
        per_dim = terms.total / d
        se = float(per_dim.std()) / math.sqrt(n)
        assert abs(float(per_dim.mean()) - _t_step_closed_form(schedule, T)) < 4 * se
    gaps = [_t_step_closed_form(schedule, T) - continuous for T in (10, 100, 1000, 10000)]
    assert all(g > 0 for g in gaps) and all(b < a for a, b in itertools.pairwise(gaps))
    assert gaps[-1] < 1e-2 and gaps[-2] / gaps[-1] == pytest.approx(10.0, rel=0.05)  # O(1 / T): 0.050 at 1000


class _GammaMLP(nn.Module):
    """A small random network of (z, gamma): a generic, non-optimal denoiser."""

    def __init__(self, d: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(d + 1, 32), nn.Tanh(), nn.Linear(32, d)).double()

    def forward(self, z, gamma):
        return 0.3 * self.net(torch.cat([z, gamma[:, None].to(z) / 10], dim=1))


@pytest.mark.parametrize("num_bins", [None, 5])
def test_chain_exact_evaluator_agrees_with_the_models_own_t_step_estimator(num_bins):
    """The continuous model discretized at T steps is a chain of T + 1 steps; its exact evaluator (decoder_variance=
    beta, the identity denoiser at step 1) gives the same bound as the model's own T-step estimator, for a generic
    network, on continuous and on K-level data."""
    T, n, d = 8, 4000, 3
    schedule = _shaped_learned()
    net = _GammaMLP(d)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).clamp(-1, 1)
    if num_bins is not None:
        x = torch.round((x + 1) / 2 * (num_bins - 1)) / (num_bins - 1) * 2 - 1
    chain = schedule.discretize(T)
    with torch.no_grad():
        exact = exact_elbo(
            chain_denoiser(net, chain, "v"),
            chain,
            x,
            parametrization="v",
            variance="small",
            decoder_variance="beta",
            num_bins=num_bins,
            generator=g,
        ).total
        u = torch.rand(n, generator=g, dtype=torch.float64)
        eps = torch.randn(n, d, generator=g, dtype=torch.float64)
        own = continuous_terms(
            net, schedule, x0=x, u=u, eps=eps, parametrization="v", num_bins=num_bins, timesteps=T
        ).total
    diff = float(exact.mean() - own.mean())
    se = math.sqrt(float(exact.var()) / n + float(own.var()) / n)
    assert abs(diff) < 4 * se, (diff, se)


def test_variance_gradient_reaches_the_shape_and_the_bound_gradient_the_endpoints():
    """route_variance_gradient: the shape's parameters get d Var_batch(L) / d eta, the endpoints d mean(L) / d gamma."""
    d = 3
    x, u, eps = _gaussian_draw(64, d, seed=4)
    net = _GammaMLP(d)

    def per_example(schedule):
        log_snr = schedule(u)
        terms = continuous_terms(
            net, schedule, x0=x, u=u, eps=eps, parametrization="eps", num_bins=None, log_snr=log_snr
        )
        return terms.total, log_snr

    schedule = _shaped_learned()
    losses, log_snr = per_example(schedule)
    route_variance_gradient(log_snr, losses)
    losses.mean().backward()
    routed = {name: p.grad.clone() for name, p in schedule.named_parameters()}

    reference = _shaped_learned()
    losses, _ = per_example(reference)
    shape_params = [reference.w1, reference.w2, reference.b2, reference.w3]
    variance = ((losses - losses.mean()) ** 2).mean()
    for name, grad in zip(
        ("w1", "w2", "b2", "w3"), torch.autograd.grad(variance, shape_params, retain_graph=True), strict=True
    ):
        torch.testing.assert_close(routed[name], grad, rtol=1e-6, atol=1e-9)
    ends = torch.autograd.grad(losses.mean(), [reference.gamma_min, reference.gamma_max])
    torch.testing.assert_close(routed["gamma_min"], ends[0])
    torch.testing.assert_close(routed["gamma_max"], ends[1])
    assert all(float(routed[k].abs().max()) > 0 for k in routed)


def test_weighted_loss_trains_the_network_the_endpoints_get_the_bound_and_the_shape_the_weighted_variance():
    """With L_w,i = recon + prior + w_i D_i (w fixed): route_bound_gradient and route_variance_gradient(weights=w)
    give the network d mean(L_w), the endpoints d mean(bound) and the shape d Var_batch(L_w), each checked against
    autograd of that objective alone."""
    d = 3
    x, u, eps = _gaussian_draw(64, d, seed=8)
    weights = 1 + 20 * torch.rand(64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def objectives(schedule, net):
        log_snr = schedule(u)
        terms = continuous_terms(net, schedule, x0=x, u=u, eps=eps, parametrization="v", num_bins=None, log_snr=log_snr)
        trained = terms.weighted_total(weights)
        torch.testing.assert_close(trained, terms.reconstruction + terms.prior + weights * terms.diffusion)
        return trained, terms.total, log_snr

    schedule, net = _shaped_learned(), _GammaMLP(d)
    weighted, _, log_snr = objectives(schedule, net)
    route_bound_gradient(log_snr, weights)
    route_variance_gradient(log_snr, weighted, weights)
    weighted.mean().backward()

    reference, ref_net = _shaped_learned(), _GammaMLP(d)
    weighted, bound, _ = objectives(reference, ref_net)
    shape_params = [reference.w1, reference.w2, reference.b2, reference.w3]
    variance = ((weighted - weighted.mean()) ** 2).mean()
    shape_grads = torch.autograd.grad(variance, shape_params, retain_graph=True)
    for name, grad in zip(("w1", "w2", "b2", "w3"), shape_grads, strict=True):
        torch.testing.assert_close(getattr(schedule, name).grad, grad, rtol=1e-6, atol=1e-9)
    ends = torch.autograd.grad(bound.mean(), [reference.gamma_min, reference.gamma_max], retain_graph=True)
    torch.testing.assert_close(schedule.gamma_min.grad, ends[0])
    torch.testing.assert_close(schedule.gamma_max.grad, ends[1])
    weighted_ends = torch.autograd.grad(weighted.mean(), [reference.gamma_min], retain_graph=True)
    assert not torch.allclose(weighted_ends[0], ends[0], rtol=0.1)  # the weights do change the endpoints' gradient
    net_grads = torch.autograd.grad(weighted.mean(), list(ref_net.parameters()))
    for p, grad in zip(net.parameters(), net_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


@pytest.mark.parametrize("timesteps", [None, 10])
def test_weighted_t_step_loss_gives_the_schedule_the_bounds_gradient(timesteps):
    """L_w,i = recon + prior + w_i D_i (w fixed) with a learned schedule and no variance routing (as for a finite
    schedule.timesteps): route_bound_gradient on gamma(t) and, for T steps, on gamma(s) gives every schedule parameter
    d mean(bound) and the network d mean(L_w). gamma(s)'s half used to keep the weighted gradient (gamma_min: -513
    against the bound's -0.37 in one check)."""
    d = 3
    x, u, eps = _gaussian_draw(64, d, seed=8)
    weights = 1 + 20 * torch.rand(64, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def objectives(schedule, net, route):
        t, s = step_times(u, timesteps)
        at_t, at_s = schedule(t), None if s is None else schedule(s)
        terms = continuous_terms(
            net,
            schedule,
            x0=x,
            u=u,
            eps=eps,
            parametrization="v",
            num_bins=None,
            timesteps=timesteps,
            log_snr=at_t,
            log_snr_s=at_s,
        )
        if route:
            for at in (at_t, at_s):
                if at is not None:
                    route_bound_gradient(at, weights)
        return terms.weighted_total(weights), terms.total

    schedule, net = _shaped_learned(), _GammaMLP(d)
    objectives(schedule, net, route=True)[0].mean().backward()

    reference, ref_net = _shaped_learned(), _GammaMLP(d)
    weighted, bound = objectives(reference, ref_net, route=False)
    names = [name for name, _ in reference.named_parameters()]
    bound_grads = torch.autograd.grad(bound.mean(), list(reference.parameters()), retain_graph=True)
    for name, grad in zip(names, bound_grads, strict=True):
        torch.testing.assert_close(dict(schedule.named_parameters())[name].grad, grad, rtol=1e-6, atol=1e-9)
    (weighted_min,) = torch.autograd.grad(weighted.mean(), [reference.gamma_min], retain_graph=True)
    assert not torch.allclose(weighted_min, schedule.gamma_min.grad, rtol=0.1)  # the weights matter to the endpoint
    net_grads = torch.autograd.grad(weighted.mean(), list(ref_net.parameters()))
    for p, grad in zip(net.parameters(), net_grads, strict=True):
        torch.testing.assert_close(p.grad, grad)


def test_chain_denoiser_uses_the_identity_decoder_only_at_integer_step_1():
    """Chain step 1 (integer) is the decoder: x0_hat = x_1 / alpha_0; a real t = 1.0 (where the probability-flow ODE
    starts) is the network at that noise level, gamma_min."""
    d = 3
    net, chain = _GammaMLP(d), _shaped_learned().discretize(8)
    x = torch.randn(5, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        decoder = chain_denoiser(net, chain, "x0")(x, torch.ones(5, dtype=torch.long))
        real = chain_denoiser(net, chain, "x0")(x, torch.ones(5, dtype=torch.float64))
        alpha, sigma = chain.signal_noise(torch.ones(5, dtype=torch.float64))
        gamma = 2.0 * (torch.log(sigma) - torch.log(alpha))
        torch.testing.assert_close(decoder, x / alpha.view(-1, 1))
        torch.testing.assert_close(real, net(x, gamma))


def test_low_discrepancy_times_cover_every_stratum_once_and_are_uniform():
    g = torch.Generator().manual_seed(0)
    u = low_discrepancy_uniform(16, generator=g)
    assert torch.equal(torch.sort((u * 16).floor()).values, torch.arange(16, dtype=torch.float64))
    draws = torch.cat([low_discrepancy_uniform(7, generator=g) for _ in range(3000)])  # marginally U[0, 1)
    hist = torch.histc(draws.float(), bins=10, min=0, max=1) / draws.numel()
    assert (hist - 0.1).abs().max() < 0.01
    t, w = make_timestep_sampler("low_discrepancy", 1000).sample(10, generator=g)
    assert t.min() >= 1 and t.max() <= 1000 and torch.equal(torch.sort((t - 1) // 100).values, torch.arange(10))
    assert torch.all(w == 1000)


def test_unet_fourier_features_add_sin_and_cos_channels_of_the_input():
    from diffusion_elbo.models import UNet

    net = UNet(
        1,
        8,
        model_channels=16,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[],
        fourier_features=[3, 4],
        num_groups=8,
    )
    assert net.conv_in.in_channels == 5
    x = torch.linspace(-1, 1, 17).repeat(4)[:64].view(1, 1, 8, 8)
    features = net._with_fourier_features(x)
    torch.testing.assert_close(features[:, 1], torch.sin(2 * math.pi * 8 * x[:, 0]))
    torch.testing.assert_close(features[:, 4], torch.cos(2 * math.pi * 16 * x[:, 0]))
    # on the 17-level grid (spacing 1/8) the period-1/8 sine vanishes: the features locate z between the levels
    assert features[:, 1].abs().max() < 1e-4
    assert net(x, torch.tensor([3.0])).shape == x.shape


def test_bad_log_snr_settings_are_refused():
    with pytest.raises(InvalidScheduleError, match="gamma_min < schedule.gamma_max"):
        LinearLogSNR(gamma_min=5.0, gamma_max=-13.3)
    with pytest.raises(InvalidScheduleError, match="gamma_min < schedule.gamma_max"):
        LearnedLogSNR(gamma_min=0.0, gamma_max=0.0)


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["schedule=learned", "loss=simple"], "loss=vdm"),
        (["schedule=learned", "loss=elbo"], "importance sampling is for discrete"),
        (["schedule=logsnr_linear", "loss=vdm", "variance=learned_range"], "leave variance=small"),
        (["schedule=logsnr_cosine", "loss=hybrid", "variance=learned_range"], "loss=vdm"),
        (["schedule=learned", "loss=vdm", "schedule.gamma_min=6"], "must be below schedule.gamma_max"),
        (["schedule=learned", "loss=vdm", "loss.sigmoid_weight=-1"], "sigmoid_weight=-1 must be >= 0"),
        (
            ["schedule=logsnr_cosine", "loss=simple", "+loss.sigmoid_weight=5"],
            "loss.sigmoid_weight is not an argument of EpsMSE",
        ),
        (["loss=vdm", "loss.sigmoid_weight=5"], "schedule=sigmoid is discrete"),
        (["schedule=learned", "loss=vdm", "loss.aux_weight=-1"], "aux_weight=-1 must be >= 0"),
        (["schedule=learned", "loss=vdm", "loss.aux_weight=1", "loss.aux_fraction=0"], "use 0 < it < 1"),
        (
            ["schedule=logsnr_cosine", "loss=simple", "+loss.aux_weight=1"],
            "loss.aux_weight is not an argument of EpsMSE",
        ),
        (["loss=vdm", "loss.aux_weight=1"], "schedule=sigmoid is discrete"),
    ],
)
def test_continuous_config_refusals_name_the_fix(tmp_path, overrides, fragment):
    from diffusion_elbo.config import ConfigError, validate_config
    from tests.helpers import compose_train

    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        validate_config(compose_train(tmp_path, overrides))


@pytest.mark.slow
def test_learned_schedule_trains_evaluates_and_samples_end_to_end(tmp_path):
    """experiment=digits_vdm (tiny): the schedule's parameters and the network train, validation logs the bound and
    the endpoints, and the checkpoint evaluates to the chain's exact bound beside the continuous one, and samples."""
    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.evaluation import run_eval
    from diffusion_elbo.training import train
    from tests.helpers import compose_train, run_cli
    from tests.test_ode_likelihood import _compose_eval

    run_dir = tmp_path / "run"
    cfg = compose_train(
        run_dir,
        ["experiment=digits_vdm", "trainer.max_steps=6", "model.model_channels=16", "schedule.eval_timesteps=100",
         "schedule.lr=0.01", "schedule.hidden=8"],
    )  # fmt: skip
    train(cfg, str(run_dir))
    loaded = load_for_eval(run_dir / "checkpoints" / "last.ckpt")
    module = loaded.module
    assert module.logsnr.learned and module.time.variance_gradient and module.time.timesteps is None
    # the preset's hybrid: v-prediction, half of each batch on the v-MSE on a fixed cosine over [-8, 8]
    assert module.parametrization.value == "v" and module.time.aux_weight == 4.0 and module.time.aux_fraction == 0.5
    assert [float(g) for g in module.time.aux_logsnr.endpoints()] == pytest.approx([-8.0, 8.0], abs=1e-4)
    initial = LearnedLogSNR(-8.0, 8.0, hidden=8)
    moved = {
        n: float((p - dict(initial.named_parameters())[n]).abs().max()) for n, p in module.logsnr.named_parameters()
    }
    assert all(v > 0 for v in moved.values()), moved
    # the chain follows the loaded (EMA) schedule
    torch.testing.assert_close(
        -module.schedule.log_snr(), float64_gamma(module.logsnr, torch.arange(101, dtype=torch.float64) / 100)
    )
    # the schedule after every validation: gamma(t) on a grid, ending at the loaded endpoints after the last one
    tables = sorted((run_dir / "schedule").glob("step_*.csv"))
    assert [p.stem for p in tables] == ["step_0000003", "step_0000006"]
    assert (run_dir / "schedule" / "step_0000006.png").is_file()
    last = tables[-1].read_text().splitlines()
    assert last[0] == "t,gamma,gamma_slope" and len(last) == 102
    gamma_0, gamma_1 = (float(line.split(",")[1]) for line in (last[1], last[-1]))
    ends = module.logsnr.endpoints()
    # (the checkpoint holds the EMA after the final update, one step past the last validation)
    assert gamma_0 == pytest.approx(float(ends[0]), abs=1e-3) and gamma_1 == pytest.approx(float(ends[1]), abs=1e-3)
    rows = (run_dir / "csv").rglob("metrics.csv")
    header = next(iter(rows)).read_text().splitlines()[0]
    for key in (
        "val/elbo_bpd",
        "val/gamma_min",
        "val/gamma_max",
        "train/elbo_bpd_std",
        "val/denoising_bpd",
        "train/aux_v_mse",
    ):
        assert key in header
    m = run_eval(
        _compose_eval(tmp_path, [f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_examples=8",
                                 "fid.num_samples=0", "wandb.enabled=false", "likelihood.continuous.strata=16"]),
        tmp_path / "eval",
    )  # fmt: skip
    assert m["timesteps"] == 101 and m["decoder_variance"] == "beta" and m["continuous"]["timesteps"] is None
    c = m["continuous"]
    assert set(c["terms_nats_per_dim"]) == {"reconstruction", "prior", "denoising"}
    # both bound the same model: the 100-step chain's bound sits above the continuous one, or within noise of it
    assert m["chain_minus_continuous_bpd"] > -4 * m["chain_minus_continuous_bpd_se"]
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["continuous"]["bpd"] == c["bpd"]
    # src/eval.py on 2 processes: both bounds sharded over the ranks (each example with its own draws) give the same
    result = run_cli(
        "eval.py", f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}", "num_examples=8", "fid.num_samples=0",
        "wandb.enabled=false", "likelihood.continuous.strata=16", "trainer.accelerator=cpu", "trainer.devices=2",
        f"hydra.run.dir={tmp_path / 'eval2'}", env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / "eval2" / "metrics.json").read_text())
    assert two["continuous"]["num_examples"] == two["num_examples"] == 8
    for key in ("bpd", "bpd_se"):
        assert two[key] == pytest.approx(m[key], rel=1e-5) and two["continuous"][key] == pytest.approx(c[key], rel=1e-5)
    samples = module.sample(4, AncestralSampler(), generator=torch.Generator().manual_seed(0))
    ddim = module.sample(4, DDIMSampler(steps=10), generator=torch.Generator().manual_seed(0))
    assert samples.shape == ddim.shape == (4, 1, 8, 8) and torch.isfinite(samples).all()
    # the preset samples on evenly spaced log-SNR, and sampling the checkpoint keeps its grid unless told otherwise
    from diffusion_elbo.checkpoints import sampler_spacing

    assert cfg.callbacks.fid.sampler.spacing == cfg.callbacks.sample_grid.sampler.spacing == "logsnr"
    assert sampler_spacing(None, loaded.config) == "logsnr"
    on_logsnr = module.sample(4, DDIMSampler(steps=10, spacing="logsnr"), generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(on_logsnr).all()  # (6 steps leave the schedule near its linear start: the same grid here)


def test_mixed_precision_runs_the_network_under_autocast_and_the_terms_in_float32(tmp_path):
    from diffusion_elbo.builders import build_module
    from tests.helpers import compose_train

    cfg = compose_train(tmp_path, ["schedule=learned", "loss=vdm", "model.model_channels=16", "schedule.hidden=4"])
    module, _datamodule = build_module(cfg)
    dtypes = []
    module.net.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    x0 = torch.rand(8, 1, 8, 8) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = module.training_step((x0, torch.zeros(8)), 0)
    assert dtypes == [torch.bfloat16] and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert module.logsnr.gamma_min.grad is not None and torch.isfinite(module.logsnr.w3.grad).all()
    dtypes.clear()
    module.training_step((x0, torch.zeros(8)), 0)  # without autocast: float32 throughout
    assert dtypes == [torch.float32]


@pytest.mark.parametrize("schedule", ["learned", "linear"])
def test_validation_bound_is_float32_under_bf16_autocast(tmp_path, schedule):
    """bf16 network outputs bias the bound (+0.05 bits/dim on the CIFAR-10 UNet on an H200): validation evaluates it
    with the network in float32 whatever the trainer's precision, so bf16-mixed and 32-true runs report the same."""
    from diffusion_elbo.builders import build_module
    from tests.helpers import compose_train

    extra = (
        ["schedule=learned", "loss=vdm", "schedule.hidden=4"] if schedule == "learned" else ["schedule.timesteps=50"]
    )
    module, _ = build_module(compose_train(tmp_path, ["model.model_channels=16", "val_strata=4", *extra]))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.net.parameters():  # away from the zero-initialised output layer, whose output is exactly 0
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    module.eval()  # as Lightning's validation loop: no dropout
    dtypes = []
    module.net.register_forward_hook(lambda mod, args, out: dtypes.append(out.dtype))
    batch = (torch.rand(6, 1, 8, 8, generator=g) * 2 - 1, torch.zeros(6), torch.arange(6))
    values = []
    for amp in (False, True):
        module.on_validation_epoch_start()
        module.val_elbo.reset()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            module.validation_step(batch, 0)
        values.append(float(next(iter(module.val_elbo.compute().values()))))
    assert set(dtypes) == {torch.float32}
    assert values[0] == values[1]


def test_learned_schedule_endpoints_follow_the_schedule_to_its_device():
    """endpoints() without ``like`` built its t on the CPU, so a learned schedule on a GPU failed at the first logged
    step (seen on an H200); the meta device stands in for a GPU here."""
    schedule = LearnedLogSNR(gamma_min=-13.3, gamma_max=5.0, hidden=4).to("meta")
    gamma_0, gamma_1 = schedule.endpoints()
    assert gamma_0.device.type == gamma_1.device.type == "meta"


@pytest.mark.parametrize("timesteps", [None, 1000])
def test_the_gaussian_oracle_on_continuous_schedules_gives_the_closed_form_bound_from_the_cli(tmp_path, timesteps):
    """`python src/eval.py data=gaussian model=gaussian_oracle schedule=logsnr_linear|logsnr_cosine` (no checkpoint):
    the oracle's continuous-time bound equals the closed form, which depends on the endpoints only (VDM eq. 20), within
    4 SE for both shapes, and the two shapes agree within 4 SE of their paired difference; with
    schedule.timesteps=1000 each shape's 1000-step bound equals its own closed form. The chain's exact T-step bound
    beside it (as for a continuous checkpoint) equals the 1000-step closed form too: before, the oracle crashed on a
    continuous schedule, and the chain took the discrete default decoder (38.6 instead of 1.81 bpd)."""
    from diffusion_elbo.records import paired_difference
    from tests.helpers import run_cli

    closed_bpd = {}
    for name in ("logsnr_linear", "logsnr_cosine"):
        out = tmp_path / name
        result = run_cli(
            "eval.py", "data=gaussian", "model=gaussian_oracle", f"schedule={name}",
            f"schedule.timesteps={'null' if timesteps is None else timesteps}", f"data.mean={MEAN}", f"data.std={STD}",
            "num_examples=500", "likelihood.continuous.strata=16", "wandb.enabled=false", f"hydra.run.dir={out}",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        m = json.loads((out / "metrics.json").read_text())
        c = m["continuous"]
        assert c["timesteps"] == timesteps and c["num_examples"] == m["num_examples"] == 500 and "bpd" in m
        schedule = (LinearLogSNR if name == "logsnr_linear" else CosineLogSNR)(-13.3, 5.0)
        closed = (
            gaussian_continuous_terms(MEAN, STD, -13.3, 5.0)["total"]
            if timesteps is None
            else _t_step_closed_form(schedule, timesteps)
        )
        se = c["bpd_se"] * math.log(2.0)
        assert abs(c["nats_per_dim"] - closed) < 4 * se, (name, c["nats_per_dim"], closed, se)
        assert c["gap_bpd"] > 0  # a bound on the data's true NLL
        # the chain's exact bound (T + 1 = 1001 steps: z_{k/T}, k = 0..1000; sigma_0^2 = beta_1 as a continuous model's
        # chain) is the 1000-step one
        assert m["decoder_variance"] == "beta" and m["timesteps"] == 1001
        chain = _t_step_closed_form(schedule, 1000)
        assert abs(m["nats_per_dim"] - chain) < 4 * m["bpd_se"] * math.log(2.0), (name, m["nats_per_dim"], chain)
        closed_bpd[name] = closed / math.log(2.0)
    diff, diff_se = paired_difference(
        tmp_path / "logsnr_linear" / "per_example.csv", tmp_path / "logsnr_cosine" / "per_example.csv",
        "continuous_bpd",
    )  # fmt: skip
    # the same bound in continuous time; the 1000-step ones differ by their shapes' O(1/T) terms
    assert abs(diff - (closed_bpd["logsnr_linear"] - closed_bpd["logsnr_cosine"])) < 4 * diff_se


def test_an_mse_weighting_in_continuous_time_is_its_weight_over_snr_times_the_eps_error():
    """Any MSE weighting trains a fixed log-SNR schedule: loss=v_mse gives w / SNR ||eps - eps_hat||^2 per dim with
    w = SNR + 1, which is the v-MSE ||v - v_hat||^2 per dim of Salimans & Ho (v - v_hat = (eps - eps_hat) / alpha and
    (SNR + 1) / SNR = 1 / alpha^2); L_simple stays the eps-MSE itself."""
    from diffusion_elbo.core.logsnr import alpha_sigma
    from diffusion_elbo.core.losses import VMSE

    d = 3
    x, u, eps = _gaussian_draw(256, d, seed=11)

    def module(objective):
        return DiffusionModule(
            net=_GammaMLP(d), schedule=LinearLogSNR(-13.3, 5.0), data_shape=(d,), num_bins=None, parametrization="v",
            objective=objective,
        )  # fmt: skip

    v_module, simple = module(VMSE(timestep_sampling="low_discrepancy")), module(EpsMSE())
    log_snr = v_module.logsnr(u.double())
    gamma = log_snr.gamma
    alpha, sigma = (s[:, None] for s in alpha_sigma(gamma))
    z = alpha * x + sigma * eps
    v_denoise, simple_denoise = (m.time.gamma_denoiser(m.network) for m in (v_module, simple))
    v_hat = v_denoise(z, gamma)
    v_mse = ((v_hat - (alpha * eps - sigma * x)) ** 2).mean()
    torch.testing.assert_close(
        v_module.time._mse_loss(v_denoise, x, eps, log_snr).double(), v_mse.double(), rtol=1e-5, atol=0
    )
    torch.testing.assert_close(
        simple.time._mse_loss(simple_denoise, x, eps, log_snr),
        simple.time._noise_mse(simple_denoise, x, eps, gamma).mean(),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["schedule=learned", "loss=simple", "schedule.hidden=4"], "which loss=simple leaves out: use loss=vdm"),
        (["schedule=logsnr_linear", "loss=elbo"], "importance sampling is for discrete"),
        (["schedule=logsnr_cosine", "loss=x0_mse_weighted"], "got loss=x0_mse_weighted"),
        (["loss=vdm", "loss.sigmoid_weight=5"], "schedule=sigmoid is discrete"),
        (["variance=learned_range", "loss=simple"], "use loss=hybrid"),
        (["variance=small", "loss=hybrid"], "set variance=learned_range"),
    ],
)
def test_objective_rules_are_written_once_and_refused_by_the_config_and_the_module_alike(tmp_path, overrides, fragment):
    """Objective.problems holds each rule: the config check names it before any work, and a module built around the
    same objects (as a script that skips the check would) refuses to fit with the same words."""
    from diffusion_elbo.builders import build_module
    from diffusion_elbo.config import ConfigError, validate_config
    from tests.helpers import compose_train

    cfg = compose_train(tmp_path, overrides)
    with pytest.raises(ConfigError, match=fragment):
        validate_config(cfg)
    module, _ = build_module(cfg)
    with pytest.raises(ValueError, match=fragment):
        module.setup("fit")
    module.setup("validate")  # evaluating such a module is not training it


def test_the_validation_profile_labels_strata_with_the_chain_steps_their_window_spans():
    """t in [0, 1] spans chain steps 1 .. T + 1 of VDM's chain (T + 1 steps) and 1 .. T of a beta schedule's own chain:
    the profile's strata cover those steps (decoder first, width 1)."""
    from diffusion_elbo.core.time_axis import ContinuousTime

    common = {"objective": None, "parametrization": "eps", "num_bins": None, "num_dims": 4, "eval_timesteps": 100}
    vdm = ContinuousTime(LinearLogSNR(-13.3, 5.0), **common)
    beta = ContinuousTime(beta_log_snr("linear", 100), **common)
    assert (vdm.chain.T, vdm.chain_span) == (101, 100) and (beta.chain.T, beta.chain_span) == (100, 99)
    assert beta.profile_weights(4).tolist() == [1.0, 24.75, 24.75, 24.75, 24.75]
    assert float(vdm.profile_weights(4).sum()) == 101.0 and float(beta.profile_weights(4).sum()) == 100.0
