"""Compress an image as latent grids + a synthesis network (:mod:`kanimg.compress.latent`):
rate–distortion training at a target bpp, quantisation of the synthesis, entropy coding of
the latents, .kimg bytes.

Training minimises MSE + λ · bpp over the whole image per step, with λ steered towards the
target bpp as it goes (dual ascent: λ grows while the file's estimated rate, the rounded
grids' plus the header as last measured, is above target), so one training run lands near
the asked rate. This is a loop of its own rather
than kanimg's Trainer: the loss has a rate term and the model is a whole-image function, not
a coordinate network.
"""
from __future__ import annotations

import functools
import logging
import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import KanimgError
from ..io import ImageData
from ..metrics import psnr, psnr_from_mse
from . import resume
from .bitstream import DecodedImage, decode_image, encode_model
from .kimg import DECODE_LIMITS, ImageInfo, decode_cost
from .latent import LatentImage, code_latents
from .neural import CompressConfig, CompressResult
from .quantize import QuantConfig
from .sizing import budget_error
from .tensors import parameter_count

log = logging.getLogger(__name__)

# Measured on the tuning crop "coffee" at 0.25 bpp, 2,000 steps (PSNR − WebP at the same bpp):
# one hidden layer of 48 +0.02 dB, of 32 −0.17, of 64 −0.31, two of 16 −0.85, two of 24 −0.55.
LEVELS, HIDDEN = 7, (48,)  # grids at H/2^0 … H/2^6; synthesis widths
# The synthesis's weights are a fixed cost (a fifth of a 256×256 file at 0.3 bpp), so the smaller the
# budget, the narrower the synthesis: (budget in bytes under which, hidden widths), smallest first;
# HIDDEN above the last. On the tuning images against AVIF (docs/compression.md, 2026-12-07):
# 7 → 22 → C against 7 → 48 → C on the 256×256 crops (0.8–4.1 kB) +0.7, +0.22 and +0.15 dB at 0.1, 0.3
# and 0.5 bpp, on the whole coffee and rocket at 0.3 bpp (9.0 and 10.2 kB) −0.21 and +0.05;
# 7 → 12 → C (135 weights for RGB) against 7 → 22 → C (245) on the crops at 384 bytes (3,072 bits)
# +0.66 dB on the mean (held out +0.59 … +0.76, and one crop's grids lost by 7 → 22 → C), at 819
# (0.1 bpp) +0.04 over two seeds, at 1.6 kB (0.2 bpp) −0.43.
HIDDEN_BY_BUDGET = ((560, (12,)), (6000, (22,)))
# `latent-kan`'s order-1 KAN synthesis: 7 → 10 → C, the first layer on 2 intervals of ±3 (a
# trained file's upsampled grids: std 0.5–3 each), the second on 6 intervals of ±2 (its inputs'
# 1st–99th percentiles: about ±3): 533 weights for RGB (the MLP: 531) at 217 multiply-adds per pixel (2 per edge, 1 per
# input for its piece: latent.kan_pieces; the MLP: 480). Chosen on
# the tuning crops at 0.3 bpp in files (docs/compression.md, 2026-12-06) over one grid and the
# reaches ±12, ±4 of .kimg version 6 (7 → 13 → C on 2 intervals): +0.28 and +0.86 dB against AVIF.
KAN_HIDDEN, KAN_GRIDS, KAN_REACHES = (10,), (2, 6), (3.0, 2.0)
STEPS = 4000  # whole-image steps, whatever the size (a 256×256 crop: 2–3 min on 2 threads of an AMD EPYC)
# Adam with cosine decay (1e-2 learned too slowly in 2,000 steps, 1e-1 lost 2.7 dB to WebP),
# uniform noise for the first 90 % of steps, rounding with straight-through gradients after.
LR = 5e-2
# the latents learn at this × LR (the synthesis and the rate model at LR): Adam moves a value by
# about its rate per step, so the rate bounds how large the grids grow in 4,000 steps, and with
# it how finely the integer grids can draw: with the rate free (λ = 1e-7) the camera's top-left
# quadrant reached 42.80 / 44.49 / 46.63 dB at 0.5 / 1 / 2 × LR
LATENT_LR_SCALE = 2.0
# the rounding phase's share of the steps: there the noisy rate pulls values towards 0 and the
# distortion, seen at the rounded value, pushes them back, and the file's rate falls; on the
# tuning crops at 0.3 bpp 0.1 gained 0.11 dB over 0.2 on the mean (0.05: 0.10, 0.35: −0.02)
ROUNDED_FRACTION = 0.1
# the synthesis precision is chosen half-way, so the latents, still learning fast, can spend
# what a coarser synthesis frees (chosen as the rounding phase began, 6 bits left 9 % of a
# 0.1 bpp budget unspent)
CHOOSE_BITS_AT = 0.5
LAMBDA_START = 1e-2
# log λ moves by this × log(rate / target) per step: at 0.005 the full camera's 0.5 bpp file
# rose 7 % past its aim late in the noise phase (31.66 dB once the rounding phase had pulled it
# back); at 0.01 (or 0.02) it kept within 0.46–0.48 from step 1,800 on (31.82 dB at 0.474)
LAMBDA_RATE = 0.01
# … and by this in the rounding phase, where the decayed learning rate makes the rate answer λ
# slowly: at 0.005 there too the full camera's 0.5 bpp file stayed 2 % over its budget to the
# end and fell back to 6-bit weights (31.53 dB); at this rate it landed at 96 % with 7 (31.66)
ROUNDING_LAMBDA_RATE = 0.05
# λ's ceiling: where the header and the synthesis all but fill the budget, λ grew without bound (past
# 10⁵ on 256×256 crops, 10¹⁸ on whole photos) while the rate rose instead of falling, and training then
# lost every latent (docs/compression.md, "The smallest budgets"); no file that kept its grids had
# needed more than 14
LAMBDA_MAX = 100.0
CONTROL_EVERY = 10  # steps between measurements of the rounded grids' rate
WEIGHT_BITS = (6, 6.5, 7, 8, 9, 10, 11, 12)  # synthesis precisions tried after training
# λ aims this far below the budget: the controller lags (files landed up to 5 % above its
# target on the tuning crops, whole file measured), and a file over the budget must drop the
# synthesis below the precision it trained at (7 → 6 bits cost 1.2 dB on a photo at 0.5 bpp)
RATE_MARGIN = 0.04
WEIGHT_BITS_ESTIMATE = 7  # bits per synthesis weight the rate target assumes until the precision is chosen
# steps between codings of the whole file: the differentiable rate leaves out the header
# (entropy models, tensor headers: 13–20 % of a 0.1 bpp file of a 256² crop) and the coder's
# own overheads, so the controller adds the last measured difference
CALIBRATE_EVERY = 200
# a file within this of the image's mean colour is named by a warning: where the header and the
# synthesis all but fill the budget, training can lose every latent (a 256×256 crop at 2,048 bits:
# docs/compression.md, "The smallest budgets"), and the file is then that flat colour, or worse
FLAT_MARGIN_DB = 1.0


@torch.no_grad()
def rounded_rate(model: LatentImage, pixels: int) -> float:
    """Bits per pixel of the rounded grids under the training rate model."""
    return sum(float(model.level_bits(k, torch.round(latent))) for k, latent in enumerate(model.latents)) / pixels


@torch.no_grad()
def file_bpp(model: LatentImage, info: ImageInfo, synthesis_bits: float) -> float:
    """Bits per pixel of the file the model would be now."""
    return 8 * len(encode_model(model, info, QuantConfig(synthesis_bits))) / info.pixels


@dataclass
class LatentTraining:
    lambda_final: float
    psnr_rounded: float  # the trained model with rounded latents, float weights
    synthesis_bits: float  # the precision the rounding phase trained through
    # at every coding of the file: step, λ, the bpp the training rate model gives and the file's, the
    # precision, each grid's share of nonzero values (how the rate is spent as training goes)
    history: list[dict] = field(default_factory=list)


def nonzero_shares(model: LatentImage) -> list[float]:
    """Each grid's share of nonzero values once rounded, finest first."""
    return [round(float(np.mean(grid != 0)), 4) for grid in model.integer_latents()]


def train_latent(model: LatentImage, image: ImageData, bpp: float, steps: int, seed: int = 0,
                 progress: bool = False, measure_files: bool = True) -> LatentTraining:
    """Fit ``model`` to ``image`` at about ``bpp`` (file bits per pixel, all included).

    Half-way, the synthesis precision is chosen as the file will choose it
    (:func:`best_synthesis_bits`, at the current λ); from then on λ steers the rate of the
    file at that precision, and the rounding phase trains through that quantisation
    (straight-through), so the file is what training saw. ``measure_files=False`` is for
    syntheses the format cannot store (``benchmarks/latent_synthesis.py``):
    WEIGHT_BITS_ESTIMATE bits throughout, and λ steers the differentiable rate alone."""
    torch.manual_seed(seed)
    pixels = image.height * image.width
    info = ImageInfo(image.height, image.width, image.channels, image.bit_depth)
    target = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32)).reshape(-1, image.channels).T.contiguous() * 2 - 1
    weights_per_pixel = sum(p.numel() for p in model.synthesis_parameters()) / pixels
    synthesis_bits, choose_at = WEIGHT_BITS_ESTIMATE, math.ceil(CHOOSE_BITS_AT * steps)
    latents = {id(p) for p in model.latents}
    optimiser = torch.optim.Adam([{"params": list(model.latents), "base": LR * LATENT_LR_SCALE},
                                  {"params": [p for p in model.parameters() if id(p) not in latents], "base": LR}])
    lam, overhead, rounded, history, start = LAMBDA_START, 0.0, 0.0, [], 0
    state_file = resume.state_file() if measure_files else None
    key = resume.training_key(image, codec="latent", bpp=float(bpp), steps=int(steps), seed=int(seed), spec=model.spec) \
        if state_file is not None else {}
    saved = resume.saved_state(state_file, key, model)
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimiser.load_state_dict(saved["optimiser"])
        torch.set_rng_state(saved["rng"])
        start, lam, overhead, rounded = saved["step"], saved["lam"], saved["overhead"], saved["rounded"]
        synthesis_bits, history = saved["synthesis_bits"], saved["history"]
        log.info("continuing the latent training that stopped at step %d of %d (%s)", start, steps, state_file)

    keeper = resume.StateKeeper(state_file, key)
    bar = tqdm(range(start, steps), desc="latent fit", unit="step", disable=not progress, leave=False, initial=start, total=steps)
    with keeper.holding_interrupts():
        for step in bar:
            for group in optimiser.param_groups:
                group["lr"] = group["base"] * 0.5 * (1 + math.cos(math.pi * step / steps))
            rounding = step >= (1 - ROUNDED_FRACTION) * steps
            calibrate = measure_files and step % CALIBRATE_EVERY == 0 and step > 0  # not at 0: the rate model has not seen the grids yet
            if measure_files and step == choose_at:
                synthesis_bits, calibrate = best_synthesis_bits(model, image, info, lam, math.inf)[1], True
            weights = model.quantized_synthesis(synthesis_bits) if rounding else None
            out, bits = model("ste" if rounding else "noise", weights)
            mse = F.mse_loss(out, target)
            loss = mse + lam * bits / pixels
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            if step % CONTROL_EVERY == 0 or calibrate:  # steer by the rate of the rounded grids, what the file will hold
                rounded = rounded_rate(model, pixels) + synthesis_bits * weights_per_pixel
            if calibrate:
                size = file_bpp(model, info, synthesis_bits)
                overhead = size - rounded
                history.append({"step": step, "lambda": lam, "rate_model_bpp": round(rounded, 5), "file_bpp": round(size, 5),
                                "synthesis_bits": synthesis_bits, "nonzero_per_grid": nonzero_shares(model)})
            speed = ROUNDING_LAMBDA_RATE if rounding else LAMBDA_RATE
            lam = min(LAMBDA_MAX, lam * math.exp(speed * math.log(max(rounded + overhead, 1e-6) / (bpp * (1 - RATE_MARGIN)))))
            if progress and step % 50 == 0:
                bar.set_postfix(psnr=f"{10 * math.log10(4 / max(mse.item(), 1e-12)):.2f}", bpp=f"{rounded + overhead:.3f}")
            keeper(step == steps - 1, lambda: dict(step=step + 1, model=model.state_dict(), optimiser=optimiser.state_dict(),
                                                    rng=torch.get_rng_state(), lam=lam, overhead=overhead, rounded=rounded,
                                                    synthesis_bits=synthesis_bits, history=history))
    with torch.no_grad():
        out, _ = model("round")
        mse = float(F.mse_loss(out.clamp(-1, 1), target))
    return LatentTraining(lam, 10 * math.log10(4 / max(mse, 1e-12)), synthesis_bits, history)


def best_synthesis_bits(model: LatentImage, image: ImageData, info: ImageInfo, lam: float, budget_bytes: float
                        ) -> tuple[bytes, float, DecodedImage]:
    """The file whose synthesis precision (WEIGHT_BITS) minimises MSE + λ · bpp among those
    within ``budget_bytes`` (the smallest file when none is), decoded and measured:
    (bytes, bits per weight, the decoded image)."""
    candidates, coded_latents = [], code_latents(model.integer_latents())
    for bits in WEIGHT_BITS:
        data = encode_model(model, info, QuantConfig(bits), coded_latents=coded_latents)
        decoded = decode_image(data)
        cost = 4 * float(np.mean((decoded.pixels - image.pixels) ** 2)) + lam * 8 * len(data) / info.pixels
        candidates.append((len(data) > budget_bytes, cost if len(data) <= budget_bytes else len(data), bits, data, decoded))
    _, _, bits, data, decoded = min(candidates, key=lambda c: c[:3])
    return data, bits, decoded


def default_spec(codec: str, channels: int, budget_bytes: float) -> dict:
    """The spec of ``codec``'s file ("latent" or "latent-kan") at its default shape for a file
    of ``budget_bytes``."""
    if codec == "latent-kan":
        return {"name": "latent", "widths": [LEVELS, *KAN_HIDDEN, channels], "synthesis": "kan", "grids": list(KAN_GRIDS),
                "reaches": [float(r) for r in KAN_REACHES]}
    hidden = next((widths for below, widths in HIDDEN_BY_BUDGET if budget_bytes < below), HIDDEN)
    return {"name": "latent", "widths": [LEVELS, *hidden, channels]}


def new_model(codec: str, height: int, width: int, channels: int, budget_bytes: float) -> LatentImage:
    """An untrained model of ``codec`` at its :func:`default_spec`."""
    spec = default_spec(codec, channels, budget_bytes)
    return LatentImage(height, width, spec["widths"], spec.get("synthesis", "mlp"), spec.get("grids"), spec.get("reaches"))


def check_latent_budget(codec: str, info: ImageInfo, bpp: float, config: CompressConfig) -> None:
    """Refuse a budget under ``codec``'s smallest file, and a GPU: the latent codecs train on
    the CPU. (A budget above it but under what a trained synthesis takes gives a larger file,
    with a warning.)"""
    if config.device == "cuda":
        raise KanimgError(f"--device cuda: {codec} trains on the CPU; leave --device out, or choose --model kan or "
                          f"siren to train on a GPU")
    reason = too_large(codec, info, bpp)
    if reason:  # refused now, not by the decoder after hours of training
        raise KanimgError(reason)
    smallest = smallest_file_bytes(codec, info.height, info.width, info.channels, info.bit_depth, config.bits or min(WEIGHT_BITS))
    if smallest > bpp * info.pixels / 8:
        raise budget_error(codec, info, bpp, smallest)


def too_large(codec: str, info: ImageInfo, bpp: float) -> str:
    """Why no ``codec`` file of an image this large can be decoded (the decoder's memory limit,
    kimg.DECODE_LIMITS: some 14.8 megapixels of RGB), or "" where one can."""
    macs, memory = decode_cost(default_spec(codec, info.channels, bpp * info.pixels / 8), info.height, info.width, info.channels)
    if DECODE_LIMITS.admits(macs, memory):
        return ""
    return (f"{info.width}x{info.height} is too large for a {codec} file: decoding it would take {memory / 2**30:.1f} GiB, "
            f"over the decoder's limit of {DECODE_LIMITS.bytes / 2**30:.0f} GiB; crop or downscale the image, or choose --model kan")


@functools.lru_cache(maxsize=64)  # rd checks every target of every image before fitting
def smallest_file_bytes(codec: str, height: int, width: int, channels: int, bit_depth: int, bits: float) -> int:
    """The bytes of ``codec``'s file with every grid and every synthesis weight 0: no file of
    the shape is smaller, whatever its width (a trained synthesis takes more: some 200–500
    bytes for RGB at 6 bits)."""
    with torch.random.fork_rng():  # the caller's random numbers stay as they were
        model = new_model(codec, height, width, channels, budget_bytes=0)
    with torch.no_grad():
        for parameter in model.synthesis_parameters():
            parameter.zero_()
    return len(encode_model(model, ImageInfo(height, width, channels, bit_depth), QuantConfig(bits)))


def compress_latent(image: ImageData, bpp: float, config: CompressConfig) -> CompressResult:
    """The latent-grid codecs' :func:`kanimg.compress.neural.compress_image` ("latent",
    "latent-kan")."""
    info = ImageInfo(image.height, image.width, image.channels, image.bit_depth)
    budget_bytes = bpp * info.pixels / 8
    started = time.perf_counter()
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = new_model(config.model, image.height, image.width, image.channels, budget_bytes)
    steps = config.steps or STEPS
    training = train_latent(model, image, bpp, steps, config.seed, config.progress)
    if config.bits is not None:
        bits = config.bits
        data = encode_model(model, info, QuantConfig(bits))
        decoded = decode_image(data)
    else:
        data, bits, decoded = best_synthesis_bits(model, image, info, training.lambda_final, budget_bytes)
    seconds = time.perf_counter() - started
    decoded_psnr = psnr(image.pixels, decoded.pixels)
    latent_values = sum(latent.numel() for latent in model.latents)
    result = CompressResult(
        data=data, bpp=8 * len(data) / info.pixels, bpp_target=bpp, psnr=decoded_psnr,
        psnr_float=training.psnr_rounded, psnr_quantized_no_qat=decoded_psnr, spec=model.spec,
        quant=decoded.quant, params=parameter_count(model.spec) + latent_values, train_seconds=round(seconds, 2),
        extra={"steps": steps, "lambda": training.lambda_final, "synthesis_bits": bits, "latent_values": latent_values,
               "nonzero_per_grid": nonzero_shares(model), "history": training.history},
    )
    if result.bpp > bpp:
        log.warning("latent reached %.4f bpp, above the %.4g asked for", result.bpp, bpp)
    pixels = image.pixels.reshape(-1, image.channels)
    flat = psnr_from_mse(float(pixels.var(axis=0, dtype=np.float64).mean()))  # the error of the image's mean colour
    if np.ptp(pixels, axis=0).any() and decoded_psnr < flat + FLAT_MARGIN_DB:  # (a one-colour image: nothing lost)
        log.warning("the file is no better than one flat colour (%.2f dB; the image's mean colour makes %.2f): the "
                    "budget left the grids next to nothing; ask for more bpp", decoded_psnr, flat)
    return result
