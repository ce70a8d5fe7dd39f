"""The likelihood estimators of the eval job, each over a whole data split through :func:`~diffusion_elbo.evaluation.
runner.map_examples` (sharded over processes, per-example randomness, results in data order):

- :func:`evaluate_elbo`: the exact T-step -ELBO with its three terms and per-t profile (``likelihood=elbo``);
- :func:`evaluate_ode`: -log p(x0) of the probability-flow ODE (``likelihood=ode``);
- :func:`evaluate_continuous`: a continuous-time model's own bound (VDM), beside the chain's T-step one.

and the objects of the ``likelihood`` config group that run them (:class:`LikelihoodEstimator`, the extension point
for an estimator of one's own): :class:`ExactELBO`, :class:`ContinuousBound`, :class:`ProbabilityFlowODE`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from diffusion_elbo.core import (
    DecoderVariance,
    NoiseSchedule,
    Parametrization,
    ReverseVariance,
    exact_elbo,
    nats_to_bits_per_dim,
    standard_error,
)
from diffusion_elbo.core.elbo import Denoiser, example_generator
from diffusion_elbo.core.logsnr import LogSNRSchedule
from diffusion_elbo.core.ode import dequantization_start_time
from diffusion_elbo.core.vdm import GammaDenoiser
from diffusion_elbo.evaluation.runner import map_examples, rank_world

ELBO_TERMS = ("total", "reconstruction", "prior", "denoising")


def bpd_and_se(nats_per_dim: Tensor) -> tuple[float, float]:
    """Mean bits/dim over examples and its standard error, from per-example nats/dim (N,)."""
    return float(nats_to_bits_per_dim(nats_per_dim.mean())), nats_to_bits_per_dim(standard_error(nats_per_dim))


def gap_to_true_nll(nats_per_dim: Tensor, true_per_dim: Tensor) -> tuple[float, float, float, float]:
    """(true NLL bpd, its SE, the gap bpd, the gap's SE) from per-example nats/dim (N,) of an estimate and of the data's
    true NLL: the gap is paired per example, so its SE is much smaller than either SE alone."""
    bpd, _ = bpd_and_se(nats_per_dim)
    true_bpd, true_se = bpd_and_se(true_per_dim)
    return true_bpd, true_se, bpd - true_bpd, nats_to_bits_per_dim(standard_error(nats_per_dim - true_per_dim))


@dataclass
class ELBOSummary:
    """-ELBO over a set of examples: per-example totals and terms, in nats summed over dims."""

    total: Tensor  # (N,)
    reconstruction: Tensor  # (N,)
    prior: Tensor  # (N,)
    denoising: Tensor  # (N,)
    per_t: Tensor  # (T,) mean over examples of L_t
    num_dims: int
    true_nll: Tensor | None = None  # (N,) where the data density is known

    def metrics(self) -> dict:
        """The metrics.json dictionary: bits/dim with its standard error over examples, terms as losses."""
        d = self.num_dims
        nats_per_dim = self.total / d
        bpd, bpd_se = bpd_and_se(nats_per_dim)
        out = {
            "bpd": bpd,
            "bpd_se": bpd_se,
            "nats_per_dim": float(nats_per_dim.mean()),
            "terms_nats_per_dim": {
                "reconstruction": float(self.reconstruction.mean() / d),
                "prior": float(self.prior.mean() / d),
                "denoising": float(self.denoising.mean() / d),
            },
            "per_t_nats_per_dim": [float(v) / d for v in self.per_t],
            "num_examples": int(self.total.numel()),
            "num_dims": d,
        }
        if self.true_nll is not None:
            keys = ("true_nll_bpd", "true_nll_bpd_se", "gap_bpd", "gap_bpd_se")
            out.update(zip(keys, gap_to_true_nll(nats_per_dim, self.true_nll / d), strict=True))
        return out


def evaluate_elbo(
    model: Denoiser,
    schedule: NoiseSchedule,
    dataset,
    *,
    parametrization: Parametrization | str,
    variance: ReverseVariance | str,
    num_bins: int | None,
    seed: int,
    decoder_variance: DecoderVariance | str = DecoderVariance.CLIPPED,
    device: torch.device,
    batch_size: int = 256,
    max_batch: int = 512,
    true_nll=None,
    progress=None,
) -> ELBOSummary:
    """Run :func:`~diffusion_elbo.core.exact_elbo` over every example of ``dataset`` (items (x0, y, ...)) and collect
    the results, in the dataset's order.

    Each example draws its noise from its own generator (:func:`example_generator` of ``seed`` and its index), so the
    numbers do not depend on ``batch_size`` or on the number of processes (:func:`map_examples`).
    ``true_nll``: optional callable x0 -> (B,) nats, the data's exact NLL where it is known.
    """

    def evaluate(x0: Tensor, indices: list[int]):
        result = exact_elbo(
            model,
            schedule,
            x0,
            parametrization=parametrization,
            variance=variance,
            decoder_variance=decoder_variance,
            num_bins=num_bins,
            max_batch=max_batch,
            generators=[example_generator(seed, i) for i in indices],
            progress=progress,
        )
        return _elbo_batch(result, x0, true_nll)

    return _elbo_summary(map_examples(dataset, evaluate, batch_size=batch_size, device=device))


def _elbo_batch(result, x0: Tensor, true_nll) -> tuple[dict[str, Tensor], tuple[Tensor, int]]:
    """One batch's per-example -ELBO terms (and the data's true NLL, where known) for :func:`map_examples`, with the
    batch's per-t sum (float64) and the number of dims as its extra."""
    columns = {name: getattr(result, name) for name in ELBO_TERMS}
    if true_nll is not None:
        columns["true_nll"] = true_nll(x0)
    return columns, (result.per_t.sum(dim=0).double().cpu(), result.num_dims)


def _elbo_summary(mapped) -> ELBOSummary:
    c = mapped.columns
    return ELBOSummary(
        **{name: c[name] for name in ELBO_TERMS},
        per_t=mapped.summed(0) / c["total"].shape[0],
        num_dims=_num_dims(mapped),
        true_nll=c.get("true_nll"),
    )


def _num_dims(mapped) -> int:
    return next(extra[1] for batches in mapped.extras for extra in batches)


@dataclass
class ODESummary:
    """-log p(x) of the probability-flow ODE over a set of examples (:func:`evaluate_ode`)."""

    nll: Tensor  # (N,) nats summed over dims, in data order; for K-level data the dequantization bound on -log P(x0)
    num_dims: int
    nfe: list[int]  # function evaluations of each solve (one batch each)
    seconds: float  # wall time of the solves (this process)
    t_start: float
    dequantization: str  # "uniform" or "truncated_normal" for K-level data, "none" for continuous data
    true_nll: Tensor | None = None  # (N,) where the data density is known

    def metrics(self) -> dict:
        """The ``ode_*`` keys of metrics.json: bits/dim with its standard error over examples, NFE and time."""
        nats_per_dim = self.nll / self.num_dims
        n = int(self.nll.numel())
        bpd, bpd_se = bpd_and_se(nats_per_dim)
        out = {
            "ode_bpd": bpd,
            "ode_bpd_se": bpd_se,
            "ode_nfe": sum(self.nfe) / len(self.nfe),  # per solve (a batch of examples shares the solver's steps)
            "ode_nfe_max": max(self.nfe),
            "ode_seconds": self.seconds,
            "ode_seconds_per_example": self.seconds / n,
            "ode_t_start": self.t_start,
            # K-level data: E_q[-log p(y) + log q(y | x0)], an upper bound on the discrete NLL (Theis et al. 2016)
            "ode_dequantization": self.dequantization,
            "ode_num_examples": n,
        }
        if self.true_nll is not None:
            _, _, out["ode_gap_bpd"], out["ode_gap_bpd_se"] = gap_to_true_nll(
                nats_per_dim, self.true_nll / self.num_dims
            )
        return out


def evaluate_ode(
    model: Denoiser,
    schedule: NoiseSchedule,
    dataset,
    *,
    parametrization: Parametrization | str,
    num_bins: int | None,
    seed: int,
    device: torch.device,
    batch_size: int = 256,
    t_start: float | None = None,
    divergence: str = "hutchinson",
    probes: int = 1,
    dequantization_samples: int = 1,
    dequantization: str = "uniform",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    true_nll=None,
    progress=None,
) -> ODESummary:
    """-log p(x0) of the probability-flow ODE (:func:`~diffusion_elbo.core.ode.ode_nll_nats`) for every example of
    ``dataset`` (items (x0, y)).

    K-level data is dequantized (``dequantization``: uniform or truncated_normal, :func:`~diffusion_elbo.core.ode.
    dequantize`), ``dequantization_samples`` draws per example averaged, and reported as the bound
    E_q[-log p(y) + log q(y | x0)] on -log P(x0). Probes and dequantization noise come from each example's own
    generator (:func:`example_generator`). Under torch.distributed each rank runs the plain model (no DDP wrapper:
    nothing to synchronize inside the solver, so ranks with different step counts cannot hang).
    ``progress(examples_done, nfe)``: called after each solve (examples of all ranks, estimated from this one's).
    """
    from diffusion_elbo.core.ode import Dequantization, dequantize, ode_nll_nats, rademacher

    _, world = rank_world()
    if t_start is None:
        t_start = dequantization_start_time(schedule, num_bins, minimum=min(1.0, schedule.T / 2))
    samples = int(dequantization_samples) if num_bins is not None else 1
    dequantization = Dequantization(dequantization)
    a0, sigma0 = schedule.signal_noise(torch.tensor([float(t_start)], dtype=torch.float64, device=device))
    # truncated_normal: the forward noise at t0, in data units (one per dimension for a multivariate schedule)
    noise_scale = (sigma0 / a0)[0] if schedule.multivariate else float(sigma0 / a0)
    done = [0]

    def evaluate(x0: Tensor, indices: list[int]):
        shape = tuple(x0.shape[1:])
        noise_u, noise_v = [], []
        for i in indices:
            g = example_generator(seed, i)
            noise_u.append(torch.rand((samples, *shape), generator=g, dtype=torch.float64))
            noise_v.append(rademacher((samples, int(probes), *shape), g))
        x = x0.repeat_interleave(samples, dim=0)  # (b S, *D): example-major, S samples each
        log_q = torch.zeros(x.shape[0], dtype=torch.float64, device=device)
        if num_bins is not None:
            x, log_q = dequantize(
                x, num_bins, u=torch.cat(noise_u).to(device), kind=dequantization, noise_scale=noise_scale
            )
        began = time.perf_counter()
        result = ode_nll_nats(
            model,
            schedule,
            x,
            parametrization=parametrization,
            t_start=t_start,
            divergence=divergence,
            probes=torch.cat(noise_v).to(device),
            rtol=rtol,
            atol=atol,
            method=method,
        )
        seconds = time.perf_counter() - began
        # -log P(x0) <= E_q[-log p(y) + log q(y | x0)], the expectation over the S samples
        columns = {"nll": (result.nll + log_q).view(len(indices), samples).mean(dim=1)}  # (b,)
        if true_nll is not None:
            columns["true_nll"] = true_nll(x0)
        done[0] += len(indices)
        if progress is not None:
            progress(min(len(dataset), done[0] * world), result.nfe)
        return columns, (result.nfe, seconds, x0[0].numel())

    per_solve = max(1, int(batch_size) // samples)  # examples per solve: batch_size rows in all
    mapped = map_examples(dataset, evaluate, batch_size=per_solve, device=device)
    return ODESummary(
        nll=mapped.columns["nll"],
        num_dims=_num_dims_at(mapped, 2),
        nfe=[extra[0] for batches in mapped.extras for extra in batches],
        # the ranks run side by side: the evaluation takes the slowest one's time
        seconds=max(sum(extra[1] for extra in batches) for batches in mapped.extras),
        t_start=float(t_start),
        dequantization=dequantization.value if num_bins is not None else "none",
        true_nll=mapped.columns.get("true_nll"),
    )


def _num_dims_at(mapped, position: int) -> int:
    return next(extra[position] for batches in mapped.extras for extra in batches)


def evaluate_continuous(
    denoiser: GammaDenoiser,
    logsnr: LogSNRSchedule,
    dataset,
    *,
    parametrization: Parametrization | str,
    num_bins: int | None,
    strata: int,
    seed: int,
    device: torch.device,
    timesteps: int | None = None,
    chain_timesteps: int = 1000,
    batch_size: int = 256,
    max_batch: int = 512,
    true_nll=None,
) -> ELBOSummary:
    """The continuous-time bound (``timesteps=None``; the T-step one of the same model for an integer T) of
    ``denoiser`` under ``logsnr`` over ``dataset`` (:func:`~diffusion_elbo.core.vdm.stratified_continuous_elbo`,
    ``strata`` times per example). Every example draws its times and noise from its own generator
    (:func:`~diffusion_elbo.core.vdm.continuous_example_draws`), so the numbers do not depend on the batching or on the
    number of processes. A continuous model gives its inputs with ``module.bound_inputs()``; an oracle its
    ``x0_at_log_snr`` with ``parametrization="x0"``. ``true_nll``: optional callable x0 -> (B,) nats."""
    from diffusion_elbo.core.vdm import continuous_example_draws, stratified_continuous_elbo

    def evaluate(x0: Tensor, indices: list[int]):
        x0 = x0.float()
        u, eps = continuous_example_draws(
            torch.tensor(indices), seed, strata, tuple(x0.shape[1:])
        )  # (B, K), (B, K, *D)
        result = stratified_continuous_elbo(
            denoiser,
            logsnr,
            x0,
            parametrization=parametrization,
            num_bins=num_bins,
            strata=strata,
            u=u.to(device),
            eps=eps.to(device),
            timesteps=timesteps,
            chain_timesteps=chain_timesteps,
            max_batch=max_batch,
        )
        return _elbo_batch(result, x0, true_nll)

    return _elbo_summary(map_examples(dataset, evaluate, batch_size=batch_size, device=device))


# ---- the estimator objects of the ``likelihood`` config group -----------------------------------------------------------


@dataclass
class EvalSubject:
    """What an estimator evaluates: a model on a T-step chain, as a checkpoint or a config (an oracle) gives it.

    ``network(x_t, t)`` is the network as trained (its variance channels included); ``model`` the denoiser under the
    asked-for reverse ``variance`` (the network's mean half where it learned a variance that is not asked for);
    ``mean_model`` its mean output alone (what the ODE integrates). t are chain steps (B,) in 1..T (float between them
    for the ODE). ``reverse_variance()`` is the variance the bound uses: ``variance``'s name, or for ``analytic`` its
    (T + 1,) table, estimated on first use. ``continuous_bound``: the inputs of :func:`evaluate_continuous` where the
    subject has a continuous-time bound of its own (a continuous-time checkpoint, an oracle on a log-SNR schedule)."""

    network: Denoiser
    model: Denoiser
    mean_model: Denoiser
    schedule: NoiseSchedule
    parametrization: str
    trained_variance: str
    variance: str
    decoder_variance: str
    num_bins: int | None
    continuous_bound: dict | None = None
    variance_table: Callable[[], Tensor] | None = None
    _table: Tensor | None = field(default=None, repr=False)

    def reverse_variance(self) -> str | Tensor:
        if self.variance != ReverseVariance.ANALYTIC.value or self.variance_table is None:
            return self.variance
        if self._table is None:
            self._table = self.variance_table()
        return self._table


@dataclass
class EvalRun:
    """How the eval job runs every estimator: per-example seeds from ``seed``, examples per batch, rows per network
    call, the device, the data's exact NLL (a callable x0 -> (B,) nats, where known) and the seconds between progress
    lines in a log (``progress_every_s``)."""

    seed: int
    device: torch.device
    batch_size: int = 256
    max_batch: int = 512
    true_nll: Callable[[Tensor], Tensor] | None = None
    progress_every_s: float = 30.0


@dataclass
class Estimate:
    """An estimator's result: ``metrics`` go into metrics.json (its own keys, e.g. ``ode_bpd``), ``columns`` (N,)
    per-example bits/dim in data order into per_example.csv (e.g. ``ode_bpd``)."""

    metrics: dict
    columns: dict[str, Tensor]


class LikelihoodEstimator(ABC):
    """-log p(x0), or a bound on it, for every example of a data split: the interface an estimator of one's own
    implements (``docs/extending.md``). The constructor takes its config keys and checks them (a ``ValueError`` that
    starts with the argument, ``probes=0 must be ...``); :meth:`evaluate` returns an :class:`Estimate`, or None where
    the subject has nothing for this estimator (a discrete model and the continuous-time bound). Run it through
    :func:`~diffusion_elbo.evaluation.runner.map_examples` with :func:`example_generator` for its randomness, and its
    numbers are the same on 1 or N processes."""

    @abstractmethod
    def evaluate(self, subject: EvalSubject, dataset, run: EvalRun) -> Estimate | None:
        """The estimate over ``dataset`` (items (x0, y, ...)), or None where it does not apply to ``subject``."""


def _positive_int(name: str, value, fix: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} must be an integer >= 1{fix}")
    return value


def _positive(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{name}={value!r} must be a number > 0")
    return float(value)


class ExactELBO(LikelihoodEstimator):
    """The exact T-step -ELBO (all T terms of every example) with its three terms and per-t profile:
    :func:`evaluate_elbo`. Its keys are metrics.json's top-level ``bpd``, ``terms_nats_per_dim``, ... ."""

    def evaluate(self, subject: EvalSubject, dataset, run: EvalRun) -> Estimate:
        import math

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        from diffusion_elbo.progress import ProgressLog, interactive

        _, world = rank_world()
        total_steps = math.ceil(len(dataset) / world / run.batch_size) * subject.schedule.T
        columns = (TextColumn("eval -ELBO"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        lines = ProgressLog("eval -ELBO", total_steps, "timesteps x batches", every_s=run.progress_every_s)
        variance = subject.reverse_variance()
        with Progress(*columns, transient=True, disable=not interactive()) as bar:
            task = bar.add_task("eval", total=total_steps)
            last = {"t": 0, "done": 0}

            def progress(t: int, T: int) -> None:
                # exact_elbo reports the last timestep done in each batch; it restarts at 1 every batch
                bar.advance(task, t - last["t"])
                last["done"] += t - last["t"]
                last["t"] = t % T
                batches = last["done"] // T
                examples = min(len(dataset), batches * run.batch_size * world)
                lines.update(last["done"], f"{examples}/{len(dataset)} examples done, t {t}/{T} of this batch")

            summary = evaluate_elbo(
                subject.model,
                subject.schedule,
                dataset,
                parametrization=subject.parametrization,
                variance=variance,
                decoder_variance=subject.decoder_variance,
                num_bins=subject.num_bins,
                seed=run.seed,
                device=run.device,
                batch_size=run.batch_size,
                max_batch=run.max_batch,
                true_nll=run.true_nll,
                progress=progress,
            )
        return Estimate(summary.metrics(), {"bpd": nats_to_bits_per_dim(summary.total / summary.num_dims)})


class ContinuousBound(LikelihoodEstimator):
    """A continuous-time model's own bound (T -> infinity, or its T-step one; VDM), from ``strata`` stratified times
    per example (:func:`evaluate_continuous`), under ``continuous`` in metrics.json; None for a discrete model."""

    def __init__(self, strata: int = 64) -> None:
        self.strata = _positive_int("strata", strata)

    def evaluate(self, subject: EvalSubject, dataset, run: EvalRun) -> Estimate | None:
        bound = subject.continuous_bound
        if bound is None:
            return None
        summary = evaluate_continuous(
            **bound,
            dataset=dataset,
            strata=self.strata,
            seed=run.seed,
            device=run.device,
            batch_size=run.batch_size,
            max_batch=run.max_batch,
            true_nll=run.true_nll,
        )
        metrics = summary.metrics()
        metrics["timesteps"] = bound["timesteps"]  # null: the continuous-time bound
        return Estimate(
            {"continuous": metrics}, {"continuous_bpd": nats_to_bits_per_dim(summary.total / summary.num_dims)}
        )


class ProbabilityFlowODE(LikelihoodEstimator):
    """-log p(x0) of the model's probability-flow ODE (Song et al. 2021), dequantized on K-level data: the
    :func:`evaluate_ode` arguments as config keys, checked here; the ``ode_*`` keys of metrics.json."""

    def __init__(
        self,
        method: str = "dopri5",
        rtol: float = 1e-5,
        *,
        atol: float = 1e-5,
        divergence: str = "hutchinson",
        probes: int = 1,
        dequantization: str = "uniform",
        dequantization_samples: int = 1,
        t_start: float | None = None,
        batch_size: int | None = None,
    ) -> None:
        from diffusion_elbo.core.ode import ODE_METHODS, Dequantization, Divergence

        if method not in ODE_METHODS:
            raise ValueError(
                f"method={method!r} is not an adaptive torchdiffeq solver; choose one of {' | '.join(ODE_METHODS)}"
            )
        for name, value, enum in (("divergence", divergence, Divergence), ("dequantization", dequantization,
                                                                           Dequantization)):  # fmt: skip
            if value not in {m.value for m in enum}:
                raise ValueError(f"{name}={value!r} is not an option; choose {' | '.join(m.value for m in enum)}")
        self.method, self.divergence, self.dequantization = method, divergence, dequantization
        self.rtol, self.atol = _positive("rtol", rtol), _positive("atol", atol)
        self.probes = _positive_int("probes", probes)
        self.dequantization_samples = _positive_int("dequantization_samples", dequantization_samples)
        self.t_start = None if t_start is None else _positive("t_start", t_start)
        self.batch_size = None if batch_size is None else _positive_int("batch_size", batch_size, " (or null)")

    def evaluate(self, subject: EvalSubject, dataset, run: EvalRun) -> Estimate:
        import logging

        from diffusion_elbo.progress import ProgressLog

        logging.getLogger(__name__).info(
            "probability-flow ODE likelihood of %d examples (%s, rtol %g, atol %g, %s divergence%s)",
            len(dataset),
            self.method,
            self.rtol,
            self.atol,
            self.divergence,
            f", {self.probes} probe(s)" if self.divergence == "hutchinson" else "",
        )
        lines = ProgressLog("ODE likelihood", len(dataset), "examples", every_s=run.progress_every_s)
        summary = evaluate_ode(
            subject.mean_model,
            subject.schedule,
            dataset,
            progress=lambda done, nfe: lines.update(done, f"{nfe} NFE in the last solve"),
            parametrization=subject.parametrization,
            num_bins=subject.num_bins,
            seed=run.seed,
            device=run.device,
            batch_size=self.batch_size or run.batch_size,
            t_start=self.t_start,
            divergence=self.divergence,
            probes=self.probes,
            dequantization_samples=self.dequantization_samples,
            dequantization=self.dequantization,
            rtol=self.rtol,
            atol=self.atol,
            method=self.method,
            true_nll=run.true_nll,
        )
        return Estimate(summary.metrics(), {"ode_bpd": nats_to_bits_per_dim(summary.nll / summary.num_dims)})
