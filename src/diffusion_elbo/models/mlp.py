"""A residual MLP denoiser for vector data (2-D toy sets and the like).

Same role as the UNet: (x_t, t) -> a tensor whose meaning (eps, x0 or v) the parametrization decides.
Shapes: x_t (B, dim); t a LongTensor (B,) of timesteps in 1..T.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from diffusion_elbo.models.embeddings import sinusoidal_embedding


class _MLPBlock(nn.Module):
    """Pre-norm residual block: h + Linear(dropout(SiLU(Linear(LN(h)) + Linear(emb)))).

    The time embedding is added inside every block, as the UNet's ResBlocks do, so that deep stacks do
    not have to carry t through the residual stream. h: (B, hidden), emb: (B, hidden) -> (B, hidden).
    """

    def __init__(self, hidden_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_dim)
        self.fc1 = nn.Linear(hidden_dim, hidden_dim)
        self.emb_proj = nn.Linear(hidden_dim, hidden_dim)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, hidden_dim)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.fc1(self.norm(h)) + self.emb_proj(F.silu(emb))
        return h + self.fc2(self.dropout(F.silu(z)))


class MLPDenoiser(nn.Module):
    """Residual MLP with a sinusoidal time embedding (Vaswani et al. 2017; Ho et al. 2020 §4) in every block.

    Args:
        dim: dimension of x_t.
        hidden_dim: width of the residual stream.
        num_layers: number of residual blocks.
        time_embed_dim: width of the sinusoidal embedding of t, before its 2-layer MLP to hidden_dim.
        out_dim: output dimension; None means dim (use 2 * dim to also predict a variance).
        dropout: dropout rate inside the blocks.

    The output layer starts at zero, so the network outputs exactly 0 at init (as the UNet does).
    forward(x_t (B, dim), t (B,)) -> (B, out_dim).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int = 256,
        *,
        num_layers: int = 4,
        time_embed_dim: int = 128,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.dim = dim
        self.time_embed_dim = time_embed_dim
        self.out_dim = dim if out_dim is None else out_dim
        self.time_mlp = nn.Sequential(
            nn.Linear(time_embed_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim)
        )
        self.input = nn.Linear(dim, hidden_dim)
        self.blocks = nn.ModuleList(_MLPBlock(hidden_dim, dropout) for _ in range(num_layers))
        self.norm_out = nn.LayerNorm(hidden_dim)
        self.output = nn.Linear(hidden_dim, self.out_dim)
        nn.init.zeros_(self.output.weight)
        nn.init.zeros_(self.output.bias)

    def forward(self, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output for x_t (B, dim) at timesteps t (B,); returns (B, out_dim)."""
        if x_t.dim() != 2 or x_t.shape[1] != self.dim:
            raise ValueError(
                f"MLPDenoiser expects x_t of shape (B, {self.dim}), got {tuple(x_t.shape)}; "
                "set model.dim to the data's dimension"
            )
        if t.shape != (x_t.shape[0],):
            raise ValueError(f"t must have shape (B,) = ({x_t.shape[0]},), got {tuple(t.shape)}")
        emb = sinusoidal_embedding(t, self.time_embed_dim).to(self.input.weight.dtype)  # (B, time_embed_dim)
        emb = self.time_mlp(emb)  # (B, hidden)
        h = self.input(x_t)  # (B, hidden)
        for block in self.blocks:
            h = block(h, emb)
        return self.output(F.silu(self.norm_out(h)))
