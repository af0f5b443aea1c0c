"""The latent codec's synthesis network: the ReLU MLP it ships against KAN syntheses of about
the same size and decode cost (issue 15's "the KAN's claim"), each trained the codec's way
(:func:`kanimg.compress.latent_codec.train_latent`: the same grids, rate model, λ steering,
noise then rounding, 7-bit quantisation-aware rounding phase; λ steers the training's rate
estimate, since not every synthesis can be written as a file) at one target bit rate.

    python benchmarks/latent_synthesis.py -o runs/latent-synthesis        # coffee, rocket; 0.3 bpp; 4,000 steps
    python benchmarks/latent_synthesis.py --steps 100 --photos coffee -o /tmp/syn
    python benchmarks/latent_synthesis.py --images photo.png --only hat --json runs/syn.json   # any image; the MLP and the hat KANs

Only the MLP and the order-1 KAN (`--model latent` and `latent-kan`) have a file format, so
every synthesis is scored the same way: PSNR with rounded
latents and the synthesis at 7 bits, at the rate training estimates (the rounded grids under
the training rate model, plus 7 bits per synthesis parameter). Decode cost as multiply-adds
per pixel: I·O for a linear layer, 5·I·O for a KAN layer (4 nonzero cubic B-splines and the
SiLU base per edge; the basis itself, a few more per input, is not counted), 3·I·O for the
order-1 KAN layer (its linear term and two nonzero hats per edge). Runs on the
photos inr_bench.py tunes on (TUNE), or on ``--images``; ``--only`` picks syntheses by a part
of their label, the MLP always among them (every other is compared with it). Prints a
Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from kanimg.compress import latent_codec
from kanimg.compress.latent import LatentImage
from kanimg.compress.quantize import QuantConfig, fake_quantize
from kanimg.compress.tensors import fold_spline_scales
from kanimg.files import write_json
from kanimg.io import load_image
from kanimg.metrics import psnr_from_mse
from kanimg.nn.kan import KANLayer
from kanimg.results import machine, versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inr_bench import TUNE, write_photos  # noqa: E402

LEVELS = latent_codec.LEVELS
GRID_RANGE = (-3.0, 3.0)  # the upsampled latents: std ≈ 2 after training (the MLP's, coffee, 0.3 bpp)


def kan(widths: list[int], grid: int) -> nn.Sequential:
    return nn.Sequential(*(KANLayer(a, b, grid, GRID_RANGE) for a, b in zip(widths[:-1], widths[1:])))


def under_test(synthesis: Callable[[int], nn.Module]) -> Callable[[int, int, int], LatentImage]:
    return lambda height, width, channels: SynthesisUnderTest(height, width, synthesis(channels))


def codec(hidden: int, grids: tuple[int, int] | None = None, reaches: tuple[float, float] = (12.0, 4.0)) -> Callable[[int, int, int], LatentImage]:
    """The codec's own model (a synthesis the file format stores: the ReLU MLP, or latent-kan's
    order-1 KAN, a grid and a reach per layer; the reaches' default is the first version's)."""
    return lambda height, width, channels: LatentImage(height, width, [LEVELS, hidden, channels], "mlp" if grids is None else "kan",
                                                       grids, None if grids is None else reaches)


# label: (builder of the model for an image's height, width and channels, its multiply-adds per pixel for C channels)
SYNTHESES: dict[str, tuple[Callable[[int, int, int], LatentImage], Callable[[int], int]]] = {
    "ReLU MLP 7 → 48 → C (the codec's)": (codec(48), lambda c: 48 * (LEVELS + c)),
    "KAN 7 → 6 → C, grid 5": (under_test(lambda c: kan([LEVELS, 6, c], 5)), lambda c: 5 * 6 * (LEVELS + c)),
    "KAN 7 → 10 → C, grid 3": (under_test(lambda c: kan([LEVELS, 10, c], 3)), lambda c: 5 * 10 * (LEVELS + c)),
    "linear 7 → 16, KAN 16 → C, grid 5": (under_test(lambda c: nn.Sequential(nn.Linear(LEVELS, 16), *kan([16, c], 5))),
                                          lambda c: 16 * LEVELS + 5 * 16 * c),
    "linear 7 → 16, ReLU, KAN 16 → C, grid 5": (under_test(lambda c: nn.Sequential(nn.Linear(LEVELS, 16), nn.ReLU(), *kan([16, c], 5))),
                                                lambda c: 16 * LEVELS + 5 * 16 * c),
    # order-1 KANs (kanimg.compress.latent.HatKANLayer, the codec's latent-kan): 2 multiply-adds per edge
    # (its piece's slope · x + intercept, and the sum: latent.kan_pieces) and 1 per input (its piece)
    "hat KAN 7 → 16 → C, grid 4, linear term": (codec(16, (4, 4)), lambda c: 2 * 16 * (LEVELS + c) + LEVELS + 16),
    # no more weights than the MLP (430 against 433 for grey) and fewer multiply-adds: one kink per edge, at 0
    "hat KAN 7 → 13 → C, grid 2, linear term": (codec(13, (2, 2)), lambda c: 2 * 13 * (LEVELS + c) + LEVELS + 13),
}


class SynthesisUnderTest(LatentImage):
    """The codec's latent grids with another synthesis, evaluated pixels-first (the KAN layer's
    layout); its KAN spline scales are folded into the coefficients and frozen, as a file would
    store them. (The parent's spec still names the codec's MLP: this model is never written.)"""

    def __init__(self, height: int, width: int, synthesis: nn.Module) -> None:
        super().__init__(height, width, [LEVELS, 1])
        self.synthesis = synthesis
        fold_spline_scales(self.synthesis)

    def synthesis_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.synthesis.parameters() if p.requires_grad]

    def quantized_synthesis(self, bits: float) -> dict[str, Tensor]:
        return {f"synthesis.{name}": fake_quantize(p, QuantConfig(bits)) for name, p in self.synthesis.named_parameters() if p.requires_grad}

    def synthesise_features(self, x: Tensor, weights: dict[str, Tensor]) -> Tensor:
        own = {name.removeprefix("synthesis."): value for name, value in weights.items()}
        return functional_call(self.synthesis, own, (x.T,)).T


def score(model: LatentImage, target: Tensor, bits: float) -> tuple[float, float]:
    """(PSNR with rounded latents and the synthesis at ``bits``, estimated bpp)."""
    pixels = model.height * model.width
    with torch.no_grad():
        out, _ = model("round", model.quantized_synthesis(bits))
        mse = float(F.mse_loss(out.clamp(-1, 1), target))
    weights = bits * sum(p.numel() for p in model.synthesis_parameters())
    return psnr_from_mse(mse, 2.0), latent_codec.rounded_rate(model, pixels) + weights / pixels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=latent_codec.STEPS)
    parser.add_argument("--bpp", type=float, default=0.3)
    parser.add_argument("--photos", default="coffee,rocket", help="tuning photos, comma-separated")
    parser.add_argument("--images", nargs="+", type=Path, help="image files instead of the tuning photos")
    parser.add_argument("--only", help="comma-separated parts of synthesis labels (case-insensitive); the MLP is always run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-o", "--out", type=Path, default=Path("runs/latent-synthesis"))
    parser.add_argument("--json", type=Path, help="results JSON (default: benchmarks/results/latent_synthesis.json)")
    args = parser.parse_args(argv)
    baseline = next(iter(SYNTHESES))
    wanted = [part.strip().lower() for part in args.only.split(",")] if args.only else []
    chosen = [label for label in SYNTHESES if label == baseline or not wanted or any(w in label.lower() for w in wanted)]
    if wanted and len(chosen) == 1:
        parser.error(f"--only {args.only!r} matches no synthesis but the MLP; labels: {', '.join(SYNTHESES)}")
    if args.images:
        if missing := [str(path) for path in args.images if not path.is_file()]:
            parser.error(f"no such image: {', '.join(missing)}")
        paths = args.images
    else:
        photos = write_photos(args.out / "photos", {name: TUNE[name] for name in args.photos.split(",")}, crop=True)
        paths = sorted(photos.glob("*.png"))
    bits = latent_codec.WEIGHT_BITS_ESTIMATE
    records = []
    for path in paths:
        image = load_image(path)
        target = torch.from_numpy(np.ascontiguousarray(image.pixels, dtype=np.float32)).reshape(-1, image.channels).T * 2 - 1
        for label in chosen:
            build, macs = SYNTHESES[label]
            torch.manual_seed(args.seed)
            model = build(image.height, image.width, image.channels)
            started = time.perf_counter()
            latent_codec.train_latent(model, image, args.bpp, args.steps, args.seed, measure_files=False)
            seconds = time.perf_counter() - started
            psnr, bpp = score(model, target, bits)
            records.append({"synthesis": label, "image": path.stem, "psnr": psnr, "bpp": bpp, "seconds": seconds,
                            "params": sum(p.numel() for p in model.synthesis_parameters()), "macs_per_pixel": macs(image.channels)})
            print(f"{label:42s} {path.stem:8s} {psnr:6.2f} dB {bpp:.4f} bpp {seconds:6.1f} s", file=sys.stderr, flush=True)
    images = sorted({r["image"] for r in records})
    lines = ["| synthesis | parameters | MACs / pixel | " + " | ".join(f"{i}: bpp, PSNR" for i in images)
             + " | mean PSNR − MLP (dB) | mean training (s) |", "|---|---:|---:|" + "---|" * len(images) + "---:|---:|"]
    for label in chosen:
        rows = {r["image"]: r for r in records if r["synthesis"] == label}
        base = {r["image"]: r for r in records if r["synthesis"] == baseline}
        first = next(iter(rows.values()))
        lines.append(f"| {label} | {first['params']} | {first['macs_per_pixel']} | "
                     + " | ".join(f"{rows[i]['bpp']:.3f}, {rows[i]['psnr']:.2f}" for i in images)
                     + f" | {statistics.mean(rows[i]['psnr'] - base[i]['psnr'] for i in images):+.2f}"
                     + f" | {statistics.mean(r['seconds'] for r in rows.values()):.0f} |")
    print("\n".join(lines))
    path = args.json or Path(__file__).resolve().parent / "results" / "latent_synthesis.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"steps": args.steps, "bpp": args.bpp, "weight_bits": bits, "records": records, "table": lines,
                      "command": "python benchmarks/latent_synthesis.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                      "machine": machine(), "versions": versions()})
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
