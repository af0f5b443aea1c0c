"""Command line: one subcommand per verb; each only parses and calls the library.

Errors the user can fix are one line on stderr and exit status 2; Ctrl-C exits 130 after
saving what a run has so far.
"""
from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import __version__
from .errors import KanimgError


def comma_list(kind: Callable, flag: str, example: str) -> Callable[[str], list]:
    """argparse type for comma-separated values of ``kind``, e.g. --widths 2,64,64,1."""

    def parse(text: str) -> list:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes a comma-separated list, e.g. {example}; got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError(f"{flag} is empty")
        return values

    return parse


def int_list(flag: str) -> Callable[[str], list[int]]:
    """argparse type for comma-separated integers, e.g. --widths 2,64,64,1."""
    return comma_list(int, flag, "2,64,64,1")


def grid_schedule(text: str) -> list:
    """--grid-schedule '1000:20,10;3000:50,10' → [[1000, [20, 10]], [3000, [50, 10]]]."""
    entries = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        step, _, grids = part.partition(":")
        try:
            entries.append([int(step), [int(g) for g in grids.split(",")]])
        except ValueError:
            raise argparse.ArgumentTypeError(f"--grid-schedule takes STEP:G1,G2,…;STEP:… e.g. 1000:20,10; got {text!r}") from None
    return entries


def size(text: str) -> tuple[int, int]:
    """'1024x768' → (width, height)."""
    w, sep, h = text.lower().partition("x")
    try:
        width, height = int(w), int(h)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size takes WIDTHxHEIGHT, e.g. 1024x1024; got {text!r}") from None
    if not sep or width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"--size takes positive WIDTHxHEIGHT; got {text!r}")
    return width, height


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as KanimgError-style single lines (exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"kanimg: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from .compare import PRESETS
    from .models import model_names

    parser = _Parser(prog="kanimg", description="Fit images with deep Kolmogorov–Arnold Networks and compare them with SIREN, RFF and MLP.")
    parser.add_argument("--version", action="version", version=f"kanimg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    fit = sub.add_parser("fit", help="fit one image and export reconstruction, metrics, checkpoint, plots")
    fit.add_argument("image", nargs="?", help="image file (default: the bundled photograph)")
    m = fit.add_argument_group("model")
    m.add_argument("--model", choices=model_names(), metavar="NAME",
                   help=f"model family {', '.join(model_names(False))} (default: kan), or one of the KAN paper's "
                        f"presets {', '.join(n for n in model_names() if n not in model_names(False))}")
    m.add_argument("--widths", type=int_list("--widths"), help="layer widths from 2 (x, y) to the channel count, e.g. 2,64,64,3")
    m.add_argument("--grids", type=int_list("--grids"), help="KAN: grid intervals per layer, e.g. 64,10,10")
    m.add_argument("--directions", type=int, help="KAN: the first layer sees (x, y) along K evenly spaced directions (default 8; 0 = x and y alone)")
    m.add_argument("--grid-kind", choices=["uniform", "percentile"], help="KAN: where grid updates put the knots (default: percentile)")
    m.add_argument("--omega0", type=float, help="SIREN: frequency factor ω0 (default 30)")
    m.add_argument("--scale", type=float, help="RFF: standard deviation of the Fourier frequencies (default 20)")
    m.add_argument("--features", dest="num_features", type=int, help="RFF: number of Fourier frequencies (default 256)")
    t = fit.add_argument_group("training (defaults depend on the model family)")
    t.add_argument("--steps", type=int, help="optimisation steps (default 2000 up to 256×256 pixels, then 2000·√(pixels/65,536), at most 20,000)")
    t.add_argument("--lr", type=float, help="initial learning rate")
    t.add_argument("--batch-size", type=int, help="pixels per step; 0 = whole image")
    t.add_argument("--schedule", choices=["cosine", "constant", "staged"], help="LR schedule; staged = the paper's 3 stages lr, lr/10, lr/100")
    t.add_argument("--grid-update-every", type=int, help="KAN: refit grids every N steps …")
    t.add_argument("--grid-update-until", type=int, help="… during the first M steps of each stage")
    t.add_argument("--grid-schedule", type=grid_schedule, help="KAN: extend grids at steps, e.g. '1000:20,10,10;3000:50,10,10'")
    t.add_argument("--eval-every", type=int, help="full-image evaluation period in steps (best weights are kept)")
    t.add_argument("--seed", type=int, help="random seed (default 0)")
    _execution_flags(t)
    o = fit.add_argument_group("data and output")
    o.add_argument("--grey", action="store_true", help="fit the luminance only")
    o.add_argument("--coords", choices=["centers", "linspace"], help="pixel coordinates: pixel centres (default) or the paper's linspace(-1, 1, N)")
    o.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    o.add_argument("-o", "--out", type=Path, help="run folder (default: runs/<image>-<model>)")
    o.add_argument("--force", action="store_true", help="replace an existing run folder")
    o.add_argument("--resume", nargs="?", const=True, type=Path, metavar="CHECKPOINT",
                   help="continue a run: alone, from the latest checkpoint of the -o folder (also after a crash or kill -9); "
                        "or from this checkpoint or run folder. Only --steps (to extend it), --eval-every and --compile may change")
    o.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    fit.set_defaults(func=cmd_fit)

    ren = sub.add_parser("render", help="evaluate a checkpoint at any resolution")
    ren.add_argument("checkpoint", type=Path)
    ren.add_argument("--size", type=size, help="WIDTHxHEIGHT (default: the fitted image's size)")
    ren.add_argument("-o", "--out", type=Path, help="output PNG (default: render-WxH.png beside the checkpoint)")
    ren.add_argument("--force", action="store_true", help="replace an existing output file")
    ren.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ren.set_defaults(func=cmd_render)
    from .compress.cli import add_commands
    add_commands(sub)

    cmp = sub.add_parser("compare", help="fit several models on the same image(s) and build a gallery")
    cmp.add_argument("path", type=Path, help="an image, or a folder of images (per-image and mean results)")
    cmp.add_argument("--models", type=lambda t: [m.strip() for m in t.split(",") if m.strip()],
                     help="comma-separated model names, e.g. kan2,siren1,siren2,mlp1,mlp2,rff1-s3,rff2-s30 (default: kan,hashgrid,siren,rff,mlp)")
    protocol = cmp.add_mutually_exclusive_group()
    protocol.add_argument("--preset", choices=sorted(PRESETS), help="a fixed table: paper = the KAN paper's models and exact recipe")
    protocol.add_argument("--budget-seconds", type=float, help="equal wall-clock: this many seconds of training per model")
    protocol.add_argument("--match-params", type=int, help="equal parameter count: hidden widths solved per family")
    cmp.add_argument("--steps", type=int, help="training steps per model (default 2000; with --preset, overrides its length)")
    cmp.add_argument("--crop", type=int_list("--crop"), metavar="X,Y,W,H", help="add a zoomed crop of this region to the gallery")
    cmp.add_argument("--seed", type=int, default=0, help="seed of every model's initialisation and pixel sampling (default 0)")
    cmp.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    _execution_flags(cmp)
    cmp.add_argument("-o", "--out", type=Path, default=Path("runs/compare"),
                     help="output folder (default: runs/compare); the same command again continues it, reusing finished runs")
    cmp.add_argument("--force", action="store_true", help="write into a folder that holds another comparison (its runs are kept and reused)")
    cmp.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    cmp.set_defaults(func=cmd_compare)
    return parser


def _execution_flags(group) -> None:
    from .train import PRECISIONS

    group.add_argument("--precision", choices=PRECISIONS,
                       help="training steps in fp32 (default), tf32 (TensorFloat-32 matmuls on CUDA) or bf16 (autocast)")
    group.add_argument("--compile", action="store_true", default=None, help="train through torch.compile (compiles once, outside the clock)")


def cmd_fit(args: argparse.Namespace) -> int:
    from .fit import fit_image

    spec = {"widths": args.widths, "grids": args.grids, "grid_kind": args.grid_kind, "directions": args.directions, "omega0": args.omega0,
            "scale": args.scale, "num_features": args.num_features}
    train = {"steps": args.steps, "lr": args.lr, "batch_size": args.batch_size, "schedule": args.schedule,
             "grid_update_every": args.grid_update_every, "grid_update_until": args.grid_update_until,
             "grid_schedule": args.grid_schedule, "eval_every": args.eval_every, "seed": args.seed, "precision": args.precision,
             "compile": args.compile}
    result = fit_image(args.image, model=args.model, spec=spec, train=train, out=args.out, force=args.force,
                       resume=args.resume, device=args.device, grey=args.grey, coords=args.coords, progress=not args.quiet)
    m = result.metrics
    lp = f"{m['metrics']['lpips']:.4f}" if m["metrics"]["lpips"] is not None else "n/a"
    print(f"{result.out}: PSNR {m['metrics']['psnr']:.2f} dB (PNG {m['metrics']['psnr_png']:.2f}), SSIM {m['metrics']['ssim']:.4f}, "
          f"LPIPS {lp}, {m['params']:,} params, {m['steps_done']} steps in {m['train_seconds']:.1f} s on {m['device']}")
    if result.interrupted:
        print(f"kanimg: interrupted at step {m['steps_done']}; results so far are in {result.out}. "
              f"Resume with: kanimg fit -o {shlex.quote(str(result.out))} --resume", file=sys.stderr)
        return 130
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    from .export import load_checkpoint
    from .files import check_writable
    from .fit import best_model, resolve_device
    from .io import MAX_PIXELS, save_png
    from .render import render

    payload = load_checkpoint(args.checkpoint)
    image = payload["config"]["image"]
    width, height = args.size or (image["width"], image["height"])
    if width * height > MAX_PIXELS:
        raise KanimgError(f"--size {width}x{height} is {width * height / 1e6:.0f} megapixels, over the limit of {MAX_PIXELS / 1e6:.0f}")
    out = args.out or args.checkpoint.parent / f"render-{width}x{height}.png"
    if out.is_dir():
        raise KanimgError(f"{out} is a folder; give a file name with -o")
    if out.exists() and not args.force:
        raise KanimgError(f"{out} already exists; pass --force to overwrite it")
    check_writable(out.parent)
    device = resolve_device(args.device)
    model = best_model(payload["trainer"], device)
    pixels = render(model, height, width, payload["config"]["coords"], device)
    save_png(out, pixels, image["bit_depth"])
    print(f"{out}: {width}x{height}, {pixels.shape[2]} channel(s), {image['bit_depth']}-bit")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .compare import compare
    from .gallery import markdown_table

    if args.crop is not None and (len(args.crop) != 4 or min(args.crop) < 0 or min(args.crop[2:]) < 1):
        raise KanimgError("--crop takes X,Y,WIDTH,HEIGHT with a positive size, e.g. 96,64,48,48")
    result = compare(args.path, args.models, args.out, steps=args.steps, budget_seconds=args.budget_seconds,
                     match_params=args.match_params, preset=args.preset, device=args.device, force=args.force, seed=args.seed,
                     precision=args.precision, compile=bool(args.compile),
                     crop=tuple(args.crop) if args.crop else None, progress=not args.quiet)
    if result.interrupted:
        print("kanimg: interrupted; run the same command again to continue (finished models are skipped)", file=sys.stderr)
        return 130
    print(markdown_table(result.records))
    print(f"\n{args.out / 'index.html'}, {args.out / 'results.json'}, gallery-*.png in {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors (already printed as one line), --help, --version
        return int(exc.code or 0)
    _setup_logging(quiet=getattr(args, "quiet", False))
    previous = _on_sigterm(_raise_interrupt)  # `kill` saves like Ctrl-C
    try:
        return args.func(args)
    except KanimgError as exc:
        print(f"kanimg: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kanimg: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, torch.OutOfMemoryError):
        print("kanimg: error: out of memory; try a smaller --batch-size or model", file=sys.stderr)
        return 2
    except OSError as exc:  # a disk that filled up or a folder that became read-only mid-run
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"kanimg: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    finally:
        _on_sigterm(previous)


def _setup_logging(quiet: bool) -> None:
    """kanimg's own log lines (e.g. the one-time kernel build) on stderr, nothing from others."""
    log = logging.getLogger("kanimg")
    log.setLevel(logging.WARNING if quiet else logging.INFO)
    if not any(getattr(h, "kanimg_cli", False) for h in log.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("kanimg: %(message)s"))
        handler.kanimg_cli = True
        log.addHandler(handler)


def _on_sigterm(handler):
    """Install a SIGTERM handler where possible (main thread only); returns the previous one."""
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    raise SystemExit(main())
