"""Bayes-optimal denoisers for data whose distribution is known (Gaussian, i.i.d. K-level), for every parametrization."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from diffusion_elbo.core.chain import NoiseSchedule
from diffusion_elbo.core.discrete_data import discrete_oracle_x0, discrete_posterior_mean, resolve_probs
from diffusion_elbo.core.gaussian_data import oracle_x0
from diffusion_elbo.core.logsnr import alpha_sigma
from diffusion_elbo.core.parametrization import Parametrization, output_from_x0
from diffusion_elbo.core.vdm import gaussian_oracle_x0


class ClosedFormOracle(nn.Module):
    """A Bayes-optimal denoiser E[x0 | x_t] in closed form, for data whose distribution is known. Two interfaces: on
    a T-step chain, ``forward(x_t, t)`` gives the network output of its parametrization at step (or real time) t of
    its ``schedule``; at a noise level, ``x0_at_log_snr(z, gamma)`` gives x0_hat at gamma = -log SNR (B,), the
    continuous-time estimator's interface (:data:`~diffusion_elbo.core.vdm.GammaDenoiser` with parametrization x0),
    so the oracle serves any log-SNR schedule at real t."""

    def x0_at_log_snr(self, z: Tensor, gamma: Tensor) -> Tensor:
        raise NotImplementedError


class GaussianOracle(ClosedFormOracle):
    """x0_hat = E[x0 | x_t] in closed form for x0 ~ N(mean, std^2 I), returned as the network output
    of ``parametrization`` (eps, x0 or v). It has no parameters: it is the reference every trained
    model is compared with on ``data=gaussian``.
    """

    def __init__(
        self,
        schedule: NoiseSchedule,
        mean: float,
        std: float,
        parametrization: Parametrization | str = Parametrization.EPS,
    ) -> None:
        super().__init__()
        if std <= 0:
            raise ValueError(f"data.std must be > 0 for the Gaussian oracle; got {std}")
        self.schedule = schedule
        self.mean = float(mean)
        self.std = float(std)
        self.parametrization = Parametrization(parametrization)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        x0 = oracle_x0(self.schedule, x_t, t=t, mean=self.mean, std=self.std)
        return output_from_x0(self.parametrization, self.schedule, x_t=x_t, t=t, x0=x0)

    def x0_at_log_snr(self, z: Tensor, gamma: Tensor) -> Tensor:
        return gaussian_oracle_x0(z, gamma, self.mean, self.std)


class DiscreteOracle(ClosedFormOracle):
    """x0_hat = E[x0 | x_t] in closed form for i.i.d. K-level data with level probabilities ``probs`` (a posterior
    over the K levels of each dimension), returned as the network output of ``parametrization``. The reference for
    ``data=discrete_toy``: its -ELBO against the data's true NLL checks the discretized decoder and bits/dim."""

    def __init__(
        self,
        schedule: NoiseSchedule,
        probs: Sequence[float] | None = None,
        num_bins: int | None = None,
        parametrization: Parametrization | str = Parametrization.EPS,
    ) -> None:
        super().__init__()
        self.schedule = schedule
        self.register_buffer("probs", resolve_probs(probs, num_bins))  # the data module's rule, same distribution
        self.parametrization = Parametrization(parametrization)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        x0 = discrete_oracle_x0(self.schedule, x_t, t, self.probs)
        return output_from_x0(self.parametrization, self.schedule, x_t=x_t, t=t, x0=x0)

    def x0_at_log_snr(self, z: Tensor, gamma: Tensor) -> Tensor:
        a, sigma = alpha_sigma(gamma.double())
        return discrete_posterior_mean(z, a, sigma, self.probs)
