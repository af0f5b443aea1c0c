"""The Python API: kanimg.fit / compare / compress / decode on files, arrays, tensors and PIL images."""
import doctest
import json

import numpy as np
import pytest
import torch
from PIL import Image

import kanimg
import kanimg.fitting
from conftest import photo_crop
from kanimg.cli import main as cli_main
from kanimg.compress import api as codec_api
from kanimg.errors import KanimgError
from kanimg.io import load_image

TINY = {"widths": [2, 8, 3], "grids": [8, 4]}


def test_the_documented_examples_run():
    for module in (kanimg.fitting, codec_api):
        assert doctest.testmod(module, optionflags=doctest.ELLIPSIS).failed == 0


def test_every_kind_of_image_becomes_the_same_pixels(tmp_path):
    rgb = photo_crop(16)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    from_file = kanimg.as_image(tmp_path / "a.png")
    for image in (rgb, torch.from_numpy(rgb.copy()), Image.fromarray(rgb), str(tmp_path / "a.png")):
        data = kanimg.as_image(image)
        assert np.array_equal(data.pixels, from_file.pixels) and data.mode == "RGB" and data.bit_depth == 8
    wide = kanimg.as_image((rgb.astype(np.uint16) * 257))
    assert wide.bit_depth == 16 and np.allclose(wide.pixels, from_file.pixels)
    floats = kanimg.as_image(rgb / 255.0)
    assert floats.bit_depth == 16 and np.allclose(floats.pixels, from_file.pixels)
    grey = kanimg.as_image(rgb[..., 0])
    assert grey.mode == "L" and grey.pixels.shape == (16, 16, 1)
    assert kanimg.as_image(rgb, grey=True).pixels.shape == (16, 16, 1)
    assert kanimg.as_image(np.dstack([rgb, rgb[..., :1]])).mode == "RGBA"
    assert kanimg.as_image(from_file) is from_file  # its own result, as it is (kanimg.compress(kanimg.as_image(x)) had failed)
    assert np.array_equal(kanimg.as_image(from_file, grey=True).pixels, kanimg.as_image(tmp_path / "a.png", grey=True).pixels)


@pytest.mark.parametrize("bad, message", [
    (np.zeros((4, 4, 5), np.uint8), "1 to 4 channels"),
    (np.zeros((2, 4, 4, 3), np.uint8), "1 to 4 channels"),
    (np.zeros((0, 4, 3), np.uint8), "empty"),
    (np.full((4, 4), 1.5, np.float32), "in \\[0, 1\\]"),
    (np.full((4, 4), np.nan), "finite"),
    (np.zeros((4, 4), bool), "dtype"),
    ([[0, 1], [1, 0]], "list"),
])
def test_bad_images_are_one_clear_error(bad, message):
    with pytest.raises(KanimgError, match=message):
        kanimg.as_image(bad)


def test_fit_on_an_array_returns_the_model_and_saves_the_cli_run_folder(tmp_path, capsys):
    image = photo_crop(16)
    result = kanimg.fit(image, steps=30, progress=False, **TINY, lr=1e-2)
    assert result.model.spec["widths"] == [2, 8, 3] and result.reconstruction.shape == (16, 16, 3)
    assert set(result.metrics) >= {"psnr", "psnr_png", "ssim", "lpips"} and result.metrics["psnr"] > 15
    assert result.history["eval_step"][-1] == 30 and not result.interrupted
    with torch.no_grad():
        assert np.array_equal(result.render(), result.reconstruction)
    assert result.render(size=(40, 20)).shape == (20, 40, 3)
    with pytest.raises(KanimgError, match="cannot render"):
        result.render(size=(0, 5))

    folder = result.save(tmp_path / "run")
    assert {p.name for p in folder.iterdir()} >= {"reconstruction.png", "error.png", "metrics.json", "curves.png", "checkpoint.pt"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["metrics"]["psnr"] == pytest.approx(result.metrics["psnr"]) and metrics["image"] is None
    saved = load_image(folder / "reconstruction.png").pixels
    assert np.abs(saved - np.clip(result.reconstruction, 0, 1)).max() <= 0.5 / 255 + 1e-6  # a uint8 image: an 8-bit PNG
    # the CLI reads what the API wrote
    assert cli_main(["render", str(folder / "checkpoint.pt"), "-o", str(tmp_path / "big.png"), "--size", "32x32"]) == 0
    assert load_image(tmp_path / "big.png").pixels.shape == (32, 32, 3)
    assert cli_main(["fit", "--resume", str(folder / "checkpoint.pt"), "-q"]) == 2
    assert "fitted from an array" in capsys.readouterr().err
    with pytest.raises(KanimgError, match="already exists|exists"):
        result.save(tmp_path / "run")
    result.save(tmp_path / "run", force=True)


def test_fit_in_memory_and_into_a_run_folder_train_alike(photo32, tmp_path):
    """One fit: the same image, model, seed and steps give the same PSNR in memory, into a run
    folder, and through the CLI (which calls kanimg.fit)."""
    memory = kanimg.fit(photo32, steps=25, progress=False, **TINY)
    files = kanimg.fit(photo32, steps=25, progress=False, out=tmp_path / "run", **TINY)
    assert files.out == tmp_path / "run" and memory.out is None
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert memory.metrics["psnr"] == pytest.approx(saved["metrics"]["psnr"], abs=1e-9) == pytest.approx(files.metrics["psnr"], abs=1e-9)
    assert cli_main(["fit", str(photo32), "-o", str(tmp_path / "cli"), "--steps", "25", "--widths", "2,8,3", "--grids", "8,4", "-q"]) == 0
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    assert cli["metrics"]["psnr"] == pytest.approx(saved["metrics"]["psnr"], abs=1e-9)


def test_unknown_options_name_the_ones_there_are():
    with pytest.raises(KanimgError, match="unknown option\\(s\\) for kan: colour.*grids.*batch_size"):
        kanimg.fit(photo_crop(8), steps=1, colour=3, progress=False)


def test_compress_and_decode_round_trip_like_the_cli(tmp_path):
    image = photo_crop(32)
    data = kanimg.compress(image, bpp=3.0, steps=30, qat_steps=0)
    (tmp_path / "a.kimg").write_bytes(data)
    assert np.array_equal(kanimg.decode(data), kanimg.decode(tmp_path / "a.kimg"))
    assert cli_main(["decode", str(tmp_path / "a.kimg"), "-o", str(tmp_path / "a.png")]) == 0
    assert np.allclose(load_image(tmp_path / "a.png").pixels, kanimg.decode(data), atol=1e-6)
    with pytest.raises(KanimgError, match="compression option"):
        kanimg.compress(image, bpp=1.0, colours=3)
    with pytest.raises(KanimgError):
        kanimg.decode(b"not a kimg file")


def test_compare_is_exported(photo32, tmp_path):
    result = kanimg.compare(photo32, ["mlp"], tmp_path / "cmp", steps=5, progress=False)
    assert [r["model"] for r in result.records] == ["mlp"] and (tmp_path / "cmp" / "index.html").exists()
