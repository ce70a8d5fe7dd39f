"""A small CNN classifier whose penultimate layer gives FID features for small image datasets."""

from __future__ import annotations

from torch import Tensor, nn


class FeatureClassifier(nn.Module):
    """conv(32) -> conv(64) -> pool -> conv(128) -> global average -> 128-d features -> logits.

    Works for any image size >= 4 (8x8 digits, 28x28 MNIST, 32x32 CIFAR-10). Input images in [-1, 1].
    """

    num_features = 128

    def __init__(self, in_channels: int, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.in_channels, self.num_classes = in_channels, num_classes
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),  # (B, 128)
            nn.Linear(128, self.num_features),
            nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.num_features, num_classes))

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations, (B, 128)."""
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))
