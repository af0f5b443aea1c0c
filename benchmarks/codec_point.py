"""One rate–distortion point of a network codec, scored against WebP and AVIF on the same image.

The experiments of docs/compression.md that try one change to the codec (a constant, a
schedule) at one budget: compress the image with ``kanimg.compress.neural.compress_image``,
decode the real bytes, and give the PSNR gap to WebP and AVIF interpolated at the file's own
bpp (``rd.psnr_at``, monotone cubic in log-rate over each codec's quality sweep).

    python benchmarks/codec_point.py IMAGE 0.3                       # the default latent codec
    python benchmarks/codec_point.py IMAGE 0.3 --model kan --seed 1
    python benchmarks/codec_point.py IMAGE 0.3 --set latent_codec.ROUNDED_FRACTION=0.3

``--set MODULE.NAME=VALUE`` overrides a constant of ``kanimg.compress.MODULE`` for this run
(VALUE is a Python literal; it reaches the code that reads the constant from its module, not
a copy imported by name elsewhere); the point is written to benchmarks/results/codec_point.json, or
to ``--json PATH``. For the latent codec it also prints the rate control's trace: at every
coding of the file during training, λ, the bpp of the training's rate model and of the file,
and each grid's share of nonzero values.
"""
from __future__ import annotations

import argparse
import ast
import importlib
import time
from pathlib import Path

from kanimg.compress.codecs import get_codec, run_sweep
from kanimg.compress.neural import MODELS, CompressConfig, compress_image
from kanimg.compress.rd import psnr_at
from kanimg.errors import KanimgError
from kanimg.files import write_json
from kanimg.io import load_image
from kanimg.results import machine, versions

RESULTS = Path(__file__).resolve().parent / "results"


def override(assignment: str) -> tuple[str, object]:
    """Apply one ``MODULE.NAME=VALUE`` to kanimg.compress.MODULE; returns what was set."""
    target, _, literal = assignment.partition("=")
    module_name, _, name = target.rpartition(".")
    if not module_name or not literal:
        raise SystemExit(f"--set takes MODULE.NAME=VALUE, got {assignment!r}")
    module = importlib.import_module(f"kanimg.compress.{module_name}")
    if not hasattr(module, name):
        raise SystemExit(f"kanimg.compress.{module_name} has no {name}")
    try:
        value = ast.literal_eval(literal)
    except (ValueError, SyntaxError):
        raise SystemExit(f"--set {target}: {literal!r} is not a Python literal") from None
    setattr(module, name, value)
    return target, value


def classic_gaps(image, bpp: float, psnr: float) -> dict[str, float | None]:
    """PSNR minus each classic codec's PSNR at ``bpp`` (None where its sweep does not reach it)."""
    gaps = {}
    for name in ("webp", "avif"):
        points = run_sweep(get_codec(name), image, [bpp * 1.5])
        reference = psnr_at(points, bpp)
        gaps[name] = None if reference is None else round(psnr - reference, 3)
    return gaps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("image", type=Path)
    parser.add_argument("bpp", type=float)
    parser.add_argument("--model", default="latent", choices=MODELS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="MODULE.NAME=VALUE")
    parser.add_argument("--json", type=Path, default=RESULTS / "codec_point.json")
    args = parser.parse_args(argv)

    overrides = dict(override(assignment) for assignment in args.sets)
    try:
        image = load_image(args.image)
        started = time.perf_counter()
        result = compress_image(image, args.bpp, CompressConfig(model=args.model, steps=args.steps, seed=args.seed))
    except KanimgError as error:
        raise SystemExit(f"codec_point: {error}") from None
    seconds = time.perf_counter() - started
    gaps = classic_gaps(image, result.bpp, result.psnr)
    bits = result.extra.get("synthesis_bits", result.quant)
    print(f"{args.image.name} {args.model} target {args.bpp:g}: {result.bpp:.4f} bpp, {result.psnr:.2f} dB "
          f"({bits} bits), {seconds:.0f} s; − WebP {gaps['webp']}, − AVIF {gaps['avif']}")
    for entry in result.extra.get("history", []):  # the latent codec's rate control, every coding of the file
        print(f"  step {entry['step']:>5}: λ {entry['lambda']:.3g}, rate model {entry['rate_model_bpp']:.4f} bpp, "
              f"file {entry['file_bpp']:.4f} ({entry['synthesis_bits']} bits), nonzero per grid {entry['nonzero_per_grid']}")
    write_json(args.json, {
        "image": str(args.image), "model": args.model, "bpp_target": args.bpp, "seed": args.seed,
        "overrides": {k: repr(v) for k, v in overrides.items()}, "bpp": result.bpp, "psnr": result.psnr,
        "minus_webp": gaps["webp"], "minus_avif": gaps["avif"], "seconds": round(seconds, 1),
        "result": result.summary(), "machine": machine(), "versions": versions(),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
