"""Which numbers a network is stored as, per model family, and how they go back in.

KAN: per layer the base weights w_b (O, I) and the spline coefficients with the spline
scale folded in, c' = w_s ⊙ c (O, I, G+3): the scale is redundant with c, so folding it
drops O·I numbers and nothing of the function. c' is smooth along its last (grid) axis,
the structure ``bitstream`` exploits by coding differences along it.
SIREN: every linear layer's weight and bias.
Latent grids (``latent``): the synthesis's weight and bias per layer, and for an order-1 KAN
synthesis each edge's values at its knots between them, smooth along the knots (the grids
themselves are coded apart, by ``latent_codec``).

Slots are derived from the spec alone, so a decoder knows every tensor's shape before it
has built (or allocated) anything.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from ..errors import KanimgError
from .quantize import QuantConfig, fake_quantize

FAMILIES = ("kan", "siren", "latent")


@dataclass(frozen=True)
class Slot:
    """A stored tensor: the model parameter it fills, its shape, and whether it is smooth
    along its last axis (KAN spline coefficients)."""

    name: str
    shape: tuple[int, ...]
    smooth: bool = False

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))


def slots(spec: dict) -> list[Slot]:
    """The stored tensors of the model ``spec`` describes, in file order."""
    widths = spec["widths"]
    pairs = list(zip(widths[:-1], widths[1:]))
    if spec["name"] == "kan":
        if spec.get("directions") or spec.get("levels"):
            raise KanimgError("only a KAN on x and y can be stored in a .kimg file yet (not one on ridge directions or a hash encoding)")
        out = []
        for layer, ((i, o), g) in enumerate(zip(pairs, spec["grids"])):
            out.append(Slot(f"layers.{layer}.base_weight", (o, i)))
            out.append(Slot(f"layers.{layer}.spline_weight", (o, i, g + 3), smooth=True))
        return out
    if spec["name"] == "siren":
        out = []
        for layer, (i, o) in enumerate(pairs[:-1]):
            out += [Slot(f"hidden.{layer}.linear.weight", (o, i)), Slot(f"hidden.{layer}.linear.bias", (o,))]
        i, o = pairs[-1]
        return out + [Slot("out.weight", (o, i)), Slot("out.bias", (o,))]
    if spec["name"] == "latent" and spec.get("synthesis") == "kan":  # nn.Sequential of latent.HatKANLayer
        return [slot for layer, ((i, o), g) in enumerate(zip(pairs, spec["grids"]))
                for slot in (Slot(f"synthesis.{layer}.weight", (o, i)), Slot(f"synthesis.{layer}.values", (o, i, g + 1), smooth=True),
                             Slot(f"synthesis.{layer}.bias", (o,)))]
    if spec["name"] == "latent":  # nn.Sequential of Linear, ReLU, Linear, …
        return [slot for layer, (i, o) in enumerate(pairs)
                for slot in (Slot(f"synthesis.{2 * layer}.weight", (o, i)), Slot(f"synthesis.{2 * layer}.bias", (o,)))]
    raise KanimgError(f"model {spec['name']!r} cannot be stored in a .kimg file; choose from {', '.join(FAMILIES)}")


def parameter_count(spec: dict) -> int:
    """Numbers stored for ``spec`` (what sizing budgets)."""
    return sum(slot.size for slot in slots(spec))


def fold_spline_scales(model: nn.Module) -> None:
    """KAN: c ← w_s ⊙ c and w_s ← 1, frozen, so the stored tensors are the trained ones."""
    for module in model.modules():
        if hasattr(module, "spline_scale"):
            with torch.no_grad():
                module.spline_weight.mul_(module.spline_scale[..., None])
                module.spline_scale.fill_(1.0)
            module.spline_scale.requires_grad_(False)


def stored_arrays(model: nn.Module) -> list[np.ndarray]:
    """float64 copies of the stored tensors (KAN: folded coefficients, exact in float64)."""
    params = dict(model.named_parameters())
    arrays = []
    for slot in slots(model.spec):
        value = params[slot.name].detach().cpu().to(torch.float64)
        if slot.name.endswith("spline_weight"):
            value = value * params[slot.name.replace("spline_weight", "spline_scale")].detach().cpu().to(torch.float64)[..., None]
        arrays.append(value.numpy())
    return arrays


def stored_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that are stored (after :func:`fold_spline_scales`), in slot order."""
    params = dict(model.named_parameters())
    return [params[slot.name] for slot in slots(model.spec)]


def grid_ranges(model: nn.Module) -> list[np.ndarray]:
    """KAN: each layer's (I, 2) float32 interior grid range [lo, hi] per input feature."""
    ranges = []
    for layer in model.layers:
        if not layer.has_uniform_knots:
            raise KanimgError("only uniform KAN grids can be stored in a .kimg file")
        lo, hi = layer.knots[:, 3], layer.knots[:, 3 + layer.grid_size]
        ranges.append(torch.stack([lo, hi], dim=1).detach().cpu().float().numpy())
    return ranges


def load_arrays(model: nn.Module, arrays: list[np.ndarray], ranges: list[np.ndarray] | None = None) -> None:
    """Put decoded tensors (and KAN grid ranges) into a freshly built model of ``model.spec``."""
    from ..nn.bspline import uniform_knots

    params = dict(model.named_parameters())
    with torch.no_grad():
        for slot, array in zip(slots(model.spec), arrays):
            target = params[slot.name]
            target.copy_(torch.as_tensor(array.reshape(slot.shape), dtype=target.dtype))
            if slot.name.endswith("spline_weight"):
                params[slot.name.replace("spline_weight", "spline_scale")].fill_(1.0)
        for layer, limits in zip(getattr(model, "layers", []), ranges or []):
            limits = torch.as_tensor(limits, dtype=torch.float64)
            layer.set_knots(uniform_knots(limits[:, 0], limits[:, 1], layer.grid_size), uniform=True)


def per_tensor(model: nn.Module, quant: QuantConfig | Sequence[QuantConfig]) -> list[QuantConfig]:
    """One QuantConfig per stored tensor (a single config applies to all)."""
    count = len(slots(model.spec))
    return [quant] * count if isinstance(quant, QuantConfig) else list(quant)


def quantized_params(model: nn.Module, quant: QuantConfig | Sequence[QuantConfig]) -> dict[str, torch.Tensor]:
    """The stored tensors, fake-quantised (straight-through), by parameter name."""
    names = [slot.name for slot in slots(model.spec)]
    return {name: fake_quantize(p, q) for name, p, q in zip(names, stored_parameters(model), per_tensor(model, quant))}
