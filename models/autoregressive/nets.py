"""Fully visible autoregressive density models of binary vectors x in {0,1}^D.

Each net maps x to logits l with p(x_i = 1 | x_<i) = sigmoid(l_i), so that
log p(x) = sum_i [x_i log sigmoid(l_i) + (1 - x_i) log sigmoid(-l_i)] exactly. Order is
the natural pixel order (raster scan).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def bernoulli_nll(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p(x) in nats per example, summed over dimensions."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(-1)


class ARNet(nn.Module):
    dims: int

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """Ancestral sampling, one dimension at a time (D forward passes)."""
        device = next(self.parameters()).device
        x = torch.zeros(n, self.dims, device=device)
        for i in range(self.dims):
            p = torch.sigmoid(self(x)[:, i])
            u = torch.rand(n, generator=generator, device=generator.device).to(device)
            x[:, i] = (u < p).float()
        return x


class Factorized(ARNet):
    """Baseline: independent Bernoulli pixels, p(x) = prod_i sigmoid(b_i)^x_i ..."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        self.bias = nn.Parameter(torch.zeros(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(x.shape[0], -1)


class FVSBN(ARNet):
    """Fully visible sigmoid belief net: l_i = b_i + sum_{j<i} W_ij x_j (logistic chain)."""

    def __init__(self, dims: int):
        super().__init__()
        self.dims = dims
        self.weight = nn.Parameter(torch.zeros(dims, dims))
        self.bias = nn.Parameter(torch.zeros(dims))
        self.register_buffer("mask", torch.tril(torch.ones(dims, dims), diagonal=-1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class NADE(ARNet):
    """NADE (Larochelle & Murray 2011) with weights shared across conditionals.

    a_i = c + W[:, <i] x_<i,  h_i = sigmoid(a_i),  l_i = b_i + V_i . h_i.
    All a_i at once: an exclusive cumulative sum of the columns W[:, j] x_j.
    """

    def __init__(self, dims: int, hidden: int):
        super().__init__()
        self.dims = dims
        self.W = nn.Parameter(torch.randn(hidden, dims) * 0.01)
        self.c = nn.Parameter(torch.zeros(hidden))
        self.V = nn.Parameter(torch.randn(dims, hidden) * 0.01)
        self.b = nn.Parameter(torch.zeros(dims))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contrib = x.unsqueeze(-1) * self.W.t()  # (B, D, H): W[:, j] x_j
        a = self.c + torch.cumsum(contrib, dim=1) - contrib  # sum over j < i
        h = torch.sigmoid(a)
        return (h * self.V).sum(-1) + self.b


class MaskedLinear(nn.Linear):
    def __init__(self, fan_in: int, fan_out: int, mask: torch.Tensor):
        super().__init__(fan_in, fan_out)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(ARNet):
    """MADE (Germain et al. 2015): an MLP whose masks enforce the autoregressive property.

    Inputs get degrees m(d) = d in 1..D; each hidden unit a degree in 1..D-1 (drawn once
    from `mask_seed`); a unit sees units of lower-or-equal degree, an output d sees hidden
    units of degree < d. With `direct`, a strictly lower-triangular input->output linear
    term is added (the FVSBN inside MADE).
    """

    def __init__(self, dims: int, hidden: list[int], mask_seed: int = 0, direct: bool = False):
        super().__init__()
        self.dims = dims
        g = torch.Generator().manual_seed(mask_seed)
        degrees = [torch.arange(1, dims + 1)]
        for h in hidden:
            low = int(degrees[-1].min()) if len(degrees) > 1 else 1
            degrees.append(torch.randint(low, dims, (h,), generator=g))
        layers: list[nn.Module] = []
        for d_in, d_out in zip(degrees[:-1], degrees[1:]):
            layers += [MaskedLinear(len(d_in), len(d_out), (d_out[:, None] >= d_in[None, :]).float()), nn.ReLU()]
        out_mask = (degrees[0][:, None] > degrees[-1][None, :]).float()
        layers.append(MaskedLinear(len(degrees[-1]), dims, out_mask))
        self.net = nn.Sequential(*layers)
        self.direct = FVSBN(dims) if direct else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net(x)
        return logits + self.direct(x) if self.direct is not None else logits
