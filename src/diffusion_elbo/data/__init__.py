"""Data modules: each yields (x0, y) batches and states ``data_shape`` and ``num_bins`` before setup()."""

from diffusion_elbo.data.base import DiffusionDataModule
from diffusion_elbo.data.cifar10 import CIFAR10DataModule
from diffusion_elbo.data.digits import DigitsDataModule
from diffusion_elbo.data.discrete_toy import DiscreteToyDataModule
from diffusion_elbo.data.gaussian import GaussianDataModule
from diffusion_elbo.data.image_folder import ImageFolderDataModule
from diffusion_elbo.data.mnist import MNISTDataModule
from diffusion_elbo.data.toy2d import Toy2D, Toy2DDataModule

__all__ = [
    "CIFAR10DataModule",
    "DiffusionDataModule",
    "DigitsDataModule",
    "DiscreteToyDataModule",
    "GaussianDataModule",
    "ImageFolderDataModule",
    "MNISTDataModule",
    "Toy2D",
    "Toy2DDataModule",
]
