"""Images too large to hold as floats: mapped reads equal decoded ones, streamed targets equal
in-memory ones, streamed outputs and scores equal whole-image ones, and a streamed fit's
memory does not grow with the image."""
import json
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path
from unittest import mock

import numpy as np
import png
import pytest
import tifffile
import torch
from PIL import Image

from conftest import photo_crop
import kanimg
from kanimg import mapped
from kanimg.errors import KanimgError
from kanimg.io import _orient, load_image, save_png_rows
from kanimg.metrics import reconstruction_metrics
from kanimg.models import build_model
from kanimg.plots import error_map
from kanimg.render import render, render_bands
from kanimg.sampling import ImageTarget, MappedTarget

RNG = np.random.default_rng(0)
RGB8 = photo_crop(40)[:29]  # 29 × 40, rows ≠ columns
SMALL = {"widths": [2, 8, 3], "grids": [8, 4]}


def _files(folder: Path) -> dict[str, Path]:
    """The layouts a mapped image is read from, each as its own file."""
    out = {name: folder / name for name in ("plain.tif", "multi-strip.tif", "big16-grey.tif", "rgb.png", "rgba16.png",
                                            "palette-trns.png", "grey1bit.png")}
    tifffile.imwrite(out["plain.tif"], RGB8)
    tifffile.imwrite(out["multi-strip.tif"], RGB8, rowsperstrip=4)
    tifffile.imwrite(out["big16-grey.tif"], RNG.integers(0, 65536, (29, 40), dtype=np.uint16), bigtiff=True)
    Image.fromarray(RGB8).save(out["rgb.png"])
    rgba16 = RNG.integers(0, 65536, (29, 40, 4), dtype=np.uint16)
    png.Writer(40, 29, greyscale=False, alpha=True, bitdepth=16).write(open(out["rgba16.png"], "wb"), rgba16.reshape(29, -1))
    palette = Image.fromarray(RGB8).convert("P")
    palette.info["transparency"] = 0
    palette.save(out["palette-trns.png"], transparency=0)
    Image.fromarray(RGB8[..., 0] > 128).save(out["grey1bit.png"])
    return out


@pytest.mark.parametrize("grey", [False, True])
def test_mapped_reads_equal_decoded_pixels(tmp_path, grey):
    for name, path in _files(tmp_path).items():
        decoded, image = load_image(path, grey=grey), mapped.open_mapped(path, grey=grey)
        assert (image.mode, image.bit_depth, image.channels, image.height, image.width) == \
            (decoded.mode, decoded.bit_depth, decoded.channels, decoded.height, decoded.width), name
        assert np.array_equal(image.rows(0, image.height), decoded.pixels), name
        assert np.array_equal(image.rows(5, 9), decoded.pixels[5:9]), name
        index = RNG.integers(0, image.height * image.width, 50)
        assert np.array_equal(image.take(index), decoded.pixels.reshape(-1, decoded.channels)[index]), name
    assert isinstance(mapped.open_mapped(tmp_path / "plain.tif").samples, np.memmap)  # mapped in place, not copied


@pytest.mark.parametrize("compression", [None])
def test_tiff_orientation_is_applied_once(tmp_path, compression):
    """Pillow applies a TIFF's orientation tag itself; load_image must not apply it again, and the
    mapped reader (which reads the stored samples) must apply it."""
    for orientation in range(1, 9):
        path = tmp_path / f"o{orientation}.tif"
        tifffile.imwrite(path, RGB8, compression=compression, extratags=[(274, 3, 1, orientation, False)])
        expected = _orient(RGB8, orientation).astype(np.float32) / 255
        image = mapped.open_mapped(path)
        assert np.array_equal(load_image(path).pixels, expected), orientation
        assert np.array_equal(image.rows(0, image.height), expected), orientation
        assert np.array_equal(image.take(np.arange(expected.shape[0] * expected.shape[1])), expected.reshape(-1, 3)), orientation


def test_only_large_png_and_tiff_files_are_streamed(tmp_path, monkeypatch):
    files = _files(tmp_path)
    jpeg = tmp_path / "photo.jpg"
    Image.fromarray(RGB8).save(jpeg)
    assert not isinstance(mapped.open_image(files["rgb.png"]), mapped.MappedImage)
    monkeypatch.setattr(mapped, "STREAM_PIXELS", 100)
    assert isinstance(mapped.open_image(files["rgb.png"]), mapped.MappedImage)
    assert isinstance(mapped.open_image(files["multi-strip.tif"]), mapped.MappedImage)
    assert not isinstance(mapped.open_image(jpeg), mapped.MappedImage)  # no streaming decoder: decoded as before
    odd = {"zlib.tif": dict(compression="zlib", tile=(16, 16)), "cmyk.tif": dict(photometric="separated")}
    for name, options in odd.items():  # layouts the mapped reader does not handle: decoded as before (≤ io.MAX_PIXELS)
        data = RGB8 if name != "cmyk.tif" else np.concatenate([RGB8, RGB8[..., :1]], axis=2)
        tifffile.imwrite(tmp_path / name, data, **options)
        with pytest.raises(mapped.NotStreamable):
            mapped.open_mapped(tmp_path / name)
        assert np.array_equal(mapped.open_image(tmp_path / name).pixels, load_image(tmp_path / name).pixels), name
    interlaced = tmp_path / "interlaced.png"
    png.Writer(40, 29, greyscale=False, interlace=True).write(open(interlaced, "wb"), RGB8.reshape(29, -1))
    assert np.array_equal(mapped.open_image(interlaced).pixels, load_image(interlaced).pixels)
    monkeypatch.setattr(mapped, "MAX_PIXELS", 100)
    with pytest.raises(KanimgError, match="convert it to an uncompressed TIFF"):
        mapped.open_image(interlaced)


def _png_claiming(path: Path, width: int, height: int, rows: int) -> Path:
    """An RGB PNG whose header claims width × height pixels but whose data holds ``rows`` rows."""
    with open(path, "wb") as f:
        f.write(png.signature)
        png.write_chunk(f, b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
        png.write_chunk(f, b"IDAT", zlib.compress(bytes((1 + 3 * width) * rows)))
        png.write_chunk(f, b"IEND")
    return path


def test_hostile_and_broken_files_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(KanimgError, match="over the limit"):
        mapped.open_mapped(_png_claiming(tmp_path / "huge.png", 1_000_000, 1_000_000, 1))
    truncated = _png_claiming(tmp_path / "truncated.png", 20_000, 10_000, 3)  # under the limit, data cut off
    with pytest.raises(KanimgError) as caught:
        mapped.open_mapped(truncated)
    assert str(caught.value).startswith(str(truncated)) and "\n" not in str(caught.value)
    with mock.patch("kanimg.mapped.shutil.disk_usage", return_value=mock.Mock(free=10 << 20)):
        with pytest.raises(KanimgError, match="temporary space.*TMPDIR"):
            mapped.open_mapped(_files(tmp_path)["rgb.png"])
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((8, 8), np.float32))
    with pytest.raises(KanimgError, match="sample type"):
        mapped.open_mapped(tmp_path / "float.tif")


def test_a_mapped_target_serves_what_an_image_target_holds(tmp_path):
    path = _files(tmp_path)["multi-strip.tif"]
    decoded = load_image(path).pixels
    for convention in ("centers", "linspace"):
        memory, streamed = ImageTarget(decoded, convention), MappedTarget(mapped.open_mapped(path), convention)
        index = torch.as_tensor(RNG.integers(0, memory.count, 300))
        for a, b in zip(memory.batch(index), streamed.batch(index)):
            assert torch.equal(a, b)
        for ranks in (1, 3):
            parts = [part for rank in range(ranks) for part in streamed.share(rank, ranks)]
            assert torch.equal(torch.cat([c for c, _ in parts]), memory.coords)
            assert torch.equal(torch.cat([v for _, v in parts]), memory.values)


def test_random_pixel_sampler_is_seeded_shared_and_resumable(tmp_path):
    target = MappedTarget(mapped.open_mapped(_files(tmp_path)["plain.tif"]))
    alone = target.sampler(64, seed=5)
    ranks = [target.sampler(64, seed=5, share=(r, 2)) for r in range(2)]
    for _ in range(3):
        coords, values = alone.next_batch()
        shares = [sampler.next_batch() for sampler in ranks]
        assert coords.shape == (64, 2) and alone.whole_count == 64
        assert sorted(map(tuple, coords.tolist())) == sorted(map(tuple, torch.cat([c for c, _ in shares]).tolist()))
    state = alone.state_dict()
    expected = alone.next_batch()
    resumed = target.sampler(64, seed=99)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, b) for a, b in zip(expected, resumed.next_batch()))
    with pytest.raises(KanimgError, match="batch size 0"):
        target.sampler(0)


@pytest.mark.parametrize("band_rows", [1, 4, 9, 100])
def test_banded_ssim_equals_whole_image_ssim(band_rows):
    from kanimg.metrics import ssim, ssim_in_bands

    reference = RNG.random((31, 26, 3)).astype(np.float32)
    test = np.clip(reference + 0.1 * RNG.standard_normal(reference.shape), -0.2, 1.2).astype(np.float32)
    banded = ssim_in_bands(lambda a, b: reference[a:b], lambda a, b: test[a:b], 31, band_rows)
    assert banded == pytest.approx(ssim(reference, test), abs=1e-12)


def test_render_bands_and_streamed_png_equal_the_whole_render(tmp_path):
    torch.manual_seed(0)
    model = build_model("kan", **SMALL)
    whole = render(model, 23, 17, "centers")
    bands = list(render_bands(model, 23, 17, "centers", chunk=40))  # 2 rows a band
    assert [start for start, _ in bands] == list(range(0, 23, 2))
    assert np.allclose(np.concatenate([band for _, band in bands]), whole, rtol=0, atol=1e-6)  # (other matmul blockings)
    for depth in (8, 16):
        ints = np.round(np.clip(whole, 0, 1) * (2**depth - 1)).astype(np.uint16 if depth == 16 else np.uint8)
        save_png_rows(tmp_path / f"r{depth}.png", 23, 17, 3, depth, (ints[i : i + 5] for i in range(0, 23, 5)))
        assert np.array_equal(np.round(load_image(tmp_path / f"r{depth}.png").pixels * (2**depth - 1)), ints)


def test_a_streamed_fit_writes_and_scores_what_an_in_memory_fit_does(tmp_path, monkeypatch):
    path = tmp_path / "photo.png"
    Image.fromarray(photo_crop(48)[:37]).save(path)
    options = dict(steps=30, eval_every=10, grid_update_every=10, grid_update_until=20, batch_size=256, progress=False, **SMALL)
    monkeypatch.setattr(mapped, "STREAM_PIXELS", 100)
    result = kanimg.fit(path, out=tmp_path / "run", **options)
    assert isinstance(result.image, mapped.MappedImage)
    with pytest.raises(KanimgError, match="too large to hold"):
        result.reconstruction
    pixels = load_image(path).pixels
    floats = render(result.model, 37, 48, "centers")
    expected = reconstruction_metrics(pixels, floats, 8)
    got = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert got["psnr"] == pytest.approx(expected["psnr"], abs=1e-9)
    # the PNG: rendered in bands, whose other matmul blockings move values by ~1e-7 and may
    # tip one onto the next 8-bit step
    assert got["psnr_png"] == pytest.approx(expected["psnr_png"], abs=1e-3)
    assert got["ssim"] == pytest.approx(expected["ssim"], abs=1e-3)  # of the exported PNG (rounding only)
    assert got["lpips"] is None and "streamed" in got["lpips_note"]
    exported = load_image(tmp_path / "run" / "reconstruction.png").pixels
    steps = np.abs(exported - np.round(np.clip(floats, 0, 1) * 255) / 255) * 255
    assert steps.max() <= 1 + 1e-6 and np.count_nonzero(steps > 0.5) <= 3
    assert np.array_equal(np.asarray(Image.open(tmp_path / "run" / "error.png")), error_map(pixels, exported))
    # resumed in two halves = trained at once (the sampler's state travels in the checkpoint)
    options["schedule"] = "constant"  # (a cosine schedule depends on the total steps)
    once = kanimg.fit(path, **options)
    kanimg.fit(path, out=tmp_path / "halves", **{**options, "steps": 15})
    resumed = kanimg.fit(path, out=tmp_path / "halves", resume=True, **options)
    for a, b in zip(once.trainer.model.parameters(), resumed.trainer.model.parameters()):
        assert torch.equal(a, b)


BOUNDED_FIT = textwrap.dedent("""
    import json, resource, sys
    import kanimg, kanimg.mapped as mapped
    mapped.STREAM_PIXELS = 1 << 20
    options = dict(steps=20, eval_every=10, grid_update_every=10, grid_update_until=15, widths=[2, 16, 3], grids=[32, 8],
                   levels=0, progress=False)  # a KAN on the coordinates: memory is the point, not the model
    kanimg.fit(sys.argv[1], out=sys.argv[3] + "-warm", **options)  # kernels, allocator pools, plotting: paid once
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = kanimg.fit(sys.argv[2], out=sys.argv[3], **options)
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(json.dumps({"grown": grown, "psnr": result.metrics["psnr"]}))
""")


def test_a_large_image_is_fitted_in_bounded_memory(tmp_path):
    """A 12-megapixel RGB TIFF (144 MB as float32 pixels; an in-memory fit would also hold 240 MB
    of coordinates and values) is fitted, evaluated and written with a peak RSS growth far
    below its float size, measured in a fresh process after a smaller streamed fit."""
    height, width = 3000, 4000
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    big = np.stack([np.sin(x / 97) * np.cos(y / 61), np.cos((x + y) / 143), np.sin(x * y / 4e5)], axis=2)
    tifffile.imwrite(tmp_path / "big.tif", np.round((big + 1) * 127.5).astype(np.uint8))
    tifffile.imwrite(tmp_path / "warm.tif", np.round((big[:1200, :1200] + 1) * 127.5).astype(np.uint8))
    del y, x, big
    done = subprocess.run([sys.executable, "-c", BOUNDED_FIT, tmp_path / "warm.tif", tmp_path / "big.tif", tmp_path / "run"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    float_size = height * width * 3 * 4
    assert report["grown"] < float_size / 3, report
    assert Image.open(tmp_path / "run" / "reconstruction.png").size == (width, height)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["psnr"] == pytest.approx(report["psnr"])
