"""BD-rate and BD-PSNR of one network codec against another, from separate ``kanimg rd`` runs.

``kanimg rd`` gives each network codec its BD against the classic codecs it ran beside. Two
network codecs measured apart (another day, one half of the images per process, some rates
later) are compared here on the images both have, per image and on the mean curve (the points
averaged rate by rate, as rd's mean curve is), with the BD functions rd uses:

    python benchmarks/bd_between.py --reference latent runs/rd-eval4-lr2 \\
        --test latent-kan runs/rd-eval4a-latent-kan-v7 runs/rd-eval4b-latent-kan-v7 \\
        --json benchmarks/results/bd_between.json

BD-rate is the test's extra bits for the same PSNR (negative: fewer), BD-PSNR its PSNR
difference at the same rate. Prints a Markdown table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from kanimg.compress.bd import bd_psnr, bd_rate
from kanimg.files import write_json


def curves(codec: str, folders: list[Path]) -> dict[str, list[tuple[float, float]]]:
    """Each image's (bpp, PSNR) points of ``codec`` in the rd folders, by rate."""
    out: dict[str, list[tuple[float, float]]] = {}
    for folder in folders:
        try:
            records = json.loads((folder / "results.json").read_text())["records"]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"{folder}: not the output folder of a kanimg rd run ({error})") from None
        for record in records:
            if record["codec"] == codec:
                out.setdefault(record["image"], []).append((record["bpp"], record["psnr"]))
    if not out:
        raise SystemExit(f"no {codec} points in {', '.join(map(str, folders))}")
    return {image: sorted(points) for image, points in out.items()}


def mean_curve(per_image: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    """The points averaged rate by rate over the images (the first n of each, n the fewest)."""
    count = min(len(points) for points in per_image)
    return [(float(np.mean([p[i][0] for p in per_image])), float(np.mean([p[i][1] for p in per_image]))) for i in range(count)]


def bd(reference: list[tuple[float, float]], test: list[tuple[float, float]]) -> dict[str, float | None]:
    args = ([p[0] for p in reference], [p[1] for p in reference], [p[0] for p in test], [p[1] for p in test])
    return {"bd_rate_percent": bd_rate(*args), "bd_psnr_db": bd_psnr(*args)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", nargs="+", required=True, metavar="CODEC_THEN_FOLDERS", help="codec name, then rd folders")
    parser.add_argument("--test", nargs="+", required=True, metavar="CODEC_THEN_FOLDERS", help="codec name, then rd folders")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/bd_between.json"))
    args = parser.parse_args(argv)
    if len(args.reference) < 2 or len(args.test) < 2:
        raise SystemExit("--reference and --test each take a codec name and at least one rd folder")
    reference = curves(args.reference[0], [Path(f) for f in args.reference[1:]])
    test = curves(args.test[0], [Path(f) for f in args.test[1:]])
    missing = sorted(set(test) - set(reference))
    if missing:
        raise SystemExit(f"the reference has no points for {', '.join(missing)}")
    images = sorted(test)
    rows = {image: {"reference": reference[image], "test": test[image], **bd(reference[image], test[image])} for image in images}
    mean_ref, mean_test = mean_curve([reference[i] for i in images]), mean_curve([test[i] for i in images])
    rows["mean curve"] = {"reference": mean_ref, "test": mean_test, **bd(mean_ref, mean_test)}
    print(f"{args.test[0]} against {args.reference[0]}\n\n| image | BD-rate | BD-PSNR |\n|---|---:|---:|")
    for name, row in rows.items():
        rate, psnr = row["bd_rate_percent"], row["bd_psnr_db"]
        print(f"| {name} | {'—' if rate is None else f'{rate:+.1f} %'} | {'—' if psnr is None else f'{psnr:+.2f} dB'} |")
    write_json(args.json, {"reference": args.reference, "test": args.test, "results": rows})
    print(f"\n→ {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
