"""The .kimg format: bit-exact round trips, bpp = file size, and refusal of damaged files."""
import os
import stat
import struct
import zlib
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import photo_crop
from kanimg.cli import main
from kanimg.compress import kimg
from kanimg.compress.bitstream import decode_image, decode_model, encode_model, join_streams, split_streams
from kanimg.compress.kimg import ImageInfo
from kanimg.compress.quantize import QuantConfig, error_bound, quantize_tensor
from kanimg.compress.tensors import fold_spline_scales, stored_arrays
from kanimg.errors import KanimgError
from kanimg.io import load_image
from kanimg.models import build_model


def trained_like(name: str, seed: int = 0):
    """A model with non-trivial weights (smooth random splines, as training leaves them)."""
    torch.manual_seed(seed)
    if name == "kan":
        model = build_model("kan", widths=[2, 6, 5, 3], grids=[12, 4, 4], grid_kind="uniform", directions=0, levels=0)
        with torch.no_grad():
            for layer in model.layers:
                layer.spline_weight.copy_(torch.cumsum(torch.randn_like(layer.spline_weight) * 0.1, dim=-1))
                layer.spline_scale.uniform_(0.5, 1.5)
        return model
    return build_model("siren", widths=[2, 12, 12, 3])


@pytest.mark.parametrize("quant", [QuantConfig(8), QuantConfig(5, "channel"), QuantConfig(6.5), QuantConfig(12), QuantConfig(16)])
@pytest.mark.parametrize("name", ["kan", "siren"])
def test_round_trip_restores_the_quantised_weights_exactly(name, quant):
    model = trained_like(name)
    data = encode_model(model, ImageInfo(12, 20, 3), quant)
    decoded = decode_model(data)
    assert decoded.image == ImageInfo(12, 20, 3) and decoded.quant == quant and decoded.model.spec["widths"] == model.spec["widths"]
    assert all(p.dtype == torch.float64 for p in decoded.model.parameters())
    for original, restored in zip(stored_arrays(model), stored_arrays(decoded.model)):
        if quant.is_float16:
            assert np.array_equal(restored, original.astype(np.float16).astype(np.float64))
        else:
            q = quantize_tensor(original, quant)
            assert np.array_equal(restored, q.dequantize())  # exact, not approximately
            assert np.all(np.abs(restored - original) <= np.broadcast_to(error_bound(q), original.shape) * (1 + 1e-12))


def test_half_bit_allocations_round_trip_and_re_encode_to_the_same_bytes():
    model = trained_like("kan")
    bits = [7.5, 4.5, 9, 6.5, 12, 5.5]
    data = encode_model(model, ImageInfo(12, 20, 3), QuantConfig(12), bits)
    decoded = decode_model(data)
    assert decoded.bits == bits and decoded.describe() == "4.5–12-bit per tensor"
    for original, restored, n in zip(stored_arrays(model), stored_arrays(decoded.model), bits):
        assert np.array_equal(restored, quantize_tensor(original, QuantConfig(n)).dequantize())
    assert encode_model(decoded.model, decoded.image, decoded.quant, decoded.bits) == data


def test_version_1_files_with_whole_bits_still_decode(monkeypatch):
    model = trained_like("kan")
    bits = [8, 5, 9, 6, 12, 7]
    current = encode_model(model, ImageInfo(12, 20, 3), QuantConfig(12), bits)
    monkeypatch.setattr(kimg, "VERSION", 1)  # the writer of format version 1: bits in whole units
    old = encode_model(model, ImageInfo(12, 20, 3), QuantConfig(12), bits)
    monkeypatch.undo()
    assert old[4] == 1 and current[4] == 2 and old != current
    assert decode_model(old).bits == bits
    assert np.array_equal(decode_image(old).integers, decode_image(current).integers)


def test_kan_grid_ranges_survive_the_round_trip():
    model = trained_like("kan")
    model.update_grids(torch.rand(500, 2) * 1.6 - 0.8)  # moves the grids off [-1, 1]
    decoded = decode_model(encode_model(model, ImageInfo(8, 8, 3), QuantConfig(10)))
    for a, b in zip(model.layers, decoded.model.layers):
        assert torch.allclose(a.knots.double(), b.knots, atol=1e-6)


def test_percentile_knots_are_refused_clearly():
    model = build_model("kan", widths=[2, 4, 3], grids=[6, 4], grid_kind="percentile", directions=0, levels=0)
    model.update_grids(torch.rand(500, 2) ** 3 * 2 - 1)  # skewed samples: uneven knots
    with pytest.raises(KanimgError, match="only uniform KAN grids"):
        encode_model(model, ImageInfo(8, 8, 3), QuantConfig(10))


def test_spline_differences_invert_and_are_chosen_where_they_pay():
    ints = np.random.default_rng(0).integers(-50, 50, size=(3, 4, 9))
    for transform in range(3):
        assert np.array_equal(join_streams(split_streams(ints, transform)), ints)
    model = trained_like("kan")
    parsed = kimg.read(encode_model(model, ImageInfo(8, 8, 3), QuantConfig(10)))
    spline_transforms = [t.transform for t in parsed.tensors[1::2]]
    assert max(spline_transforms) >= 1  # random-walk coefficients: differences are cheaper


def test_kan_file_is_smaller_than_naive_storage():
    model = trained_like("kan")
    fold_spline_scales(model)
    data = encode_model(model, ImageInfo(8, 8, 3), QuantConfig(8))
    numbers = sum(a.size for a in stored_arrays(model))
    assert len(data) < numbers  # under 8 bits per stored 8-bit number, header included


def good_file(name="kan"):
    return encode_model(trained_like(name), ImageInfo(10, 14, 3), QuantConfig(8))


def test_truncated_files_are_refused():
    data = good_file()
    for size in (0, 3, 5, 9, len(data) // 2, len(data) - 1):
        with pytest.raises(KanimgError, match="truncated|not a .kimg") as info:
            kimg.read(data[:size])
        assert "\n" not in str(info.value)


def test_every_single_bit_flip_is_refused():
    data = good_file("siren")
    for position in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[position] ^= 1 << bit
            with pytest.raises(KanimgError):
                decode_image(bytes(damaged))


def test_bit_flip_in_payload_reports_a_checksum_mismatch():
    data = bytearray(good_file())
    data[-10] ^= 0x10
    with pytest.raises(KanimgError, match="checksum mismatch"):
        kimg.read(bytes(data))


def test_wrong_magic_and_future_version_are_refused_clearly():
    data = good_file()
    png = photo_crop(8)
    with pytest.raises(KanimgError, match="not a .kimg file"):
        kimg.read(b"\x89PNG\r\n\x1a\n" + bytes(png.tobytes()))
    future = bytearray(data[:-4])
    future[4] = kimg.VERSION + 1
    future += struct.pack("<I", zlib.crc32(future))
    with pytest.raises(KanimgError, match="newer than this kanimg reads"):
        kimg.read(bytes(future))


def test_crafted_header_with_a_valid_checksum_is_refused_before_allocation():
    body = bytearray(kimg.MAGIC) + bytes([1]) + kimg._varint(60000) + kimg._varint(60000)  # 3.6 gigapixels
    body += bytes([3, 8, 0, 1, 1]) + kimg._varint(2) + kimg._varint(3)
    body += struct.pack("<I", zlib.crc32(body))
    with pytest.raises(KanimgError, match="malformed .kimg file: image size"):
        kimg.read(bytes(body))


def test_cli_round_trip_is_bit_exact_and_bpp_is_the_file_size(tmp_path, capsys):
    src = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(src)
    out = tmp_path / "crop.kimg"
    assert main(["compress", str(src), "-o", str(out), "--bpp", "4", "--steps", "40", "--qat-steps", "10", "-q"]) == 0
    printed = capsys.readouterr().out
    bpp = 8 * out.stat().st_size / (24 * 24)
    assert f"{bpp:.4f} bpp" in printed and bpp <= 4
    first, second = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["decode", str(out), "-o", str(first)]) == 0
    assert main(["decode", str(out), "-o", str(second)]) == 0
    assert first.read_bytes() == second.read_bytes()
    decoded = load_image(first)
    assert decoded.pixels.shape == (24, 24, 3)
    psnr_printed = float(printed.split("PSNR ")[1].split(" dB")[0])
    from kanimg.metrics import psnr
    assert psnr(load_image(src).pixels, decoded.pixels) == pytest.approx(psnr_printed, abs=0.006)  # from the decode path
    torch.set_num_threads(1)  # the decode does not depend on the thread count
    assert main(["decode", str(out), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").read_bytes() == first.read_bytes()


def test_cli_refuses_damaged_files_with_one_line(tmp_path, capsys):
    path = tmp_path / "x.kimg"
    path.write_bytes(good_file()[:-7])
    assert main(["decode", str(path), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kanimg: error: ") and err.count("\n") == 1 and "truncated" in err
    assert not (tmp_path / "x.png").exists()
    assert main(["decode", str(tmp_path / "missing.kimg")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_screened_decode_equals_rounding_the_float64_network():
    from kanimg.compress.bitstream import render_integers
    from kanimg.io import quantize
    from kanimg.render import render

    def float64_render(decoded):
        img = decoded.image
        return render(decoded.model, img.height, img.width, img.coords, dtype=torch.float64)

    model = trained_like("kan", seed=3)
    decoded = decode_model(encode_model(model, ImageInfo(40, 56, 3), QuantConfig(9)))
    reference = quantize(float64_render(decoded), 8)  # float64 everywhere
    assert np.array_equal(render_integers(decoded), reference)
    siren = decode_model(encode_model(trained_like("siren"), ImageInfo(40, 56, 3), QuantConfig(16)))
    assert np.array_equal(render_integers(siren), quantize(float64_render(siren), 8))


@pytest.mark.parametrize("name", ["kan", "siren"])
def test_rendering_chosen_pixels_in_small_tiles_gives_exactly_those_pixels_of_the_whole_image(name, monkeypatch):
    from kanimg.compress import bitstream
    from kanimg.render import render

    decoded = decode_model(encode_model(trained_like(name), ImageInfo(40, 56, 3), QuantConfig(9 if name == "kan" else 16)))
    img = decoded.image
    whole = render(decoded.model, img.height, img.width, img.coords, dtype=torch.float64)
    assert whole.dtype == np.float64 and whole.shape == (40, 56, 3)
    whole = whole.reshape(-1, 3)
    integers = bitstream.render_integers(decoded)
    monkeypatch.setattr(bitstream, "TILE_VALUES", 100)  # tiles of a few pixels; KAN first-layer tables in pieces
    assert bitstream.tile_pixels(decoded.model.spec) < 10
    chosen = np.random.default_rng(0).choice(40 * 56, size=300, replace=False)
    subset = render(decoded.model, img.height, img.width, img.coords, chunk=7, dtype=torch.float64, pixels=chosen)
    np.testing.assert_allclose(subset, whole[chosen], rtol=0, atol=1e-12)
    assert np.array_equal(bitstream.render_integers(decoded), integers)


def test_grey_and_sixteen_bit_images_round_trip(tmp_path):
    grey = tmp_path / "grey.png"
    Image.fromarray(photo_crop(24, mode="L")).save(grey)
    deep = tmp_path / "deep.png"
    Image.fromarray(photo_crop(24, mode="L").astype(np.uint16) * 257).save(deep)  # 16-bit grey PNG
    for src, depth in ((grey, 8), (deep, 16)):
        out = tmp_path / f"{src.stem}.kimg"
        assert main(["compress", str(src), "-o", str(out), "--bpp", "3", "--steps", "20", "--qat-steps", "0", "-q"]) == 0
        png = tmp_path / f"{src.stem}-decoded.png"
        assert main(["decode", str(out)]) == 0 and png.exists()
        decoded = load_image(png)
        assert decoded.pixels.shape == (24, 24, 1) and decoded.bit_depth == depth


def crafted(spec: dict, image: ImageInfo, payload: bytes = b"") -> bytes:
    """A float16 .kimg file whose header says ``spec`` and ``image`` (valid checksum)."""
    ranges = [None] * (len(spec["widths"]) - 1) if spec["name"] == "kan" else []
    return kimg.write(kimg.KimgFile(image, spec, QuantConfig(16), ranges, [], payload))


def test_a_decompression_bomb_is_refused_from_its_header(monkeypatch):
    """72 bytes declaring a 9459x9459 image through a 4096-wide KAN: refused before anything is
    built (each field alone is within its limit; their product is not)."""
    import tracemalloc

    from kanimg.compress import bitstream

    bomb = crafted({"name": "kan", "widths": [2, 4096, 3], "grids": [600, 800]}, ImageInfo(9459, 9459, 3))
    assert len(bomb) < 100
    built = mock.patch.object(bitstream, "build_model", side_effect=AssertionError("built a model for a bomb"))
    tracemalloc.start()
    with built, pytest.raises(KanimgError, match="too costly to decode"):
        decode_image(bomb)
    assert tracemalloc.get_traced_memory()[1] < 50 << 20
    tracemalloc.stop()
    macs, memory = kimg.decode_cost({"name": "kan", "widths": [2, 4096, 3], "grids": [600, 800]}, 9459, 9459, 3)
    assert macs > kimg.DECODE_LIMITS.macs


def test_decode_cost_counts_pixels_times_network_and_limits_apply():
    spec = {"name": "kan", "widths": [2, 6, 5, 3], "grids": [12, 4, 4]}
    macs, memory = kimg.decode_cost(spec, 100, 200, 3)
    per_pixel = 6 + 6 * 8 * 5 + 5 * 8 * 3
    assert macs == (300 * 16 * 6) + 2 * 20000 * per_pixel
    assert kimg.decode_cost(spec, 200, 200, 3)[0] > macs and kimg.decode_cost(spec, 100, 200, 4)[1] > memory
    data = encode_model(trained_like("kan"), ImageInfo(100, 200, 3), QuantConfig(8))
    assert decode_image(data, kimg.DecodeLimits(macs=macs, bytes=memory)).integers.shape == (100, 200, 3)
    for tight in (kimg.DecodeLimits(macs=macs - 1, bytes=memory), kimg.DecodeLimits(macs=macs, bytes=memory - 1)):
        with pytest.raises(KanimgError, match="too costly"):
            decode_image(data, tight)


DECODE_PEAK = """
import resource, sys
from kanimg.compress import bitstream
bitstream.TILE_VALUES = 1 << 16
data = open(sys.argv[1], "rb").read()
small = open(sys.argv[2], "rb").read()
bitstream.decode_image(small)  # warm up: libraries and the kernel loaded
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
decoded = bitstream.decode_image(data)
print(decoded.integers.shape, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""


@pytest.mark.parametrize("name", ["kan", "siren"])
def test_a_large_image_from_a_small_network_decodes_in_bounded_memory(name, tmp_path):
    """Tiles: only the integer image (36 MB here) is held whole, never a float image (288 MB
    in float64) or a full activation map; peak resident memory measured in a fresh process."""
    import subprocess
    import sys

    model = trained_like(name)
    (tmp_path / "big.kimg").write_bytes(encode_model(model, ImageInfo(3000, 4000, 3), QuantConfig(16 if name == "siren" else 8)))
    (tmp_path / "small.kimg").write_bytes(encode_model(model, ImageInfo(30, 40, 3), QuantConfig(16 if name == "siren" else 8)))
    run = subprocess.run([sys.executable, "-c", DECODE_PEAK, str(tmp_path / "big.kimg"), str(tmp_path / "small.kimg")],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    shape, grown_kib = run.stdout.strip().rsplit(" ", 1)
    assert shape == "(3000, 4000, 3)"
    assert int(grown_kib) * 1024 < 120 << 20, grown_kib  # the integers plus small tiles


def test_bytes_after_the_payload_are_refused():
    for name in ("kan", "siren"):
        data = good_file(name) if name == "kan" else encode_model(trained_like(name), ImageInfo(10, 14, 3), QuantConfig(16))
        body = data[: -kimg.CHECKSUM_BYTES]
        for extra in (b"\0\0\0\0", b"\x01\x02\x03\x04" * 3, b"\0\0"):
            longer = body + extra
            longer += struct.pack("<I", zlib.crc32(longer))
            with pytest.raises(KanimgError, match="malformed"):
                decode_image(longer)


def test_non_finite_steps_weights_and_outputs_are_refused():
    model = trained_like("siren")
    data = encode_model(model, ImageInfo(10, 14, 3), QuantConfig(16))
    parsed = kimg.read(data)
    weights = np.frombuffer(parsed.payload, dtype="<f2").copy()
    for value in (np.inf, np.nan):
        bad = weights.copy()
        bad[5] = value
        with pytest.raises(KanimgError, match="weights that are not finite"):
            decode_image(kimg.write(kimg.KimgFile(parsed.image, parsed.spec, parsed.quant, [], [], bad.tobytes())))
    coded = kimg.read(good_file())
    for tensor in coded.tensors:  # finite weights (1e32) whose network overflows
        tensor.steps = np.full_like(tensor.steps, 1e30)
    with pytest.raises(KanimgError, match="output is not finite"):
        decode_image(kimg.write(coded))


def test_unreadable_and_oversized_files_are_one_line_errors(tmp_path, capsys):
    locked = tmp_path / "locked.kimg"
    locked.write_bytes(good_file())
    with mock.patch("pathlib.Path.open", side_effect=PermissionError(13, "Permission denied")):
        assert main(["decode", str(locked), "-o", str(tmp_path / "x.png")]) == 2
    assert "cannot read it (Permission denied)" in capsys.readouterr().err
    huge = tmp_path / "huge.kimg"
    with huge.open("wb") as f:
        f.truncate(kimg.MAX_FILE_BYTES + 1)  # sparse
    assert main(["decode", str(huge), "-o", str(tmp_path / "y.png")]) == 2
    assert "too large" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "y.png").exists()


def test_outputs_that_are_not_a_new_or_replaceable_file_are_refused_before_any_work(tmp_path, capsys):
    src = tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)).save(src)
    kept = src.read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    cases = [
        (["-o", str(fifo), "--force"], "not a regular file"),  # --force replaces files, never devices or pipes
        (["-o", str(src), "--force"], "is the input"),
        (["-o", str(tmp_path / "new") + "/"], "takes a file name"),  # Path would drop the slash and write a file "new"
        (["-o", str(src / "x.kimg")], "is not a folder"),
        (["-o", str(tmp_path / "a.kimg"), "--bpp", "25"], "more than the 24 bits per pixel"),
        (["-o", str(tmp_path / "a.kimg"), "--model", "latent", "--bpp", "0.5"], "less than the smallest latent file"),
        (["-o", str(tmp_path / "a.kimg"), "--model", "latent", "--bpp", "20", "--device", "cuda"], "trains on the CPU"),
    ]
    for extra, message in cases:
        with mock.patch("kanimg.compress.neural._fit", side_effect=AssertionError("trained")), \
                mock.patch("kanimg.compress.latent_codec.train_latent", side_effect=AssertionError("trained")):
            assert main(["compress", str(src), "--bpp", "4", "-q", *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (extra, err)
    assert stat.S_ISFIFO(fifo.stat().st_mode) and src.read_bytes() == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.png", "pipe"]  # nothing written, no lock left
    kimg_file = tmp_path / "crop.kimg"
    kimg_file.write_bytes(good_file())
    assert main(["decode", str(kimg_file), "-o", str(kimg_file), "--force"]) == 2  # nor does decode replace its input
    assert "is the input" in capsys.readouterr().err and kimg_file.read_bytes() == good_file()


def test_an_image_too_small_for_any_file_is_refused_without_an_impossible_bpp(tmp_path, capsys):
    """A budget under the smallest file names the bpp to ask for, unless that is more than the
    image's own bits per pixel: then it says so instead of asking for it."""
    tiny, crop = tmp_path / "tiny.png", tmp_path / "crop.png"
    Image.fromarray(photo_crop(24)[:2, :2]).save(tiny)
    Image.fromarray(photo_crop(24)).save(crop)
    for model in ("auto", "latent", "kan"):
        assert main(["compress", str(tiny), "--bpp", "20", "--model", model, "-o", str(tmp_path / "t.kimg"), "-q"]) == 2
        err = capsys.readouterr().err
        assert "more than the image's own 24 bits per pixel" in err and "ask for" not in err and err.count("\n") == 1, err
    assert main(["compress", str(crop), "--bpp", "0.5", "--model", "latent", "-o", str(tmp_path / "c.kimg"), "-q"]) == 2
    assert "ask for at least 1." in capsys.readouterr().err  # 24×24: a latent file is possible at ~1.1 bpp and more
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crop.png", "tiny.png"]


def test_a_second_writer_of_the_same_output_is_refused_and_a_lost_state_file_fails_nothing(tmp_path, capsys):
    from kanimg.files import OutputLock

    src, out = tmp_path / "crop.png", tmp_path / "crop.kimg"
    Image.fromarray(photo_crop(24)).save(src)
    args = ["compress", str(src), "-o", str(out), "--model", "kan", "--bpp", "4", "--steps", "20", "--qat-steps", "2", "-q"]
    with OutputLock(out):  # another kanimg writing it (a lock is per open file: the same process shows it)
        assert main(args) == 2
        assert "being written by another kanimg process" in capsys.readouterr().err
        (tmp_path / "g.kimg").write_bytes(good_file())
        assert main(["decode", str(tmp_path / "g.kimg"), "-o", str(out)]) == 2
        assert "being written by another kanimg process" in capsys.readouterr().err
    assert not out.exists()
    (tmp_path / ".crop.kimg.partial.pt").mkdir()  # the training state cannot be kept there, nor removed
    assert main(args) == 0  # the file is written: a warning, not a failure
    assert decode_image(out.read_bytes()).image.width == 24
    assert "could not be removed" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, message", [("--steps", "0", "--steps must be at least 1, got 0"),
                                                  ("--qat-steps", "-1", "--qat-steps must not be negative, got -1")])
def test_a_bad_step_count_names_its_flag(tmp_path, capsys, flag, value, message):
    src = tmp_path / "crop.png"
    Image.fromarray(photo_crop(16)).save(src)
    assert main(["compress", str(src), "-o", str(tmp_path / "x.kimg"), flag, value, "-q"]) == 2
    assert capsys.readouterr().err.strip() == f"kanimg: error: {message}" and not (tmp_path / "x.kimg").exists()
