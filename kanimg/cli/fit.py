"""``kanimg fit``: fit one image and write its run folder."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..device import DEVICES
from .types import execution_flags, grid_schedule, int_list

MODEL_OPTIONS = ("widths", "grids", "grid_kind", "levels", "directions", "omega0", "scale", "num_features")
TRAIN_OPTIONS = ("steps", "lr", "lr_steps", "batch_size", "schedule", "grid_update_every", "grid_update_until", "grid_schedule", "eval_every",
                 "seed", "precision", "compile")


def add(sub) -> None:
    from ..models import model_names

    fit = sub.add_parser("fit", help="fit one image and export reconstruction, metrics, checkpoint, plots")
    fit.add_argument("image", nargs="?", help="image file (default: the bundled photograph)")
    m = fit.add_argument_group("model")
    m.add_argument("--model", choices=model_names(), metavar="NAME",
                   help=f"model family {', '.join(model_names(False))} (default: kan), or one of the KAN paper's "
                        f"presets {', '.join(n for n in model_names() if n not in model_names(False))}")
    m.add_argument("--widths", type=int_list("--widths"), help="layer widths from 2 (x, y) to the channel count, e.g. 2,64,64,3")
    m.add_argument("--grids", type=int_list("--grids"), help="KAN: grid intervals per layer, e.g. 64,10,10")
    m.add_argument("--levels", type=int, help="kan, hashgrid: levels of the hash encoding (default 16; kan: 0 = the coordinates)")
    m.add_argument("--directions", type=int, help="KAN on the coordinates (--levels 0): the first layer sees (x, y) along K evenly spaced directions (kan-ridge: 8)")
    m.add_argument("--grid-kind", choices=["uniform", "percentile"], help="KAN: where grid updates put the knots (default: percentile)")
    m.add_argument("--omega0", type=float, help="SIREN: frequency factor ω0 (default 90)")
    m.add_argument("--scale", type=float, help="RFF: standard deviation of the Fourier frequencies (default 15)")
    m.add_argument("--features", dest="num_features", type=int, help="RFF: number of Fourier frequencies (default 256)")
    t = fit.add_argument_group("training (defaults depend on the model family)")
    t.add_argument("--steps", type=int, help="optimisation steps (default 2000 up to 256×256 pixels, then 2000·√(pixels/65,536), at most 20,000)")
    t.add_argument("--lr", type=float, help="initial learning rate (of a run up to --lr-steps long)")
    t.add_argument("--lr-steps", type=int, help="the run length --lr is for: a longer run of S steps starts at lr·√(lr-steps/S); "
                                               "under a time budget (compare --budget-seconds) S from the pace so far "
                                               "(default: the family's, e.g. kan 2400; 0 = lr at any length)")
    t.add_argument("--batch-size", type=int, help="pixels per step; 0 = whole image")
    t.add_argument("--schedule", choices=["cosine", "constant", "staged"], help="LR schedule; staged = the paper's 3 stages lr, lr/10, lr/100")
    t.add_argument("--grid-update-every", type=int, help="KAN: refit grids every N steps …")
    t.add_argument("--grid-update-until", type=int, help="… during the first M steps of each stage")
    t.add_argument("--grid-schedule", type=grid_schedule, help="KAN: extend grids at steps, e.g. '1000:20,10,10;3000:50,10,10'")
    t.add_argument("--eval-every", type=int, help="full-image evaluation period in steps (best weights are kept)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    execution_flags(t)
    o = fit.add_argument_group("data and output")
    o.add_argument("--grey", action="store_true", help="fit the luminance only")
    o.add_argument("--coords", choices=["centers", "linspace"], help="pixel coordinates: pixel centres (default) or the paper's linspace(-1, 1, N)")
    o.add_argument("--device", default="auto", choices=DEVICES)
    o.add_argument("-o", "--out", type=Path, help="run folder (default: runs/<image>-<model>)")
    o.add_argument("--force", action="store_true", help="replace an existing run folder")
    o.add_argument("--resume", nargs="?", const=True, type=Path, metavar="CHECKPOINT",
                   help="continue a run: alone, from the latest checkpoint of the -o folder (also after a crash or kill -9); "
                        "or from this checkpoint or run folder. Only --steps (to extend it), --eval-every and --compile may change")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)


def cmd_fit(args: argparse.Namespace) -> int:
    from ..fitting import default_run_folder, fit

    options = {key: getattr(args, key) for key in MODEL_OPTIONS + TRAIN_OPTIONS}
    out = args.out if args.out is not None or args.resume not in (None, True) else default_run_folder(args.image, args.model)
    result = fit(args.image, args.model, out=out, resume=args.resume, force=args.force, device=args.device, grey=args.grey,
                 coords=args.coords, progress=not args.quiet, **options)
    if result.out is None:  # another rank than 0 under torchrun: rank 0 reports
        return 130 if result.interrupted else 0
    m = result.metrics
    lp = f"{m['lpips']:.4f}" if m["lpips"] is not None else "n/a"
    t = result.trainer
    print(f"{result.out}: PSNR {m['psnr']:.2f} dB (PNG {m['psnr_png']:.2f}), SSIM {m['ssim']:.4f}, LPIPS {lp}, "
          f"{result.params:,} params, {t.step} steps in {t.train_seconds:.1f} s on {t.device}")
    if result.interrupted:
        print(f"kanimg: interrupted at step {t.step}; results so far are in {result.out}. "
              f"Resume with: kanimg fit -o {shlex.quote(str(result.out))} --resume", file=sys.stderr)
        return 130
    return 0
