"""The probability-flow ODE likelihood: the continuous interpolation of discrete schedules, the exact density of known
distributions under their exact score, Hutchinson's estimator, dequantization, and eval's ``likelihood=`` keys."""

from __future__ import annotations

import json
import logging
import math
import time

import numpy as np
import pytest
import torch
from scipy.interpolate import PchipInterpolator

from diffusion_elbo.core import exact_elbo, make_schedule
from diffusion_elbo.core.discrete_data import discrete_nll_nats, grid_levels, normalized_probs
from diffusion_elbo.core.gaussian_data import gaussian_nll_nats, oracle_expected_terms
from diffusion_elbo.core.ode import (
    dequantization_start_time,
    dequantize,
    divergence_exact,
    divergence_hutchinson,
    ode_nll_nats,
    probability_flow_drift,
    rademacher,
)
from diffusion_elbo.models import DiscreteOracle, GaussianOracle

LN2 = math.log(2.0)


@pytest.mark.parametrize("name, T", [("linear", 1000), ("cosine", 1000), ("sigmoid", 50), ("cosine", 2)])
def test_continuous_schedule_interpolates_the_tables_monotonically(name, T):
    """log alpha_bar(t) is scipy's PCHIP through the table (same values and derivative), equal to it at every integer,
    strictly decreasing (beta(t) > 0), and signal_noise at a float integer t gives the table's coefficients."""
    schedule = make_schedule(name, T)
    table = torch.log(schedule.alpha_bar)
    reference = PchipInterpolator(np.arange(T + 1), table.numpy())
    t = torch.cat([torch.rand(500, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * T])
    value, slope = schedule.log_alpha_bar_at(t)
    np.testing.assert_allclose(value.numpy(), reference(t.numpy()), rtol=0, atol=1e-12)
    np.testing.assert_allclose(slope.numpy(), reference(t.numpy(), 1), rtol=1e-9, atol=1e-12)
    assert (slope < 0).all()
    steps = torch.arange(T + 1)
    at_integers, _ = schedule.log_alpha_bar_at(steps.double())
    assert torch.equal(at_integers, table)
    a, s = schedule.signal_noise(steps[1:].double())
    torch.testing.assert_close(a, schedule.sqrt_alpha_bar[1:], rtol=1e-14, atol=0)
    torch.testing.assert_close(s, schedule.sqrt_one_minus_alpha_bar[1:], rtol=1e-11, atol=0)
    with pytest.raises(ValueError, match=r"continuous time must lie in \[0, T\]"):
        schedule.log_alpha_bar_at(torch.tensor([T + 1.0]))


def _gaussian_flow_nll(schedule, x, mean, std, t0):
    """-log p(x) of the exact-score probability-flow model for x0 ~ N(m, s^2 I) in closed form: the ODE maps the
    marginal N(a_t m, s_t^2) at t0 affinely onto the one at T, z_T = a_T m + (s_T / s_t0)(z - a_t0 m), and the density
    is N(0, I) at z_T times the Jacobians (prior mismatch at T included). x (B, D) -> (B,) nats."""
    a, sig = (v.item() for v in schedule.signal_noise(torch.tensor([t0], dtype=torch.float64)))
    a_T, sig_T = schedule.sqrt_alpha_bar[-1].item(), schedule.sqrt_one_minus_alpha_bar[-1].item()
    s0, sT = math.hypot(a * std, sig), math.hypot(a_T * std, sig_T)
    z_T = a_T * mean + (sT / s0) * (a * x - a * mean)
    d = x.shape[1]
    log_p = -0.5 * (z_T**2).sum(1) - 0.5 * d * math.log(2 * math.pi) + d * math.log(sT / s0) + d * math.log(a)
    return -log_p


@pytest.mark.parametrize("name", ["linear", "cosine"])
@pytest.mark.parametrize("parametrization", ["eps", "x0", "v"])
def test_ode_likelihood_of_the_gaussian_oracle_is_the_true_nll(name, parametrization, gen):
    """With the exact score the ODE gives the model's exact density (closed form of the affine flow) to the solver's
    tolerance, its mean is the data's true NLL within 1e-3 bits/dim, and the -ELBO stays above it by the known gap."""
    mean, std, d, n = 0.5, 0.6, 4, 400
    schedule = make_schedule(name, 1000)
    model = GaussianOracle(schedule, mean, std, parametrization)
    x = mean + std * torch.randn(n, d, generator=gen, dtype=torch.float64)
    tight = ode_nll_nats(model, schedule, x, parametrization=parametrization, divergence="exact", rtol=1e-7, atol=1e-7)
    per_example = (tight.nll - _gaussian_flow_nll(schedule, x, mean, std, 1.0)) / (d * LN2)
    assert per_example.abs().max() < 3e-5  # solver error only, shrinking with the tolerance
    result = ode_nll_nats(model, schedule, x, parametrization=parametrization, divergence="exact")  # eval's defaults
    per_example = (result.nll - _gaussian_flow_nll(schedule, x, mean, std, 1.0)) / (d * LN2)
    assert per_example.abs().max() < 3e-3 and abs(per_example.mean()) < 1e-4
    gap = (result.nll - gaussian_nll_nats(x, mean, std)) / (d * LN2)
    assert abs(gap.mean()) < 1e-3 and abs(gap.mean()) < 4 * gap.std() / math.sqrt(n) + 1e-4
    assert 20 < result.nfe < 400
    # the bound sits above the likelihood by its known gap (-ELBO - NLL of the oracle, in closed form)
    elbo = exact_elbo(model, schedule, x.float(), parametrization=parametrization, max_batch=4096, generator=gen)
    diff = (elbo.total - result.nll) / (d * LN2)
    closed = oracle_expected_terms(schedule, mean, std=std)
    known_gap = (closed.total - closed.true_nll) / LN2
    assert known_gap > 0.5
    assert abs(diff.mean().item() - known_gap) < 4 * diff.std().item() / math.sqrt(n)


def _mixture_nll(schedule, z, probs, t0):
    """-log q_t0(z) for i.i.d. K-level data: each dim a mixture sum_k p_k N(a x_k, sigma^2) at real time t0. (B, D)."""
    a, sig = (v.item() for v in schedule.signal_noise(torch.tensor([t0], dtype=torch.float64)))
    levels = grid_levels(probs.numel())
    log_comp = -0.5 * ((z.unsqueeze(-1) - a * levels) / sig) ** 2 - math.log(sig) - 0.5 * math.log(2 * math.pi)
    return -torch.logsumexp(log_comp + torch.log(probs), dim=-1).sum(1)


def test_ode_likelihood_of_the_discrete_oracle_is_the_exact_mixture_density(gen):
    """Multimodal data: the exact score of K-level data (its noisy marginal a mixture of K Gaussians per dim) carried by
    the ODE gives that mixture's density at t0 exactly, and uniform dequantization bounds the discrete NLL from above."""
    probs = normalized_probs([0.5, 0.1, 0.15, 0.25])
    d, n = 3, 300
    schedule = make_schedule("cosine", 200)  # alpha_bar_T ~ 0: the prior mismatch at T is negligible
    model = DiscreteOracle(schedule, probs.tolist(), parametrization="eps")
    k = torch.multinomial(probs, n * d, replacement=True, generator=gen).view(n, d)
    x0 = grid_levels(4)[k]
    t0 = dequantization_start_time(schedule, num_bins=4)
    a0 = schedule.signal_noise(torch.tensor([t0], dtype=torch.float64))[0].item()
    # the start time matches the noises: sigma^2 / a^2 = Delta^2 / 12
    snr = a0**2 / (1 - a0**2)
    assert snr == pytest.approx(12 / (2 / 3) ** 2, rel=1e-6)
    y, log_q = dequantize(x0, 4, u=torch.rand(n, d, generator=gen, dtype=torch.float64))
    assert ((y - x0).abs() <= 1 / 3 + 1e-12).all() and not torch.equal(y, x0)
    assert torch.allclose(log_q, torch.full((n,), -d * math.log(2 / 3), dtype=torch.float64))
    result = ode_nll_nats(model, schedule, y, parametrization="eps", t_start=t0, divergence="exact")
    exact = _mixture_nll(schedule, a0 * y, probs, t0) - d * math.log(a0)
    assert ((result.nll - exact) / d).abs().max() < 1e-3
    bound = (result.nll + log_q) / d
    true = discrete_nll_nats(x0, probs) / d
    assert (bound - true).mean() > 4 * (bound - true).std() / math.sqrt(n)  # a bound, and resolved as one


def test_truncated_normal_dequantization_stays_in_the_bin_with_its_exact_log_density(gen):
    """y - x0 = s eta with eta the truncated normal by inverse CDF: inside the bin, with the scipy density, and the
    average of -log q its entropy (a Monte Carlo check of the sampler against the density)."""
    from scipy.stats import truncnorm

    delta, s = 2 / 16, 0.04
    x0 = grid_levels(17)[torch.randint(0, 17, (20000, 1), generator=gen)].float()
    y, log_q = dequantize(
        x0, 17, u=torch.rand(20000, 1, generator=gen, dtype=torch.float64), kind="truncated_normal", noise_scale=s
    )
    eta = (y.double() - x0.double()) / s
    tau = delta / 2 / s
    assert eta.abs().max() <= tau + 1e-6 and eta.abs().max() > 0.95 * tau
    ref = truncnorm(-tau, tau, scale=s)
    np.testing.assert_allclose(log_q.numpy(), ref.logpdf((y.double() - x0.double()).numpy()[:, 0]), rtol=0, atol=1e-4)
    assert abs(-log_q.mean().item() - ref.entropy()) < 4 * log_q.std().item() / math.sqrt(20000)


class _Tangle(torch.nn.Module):
    """A small random network with a full, non-symmetric Jacobian (Rademacher probes are exact on diagonal ones)."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(d, 32, generator=g) / math.sqrt(d))
        self.w2 = torch.nn.Parameter(torch.randn(32, d, generator=g) / math.sqrt(32))

    def forward(self, x, t):
        return torch.tanh(x @ self.w1 + t.to(x.dtype)[:, None] / 100.0) @ self.w2


def test_hutchinson_divergence_is_unbiased_for_the_exact_divergence(gen):
    """At one point and in the whole ODE: Hutchinson's estimate agrees with the exact trace within its standard error,
    and its spread is real (not an identity that would hide a bug)."""
    d, schedule = 6, make_schedule("cosine", 100)
    net = _Tangle(d).double()
    z = torch.randn(1, d, generator=gen, dtype=torch.float64).repeat(4000, 1).requires_grad_(True)
    t = torch.full((4000,), 37.3, dtype=torch.float64)
    exact = divergence_exact(probability_flow_drift(schedule, z, t, net(z, t)), z)
    assert torch.allclose(exact, exact[0])
    estimate = divergence_hutchinson(
        probability_flow_drift(schedule, z, t, net(z, t)), z, rademacher((4000, 1, d), gen)
    )
    se = estimate.std() / math.sqrt(4000)
    assert se > 1e-3 * exact.abs().mean()
    assert abs(estimate.mean() - exact[0]) < 4 * se

    n = 256
    x = torch.randn(1, d, generator=gen, dtype=torch.float64).repeat(n, 1)
    exact_nll = ode_nll_nats(net, schedule, x[:1], parametrization="eps", divergence="exact").nll
    hutch = ode_nll_nats(net, schedule, x, parametrization="eps", probes=rademacher((n, 1, d), gen)).nll
    se = hutch.std() / math.sqrt(n)
    assert se > 1e-4 and abs(hutch.mean() - exact_nll[0]) < 4 * se
    # more probes per example: the same mean, a smaller spread
    hutch4 = ode_nll_nats(net, schedule, x, parametrization="eps", probes=rademacher((n, 4, d), gen)).nll
    assert hutch4.std() < 0.7 * hutch.std()
    assert abs(hutch4.mean() - exact_nll[0]) < 4 * hutch4.std() / math.sqrt(n)


def test_ode_refuses_what_it_cannot_integrate():
    schedule = make_schedule("cosine", 10)
    model = GaussianOracle(schedule, 0.0, 0.5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="t_start must lie in"):
        ode_nll_nats(model, schedule, x, parametrization="eps", t_start=0.0, divergence="exact")
    with pytest.raises(ValueError, match="adaptive torchdiffeq solver"):
        ode_nll_nats(model, schedule, x, parametrization="eps", divergence="exact", method="euler")
    with pytest.raises(ValueError, match="needs probes"):
        ode_nll_nats(model, schedule, x, parametrization="eps")


def _compose_eval(tmp_path, overrides):
    from hydra import compose, initialize_config_dir

    from tests.helpers import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("eval", overrides=overrides)


def test_eval_likelihood_both_reports_the_ode_beside_the_bound(tmp_path, caplog):
    """src/eval.py likelihood=both: the ODE keys, NFE and time, the paired difference (equal to the per-example CSV's),
    and on the Gaussian oracle an ODE likelihood equal to the true NLL within 1e-3 bits/dim. Outside a terminal both
    evaluations log their progress (examples done, NFE, time left)."""
    from diffusion_elbo.evaluation import paired_difference, run_eval

    cfg = _compose_eval(
        tmp_path,
        ["likelihood=both", "data.mean=0.5", "data.std=0.6", "schedule=linear", "num_examples=300", "batch_size=128",
         "progress_every_s=0"],
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="diffusion_elbo.progress"):
        m = run_eval(cfg, tmp_path)
    lines = [r.getMessage() for r in caplog.records if r.name == "diffusion_elbo.progress"]
    ode = [line for line in lines if line.startswith("ODE likelihood: ")]
    assert [line.split(" (")[0] for line in ode] == [f"ODE likelihood: {n}/300 examples" for n in (128, 256, 300)]
    assert all(", ETA " in line and " NFE in the last solve" in line for line in ode), ode
    elbo = [line for line in lines if line.startswith("eval -ELBO: ")]
    assert elbo[-1].startswith("eval -ELBO: 3000/3000 ") and "300/300 examples done" in elbo[-1], elbo[-1:]
    assert m["likelihood"] == "both" and m["ode_num_examples"] == m["num_examples"] == 300
    assert abs(m["ode_gap_bpd"]) < 1e-3 and abs(m["ode_gap_bpd"]) < 4 * m["ode_gap_bpd_se"] + 1e-4
    assert m["ode_dequantization"] == "none" and m["ode_t_start"] == 1.0
    assert m["ode_nfe"] > 10 and m["ode_seconds"] > 0
    # the bound's gap to the true NLL, seen from the ODE side: -ELBO - ODE NLL = gap_bpd - ode_gap_bpd
    assert m["elbo_minus_ode_bpd"] == pytest.approx(m["gap_bpd"] - m["ode_gap_bpd"], abs=1e-9)
    diff, se = paired_difference(tmp_path / "per_example.csv", tmp_path / "per_example.csv", "bpd", "ode_bpd")
    assert diff == pytest.approx(m["elbo_minus_ode_bpd"], abs=1e-6)
    assert se == pytest.approx(m["elbo_minus_ode_bpd_se"], rel=1e-3)
    # likelihood=ode alone: the same ODE numbers (same per-example noise), no ELBO keys
    cfg = _compose_eval(
        tmp_path,
        ["likelihood=ode", "data.mean=0.5", "data.std=0.6", "schedule=linear", "num_examples=300", "batch_size=128"],
    )
    alone = run_eval(cfg, tmp_path / "alone")
    assert "bpd" not in alone and alone["ode_bpd"] == pytest.approx(m["ode_bpd"], abs=1e-9)
    header = (tmp_path / "alone" / "per_example.csv").read_text().splitlines()[0]
    assert header == "index,ode_bpd"
    assert json.loads((tmp_path / "alone" / "metrics.json").read_text())["ode_bpd"] == alone["ode_bpd"]
    # the sweep report reads them from an eval written into a training run's folder
    from omegaconf import OmegaConf

    from diffusion_elbo.report import collect_runs, write_report

    run = tmp_path / "sweep" / "schedule=linear"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"task_name": "train", "schedule": {"name": "linear"}}), run / ".hydra" / "config.yaml"
    )
    (run / "metrics.json").write_text((tmp_path / "metrics.json").read_text())
    (row,) = collect_runs(tmp_path / "sweep")
    assert row["test/ode_bpd"] == m["ode_bpd"] and row["test/elbo_minus_ode_bpd"] == m["elbo_minus_ode_bpd"]
    assert "test/ode_bpd" in write_report([row], tmp_path / "sweep")["md"].read_text()


def test_ode_on_k_level_data_is_a_dequantization_bound_above_the_true_nll(tmp_path):
    """data=discrete_toy with its oracle: the ODE's number is a bound on the discrete NLL (stated as such), above the
    true NLL; more dequantization samples keep its mean and shrink its spread."""
    from diffusion_elbo.evaluation import run_eval

    common = [
        "data=discrete_toy",
        "model=discrete_oracle",
        "data.dim=4",
        "schedule=cosine",
        "schedule.timesteps=100",
        "num_examples=600",
        "likelihood=ode",
    ]
    one = run_eval(_compose_eval(tmp_path, common), tmp_path / "one")
    four = run_eval(_compose_eval(tmp_path, [*common, "likelihood.ode.dequantization_samples=4"]), tmp_path / "four")
    assert one["ode_dequantization"] == "uniform"
    assert one["ode_gap_bpd"] > 4 * one["ode_gap_bpd_se"]
    assert four["ode_gap_bpd"] > 4 * four["ode_gap_bpd_se"]
    assert abs(four["ode_bpd"] - one["ode_bpd"]) < 4 * one["ode_gap_bpd_se"]
    assert four["ode_gap_bpd_se"] < 0.8 * one["ode_gap_bpd_se"]
    # the forward noise at t0, truncated to the bin, fits the model's density there better than a flat one
    tn = run_eval(_compose_eval(tmp_path, [*common, "likelihood.ode.dequantization=truncated_normal"]), tmp_path / "tn")
    assert tn["ode_dequantization"] == "truncated_normal" and tn["ode_gap_bpd"] > 4 * tn["ode_gap_bpd_se"]
    assert tn["ode_gap_bpd"] < 0.7 * one["ode_gap_bpd"]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("likelihood.ode.method=euler", "likelihood.ode.method='euler' is not an adaptive torchdiffeq solver"),
        ("likelihood.ode.divergence=trace", "likelihood.ode.divergence='trace' is not an option; choose hutchinson"),
        ("likelihood.ode.probes=0", "likelihood.ode.probes=0 must be an integer >= 1"),
        ("likelihood.ode.rtol=-1", "likelihood.ode.rtol=-1 must be a number > 0"),
        ("likelihood.ode.metod=rk4", "likelihood.ode.metod is not an argument of ProbabilityFlowODE: did you mean"),
    ],
)
def test_bad_ode_settings_are_refused_before_anything_runs(tmp_path, override, fragment):
    """Each estimator checks its own arguments; the config check builds it first and names the key and the fix."""
    from diffusion_elbo.config import ConfigError
    from diffusion_elbo.evaluation import run_eval

    override = override.replace("likelihood.ode.metod", "+likelihood.ode.metod")
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(")):
        run_eval(_compose_eval(tmp_path, ["likelihood=ode", override]), tmp_path)
    assert not (tmp_path / "metrics.json").exists()


def test_an_unknown_likelihood_names_the_choices(tmp_path):
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="likelihood/exact") as err:
        _compose_eval(tmp_path, ["likelihood=exact"])
    assert all(option in str(err.value) for option in ("both", "elbo", "ode"))


def _ode_worker(rank: int, world: int, init_file: str, out_file: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {bs: _sharded_ode(bs) for bs in (1, 4)}
        if rank == 0:
            torch.save({bs: (r.nll, r.true_nll, r.nfe) for bs, r in results.items()}, out_file)
        dist.barrier()  # every rank done before any tears gloo down (a rank leaving early can abort another's)
    finally:
        dist.destroy_process_group()


def _sharded_ode(batch_size: int):
    from diffusion_elbo.data import GaussianDataModule
    from diffusion_elbo.evaluation import evaluate_ode

    schedule = make_schedule("cosine", 100)
    data = GaussianDataModule(mean=0.5, std=0.6, dim=5, num_test=11, seed=3)
    data.setup("test")
    return evaluate_ode(
        GaussianOracle(schedule, 0.5, 0.6),
        schedule,
        data.split("test"),
        parametrization="eps",
        num_bins=None,
        seed=7,
        device=torch.device("cpu"),
        batch_size=batch_size,
        rtol=1e-6,  # batches of 4 share adaptive steps: their shards agree with one process to ~100x this
        atol=1e-6,
        probes=2,
        true_nll=data.true_nll_nats,
    )


@pytest.mark.slow
def test_ode_evaluation_shards_examples_without_padding_and_gives_the_single_process_numbers(tmp_path):
    """3 gloo processes (11 examples: uneven shards, 4/4/3) give every example once, in order. Solved one example at a
    time the numbers are bit-identical to one process (per-example probes); in batches of 4, whose adaptive steps are
    shared, equal to the solver's tolerance. Each rank runs the plain model: nothing waits on another rank mid-solve.
    (src/eval.py on 1 and 3 processes, one example per solve, is tested in test_cli.py.)"""
    import torch.multiprocessing as mp

    single = {bs: _sharded_ode(bs) for bs in (1, 4)}
    for world in (3,):
        out = tmp_path / f"out{world}.pt"
        mp.spawn(_ode_worker, args=(world, str(tmp_path / f"init{world}"), str(out)), nprocs=world, join=True)
        got = torch.load(out)
        for bs in (1, 4):
            nll, true, nfe = got[bs]
            assert nll.shape == (11,)
            assert torch.equal(true, single[bs].true_nll)  # the same examples in the same order
            assert len(nfe) == sum(math.ceil(len(range(r, 11, world)) / bs) for r in range(world))
        assert torch.equal(got[1][0], single[1].nll)
        torch.testing.assert_close(got[4][0], single[4].nll, rtol=1e-4, atol=0)


@pytest.mark.slow
def test_checkpoint_eval_with_both_likelihoods_reaches_the_training_runs_wandb_summary(tmp_path):
    """A UNet checkpoint (float t between its steps, learned_range's mean half): likelihood=both writes the ODE beside
    the bound, and the eval's numbers land as test/... in the summary of the training run's own offline W&B run."""
    from diffusion_elbo.evaluation import run_eval
    from diffusion_elbo.training import train
    from tests.helpers import compose_train

    run_dir = tmp_path / "run"
    cfg = compose_train(
        run_dir,
        # linear at T = 100: the start matched to the bin width lies between steps (t0 > 1; the sigmoid schedule's
        # is below the first step, so it starts at t = 1)
        [
            "logger=wandb",
            "schedule=linear",
            "schedule.timesteps=100",
            "variance=learned_range",
            "loss=hybrid",
            "trainer.max_steps=3",
        ],
    )
    train(cfg, str(run_dir))
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    m = run_eval(
        _compose_eval(tmp_path, [f"ckpt_path={ckpt}", "likelihood=both", "num_examples=6", "fid.num_samples=0"]),
        tmp_path / "eval",
    )
    assert m["ode_dequantization"] == "uniform" and m["ode_num_examples"] == 6 and math.isfinite(m["ode_bpd"])
    assert m["variance"] == "learned_range" and m["ode_t_start"] > 1.0
    # the offline run files (what `wandb sync` uploads) of the training run's id: the eval's resumed run holds the
    # summary updates, each a key and its JSON value in the run file's protobuf records
    files = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2, sorted(p.name for p in (run_dir / "wandb").iterdir())  # training, then the eval
    # W&B's service process writes the file; under load it can still be flushing when wandb.finish() returns
    deadline = time.monotonic() + 60
    while b"test/ckpt" not in (data := files[-1].read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    for key in ("test/ode_bpd", "test/bpd", "test/elbo_minus_ode_bpd", "test/ode_nfe"):
        assert key.encode() in data and json.dumps(m[key[5:]]).encode() in data
    assert b"test/ckpt" in data and b'"last.ckpt"' in data


@pytest.mark.parametrize(("name", "T", "t0"), [("linear", 1000, 999.0), ("cosine", 1000, 999.5), ("sigmoid", 40, None)])
def test_ode_runs_where_the_solvers_first_step_probe_passes_T(name, T, t0, gen):
    """torchdiffeq picks its first step by probing the drift at t0 + h0, which passes T where the drift is small
    (short chains, a start near T); the ODE still gives the oracle's exact density (closed form) there."""
    from diffusion_elbo.core.ode import dequantization_start_time

    mean, std, d, n = 0.5, 0.6, 4, 64
    schedule = make_schedule(name, T)
    t0 = dequantization_start_time(schedule, 17, minimum=min(1.0, T / 2)) if t0 is None else t0
    model = GaussianOracle(schedule, mean, std, "v")
    x = mean + std * torch.randn(n, d, generator=gen, dtype=torch.float64)
    result = ode_nll_nats(model, schedule, x, parametrization="v", t_start=t0, divergence="exact", rtol=1e-7, atol=1e-7)
    per_example = (result.nll - _gaussian_flow_nll(schedule, x, mean, std, t0)) / (d * LN2)
    assert per_example.abs().max() < 2e-4  # solver error only
