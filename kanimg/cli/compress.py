"""``kanimg compress``, ``decode`` and ``rd``: the .kimg codec and rate–distortion curves."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..device import DEVICES
from .types import comma_list, output_file

DEFAULT_BPPS = "0.1,0.2,0.3,0.5,1.0"


def _network_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("network codec")
    g.add_argument("--steps", type=int, help="training steps (default: latent 4000 whole-image steps; kan and siren "
                                               "5000 per 65,536 pixels, 5000 to 25000)")
    g.add_argument("--qat-steps", type=int, help="kan and siren: quantisation-aware fine-tuning steps (default 300; "
                                                   "latent trains through its quantisation)")
    g.add_argument("--bits", type=float, help="4…12 in half bits (uniform integers) or 16 (float16); default: latent "
                                                "the best of 6…12 by rate and distortion, KAN the most bits that fit "
                                                "the budget, SIREN float16 (COIN)")
    g.add_argument("--per-channel", action="store_true", help="one quantisation step per output channel (default: per tensor)")
    g.add_argument("--seed", type=int, help="random seed (default 0)")
    g.add_argument("--device", default="auto", choices=DEVICES, help="training device (decoding is always CPU)")


def _network_config(args: argparse.Namespace) -> dict:
    options = {"steps": args.steps, "qat_steps": args.qat_steps, "bits": args.bits, "seed": args.seed, "device": args.device}
    options = {k: v for k, v in options.items() if v is not None}
    if args.per_channel:
        options["granularity"] = "channel"
    return options


def add(sub) -> None:
    """Register the compression verbs on the main parser's subparsers."""
    comp = sub.add_parser("compress", help="fit a network to an image, quantise and entropy-code it into a .kimg file")
    comp.add_argument("image", type=Path)
    comp.add_argument("-o", "--out", type=output_file, help="output .kimg file (default: <image name>.kimg here)")
    comp.add_argument("--bpp", type=float, default=0.3, help="bit budget in bits per pixel, header included (default 0.3)")
    comp.add_argument("--model", default="auto", choices=["auto", "latent", "latent-kan", "kan", "siren"],
                      help="latent (latent grids + a small ReLU synthesis network, Cool-chic style), latent-kan (the same "
                           "grids with an order-1 KAN synthesis), kan, siren (COIN-style); "
                           "default auto: latent, or kan when the budget is under 256 bytes and a KAN fits it")
    _network_options(comp)
    comp.add_argument("--force", action="store_true", help="replace an existing output file")
    comp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    comp.set_defaults(func=cmd_compress)

    dec = sub.add_parser("decode", help="decode a .kimg file to PNG (bit-exact, on any machine)")
    dec.add_argument("file", type=Path)
    dec.add_argument("-o", "--out", type=output_file, help="output PNG (default: <file name>-decoded.png beside it)")
    dec.add_argument("--force", action="store_true", help="replace an existing output file")
    dec.set_defaults(func=cmd_decode)

    rd = sub.add_parser("rd", help="rate–distortion curves: networks against JPEG / WebP / AVIF, with BD metrics")
    rd.add_argument("images", type=Path, help="an image, or a folder of images (per-image and mean curves)")
    rd.add_argument("--models", type=comma_list(str, "--models", "latent,kan,siren"), default=None,
                    help="network codecs: latent (latent grids, compress's default), latent-kan (with a KAN synthesis), kan, "
                         "siren (COIN-style); default latent,kan,siren")
    rd.add_argument("--codecs", type=comma_list(str, "--codecs", "jpeg,webp,avif"), default=["jpeg", "webp", "avif"],
                    help="classic codecs: jpeg, webp, avif (default: all three)")
    rd.add_argument("--bpp", type=comma_list(float, "--bpp", DEFAULT_BPPS), default=[float(b) for b in DEFAULT_BPPS.split(",")],
                    help=f"target bit rates (default {DEFAULT_BPPS})")
    _network_options(rd)
    rd.add_argument("-o", "--out", type=Path, help="output folder (default: rd-<image or folder name>)")
    rd.add_argument("--force", action="store_true",
                    help="replace an existing output folder (its network points that this experiment asks for again are reused), "
                         "or discard the points of another experiment interrupted there")
    rd.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    rd.set_defaults(func=cmd_rd)


def cmd_compress(args: argparse.Namespace) -> int:
    from ..compress.api import compress_file
    from ..compress.neural import CompressConfig

    out = args.out or Path(f"{args.image.stem}.kimg")
    config = CompressConfig(model=args.model, progress=not args.quiet, **_network_config(args))
    r = compress_file(args.image, out, args.bpp, config, force=args.force)
    print(f"{out}: {r.bpp:.4f} bpp ({len(r.data):,} bytes; asked {args.bpp:g}), PSNR {r.psnr:.2f} dB decoded "
          f"(float {r.psnr_float:.2f}, quantised before fine-tuning {r.psnr_quantized_no_qat:.2f}), "
          f"{r.spec['name']} {r.params:,} numbers, {r.quant}")
    return 0


def cmd_decode(args: argparse.Namespace) -> int:
    from ..compress.api import decode_file

    out = args.out or args.file.with_name(f"{args.file.stem}-decoded.png")
    d = decode_file(args.file, out, force=args.force)
    print(f"{out}: {d.image.width}x{d.image.height}, {d.image.channels} channel(s), {d.image.bit_depth}-bit "
          f"({d.spec['name']}, {d.quant})")
    return 0


def cmd_rd(args: argparse.Namespace) -> int:
    from ..compress.rd import DEFAULT_MODELS, RDConfig
    from ..compress.report import rd_to_folder

    out = args.out or Path(f"rd-{args.images.stem or args.images.resolve().name}")
    config = RDConfig(models=args.models or list(DEFAULT_MODELS), codecs=args.codecs, bpps=args.bpp, neural=_network_config(args))
    try:
        summary = rd_to_folder(args.images, out, config, force=args.force, progress=not args.quiet,
                               command="kanimg " + " ".join(shlex.quote(a) for a in sys.argv[1:]))
    except KeyboardInterrupt:
        print("kanimg: interrupted; every finished network point is kept: run the same command again to continue",
              file=sys.stderr)
        return 130
    if not summary:  # another rank than 0 under torchrun: rank 0 reports
        return 0
    print(f"{out}: results.json, results.csv, results.md, rd.png")
    for name, entry in summary["codecs"].items():
        bd_text = "".join(f"; vs {key[6:]} BD-rate {bd['bd_rate_percent']:+.1f} %, BD-PSNR {bd['bd_psnr_db']:+.2f} dB"
                          for key, bd in entry.items() if key.startswith("bd_vs_")
                          and bd["bd_rate_percent"] is not None and bd["bd_psnr_db"] is not None)
        points = ", ".join(f"{b:.3f}/{p:.2f}" for b, p in zip(entry["results"]["bpp"], entry["results"]["psnr"]))
        print(f"  {name}: bpp/PSNR {points}{bd_text}")
    return 0
