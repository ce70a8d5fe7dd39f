"""Augmentation with conditioning (augment=geometric; EDM App. F.2): each transform against its plain torch form, the
labels zero exactly for the identity, pixel values kept on the grid, the network unchanged by zero labels, every row
of a training batch given its own labels (the VDM preset splits the batch between the bound and the v-MSE), and a
run that trains with it evaluated and sampled on the data itself."""

from __future__ import annotations

import math

import pytest
import torch

from diffusion_elbo.data.augment import GeometricAugmentation


def _digits_like(n: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 1, 8, 8) images on the 17-level grid of [-1, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 17, (n, 1, 8, 8), generator=g).float() / 8 - 1


def test_each_transform_is_the_plain_torch_one_and_its_labels_say_which():
    x = _digits_like(200)
    aug = GeometricAugmentation(p=0.5, xflip=True, rotate90=True, translate=2)
    assert aug.dim == 5
    y, labels = aug(x, generator=torch.Generator().manual_seed(1))
    assert labels.shape == (200, 5) and y.shape == x.shape
    for img, out, (flip, cos_m1, sin, dx, dy) in zip(x, y, labels.tolist(), strict=True):
        k = {(0, 0): 0, (-1, 1): 1, (-2, 0): 2, (-1, -1): 3}[(round(cos_m1), round(sin))]
        expected = torch.rot90(img.flip(-1) if flip else img, k, dims=(-2, -1))
        sx, sy = round(dx * 2), round(dy * 2)
        padded = torch.nn.functional.pad(expected[None], (2, 2, 2, 2), mode="reflect")[0]
        expected = padded[:, 2 - sy : 2 - sy + 8, 2 - sx : 2 - sx + 8]  # out[i, j] = in[i - dy, j - dx]
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    identity = (labels == 0).all(dim=1)
    torch.testing.assert_close(y[identity], x[identity], rtol=0, atol=0)  # zero labels: the image itself
    # each transform with probability p = 0.5: none of three in 1/8 of the images (binomial sd 0.023 for 200)
    assert abs(identity.float().mean().item() - 0.125) < 4 * math.sqrt(0.125 * 0.875 / 200)
    assert set(torch.unique(y).tolist()) <= set(torch.unique(x).tolist())  # on the grid: no interpolation


def test_probability_zero_is_the_identity_and_bad_settings_are_refused():
    x = _digits_like(16)
    y, labels = GeometricAugmentation(p=0.0)(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y, x) and not labels.any()
    assert GeometricAugmentation(xflip=False, rotate90=False, translate=1).dim == 2
    for kwargs, message in [({"p": 1.5}, "p=1.5 must be a probability"),
                            ({"translate": -1}, "translate=-1 must be an integer >= 0"),
                            ({"xflip": False, "rotate90": False, "translate": 0}, "use augment=null")]:  # fmt: skip
        with pytest.raises(ValueError, match=message):
            GeometricAugmentation(**kwargs)
    with pytest.raises(ValueError, match="square images"):
        GeometricAugmentation()(torch.zeros(4, 2))


def test_the_unet_with_zero_labels_is_the_unet_without_and_other_labels_move_it():
    from diffusion_elbo.models import UNet

    torch.manual_seed(0)
    net = UNet(1, 8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[],
               num_groups=8, augment_dim=5)  # fmt: skip
    for param in net.parameters():  # the residual branches and the output layer start at zero
        torch.nn.init.normal_(param, std=0.1)
    x, t = _digits_like(4), torch.tensor([1, 10, 100, 999])
    plain = net(x, t)
    torch.testing.assert_close(net(x, t, augment_labels=torch.zeros(4, 5)), plain, rtol=0, atol=0)
    moved = net(x, t, augment_labels=torch.tensor([[1.0, 0, 0, 0, 0]] * 4))
    assert (moved - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="augment_dim=5"):
        net(x, t, augment_labels=torch.zeros(4, 3))


def test_every_row_of_an_augmented_batch_reaches_the_network_with_its_own_labels(tmp_path):
    """The VDM preset trains the bound on the first rows and the v-MSE on the last: the network sees each row's labels
    in both calls, in order, and they are the augmentation's own for the step's generator."""
    from diffusion_elbo.builders import build_module

    from .helpers import SMALL_UNET, compose_train

    cfg = compose_train(tmp_path, [*SMALL_UNET, "experiment=digits_vdm", "augment=geometric", "augment.p=0.5"])
    module, _ = build_module(cfg)
    assert module.net.augment_dim == 5
    x0 = _digits_like(32)
    state = module.generator.get_state()
    expected = module.augmentation(x0, generator=torch.Generator().set_state(state))
    module.generator.set_state(state)
    seen, forward = [], module.net.forward

    def spy(x, c, augment_labels=None):
        seen.append((x.shape[0], augment_labels))
        return forward(x, c, augment_labels=augment_labels)

    module.net.forward = spy
    module.training_step((x0, torch.zeros(32, dtype=torch.long)), 0)  # as the trainer calls it
    assert [n for n, _ in seen] == [16, 16]  # aux_fraction 0.5: the bound's rows, then the v-MSE's
    torch.testing.assert_close(torch.cat([labels for _, labels in seen]), expected.labels, rtol=0, atol=0)
    assert expected.labels.any()


@pytest.mark.slow
def test_a_run_trained_with_augmentation_is_evaluated_and_sampled_on_the_data_itself(tmp_path):
    """Train with augment=geometric, then eval and sample the checkpoint as a user would: the network is rebuilt with
    its augmentation input, and the bound and the samples are the identity's (no labels)."""
    from hydra import compose, initialize_config_dir

    from diffusion_elbo.checkpoints import load_for_eval
    from diffusion_elbo.evaluation.job import run_eval
    from diffusion_elbo.training import train

    from .helpers import CONF_DIR, SMALL_UNET, compose_train

    run = tmp_path / "run"
    cfg = compose_train(run, [*SMALL_UNET, "augment=geometric", "augment.p=0.5", "trainer.max_steps=4"])
    train(cfg, str(run))
    ckpt = run / "checkpoints" / "last.ckpt"
    loaded = load_for_eval(ckpt)
    assert loaded.module.net.augment_dim == 5 and loaded.module.augmentation is not None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        eval_cfg = compose("eval", overrides=[f"ckpt_path={ckpt}", "num_examples=4", "fid.num_samples=0",
                                              "wandb.enabled=false"])  # fmt: skip
    metrics = run_eval(eval_cfg, tmp_path / "eval")
    assert math.isfinite(metrics["bpd"]) and metrics["bpd"] > 0 and metrics["num_examples"] == 4
    samples = loaded.module.sample(6, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (6, 1, 8, 8) and bool(torch.isfinite(samples).all())


def test_flipping_the_data_and_augmenting_with_flips_is_warned_with_the_fix(caplog):
    """``data.random_flip`` with ``augment.xflip``: every image is already there both ways, so the flip label tells
    the network nothing; the warning names both settings. Either one alone is silent."""
    from types import SimpleNamespace

    from diffusion_elbo.data import DigitsDataModule
    from diffusion_elbo.training import warn_if_flipped_twice

    def warned(random_flip: bool, augmentation) -> bool:
        caplog.clear()
        with caplog.at_level("WARNING", logger="diffusion_elbo.training"):
            warn_if_flipped_twice(SimpleNamespace(augmentation=augmentation), DigitsDataModule(random_flip=random_flip))
        return any("data.random_flip=false" in r.message and "augment.xflip=false" in r.message for r in caplog.records)

    assert warned(True, GeometricAugmentation(xflip=True))
    assert not warned(False, GeometricAugmentation(xflip=True))
    assert not warned(True, GeometricAugmentation(xflip=False))
    assert not warned(True, None)
