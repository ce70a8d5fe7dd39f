"""examples/plugins, the extension points seen from outside the package: each plugin class against the closed-form
oracles, and the commands of examples/plugins/README.md run from a copy of the folder outside the repository."""

from __future__ import annotations

import importlib
import json
import math
import re
import shlex
import shutil
import sys

import numpy as np
import pytest
import torch

from diffusion_elbo.core import make_schedule
from diffusion_elbo.core.gaussian_data import flow_image
from diffusion_elbo.core.parametrization import Parametrization
from diffusion_elbo.core.samplers import Chain, DDIMSampler
from diffusion_elbo.core.vdm import gaussian_continuous_terms
from diffusion_elbo.evaluation.estimators import EvalRun, EvalSubject, ExactELBO
from diffusion_elbo.models import GaussianOracle

from .helpers import REPO_ROOT, run_python

PLUGINS = REPO_ROOT / "examples" / "plugins"


@pytest.fixture(scope="module")
def plugins_copy(tmp_path_factory):
    """A copy of examples/plugins in a temporary folder outside the repository."""
    copy = tmp_path_factory.mktemp("outside") / "plugins"
    shutil.copytree(PLUGINS, copy, ignore=shutil.ignore_patterns("runs", "__pycache__", "outputs"))
    assert REPO_ROOT.resolve() not in copy.resolve().parents
    return copy


@pytest.fixture
def plugins(plugins_copy, monkeypatch):
    """The copy's ``plugins`` module, imported as a user's PYTHONPATH=. would."""
    monkeypatch.syspath_prepend(str(plugins_copy))
    sys.modules.pop("plugins", None)
    module = importlib.import_module("plugins")
    assert module.__file__.startswith(str(plugins_copy))
    yield module
    sys.modules.pop("plugins", None)


def test_the_laplace_schedule_meets_its_endpoints_and_its_slope_is_its_derivative(plugins):
    schedule = plugins.LaplaceLogSNR(-13.3, 5.0, mu=0.5, b=3.0)
    t = torch.linspace(0, 1, 2001, dtype=torch.float64)
    out = schedule(t)
    assert out.gamma[0].item() == pytest.approx(-13.3, abs=1e-9) and out.gamma[-1].item() == pytest.approx(
        5.0, abs=1e-9
    )
    assert (out.gamma.diff() > 0).all()  # gamma = -log SNR rises with the noise
    # the slope is d gamma / dt (central differences, away from the kink at u = 1/2 where it is continuous anyway)
    h = 1e-6
    inner = t[1:-1]
    numeric = (schedule(inner + h).gamma - schedule(inner - h).gamma) / (2 * h)
    assert torch.allclose(out.slope[1:-1], numeric, rtol=1e-5, atol=1e-6)
    # most of t sits near log SNR = mu: the Laplace's median
    assert schedule(torch.tensor([0.0, 1.0], dtype=torch.float64)).gamma.tolist() == pytest.approx([-13.3, 5.0])
    mid = float(schedule(torch.tensor([(0.5 - schedule.u0) / (schedule.u1 - schedule.u0)], dtype=torch.float64)).gamma)
    assert mid == pytest.approx(-0.5, abs=1e-9)
    with pytest.raises(ValueError, match="b=0"):
        plugins.LaplaceLogSNR(b=0.0)


def test_the_min_snr_objective_weighs_as_hang_et_al_and_the_oracle_minimizes_it(plugins):
    """w = min(SNR, gamma) on the x0 error: the eps-MSE's weight at SNR <= gamma, gamma times the x0-MSE's above. Any
    positive weighting of the MSE is minimized by the posterior mean: on Gaussian data the closed-form oracle's loss is
    below that of the oracle shifted either way, and equals min(SNR, gamma) E||x0 - E[x0 | x_t]||^2 per dim."""
    from diffusion_elbo.core import q_sample
    from diffusion_elbo.core.gaussian_data import oracle_posterior_variance
    from diffusion_elbo.core.losses import EpsMSE, TrainingBatch
    from diffusion_elbo.core.reverse import ReverseVariance

    mean, std, gamma = 0.5, 0.8, 5.0
    schedule = make_schedule("linear", 1000)
    objective = plugins.MinSNRLoss(gamma=gamma)
    t = torch.arange(1, schedule.T + 1)
    snr = schedule.snr[t]
    assert torch.equal(objective.x0_weight(schedule, t), torch.minimum(snr, torch.tensor(gamma, dtype=snr.dtype)))
    low = snr <= gamma
    assert torch.equal(objective.x0_weight(schedule, t)[low], EpsMSE().x0_weight(schedule, t)[low])

    oracle = GaussianOracle(schedule, mean, std, parametrization="eps")
    g = torch.Generator().manual_seed(3)
    x0 = mean + std * torch.randn(20_000, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.randint(1, schedule.T + 1, (x0.shape[0],), generator=g)
    x_t = q_sample(schedule, x0, t=t, noise=eps)

    def loss(shift: float) -> torch.Tensor:
        batch = TrainingBatch(
            schedule=schedule, parametrization=Parametrization.EPS, variance=ReverseVariance.SMALL, num_dims=4,
            x0=x0, eps=eps, x_t=x_t, t=t, inv_p=torch.full(t.shape, float(schedule.T), dtype=torch.float64),
            out=oracle(x_t, t) + shift, terms_of=None, prior_of=None,
        )  # fmt: skip
        return objective.loss(batch)

    at_oracle = loss(0.0)
    assert at_oracle.mean() < loss(0.02).mean() and at_oracle.mean() < loss(-0.02).mean()
    # E[loss | t] = min(SNR, gamma) Var[x0 | x_t] per dim (the oracle's x0 error is the posterior variance)
    expected = (
        torch.minimum(schedule.snr[t], torch.tensor(gamma, dtype=torch.float64))
        * oracle_posterior_variance(schedule, std)[t]
    )
    diff = at_oracle - expected
    assert abs(float(diff.mean())) < 4 * float(diff.std()) / math.sqrt(diff.numel())
    with pytest.raises(ValueError, match="gamma=0"):
        plugins.MinSNRLoss(gamma=0)


def test_dpm_solver_is_closer_to_the_exact_flow_than_ddim_at_equal_steps_on_the_gaussian_oracle(plugins):
    """With the exact posterior mean (the Gaussian oracle, data N(0.5, 0.8^2)) the probability-flow ODE is affine and
    known: x_T maps to m + s (x_T - a_T m) / sqrt(a_T^2 s^2 + sigma_T^2). Each sample's distance to its exact image is
    the sampler's discretization error: the second-order solver has at most 0.6 of DDIM's (first order) at 10, 20
    and 50 steps on three schedules and both grids, and converges."""
    mean, std = 0.5, 0.8
    x_T = torch.randn(4000, 4, generator=torch.Generator().manual_seed(0))
    for name in ("linear", "cosine", "sigmoid"):
        schedule = make_schedule(name, 1000)
        oracle = GaussianOracle(schedule, mean, std, parametrization="x0")
        chain = Chain(denoise=oracle, schedule=schedule, parametrization=Parametrization.X0)
        exact = flow_image(x_T, *map(float, schedule.signal_noise(torch.tensor([schedule.T]))), mean=mean, std=std)

        def error(sampler, chain=chain, exact=exact) -> float:
            return float((sampler.sample(chain, x_T.shape, x_T=x_T) - exact).pow(2).mean().sqrt())

        for spacing in ("time", "logsnr"):
            for n in (10, 20, 50):
                dpm = error(plugins.DPMSolverPP2M(steps=n, spacing=spacing))
                ddim = error(DDIMSampler(steps=n, spacing=spacing))
                assert dpm < 0.6 * ddim, (name, spacing, n, dpm, ddim)
            assert dpm < 0.01, (name, spacing, dpm)
    with pytest.raises(ValueError, match="steps=0"):
        plugins.DPMSolverPP2M(steps=0)


def test_the_importance_weighted_bound_lies_between_the_true_nll_and_the_elbo(plugins):
    """On the Gaussian oracle (linear, T = 50, where the ELBO is far above the true NLL): K = 1 has the ELBO's
    expectation (paired, within 4 SE), and the bound decreases with K while staying above the true NLL."""
    from diffusion_elbo.core.gaussian_data import gaussian_nll_nats

    mean, std, dim = 0.0, 1.0, 4
    schedule = make_schedule("linear", 50)
    oracle = GaussianOracle(schedule, mean, std, parametrization="x0")
    x0 = mean + std * torch.randn(400, dim, generator=torch.Generator().manual_seed(1))
    dataset = [(x,) for x in x0]
    subject = EvalSubject(
        network=oracle,
        model=oracle,
        mean_model=oracle,
        schedule=schedule,
        parametrization="x0",
        trained_variance="small",
        variance="small",
        decoder_variance="clipped",
        num_bins=None,
    )
    run = EvalRun(seed=0, device=torch.device("cpu"), batch_size=400)
    elbo = ExactELBO().evaluate(subject, dataset, run).columns["bpd"]
    iw = {k: plugins.ImportanceWeightedBound(k=k).evaluate(subject, dataset, run) for k in (1, 8, 64)}
    true_bpd = gaussian_nll_nats(x0, mean, std) / dim / math.log(2.0)

    def paired(a, b):
        d = a - b
        return float(d.mean()), float(d.std() / math.sqrt(d.numel()))

    diff, se = paired(iw[1].columns["iw_bpd"], elbo)
    assert abs(diff) < 4 * se, (diff, se)
    for smaller, larger in ((8, 1), (64, 8)):
        diff, se = paired(iw[larger].columns["iw_bpd"], iw[smaller].columns["iw_bpd"])
        assert diff > 4 * se, (smaller, larger, diff, se)
    gap, se = paired(iw[64].columns["iw_bpd"], true_bpd)
    assert gap > -4 * se and iw[64].metrics["iw_k"] == 64, (gap, se)
    assert iw[64].metrics["iw_bpd"] == pytest.approx(float(iw[64].columns["iw_bpd"].mean()))


def readme_commands() -> list[list[str]]:
    """The commands of examples/plugins/README.md, each as ``[script, *args]`` (``$REPO/src/<script>``)."""
    text = (PLUGINS / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    commands = []
    for line in block.splitlines():
        if line.startswith("PYTHONPATH=. python "):
            words = shlex.split(line.removeprefix("PYTHONPATH=. python "))
            commands.append([words[0].removeprefix("$REPO/src/"), *words[1:]])
    return commands


@pytest.mark.slow
def test_the_readme_commands_work_from_a_copy_outside_the_repository(plugins_copy):
    """Each command of the README, run in the copy with PYTHONPATH=. and its own hydra.searchpath (training shortened
    to 40 steps and the estimator to 16 examples and K = 2 here; the README's settings are measured in the note)."""
    commands = readme_commands()
    assert [c[0] for c in commands] == ["eval.py", "train.py", "sample.py", "eval.py"]
    faster = {1: ["trainer.max_steps=40", "trainer.val_check_interval=20"], 3: ["num_examples=16", "likelihood.iw.k=2"]}
    env = {"PYTHONPATH": str(plugins_copy)}
    for i, (script, *args) in enumerate(commands):
        args = [a.replace("$PWD", str(plugins_copy)) for a in args] + faster.get(i, [])
        result = run_python(REPO_ROOT / "src" / script, *args, cwd=plugins_copy, env=env, timeout=900)
        assert result.returncode == 0, (script, args, result.stderr[-3000:])
    runs = plugins_copy / "runs"
    # 1. the Gaussian oracle on the Laplace schedule: the continuous-time bound is the closed form (endpoints only)
    oracle = json.loads((runs / "oracle" / "metrics.json").read_text())
    closed = gaussian_continuous_terms(0.0, 1.0, -13.3, 5.0)["total"] / math.log(2.0)
    c = oracle["continuous"]
    assert c["timesteps"] is None and abs(c["bpd"] - closed) < 4 * c["bpd_se"], (c["bpd"], closed, c["bpd_se"])
    # 2. trained with the schedule and the objective (the run's sampler is the plugin's: it draws image data's grid)
    run = runs / "laplace"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    config = (run / ".hydra" / "config.yaml").read_text()
    for plugin in ("LaplaceLogSNR", "MinSNRLoss", "DPMSolverPP2M"):
        assert f"_target_: plugins.{plugin}" in config, plugin
    # 3. sampled with it
    samples = np.load(runs / "samples" / "samples.npz")
    assert str(samples["sampler"]) == "dpmpp2m" and samples["samples"].shape == (500, 16)
    assert np.isfinite(samples["samples"]).all()
    # 4. evaluated with the estimator beside the exact bound, paired
    m = json.loads((run / "eval" / "last-trained-elbo+iw" / "metrics.json").read_text())
    assert m["likelihood"] == "elbo+iw" and m["iw_k"] == 2 and m["num_examples"] == 16
    assert math.isfinite(m["iw_bpd"]) and "elbo_minus_iw_bpd_se" in m and "continuous" in m
    header = (run / "eval" / "last-trained-elbo+iw" / "per_example.csv").read_text().splitlines()[0]
    assert header == "index,bpd,continuous_bpd,iw_bpd"


def test_a_beta_schedule_of_ones_own_outside_the_package_trains_as_a_chain(tmp_path, monkeypatch):
    """The discrete extension point (docs/extending.md, "Beta schedules"): a class outside the package that derives
    BetaSchedule from its betas, selected by ``_target_``, passes the config check, builds the one module on a chain of
    its T steps with its tables, and trains a step on it; the same class, given the continuous-time keys, trains in
    continuous time on its window [1/T, 1] with its own chain for sampling and evaluation."""
    from omegaconf import open_dict

    from diffusion_elbo.builders import build_module
    from diffusion_elbo.config import validate_config
    from diffusion_elbo.core.time_axis import ChainTime, ContinuousTime

    from .helpers import compose_train

    (tmp_path / "mybetas.py").write_text(
        "import torch\n"
        "from diffusion_elbo.core.schedules import BetaSchedule\n\n\n"
        "class Geometric(BetaSchedule):\n"
        "    def __init__(self, timesteps: int, beta_1: float = 1e-4, beta_T: float = 0.05) -> None:\n"
        "        betas = torch.logspace(torch.log10(torch.tensor(beta_1)), torch.log10(torch.tensor(beta_T)), timesteps)\n"
        "        super().__init__(betas.double(), name='geometric')\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mybetas", None)
    cfg = compose_train(tmp_path / "run", ["trainer.max_steps=1"])
    with open_dict(cfg):
        cfg.schedule = {"_target_": "mybetas.Geometric", "timesteps": 40, "beta_T": 0.1}
    validate_config(cfg)
    module, datamodule = build_module(cfg)
    assert isinstance(module.time, ChainTime) and module.schedule.T == 40 and module.schedule.name == "geometric"
    expected = torch.logspace(math.log10(1e-4), math.log10(0.1), 40, dtype=torch.float64)
    torch.testing.assert_close(module.schedule.betas[1:].double(), expected, rtol=1e-6, atol=0)
    datamodule.setup("fit")
    x0 = next(iter(datamodule.train_dataloader()))[0]
    with pytest.warns(UserWarning):  # self.log without a trainer
        loss = module.training_step((x0,), 0)
    assert torch.isfinite(loss) and 1 <= int(module._last_t.min()) <= int(module._last_t.max()) <= 40
    # in continuous time (schedule=logsnr_discrete with the class as its base): on its window [1/T, 1], its T-step view
    # at eval_timesteps = T its own chain
    with open_dict(cfg):
        cfg.schedule = {
            "_target_": "diffusion_elbo.core.schedules.beta_log_snr",
            "base": {"_target_": "mybetas.Geometric", "timesteps": 40, "beta_T": 0.1},
            "timesteps": None,
            "eval_timesteps": 40,
            "variance_gradient": False,
        }
    validate_config(cfg)
    module, _ = build_module(cfg)
    assert isinstance(module.time, ContinuousTime) and module.schedule.T == 40
    torch.testing.assert_close(module.schedule.betas[1:].double(), expected, rtol=1e-6, atol=0)
    gamma_0, _ = module.time.logsnr.endpoints()
    torch.testing.assert_close(gamma_0.double(), -torch.log(module.schedule.snr[1]).float().double(), rtol=1e-6, atol=0)
    with pytest.warns(UserWarning):
        loss = module.training_step((x0,), 0)
    assert torch.isfinite(loss)
    sys.modules.pop("mybetas", None)
