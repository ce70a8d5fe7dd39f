"""Four classes a researcher adds without editing diffusion-elbo: a noise schedule, a training objective, a sampler and
a likelihood estimator, each selected by ``_target_`` from a yaml in ``conf/<group>/example.yaml`` (README.md has the
commands).

- :class:`LaplaceLogSNR`: a continuous-time schedule whose log-SNR is Laplace-distributed in t (Hang et al. 2024,
  "Improved noise schedule for diffusion training"), truncated to the usual endpoints;
- :class:`MinSNRLoss`: the Min-SNR-gamma weighting of the MSE (Hang et al. 2023), w = min(SNR, gamma) on the x0 error;
- :class:`DPMSolverPP2M`: DPM-Solver++(2M), a second-order multistep sampler in the data-prediction form (Lu et al.
  2022, Alg. 2), on the trained chain's timesteps;
- :class:`ImportanceWeightedBound`: -log of the importance-weighted average of K forward trajectories' weights
  p(x_{0:T}) / q(x_{1:T} | x_0) (Burda et al. 2016 applied to the diffusion chain): K = 1 is the ELBO, and the bound
  tightens towards -log p(x_0) as K grows.

Only the framework's public interfaces are used: ``LogSNRSchedule`` (core.logsnr), ``WeightedMSE`` (core.losses),
``Sampler`` and ``Chain``
(core.samplers), ``LikelihoodEstimator`` with ``EvalSubject``/``EvalRun``/``Estimate`` (evaluation.estimators), the
one shard-and-gather loop ``map_examples`` and the per-example seeds ``example_generator``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from diffusion_elbo.core.distributions import gaussian_log_prob, sum_flat
from diffusion_elbo.core.elbo import decoder_nll_nats, example_generator
from diffusion_elbo.core.logsnr import LogSNR, LogSNRSchedule
from diffusion_elbo.core.losses import WeightedMSE
from diffusion_elbo.core.reverse import p_mean_variance
from diffusion_elbo.core.samplers import Chain, Sampler, spaced_timesteps
from diffusion_elbo.evaluation.estimators import Estimate, EvalRun, EvalSubject, LikelihoodEstimator, bpd_and_se
from diffusion_elbo.evaluation.runner import map_examples

# ---- a schedule ---------------------------------------------------------------------------------------------------


class LaplaceLogSNR(LogSNRSchedule):
    """log SNR lambda(u) = mu - b sgn(1/2 - u) log(1 - 2 |u - 1/2|) on u in (0, 1), the inverse CDF of a Laplace(mu, b)
    in -lambda (Hang et al. 2024): it spends most of t near log SNR = mu. t in [0, 1] maps affinely onto [u_0, u_1], the
    u where gamma = -lambda reaches ``gamma_min`` and ``gamma_max``, so the endpoints are those of the other schedules.

    gamma(t) = -lambda(u(t)); d gamma / dt = b (u_1 - u_0) / min(u, 1 - u), positive, so gamma rises with the noise."""

    def __init__(self, gamma_min: float = -13.3, gamma_max: float = 5.0, mu: float = 0.0, b: float = 4.0) -> None:
        if not gamma_min < -mu < gamma_max:
            raise ValueError(f"mu={mu} must put -mu between gamma_min={gamma_min} and gamma_max={gamma_max}")
        if not b > 0:
            raise ValueError(f"b={b} must be > 0 (the Laplace scale, in log-SNR units)")
        super().__init__((gamma_min, gamma_max), name="laplace")
        self.mu, self.b = float(mu), float(b)
        self.u0, self.u1 = self._u(-gamma_min), self._u(-gamma_max)

    def _u(self, log_snr: float) -> float:
        """The inverse of lambda(u): where lambda = log_snr."""
        if log_snr >= self.mu:
            return 0.5 * math.exp((self.mu - log_snr) / self.b)
        return 1.0 - 0.5 * math.exp((log_snr - self.mu) / self.b)

    def forward(self, t: Tensor) -> LogSNR:
        u = self.u0 + (self.u1 - self.u0) * t
        low = u < 0.5
        # lambda = mu - b log(2u) below 1/2, mu + b log(2 - 2u) above
        log_snr = torch.where(low, self.mu - self.b * torch.log(2 * u), self.mu + self.b * torch.log(2 - 2 * u))
        slope = self.b * (self.u1 - self.u0) / torch.where(low, u, 1 - u)
        return LogSNR(gamma=-log_snr, slope=slope)


# ---- an objective -------------------------------------------------------------------------------------------------


class MinSNRLoss(WeightedMSE):
    """Min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via Min-SNR weighting strategy"): the weight on
    ||x0_hat - x0||^2 is min(SNR, gamma), so the low-noise steps, where SNR is large, stop dominating the loss as they
    do under the eps-MSE (w = SNR), while the noisy steps keep the eps-MSE's weight. In the eps parametrization this is
    min(SNR, gamma) / SNR ||eps - eps_hat||^2; on a chain or in continuous time alike (``WeightedMSE`` does both)."""

    name = "min_snr"

    def __init__(self, gamma: float = 5.0, timestep_sampling: str = "uniform") -> None:
        super().__init__(timestep_sampling)
        if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not gamma > 0:
            raise ValueError(f"gamma={gamma!r} must be a number > 0 (Hang et al. use 5)")
        self.gamma = float(gamma)

    def snr_weight(self, snr: Tensor) -> Tensor:
        return snr.clamp(max=self.gamma)


# ---- a sampler ----------------------------------------------------------------------------------------------------


class DPMSolverPP2M(Sampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Alg. 2) on ``steps`` of the chain's timesteps: with
    lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1} and the model's x0_hat D,

        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i,
        D_i = (1 + 1 / (2 r_i)) x0_hat_{i-1} - 1 / (2 r_i) x0_hat_{i-2},  r_i = h_{i-1} / h_i,

    first order (DDIM's step) at the first step and into the last one; x0_hat itself at the end (sigma = 0 there).
    Deterministic."""

    name = "dpmpp2m"

    def __init__(self, steps: int | None = 20, spacing: str = "time") -> None:
        super().__init__(steps=steps, spacing=spacing)

    @torch.no_grad()
    def sample(self, chain: Chain, shape, *, generator=None, device="cpu", x_T=None, progress=None) -> Tensor:
        x = torch.randn(tuple(shape), generator=generator, device=device) if x_T is None else x_T.to(device)
        schedule = chain.schedule
        ts = spaced_timesteps(schedule, self.num_steps(chain), self.spacing)  # descending, T first
        alpha_bar = schedule.alpha_bar.to(device)
        alpha, sigma = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        lam = torch.log(alpha) - torch.log(sigma)
        previous = None  # (x0_hat, h) of the last step
        for i, step_t in enumerate(ts):
            t = torch.full((x.shape[0],), step_t, dtype=torch.long, device=device)
            x0_hat = chain.x0_hat(x, t).to(x.dtype)
            if i + 1 == len(ts):  # sigma_0 = 0: the last step returns the model's x0_hat
                x = x0_hat
            else:
                s = ts[i + 1]
                h = float(lam[s] - lam[step_t])
                d = x0_hat
                # second order from the second step on, first order into the last one (the authors' lower_order_final):
                # that step's h is the largest, and extrapolating over it was unstable (on the Gaussian oracle, linear
                # schedule, 20 time-spaced steps: error 0.12 with it, 0.006 without; DDIM 0.08)
                if previous is not None and i + 2 < len(ts):
                    r = previous[1] / h
                    d = (1 + 1 / (2 * r)) * x0_hat - previous[0] / (2 * r)
                x = float(sigma[s] / sigma[step_t]) * x - float(alpha[s]) * math.expm1(-h) * d
                previous = (x0_hat, h)
            if progress is not None:
                progress(i + 1, len(ts))
        return x


# ---- a likelihood estimator ---------------------------------------------------------------------------------------


class ImportanceWeightedBound(LikelihoodEstimator):
    """-log (1/K) sum_k w_k, w_k = p(x_T) prod_t p(x_{t-1} | x_t) / prod_t q(x_t | x_{t-1}) for K forward trajectories
    x_{1:T}^k ~ q(x_{1:T} | x_0), in bits/dim (``iw_bpd``, with ``iw_bpd_se`` and ``iw_k``). E[-log w] (K = 1) is the
    -ELBO; Burda et al. (2016) show the bound decreases in K and reaches -log p(x_0) as K -> infinity. Each example
    draws its trajectories from its own seed, so the number is the same on 1 or N processes. Cost: K T network calls
    per example."""

    def __init__(self, k: int = 8) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1 (trajectories per example; 1 is the ELBO)")
        self.k = k

    def evaluate(self, subject: EvalSubject, dataset, run: EvalRun) -> Estimate:
        schedule = subject.schedule
        variance = subject.reverse_variance()

        @torch.no_grad()
        def log_weights(x0: Tensor, indices: list[int]):
            x0 = x0.float()
            b, d = x0.shape[0], x0[0].numel()
            generators = [example_generator(run.seed, i) for i in indices]
            xs = x0.repeat_interleave(self.k, dim=0)  # (b K, *D), example-major
            # the forward noise of every step, drawn per example from its own generator
            noise = torch.stack(
                [torch.randn((schedule.T, self.k, *x0.shape[1:]), generator=g) for g in generators], dim=1
            ).to(run.device)  # (T, b, K, *D)
            noise = noise.reshape(schedule.T, b * self.k, *x0.shape[1:])
            log_w = torch.zeros(b * self.k, dtype=torch.float64, device=run.device)
            x_prev = xs
            for t in range(1, schedule.T + 1):
                beta = schedule.betas[t].to(run.device)
                x_t = torch.sqrt(1 - beta).float() * x_prev + torch.sqrt(beta).float() * noise[t - 1]
                log_q = sum_flat(gaussian_log_prob(x_t, torch.sqrt(1 - beta).float() * x_prev, torch.log(beta).float()))
                step_t = torch.full((x_t.shape[0],), t, dtype=torch.long, device=run.device)
                step = p_mean_variance(
                    schedule,
                    subject.model(x_t, step_t),
                    x_t=x_t,
                    t=step_t,
                    parametrization=subject.parametrization,
                    variance=variance,
                    decoder_variance=subject.decoder_variance,
                )
                if t == 1:
                    log_p = -decoder_nll_nats(xs, step.mean, step.logvar, subject.num_bins)
                else:
                    log_p = sum_flat(gaussian_log_prob(x_prev, step.mean, step.logvar.expand_as(x_prev)))
                log_w += (log_p - log_q).double()
                x_prev = x_t
            log_w += sum_flat(gaussian_log_prob(x_prev, torch.zeros_like(x_prev), torch.zeros_like(x_prev))).double()
            per_example = -(torch.logsumexp(log_w.view(b, self.k), dim=1) - math.log(self.k))  # (b,) nats
            return {"nll": per_example}, d

        mapped = map_examples(dataset, log_weights, batch_size=max(1, run.batch_size // self.k), device=run.device)
        num_dims = next(extra for batches in mapped.extras for extra in batches)
        nats_per_dim = mapped.columns["nll"] / num_dims
        bpd, se = bpd_and_se(nats_per_dim)
        return Estimate({"iw_bpd": bpd, "iw_bpd_se": se, "iw_k": self.k}, {"iw_bpd": nats_per_dim / math.log(2.0)})
