"""Metric conventions, and the LPIPS plumbing without the real ImageNet weights."""
import math

import numpy as np
import pytest
import torch
import torchvision

from conftest import photo_crop
from kanimg.metrics import lpips_distance, psnr, psnr_from_mse, ssim


def test_psnr_equals_the_papers_255_over_rmse_convention():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (20, 20, 1)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 3, a.shape), 0, 255)
    paper = 20 * math.log10(255 / math.sqrt(np.mean((a - b) ** 2)))
    assert psnr(a / 255, b / 255) == pytest.approx(paper, abs=1e-9)
    assert psnr_from_mse(0.0) == math.inf
    assert psnr_from_mse(0.01 * 4, peak=2.0) == pytest.approx(20.0)  # [-1, 1] values


def test_ssim_is_one_for_identical_images_and_drops_with_noise():
    rng = np.random.default_rng(1)
    img = photo_crop(32).astype(np.float64) / 255
    assert ssim(img, img) == pytest.approx(1.0)
    assert ssim(img, np.clip(img + rng.normal(0, 0.1, img.shape), 0, 1)) < 0.9


def test_lpips_reports_missing_weights_without_downloading(tmp_path):
    value, reason = lpips_distance(np.zeros((32, 32, 3)), np.ones((32, 32, 3)), backbone=tmp_path / "absent.pth")
    assert value is None and "not found" in reason and "\n" not in reason


def test_lpips_plumbing_with_a_stand_in_backbone(tmp_path):
    """Random AlexNet weights saved where the real ones would be: the metric runs end to end."""
    torch.manual_seed(0)
    weights = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    rng = np.random.default_rng(2)
    img = rng.random((32, 32, 3)).astype(np.float32)
    same, reason = lpips_distance(img, img, backbone=weights)
    assert reason is None and same == pytest.approx(0.0, abs=1e-6)
    noisy = np.clip(img + rng.normal(0, 0.2, img.shape), 0, 1).astype(np.float32)
    far, _ = lpips_distance(img, noisy, backbone=weights)
    assert far > 0
    grey, _ = lpips_distance(img[..., :1], noisy[..., :1], backbone=weights)  # grey is repeated to RGB
    assert grey > 0
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    value, reason = lpips_distance(img, noisy, backbone=bad)
    assert value is None and reason.startswith("LPIPS unavailable")
