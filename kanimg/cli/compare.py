"""``kanimg compare``: several models on the same image(s), one protocol, a gallery."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import distributed
from ..device import DEVICES
from .types import execution_flags, int_list


def add(sub) -> None:
    from ..comparison import PRESETS

    cmp = sub.add_parser("compare", help="fit several models on the same image(s) and build a gallery")
    cmp.add_argument("path", type=Path, help="an image, or a folder of images (per-image and mean results)")
    cmp.add_argument("--models", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                     help="comma-separated model names, e.g. kan2,siren1,siren2,mlp1,mlp2,rff1-s3,rff2-s30 (default: kan,hashgrid,siren,rff,mlp)")
    protocol = cmp.add_mutually_exclusive_group()
    protocol.add_argument("--preset", choices=sorted(PRESETS), help="a fixed table: paper = the KAN paper's models and exact recipe")
    protocol.add_argument("--budget-seconds", type=float, help="equal wall-clock: this many seconds of training per model")
    protocol.add_argument("--match-params", type=int, help="equal parameter count: hidden widths solved per family")
    cmp.add_argument("--steps", type=int, help="training steps per model (default 2000; with --preset, overrides its length)")
    cmp.add_argument("--crop", type=int_list("--crop", "96,64,48,48"), metavar="X,Y,W,H", help="add a zoomed crop of this region to the gallery")
    cmp.add_argument("--seed", type=int, default=0, help="seed of every model's initialisation and pixel sampling (default 0)")
    cmp.add_argument("--device", default="auto", choices=DEVICES)
    execution_flags(cmp)
    cmp.add_argument("-o", "--out", type=Path, default=Path("runs/compare"),
                     help="output folder (default: runs/compare); the same command again continues it, reusing finished runs")
    cmp.add_argument("--force", action="store_true", help="write into a folder that holds another comparison (its runs with today's settings are reused, "
                     "the others fitted anew in their place)")
    cmp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=cmd_compare)


def cmd_compare(args: argparse.Namespace) -> int:
    from ..comparison import compare
    from ..results import record_table

    result = compare(args.path, args.models, args.out, steps=args.steps, budget_seconds=args.budget_seconds,
                     match_params=args.match_params, preset=args.preset, device=args.device, force=args.force, seed=args.seed,
                     precision=args.precision, compile=bool(args.compile),
                     crop=tuple(args.crop) if args.crop else None, progress=not args.quiet)
    if not distributed.world().is_main:
        return 130 if result.interrupted else 0  # rank 0 reports
    if result.interrupted:
        print("kanimg: interrupted; run the same command again to continue (finished models are skipped)", file=sys.stderr)
        return 130
    print(record_table(result.records))
    print(f"\n{args.out / 'index.html'}, {args.out / 'results.json'}, gallery-*.png in {args.out}")
    return 0
