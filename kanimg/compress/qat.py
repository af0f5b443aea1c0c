"""Quantisation-aware fine-tuning: a few hundred steps in which the forward pass sees the
quantised weights and the gradient passes straight through the rounding to the float
weights (straight-through estimator), so the network settles where rounding costs least."""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..metrics import psnr_from_mse
from ..sampling import CoordinateSampler, ImageTarget
from ..train import COSINE_FLOOR
from .quantize import QuantConfig, fake_quantize
from .tensors import fold_spline_scales, slots, stored_parameters


@dataclass
class QATConfig:
    """steps of fine-tuning at learning rate ``lr`` (cosine decay), ``batch_size`` pixels
    per step (0 = whole image); the quantised model is scored every ``eval_every`` steps and
    the best one kept."""

    steps: int = 300
    lr: float = 5e-4
    batch_size: int = 4096
    eval_every: int = 50
    seed: int = 0


def per_tensor(model: nn.Module, quant: QuantConfig | Sequence[QuantConfig]) -> list[QuantConfig]:
    """One QuantConfig per stored tensor (a single config applies to all)."""
    count = len(slots(model.spec))
    return [quant] * count if isinstance(quant, QuantConfig) else list(quant)


def quantized_params(model: nn.Module, quant: QuantConfig | Sequence[QuantConfig]) -> dict[str, torch.Tensor]:
    """The stored tensors, fake-quantised (straight-through), by parameter name."""
    names = [slot.name for slot in slots(model.spec)]
    return {name: fake_quantize(p, q) for name, p, q in zip(names, stored_parameters(model), per_tensor(model, quant))}


@torch.no_grad()
def quantized_psnr(model: nn.Module, target: ImageTarget, quant: QuantConfig | Sequence[QuantConfig], chunk: int = 1 << 16) -> float:
    """PSNR (dB, [0, 1] scale) of the model with its stored tensors quantised."""
    params = quantized_params(model, quant)
    sq = 0.0
    for start in range(0, target.coords.shape[0], chunk):
        out = functional_call(model, params, (target.coords[start : start + chunk],))
        sq += float(((out - target.values[start : start + chunk]) ** 2).sum())
    return psnr_from_mse(sq / target.values.numel(), 2.0)


def finetune_quantized(model: nn.Module, target: ImageTarget, quant: QuantConfig | Sequence[QuantConfig], config: QATConfig,
                       progress: bool = False) -> float:
    """Fine-tune ``model`` in place for ``quant`` (one config, or one per stored tensor);
    returns the best quantised PSNR reached.

    KAN spline scales are folded into the coefficients first (the stored form).
    """
    fold_spline_scales(model)
    best_psnr = quantized_psnr(model, target, quant)
    if config.steps <= 0 or all(q.is_float16 for q in per_tensor(model, quant)):
        return best_psnr
    best_state = copy.deepcopy(model.state_dict())
    params = stored_parameters(model)
    optimizer = torch.optim.Adam(params, lr=config.lr)
    sampler = CoordinateSampler(target.coords, target.values, config.batch_size, seed=config.seed)
    for step in tqdm(range(config.steps), disable=not progress, desc="quantisation-aware fine-tuning", leave=False, unit="step"):
        progress_frac = step / max(1, config.steps - 1)
        for group in optimizer.param_groups:
            group["lr"] = config.lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress_frac)))
        coords, values = sampler.next_batch()
        loss = nn.functional.mse_loss(functional_call(model, quantized_params(model, quant), (coords,)), values)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            value = quantized_psnr(model, target, quant)
            if value > best_psnr:
                best_psnr, best_state = value, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return best_psnr
