"""``kanimg render``: a checkpoint evaluated at any resolution."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..device import DEVICES
from .types import output_file, size


def add(sub) -> None:
    ren = sub.add_parser("render", help="evaluate a checkpoint at any resolution")
    ren.add_argument("checkpoint", type=Path, help="a checkpoint, or the run folder kanimg fit wrote")
    ren.add_argument("--size", type=size, help="WIDTHxHEIGHT (default: the fitted image's size)")
    ren.add_argument("-o", "--out", type=output_file, help="output PNG (default: render-WxH.png in the run folder)")
    ren.add_argument("--force", action="store_true", help="replace an existing output file")
    ren.add_argument("--device", default="auto", choices=DEVICES)
    ren.set_defaults(func=cmd_render)


def cmd_render(args: argparse.Namespace) -> int:
    from ..checkpoints import best_model, load_checkpoint, run_folder_of
    from ..device import resolve_device
    from ..files import claimed_output_file
    from ..render import check_render_size
    from ..mapped import MAX_STREAM_PIXELS
    from ..streamed import render_png

    payload = load_checkpoint(args.checkpoint)
    image = payload["config"]["image"]
    width, height = args.size or (image["width"], image["height"])
    check_render_size(height, width, MAX_STREAM_PIXELS)
    folder = args.checkpoint if args.checkpoint.is_dir() else run_folder_of(args.checkpoint)
    if not folder.is_dir():  # a killed first run: only its staging folder holds anything yet
        folder = args.checkpoint.parent
    out = args.out or folder / f"render-{width}x{height}.png"
    with claimed_output_file(out, args.force, source=args.checkpoint):
        device = resolve_device(args.device)
        model = best_model(payload["trainer"], device)
        channels = render_png(model, height, width, payload["config"]["coords"], device, out, image["bit_depth"])
    print(f"{out}: {width}x{height}, {channels} channel(s), {image['bit_depth']}-bit")
    return 0
