"""Augmentation with conditioning (non-leaky augmentation; Karras et al. 2022, "Elucidating the Design Space of
Diffusion-Based Generative Models", EDM, App. F.2; Kingma & Gao 2023): each training image is transformed at random
and the network is told which transform it got, as a vector of labels that is zero for the identity. The model then
learns p(x | transform), and p(x | identity) is a model of the data itself: the bound, the samples and every other
evaluation use the network without labels (the identity). It fights overfitting on a small data set without changing
the distribution that the bound measures, which plain augmentation would.

Pure torch (no Lightning): an augmentation is called on a batch with a generator, on the batch's device.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class Augmented(NamedTuple):
    """x0 (B, *D) transformed, and labels (B, dim) float32 saying how (all zero: the identity)."""

    x0: Tensor
    labels: Tensor


class Augmentation:
    """What the training step calls: ``augmentation(x0, generator=g) -> Augmented``. ``dim``: the number of labels
    the network's conditioning input takes (the UNet's ``augment_dim``). Subclass it for your own (e.g. a colour
    transform): the labels must be zero exactly for the identity, which evaluation assumes."""

    dim: int = 0

    def __call__(self, x0: Tensor, *, generator: torch.Generator | None = None) -> Augmented:
        raise NotImplementedError


class GeometricAugmentation(Augmentation):
    """Transforms that keep every pixel value on the data's grid (so a discretized decoder's bins stay the bins), each
    applied to an image with probability ``p`` independently (EDM applies each of its transforms with the same p):

    - ``xflip``: mirror left-right; label 1 if mirrored.
    - ``rotate90``: rotate by k * 90 degrees, k uniform in {1, 2, 3}; labels (cos(k pi / 2) - 1, sin(k pi / 2)).
    - ``translate``: shift by (dx, dy) whole pixels, each uniform in {-translate..translate}, padding by reflection
      (EDM's padding); labels (dx, dy) / translate.

    With x-flips and rotations together every element of the square's symmetry group occurs. x0 (B, C, H, W) square
    images; ``dim`` = 1 + 2 + 2 labels for the transforms enabled."""

    def __init__(self, p: float = 0.15, xflip: bool = True, rotate90: bool = True, translate: int = 1) -> None:
        if not 0.0 <= float(p) <= 1.0:
            raise ValueError(f"p={p!r} must be a probability in [0, 1] (EDM uses 0.12 on CIFAR-10)")
        if not isinstance(translate, int) or isinstance(translate, bool) or translate < 0:
            raise ValueError(f"translate={translate!r} must be an integer >= 0 (pixels; 0 turns it off)")
        if not (xflip or rotate90 or translate):
            raise ValueError("xflip, rotate90 and translate are all off: nothing to augment; use augment=null instead")
        self.p = float(p)
        self.xflip, self.rotate90, self.translate = bool(xflip), bool(rotate90), int(translate)
        self.dim = int(self.xflip) + 2 * int(self.rotate90) + 2 * int(self.translate > 0)

    def __call__(self, x0: Tensor, *, generator: torch.Generator | None = None) -> Augmented:
        if x0.dim() != 4 or x0.shape[-1] != x0.shape[-2]:
            raise ValueError(
                f"augment=geometric transforms square images (B, C, H, H); got a batch of shape {tuple(x0.shape)}: "
                "use augment=null for this data"
            )
        b, device = x0.shape[0], x0.device
        if self.translate >= x0.shape[-1]:
            raise ValueError(
                f"augment.translate={self.translate} must be smaller than the image ({x0.shape[-1]} pixels)"
            )

        def chosen() -> Tensor:  # (B,) bool: which images get this transform
            return torch.rand(b, generator=generator, device=device) < self.p

        x, labels = x0, []
        if self.xflip:
            flip = chosen()
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            labels.append(flip.float()[:, None])
        if self.rotate90:
            k = torch.randint(1, 4, (b,), generator=generator, device=device) * chosen()  # (B,) in 0..3, 0: none
            rotations = torch.stack([torch.rot90(x, n, dims=(-2, -1)) for n in range(4)])  # (4, B, C, H, W)
            x = rotations[k, torch.arange(b, device=device)]  # each image's own rotation
            angle = k.double() * (torch.pi / 2)
            labels.append(torch.stack([torch.cos(angle) - 1, torch.sin(angle)], dim=1).round().float())
        if self.translate:
            r = self.translate
            shift = torch.randint(-r, r + 1, (b, 2), generator=generator, device=device) * chosen()[:, None]
            x = _translate(x, shift, r)
            labels.append(shift.float() / r)
        return Augmented(x.contiguous(), torch.cat(labels, dim=1))

    def __repr__(self) -> str:
        return (f"GeometricAugmentation(p={self.p}, xflip={self.xflip}, rotate90={self.rotate90}, "
                f"translate={self.translate})")  # fmt: skip


def _translate(x: Tensor, shift: Tensor, r: int) -> Tensor:
    """x (B, C, H, W) shifted by shift (B, 2) = (dx, dy) whole pixels (right, down; |dx|, |dy| <= r < H), the uncovered
    border filled by reflecting the image (as EDM pads), so every value is one of the image's own."""
    size = x.shape[-1]
    padded = F.pad(x, (r, r, r, r), mode="reflect")  # (B, C, H + 2r, W + 2r)
    rows = torch.arange(size, device=x.device)
    top = (r - shift[:, 1])[:, None] + rows  # (B, H): padded row of each output row
    left = (r - shift[:, 0])[:, None] + rows  # (B, W)
    index = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[index, top[:, :, None], left[:, None, :]].permute(0, 3, 1, 2)
