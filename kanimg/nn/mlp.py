"""ReLU MLPs, plain and with random Fourier features (Tancik et al. 2020, "Fourier Features
Let Networks Learn High Frequency Functions in Low Dimensional Domains")."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


def relu_mlp(widths: Sequence[int]) -> nn.Sequential:
    """Linear-ReLU stack ending in a linear layer."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MLP(nn.Module):
    """ReLU MLP on raw coordinates, widths [n_0, hidden…, n_out]."""

    def __init__(self, widths: Sequence[int]) -> None:
        super().__init__()
        self.net = relu_mlp([int(w) for w in widths])

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class FourierFeatureMLP(nn.Module):
    """ReLU MLP on Gaussian random Fourier features γ(v) = [sin 2πBv, cos 2πBv], B ~ N(0, s²).

    Args:
        widths: [n_0, hidden…, n_out]; n_0 is the coordinate dimension, the first linear layer
            takes the 2·num_features Fourier features instead.
        scale: s, the standard deviation of the frequencies.
        num_features: rows of B.
    """

    def __init__(self, widths: Sequence[int], scale: float = 10.0, num_features: int = 256) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.register_buffer("frequencies", torch.randn(num_features, widths[0]) * scale)  # B (m, n_0)
        self.net = relu_mlp([2 * num_features, *widths[1:]])

    def forward(self, x: Tensor) -> Tensor:
        proj = 2 * math.pi * x @ self.frequencies.t()  # (N, m)
        return self.net(torch.cat([torch.sin(proj), torch.cos(proj)], dim=-1))
