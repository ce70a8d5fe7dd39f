"""The DDPM UNet of Ho et al. 2020 (Appendix B), following their TF code ``diffusion_tf/models/unet.py``.

The network maps (x_t, t) to a tensor of the image's spatial size; what the output means (eps, x0 or v,
and optionally a variance) is decided by the parametrization, not here. With the CIFAR-10 settings
(model_channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attention_resolutions=[16]) it has
35.7M parameters, the number Ho et al. report.

Shapes: x_t (B, C, H, W) with H = W = image_size; t a LongTensor (B,) of timesteps in 1..T.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_elbo.models.embeddings import sinusoidal_embedding


def _zero_(module: nn.Module) -> nn.Module:
    """Zero a layer's weights and bias in place (Ho et al.'s ``init_scale=0.``); returns the layer."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """Residual block with timestep injection (Ho et al. 2020 code, ``resnet_block``).

    h = conv1(SiLU(GN(x))) + Linear(SiLU(emb)); h = conv2(dropout(SiLU(GN(h)))); out = skip(x) + h.
    conv2 starts at zero so the block starts as the identity (or as the 1x1 shortcut when C changes).
    x: (B, in_channels, H, W), emb: (B, emb_dim) -> (B, out_channels, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, *, emb_dim: int, dropout: float, num_groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_channels)
        self.norm2 = nn.GroupNorm(num_groups, out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero_(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # Ho et al. use a 1x1 "nin" shortcut (not a 3x3 conv) when the channel count changes.
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, C_out) -> (B, C_out, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W positions (Ho et al. 2020 code, ``attn_block``; multi-head as in
    improved-diffusion when num_heads > 1). The output projection starts at zero, so the block starts as
    the identity. x: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_heads: int, num_groups: int):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.GroupNorm(num_groups, channels)
        # One 1x1 conv for q, k, v: the same 3 C (C + 1) parameters as Ho et al.'s three separate nin layers.
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero_(nn.Conv2d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        b, c, height, width = x.shape
        qkv = self.qkv(self.norm(x))  # (B, 3C, H, W)
        qkv = qkv.reshape(b, 3, self.num_heads, c // self.num_heads, height * width)  # (B, 3, nh, C/nh, HW)
        q, k, v = qkv.transpose(-1, -2).unbind(dim=1)  # each (B, nh, HW, C/nh)
        h = F.scaled_dot_product_attention(q, k, v)  # (B, nh, HW, C/nh), softmax(q k^T / sqrt(C/nh)) v
        h = h.transpose(-1, -2).reshape(b, c, height, width)  # (B, nh, C/nh, HW) -> (B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    """Halve H and W with a 3x3 stride-2 conv (Ho et al.'s ``downsample`` with ``with_conv=True``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repeat then a 3x3 conv (Ho et al.'s ``upsample``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(x)


class _ResAttn(nn.Module):
    """A ResBlock followed, at the chosen resolutions, by an AttentionBlock."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.res(x, emb)
        return h if self.attn is None else self.attn(h)


class UNet(nn.Module):
    """DDPM UNet (Ho et al. 2020, Appendix B; architecture of their TF code, as in improved-diffusion).

    Levels i = 0..L-1 run at resolution image_size / 2^i with model_channels * channel_mult[i] channels.
    Down path: conv_in, then per level ``num_res_blocks`` ResBlocks (+ attention where the resolution is in
    ``attention_resolutions``) and a strided-conv Downsample except at the last level; every output is kept
    as a skip. Middle: ResBlock, attention, ResBlock. Up path: per level ``num_res_blocks + 1`` ResBlocks,
    each taking the concatenation with one skip (+ attention), and an Upsample except at level 0. Output:
    GroupNorm, SiLU, 3x3 conv initialised at zero, so the network outputs exactly 0 at init.

    Args:
        in_channels: C of x_t.
        image_size: H = W of x_t; must be a multiple of 2^(L-1).
        model_channels: base channel count (Ho et al.'s ``ch``); the time embedding has 4x this width.
        out_channels: channels of the output; None means in_channels (use 2 * in_channels to also
            predict a variance, as in Nichol & Dhariwal 2021).
        channel_mult: channel multiplier per level; its length L sets the number of resolutions.
        num_res_blocks: ResBlocks per level on the down path (one more on the up path).
        attention_resolutions: resolutions in pixels (e.g. [16]) where self-attention follows each ResBlock.
        dropout: dropout rate inside the ResBlocks (0.1 for Ho et al.'s CIFAR-10 model).
        num_heads: attention heads; must divide the channel count at each attention resolution.
        num_groups: GroupNorm groups; must divide every channel count.
        fourier_features: exponents n of extra input channels sin(2 pi 2^n x_t), cos(2 pi 2^n x_t) per channel
            (Kingma et al. 2021, App. C): a period of 2^-n resolves where x_t sits between the K data levels, which
            the likelihood needs at low noise. For K levels in [-1, 1] the spacing is 2 / (K - 1): [3, 4] for 17
            levels, VDM's [7, 8] for 256. Empty: none.
        augment_dim: labels of a training augmentation (``augment=geometric``), added to the time embedding through
            a linear map without bias; 0 (none) unless an augmentation is configured, which sets it.

    forward(x_t (B, in_channels, H, W), t (B,)) -> (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        *,
        model_channels: int,
        channel_mult: Sequence[int],
        num_res_blocks: int,
        attention_resolutions: Sequence[int],
        out_channels: int | None = None,
        dropout: float = 0.0,
        num_heads: int = 1,
        num_groups: int = 32,
        fourier_features: Sequence[int] = (),
        augment_dim: int = 0,
    ):
        super().__init__()
        channel_mult = list(channel_mult)
        attention_resolutions = list(attention_resolutions)
        _validate(image_size, model_channels, channel_mult, num_res_blocks, attention_resolutions)
        _validate_groups_and_heads(
            image_size, model_channels, channel_mult, attention_resolutions, num_heads, num_groups
        )
        self.in_channels = in_channels
        self.image_size = image_size
        self.model_channels = model_channels
        self.out_channels = in_channels if out_channels is None else out_channels

        emb_dim = 4 * model_channels
        # Ho et al.: dense0 -> SiLU -> dense1, no activation at the end; each ResBlock applies SiLU first.
        self.time_mlp = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # augmentation labels (augment=...: zero for the identity) enter the embedding through a map without bias,
        # as EDM's augment_dim does: labels of zero, or none, leave the network that of the plain data
        self.augment_dim = int(augment_dim)
        self.augment_embed = nn.Linear(self.augment_dim, emb_dim, bias=False) if self.augment_dim else None

        def res_attn(c_in: int, c_out: int, resolution: int) -> _ResAttn:
            attn = AttentionBlock(c_out, num_heads, num_groups) if resolution in attention_resolutions else None
            return _ResAttn(ResBlock(c_in, c_out, emb_dim=emb_dim, dropout=dropout, num_groups=num_groups), attn)

        exponents = torch.tensor([float(n) for n in fourier_features], dtype=torch.float32)
        self.register_buffer("fourier_freqs", 2 * torch.pi * 2.0**exponents, persistent=False)  # (F,)
        self.conv_in = nn.Conv2d(in_channels * (1 + 2 * len(exponents)), model_channels, 3, padding=1)
        self.down_blocks = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        skip_channels = [model_channels]  # channels of each kept skip, in the order they are pushed
        ch, resolution = model_channels, image_size
        for level, mult in enumerate(channel_mult):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_attn(ch, model_channels * mult, resolution))
                ch = model_channels * mult
                skip_channels.append(ch)
            self.down_blocks.append(blocks)
            if level != len(channel_mult) - 1:
                self.downsamples.append(Downsample(ch))
                skip_channels.append(ch)
                resolution //= 2

        self.mid_res1 = ResBlock(ch, ch, emb_dim=emb_dim, dropout=dropout, num_groups=num_groups)
        self.mid_attn = AttentionBlock(ch, num_heads, num_groups)
        self.mid_res2 = ResBlock(ch, ch, emb_dim=emb_dim, dropout=dropout, num_groups=num_groups)

        self.up_blocks = nn.ModuleList()
        self.upsamples = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            blocks = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                blocks.append(res_attn(ch + skip_channels.pop(), model_channels * mult, resolution))
                ch = model_channels * mult
            self.up_blocks.append(blocks)
            if level != 0:
                self.upsamples.append(Upsample(ch))
                resolution *= 2
        assert not skip_channels, "every skip is consumed once by construction"

        self.norm_out = nn.GroupNorm(num_groups, ch)
        self.conv_out = _zero_(nn.Conv2d(ch, self.out_channels, 3, padding=1))

    def forward(self, x_t: Tensor, t: Tensor, augment_labels: Tensor | None = None) -> Tensor:
        """Network output for x_t (B, C, H, W) at timesteps t (B,), given how the training image was augmented
        (``augment_labels`` (B, augment_dim); None: not augmented, the identity); returns (B, out_channels, H, W)."""
        self._check_input(x_t, t)
        emb = sinusoidal_embedding(t, self.model_channels).to(self.conv_in.weight.dtype)  # (B, ch)
        emb = self.time_mlp(emb)  # (B, 4 ch)
        if augment_labels is not None:
            if self.augment_embed is None or augment_labels.shape != (x_t.shape[0], self.augment_dim):
                raise ValueError(
                    f"augment_labels of shape {tuple(augment_labels.shape)} for a UNet built with augment_dim="
                    f"{self.augment_dim}: build it with the augmentation's dim (builders.build_model does this)"
                )
            emb = emb + self.augment_embed(augment_labels.to(emb.dtype))  # (B, 4 ch)

        h = self.conv_in(self._with_fourier_features(x_t))
        skips = [h]
        for level, blocks in enumerate(self.down_blocks):
            for block in blocks:
                h = block(h, emb)
                skips.append(h)
            if level < len(self.downsamples):
                h = self.downsamples[level](h)
                skips.append(h)

        h = self.mid_res2(self.mid_attn(self.mid_res1(h, emb)), emb)

        for level, blocks in enumerate(self.up_blocks):
            for block in blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)  # concat along channels
            if level < len(self.upsamples):
                h = self.upsamples[level](h)

        return self.conv_out(F.silu(self.norm_out(h)))

    def _with_fourier_features(self, x_t: Tensor) -> Tensor:
        """x_t (B, C, H, W) -> (B, C (1 + 2F), H, W): x_t, then sin and cos of every frequency for each channel."""
        if self.fourier_freqs.numel() == 0:
            return x_t
        b, _, height, width = x_t.shape
        angles = x_t[:, :, None] * self.fourier_freqs.to(x_t.dtype)[None, None, :, None, None]  # (B, C, F, H, W)
        features = torch.cat([angles.sin(), angles.cos()], dim=2).reshape(b, -1, height, width)  # (B, 2 C F, H, W)
        return torch.cat([x_t, features], dim=1)

    def _check_input(self, x_t: Tensor, t: Tensor) -> None:
        if x_t.dim() != 4 or x_t.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects x_t of shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                f"got {tuple(x_t.shape)}; set model.in_channels to the data's channel count"
            )
        if x_t.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"UNet was built for image_size={self.image_size} but got images of size "
                f"{x_t.shape[-2]}x{x_t.shape[-1]}; build it with image_size equal to data.image_size "
                "(attention_resolutions are in pixels, so the size must match)"
            )
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")


def _validate(
    image_size: int,
    model_channels: int,
    channel_mult: list[int],
    num_res_blocks: int,
    attention_resolutions: list[int],
) -> None:
    """Reject UNet shapes that would fail (or silently do something else) deep inside forward."""
    if not channel_mult:
        raise ValueError("model.channel_mult must list at least one level, e.g. [1, 2, 2]")
    if num_res_blocks < 1:
        raise ValueError(f"model.num_res_blocks must be >= 1, got {num_res_blocks}")
    halvings = len(channel_mult) - 1
    factor = 2**halvings
    if image_size <= 0 or image_size % factor != 0:
        raise ValueError(
            f"data.image_size={image_size} does not fit model.channel_mult={channel_mult}: the UNet halves "
            f"the resolution {halvings} times, so image_size must be a multiple of {factor}"
        )
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    unreached = [r for r in attention_resolutions if r not in resolutions]
    if unreached:
        raise ValueError(
            f"model.attention_resolutions={attention_resolutions} lists {unreached}, which a UNet with "
            f"image_size={image_size} and channel_mult={channel_mult} never reaches; it runs at {resolutions}"
        )


def _validate_groups_and_heads(
    image_size: int,
    model_channels: int,
    channel_mult: list[int],
    attention_resolutions: list[int],
    num_heads: int,
    num_groups: int,
) -> None:
    """GroupNorm and multi-head attention split channels evenly; check they can before building."""
    channels = sorted({model_channels, *(model_channels * m for m in channel_mult)})
    bad = [c for c in channels if c % num_groups != 0]
    if bad:
        raise ValueError(
            f"model.num_groups={num_groups} must divide every channel count {channels} "
            f"(model_channels={model_channels} times channel_mult={channel_mult}), but not {bad}; "
            "pick num_groups dividing model_channels"
        )
    resolutions = [image_size // 2**i for i in range(len(channel_mult))]
    level_channels = [model_channels * m for m in channel_mult]
    # the middle block always has attention, at the last level's channel count
    attn_channels = [level_channels[-1]] + [
        c for c, r in zip(level_channels, resolutions, strict=True) if r in attention_resolutions
    ]
    if any(c % num_heads != 0 for c in attn_channels):
        raise ValueError(
            f"model.num_heads={num_heads} must divide the channel count at every attention block "
            f"({sorted(set(attn_channels))})"
        )
