"""BD-rate and BD-PSNR of one network codec against another, from separate ``kanimg rd`` runs.

``kanimg rd`` gives each network codec its BD against the classic codecs it ran beside. Two
network codecs measured apart (another day, one half of the images per process, some rates
later) are compared here on the images both have, per image and on the mean curve, with rd's
own mean curve and BD functions:

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

from kanimg.compress.codecs import Point
from kanimg.compress.rd import bd_against, mean_curve
from kanimg.files import write_json

MEASURED = ("bpp", "psnr", "bytes", "setting", "encode_seconds", "decode_seconds")  # a results.json record's Point fields


def curves(codec: str, folders: list[Path]) -> dict[str, list[Point]]:
    """Each image's points of ``codec`` in the rd folders, by rate."""
    out: dict[str, list[Point]] = {}
    for folder in folders:
        try:
            records = json.loads((folder / "results.json").read_text())["records"]
        except (OSError, ValueError, KeyError) as error:
            raise SystemExit(f"{folder}: not the output folder of a kanimg rd run ({error})") from None
        for record in records:
            if record["codec"] == codec:
                out.setdefault(record["image"], []).append(Point(*(record[key] for key in MEASURED)))
    if not out:
        raise SystemExit(f"no {codec} points in {', '.join(map(str, folders))}")
    return {image: sorted(points, key=lambda point: point.bpp) for image, points in out.items()}


def as_results(points: list[Point]) -> dict[str, list[float]]:
    return {"bpp": [p.bpp for p in points], "psnr": [p.psnr for p in points]}


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
    pairs = {image: (as_results(reference[image]), as_results(test[image])) for image in images}
    pairs["mean curve"] = tuple(dict(zip(("bpp", "psnr"), mean_curve([curve[i] for i in images]))) for curve in (reference, test))
    rows = {name: {"reference": ref, "test": tested, **bd_against(ref, tested)} for name, (ref, tested) in pairs.items()}
    print(f"{args.test[0]} against {args.reference[0]}\n\n| image | BD-rate | BD-PSNR |\n|---|---:|---:|")
    for name, row in rows.items():
        rate, psnr = row["bd_rate_percent"], row["bd_psnr_db"]
        print(f"| {name} | {'—' if rate is None else f'{rate:+.1f} %'} | {'—' if psnr is None else f'{psnr:+.2f} dB'} |")
    write_json(args.json, {"reference": args.reference, "test": args.test, "results": rows})
    print(f"\n→ {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
