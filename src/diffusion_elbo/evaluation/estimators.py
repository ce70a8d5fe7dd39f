"""The likelihood estimators of the eval job, each over a whole data split through :func:`~diffusion_elbo.evaluation.
runner.map_examples` (sharded over processes, per-example randomness, results in data order):

- :func:`evaluate_elbo`: the exact T-step -ELBO with its three terms and per-t profile (``likelihood=elbo``);
- :func:`evaluate_ode`: -log p(x0) of the probability-flow ODE (``likelihood=ode``);
- :func:`evaluate_continuous`: a continuous-time model's own bound (VDM), beside the chain's T-step one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

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
    noise_scale = float(sigma0 / a0)  # truncated_normal: the forward noise at t0, in data units
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
            x, log_q = dequantize(x, num_bins, torch.cat(noise_u).to(device), dequantization, noise_scale)
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
