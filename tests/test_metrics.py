"""Tests of v2flow_rt.metrics against known values, scikit-image and torch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from v2flow_rt import data, metrics
from v2flow_rt.errors import ShapeError


def _skimage_ssim(a: np.ndarray, b: np.ndarray, data_range: float) -> float:
    from skimage.metrics import structural_similarity

    return float(structural_similarity(a, b, channel_axis=-1, gaussian_weights=True, sigma=1.5,
                                       use_sample_covariance=False, data_range=data_range))


# ----------------------------------------------------------------------------- PSNR

def test_psnr_known_value() -> None:
    a = np.full((8, 8, 3), 100, dtype=np.uint8)
    # MSE 1 on a 255 range: 10 log10(255^2) = 48.1308 dB
    assert metrics.psnr(a, a + 1) == pytest.approx(10 * math.log10(255**2), abs=1e-12)
    assert metrics.psnr(a, a + 1) == pytest.approx(48.1308, abs=1e-4)
    # uint8 inputs must not wrap around: 0 - 255 is a difference of 255, PSNR 0 dB
    assert metrics.psnr(np.zeros(4, np.uint8), np.full(4, 255, np.uint8)) == pytest.approx(0.0)


def test_psnr_identical_is_inf_and_data_range_scales() -> None:
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.float64)
    assert metrics.psnr(a, a) == float("inf")
    b = np.clip(a + rng.normal(0, 5, a.shape), 0, 255)
    assert metrics.psnr(a / 255, b / 255, data_range=1.0) == pytest.approx(metrics.psnr(a, b))


def test_psnr_per_image() -> None:
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (3, 3, 8, 8))
    b = a + rng.normal(0, 0.1, a.shape)
    b[1] = a[1]
    per = metrics.psnr_per_image(a, b, data_range=2.0)
    assert per.shape == (3,) and per[1] == float("inf")
    for i in (0, 2):
        assert per[i] == pytest.approx(metrics.psnr(a[i], b[i], data_range=2.0), abs=1e-12)


def test_psnr_shape_mismatch() -> None:
    with pytest.raises(ShapeError, match="differ in shape"):
        metrics.psnr(np.zeros((4, 4)), np.zeros((4, 5)))


# ----------------------------------------------------------------------------- SSIM

# Same algorithm in float64 on both sides: only summation order differs (~1e-15), 1e-6 is the spec.
SSIM_TOL = 1e-6


@pytest.mark.parametrize("shape", [(11, 11, 3), (37, 53, 3), (64, 48, 1)])
def test_ssim_matches_skimage_on_random_uint8(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(sum(shape))
    a = rng.integers(0, 256, shape, dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, shape), 0, 255).astype(np.uint8)
    assert metrics.ssim(a, b) == pytest.approx(_skimage_ssim(a, b, 255.0), abs=SSIM_TOL)


def test_ssim_matches_skimage_on_float_model_range() -> None:
    rng = np.random.default_rng(7)
    a = rng.uniform(-1, 1, (40, 30, 3))
    b = np.clip(0.7 * a + rng.normal(0, 0.2, a.shape), -1, 1)
    assert metrics.ssim(a, b, data_range=2.0) == pytest.approx(_skimage_ssim(a, b, 2.0), abs=SSIM_TOL)


def test_ssim_matches_skimage_on_a_photo() -> None:
    img = data.load_photo("chelsea")
    rng = np.random.default_rng(3)
    noisy = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    ours = metrics.ssim(img, noisy)
    assert 0.3 < ours < 0.95  # noise at sigma 12 visibly lowers SSIM on a real photo
    assert ours == pytest.approx(_skimage_ssim(img, noisy, 255.0), abs=SSIM_TOL)
    assert metrics.ssim(img, img) == pytest.approx(1.0, abs=1e-12)


def test_ssim_batch_is_mean_of_images() -> None:
    rng = np.random.default_rng(11)
    a = rng.integers(0, 256, (3, 20, 24, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-60, 61, a.shape), 0, 255).astype(np.uint8)
    expected = np.mean([_skimage_ssim(a[i], b[i], 255.0) for i in range(3)])
    assert metrics.ssim(a, b) == pytest.approx(expected, abs=SSIM_TOL)
    per = metrics.ssim_per_image(a, b)
    assert per.shape == (3,) and per[1] == pytest.approx(_skimage_ssim(a[1], b[1], 255.0), abs=SSIM_TOL)


def test_ssim_refuses_small_or_mismatched() -> None:
    with pytest.raises(ShapeError, match="11x11"):
        metrics.ssim(np.zeros((10, 20, 3)), np.zeros((10, 20, 3)))
    with pytest.raises(ShapeError, match="differ in shape"):
        metrics.ssim(np.zeros((16, 16, 3)), np.zeros((16, 16, 1)))
    with pytest.raises(ShapeError, match=r"\[H, W, C\]"):
        metrics.ssim(np.zeros((16, 16)), np.zeros((16, 16)))


# ----------------------------------------------------------------------------- grid baseline

def test_grid_baseline_reproduces_a_constant_image_exactly() -> None:
    x = np.full((2, 3, 32, 48), 0.375, dtype=np.float32)
    out = metrics.grid_baseline(x, 8)
    assert out.dtype == np.float32 and np.array_equal(out, x)


@pytest.mark.parametrize("grid", [1, 2, 4, 8, 16])
def test_grid_baseline_matches_torch_pool_then_bilinear(grid: int) -> None:
    torch = pytest.importorskip("torch")
    f = torch.nn.functional
    x = np.random.default_rng(grid).standard_normal((2, 3, 64, 32))
    ref = f.interpolate(f.avg_pool2d(torch.from_numpy(x), (64 // grid, 32 // grid)),
                        size=(64, 32), mode="bilinear", align_corners=False).numpy()
    # both float64, same weights: only rounding differs
    np.testing.assert_allclose(metrics.grid_baseline(x, grid), ref, rtol=0, atol=1e-12)


def test_bilinear_matrix_matches_torch_for_non_integer_factors() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(2).standard_normal((1, 1, 5, 7))
    ref = torch.nn.functional.interpolate(torch.from_numpy(x), size=(13, 16), mode="bilinear",
                                          align_corners=False).numpy()[0, 0]
    ours = metrics._bilinear_matrix(13, 5) @ x[0, 0] @ metrics._bilinear_matrix(16, 7).T
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-12)


def test_grid_baseline_identity_when_each_cell_is_one_pixel() -> None:
    x = np.random.default_rng(4).standard_normal((1, 3, 16, 16))
    np.testing.assert_allclose(metrics.grid_baseline(x, 16), x, rtol=0, atol=1e-15)


def test_grid_baseline_keeps_each_channel_mean() -> None:
    # With an integer enlargement factor every cell's bilinear weights sum to the factor (the edge
    # clamp gives the border cells exactly the weight they lose), so the image mean is preserved.
    x = np.random.default_rng(5).uniform(-1, 1, (2, 3, 48, 24))
    out = metrics.grid_baseline(x, 4)
    np.testing.assert_allclose(out.mean(axis=(2, 3)), x.mean(axis=(2, 3)), rtol=0, atol=1e-12)
    assert not np.allclose(out, x)  # but the detail inside a cell is gone


def test_grid_baseline_refuses_indivisible_size() -> None:
    with pytest.raises(ShapeError, match="divisible"):
        metrics.grid_baseline(np.zeros((1, 3, 30, 32)), 8)
    with pytest.raises(ShapeError, match="float"):
        metrics.grid_baseline(np.zeros((1, 3, 32, 32), dtype=np.uint8), 8)
