"""Properties of the denoising networks (UNet, MLPDenoiser) and their Hydra presets."""

from __future__ import annotations

from pathlib import Path

import hydra.utils
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from diffusion_elbo.models import MLPDenoiser, UNet, sinusoidal_embedding

CONF_MODEL = Path(__file__).resolve().parents[1] / "conf" / "model"
T = 1000


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny_unet(in_channels: int = 1, out_channels: int | None = None, dropout: float = 0.0) -> UNet:
    return UNet(
        in_channels=in_channels,
        image_size=8,
        model_channels=16,
        out_channels=out_channels,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        dropout=dropout,
        num_heads=2,
        num_groups=4,
    )


def tiny_mlp(dim: int = 2, out_dim: int | None = None) -> MLPDenoiser:
    return MLPDenoiser(dim=dim, hidden_dim=32, num_layers=2, time_embed_dim=16, out_dim=out_dim)


def perturb_(model: nn.Module, generator: torch.Generator, scale: float = 0.1) -> nn.Module:
    """Move every weight away from its (partly zero) init, so outputs depend on all inputs."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return model


def image_batch(channels: int, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x_t = torch.randn(batch, channels, 8, 8, generator=generator)
    t = torch.randint(1, T + 1, (batch,), generator=generator)
    return x_t, t


def load_model_config(name: str, **data):
    """The model preset with its ${data.*} interpolations filled, as Hydra would compose it."""
    cfg = OmegaConf.merge({"data": data}, {"model": OmegaConf.load(CONF_MODEL / f"{name}.yaml")})
    return cfg.model


# --- sinusoidal embedding ---------------------------------------------------------------------------------


# dim >= 4: with dim=2 only frequency 1 is left and t=355 lands within 1e-4 of t=0 (355/113 ~ pi)
@pytest.mark.parametrize("dim", [4, 7, 64, 128])
def test_sinusoidal_embedding_is_distinct_per_timestep_and_bounded(dim):
    t = torch.arange(1, T + 1)
    emb = sinusoidal_embedding(t, dim)
    assert emb.shape == (T, dim)
    assert emb.abs().max() <= 1.0
    # distinct: the smallest pairwise distance between the embeddings of 1..T is clearly above zero
    assert torch.pdist(emb.double()).min() > 1e-3


def test_sinusoidal_embedding_of_odd_dim_pads_one_zero_column():
    t = torch.tensor([1, 5, 999])
    assert torch.equal(sinusoidal_embedding(t, 9)[:, :8], sinusoidal_embedding(t, 8))
    assert torch.equal(sinusoidal_embedding(t, 9)[:, 8], torch.zeros(3))


# --- shapes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("learn_variance", [False, True])
def test_unet_output_shape_matches_input_with_out_channels(in_channels, learn_variance):
    out_channels = 2 * in_channels if learn_variance else None
    x_t, t = image_batch(in_channels, 4, torch.Generator().manual_seed(0))
    out = tiny_unet(in_channels, out_channels)(x_t, t)
    assert out.shape == (4, 2 * in_channels if learn_variance else in_channels, 8, 8)


@pytest.mark.parametrize("out_dim", [None, 4])
def test_mlp_output_shape_matches_input_with_out_dim(out_dim):
    x_t = torch.randn(5, 2)
    out = tiny_mlp(2, out_dim)(x_t, torch.randint(1, T + 1, (5,)))
    assert out.shape == (5, out_dim or 2)


# --- parameter counts and validation ---------------------------------------------------------------------


def test_cifar10_config_has_ho_et_al_35_7m_parameters():
    with torch.device("meta"):  # no memory or init time for 35.7M weights
        model = UNet(
            in_channels=3,
            image_size=32,
            model_channels=128,
            channel_mult=(1, 2, 2, 2),
            num_res_blocks=2,
            attention_resolutions=[16],
            dropout=0.1,
        )
    assert abs(n_params(model) - 35.7e6) <= 0.2e6


def test_image_size_not_divisible_by_downsampling_raises_naming_valid_multiple():
    with pytest.raises(ValueError, match=r"image_size=30 .*halves the resolution 3 times.*multiple of 8"):
        UNet(
            3,
            30,
            model_channels=32,
            channel_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            attention_resolutions=[],
            num_groups=8,
        )


def test_num_groups_not_dividing_channels_raises():
    with pytest.raises(ValueError, match="num_groups=32 must divide"):
        UNet(1, 8, model_channels=48, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[], num_groups=32)


def test_unreachable_attention_resolution_raises():
    with pytest.raises(ValueError, match=r"attention_resolutions=\[16\].*never reaches"):
        UNet(1, 8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[16], num_groups=4)


def test_unet_rejects_input_of_another_image_size():
    with pytest.raises(ValueError, match="built for image_size=8"):
        tiny_unet()(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]))


# --- zero init and trainability --------------------------------------------------------------------------


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_output_is_exactly_zero_at_init_and_one_sgd_step_lowers_loss(make):
    model = make()
    gen = torch.Generator().manual_seed(1)
    x_t = torch.randn(8, 1, 8, 8, generator=gen) if isinstance(model, UNet) else torch.randn(8, 2, generator=gen)
    t = torch.randint(1, T + 1, (8,), generator=gen)
    target = torch.randn(x_t.shape, generator=gen)
    assert torch.equal(model(x_t, t), torch.zeros_like(x_t))

    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    loss_before = (model(x_t, t) - target).pow(2).mean()
    loss_before.backward()
    opt.step()
    with torch.no_grad():
        loss_after = (model(x_t, t) - target).pow(2).mean()
    assert loss_after < loss_before


# --- conditioning on t and independence across the batch -------------------------------------------------


@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_output_depends_on_timestep(make):
    gen = torch.Generator().manual_seed(2)
    model = perturb_(make(), gen).eval()
    x = torch.randn(1, 1, 8, 8, generator=gen) if isinstance(model, UNet) else torch.randn(1, 2, generator=gen)
    out_early = model(x, torch.tensor([1]))
    out_late = model(x, torch.tensor([T]))
    assert (out_early - out_late).abs().max() > 1e-3


@pytest.mark.parametrize("train_mode", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("make", [tiny_unet, tiny_mlp], ids=["unet", "mlp"])
def test_output_for_one_example_does_not_depend_on_rest_of_batch(make, train_mode):
    gen = torch.Generator().manual_seed(3)
    # train mode too (the tiny nets have dropout 0): batch statistics such as BatchNorm's would show there
    model = perturb_(make().double(), gen).train(train_mode)
    shape = (6, 1, 8, 8) if isinstance(model, UNet) else (6, 2)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = torch.randint(1, T + 1, (6,), generator=gen)
    full = model(x, t)
    # a different batch around example 0: changing the others must leave its output unchanged
    other = torch.cat([x[:1], torch.randn(x[1:].shape, generator=gen, dtype=torch.float64)])
    assert torch.allclose(model(other, t)[0], full[0], atol=1e-12, rtol=0)
    assert torch.allclose(model(x[:1], t[:1])[0], full[0], atol=1e-12, rtol=0)


# --- Hydra presets ---------------------------------------------------------------------------------------


def test_digits_preset_builds_with_between_half_and_two_million_parameters():
    cfg = load_model_config("unet", channels=1, image_size=8)
    model = hydra.utils.instantiate(cfg)
    assert isinstance(model, UNet)
    assert 0.5e6 <= n_params(model) <= 2e6
    x_t, t = image_batch(1, 2, torch.Generator().manual_seed(4))
    assert model(x_t, t).shape == x_t.shape


def test_mnist_preset_builds_for_28x28_one_channel():
    cfg = load_model_config("unet_mnist", channels=1, image_size=28)
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg)
    assert isinstance(model, UNet) and model.image_size == 28 and model.in_channels == 1


def test_cifar10_preset_has_ho_et_al_35_7m_parameters():
    cfg = load_model_config("unet_cifar10", channels=3, image_size=32)
    with torch.device("meta"):
        model = hydra.utils.instantiate(cfg)
    assert abs(n_params(model) - 35.7e6) <= 0.2e6


def test_mlp_preset_builds_for_2d_data():
    model = hydra.utils.instantiate(load_model_config("mlp", dim=2))
    assert isinstance(model, MLPDenoiser)
    assert model(torch.randn(3, 2), torch.tensor([1, 10, 100])).shape == (3, 2)
