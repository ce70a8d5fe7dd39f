import math

import pytest
import torch

from diffusion_elbo.core import (
    ImportanceSampler,
    Parametrization,
    UniformSampler,
    ancestral_sample,
    ddim_sample,
    denoising_kl_nats,
    make_schedule,
    p_mean_variance,
    q_sample,
    training_target,
    weighted_mse,
)
from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.losses import MSE_LOSSES, X0MSE, EpsMSE, WeightedX0MSE
from diffusion_elbo.core.parametrization import output_from_x0
from diffusion_elbo.core.samplers import respaced_timesteps, spaced_timesteps
from diffusion_elbo.models import GaussianOracle


def _setup(gen, b=64, d=5, T=1000):
    s = make_schedule("cosine", T)
    t = torch.randint(1, T + 1, (b,), generator=gen)
    x0, eps = (torch.randn(b, d, generator=gen, dtype=torch.float64) for _ in range(2))
    x_t = q_sample(s, x0, t=t, noise=eps)
    x0_hat = x0 + 0.2 * torch.randn(b, d, generator=gen, dtype=torch.float64)
    return s, t, x0, eps, x_t, x0_hat


@pytest.mark.parametrize("loss", list(MSE_LOSSES))
def test_mse_losses_do_not_depend_on_the_parametrization(gen, loss):
    s, t, x0, eps, x_t, x0_hat = _setup(gen)
    weight = MSE_LOSSES[loss]().x0_weight(s, t)
    values = []
    for p in Parametrization:
        out = output_from_x0(p, s, x_t=x_t, t=t, x0=x0_hat)  # the same prediction, written as eps, x0 or v
        values.append(
            weighted_mse(weight, p, schedule=s, t=t, out=out, target=training_target(p, s, x0=x0, t=t, eps=eps))
        )
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], rtol=1e-7, atol=1e-9)


def test_simple_loss_is_unweighted_eps_mse(gen):
    s, t, x0, eps, x_t, x0_hat = _setup(gen)
    eps_hat = output_from_x0("eps", s, x_t=x_t, t=t, x0=x0_hat)
    simple = weighted_mse(EpsMSE().x0_weight(s, t), "eps", schedule=s, t=t, out=eps_hat, target=eps)
    torch.testing.assert_close(simple, (eps_hat - eps).pow(2).mean(1))
    x0_mse = weighted_mse(X0MSE().x0_weight(s, t), "x0", schedule=s, t=t, out=x0_hat, target=x0)
    torch.testing.assert_close(x0_mse, (x0_hat - x0).pow(2).mean(1))


def test_weighted_x0_mse_equals_the_elbo_denoising_term(gen):
    s, t, x0, eps, x_t, x0_hat = _setup(gen)
    t = t.clamp(min=2)
    x_t = q_sample(s, x0, t=t, noise=eps)
    kl = denoising_kl_nats(
        s, x0, x_t=x_t, t=t, step=p_mean_variance(s, x0_hat, x_t=x_t, t=t, parametrization="x0", variance="small")
    )
    loss = (
        weighted_mse(WeightedX0MSE().x0_weight(s, t), "x0", schedule=s, t=t, out=x0_hat, target=x0) * x0.shape[1]
    )  # per dim -> summed
    torch.testing.assert_close(loss, kl, rtol=1e-8, atol=1e-10)


def test_importance_sampler_follows_root_mean_square_loss_and_stays_unbiased():
    T = 5
    sampler = ImportanceSampler(T, history=4, uniform_prob=0.0)
    assert torch.allclose(sampler.probs(), torch.full((T,), 0.2, dtype=torch.float64))
    losses = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0], dtype=torch.float64)
    for _ in range(5):  # more than the history: old values roll out
        sampler.update(torch.arange(1, T + 1), losses)
    assert sampler.warmed_up()
    torch.testing.assert_close(sampler.probs(), losses / losses.sum())
    # Unbiased for any per-t quantity, not only the one the probabilities follow (for that one, L_t / p(t) is the
    # sum at every draw): new terms f(t) that the history has not seen, with and without the uniform mix.
    f = torch.tensor([8.0, 0.5, 3.0, 1.0, 2.0], dtype=torch.float64)
    for uniform_prob in (0.0, 0.3):
        sampler.uniform_prob = uniform_prob
        g = torch.Generator().manual_seed(0)
        t, w = sampler.sample(400_000, generator=g)
        values = f[t - 1] * w
        assert values.std() > 1.0  # not constant: the test can see a wrong weight
        assert abs(values.mean().item() - f.sum().item()) < 4 * values.std().item() / math.sqrt(values.numel())


def test_uniform_sampler_weights_are_T():
    t, w = UniformSampler(10).sample(1000, generator=torch.Generator().manual_seed(0))
    assert t.min() == 1 and t.max() == 10 and (w == 10).all()


def test_respaced_timesteps_are_descending_and_include_T():
    ts = respaced_timesteps(1000, 50)
    assert ts[0] == 1000 and ts[-1] == 1 and len(ts) == 50 and ts == sorted(ts, reverse=True)
    with pytest.raises(ValueError, match="sampler.steps"):
        respaced_timesteps(100, 101)
    assert respaced_timesteps(100, 1) == [100]  # a one-step sampler starts from the noise


def _gaps(schedule, ts):
    """The log-SNR steps between consecutive visited timesteps."""
    lam = schedule.log_snr()
    return (lam[torch.tensor(ts[1:]) - 1] - lam[torch.tensor(ts[:-1]) - 1]).abs()


def test_logsnr_spacing_is_time_spacing_where_log_snr_is_linear_in_t():
    T = 1000
    lam = torch.linspace(10.0, -10.0, T, dtype=torch.float64)  # log SNR(t) at t = 1..T
    alpha_bar = torch.cat([torch.ones(1, dtype=torch.float64), torch.sigmoid(lam)])
    s = NoiseSchedule(1.0 - alpha_bar[1:] / alpha_bar[:-1])
    for steps in (2, 10, 50, 333):  # grids with no half-integer timesteps (where rounding ties could go either way)
        assert spaced_timesteps(s, steps, "logsnr") == respaced_timesteps(T, steps) == spaced_timesteps(s, steps)


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
@pytest.mark.parametrize("steps", [2, 10, 50, 999, 1000])
def test_logsnr_spacing_gives_steps_distinct_timesteps_from_T_to_1(name, steps):
    s = make_schedule(name, 1000)
    ts = spaced_timesteps(s, steps, "logsnr")
    assert len(ts) == len(set(ts)) == steps and ts == sorted(ts, reverse=True) and ts[0] == 1000 and ts[-1] == 1
    assert spaced_timesteps(s, 1, "logsnr") == spaced_timesteps(s, 1, "time") == [1000]


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid"])
def test_logsnr_spacing_evens_out_the_log_snr_steps(name):
    """Where the schedule resolves the grid (all but the first few timesteps of linear/cosine, whose log SNR jumps by
    more than a grid step between t = 1 and 2) every step is one grid step, (log SNR(1) - log SNR(T)) / 49, to
    within the schedule's own resolution; evenly spaced timesteps take steps several times larger and smaller."""
    s = make_schedule(name, 1000)
    lam = s.log_snr()
    grid = float(lam[0] - lam[-1]) / 49
    resolution = float((lam[1:] - lam[:-1]).abs()[20:].max())  # one timestep's log-SNR change, away from t = 1
    ts = spaced_timesteps(s, 50, "logsnr")
    inner = [t for t in ts if t > 20]
    gaps = _gaps(s, inner)
    assert (gaps - grid).abs().max() <= resolution + 1e-9
    time_gaps = _gaps(s, respaced_timesteps(1000, 50))
    assert time_gaps.max() > 1.5 * grid and time_gaps.min() < grid / 1.5


def test_a_bad_spacing_is_refused_naming_the_options():
    s = make_schedule("cosine", 100)
    with pytest.raises(ValueError, match="logsnr"):
        spaced_timesteps(s, 10, "sigma")
    with pytest.raises(ValueError, match="sampler.steps"):
        spaced_timesteps(s, 101, "logsnr")


@pytest.mark.parametrize("spacing", ["time", "logsnr"])
def test_samplers_visit_the_spaced_timesteps(spacing):
    s = make_schedule("linear", 100)
    oracle = GaussianOracle(s, 0.0, 1.0)
    for sampler, kwargs in ((ddim_sample, {}), (ancestral_sample, {"variance": "small"})):
        seen = []

        def model(x, t, sampler=sampler, seen=seen):
            seen.append(int(t[0]))
            return oracle(x, t)

        sampler(model, s, (4, 2), parametrization="eps", steps=12, spacing=spacing, **kwargs)
        assert seen == spaced_timesteps(s, 12, spacing)


MEAN, STD = 0.5, 0.8


@pytest.mark.parametrize(
    "sampler, kwargs",
    [
        (ancestral_sample, {"variance": "small"}),
        (ancestral_sample, {"variance": "large"}),
        (ddim_sample, {"steps": 50, "eta": 0.0}),
        (ddim_sample, {"steps": 200, "eta": 1.0}),
        # evenly spaced log-SNR over cosine's whole range (about -16..+12 at T = 1000) is coarser than evenly spaced
        # t where this data's noise levels are (log SNR near 0): 50 steps give std 0.755, so more steps here
        (ddim_sample, {"steps": 200, "eta": 0.0, "spacing": "logsnr", "T": 1000}),
        (ancestral_sample, {"variance": "small", "steps": 400, "spacing": "logsnr", "T": 1000}),
    ],
)
def test_samplers_with_the_oracle_reproduce_the_data_distribution(sampler, kwargs):
    kwargs = dict(kwargs)
    s = make_schedule("cosine", kwargs.pop("T", 200))
    oracle = GaussianOracle(s, MEAN, STD, "v")
    g = torch.Generator().manual_seed(3)
    x = sampler(oracle, s, (4000, 4), parametrization="v", generator=g, dtype=torch.float64, **kwargs)
    n = x.numel()
    assert abs(x.mean().item() - MEAN) < 4 * STD / math.sqrt(n) + 0.01
    assert x.std().item() == pytest.approx(STD, rel=0.03)


def test_sampling_is_reproducible_and_reports_progress():
    s = make_schedule("cosine", 30)
    oracle = GaussianOracle(s, 0.0, 1.0)
    calls = []
    a = ancestral_sample(
        oracle,
        s,
        (8, 2),
        parametrization="eps",
        generator=torch.Generator().manual_seed(1),
        progress=lambda i, n: calls.append((i, n)),
    )
    b = ancestral_sample(oracle, s, (8, 2), parametrization="eps", generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert calls[-1] == (30, 30) and len(calls) == 30
    c = ddim_sample(oracle, s, (8, 2), parametrization="eps", steps=10, generator=torch.Generator().manual_seed(1))
    d = ddim_sample(oracle, s, (8, 2), parametrization="eps", steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(c, d)


def test_objectives_check_their_arguments_and_hybrid_takes_only_mse_losses():
    from diffusion_elbo.core.losses import ELBOLoss, HybridLoss

    with pytest.raises(ValueError, match="mean_loss='elbo' is not an MSE loss"):
        HybridLoss(mean_loss="elbo")
    with pytest.raises(ValueError, match="timestep_sampling='sometimes' is not an option"):
        EpsMSE(timestep_sampling="sometimes")
    with pytest.raises(ValueError, match="aux_fraction=1.5"):
        ELBOLoss(aux_weight=1.0, aux_fraction=1.5)
    assert isinstance(HybridLoss(mean_loss="v_mse").mean_loss, MSE_LOSSES["v_mse"])
