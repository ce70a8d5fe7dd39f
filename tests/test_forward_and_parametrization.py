import torch

from diffusion_elbo.core import (
    Parametrization,
    make_schedule,
    predict_eps,
    predict_x0,
    q_posterior_mean_variance,
    q_sample,
    q_step_sample,
    training_target,
)
from diffusion_elbo.core.distributions import gaussian_log_prob
from diffusion_elbo.core.forward import q_mean_variance
from diffusion_elbo.core.parametrization import x0_error_scale


def test_q_sample_has_the_closed_form_moments(gen):
    s = make_schedule("cosine", 100)
    x0 = torch.full((200_000, 1), 0.7, dtype=torch.float64)
    t = torch.full((x0.shape[0],), 40)
    x_t = q_sample(s, x0, t=t, generator=gen)
    mean, var = q_mean_variance(s, x0[:1], t[:1])
    assert abs(x_t.mean() - mean.item()) < 4 * (var.item() / x0.shape[0]) ** 0.5
    assert abs(x_t.var() - var.item()) < 0.01 * var.item()


def test_one_step_q_sample_matches_the_step_by_step_chain(gen):
    s = make_schedule("linear", 1000)
    n, t_end = 100_000, 300
    x0 = torch.randn(n, 1, generator=gen, dtype=torch.float64) * 0.5 + 1.0
    chain = x0
    for step in range(1, t_end + 1):
        chain = q_step_sample(s, chain, t=torch.full((n,), step), generator=gen)
    direct = q_sample(s, x0, t=torch.full((n,), t_end), generator=gen)
    # Same distribution given x0: compare the residual moments around sqrt(alpha_bar) x0.
    a = s.alpha_bar[t_end].sqrt()
    r_chain, r_direct = chain - a * x0, direct - a * x0
    assert abs(r_chain.mean() - r_direct.mean()) < 0.01
    assert abs(r_chain.var() / r_direct.var() - 1) < 0.02
    assert abs(r_direct.var() - (1 - s.alpha_bar[t_end])) < 0.01


def test_posterior_is_bayes_rule_of_forward_densities(gen):
    """log q(x_{t-1}|x_t,x0) = log q(x_t|x_{t-1}) + log q(x_{t-1}|x0) - log q(x_t|x0) pointwise."""
    s = make_schedule("linear", 1000)
    b = 64
    t = torch.randint(2, 1001, (b,), generator=gen)
    x0, x_prev, x_t = (torch.randn(b, 3, generator=gen, dtype=torch.float64) for _ in range(3))
    mean_post, var_post = q_posterior_mean_variance(s, x0, x_t, t)
    lhs = gaussian_log_prob(x_prev, mean_post, var_post.log().expand_as(x0))
    alpha = s.gather("alphas", t, x0)
    ab, ab_prev = s.gather("alpha_bar", t, x0), s.gather("alpha_bar", t - 1, x0)
    rhs = (
        gaussian_log_prob(x_t, alpha.sqrt() * x_prev, (1 - alpha).log().expand_as(x0))
        + gaussian_log_prob(x_prev, ab_prev.sqrt() * x0, (1 - ab_prev).log().expand_as(x0))
        - gaussian_log_prob(x_t, ab.sqrt() * x0, (1 - ab).log().expand_as(x0))
    )
    torch.testing.assert_close(lhs, rhs, rtol=1e-9, atol=1e-9)


def test_lecture_posterior_mean_formula(gen):
    s = make_schedule("cosine", 200)
    t = torch.randint(2, 201, (16,), generator=gen)
    x0, x_t = (
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
        torch.randn(16, 2, generator=gen, dtype=torch.float64),
    )
    mean, _ = q_posterior_mean_variance(s, x0, x_t, t)
    a, ab, ab_prev = (s.gather(k, t, x0) for k in ("alphas", "alpha_bar", "alpha_bar_prev"))
    lecture = (a.sqrt() * (1 - ab_prev) * x_t + ab_prev.sqrt() * (1 - a) * x0) / (1 - ab)
    torch.testing.assert_close(mean, lecture)


def test_conversions_recover_x0_and_eps_exactly(gen):
    s = make_schedule("cosine", 1000)
    b = 32
    t = torch.randint(1, 1001, (b,), generator=gen)
    x0 = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    eps = torch.randn(b, 5, generator=gen, dtype=torch.float64)
    x_t = q_sample(s, x0, t=t, noise=eps)
    for p in Parametrization:
        out = training_target(p, s, x0=x0, t=t, eps=eps)
        torch.testing.assert_close(predict_x0(p, s, x_t=x_t, t=t, out=out), x0, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(predict_eps(p, s, x_t=x_t, t=t, out=out), eps, rtol=1e-6, atol=1e-6)


def test_x0_error_scale_is_the_ratio_of_squared_errors(gen):
    s = make_schedule("linear", 1000)
    b = 8
    t = torch.randint(1, 1001, (b,), generator=gen)
    x0, eps = (torch.randn(b, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    x_t = q_sample(s, x0, t=t, noise=eps)
    for p in Parametrization:
        target = training_target(p, s, x0=x0, t=t, eps=eps)
        out = target + 0.1 * torch.randn(b, 4, generator=gen, dtype=torch.float64)
        x0_err = (predict_x0(p, s, x_t=x_t, t=t, out=out) - x0).pow(2).sum(1)
        p_err = (out - target).pow(2).sum(1)
        torch.testing.assert_close(x0_err, x0_error_scale(p, s, t) * p_err)
