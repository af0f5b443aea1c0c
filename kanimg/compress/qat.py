"""Quantisation-aware fine-tuning: a few hundred steps in which the forward pass sees the
quantised weights and the gradient passes straight through the rounding to the float
weights (straight-through estimator), so the network settles where rounding costs least."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import torch
from torch import nn
from torch.func import functional_call

from ..checkpoints import checkpoint_to_device
from ..metrics import psnr_from_mse
from ..sampling import ImageTarget
from ..train import Trainer, TrainConfig
from .quantize import QuantConfig
from .resume import StateKeeper
from .tensors import fold_spline_scales, per_tensor, quantized_params, stored_parameters


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
                       progress: bool = False, keeper: StateKeeper | None = None) -> float:
    """Fine-tune ``model`` in place for ``quant`` (one config, or one per stored tensor);
    returns the best quantised PSNR reached (the model keeps those weights). With an encode's
    ``keeper`` its state is kept as it goes (``qat``), and continued where a resumed encode left it.

    KAN spline scales are folded into the coefficients first (the stored form) and stay
    frozen. The training loop is kanimg's Trainer, running the model on its fake-quantised
    stored tensors (its parameter-transform hook).
    """
    fold_spline_scales(model)
    quants = per_tensor(model, quant)
    if config.steps <= 0 or all(q.is_float16 for q in quants):
        return quantized_psnr(model, target, quants)
    stored = {id(p) for p in stored_parameters(model)}
    frozen = [p for p in model.parameters() if id(p) not in stored and p.requires_grad]
    train = TrainConfig(steps=config.steps, lr=config.lr, batch_size=config.batch_size, eval_every=config.eval_every,
                        seed=config.seed, schedule="cosine")
    for p in frozen:
        p.requires_grad_(False)
    try:
        trainer = Trainer(model, target, train, progress=progress, weights=lambda m: quantized_params(m, quants))
        keeper = keeper or StateKeeper(None, {})
        settings = {"config": asdict(config), "quant": [asdict(q) for q in quants]}
        saved = keeper.resumed.get("qat")
        if saved is not None and saved.get("settings") == settings:
            trainer.load_state_dict(checkpoint_to_device(saved["trainer"], next(model.parameters()).device))
        else:
            trainer.evaluate()  # the quantised model before fine-tuning is a candidate too
        with keeper.holding_interrupts():
            trainer.train(lambda t: keeper(t.step == config.steps, lambda: {"qat": {"settings": settings, "trainer": t.state_dict()}}))
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.load_state_dict(trainer.best_state)
    return trainer.best_psnr
