"""Procedural training images for the colours and content that the built-in photos lack (numpy + pillow).

The photos that ship inside pip packages (``data.PHOTOS``) are mostly gray, red or brown: no saturated
green, yellow, cyan or magenta, and few sharp-edged flat regions. Two seeded generators fill the gap:

- ``dead_leaves``: the dead-leaves model (occluding discs, boxes and triangles whose sizes follow a
  power law, so edges appear at every scale, as in photos), each leaf a random colour from the whole HSV
  gamut, with a little sensor-like noise;
- ``colour_clouds``: smooth random hue, saturation and value fields (power spectra 1/f³ to 1/f⁴, smoother
  than photos' 1/f², so that colour, not noise, dominates), colour changing gradually over the circle.

Same name, same pixels on every machine: everything is drawn from ``numpy.random.default_rng(seed)``.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .colour import hsv_to_rgb

SIZE = 512


def _random_colours(rng: np.random.Generator, n: int) -> np.ndarray:
    """n colours spread over the HSV gamut (hue uniform, saturation and value biased high) → uint8 [n, 3]."""
    hsv = np.stack([rng.random(n), rng.random(n) ** 0.5, 0.15 + 0.85 * rng.random(n) ** 0.5], axis=-1)
    return np.rint(hsv_to_rgb(hsv) * 255.0).astype(np.uint8)


def dead_leaves(seed: int, size: int = SIZE, leaves: int = 4000) -> np.ndarray:
    """Dead-leaves image: ``leaves`` random shapes, radius ~ r⁻³ in [4, size/4] px (about 99 % of the
    canvas covered) → uint8 [size, size, 3]."""
    rng = np.random.default_rng(seed)
    r_min, r_max = 4.0, size / 4.0
    # inverse CDF of p(r) ∝ r^-3 on [r_min, r_max]
    u = rng.random(leaves)
    radius = 1.0 / np.sqrt(1.0 / r_min**2 - u * (1.0 / r_min**2 - 1.0 / r_max**2))
    centres = rng.random((leaves, 2)) * size
    kinds = rng.integers(0, 3, leaves)
    angles = rng.random(leaves) * 2 * np.pi
    colours = _random_colours(rng, leaves)
    canvas = Image.new("RGB", (size, size), tuple(int(c) for c in colours[0]))
    draw = ImageDraw.Draw(canvas)
    for (x, y), r, kind, a, colour in zip(centres, radius, kinds, angles, colours):
        fill = tuple(int(c) for c in colour)
        if kind == 0:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        else:
            corners = 4 if kind == 1 else 3
            t = a + np.arange(corners) * 2 * np.pi / corners
            draw.polygon([(float(x + r * np.cos(v)), float(y + r * np.sin(v))) for v in t], fill=fill)
    img = np.asarray(canvas).astype(np.float64)
    img += rng.normal(0.0, 3.0, img.shape)                       # a little noise, as a camera adds
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def _pink_field(rng: np.random.Generator, size: int, slope: float) -> np.ndarray:
    """A random field with power spectrum ∝ 1/f^slope, scaled to [0, 1] → float64 [size, size]."""
    f = np.sqrt(np.fft.fftfreq(size)[:, None] ** 2 + np.fft.fftfreq(size)[None, :] ** 2)
    amplitude = np.where(f > 0, np.maximum(f, 1.0 / size) ** (-slope / 2.0), 0.0)
    spectrum = amplitude * np.exp(2j * np.pi * rng.random((size, size)))
    field = np.real(np.fft.ifft2(spectrum))
    return (field - field.min()) / (field.max() - field.min())


def colour_clouds(seed: int, size: int = SIZE) -> np.ndarray:
    """Smooth random hue (two turns of range), saturation and value fields → uint8 [size, size, 3]."""
    rng = np.random.default_rng(seed)
    hue = (2.0 * _pink_field(rng, size, 4.0)) % 1.0
    sat = 0.2 + 0.8 * _pink_field(rng, size, 3.5)
    val = 0.1 + 0.9 * _pink_field(rng, size, 3.0)
    return np.rint(hsv_to_rgb(np.stack([hue, sat, val], axis=-1)) * 255.0).astype(np.uint8)


#: name -> (generator, seed): what ``data.load_photo`` returns for these names.
IMAGES = {
    "dead_leaves_1": (dead_leaves, 1),
    "dead_leaves_2": (dead_leaves, 2),
    "colour_clouds_1": (colour_clouds, 1),
    "colour_clouds_2": (colour_clouds, 2),
}


def make(name: str) -> np.ndarray:
    """The procedural image ``name`` (a key of ``IMAGES``) → uint8 [512, 512, 3]; KeyError otherwise."""
    generator, seed = IMAGES[name]
    return generator(seed)
