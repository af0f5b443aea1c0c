"""SIREN: sine-activated MLP (Sitzmann et al. 2020, "Implicit Neural Representations with
Periodic Activation Functions"), with the paper's initialisation."""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn


class SineLayer(nn.Module):
    """sin(ω0 · (W x + b)); the first layer is initialised differently from the others."""

    def __init__(self, in_features: int, out_features: int, omega0: float, is_first: bool) -> None:
        super().__init__()
        self.omega0, self.is_first = omega0, is_first
        self.linear = nn.Linear(in_features, out_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # SIREN Sec. 3.2: first layer U(-1/n, 1/n); later layers U(-√(6/n)/ω0, √(6/n)/ω0).
        n = self.linear.in_features
        bound = 1 / n if self.is_first else math.sqrt(6 / n) / self.omega0
        with torch.no_grad():
            self.linear.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(self.omega0 * self.linear(x))


class Siren(nn.Module):
    """SIREN with widths [n_0, hidden…, n_out]; ω0 applies to every sine layer (default 30).

    The last layer is linear, initialised like the hidden layers (as the reference code).
    """

    def __init__(self, widths: Sequence[int], omega0: float = 30.0) -> None:
        super().__init__()
        widths = [int(w) for w in widths]
        self.hidden = nn.Sequential(
            *(SineLayer(a, b, omega0, is_first=(i == 0)) for i, (a, b) in enumerate(zip(widths[:-2], widths[1:-1])))
        )
        self.out = nn.Linear(widths[-2], widths[-1])
        bound = math.sqrt(6 / widths[-2]) / omega0
        with torch.no_grad():
            self.out.weight.uniform_(-bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.hidden(x))
