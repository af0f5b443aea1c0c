"""Sizing and training length: models grow with the budget and fit it; the header estimate matches real files."""
import numpy as np
import pytest
import torch

from conftest import photo_crop
from kanimg.compress import allocate as allocation, neural
from kanimg.compress.allocate import allocate
from kanimg.compress.bitstream import encode_model
from kanimg.compress.kimg import ImageInfo
from kanimg.compress.neural import default_steps
from kanimg.compress.quantize import QuantConfig
from kanimg.compress.sizing import coin_depth, size_model
from kanimg.compress.tensors import fold_spline_scales
from kanimg.errors import KanimgError
from kanimg.io import ImageData
from kanimg.models import build_model
from kanimg.sampling import ImageTarget
from kanimg.train import Trainer, TrainConfig

IMAGE = ImageInfo(512, 768, 3)


@pytest.mark.parametrize("family, quant", [("kan", QuantConfig(8)), ("siren", QuantConfig(16))])
def test_models_grow_with_the_budget_and_fit_it(family, quant):
    previous = 0
    for bpp in (0.1, 0.2, 0.3, 0.5, 1.0):
        sizing = size_model(family, IMAGE, bpp, quant)
        assert sizing.estimated_bytes <= sizing.budget_bytes == pytest.approx(bpp * 512 * 768 / 8)
        assert sizing.estimated_bytes > 0.9 * sizing.budget_bytes  # and uses most of it
        assert sizing.params > previous
        previous = sizing.params


def test_float16_siren_file_meets_the_budget_exactly_as_estimated():
    sizing = size_model("siren", IMAGE, 0.3, QuantConfig(16))
    model = build_model(**sizing.spec)
    data = encode_model(model, IMAGE, QuantConfig(16))
    assert len(data) == sizing.estimated_bytes <= sizing.budget_bytes
    assert len(sizing.spec["widths"]) - 2 == coin_depth(sizing.params) == 10  # COIN's 10 sine layers at 0.3 bpp on 768×512
    assert coin_depth(1800) == 5 and coin_depth(30000) == 13


def test_header_estimate_matches_a_real_kan_file():
    sizing = size_model("kan", ImageInfo(64, 64, 3), 1.0, QuantConfig(8))
    torch.manual_seed(0)
    data = encode_model(build_model(**sizing.spec), ImageInfo(64, 64, 3), QuantConfig(8))
    from kanimg.compress import kimg
    payload = len(kimg.read(data).payload)
    header = len(data) - payload
    assert sizing.header_bytes - 16 <= header <= sizing.header_bytes + 4  # the estimate assumes 2 streams per spline tensor


def test_first_grid_follows_the_resolution():
    small = size_model("kan", ImageInfo(64, 64, 3), 0.5, QuantConfig(8)).spec["grids"][0]
    large = size_model("kan", IMAGE, 0.5, QuantConfig(8)).spec["grids"][0]
    assert small < large


def test_budget_below_the_smallest_model_is_refused():
    with pytest.raises(KanimgError, match="ask for at least"):
        size_model("kan", ImageInfo(16, 16, 3), 0.05, QuantConfig(8))
    with pytest.raises(KanimgError, match="positive"):
        size_model("kan", IMAGE, 0, QuantConfig(8))


def fitted_crop_model():
    """A small KAN trained briefly on a 32×32 photo crop (scales folded), its ImageInfo and target."""
    target = ImageTarget(photo_crop(32).astype(np.float32) / 255)
    torch.manual_seed(0)
    model = build_model("kan", widths=[2, 8, 4, 4, 3], grids=[12, 4, 4, 4], directions=0, levels=0)
    trainer = Trainer(model, target, TrainConfig(steps=100, lr=2e-2, batch_size=0, eval_every=100), progress=False)
    trainer.train()
    fold_spline_scales(model)
    return model, ImageInfo(32, 32, 3), target


def estimated_distortion(chosen) -> float:
    """The allocation's own (additive) distortion estimate for the bits it chose."""
    return sum(chosen.distortions[t, allocation.BIT_RANGE.index(n)] for t, n in enumerate(chosen.bits))


def test_bit_allocation_fills_the_budget_and_spends_bits_where_they_pay():
    model, image, target = fitted_crop_model()
    previous = None
    for budget in (440.0, 560.0, 800.0):
        chosen = allocate(model, image, target.coords, target.values, budget)
        data = encode_model(model, image, QuantConfig(max(chosen.bits)), chosen.bits)
        assert len(data) <= budget and abs(len(data) - chosen.estimated_bytes) <= 8
        spent = estimated_distortion(chosen)
        assert previous is None or spent <= previous  # more bytes, less distortion
        if previous is None:
            assert len(data) > budget - 40  # a tight budget is used up
            assert len(set(chosen.bits)) > 1  # tensors differ in what a bit buys
        previous = spent


def test_half_bits_reach_less_distortion_than_whole_bits_for_the_same_budget(monkeypatch):
    model, image, target = fitted_crop_model()
    distortion = {}
    for step in (1.0, 0.5):
        monkeypatch.setattr(allocation, "BIT_RANGE", tuple(float(n) for n in np.arange(4, 12 + step, step)))
        monkeypatch.setattr(allocation, "LOOKAHEAD", round(1 / step))
        chosen = allocate(model, image, target.coords, target.values, 560.0)
        assert chosen.estimated_bytes <= 560.0
        distortion[step] = estimated_distortion(chosen)
    assert distortion[0.5] < distortion[1.0]


def test_training_length_scales_with_the_pixel_count_within_bounds():
    assert default_steps(24 * 24) == 5000  # small images keep the floor
    assert default_steps(256 * 256) == 5000  # ~300 passes over every pixel
    assert default_steps(512 * 384) == 15000
    assert default_steps(768 * 512) == 25000 == default_steps(4000 * 3000)  # the ceiling


def test_compress_trains_for_the_default_length_unless_told(monkeypatch):
    monkeypatch.setattr(neural, "default_steps", lambda pixels: 7 if pixels == 16 * 16 else 1)
    image = ImageData((photo_crop(16) / 255.0).astype("float32"), "RGB", 8, "crop")
    config = neural.CompressConfig(model="kan", qat_steps=0, bits=8, device="cpu")
    assert neural.compress_image(image, 8.0, config).extra["training"]["steps"] == 7
    config = neural.CompressConfig(model="kan", steps=3, qat_steps=0, bits=8, device="cpu")
    assert neural.compress_image(image, 8.0, config).extra["training"]["steps"] == 3
