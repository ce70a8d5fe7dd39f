"""diffusion-elbo: denoising diffusion models built around the variational lower bound."""

__version__ = "0.1.0"
