"""variance=learned_range (Nichol & Dhariwal 2021 eq. 15) and loss=hybrid: the interpolation spans the fixed
variances, the hybrid's ELBO half trains only the variance, and training it finds the KL-optimal variance."""

import math

import pytest
import torch
from torch import nn

from diffusion_elbo.core import ancestral_sample, exact_elbo, make_schedule, term_from_output
from diffusion_elbo.core.analytic import oracle_analytic_variance_table
from diffusion_elbo.core.gaussian_data import oracle_expected_terms
from diffusion_elbo.core.losses import hybrid_vlb_weight
from diffusion_elbo.core.reverse import learned_range_logvar, split_output, stop_mean_gradient
from diffusion_elbo.core.samplers import AncestralSampler
from diffusion_elbo.models import GaussianOracle

MEAN, STD = 0.5, 0.8


class OracleWithVariance(nn.Module):
    """The Bayes-optimal mean of Gaussian data plus a learnable v logit per timestep (shared by all dims):
    a learned_range network whose mean is exact, so only its variance is learned."""

    def __init__(self, schedule, logit: float = 0.0):
        super().__init__()
        self.oracle = GaussianOracle(schedule, MEAN, STD)
        self.logits = nn.Parameter(torch.full((schedule.T + 1,), logit, dtype=torch.float64))

    def forward(self, x_t, t):
        eps = self.oracle(x_t, t)
        return torch.cat([eps, self.logits[t].view(-1, 1).expand_as(eps).to(eps.dtype)], dim=1)

    def variance_table(self, schedule) -> torch.Tensor:
        t = torch.arange(1, schedule.T + 1)
        with torch.no_grad():
            logvar = learned_range_logvar(schedule, t, self.logits[t].view(-1, 1)).view(-1)
        return torch.cat([logvar[:1].exp(), logvar.exp()])  # (T + 1,), entry 0 unused


def test_learned_range_spans_the_small_and_large_variances():
    s = make_schedule("linear", 100)
    t = torch.arange(1, 101)
    low = learned_range_logvar(s, t, torch.full((100, 3), -60.0, dtype=torch.float64))
    high = learned_range_logvar(s, t, torch.full((100, 3), 60.0, dtype=torch.float64))
    mid = learned_range_logvar(s, t, torch.zeros(100, 3, dtype=torch.float64))
    torch.testing.assert_close(high[:, 0], torch.log(s.betas[1:]))
    torch.testing.assert_close(low[1:, 0], torch.log(s.posterior_variance[2:]))
    # t = 1: sigma_q^2(1) = 0, so the lower end is sigma_q^2(2) (N&D's clipped posterior log-variance)
    assert low[0, 0].item() == pytest.approx(math.log(float(s.posterior_variance[2])))
    torch.testing.assert_close(mid, 0.5 * (low + high))
    # each dimension has its own v
    per_dim = learned_range_logvar(s, t[:1], torch.tensor([[-60.0, 60.0]], dtype=torch.float64))
    assert per_dim[0, 0] < per_dim[0, 1]


def test_split_output_needs_an_even_number_of_channels():
    mean, v = split_output(torch.randn(2, 4, 3, 3), "learned_range")
    assert mean.shape == v.shape == (2, 2, 3, 3)
    out = torch.randn(2, 3)
    assert split_output(out, "small") == (out, None)
    with pytest.raises(ValueError, match="twice the data's channels"):
        split_output(torch.randn(2, 3, 3, 3), "learned_range")


@pytest.mark.parametrize("logit,fixed", [(60.0, "large"), (-60.0, "small")])
def test_saturated_learned_range_reproduces_the_fixed_variance_elbo(logit, fixed):
    s = make_schedule("cosine", 50)
    model = OracleWithVariance(s, logit)
    x0 = MEAN + STD * torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def elbo(net, variance, decoder_variance="clipped"):
        return exact_elbo(
            net,
            s,
            x0,
            parametrization="eps",
            variance=variance,
            decoder_variance=decoder_variance,
            generator=torch.Generator().manual_seed(1),
        )

    learned, reference = elbo(model, "learned_range"), elbo(model.oracle, fixed)
    # all denoising terms agree
    torch.testing.assert_close(learned.per_t[:, 1:], reference.per_t[:, 1:])
    # and the decoder (t = 1): v = 0 gives sigma_q^2(2), the published `small` (and `large`) at t = 1; v = 1 gives
    # beta_1, which the fixed variances use with decoder_variance=beta (N&D's interpolation keeps beta_1 as its top)
    if fixed == "small":
        torch.testing.assert_close(learned.total, reference.total)
        assert not torch.allclose(learned.total, elbo(model.oracle, fixed, "beta").total)
    else:
        torch.testing.assert_close(learned.total, elbo(model.oracle, fixed, "beta").total)


@pytest.mark.parametrize("steps", [None, 10])
@pytest.mark.parametrize("logit,fixed", [(60.0, "large"), (-60.0, "small")])
def test_saturated_learned_range_reproduces_fixed_variance_sampling(steps, logit, fixed):
    """The interpolation uses the respaced chain's own beta and sigma_q^2, as N&D do, so it matches the fixed
    variances on respaced chains too (the last step adds no noise, so t = 1's variance does not enter)."""
    s = make_schedule("linear", 100)
    model = OracleWithVariance(s, logit)

    def draw(net, variance):
        g = torch.Generator().manual_seed(3)
        return ancestral_sample(
            net, s, (64, 4), parametrization="eps", variance=variance, steps=steps, generator=g, dtype=torch.float64
        )

    torch.testing.assert_close(draw(model, "learned_range"), draw(model.oracle, fixed))


def test_hybrid_elbo_half_trains_only_the_variance_channels():
    s = make_schedule("linear", 100)
    x0 = torch.randn(16, 4, dtype=torch.float64)
    t = torch.randint(1, 101, (16,))
    x_t = torch.randn(16, 4, dtype=torch.float64)
    out = torch.randn(16, 8, dtype=torch.float64, requires_grad=True)

    def grad(o):
        term = term_from_output(
            s, x0, x_t=x_t, t=t, out=o, parametrization="eps", variance="learned_range", num_bins=None
        )
        (g,) = torch.autograd.grad(term.sum(), out)
        return g

    stopped, full = grad(stop_mean_gradient(out, "learned_range")), grad(out)
    assert stopped[:, :4].abs().max() == 0 and stopped[:, 4:].abs().min() > 0  # hybrid: the mean gets nothing
    assert full[:, :4].abs().max() > 0  # loss=elbo trains the mean through the terms too
    torch.testing.assert_close(stopped[:, 4:], full[:, 4:])  # the variance gets the same gradient either way


def test_hybrid_vlb_weight_is_nichol_and_dhariwal_normalisation():
    # their code: loss = mse + vb * T / 1000 with vb = L_t in bits/dim at one uniform t (lambda = 0.001 is the
    # 1/1000); ours multiplies the sampled term L_t / p(t) = T L_t (nats over D dims) by hybrid_vlb_weight
    D, T, lam = 64, 4000, 0.001
    term_nats, weight = 3.0, float(T)
    ours = hybrid_vlb_weight(lam, D) * term_nats * weight
    theirs = (term_nats / D / math.log(2.0)) * T / 1000.0
    assert ours == pytest.approx(theirs)
    assert hybrid_vlb_weight(2 * lam, D) == pytest.approx(2 * hybrid_vlb_weight(lam, D))


def test_hybrid_training_loss_is_their_mse_plus_vb_times_t_over_1000(tmp_path):
    """The module's loss=hybrid on one batch, written out as improved-diffusion's training_losses does it:
    mean_flat((eps - eps_hat)^2) + vb * T / 1000, vb the ELBO term at the batch's t in bits/dim."""
    from diffusion_elbo.builders import build_module
    from diffusion_elbo.core.elbo import term_from_output
    from diffusion_elbo.core.reverse import split_output

    from .helpers import compose_train

    T = 200
    cfg = compose_train(
        tmp_path,
        [
            "data=toy2d",
            "model=mlp",
            "variance=learned_range",
            "loss=hybrid",
            "parametrization=eps",
            f"schedule.timesteps={T}",
        ],
    )
    torch.manual_seed(0)
    module, datamodule = build_module(cfg)
    torch.nn.init.normal_(module.net.output.weight, std=0.1)
    datamodule.setup("fit")
    x0 = next(iter(datamodule.train_dataloader()))[0]
    seen = {}
    network = module.network  # on a chain, the network's input is the step t

    def recording(x_t, t):
        seen.update(x_t=x_t, t=t, out=network(x_t, t))
        return seen["out"]

    module.network = recording
    with pytest.warns(UserWarning):  # self.log without a trainer
        loss = module.training_step((x0,), 0)
    x_t, t, out = seen["x_t"], seen["t"], seen["out"]
    mean_out, _ = split_output(out, "learned_range")
    eps = (x_t - module.schedule.gather("alpha_bar", t, x0).sqrt() * x0) / (
        1 - module.schedule.gather("alpha_bar", t, x0)
    ).sqrt()
    mse = (eps - mean_out).pow(2).mean(dim=1)
    term = term_from_output(
        module.schedule,
        x0,
        x_t=x_t,
        t=t,
        out=out,
        parametrization="eps",
        variance="learned_range",
        decoder_variance=module.decoder_variance,
        num_bins=module.num_bins,
    )
    vb = term / x0.shape[1] / math.log(2.0)
    theirs = (mse + vb * T / 1000.0).mean()
    torch.testing.assert_close(loss, theirs, rtol=1e-4, atol=1e-6)


def test_training_the_learned_range_finds_the_kl_optimal_variance():
    """With the exact mean, minimising the sampled ELBO terms over v drives sigma_t^2 to the analytic (KL-optimal)
    variance of Bao et al.: the closed-form -ELBO of the learned variance closes >= 80% of the best fixed variance's
    excess over the analytic optimum."""
    torch.manual_seed(0)
    s = make_schedule("cosine", 20)
    model = OracleWithVariance(s)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        x0 = MEAN + STD * torch.randn(1024, 4, generator=g, dtype=torch.float64)
        t = torch.randint(1, s.T + 1, (1024,), generator=g)
        x_t = s.gather("alpha_bar", t, x0).sqrt() * x0 + (1 - s.gather("alpha_bar", t, x0)).sqrt() * torch.randn(
            x0.shape, generator=g, dtype=torch.float64
        )
        out = stop_mean_gradient(model(x_t, t), "learned_range")
        term = term_from_output(
            s, x0, x_t=x_t, t=t, out=out, parametrization="eps", variance="learned_range", num_bins=None
        )
        optimizer.zero_grad()
        term.mean().backward()
        optimizer.step()

    def total(variance):
        return oracle_expected_terms(s, MEAN, std=STD, variance=variance).total

    learned, optimum = total(model.variance_table(s)), total(oracle_analytic_variance_table(s, STD))
    small, large = total("small"), total("large")
    # measured: learned 1.19601, analytic 1.19580, small 2.17065, large 1.19882 nats/dim
    assert learned - optimum < 0.2 * (min(small, large) - optimum)


# ------------------------------------------------------------------------------------------ framework wiring
def _compose(*overrides):
    from hydra import compose, initialize_config_dir

    from .helpers import CONF_DIR, FAST

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[*FAST, *overrides])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["variance=learned_range", "loss=simple"], "use loss=hybrid"),
        (["variance=small", "loss=hybrid"], "set variance=learned_range"),
        (["variance=learned_range", "loss=hybrid", "loss.mean_loss=elbo"], "not an MSE loss"),
        (["variance=learned_range", "loss=hybrid", "loss.vlb_weight=-1"], "loss.vlb_weight=-1"),
    ],
)
def test_variance_and_loss_combinations_that_cannot_train_are_refused(overrides, message):
    from diffusion_elbo.config import ConfigError, validate_config

    with pytest.raises(ConfigError, match=message):
        validate_config(_compose(*overrides))


def test_models_grow_the_variance_channels_only_when_learned():
    from diffusion_elbo.builders import build_model

    assert build_model(_compose("variance=learned_range", "loss=hybrid")).out_channels == 2  # digits: 1 channel
    for experiment, channels in (("mnist_unet", 1), ("cifar10_ddpm", 3)):
        cfg = _compose(f"experiment={experiment}", "variance=learned_range", "loss=hybrid")
        assert build_model(cfg).out_channels == 2 * channels
    assert build_model(_compose()).out_channels == 1
    toy = ["data=toy2d", "model=mlp", "variance=learned_range", "loss=elbo"]
    assert build_model(_compose(*toy)).out_dim == 4
    with pytest.raises(ValueError, match="model.out_channels=2"):
        build_model(_compose("variance=learned_range", "loss=hybrid", "model.out_channels=3"))
    with pytest.raises(ValueError, match="cannot"):
        build_model(_compose("data=gaussian", "model=gaussian_oracle", "variance=learned_range", "loss=elbo"))


def test_hybrid_loss_gives_the_mean_head_the_mean_loss_gradient_and_the_variance_head_the_elbo_gradient(tmp_path):
    """On the MLP's output layer, rows 0..D-1 make the mean and rows D..2D-1 make v: under loss=hybrid the mean
    rows get exactly loss=simple's gradient (the ELBO half is stopped there) and the v rows get lambda x the ELBO's."""
    from diffusion_elbo.builders import build_module

    from .helpers import compose_train

    def output_grad(vlb_weight, loss="hybrid"):
        overrides = [
            "data=toy2d",
            "model=mlp",
            "variance=learned_range",
            f"loss={loss}",
            f"loss.vlb_weight={vlb_weight}" if loss == "hybrid" else "loss.timestep_sampling=uniform",
        ]
        cfg = compose_train(tmp_path, overrides)
        torch.manual_seed(0)
        module, datamodule = build_module(cfg)
        torch.nn.init.normal_(module.net.output.weight, std=0.1)  # a non-zero head, so v differs per example
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))
        with pytest.warns(UserWarning):  # self.log without a trainer
            loss = module.training_step(batch, 0)
        loss.backward()
        return module.net.output.weight.grad.clone()

    zero, hybrid, double = output_grad(0.0), output_grad(0.001), output_grad(0.002)
    torch.testing.assert_close(hybrid[:2], zero[:2])  # mean rows: the mean loss only
    assert zero[2:].abs().max() == 0  # v rows: nothing without the ELBO half ...
    assert hybrid[2:].abs().max() > 0
    torch.testing.assert_close(double[2:], 2 * hybrid[2:])  # ... and linear in lambda
    elbo = output_grad(None, loss="elbo")  # loss=elbo trains both heads through the terms
    assert elbo[:2].abs().max() > 0 and elbo[2:].abs().max() > 0
    assert not torch.allclose(elbo[:2], zero[:2])


def test_sampling_a_fixed_variance_model_with_learned_range_is_refused(tmp_path):
    from diffusion_elbo.builders import build_module

    from .helpers import compose_train

    module, _ = build_module(compose_train(tmp_path))
    with pytest.raises(ValueError, match="needs a model trained with it"):
        module.sample(2, AncestralSampler(steps=2), variance="learned_range")


@pytest.mark.slow
def test_learned_range_hybrid_run_trains_evaluates_and_samples_stating_the_variance(tmp_path):
    import json

    import numpy as np
    from hydra import compose, initialize_config_dir

    from diffusion_elbo.evaluation import run_eval

    from .helpers import CONF_DIR, FAST, run_cli

    run = tmp_path / "run"
    common = ("schedule.timesteps=50",)
    result = run_cli("train.py", *FAST, *common, "variance=learned_range", "loss=hybrid", f"hydra.run.dir={run}")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "reverse variance=learned_range" in (run / "train.log").read_text()
    assert json.loads((run / "train_metrics.json").read_text())["variance"] == "learned_range"
    ckpt = run / "checkpoints" / "last.ckpt"
    assert torch.load(ckpt, weights_only=False)["state_dict"]["net.conv_out.weight"].shape[0] == 2

    for variance in ("learned_range", "small", "analytic"):
        out = tmp_path / f"eval_{variance}"
        args = [f"ckpt_path={ckpt}", f"variance={variance}", "num_examples=16", "fid.num_samples=0"]
        args += ["analytic.num_examples=32", "wandb.enabled=false"]
        if variance == "learned_range":  # as a user runs it
            result = run_cli("eval.py", *args, f"hydra.run.dir={out}")
            assert result.returncode == 0, result.stderr[-2000:]
        else:  # src/eval.py's job in this process (no start-up cost)
            with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
                run_eval(compose("eval", overrides=args), out)
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["variance"] == variance and metrics["trained_variance"] == "learned_range"
        assert math.isfinite(metrics["bpd"])

    for sampler in ("ddpm", "ddim"):
        out = tmp_path / f"samples_{sampler}"
        result = run_cli(
            "sample.py",
            f"ckpt_path={ckpt}",
            f"sampler={sampler}",
            "sampler.steps=5",
            "num_samples=4",
            f"hydra.run.dir={out}",
        )
        assert result.returncode == 0, result.stderr[-2000:]
        npz = np.load(out / "samples.npz")
        assert npz["samples"].shape == (4, 1, 8, 8) and np.isfinite(npz["samples"]).all()
        assert str(npz["variance"]) == "learned_range"


def test_sweep_report_states_the_training_and_the_eval_variance(tmp_path):
    """A run trained with `small` and evaluated with `analytic`: the report says which variance each number is under."""
    import json

    from omegaconf import OmegaConf

    from diffusion_elbo.report import collect_runs, write_report

    run = tmp_path / "schedule=cosine"
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(
        OmegaConf.create({"task_name": "train", "variance": "small", "schedule": {"name": "cosine"}}),
        run / ".hydra" / "config.yaml",
    )
    (run / "train_metrics.json").write_text(json.dumps({"val/elbo_bpd": 3.4, "variance": "small"}))
    (run / "metrics.json").write_text(json.dumps({"bpd": 3.1, "bpd_se": 0.02, "variance": "analytic"}))
    (row,) = collect_runs(tmp_path)
    assert row["variance"] == "small" and row["test/variance"] == "analytic" and row["test/bpd"] == 3.1
    table = write_report([row], tmp_path)["md"].read_text()
    assert "test/variance" in table and "analytic" in table
