"""Denoising networks: (x_t, t) -> output whose meaning (eps, x0 or v) the parametrization decides."""

from diffusion_elbo.models.embeddings import sinusoidal_embedding
from diffusion_elbo.models.mlp import MLPDenoiser
from diffusion_elbo.models.oracle import DiscreteOracle, GaussianOracle
from diffusion_elbo.models.unet import UNet

__all__ = [
    "DiscreteOracle",
    "GaussianOracle",
    "MLPDenoiser",
    "UNet",
    "sinusoidal_embedding",
]
