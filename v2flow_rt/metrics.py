"""Image quality metrics (PSNR, SSIM) and the token-grid baseline, in numpy only.

SSIM reproduces ``skimage.metrics.structural_similarity(a, b, channel_axis=-1,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=...)`` without importing
scikit-image or scipy, so the runtime path stays numpy-only. All math is float64.
"""

from __future__ import annotations

import numpy as np

from .errors import ShapeError

# SSIM constants of Wang et al. 2004, as skimage uses them.
_K1, _K2, _SIGMA, _TRUNCATE = 0.01, 0.03, 1.5, 3.5


def _pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Both inputs as float64 arrays of one shape; ShapeError otherwise."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ShapeError(f"{what}: inputs differ in shape, {x.shape} vs {y.shape}")
    if x.size == 0:
        raise ShapeError(f"{what}: inputs are empty, shape {x.shape}")
    return x, y


def _psnr_from_mse(mse: np.ndarray, data_range: float) -> np.ndarray:
    """10 log10(R^2 / mse), with mse == 0 -> +inf (identical images)."""
    with np.errstate(divide="ignore"):
        return np.where(mse == 0, np.inf, 10.0 * np.log10(data_range**2 / np.maximum(mse, 1e-300)))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """PSNR in dB over the whole arrays (any equal shapes): one MSE, not a mean of per-image PSNRs.

    Identical inputs give ``float('inf')``. Raises ShapeError if the shapes differ.
    """
    x, y = _pair(a, b, "psnr")
    return float(_psnr_from_mse(np.mean((x - y) ** 2), data_range))


def psnr_per_image(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """PSNR in dB of each item of batched arrays [B, ...] -> float64 [B] (inf where identical)."""
    x, y = _pair(a, b, "psnr_per_image")
    if x.ndim < 2:
        raise ShapeError(f"psnr_per_image: expected batched arrays [B, ...], got shape {x.shape}")
    mse = ((x - y) ** 2).reshape(x.shape[0], -1).mean(axis=1)
    return _psnr_from_mse(mse, data_range)


# ----------------------------------------------------------------------------- SSIM

def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """scipy.ndimage's 1-D gaussian: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def _filter_last2(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Separable correlation of [..., H, W] with ``kernel`` along H then W, scipy 'reflect' edges.

    numpy's 'symmetric' padding (d c b a | a b c d | d c b a) is scipy.ndimage's 'reflect' mode.
    (SSIM then crops a border as wide as the kernel radius, so the mean never sees padded values;
    the mode is kept for a faithful SSIM map.)
    """
    r = len(kernel) // 2
    h, w = x.shape[-2:]
    lead = [(0, 0)] * (x.ndim - 2)
    padded = np.pad(x, lead + [(r, r), (0, 0)], mode="symmetric")
    x = sum(k * padded[..., i:i + h, :] for i, k in enumerate(kernel))  # [..., H, W]
    padded = np.pad(x, lead + [(0, 0), (r, r)], mode="symmetric")
    return sum(k * padded[..., i:i + w] for i, k in enumerate(kernel))  # [..., H, W]


def _ssim_maps_mean(x: np.ndarray, y: np.ndarray, data_range: float) -> np.ndarray:
    """Mean SSIM of [..., H, W] planes -> [...] (one value per plane), skimage's algorithm."""
    kernel = _gaussian_kernel(_SIGMA, _TRUNCATE)
    win = len(kernel)  # 11: skimage sets win_size to the gaussian's support for the border crop
    if x.shape[-2] < win or x.shape[-1] < win:
        raise ShapeError(f"ssim: images must be at least {win}x{win} pixels, "
                         f"got {x.shape[-1]}x{x.shape[-2]}")
    ux, uy = _filter_last2(x, kernel), _filter_last2(y, kernel)
    # population covariance (use_sample_covariance=False), as in Wang et al. 2004
    vx = _filter_last2(x * x, kernel) - ux * ux
    vy = _filter_last2(y * y, kernel) - uy * uy
    vxy = _filter_last2(x * y, kernel) - ux * uy
    c1, c2 = (_K1 * data_range) ** 2, (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))
    pad = (win - 1) // 2  # skimage averages only where the window lies inside the image
    return s[..., pad:-pad, pad:-pad].mean(axis=(-2, -1))


def ssim_per_image(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> np.ndarray:
    """SSIM of each image of [B, H, W, C] batches -> float64 [B] (mean over channels).

    Raises ShapeError for other layouts, differing shapes, or images under 11x11 pixels.
    """
    x, y = _pair(a, b, "ssim_per_image")
    if x.ndim != 4:
        raise ShapeError(f"ssim_per_image: expected [B, H, W, C] batches, got shape {x.shape}")
    planes = _ssim_maps_mean(x.transpose(0, 3, 1, 2), y.transpose(0, 3, 1, 2), data_range)  # [B, C]
    return planes.mean(axis=1)


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Mean SSIM of [H, W, C] images (channel-averaged), or the mean over a [B, H, W, C] batch.

    Matches skimage's ``structural_similarity(channel_axis=-1, gaussian_weights=True, sigma=1.5,
    use_sample_covariance=False)``; unlike skimage, float32 inputs are also computed in float64.
    Raises ShapeError for other layouts, differing shapes, or images under 11x11 pixels.
    """
    x, y = _pair(a, b, "ssim")
    if x.ndim == 3:
        x, y = x[None], y[None]
    if x.ndim != 4:
        raise ShapeError(f"ssim: expected [H, W, C] or [B, H, W, C], got shape {x.shape}")
    return float(ssim_per_image(x, y, data_range).mean())


# ----------------------------------------------------------------------------- token-grid baseline

def _bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """[n_out, n_in] weights of 1-D linear interpolation, align_corners=False.

    Output pixel i samples the input at (i + 0.5) * n_in / n_out - 0.5 (pixel centres line up);
    positions before the first input centre are clamped to it and neighbours past the last are
    clamped to the last: the convention of torch.nn.functional.interpolate(align_corners=False)
    and of PIL's bilinear resize when enlarging.
    """
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)
    return m


def grid_baseline(images: np.ndarray, grid: int, upsample: str = "bilinear") -> np.ndarray:
    """What a grid x grid token layout carries on its own: float [B, C, H, W] -> float [B, C, H, W].

    Each of the grid x grid cells is replaced by its mean colour, and the grid of means is enlarged
    back to H x W with bilinear interpolation (align_corners=False: half-pixel centres, edges
    clamped, as torch's ``interpolate(mode='bilinear')``). Bilinear rather than nearest because a
    blocky upsample would add cell edges that no decoder would produce, making the baseline look
    worse than the information it holds. A reconstruction should beat this PSNR to show the tokens
    carry more than their cell's average colour. Output dtype follows the input (float math in
    float64). Raises ShapeError if H or W is not a multiple of ``grid``.
    """
    x = np.asarray(images)
    if x.ndim != 4 or not np.issubdtype(x.dtype, np.floating):
        raise ShapeError(f"grid_baseline: expected float [B, C, H, W], got {x.dtype} {x.shape}")
    b, c, h, w = x.shape
    if grid < 1 or h % grid or w % grid:
        raise ShapeError(f"grid_baseline: image {h}x{w} is not divisible into a {grid}x{grid} grid")
    cells = x.astype(np.float64).reshape(b, c, grid, h // grid, grid, w // grid).mean(axis=(3, 5))
    if upsample == "nearest":   # the literal block image of cell means, reported for context
        return np.repeat(np.repeat(cells, h // grid, axis=2), w // grid, axis=3).astype(x.dtype, copy=False)
    if upsample != "bilinear":
        raise ShapeError(f"grid_baseline: upsample must be 'bilinear' or 'nearest', got {upsample!r}")
    mh, mw = _bilinear_matrix(h, grid), _bilinear_matrix(w, grid)
    out = np.einsum("hi,bcij,wj->bchw", mh, cells, mw, optimize=True)  # [B, C, H, W]
    return out.astype(x.dtype, copy=False)
