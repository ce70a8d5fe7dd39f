"""The analytic (KL-optimal) reverse variance of Bao et al. 2022 for the Gaussian oracle: with it the reverse
process is the true one, so -ELBO equals the true NLL up to KL(q(x_T) || N(0, I))."""

import math

import pytest
import torch

from diffusion_elbo.core import exact_elbo, make_schedule
from diffusion_elbo.core.analytic import analytic_variance_table, oracle_analytic_variance_table
from diffusion_elbo.core.gaussian_data import gaussian_nll_nats, marginal_prior_kl, oracle_expected_terms
from diffusion_elbo.models import GaussianOracle

MEAN, STD, LN2 = 0.5, 0.8, math.log(2.0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("T", [100, 1000])
def test_analytic_variance_closes_the_oracle_gap_to_the_prior_term(name, T):
    s = make_schedule(name, T)
    table = oracle_analytic_variance_table(s, STD)
    closed = oracle_expected_terms(s, MEAN, std=STD, variance=table)
    gap_bpd = (closed.total - closed.true_nll - marginal_prior_kl(s, MEAN, STD)) / LN2
    assert abs(gap_bpd) < 1e-3
    # ... while the fixed `small` variance leaves a gap of tenths of a bit per dim
    small = oracle_expected_terms(s, MEAN, std=STD, variance="small")
    assert (small.total - small.true_nll) / LN2 > 0.4
    assert (table[2:] >= s.posterior_variance[2:]).all() and (table[2:] <= s.betas[2:] * (1 + 1e-9)).all()


def test_exact_evaluator_with_the_analytic_table_matches_the_true_nll_within_standard_error(gen):
    s = make_schedule("cosine", 100)
    x0 = MEAN + STD * torch.randn(2000, 4, generator=gen, dtype=torch.float64)
    r = exact_elbo(
        GaussianOracle(s, MEAN, STD),
        s,
        x0,
        parametrization="eps",
        variance=oracle_analytic_variance_table(s, STD),
        generator=gen,
    )
    gap = (r.total - gaussian_nll_nats(x0, MEAN, STD)) / 4
    assert abs(gap.mean()) < 4 * gap.std() / math.sqrt(gap.numel())


def test_estimated_table_converges_to_the_closed_form(gen):
    s = make_schedule("linear", 200)
    x0 = MEAN + STD * torch.randn(1000, 4, generator=gen, dtype=torch.float64)
    estimated, e = analytic_variance_table(
        GaussianOracle(s, MEAN, STD), s, [x0[:500], x0[500:]], parametrization="v", generator=gen
    )
    exact = oracle_analytic_variance_table(s, STD)
    assert e.shape == (201,) and ((estimated[1:] / exact[1:]) - 1).abs().max() < 0.1


def test_a_table_of_the_wrong_length_is_refused():
    from diffusion_elbo.core.reverse import reverse_variance_table

    s = make_schedule("cosine", 10)
    with pytest.raises(ValueError, match="T \\+ 1 = 11 entries"):
        reverse_variance_table(s, torch.ones(5, dtype=torch.float64))


def test_eval_cli_analytic_variance_closes_the_oracle_gap(tmp_path):
    import json

    from .helpers import run_cli

    result = run_cli(
        "eval.py",
        "data=gaussian",
        "model=gaussian_oracle",
        "schedule=cosine",
        "schedule.timesteps=100",
        "data.mean=0.5",
        "data.std=0.8",
        "variance=analytic",
        f"hydra.run.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["variance"] == "analytic" and abs(m["gap_bpd"]) < 4 * m["gap_bpd_se"]


def test_training_with_analytic_variance_is_refused_with_the_fix(tmp_path):
    from .helpers import run_cli

    result = run_cli("train.py", "variance=analytic", "logger=csv", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2 and "src/eval.py ckpt_path=... variance=analytic" in result.stderr


@pytest.mark.slow
def test_checkpoint_analytic_variance_is_estimated_once_and_cached(tmp_path, trained_checkpoint):
    import json

    from hydra import compose, initialize_config_dir

    from diffusion_elbo.evaluation import run_eval

    from .helpers import CONF_DIR, copy_of_checkpoint, run_cli

    ckpt = copy_of_checkpoint(trained_checkpoint, tmp_path / "run")
    args = [f"ckpt_path={ckpt}", "num_examples=16", "fid.num_samples=0", "analytic.num_examples=32"]

    def eval_here(variance: str, out: str) -> None:  # src/eval.py's job in this process (no start-up cost)
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose("eval", overrides=[*args, f"variance={variance}", "wandb.enabled=false"])
        run_eval(cfg, tmp_path / out)

    first = run_cli("eval.py", *args, "variance=analytic", f"hydra.run.dir={tmp_path / 'e1'}")
    assert first.returncode == 0, first.stderr[-2000:]
    cache = ckpt.parent / "last.ckpt.analytic-32.pt"
    table = torch.load(cache, weights_only=True)["table"]
    assert table.shape == (51,) and (table[1:] > 0).all()
    eval_here("small", "e2")
    m_analytic = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    m_small = json.loads((tmp_path / "e2" / "metrics.json").read_text())
    assert m_analytic["variance"] == "analytic" and m_small["variance"] == "small"
    # the KL-optimal variance can only tighten the bound of the same mean model (same draws: same seed)
    assert m_analytic["bpd"] < m_small["bpd"]
    # per-example values pair the two evaluations: their mean difference is the difference of the means
    from diffusion_elbo.evaluation import paired_difference

    diff, se = paired_difference(tmp_path / "e1" / "per_example.csv", tmp_path / "e2" / "per_example.csv")
    assert diff == pytest.approx(m_analytic["bpd"] - m_small["bpd"], abs=1e-6)
    assert se > 0
    # from the cache, the same job gives the same number: the estimate draws from its own generator
    eval_here("analytic", "e3")
    assert json.loads((tmp_path / "e3" / "metrics.json").read_text())["bpd"] == m_analytic["bpd"]
    # a checkpoint trained with a fixed variance has no variance output to evaluate as learned_range
    refused = run_cli("eval.py", *args, "variance=learned_range", f"hydra.run.dir={tmp_path / 'e4'}")
    assert refused.returncode != 0 and "trained with variance=small" in refused.stderr


def test_clipped_x0_error_is_below_the_unclipped_and_within_the_data_range():
    """For data in [-1, 1] clamping x0_hat to [-1, 1] can only shrink each coordinate's error. With eps_hat = 0,
    x0_hat = x_t / a, whose error (1 - alpha_bar_t) / alpha_bar_t per dim blows up near t = T; clamped it is <= 4."""
    s = make_schedule("linear", 200)
    x0 = torch.rand(64, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1

    def estimate(clip):
        _, e = analytic_variance_table(
            lambda x_t, t: torch.zeros_like(x_t),
            s,
            [x0],
            parametrization="eps",
            generator=torch.Generator().manual_seed(1),
            clip_denoised=clip,
        )
        return e[1:]

    unclipped, clipped = estimate(False), estimate(True)
    expected = (1 - s.alpha_bar[1:]) / s.alpha_bar[1:]
    torch.testing.assert_close(unclipped / expected, torch.ones_like(expected), atol=0.25, rtol=0)
    assert (clipped <= unclipped + 1e-12).all() and clipped.max() <= 4.0
    assert unclipped[-1] > 100 and clipped[-1] < 2


@pytest.mark.parametrize("sampler", ["ancestral", "ddim"])
@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 25])
def test_analytic_variance_keeps_the_sample_spread_on_short_chains(sampler, name, steps):
    """With few steps the samples of the Bayes-optimal mean shrink: ancestral with `small` (std 0.63 at 10 cosine
    steps for 0.8) and deterministic DDIM (0.64 at 10 linear steps). The analytic variance, re-weighted for the
    respaced chain, and Analytic-DDIM's KL-optimal noise c^2 e_t keep them on the data distribution."""
    from diffusion_elbo.core import ancestral_sample, ddim_sample
    from diffusion_elbo.core.gaussian_data import oracle_posterior_variance

    s = make_schedule(name, 1000)
    oracle = GaussianOracle(s, MEAN, STD)
    common = {"parametrization": "eps", "steps": steps, "dtype": torch.float64}

    def draw(analytic: bool):
        g = torch.Generator().manual_seed(0)
        if sampler == "ancestral":
            variance = oracle_analytic_variance_table(s, STD) if analytic else "small"
            return ancestral_sample(oracle, s, (4000, 4), variance=variance, generator=g, **common)
        x0_error = oracle_posterior_variance(s, STD) if analytic else None
        return ddim_sample(oracle, s, (4000, 4), x0_error=x0_error, generator=g, **common)

    analytic, plain = draw(True), draw(False)
    assert analytic.std().item() == pytest.approx(STD, rel=0.02)
    assert abs(analytic.mean().item() - MEAN) < 0.025
    assert plain.std().item() < STD * 0.97


@pytest.mark.slow
def test_sample_cli_with_analytic_variance_writes_samples_and_records_the_variance(tmp_path, trained_checkpoint):
    import numpy as np

    from .helpers import copy_of_checkpoint, run_cli

    run = tmp_path / "run"
    copy_of_checkpoint(trained_checkpoint, run)
    out = tmp_path / "samples"
    result = run_cli(
        "sample.py",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "sampler=ddpm",
        "sampler.steps=10",
        "num_samples=8",
        "variance=analytic",
        "analytic.num_examples=32",
        f"hydra.run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    npz = np.load(out / "samples.npz")
    assert npz["samples"].shape == (8, 1, 8, 8) and str(npz["variance"]) == "analytic"
    # the sampler clamps x0_hat to [-1, 1] on image data, so its table is estimated from the clamped x0_hat
    assert (run / "checkpoints" / "last.ckpt.analytic-32-clipped.pt").is_file()
    # DDIM takes the same cached table as Analytic-DDIM's noise
    ddim = tmp_path / "ddim"
    result = run_cli(
        "sample.py",
        f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
        "sampler=ddim",
        "sampler.steps=10",
        "sampler.cap_final_noise=true",
        "num_samples=8",
        "variance=analytic",
        "analytic.num_examples=32",
        f"hydra.run.dir={ddim}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert str(np.load(ddim / "samples.npz")["variance"]) == "analytic"


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_final_noise_cap_bounds_only_the_step_to_x1(sampler):
    """cap = 0 makes the step to x_1 noiseless, so with every earlier step noiseless too (a chain of two steps, x_T
    given) the sample is a function of x_T alone; a cap above every std changes nothing."""
    from diffusion_elbo.core import ancestral_sample, ddim_sample
    from diffusion_elbo.core.samplers import final_noise_cap

    s = make_schedule("cosine", 100)
    oracle = GaussianOracle(s, MEAN, STD)
    x_T = torch.randn(256, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def draw(seed, cap, steps=2):
        g = torch.Generator().manual_seed(seed)
        if sampler == "ddpm":
            return ancestral_sample(
                oracle, s, x_T.shape, parametrization="eps", variance="large", steps=steps, generator=g, x_T=x_T,
                dtype=torch.float64, final_noise_std=cap,
            )  # fmt: skip
        return ddim_sample(
            oracle, s, x_T.shape, parametrization="eps", eta=1.0, steps=steps, generator=g, x_T=x_T,
            dtype=torch.float64, final_noise_std=cap,
        )  # fmt: skip

    torch.testing.assert_close(draw(1, 0.0), draw(2, 0.0))
    assert not torch.allclose(draw(1, None), draw(2, None))
    torch.testing.assert_close(draw(1, 1e9, steps=10), draw(1, None, steps=10))
    assert final_noise_cap(17) == pytest.approx((1 / 16) / math.sqrt(2 / math.pi)) and final_noise_cap(None) is None
