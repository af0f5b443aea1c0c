"""Where a colour file's error lies: along the grey axis (luma) or across it (chroma), for the
latent codec's files of an ``kanimg rd`` run and for WebP and AVIF at about the same size.

Issue 15 asks for a decorrelating colour transform with per-channel capacity, the thing every
classic codec does. This measures whether colour is where the latent codec loses: the RGB
error of each pixel splits exactly into its part along (1, 1, 1)/√3 and its part in the plane
across it (the two add up to the RGB mean squared error; both are given per channel, as MSE
is, on [0, 1] values). WebP and AVIF are encoded at every quality and the one nearest the
file's size is kept (quality 1 … 100; its bpp is printed beside it).

    kanimg rd runs/eval4 --models latent --codecs jpeg,webp,avif --bpp 0.1,0.2,0.3,0.5 -o runs/rd-eval4
    python benchmarks/colour_error.py runs/rd-eval4

Prints a Markdown table and writes JSON (default: benchmarks/results/colour_error.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from kanimg.compress.bitstream import decode_image
from kanimg.compress.codecs import get_codec
from kanimg.files import write_json
from kanimg.io import load_image
from kanimg.results import machine, versions

GREY = np.ones(3) / np.sqrt(3)
SIZE_TOLERANCE = 0.05  # a classic file further than this from the latent file's size is not compared


def split_error(decoded: np.ndarray, original: np.ndarray) -> tuple[float, float]:
    """(luma, chroma) parts of the RGB mean squared error: along the grey axis and across it."""
    error = (np.asarray(decoded, np.float64) - original).reshape(-1, 3)
    along = (error @ GREY) ** 2
    return float(along.mean() / 3), float(((error**2).sum(1) - along).mean() / 3)


def classic_files(name: str, image) -> list[tuple[float, bytes]]:
    """(bpp, bytes) of the codec's file at every quality 1 … 100: made once per image, since
    every latent file of the image is matched against the same files."""
    codec = get_codec(name)
    return [(8 * len(data) / (image.height * image.width), data) for data in (codec.encode(image, q) for q in range(1, 101))]


def nearest_classic(name: str, files: list[tuple[float, bytes]], image, bpp: float) -> tuple[float, np.ndarray]:
    """(bpp, decoded pixels in [0, 1]) of the file among ``files`` whose size is nearest ``bpp``
    (the lowest quality where two are as near)."""
    size, data = min(files, key=lambda file: abs(file[0] - bpp))
    ints, depth = get_codec(name).decode(data, image)
    return size, ints / (2**depth - 1)


def comparable(row: dict, name: str) -> bool:
    """Whether codec ``name``'s file in ``row`` is within SIZE_TOLERANCE of the latent file's size."""
    return name == "latent" or abs(row["codecs"][name]["bpp"] / row["codecs"]["latent"]["bpp"] - 1) <= SIZE_TOLERANCE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rd_folder", type=Path, help="the output folder of a kanimg rd run with the latent model")
    parser.add_argument("--json", type=Path, help="results JSON (default: benchmarks/results/colour_error.json)")
    args = parser.parse_args(argv)
    try:
        results = json.loads((args.rd_folder / "results.json").read_text())
    except (OSError, ValueError) as error:
        raise SystemExit(f"{args.rd_folder}: not the output folder of a kanimg rd run ({error})") from None
    records = []
    for info in results["images"]:
        if info["channels"] != 3:
            continue
        image = load_image(info["path"])
        classic = {name: classic_files(name, image) for name in ("webp", "avif")}
        for path in sorted((args.rd_folder / "kimg").glob(f"{info['name']}-latent-*bpp.kimg")):
            data = path.read_bytes()
            bpp = 8 * len(data) / (image.height * image.width)
            row = {"image": info["name"], "file": path.name, "codecs": {}}
            row["codecs"]["latent"] = {"bpp": bpp, **dict(zip(("luma", "chroma"), split_error(decode_image(data).pixels, image.pixels)))}
            for name in ("webp", "avif"):
                size, pixels = nearest_classic(name, classic[name], image, bpp)
                row["codecs"][name] = {"bpp": size, **dict(zip(("luma", "chroma"), split_error(pixels, image.pixels)))}
            records.append(row)
            parts = "  ".join(f"{k} {v['bpp']:.3f} bpp luma {v['luma']:.2e} chroma {v['chroma']:.2e}" for k, v in row["codecs"].items())
            print(f"{path.name}: {parts}", file=sys.stderr, flush=True)
    if not records:
        raise SystemExit(f"{args.rd_folder}: no latent files of colour images")
    lines = ["| file | bpp: latent / WebP / AVIF | luma MSE: latent / WebP / AVIF | chroma MSE: latent / WebP / AVIF | chroma share: latent / WebP / AVIF |",
             "|---|---|---|---|---|"]
    for row in records:
        c = row["codecs"]

        def cells(value) -> str:
            return " / ".join(value(c[k]) if comparable(row, k) else "—" for k in ("latent", "webp", "avif"))

        lines.append(f"| {row['file']} | " + " / ".join(f"{c[k]['bpp']:.3f}" for k in ("latent", "webp", "avif")) + " | "
                     + cells(lambda v: f"{v['luma']:.2e}") + " | " + cells(lambda v: f"{v['chroma']:.2e}") + " | "
                     + cells(lambda v: f"{v['chroma'] / (v['luma'] + v['chroma']):.2f}") + " |")
    ratios = {}
    for name in ("webp", "avif"):
        close = [r for r in records if comparable(r, name)]
        for part in ("luma", "chroma"):
            ratios[f"{part} latent / {name}"] = statistics.mean(r["codecs"]["latent"][part] / r["codecs"][name][part] for r in close) if close else None
        ratios[f"files within {SIZE_TOLERANCE:.0%} of {name}'s size"] = len(close)
    lines.append("")
    lines.append(f"Mean ratio of the latent file's MSE to the classic file's (files within {SIZE_TOLERANCE:.0%} of its size, — elsewhere): "
                 + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in ratios.items()))
    print("\n".join(lines))
    out = args.json or Path(__file__).resolve().parent / "results" / "colour_error.json"
    write_json(out, {"rd_folder": str(args.rd_folder), "records": records, "mean_ratios": ratios, "table": lines,
                     "command": "python benchmarks/colour_error.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                     "machine": machine(), "versions": versions()})
    print(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
