"""Compress one image with a network: size → fit → (rate control) → quantisation-aware
fine-tuning → entropy coding → .kimg bytes, and the PSNR at every stage, measured.

The reported PSNR is that of the image decoded from the bytes by the decoder itself
(:func:`kanimg.compress.bitstream.decode_image`), never of the training-time model.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .. import distributed
from ..checkpoints import checkpoint_to_device
from ..device import resolve_device
from ..errors import KanimgError
from ..io import ImageData
from ..metrics import psnr
from ..models import build_model
from ..sampling import ImageTarget
from ..train import Trainer, TrainConfig, check_seed
from . import resume
from .allocate import Allocation, allocate
from .bitstream import DecodedModel, decode_image, encode_model, render_integers
from .kimg import ImageInfo
from .qat import QATConfig, finetune_quantized
from .quantize import FLOAT16, QuantConfig
from .sizing import DESIGN_BITS, Sizing, size_model
from .tensors import fold_spline_scales, stored_parameters

log = logging.getLogger(__name__)

# Training for compression, per family: Adam with a cosine decay on 4,096-pixel batches, at
# the learning rate measured best for each (docs/compression.md). SIREN: 1e-3 (COIN's
# whole-image 2e-4 reached less in ten times the time here; 3e-3 diverged on larger nets).
TRAINING = {
    "kan": {"lr": 2e-2, "batch_size": 4096},
    "siren": {"lr": 1e-3, "batch_size": 4096},
}
LATENT = ("latent", "latent-kan")  # latent grids with a ReLU or an order-1 KAN synthesis: kanimg.compress.latent_codec
MODELS = (*TRAINING, *LATENT)
# The model a bare `compress` uses: latent grids, ahead of the KAN codec on every 256×256 crop and
# full-size photo where both were measured; below LATENT_MIN_BITS of budget the KAN codec where one fits, which
# sizes its network to the budget.
# With the narrow syntheses of small budgets (latent_codec.HIDDEN_BY_BUDGET) and λ's ceiling the latent
# codec is ahead at 4,096 and 3,072 bits on every held-out 256×256 crop, by 1.2–3.4 dB; at 2,048 bits
# the KAN codec makes no 256×256 file, and on 32×32 images it is ahead on one of three
# (docs/compression.md, "The smallest budgets", 2026-12-07); at 1,792 bits on 16×16 and 32×32 images the
# two codecs split, three images each.
LATENT_MIN_BITS = 2048
DEFAULT_BITS = {"kan": None, "siren": FLOAT16}  # None: rate control picks n in 4 … 12 per tensor
# Training length: 5,000 steps per 65,536 pixels (every pixel seen about 300 times in
# 4,096-pixel batches), so a large image is not under-trained: a 768×512 photo gained
# 0.8 dB at 0.5 bpp from 5,000 → 25,000 steps (docs/compression.md). Bounded to keep small
# images useful and huge ones finite.
STEPS_PER_PIXEL = 5000 / 65536
MIN_STEPS, MAX_STEPS = 5000, 25000


def default_steps(pixels: int) -> int:
    """Training steps for an image of ``pixels`` pixels when none are asked for."""
    return int(min(MAX_STEPS, max(MIN_STEPS, round(STEPS_PER_PIXEL * pixels))))


@dataclass
class CompressConfig:
    """How a network codec compresses an image.

    Attributes:
        model: "kan", "siren" (COIN-style), "latent" or "latent-kan" (latent grids with a ReLU or an
            order-1 KAN synthesis: kanimg.compress.latent_codec, which uses steps, bits and seed,
            and neither qat_steps, granularity, lr nor batch_size)
            or "auto": :func:`default_model` for the image and budget.
        steps: training steps; None = :func:`default_steps` of the image's pixel count (latent:
            latent_codec.STEPS).
        qat_steps: quantisation-aware fine-tuning steps (integer quantisation only).
        bits: 4 … 12 in half bits, or 16 (float16); None = the family's default (latent: the
            best of latent_codec.WEIGHT_BITS by rate and distortion; KAN: the most bits that fit
            the budget, per tensor; SIREN: float16 as COIN).
        granularity: "tensor" or "channel" step sizes.
        lr, batch_size: None = the family's compression defaults (TRAINING).
        seed: model initialisation and pixel sampling.
        device: where to train ("auto", "cpu", "cuda"); decoding is always CPU float64.
        progress: show progress bars.
    """

    model: str = "auto"
    steps: int | None = None
    qat_steps: int = 300
    bits: float | None = None
    granularity: str = "tensor"
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    device: str = "auto"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.model not in (*MODELS, "auto"):
            raise KanimgError(f"unknown compression model {self.model!r}; choose from auto, {', '.join(MODELS)}")
        if self.steps is not None and self.steps < 1:
            raise KanimgError(f"--steps must be at least 1, got {self.steps}")
        if self.qat_steps < 0:
            raise KanimgError(f"--qat-steps must not be negative, got {self.qat_steps}")
        check_seed(self.seed)
        if self.bits is not None:
            QuantConfig(self.bits, self.granularity)  # validates
            if self.model in LATENT and self.bits == FLOAT16:
                raise KanimgError(f"the {self.model} model stores integer weights: --bits 4 … 12")


@dataclass
class CompressResult:
    data: bytes
    bpp: float
    bpp_target: float
    psnr: float  # decoded from ``data``: the number that counts
    psnr_float: float  # the trained float model, rounded to integer pixels (before quantisation)
    psnr_quantized_no_qat: float  # quantised straight after training, before fine-tuning
    spec: dict
    quant: str
    params: int
    train_seconds: float
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("data")
        return out


def _float_model_psnr(model: torch.nn.Module, image: ImageData, info: ImageInfo) -> float:
    """PSNR of the unquantised model, rendered like the decoder does (CPU, integer pixels)."""
    model64 = copy.deepcopy(model).cpu().to(torch.float64).eval()
    top = float(2**image.bit_depth - 1)
    return psnr(image.pixels, render_integers(DecodedModel(model64, info, QuantConfig(FLOAT16))) / top)


def default_model(info: ImageInfo, bpp: float, config: CompressConfig) -> str:
    """The codec model for "auto": latent grids, unless float16 weights are asked for (latent
    files store integer weights only), the image is too large for their decoder, or the budget
    is under LATENT_MIN_BITS; then the KAN, unless no KAN fits the budget (a 256×256 image's
    smallest is 272 bytes, the latent codec's 88) and the training is on the CPU: then the
    latent codec, whose own check says if it cannot make the file either."""
    from .latent_codec import too_large

    if config.bits == FLOAT16 or too_large("latent", info, bpp):
        return "kan"
    if bpp * info.pixels >= LATENT_MIN_BITS:
        return "latent"
    if config.device == "cuda":  # the latent codecs train on the CPU: no fallback for a GPU run
        return "kan"
    try:
        _sizing("kan", info, bpp, config)
    except KanimgError:
        return "latent"
    return "kan"


def compress_image(image: ImageData, bpp: float, config: CompressConfig) -> CompressResult:
    """Fit, quantise and code ``image`` into about ``bpp`` bits per pixel (see CompressResult);
    one process's work, also inside a torchrun world."""
    with distributed.alone():
        return _compress(image, bpp, config)


def check_budget(image: ImageData, bpp: float, config: CompressConfig) -> None:
    """Raise KanimgError, before any training, when ``config``'s model cannot make a file of
    ``image`` within ``bpp`` or cannot train where ``config.device`` asks (rd checks every
    target of every model this way before fitting the first)."""
    if not (bpp > 0 and math.isfinite(bpp)):
        raise KanimgError(f"--bpp must be a positive number of bits per pixel, got {bpp}")
    raw = image.channels * image.bit_depth
    if bpp > raw:
        raise KanimgError(f"--bpp {bpp:g} is more than the {raw} bits per pixel of the image itself; ask for at most {raw}")
    info = ImageInfo(image.height, image.width, image.channels, image.bit_depth)
    model = config.model if config.model != "auto" else default_model(info, bpp, config)
    if model in LATENT:
        from .latent_codec import check_latent_budget

        check_latent_budget(model, info, bpp, config)
    else:
        resolve_device(config.device)
        _sizing(model, info, bpp, config)


def _sizing(model: str, info: ImageInfo, bpp: float, config: CompressConfig) -> Sizing:
    """The KAN's or SIREN's size for the budget, at the precision it is designed for."""
    return size_model(model, info, bpp, QuantConfig(config.bits or DEFAULT_BITS[model] or DESIGN_BITS, config.granularity))


def _compress(image: ImageData, bpp: float, config: CompressConfig) -> CompressResult:
    check_budget(image, bpp, config)
    info = ImageInfo(image.height, image.width, image.channels, image.bit_depth)
    if config.model == "auto":
        config = replace(config, model=default_model(info, bpp, config))
    if config.model in LATENT:
        from .latent_codec import compress_latent

        return compress_latent(image, bpp, config)
    bits = config.bits or DEFAULT_BITS[config.model]
    sizing = _sizing(config.model, info, bpp, config)
    log.info("%s at %.3g bpp: widths %s%s, %d numbers", config.model, bpp, sizing.spec["widths"],
             f", grids {sizing.spec['grids']}" if "grids" in sizing.spec else "", sizing.params)
    if sizing.capped:
        log.warning("%s: a %dx%d image holds at most a network of %s numbers that the decoder will run (kimg.DECODE_LIMITS); "
                    "the file will be well under %g bpp", config.model, info.width, info.height, f"{sizing.params:,}", bpp)
    started = time.perf_counter()
    model, target, train_config, keeper = _fit(image, sizing.spec, config)
    psnr_float = _float_model_psnr(model, image, info)
    data, per_tensor, psnr_no_qat = quantise_and_code(model, image, info, target, sizing.budget_bytes, bits, config, keeper)
    seconds = time.perf_counter() - started
    decoded = decode_image(data)
    result = CompressResult(
        data=data, bpp=8 * len(data) / (image.height * image.width), bpp_target=bpp,
        psnr=psnr(image.pixels, decoded.pixels), psnr_float=psnr_float, psnr_quantized_no_qat=psnr_no_qat,
        spec=sizing.spec, quant=decoded.quant, params=sizing.params, train_seconds=round(seconds, 2),
        extra={"training": train_config.to_dict(), "qat_steps": 0 if bits == FLOAT16 else config.qat_steps,
               "bits_per_tensor": per_tensor, "estimated_bytes": round(sizing.estimated_bytes), "header_bytes": sizing.header_bytes},
    )
    if result.bpp > bpp:
        log.warning("%s reached %.4f bpp, above the %.4g asked for (even at %s)", config.model, result.bpp, bpp, decoded.quant)
    return result


def _fit(image: ImageData, spec: dict, config: CompressConfig) -> tuple[torch.nn.Module, ImageTarget, TrainConfig, resume.StateKeeper]:
    """Train the network of ``spec`` on ``image``; returns the best weights (scales folded) and
    the keeper of the encode's state, which the later phases go on with."""
    device = resolve_device(config.device)
    training = {**TRAINING[config.model], **{k: v for k, v in (("lr", config.lr), ("batch_size", config.batch_size)) if v is not None}}
    steps = config.steps or default_steps(image.height * image.width)
    train_config = TrainConfig(steps=steps, schedule="cosine", eval_every=max(1, min(250, steps)), seed=config.seed, **training)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        model = build_model(**spec).to(device)
    target = ImageTarget(image.pixels, "centers", device)
    trainer = Trainer(model, target, train_config, progress=config.progress)
    state_file = resume.state_file()
    key = resume.training_key(image, codec=config.model, spec=spec, train=train_config.to_dict()) if state_file is not None else {}
    saved = resume.saved_state(state_file, key, model, weights=("trainer", "model"))
    if saved is not None:
        trainer.load_state_dict(checkpoint_to_device(saved["trainer"], device))
        log.info("continuing the %s training that stopped at step %d of %d (%s)", config.model, trainer.step, steps, state_file)
    keeper = resume.StateKeeper(state_file, key, saved)
    with keeper.holding_interrupts():
        trainer.train(lambda trainer: keeper(trainer.step == steps, lambda: {"trainer": trainer.state_dict()}))
    if state_file is not None:
        keeper.hold(trainer=copy.deepcopy(trainer.state_dict()))  # the later phases' states start from it
    model.load_state_dict(trainer.best_state)
    fold_spline_scales(model)
    return model, target, train_config, keeper


def quantise_and_code(model: torch.nn.Module, image: ImageData, info: ImageInfo, target: ImageTarget, budget: float,
                      bits: float | None, config: CompressConfig,
                      keeper: resume.StateKeeper | None = None) -> tuple[bytes, list[float], float]:
    """Quantise, fine-tune and code ``model``: every tensor at ``bits``, or (None) bits per
    tensor allocated to fit ``budget`` bytes. Returns (file, bits per tensor, PSNR before fine-tuning).
    With the encode's ``keeper``, the allocation and the fine-tuning's state are kept, and a
    resumed encode takes them back instead of starting these phases over."""
    keeper = keeper or resume.StateKeeper(None, {})
    count = len(stored_parameters(model))
    allocation = None
    if bits is not None:
        quant, per_tensor = QuantConfig(bits, config.granularity), [bits] * count
    else:
        settings = {"budget": float(budget), "granularity": config.granularity, "seed": config.seed}
        kept = keeper.resumed.get("allocation")
        if kept is not None and kept["settings"] == settings:  # already in the file, with the fine-tuning's state: kept as it is
            allocation = Allocation.from_state(kept)
            keeper.hold(allocation=kept)
        else:
            allocation = allocate(model, info, target.coords, target.values, budget, config.granularity, config.seed)
            keeper.keep(allocation={"settings": settings, **allocation.state()})
        quant, per_tensor = QuantConfig(max(allocation.bits), config.granularity), allocation.bits
    if quant.is_float16:
        data = encode_model(model, info, quant)
        return data, [], psnr(image.pixels, decode_image(data).pixels)
    psnr_no_qat = psnr(image.pixels, decode_image(encode_model(model, info, quant, per_tensor)).pixels)
    quants = [QuantConfig(n, config.granularity) for n in per_tensor]
    finetune_quantized(model, target, quants, QATConfig(steps=config.qat_steps, seed=config.seed), progress=config.progress,
                       keeper=keeper)
    data = encode_model(model, info, quant, per_tensor)
    while allocation is not None and len(data) > budget:  # fine-tuning moved a step size: shave bits
        fewer = allocation.cheaper(per_tensor)
        if fewer is None:
            break
        per_tensor = fewer
        data = encode_model(model, info, QuantConfig(max(per_tensor), config.granularity), per_tensor)
    return data, per_tensor, psnr_no_qat
