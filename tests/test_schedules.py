import math

import pytest
import torch

from diffusion_elbo.core import InvalidScheduleError, NoiseSchedule, make_schedule
from diffusion_elbo.core.schedules import BETA_SCHEDULES


@pytest.mark.parametrize("name", list(BETA_SCHEDULES))
def test_alpha_bar_is_decreasing_from_one_with_valid_betas(name):
    s = make_schedule(name, 1000)
    assert s.T == 1000 and s.betas.shape == (1001,)
    assert s.alpha_bar[0] == 1.0
    assert (s.alpha_bar[1:] < s.alpha_bar[:-1]).all()
    assert ((s.betas[1:] > 0) & (s.betas[1:] < 1)).all()
    assert s.betas.dtype == torch.float64


def test_linear_matches_ho_et_al_published_values():
    s = make_schedule("linear", 1000)
    assert s.betas[1].item() == pytest.approx(1e-4)
    assert s.betas[1000].item() == pytest.approx(0.02)
    # alpha_bar_T for the DDPM schedule is about 4.04e-5 (quoted e.g. by Nichol & Dhariwal 2021)
    assert s.alpha_bar[1000].item() == pytest.approx(4.0358e-5, rel=1e-3)


def test_linear_rescales_endpoints_by_1000_over_T():
    s = make_schedule("linear", 100)
    assert s.betas[1].item() == pytest.approx(1e-3)
    assert s.betas[100].item() == pytest.approx(0.2)


def test_cosine_alpha_bar_follows_nichol_dhariwal_formula():
    T, s_off = 1000, 0.008
    s = make_schedule("cosine", T)
    t = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2
    expected = f / f[0]
    unclipped = s.betas < 0.999
    # products of clipped betas drift from f only after the first clipped step (the last few t)
    first_clip = int(torch.nonzero(~unclipped[1:])[0]) + 1 if (~unclipped[1:]).any() else T + 1
    torch.testing.assert_close(s.alpha_bar[:first_clip], expected[:first_clip], rtol=1e-10, atol=1e-12)
    assert s.betas.max() <= 0.999


def test_sigmoid_endpoints():
    s = make_schedule("sigmoid", 1000)
    assert s.alpha_bar[1] > 0.999 and s.alpha_bar[1000] < 1e-3


def test_posterior_variance_matches_closed_form_and_precision_sum():
    s = make_schedule("linear", 1000)
    t = torch.arange(2, 1001)
    a, ab, ab_prev = s.alphas[t], s.alpha_bar[t], s.alpha_bar[t - 1]
    closed = (1 - a) * (1 - ab_prev) / (1 - ab)
    torch.testing.assert_close(s.posterior_variance[t], closed)
    # Independent derivation: the posterior precision is the sum of the two Gaussian precisions.
    precision = 1 / (1 - ab_prev) + a / (1 - a)
    torch.testing.assert_close(s.posterior_variance[t], 1 / precision, rtol=1e-10, atol=0)
    assert s.posterior_variance[1] == 0


def test_snr_known_values():
    """Ho et al.'s linear schedule ends at alpha_bar_T = 4.036e-5 (SNR(T) = 4.04e-5, log SNR = -10.12); the cosine
    schedule's SNR is cos^2(theta_t) / (cos^2(theta_0) - cos^2(theta_t)), theta_t = (t / T + s) / (1 + s) pi / 2, where
    no beta is clipped (Nichol & Dhariwal 2021 eq. 17); t = 0 is noiseless (SNR = inf)."""
    linear = make_schedule("linear", 1000)
    assert float(linear.snr[-1]) == pytest.approx(4.0358e-5 / (1 - 4.0358e-5), rel=1e-3)
    assert math.isinf(linear.snr[0]) and torch.all(torch.diff(linear.snr[1:]) < 0)
    T, offset = 50, 0.008
    cosine = make_schedule("cosine", T)
    theta = (torch.arange(T + 1, dtype=torch.float64) / T + offset) / (1 + offset) * math.pi / 2
    closed = theta.cos() ** 2 / (theta[0].cos() ** 2 - theta.cos() ** 2)
    unclipped = slice(1, T - 1)  # the last betas are clipped at 0.999
    torch.testing.assert_close(cosine.snr[unclipped], closed[unclipped], rtol=1e-9, atol=0)


def test_linear_with_small_T_is_refused_naming_the_steps():
    with pytest.raises(InvalidScheduleError) as err:
        make_schedule("linear", 10)
    msg = str(err.value)
    assert "T=10" in msg and "t=" in msg and "outside (0, 1)" in msg and "schedule.timesteps" in msg
    assert "scales beta_start and beta_end by 1000/T" in msg  # the linear class's own hint
    with pytest.raises(InvalidScheduleError) as err:
        make_schedule("custom", betas=[0.5, 1.5])
    assert "outside (0, 1)" in str(err.value) and "1000/T" not in str(err.value)  # no scaling to blame there


@pytest.mark.parametrize(
    "betas, fragment",
    [
        ([0.1, float("nan"), 0.2], "t=2"),
        ([0.1, 0.2, 1.0], "t=3"),
        ([0.0, 0.1], "t=1"),
        ([0.1, -0.2], "t=2"),
        ([], "T >= 1"),
    ],
)
def test_invalid_custom_betas_are_refused(betas, fragment):
    with pytest.raises(InvalidScheduleError) as err:
        NoiseSchedule(betas)
    assert fragment in str(err.value)


def test_custom_betas_define_the_tables():
    s = make_schedule("custom", betas=[0.1, 0.2, 0.3])
    assert s.T == 3
    torch.testing.assert_close(s.alpha_bar[1:], torch.tensor([0.9, 0.72, 0.504], dtype=torch.float64))


@pytest.mark.parametrize("timesteps", [0, -5])
def test_timesteps_below_one_is_refused(timesteps):
    with pytest.raises(InvalidScheduleError, match="schedule.timesteps must be an integer >= 1"):
        make_schedule("cosine", timesteps)


def test_unknown_schedule_name_lists_choices():
    with pytest.raises(InvalidScheduleError, match="linear, quadratic, cosine, sigmoid, custom"):
        make_schedule("cosnie", 100)


def test_tables_follow_device_and_gather_broadcasts():
    s = make_schedule("linear", 1000)
    x = torch.zeros(3, 1, 4, 4, dtype=torch.float32)
    t = torch.tensor([1, 500, 1000])
    g = s.gather("alpha_bar", t, x)
    assert g.shape == (3, 1, 1, 1) and g.dtype == torch.float32
    assert list(dict(s.named_buffers()).keys())  # registered buffers move with .to(device)
    assert s.state_dict() == {}  # non-persistent: rebuilt from the config, not stored
