"""The Bayes-optimal denoiser for Gaussian data, usable with every parametrization."""

from __future__ import annotations

from torch import Tensor, nn

from diffusion_elbo.core.gaussian_data import oracle_x0
from diffusion_elbo.core.parametrization import Parametrization, output_from_x0
from diffusion_elbo.core.schedules import NoiseSchedule


class GaussianOracle(nn.Module):
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
        x0 = oracle_x0(self.schedule, x_t, t, self.mean, self.std)
        return output_from_x0(self.parametrization, self.schedule, x_t, t, x0)
