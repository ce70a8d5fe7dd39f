"""Pictures of samples without torchvision: image grids and 2-D scatter plots, as PNG files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor


def image_grid(images: Tensor, nrow: int | None = None, padding: int = 1) -> np.ndarray:
    """Tile images (N, C, H, W) with values in [-1, 1] into one uint8 array (H', W', C) or (H', W')."""
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol = math.ceil(n / nrow)
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    grid = torch.zeros(c, ncol * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        row, col = divmod(i, nrow)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = pixels[i]
    array = grid.permute(1, 2, 0).numpy()  # (H', W', C)
    return array[..., 0] if c == 1 else array


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Save an image grid as PNG; ``scale`` enlarges small images (8x8 digits) with nearest neighbours."""
    array = image_grid(images, nrow)
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path


def save_scatter(samples: Tensor, path: str | Path, reference: Tensor | None = None, title: str = "") -> Path:
    """Scatter plot of 2-D samples (N, 2), over ``reference`` data when given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4), dpi=100)
    if reference is not None:
        ref = reference.detach().cpu().numpy()
        ax.scatter(ref[:, 0], ref[:, 1], s=2, alpha=0.3, color="grey", label="data")
    pts = samples.detach().cpu().numpy()
    ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.6, color="tab:blue", label="samples")
    ax.set_aspect("equal")
    ax.set_title(title)
    ax.legend(loc="upper right", markerscale=4)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def save_samples(samples: Tensor, path: str | Path, title: str = "") -> Path | None:
    """A PNG of samples for image data (grid) or 2-D data (scatter); None for other shapes."""
    if samples.ndim == 4:
        scale = max(1, 128 // samples.shape[-1])
        return save_image_grid(samples, path, scale=min(scale, 8))
    if samples.ndim == 2 and samples.shape[1] == 2:
        return save_scatter(samples, path, title=title)
    return None


def _figure(ncols: int, width: float = 4.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.4), dpi=100)
    return plt, fig, axes


def save_profile_plot(profile: dict, path: str | Path, title: str = "") -> Path:
    """Two panels: L_t in bits/dim against t (log axes), and Ho et al.'s rate-distortion curve."""
    from diffusion_elbo.lightning.metrics import rate_distortion

    rd = rate_distortion(
        profile["t"],
        profile["t_weights"],
        term_bpd=profile["term_bpd"],
        x0_mse=profile["x0_mse"],
        prior_bpd=profile["prior_bpd"],
    )
    plt, fig, (ax1, ax2) = _figure(2)
    t = profile["t"].cpu().numpy()
    ax1.loglog(t, profile["term_bpd"].cpu().numpy().clip(min=1e-12), marker="o", ms=3)
    ax1.set_xlabel("t")
    ax1.set_ylabel("L_t (bits/dim)")
    ax1.set_title("per-timestep -ELBO terms" + (f" ({title})" if title else ""))
    ax2.plot(rd["rate_bpd"].cpu().numpy(), rd["distortion_rmse"].cpu().numpy(), marker="o", ms=3)
    ax2.set_xlabel("rate: bits/dim to send x_T..x_t")
    ax2.set_ylabel("distortion: RMSE of x0_hat (0..255)")
    ax2.set_title("rate vs distortion")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


# a multivariate schedule with more dimensions than this is drawn as its spread over them, not one line each: a CIFAR
# schedule's 3072 lines took seconds per panel and showed a solid band
MAX_DIMENSION_LINES = 64


def plot_curves(ax, x, y, *, log: bool = False) -> None:
    """Curves y (N,) or (N, D) against x (N,) on ``ax`` (``log``: a log y axis): one line, one thin line per
    dimension up to :data:`MAX_DIMENSION_LINES` dimensions, and beyond that their median with the 10-90% and
    min-max bands over the dimensions at each x."""
    y = np.asarray(y)
    if log:
        ax.set_yscale("log")
    if y.ndim == 1 or y.shape[1] <= MAX_DIMENSION_LINES:
        ax.plot(x, y, **({"linewidth": 0.5, "alpha": 0.5} if y.ndim > 1 else {}))
        return
    low, p10, median, p90, high = np.quantile(y, [0.0, 0.1, 0.5, 0.9, 1.0], axis=1)
    ax.fill_between(x, low, high, alpha=0.2, linewidth=0, label=f"min-max of {y.shape[1]} dims")
    ax.fill_between(x, p10, p90, alpha=0.4, linewidth=0, label="10-90%")
    ax.plot(x, median, label="median")
    ax.legend(fontsize="x-small")


def save_schedule_plot(schedule, path: str | Path) -> Path:
    """alpha_bar(t), log SNR(t) and beta_t of a schedule (a multivariate schedule's: a line per dimension, or their
    spread, :func:`plot_curves`)."""
    plt, fig, (ax1, ax2, ax3) = _figure(3, width=3.4)
    t = np.arange(1, schedule.T + 1)

    def curves(table):  # (T,) or (T, *D) -> (T,) or (T, D)
        return table.flatten(1).cpu().numpy() if table.ndim > 1 else table.cpu().numpy()

    plot_curves(ax1, t, curves(schedule.alpha_bar[1:]))
    ax1.set_title("alpha_bar(t)")
    plot_curves(ax2, t, curves(schedule.log_snr()))
    ax2.set_title("log SNR(t)")
    plot_curves(ax3, t, curves(schedule.betas[1:]), log=True)
    ax3.set_title("beta_t")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("t")
    fig.suptitle(f"schedule: {schedule.name}, T = {schedule.T}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def save_logsnr_plot(t, gamma, *, slope, path: str | Path, title: str) -> Path:
    """gamma(t) = -log SNR(t) and gamma'(t) of a continuous-time schedule, from arrays over a grid of t in [0, 1]:
    (N,), or (N, D) for a multivariate schedule (a line per dimension, or their spread: :func:`plot_curves`)."""
    plt, fig, (ax1, ax2) = _figure(2, width=3.4)
    plot_curves(ax1, t, gamma)
    ax1.set_title("gamma(t) = -log SNR(t)")
    plot_curves(ax2, t, slope, log=True)
    ax2.set_title("gamma'(t)")
    for ax in (ax1, ax2):
        ax.set_xlabel("t")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path


def log_image(trainer, key: str, path: Path) -> None:
    """Log a PNG to every logger that takes images (W&B, TensorBoard)."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            logger.log_image(key=key, images=[str(path)], step=trainer.global_step)
        elif isinstance(logger, TensorBoardLogger):
            array = np.asarray(Image.open(path).convert("RGB"))
            logger.experiment.add_image(key, array, trainer.global_step, dataformats="HWC")
