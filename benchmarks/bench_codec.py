"""Compression experiments of docs/compression.md: rate–distortion curves and decode time.

1. Builds the 768×512 test photo from scikit-image's bundled ``motorcycle_left.png``
   (741×500 Middlebury stereo photograph, Lanczos-resized to 768 wide, centre rows
   cropped to 512) into the work folder — photos are never committed.
2. Runs ``kanimg rd`` (the same library call) on the bundled astronaut and on that photo.
3. Times ``kanimg decode`` of every network .kimg file of the photo (best of 3, CPU) and
   checks that every decode gives the same PNG bytes.
4. Entropy-coding ablation on every KAN file: the payload as written (range coder, spline
   differences where they pay), without differences, and zlib / bz2 / lzma on the same
   integers.
5. Prints a summary and writes benchmarks/results/bench_codec.json.

    python benchmarks/bench_codec.py                     # everything (hours on 2 CPU cores)
    python benchmarks/bench_codec.py --decode-only       # steps 3-5 on existing rd folders
    python benchmarks/bench_codec.py --ablation runs/bench-codec/rd-astronaut   # step 4 only, one rd folder
    python benchmarks/bench_codec.py --steps 500 --bpp 0.3,1.0   # a quick look

``--shapes`` instead compares KAN shapes at one size (what kanimg.compress.sizing is based
on): each is trained, quantised at the given bits, fine-tuned, coded and decoded:

    python benchmarks/bench_codec.py --shapes IMAGE --bits 7 "2,24,10,10,3:64,4,4,4" "2,12,12,12,12,3:96,4,4,4,4"
    python benchmarks/bench_codec.py --shapes IMAGE --lr 1e-3 "siren:2,11,11,11,11,11,11,11,11,11,11,3"
"""
from __future__ import annotations

import argparse
import copy
import io
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kanimg.compress import kimg
from kanimg.compress.bitstream import decode_image, decode_model, encode_model
from kanimg.compress.entropy import general_purpose_sizes
from kanimg.compress.quantize import QuantConfig, quantize_tensor
from kanimg.compress.tensors import stored_arrays
from kanimg.compress.rd import RDConfig
from kanimg.compress.report import rd_to_folder
from kanimg.files import write_json
from kanimg.io import default_image
from kanimg.results import machine, versions

RESULTS = Path(__file__).resolve().parent / "results"
PHOTO_SOURCE = "motorcycle_left.png"
PHOTO_SIZE = (768, 512)


def make_photo(folder: Path) -> Path:
    """The 768×512 test photo, built reproducibly from scikit-image's data folder."""
    import skimage

    path = folder / f"motorcycle-{PHOTO_SIZE[0]}x{PHOTO_SIZE[1]}.png"
    if path.exists():
        return path
    with Image.open(Path(skimage.data.__file__).parent / PHOTO_SOURCE) as im:
        im = im.convert("RGB")
        width = PHOTO_SIZE[0]
        height = round(im.height * width / im.width)
        im = im.resize((width, height), Image.LANCZOS)
        top = (height - PHOTO_SIZE[1]) // 2
        im.crop((0, top, width, top + PHOTO_SIZE[1])).save(path)
    return path


def time_decodes(folder: Path, repeats: int = 3) -> list[dict]:
    """Best-of-``repeats`` decode time of every .kimg in ``folder``; identical PNG bytes required."""
    rows = []
    for path in sorted(folder.glob("*.kimg")):
        data = path.read_bytes()
        seconds, pngs = [], set()
        for _ in range(repeats):
            started = time.perf_counter()
            decoded = decode_image(data)
            buffer = io.BytesIO()
            ints = decoded.integers
            Image.fromarray(ints[..., 0] if ints.shape[2] == 1 else ints).save(buffer, format="PNG")
            seconds.append(time.perf_counter() - started)
            pngs.add(buffer.getvalue())
        if len(pngs) != 1:
            raise SystemExit(f"{path}: decodes differ between runs")
        rows.append({"file": path.name, "bytes": len(data), "pixels": int(ints.shape[0] * ints.shape[1]),
                     "best_seconds": min(seconds), "median_seconds": statistics.median(seconds), "identical": True,
                     **float32_screening(data)})
    return rows


def float32_screening(data: bytes) -> dict:
    """How far the float32 evaluation is from float64 (in 8-bit levels), how many pixels the
    decoder re-evaluates in float64, and whether the screened result equals float64 rounding."""
    from kanimg.compress import bitstream
    from kanimg.io import quantize
    from kanimg.sampling import chunks

    decoded = decode_model(data)
    image = decoded.image
    fast_grid, exact_grid = bitstream.evaluators(decoded)  # the decoder's own evaluations (float32 coordinates rounded from float64)

    def whole(evaluate) -> np.ndarray:
        index = torch.arange(image.pixels)
        parts = chunks(image.pixels, bitstream.tile_pixels(decoded.model.spec))
        return torch.cat([evaluate(index[part], torch.float64) for part in parts]).numpy().reshape(image.height, image.width, -1)

    exact, fast = whole(exact_grid), whole(fast_grid)
    scaled = np.clip(fast, 0, 1) * 255
    near = (np.abs(scaled - np.floor(scaled) - 0.5) < bitstream.ROUNDING_GUARD).any(axis=2)
    return {"max_float32_error_levels": float(np.abs(fast - exact).max() * 255), "rescreened_fraction": float(near.mean()),
            "equals_float64_rounding": bool(np.array_equal(bitstream.render_integers(decoded), quantize(exact, 8)))}


def entropy_ablation(path: Path) -> dict:
    """Payload bytes of one KAN .kimg file under each entropy-coding variant."""
    data = path.read_bytes()
    decoded = decode_model(data)
    if decoded.quant.is_float16:
        return {}
    # each tensor at its own bit depth (the file's per-tensor allocation), as encode_model stores it
    granularity = decoded.quant.granularity
    ints = [quantize_tensor(a, QuantConfig(n, granularity)).ints for a, n in zip(stored_arrays(decoded.model), decoded.bits)]
    again = encode_model(decoded.model, decoded.image, decoded.quant, bits=decoded.bits)
    if again != data:
        raise SystemExit(f"{path}: re-encoding the decoded model does not reproduce the file")
    plain = encode_model(decoded.model, decoded.image, decoded.quant, bits=decoded.bits, max_transform=0)
    parsed = kimg.read(data)
    return {"file": path.name, "numbers": int(sum(i.size for i in ints)), "quant": decoded.describe(), "file_bytes": len(data),
            "header_bytes": len(data) - len(parsed.payload), "payload_range_coder": len(parsed.payload),
            "payload_range_coder_no_differences": len(kimg.read(plain).payload),
            "spline_transforms": [t.transform for t in parsed.tensors[1::2]],
            **{f"payload_{k}": v for k, v in general_purpose_sizes(ints).items()}}


def print_ablation(rows: list[dict]) -> None:
    print("\nentropy coding of the KAN files (payload bytes):")
    for row in rows:
        print(f"  {row['file']:40s} {row['quant']:18s} range coder {row['payload_range_coder']:6d}  without differences "
              f"{row['payload_range_coder_no_differences']:6d}  zlib {row['payload_zlib']:6d}  bz2 {row['payload_bz2']:6d}  "
              f"lzma {row['payload_lzma']:6d}  (header {row['header_bytes']} B, transforms {row['spline_transforms']})")


def compare_shapes(image_path: Path, shapes: list[str], bits: list[int], steps: int, lr: float) -> list[dict]:
    """Train each shape on the image — KAN "widths:grids", or SIREN "siren:widths" (float16,
    COIN) — then code it at each bit depth."""
    from kanimg.compress.tensors import parameter_count
    from kanimg.io import load_image
    from kanimg.models import build_model
    from kanimg.sampling import ImageTarget
    from kanimg.train import Trainer, TrainConfig

    image = load_image(image_path)
    target = ImageTarget(image.pixels)
    rows = []
    for shape in shapes:
        torch.manual_seed(0)
        if shape.startswith("siren:"):
            model = build_model("siren", widths=[int(v) for v in shape.split(":")[1].split(",")])
        else:
            widths, grids = ([int(v) for v in part.split(",")] for part in shape.split(":"))
            model = build_model("kan", widths=widths, grids=grids, directions=0)  # the .kimg format holds KANs on x and y
        trainer = Trainer(model, target, TrainConfig(steps=steps, lr=lr, batch_size=4096, eval_every=250), progress=False)
        started = time.perf_counter()
        trainer.train()
        model.load_state_dict(trainer.best_state)
        row = {"shape": shape, "numbers": parameter_count(model.spec), "psnr_float": trainer.best_psnr,
               "train_seconds": time.perf_counter() - started, "coded": {}}
        for n in ([16] if shape.startswith("siren:") else bits):
            row["coded"][n] = code_network(model, image, n)
            row["coded"][n]["bits_per_number"] = 8 * row["coded"][n]["bytes"] / row["numbers"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def code_network(model: torch.nn.Module, image, bits: int, qat_steps: int = 300) -> dict:
    """Code a copy of a trained network at ``bits`` through kanimg's own quantise → fine-tune →
    code step: file size, decoded PSNR, and the decoded PSNR before fine-tuning."""
    from kanimg.compress.kimg import ImageInfo
    from kanimg.compress.neural import CompressConfig, quantise_and_code
    from kanimg.metrics import psnr
    from kanimg.sampling import ImageTarget

    info = ImageInfo(image.height, image.width, image.channels, image.bit_depth)
    config = CompressConfig(model=model.spec["name"], bits=bits, qat_steps=qat_steps)
    data, _, before = quantise_and_code(copy.deepcopy(model), image, info, ImageTarget(image.pixels), float("inf"), bits, config)
    return {"bytes": len(data), "bpp": 8 * len(data) / (image.height * image.width),
            "psnr": psnr(image.pixels, decode_image(data).pixels), "psnr_before_finetuning": before}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=Path, metavar="IMAGE", help="compare the KAN shapes given as arguments on IMAGE")
    parser.add_argument("shape", nargs="*", help="with --shapes: widths:grids, e.g. 2,24,10,10,3:64,4,4,4")
    parser.add_argument("--bits", default="7", help="with --shapes: bit depths to code at (default 7)")
    parser.add_argument("--lr", type=float, default=2e-2, help="with --shapes: learning rate (default 2e-2)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-codec"), help="photos and rd folders (default runs/bench-codec)")
    parser.add_argument("--bpp", default="0.1,0.2,0.3,0.5,1.0")
    parser.add_argument("--steps", type=int, help="training steps of the networks (default: kanimg's)")
    parser.add_argument("--decode-only", action="store_true", help="only time decoding in existing rd folders")
    parser.add_argument("--ablation", type=Path, metavar="RD_FOLDER",
                        help="only the entropy-coding ablation of the KAN .kimg files in RD_FOLDER/kimg")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.ablation:
        rows = [entropy_ablation(p) for p in sorted((args.ablation / "kimg").glob("*-kan-*.kimg"))]
        print_ablation(rows)
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"bench_codec_ablation-{args.ablation.name}.json"
        write_json(out, {"folder": str(args.ablation), "entropy_ablation": rows, "machine": machine(), "versions": versions()})
        print(f"\n{out}")
        return
    if args.shapes:
        rows = compare_shapes(args.shapes, args.shape, [int(b) for b in args.bits.split(",")], args.steps or 3000, args.lr)
        RESULTS.mkdir(exist_ok=True)
        name = f"bench_codec_shapes-{args.shapes.stem}-lr{args.lr:g}.json"
        write_json(RESULTS / name, {"image": str(args.shapes), "steps": args.steps or 3000, "lr": args.lr, "rows": rows, "machine": machine()})
        return
    args.work.mkdir(parents=True, exist_ok=True)
    photo = make_photo(args.work)
    config = RDConfig(models=["kan", "siren"], codecs=["jpeg", "webp", "avif"], bpps=[float(b) for b in args.bpp.split(",")],
                      neural={"steps": args.steps} if args.steps else {})
    summaries = {}
    for image in (default_image(), photo):
        out = args.work / f"rd-{image.stem}"
        if not args.decode_only:
            shutil.rmtree(out / "points", ignore_errors=True)  # every point measured again, not reused from the last run
            summaries[image.stem] = rd_to_folder(image, out, config, force=True,
                                                 command=f"kanimg rd {image} --models kan,siren --codecs jpeg,webp,avif --bpp {args.bpp}"
                                                 + (f" --steps {args.steps}" if args.steps else "") + f" -o {out}")
        else:
            summaries[image.stem] = json.loads((out / "results.json").read_text())
    decode = time_decodes(args.work / f"rd-{photo.stem}" / "kimg")
    ablation = [entropy_ablation(p) for stem in summaries for p in sorted((args.work / f"rd-{stem}" / "kimg").glob("*-kan-*.kimg"))]
    for name, summary in summaries.items():
        print(f"\n{name}")
        for codec, entry in summary["codecs"].items():
            bd = entry.get("bd_vs_jpeg") or {}
            points = "  ".join(f"{b:.3f}/{p:.2f}" for b, p in zip(entry["results"]["bpp"], entry["results"]["psnr"]))
            print(f"  {codec:6s} BD-rate {bd.get('bd_rate_percent')}  BD-PSNR {bd.get('bd_psnr_db')}  {points}")
    print(f"\ndecode of {photo.name} files ({args.threads} threads):")
    for row in decode:
        print(f"  {row['file']:40s} {row['bytes']:7d} B  best {row['best_seconds']:.2f} s  median {row['median_seconds']:.2f} s  "
              f"float32 error ≤ {row['max_float32_error_levels']:.1e} levels, {100 * row['rescreened_fraction']:.1f} % re-evaluated, "
              f"equals float64 rounding: {row['equals_float64_rounding']}")
    print_ablation(ablation)
    RESULTS.mkdir(exist_ok=True)
    write_json(RESULTS / "bench_codec.json", {
        "summaries": {k: {c: {kk: v[kk] for kk in ("results", "at_target", "bd_vs_jpeg") if kk in v} for c, v in s["codecs"].items()}
                      for k, s in summaries.items()},
        "decode": decode, "entropy_ablation": ablation, "threads": args.threads, "machine": machine(), "versions": versions(),
    })
    print(f"\n{RESULTS / 'bench_codec.json'}")


if __name__ == "__main__":
    main()
