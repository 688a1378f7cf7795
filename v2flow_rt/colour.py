"""Colour transforms of uint8 RGB images (numpy only): hue rotation and saturation scaling in HSV.

Used by the colour evaluation suite (``evaluate.evaluate_colour``) to show a model photos whose palette
is unlike its training set's, and usable as training augmentation. HSV as in ``colorsys``: hue in
turns [0, 1), value = max(R, G, B), saturation = (max − min) / max; a gray pixel has no hue and stays
gray under every rotation.
"""

from __future__ import annotations

import numpy as np


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """float RGB in [0, 1], shape [..., 3] → HSV in [0, 1] (hue in turns), same shape, float64."""
    rgb = np.asarray(rgb, dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)                                     # chroma
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    safe = np.where(c > 0, c, 1.0)
    h = np.where(v == r, (g - b) / safe, np.where(v == g, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    h = np.where(c > 0, (h / 6.0) % 1.0, 0.0)
    return np.stack([h, s, v], axis=-1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """HSV in [0, 1] (hue in turns), shape [..., 3] → float RGB in [0, 1], float64."""
    hsv = np.asarray(hsv, dtype=np.float64)
    h, s, v = hsv[..., 0] % 1.0, hsv[..., 1], hsv[..., 2]
    k = (np.array([5.0, 3.0, 1.0]) + h[..., None] * 6.0) % 6.0   # [..., 3]: the R, G, B phase
    return v[..., None] - (v * s)[..., None] * np.clip(np.minimum(k, 4.0 - k), 0.0, 1.0)


def recolour(images: np.ndarray, hue_deg: float = 0.0, saturation: float = 1.0) -> np.ndarray:
    """uint8 [..., 3] RGB images with the hue rotated by ``hue_deg`` degrees and the saturation scaled by
    ``saturation`` (clipped to 1); value (brightness of the strongest channel) is kept. → uint8, same shape.
    """
    if hue_deg % 360.0 == 0.0 and saturation == 1.0:
        return np.array(images, dtype=np.uint8, copy=True)
    hsv = rgb_to_hsv(np.asarray(images, dtype=np.float64) / 255.0)
    hsv[..., 0] = (hsv[..., 0] + hue_deg / 360.0) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * saturation, 0.0, 1.0)
    return np.rint(hsv_to_rgb(hsv) * 255.0).clip(0, 255).astype(np.uint8)
